"""The dispatcher's in-memory view of the queue: a bounded window over the queue on disk.

Per priority, memory holds a FIFO prefix of the queued tasks (ordered by queue_seq);
the rest stay on disk and are loaded as the window drains, so a million queued tasks do
not cost a million objects. Tasks waiting out a retry backoff sit in a heap by due time.
Removal (assignment, cancel) is O(1): ids are tombstoned and skipped when reached.
"""

from __future__ import annotations

import bisect
import collections
import heapq
from collections.abc import Iterable

from octaskly.domain import models, scheduling

Ref = scheduling.Candidate


class TaskQueue:
    def __init__(self, *, window: int = 4096) -> None:
        self.window = window
        self._fifo: dict[models.Priority, collections.deque[Ref]] = {
            p: collections.deque() for p in models.Priority
        }
        self._cursor: dict[models.Priority, int] = dict.fromkeys(models.Priority, 0)
        self._on_disk: dict[models.Priority, bool] = dict.fromkeys(models.Priority, True)
        self._pushes: dict[models.Priority, int] = dict.fromkeys(models.Priority, 0)
        self._delayed: list[tuple[float, int, Ref]] = []
        self._live: dict[str, Ref] = {}
        self._parked: dict[str, tuple[Ref, str]] = {}
        self._rewound: dict[models.Priority, int] = {}

    # -- adding ---------------------------------------------------------------
    def push_new(self, ref: Ref) -> None:
        """A task just committed as queued (its queue_seq is newer than any this dispatcher
        made before; with several dispatchers on one database, not necessarily newer than
        rows already read: the others' commits interleave)."""
        p = ref.priority
        self._pushes[p] += 1
        if self._on_disk[p] or len(self._fifo[p]) >= self.window:
            self._on_disk[p] = True  # it will be read back from disk in order
            # (from before it: the cursor may be past it already, after another
            # dispatcher's later rows that committed first)
            self._cursor[p] = min(self._cursor[p], ref.queue_seq - 1)
            return
        self._insert(ref)
        self._cursor[p] = max(self._cursor[p], ref.queue_seq)

    def requeue(self, ref: Ref, *, not_before: float | None = None) -> None:
        """A task that was running goes back to the queue at its old position."""
        if not_before is not None:
            heapq.heappush(self._delayed, (not_before, ref.queue_seq, ref))
            self._live[ref.id] = ref
            return
        self._insert(ref)

    def _insert(self, ref: Ref) -> None:
        fifo = self._fifo[ref.priority]
        self._live[ref.id] = ref
        if not fifo or fifo[-1].queue_seq < ref.queue_seq:
            fifo.append(ref)
            return
        keys = [r.queue_seq for r in fifo]
        fifo.insert(bisect.bisect(keys, ref.queue_seq), ref)

    # -- refilling from disk ----------------------------------------------------
    def needs_refill(self, priority: models.Priority) -> bool:
        return self._on_disk[priority] and len(self._fifo[priority]) < self.window // 2

    def rewind(self, priority: models.Priority, after_queue_seq: int) -> None:
        """Tasks from `after_queue_seq` on may have become queued behind the window's back
        (another dispatcher queued them): read from there again at the next refill (also
        when a refill is reading right now: it must not move the cursor past this)."""
        after = max(0, after_queue_seq)
        self._cursor[priority] = min(self._cursor[priority], after)
        self._rewound[priority] = min(self._rewound.get(priority, after), after)
        self._on_disk[priority] = True
        self._pushes[priority] += 1

    def refill_cursor(self, priority: models.Priority) -> tuple[int, int]:
        """(after_queue_seq, pushes) to pass back to `refill` with the rows read."""
        return self._cursor[priority], self._pushes[priority]

    def refill(
        self,
        priority: models.Priority,
        refs: Iterable[Ref],
        *,
        limit: int,
        pushes: int,
        now: float,
        not_before: dict[str, float] | None = None,
    ) -> None:
        """Add rows read from disk after the cursor; learn whether the disk has more."""
        count = 0
        for ref in refs:
            count += 1
            self._cursor[priority] = max(self._cursor[priority], ref.queue_seq)
            if ref.id in self:
                continue
            due = (not_before or {}).get(ref.id)
            if due is not None and due > now:
                self.requeue(ref, not_before=due)
            else:
                self._insert(ref)
        if count < limit and self._pushes[priority] == pushes:
            self._on_disk[priority] = False
        rewound = self._rewound.pop(priority, None)
        if rewound is not None:  # a rewind came while the rows were read: honour it
            self._cursor[priority] = min(self._cursor[priority], rewound)

    # -- taking ---------------------------------------------------------------
    def release_due(self, now: float) -> float | None:
        """Move tasks whose backoff has passed into the queue; return the next due time."""
        while self._delayed and self._delayed[0][0] <= now:
            _, _, ref = heapq.heappop(self._delayed)
            if self._live.get(ref.id) is ref:
                del self._live[ref.id]
                self._insert(ref)
        while self._delayed and self._live.get(self._delayed[0][2].id) is not self._delayed[0][2]:
            heapq.heappop(self._delayed)
        return self._delayed[0][0] if self._delayed else None

    def candidates(self, limit: int) -> dict[models.Priority, list[Ref]]:
        """The first `limit` live tasks of each priority, in FIFO order."""
        out: dict[models.Priority, list[Ref]] = {}
        for p, fifo in self._fifo.items():
            while fifo and self._live.get(fifo[0].id) is not fifo[0]:
                fifo.popleft()
            picked: list[Ref] = []
            for ref in fifo:
                if self._live.get(ref.id) is ref:
                    picked.append(ref)
                    if len(picked) >= limit:
                        break
            if picked:
                out[p] = picked
        return out

    def park(self, task_id: str, reason: str) -> None:
        """Set aside a task no connected worker could ever run, so it blocks nobody."""
        ref = self.remove(task_id)
        if ref is not None:
            self._parked[task_id] = (ref, reason)

    def unpark_all(self) -> int:
        """Give every parked task another chance (a worker joined)."""
        parked, self._parked = self._parked, {}
        for ref, _ in parked.values():
            self._insert(ref)
        return len(parked)

    def parked_reason(self, task_id: str) -> str | None:
        entry = self._parked.get(task_id)
        return entry[1] if entry else None

    def remove(self, task_id: str) -> Ref | None:
        """Take a task out (assigned or cancelled); O(1), the slot is skipped later."""
        parked = self._parked.pop(task_id, None)
        if parked is not None:
            return parked[0]
        ref = self._live.pop(task_id, None)
        if ref is not None:
            fifo = self._fifo[ref.priority]
            if fifo and fifo[0] is ref:
                fifo.popleft()
        return ref

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._live or task_id in self._parked

    def in_memory(self) -> int:
        return len(self._live)
