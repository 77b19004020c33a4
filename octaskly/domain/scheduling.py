"""Pure scheduling decisions: which queued task goes to which worker, and what happens
after a run ends. A function of (state snapshot, now) -> decisions; no I/O, no clock.

Order: effective priority first, where waiting `aging_seconds` raises a task by one
priority level so that `low` never starves; FIFO (queue_seq) within equal priority.
A task goes to the least-loaded worker whose free resources fit it and that can give it
its sandbox level: a run gets the stricter of the task's level and the worker's minimum,
and a worker reports the levels it cannot provide (:class:`Sandboxes`).
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
    sandbox_level: models.SandboxLevel | None = None
    """The level the task asked for (None: whatever the worker's minimum is)."""


ALL_LEVELS = frozenset(models.SandboxLevel)
# Every set of runnable levels, once (at most 16): workers that can run the same levels
# share one set, which `common_levels` then intersects once, not once per worker.
_RUNNABLE: dict[frozenset[models.SandboxLevel], frozenset[models.SandboxLevel]] = {
    ALL_LEVELS: ALL_LEVELS
}


def effective_level(
    task_level: models.SandboxLevel | None, minimum: models.SandboxLevel
) -> models.SandboxLevel:
    """The level a run gets: the stricter of the task's (if it asked) and the worker's."""
    if task_level is None or task_level.rank < minimum.rank:
        return minimum
    return task_level


@dataclasses.dataclass(frozen=True, slots=True)
class Sandboxes:
    """Which sandbox levels a worker can give its tasks."""

    minimum: models.SandboxLevel = models.SandboxLevel.NONE
    """The worker's own level: every run there gets at least this."""
    unavailable: Mapping[models.SandboxLevel, str] = dataclasses.field(default_factory=dict)
    """Levels (at or above `minimum`) this worker cannot provide, each with the reason."""
    runnable: frozenset[models.SandboxLevel] = dataclasses.field(init=False)
    """The task levels it can run (a task without a level counts as `none`)."""

    def __post_init__(self) -> None:
        runnable = frozenset(level for level in models.SandboxLevel if self.problem(level) is None)
        object.__setattr__(self, "runnable", _RUNNABLE.setdefault(runnable, runnable))

    def problem(self, task_level: models.SandboxLevel | None) -> str | None:
        """Why this worker cannot run a task of `task_level`; None when it can."""
        level = effective_level(task_level, self.minimum)
        reason = self.unavailable.get(level)
        if reason is None:
            return None
        if task_level is None or level is not task_level:
            return f"{level.value} (its minimum): {reason}"
        return reason

    def available(self) -> list[models.SandboxLevel]:
        """The levels a run here can get, least strict first."""
        return [
            level
            for level in models.SandboxLevel
            if level.rank >= self.minimum.rank and level not in self.unavailable
        ]


def _level_key(level: models.SandboxLevel | None) -> models.SandboxLevel:
    # no level and `none` are the same to every worker: both get its minimum
    return models.SandboxLevel.NONE if level is None else level


@dataclasses.dataclass(slots=True)
class WorkerSlot:
    """A worker's capacity, its sandbox levels, and what its running tasks already use."""

    id: str
    capacity: models.Resources
    max_jobs: int
    running: int = 0
    cpu_used: float = 0.0
    memory_used: int = 0
    accepting: bool = True
    sandboxes: Sandboxes = dataclasses.field(default_factory=Sandboxes)

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


MAX_NAMED_WORKERS = 5
"""Workers named one by one in a sandbox reason (the rest are counted)."""


def unfit_reason(
    req: models.Requirements,
    workers: Sequence[WorkerSlot],
    level: models.SandboxLevel | None = None,
) -> str | None:
    """Why no connected worker could ever run the task, or None if one could.

    A worker could if its capacity fits `req` and it can give the task `level`; when the
    workers that are big enough cannot, the reason names each of them and why.
    """
    if not workers:
        return "no worker is connected"
    sized = [w for w in workers if fits_capacity(req, w.capacity)]
    if any(w.sandboxes.problem(level) is None for w in sized):
        return None
    if sized:
        return _sandbox_reason(level, sized)
    capacities = [w.capacity for w in workers]
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


def _sandbox_reason(level: models.SandboxLevel | None, workers: Sequence[WorkerSlot]) -> str:
    named = sorted(workers, key=lambda w: w.id)
    parts = [f"{w.id}: {w.sandboxes.problem(level)}" for w in named[:MAX_NAMED_WORKERS]]
    if len(named) > MAX_NAMED_WORKERS:
        parts.append(f"and {len(named) - MAX_NAMED_WORKERS} more")
    what = f"sandbox level {level.value}" if level is not None else "its sandbox level"
    return f"no worker can run {what}: " + "; ".join(parts)


def common_levels(workers: Sequence[WorkerSlot]) -> frozenset[models.SandboxLevel]:
    """The task levels every one of `workers` can run."""
    common = last = ALL_LEVELS  # (the usual case: workers that give every level)
    for worker in workers:
        runnable = worker.sandboxes.runnable
        if runnable is not last:  # (identical sets are one object: see _RUNNABLE)
            common, last = common & runnable, runnable
    return common


def runs_anywhere(cand: Candidate, common: frozenset[models.SandboxLevel]) -> bool:
    """True for a task any of the workers `common` was computed from could run, given a
    free job slot: it asks for no resources, and its level is one they all give."""
    return is_plain(cand.requirements) and _level_key(cand.sandbox_level) in common


def is_plain(req: models.Requirements) -> bool:
    """True for a task that asks for nothing: any worker with a free job slot fits it."""
    return not (req.cpu_cores or req.memory_mb or req.gpu or req.labels)


def _slot_key(slot: WorkerSlot) -> tuple[float, int, str]:
    return (slot.running / slot.max_jobs, slot.running, slot.id)


def _best_slot(cand: Candidate, slots: Sequence[WorkerSlot]) -> WorkerSlot | None:
    req, level = cand.requirements, _level_key(cand.sandbox_level)
    best: WorkerSlot | None = None
    best_key: tuple[float, int, str] | None = None
    for slot in slots:
        if level in slot.sandboxes.runnable and fits_now(req, slot):
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
    requirements, at a sandbox level every worker gives, costs O(log workers); any other
    scans the workers.
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
    common = common_levels(workers)
    assignments: list[Assignment] = []
    while heap and free > 0:
        _, _, index, priority = heapq.heappop(heap)
        cand = candidates[priority][index]
        req = cand.requirements
        slot = least.pick() if runs_anywhere(cand, common) else _best_slot(cand, workers)
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
