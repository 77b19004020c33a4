"""A task's output: the exact bytes of each stream, and how they read as text.

Output is kept as bytes everywhere (worker, wire, store, API); text is only a view of it,
made where a person or a JSON client reads it. The view decodes UTF-8 and shows U+FFFD
where the bytes are not UTF-8; it says whether it is exact, so that a client knows when to
read the bytes instead (base64 in JSON, or the raw logs endpoint).
"""

from __future__ import annotations

import codecs
import dataclasses

UTF8 = "utf-8"
"""The text is exactly the bytes, decoded."""
BINARY = "binary"
"""The bytes are not UTF-8: the text shows U+FFFD in place of what does not decode."""


@dataclasses.dataclass(frozen=True, slots=True)
class Text:
    """The text view of a kept tail."""

    text: str
    encoding: str
    """:data:`UTF8` or :data:`BINARY`."""
    torn: int
    """Bytes at the head left out of the text: the rest of a character whose start was
    dropped with the head of the stream (0 to 3, and only when something was dropped)."""
    unfinished: int = 0
    """Bytes at the end left out of the text: the start of a character the stream has not
    finished writing yet (0 to 3, and only for the output so far of a running task)."""


def as_text(data: bytes, *, dropped: int = 0, final: bool = True) -> Text:
    """The text view of `data`, the tail of a stream of which `dropped` bytes were cut;
    `final`: the stream has ended (else `data` is its output so far).

    When the cut fell inside a multi-byte UTF-8 character, its remaining continuation
    bytes are left out of the text (and counted in `torn`) rather than shown as U+FFFD:
    they are not invalid, only incomplete by our doing. So is the start of a character at
    the end of a stream that goes on (`unfinished`); at the end of one that ended, it is
    invalid.
    """
    start = 0
    if dropped:
        while start < min(3, len(data)) and data[start] & 0xC0 == 0x80:
            start += 1
    kept = data[start:]
    end = len(kept)
    if not final:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(kept[-3:], final=False)
        end -= len(decoder.getstate()[0])
    try:
        return Text(kept[:end].decode("utf-8"), UTF8, start, len(kept) - end)
    except UnicodeDecodeError:
        return Text(kept[:end].decode("utf-8", errors="replace"), BINARY, start, len(kept) - end)
