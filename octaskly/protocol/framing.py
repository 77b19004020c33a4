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
HANDSHAKE_MAX_FRAME_BYTES = 8 * 1024 * 1024
"""The largest frame a peer may send before it has proven it holds the cluster key: its
hello (the largest legitimate one, listing 100,000 finished runs, is ~7 MB)."""
HANDSHAKE_BUDGET_BYTES = 64 * 1024 * 1024
"""What all connections still in their handshake may hold together on one listener."""


class ByteBudget:
    """Bytes a group of connections may hold together (those not yet authenticated): each
    reserves what it buffers before buffering it and gives it back when done with it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


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
    """Incremental decoder: `feed(data)` returns the complete messages seen so far.

    With a `budget`, the bytes it buffers are reserved from it first (ProtocolError when
    the budget is spent) and given back as frames complete, on `trust()` and on `release()`.
    """

    def __init__(
        self, *, max_frame: int = MAX_FRAME_BYTES, budget: ByteBudget | None = None
    ) -> None:
        # what arrived, as it arrived: a frame is copied once, when whole (growing one
        # buffer would copy it again and again and leave the old copies to the allocator)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # into the first chunk
        self._size = 0  # bytes in the chunks past the offset
        self._length: int | None = None  # the current frame's, once its header is read
        self._max_frame = max_frame
        self._budget = budget
        self._held = 0  # bytes reserved from the budget

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if self._budget is not None:
            if not self._budget.take(len(data)):
                raise errors.ProtocolError(
                    f"connections in their handshake already hold {self._budget.used} bytes "
                    f"(limit {self._budget.limit})"
                )
            self._held += len(data)
        if data:
            self._chunks.append(bytes(data))
            self._size += len(data)
        messages: list[dict[str, Any]] = []
        try:
            while True:
                if self._length is None:
                    if self._size < HEADER.size:
                        break
                    (length,) = HEADER.unpack(self._take(HEADER.size))
                    if length > self._max_frame:
                        raise errors.ProtocolError(
                            f"frame length {length} exceeds {self._max_frame}"
                        )
                    self._length = length
                if self._size < self._length:
                    break
                body, self._length = self._take(self._length), None
                messages.append(decode_body(body))
        finally:
            if self._budget is not None and self._held > self.buffered:
                self._budget.give(self._held - self.buffered)
                self._held = self.buffered
        return messages

    def _take(self, n: int) -> bytes:
        """The next n buffered bytes (there are at least n)."""
        if n == 0:
            return b""
        first = self._chunks[0]
        if len(first) - self._offset >= n:
            whole = not self._offset and n == len(first)
            out = first if whole else first[self._offset : self._offset + n]
            self._offset += n
            if self._offset == len(first):
                self._chunks.popleft()
                self._offset = 0
            self._size -= n
            return out
        parts, need = [], n
        while need:
            first = self._chunks[0]
            part = first[self._offset : self._offset + need]
            parts.append(part)
            need -= len(part)
            self._offset += len(part)
            if self._offset == len(first):
                self._chunks.popleft()
                self._offset = 0
        self._size -= n
        return b"".join(parts)

    def trust(self, *, max_frame: int = MAX_FRAME_BYTES) -> None:
        """The peer has authenticated: stop counting against the budget, allow `max_frame`."""
        self.release()
        self._budget = None
        self._max_frame = max_frame

    def release(self) -> None:
        """Give back what this decoder holds of the budget (its connection is gone)."""
        if self._budget is not None and self._held:
            self._budget.give(self._held)
        self._held = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return self._size + (HEADER.size if self._length is not None else 0)


class FrameReader:
    """Whole messages from a byte stream: `read(n)` returns up to n bytes, b"" at its end."""

    def __init__(
        self,
        read: Callable[[int], Awaitable[bytes]],
        *,
        chunk: int = 256 * 1024,
        max_frame: int = MAX_FRAME_BYTES,
        budget: ByteBudget | None = None,
    ):
        self._read = read
        self._chunk = chunk
        self._decoder = FrameDecoder(max_frame=max_frame, budget=budget)
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

    def trust(self) -> None:
        """Lift the handshake limits (see FrameDecoder.trust)."""
        self._decoder.trust()

    def release(self) -> None:
        self._decoder.release()
