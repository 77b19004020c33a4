"""Socket-free frame codec for the P2P protocol.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON holding
one object with a string `type`. The decoder is fed bytes as they arrive and yields whole
messages; anything malformed raises ProtocolError and the connection is dropped.
"""

from __future__ import annotations

import collections
import json
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from octaskly import errors

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 32 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    """One frame for `message` (which must carry a `type`)."""
    try:
        body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: not Unicode text, cannot go on the wire
        raise errors.ProtocolError("message holds a lone surrogate (not Unicode)") from None
    if len(body) > MAX_FRAME_BYTES:
        raise errors.ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode("utf-8"))  # (json.loads would also take UTF-16/32)
    except RecursionError:  # "[[[[...": json gives up at the interpreter's recursion limit
        raise errors.ProtocolError("frame is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise errors.ProtocolError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise errors.ProtocolError("frame is not an object with a string 'type'")
    if has_lone_surrogate(message):
        raise errors.ProtocolError("frame holds a lone surrogate escape (\\ud800-\\udfff)")
    return message


def has_lone_surrogate(value: Any) -> bool:
    """Whether parsed JSON holds a string with a lone UTF-16 surrogate (an escape like
    "\\ud800" that is not half of a pair): not Unicode text, and it cannot be written as
    UTF-8 later (to SQLite, to the wire), where it would fail far from its source."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class FrameDecoder:
    """Incremental decoder: `feed(data)` returns the complete messages seen so far."""

    def __init__(self, *, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages: list[dict[str, Any]] = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self._max_frame:
                raise errors.ProtocolError(f"frame length {length} exceeds {self._max_frame}")
            if len(self._buffer) < HEADER.size + length:
                break
            body = bytes(self._buffer[HEADER.size : HEADER.size + length])
            del self._buffer[: HEADER.size + length]
            messages.append(decode_body(body))
        return messages

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buffer)


class FrameReader:
    """Whole messages from a byte stream: `read(n)` returns up to n bytes, b"" at its end."""

    def __init__(self, read: Callable[[int], Awaitable[bytes]], *, chunk: int = 256 * 1024):
        self._read = read
        self._chunk = chunk
        self._decoder = FrameDecoder()
        self._pending: collections.deque[dict[str, Any]] = collections.deque()

    async def next(self) -> dict[str, Any] | None:
        """The next message; None at a clean end; ConnectionError mid-frame; ProtocolError
        for a malformed frame."""
        while not self._pending:
            data = await self._read(self._chunk)
            if not data:
                if self._decoder.buffered:
                    raise ConnectionError("connection closed in the middle of a frame")
                return None
            self._pending.extend(self._decoder.feed(data))
        return self._pending.popleft()
