"""The kept tail of a task's output stream: a bounded buffer, pure and socket-free."""

from __future__ import annotations


class TailBuffer:
    """The last ``limit`` bytes of a stream, with an exact count of the bytes dropped."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.limit = limit
        self.dropped = 0
        self._data = bytearray()

    def feed(self, chunk: bytes) -> None:
        """Append a chunk, dropping bytes from the head beyond the limit."""
        if len(chunk) >= self.limit:
            self.dropped += len(self._data) + len(chunk) - self.limit
            self._data = bytearray(chunk[len(chunk) - self.limit :])
            return
        self._data += chunk
        excess = len(self._data) - self.limit
        if excess > 0:
            del self._data[:excess]  # cheap: bytearray trims its head in place
            self.dropped += excess

    def getvalue(self) -> bytes:
        """The kept bytes."""
        return bytes(self._data)
