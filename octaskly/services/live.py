"""Live task output and state-change notifications for followers (logs --follow, --wait).

Output of running tasks is held in memory only, as the bytes the task wrote, bounded per
task; the final tail is stored with the result. Followers never poll: they await an event
that is replaced on every change.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Literal

OutputSource = Literal["live", "store", "unavailable"]
"""Where the output shown of a task comes from: the running attempt's output so far as this
dispatcher receives it, the store, or the store because another dispatcher receives it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    stream: str
    data: bytes


class LiveOutput:
    """The recent output of one running attempt, with change notification.

    At most `limit` bytes of both streams together are held (always the newest chunk):
    older chunks are dropped whole, and counted per stream.
    """

    def __init__(self, attempt: int, *, limit: int) -> None:
        self.attempt = attempt
        self._limit = limit
        self._chunks: collections.deque[Chunk] = collections.deque()
        self._bytes = 0
        self._next = 0
        self._dropped = {"stdout": 0, "stderr": 0}
        self._changed = asyncio.Event()
        self.closed = False

    def append(self, stream: str, data: bytes) -> None:
        if self.closed or not data:
            return
        self._chunks.append(Chunk(self._next, stream, data))
        self._next += 1
        self._bytes += len(data)
        while self._bytes > self._limit and len(self._chunks) > 1:
            old = self._chunks.popleft()
            self._bytes -= len(old.data)
            self._dropped[old.stream] = self._dropped.get(old.stream, 0) + len(old.data)
        self._signal()

    def so_far(self, stream: str) -> tuple[bytes, int]:
        """The output of one stream held now, and how many of its bytes came before it
        (received, then dropped to keep within the limit)."""
        data = b"".join(c.data for c in self._chunks if c.stream == stream)
        return data, self._dropped.get(stream, 0)

    def close(self) -> None:
        self.closed = True
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def since(self, seq: int) -> tuple[list[Chunk], bool]:
        """Chunks from `seq` on, and whether some between were already dropped."""
        chunks = [c for c in self._chunks if c.seq >= seq]
        skipped = bool(self._chunks) and self._chunks[0].seq > seq
        return chunks, skipped

    async def changed(self) -> None:
        await self._changed.wait()


class Feed:
    """Which tasks changed, for live views (`GET /api/v1/events`): each subscriber gets a
    set of changed task ids that it drains; a subscriber that falls far behind is told
    to reload instead of growing without bound."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._subscribers: list[tuple[set[str], asyncio.Event]] = []

    def subscribe(self) -> tuple[set[str], asyncio.Event]:
        entry: tuple[set[str], asyncio.Event] = (set(), asyncio.Event())
        self._subscribers.append(entry)
        return entry

    def unsubscribe(self, entry: tuple[set[str], asyncio.Event]) -> None:
        if entry in self._subscribers:
            self._subscribers.remove(entry)

    def publish(self, task_id: str) -> None:
        for changed, wake in self._subscribers:
            if len(changed) < self.LIMIT:
                changed.add(task_id)
            wake.set()


class Watchers:
    """Per-task events set whenever a task changes state; created only when awaited."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self.feed = Feed()

    def event(self, task_id: str) -> asyncio.Event:
        event = self._events.get(task_id)
        if event is None:
            event = self._events[task_id] = asyncio.Event()
        return event

    def notify(self, task_id: str) -> None:
        event = self._events.pop(task_id, None)
        if event is not None:
            event.set()
        self.feed.publish(task_id)

    def notify_all(self) -> None:
        events, self._events = self._events, {}
        for event in events.values():
            event.set()
