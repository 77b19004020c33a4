"""An atheris (libFuzzer) target for the P2P frame parser and message validation; run by
tests/reliability/test_fuzz_frames.py as `python frames_fuzz_target.py CORPUS -flags`.

Each input is a byte stream from a peer, cut into reads at places the fuzzer also
chooses. It must only ever yield messages or raise octaskly's ProtocolError; a decoded
frame's message must validate or raise ProtocolError; the decoder never holds more than
one frame's worth of bytes. Any other exception is a crash that libFuzzer reports with
the input that caused it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from octaskly import errors
    from octaskly.protocol import framing, messages

MAX_FRAME = 1 << 16  # small, so that length prefixes near it are within the fuzzer's reach


def one_input(data: bytes) -> None:
    if not data:
        return
    # the first byte: how the stream is cut into reads, and whether the rest is the stream
    # itself or one frame's body (a correct length prefix added: lets the fuzzer work on
    # the JSON without having to keep the prefix right)
    step = (data[0] >> 1) % 17 + 1
    stream = data[1:] if data[0] & 1 else framing.HEADER.pack(len(data) - 1) + data[1:]
    decoder = framing.FrameDecoder(max_frame=MAX_FRAME)
    try:
        for at in range(0, len(stream), step):
            for raw in decoder.feed(stream[at : at + step]):
                try:
                    parsed = messages.parse_worker_message(raw)
                except errors.ProtocolError:
                    continue
                framing.encode(messages.to_wire(parsed))  # what was taken can be sent on
            if decoder.buffered > framing.HEADER.size + MAX_FRAME:
                raise AssertionError(f"decoder holds {decoder.buffered} bytes")
    except errors.ProtocolError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
