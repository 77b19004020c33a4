"""Pure scheduling decisions: which queued task goes to which worker, and what happens
after a run ends. A function of (state snapshot, now) -> decisions; no I/O, no clock.

Order: effective priority first, where waiting `aging_seconds` raises a task by one
priority level so that `low` never starves; FIFO (queue_seq) within equal priority.
A task goes to the least-loaded worker whose free resources fit it.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping, Sequence

from octaskly.domain import models


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    aging_seconds: float = 60.0
    """Waiting this long raises a task's effective priority by one level."""
    retry_base_seconds: float = 1.0
    """Delay before the first retry; doubles with each further failure."""
    retry_cap_seconds: float = 300.0
    """Longest delay between retries."""
    max_lost: int = 5
    """Runs lost with their worker before the task is failed as a likely cause."""


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A queued task as the scheduler sees it."""

    id: str
    queue_seq: int
    priority: models.Priority
    enqueued_at: float
    requirements: models.Requirements


@dataclasses.dataclass(slots=True)
class WorkerSlot:
    """A worker's capacity and what its running tasks already use."""

    id: str
    capacity: models.Resources
    max_jobs: int
    running: int = 0
    cpu_used: float = 0.0
    memory_used: int = 0
    accepting: bool = True

    @property
    def has_room(self) -> bool:
        return self.accepting and self.running < self.max_jobs

    @property
    def load(self) -> float:
        return self.running / self.max_jobs


@dataclasses.dataclass(frozen=True, slots=True)
class Assignment:
    task_id: str
    worker_id: str


def effective_priority(
    priority: models.Priority, enqueued_at: float, now: float, policy: Policy
) -> float:
    waited = max(0.0, now - enqueued_at)
    return int(priority) + waited / policy.aging_seconds


def fits_capacity(req: models.Requirements, capacity: models.Resources) -> bool:
    """Could a worker with this total capacity ever run the task?"""
    if req.cpu_cores > capacity.cpu_cores or req.memory_mb > capacity.memory_mb:
        return False
    if req.gpu and not capacity.gpu:
        return False
    return all(capacity.labels.get(k) == v for k, v in req.labels.items())


def fits_now(req: models.Requirements, slot: WorkerSlot) -> bool:
    """Does the task fit in what the worker has free right now?"""
    if not slot.has_room or not fits_capacity(req, slot.capacity):
        return False
    if req.cpu_cores and slot.cpu_used + req.cpu_cores > slot.capacity.cpu_cores:
        return False
    return not (req.memory_mb and slot.memory_used + req.memory_mb > slot.capacity.memory_mb)


def unfit_reason(req: models.Requirements, capacities: Sequence[models.Resources]) -> str | None:
    """Why no connected worker could ever run the task, or None if one could."""
    if not capacities:
        return "no worker is connected"
    if any(fits_capacity(req, cap) for cap in capacities):
        return None
    reasons = []
    if req.gpu and not any(cap.gpu for cap in capacities):
        reasons.append("needs a GPU; no connected worker has one")
    most_cpu = max(cap.cpu_cores for cap in capacities)
    if req.cpu_cores > most_cpu:
        reasons.append(f"needs {req.cpu_cores:g} CPU cores; the largest worker has {most_cpu:g}")
    most_mem = max(cap.memory_mb for cap in capacities)
    if req.memory_mb > most_mem:
        reasons.append(f"needs {req.memory_mb} MB memory; the largest worker has {most_mem}")
    for key, value in sorted(req.labels.items()):
        if not any(cap.labels.get(key) == value for cap in capacities):
            reasons.append(f"needs label {key}={value}; no connected worker has it")
    if not reasons:
        reasons.append("no single connected worker has all the required resources and labels")
    return "; ".join(reasons)


def is_plain(req: models.Requirements) -> bool:
    """True for a task that asks for nothing: any worker with a free job slot fits it."""
    return not (req.cpu_cores or req.memory_mb or req.gpu or req.labels)


def _slot_key(slot: WorkerSlot) -> tuple[float, int, str]:
    return (slot.running / slot.max_jobs, slot.running, slot.id)


def _best_slot(req: models.Requirements, slots: Sequence[WorkerSlot]) -> WorkerSlot | None:
    best: WorkerSlot | None = None
    best_key: tuple[float, int, str] | None = None
    for slot in slots:
        if fits_now(req, slot):
            key = _slot_key(slot)
            if best_key is None or key < best_key:
                best, best_key = slot, key
    return best


class _LeastLoaded:
    """The slots with room, least-loaded first: O(log n) per pick for plain tasks.

    Entries go stale when a slot takes a task with requirements (picked by a full scan);
    each update pushes a fresh entry, and a popped entry whose `running` no longer matches
    its slot is dropped.
    """

    def __init__(self, slots: Sequence[WorkerSlot]) -> None:
        self._heap = [(*_slot_key(s), i) for i, s in enumerate(slots) if s.has_room]
        heapq.heapify(self._heap)
        self._slots = slots

    def pick(self) -> WorkerSlot | None:
        heap = self._heap
        while heap:
            _, running, _, index = heap[0]
            slot = self._slots[index]
            if slot.running == running and slot.has_room:
                return slot
            heapq.heappop(heap)
        return None

    def updated(self, slot: WorkerSlot, index: int) -> None:
        if slot.has_room:
            heapq.heappush(self._heap, (*_slot_key(slot), index))


def plan(
    candidates: Mapping[models.Priority, Sequence[Candidate]],
    workers: Sequence[WorkerSlot],
    now: float,
    policy: Policy,
) -> list[Assignment]:
    """Assign as many candidates as fit, best effective priority first.

    `candidates` holds, per priority, the first queued tasks in FIFO order. The slots in
    `workers` are updated in place to reflect the assignments made. A task without
    requirements costs O(log workers); one with requirements scans the workers.
    """
    free = sum(max(0, s.max_jobs - s.running) for s in workers if s.accepting)
    heap: list[tuple[float, int, int, models.Priority]] = []
    for priority, seq in candidates.items():
        if seq:
            c = seq[0]
            heap.append(
                (
                    -effective_priority(priority, c.enqueued_at, now, policy),
                    c.queue_seq,
                    0,
                    priority,
                )
            )
    heapq.heapify(heap)
    index_of = {id(s): i for i, s in enumerate(workers)}
    least = _LeastLoaded(workers)
    assignments: list[Assignment] = []
    while heap and free > 0:
        _, _, index, priority = heapq.heappop(heap)
        cand = candidates[priority][index]
        req = cand.requirements
        slot = least.pick() if is_plain(req) else _best_slot(req, workers)
        if slot is not None:
            slot.running += 1
            slot.cpu_used += req.cpu_cores
            slot.memory_used += req.memory_mb
            least.updated(slot, index_of[id(slot)])
            free -= 1
            assignments.append(Assignment(cand.id, slot.id))
        nxt = index + 1
        if nxt < len(candidates[priority]):
            c = candidates[priority][nxt]
            eff = effective_priority(priority, c.enqueued_at, now, policy)
            heapq.heappush(heap, (-eff, c.queue_seq, nxt, priority))
    return assignments


def retry_delay(failures: int, policy: Policy) -> float:
    """Exponential backoff: base, 2*base, 4*base ... capped."""
    exponent = min(max(failures - 1, 0), 32)
    return float(min(policy.retry_cap_seconds, policy.retry_base_seconds * 2**exponent))


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What to do with a task whose run ended."""

    status: models.TaskStatus
    not_before: float | None = None
    error: str | None = None


def after_run(
    *,
    status: models.TaskStatus,
    attempts: int,
    lost_count: int,
    retry_count: int,
    now: float,
    policy: Policy,
    error: str | None = None,
) -> Outcome:
    """A finished run: keep its final status, or queue it again after a backoff.

    Failed and timed-out runs are retried up to `retry_count` times; runs lost with
    their worker do not use up retries (at-least-once), they count toward `max_lost`.
    """
    if status in (models.TaskStatus.FAILED, models.TaskStatus.TIMED_OUT):
        failures = attempts - lost_count
        if failures <= retry_count:
            return Outcome(models.TaskStatus.QUEUED, now + retry_delay(failures, policy), error)
    return Outcome(status, None, error)


def after_lost(*, lost_count: int, policy: Policy) -> Outcome:
    """A run lost with its worker (crash, disconnect, missed heartbeats)."""
    if lost_count >= policy.max_lost:
        return Outcome(
            models.TaskStatus.FAILED,
            None,
            f"the worker running it was lost {lost_count} times; giving up",
        )
    return Outcome(models.TaskStatus.QUEUED, None, None)
