"""Scheduling decisions as tables: no sockets, no sleeps, a fixed `now`."""

from __future__ import annotations

import hypothesis
import pytest
from hypothesis import strategies as st

from octaskly.domain import models, scheduling
from octaskly.domain.models import Priority, Requirements, Resources, TaskStatus

POLICY = scheduling.Policy(aging_seconds=60.0)
NOW = 10_000.0
Level = models.SandboxLevel
NONE, BASIC, STRICT, VERY = Level.NONE, Level.BASIC, Level.STRICT, Level.VERY_STRICT
NO_BWRAP = "bubblewrap (bwrap) is not installed"
UNREACHABLE = "the sandbox user (uid 65534) cannot reach the task workdirs"


def cand(
    task_id: str,
    seq: int,
    prio: Priority = Priority.NORMAL,
    waited: float = 0.0,
    level: models.SandboxLevel | None = None,
    **req: object,
) -> scheduling.Candidate:
    return scheduling.Candidate(task_id, seq, prio, NOW - waited, Requirements(**req), level)


def boxes(minimum: models.SandboxLevel = BASIC, **unavailable: str) -> scheduling.Sandboxes:
    """A worker's sandboxes; `strict="why"`, `very_strict="why"` name levels it lacks."""
    return scheduling.Sandboxes(
        minimum, {Level(k.replace("_", "-")): why for k, why in unavailable.items()}
    )


NO_SANDBOX = boxes(strict=NO_BWRAP, very_strict=NO_BWRAP)


def slot(
    worker_id: str,
    max_jobs: int = 1,
    running: int = 0,
    cpu: float = 4,
    mem: int = 8192,
    gpu: bool = False,
    labels: dict[str, str] | None = None,
    **used: float,
) -> scheduling.WorkerSlot:
    return scheduling.WorkerSlot(
        worker_id,
        Resources(cpu_cores=cpu, memory_mb=mem, gpu=gpu, labels=labels or {}),
        max_jobs,
        running,
        **used,
    )  # type: ignore[arg-type]


def by_class(*cands: scheduling.Candidate) -> dict[Priority, list[scheduling.Candidate]]:
    out: dict[Priority, list[scheduling.Candidate]] = {}
    for c in sorted(cands, key=lambda c: c.queue_seq):
        out.setdefault(c.priority, []).append(c)
    return out


@pytest.mark.parametrize(
    ("cands", "free_slots", "expected_order"),
    [
        # critical > high > normal > low
        (
            [
                cand("l", 1, Priority.LOW),
                cand("n", 2),
                cand("h", 3, Priority.HIGH),
                cand("c", 4, Priority.CRITICAL),
            ],
            4,
            ["c", "h", "n", "l"],
        ),
        # FIFO within a priority
        ([cand("a", 1), cand("b", 2), cand("c", 3)], 2, ["a", "b"]),
        # aging: a low task that waited 3 minutes beats a fresh high one (0 + 3 > 2)
        (
            [cand("old-low", 1, Priority.LOW, waited=181), cand("new-high", 2, Priority.HIGH)],
            1,
            ["old-low"],
        ),
        # ...but not one that waited one minute (0 + 1 < 2)
        ([cand("low", 1, Priority.LOW, waited=60), cand("high", 2, Priority.HIGH)], 1, ["high"]),
        # no free slot: nothing assigned
        ([cand("a", 1)], 0, []),
    ],
)
def test_order(
    cands: list[scheduling.Candidate], free_slots: int, expected_order: list[str]
) -> None:
    workers = [slot("w", max_jobs=max(free_slots, 1), running=0 if free_slots else 1)]
    got = scheduling.plan(by_class(*cands), workers, NOW, POLICY)
    assert [a.task_id for a in got] == expected_order


@pytest.mark.parametrize(
    ("req", "workers", "expected_worker"),
    [
        ({}, [slot("a", 2, running=1), slot("b", 2)], "b"),  # least loaded first
        ({}, [slot("a", 4, running=1), slot("b", 2, running=1)], "a"),  # load is a ratio
        ({"gpu": True}, [slot("cpu"), slot("gpu", gpu=True)], "gpu"),
        ({"cpu_cores": 8}, [slot("small", cpu=4), slot("big", cpu=16)], "big"),
        ({"memory_mb": 9000}, [slot("small"), slot("big", mem=16384)], "big"),
        (
            {"labels": {"zone": "eu"}},
            [slot("us", labels={"zone": "us"}), slot("eu", labels={"zone": "eu", "x": "y"})],
            "eu",
        ),
        ({"cpu_cores": 2}, [slot("busy", 4, running=1, cpu_used=3.0), slot("free", 4)], "free"),
        ({"gpu": True}, [slot("cpu")], None),
        ({"cpu_cores": 2}, [slot("full", 4, running=1, cpu_used=3.0)], None),
    ],
)
def test_resource_fit(
    req: dict[str, object], workers: list[scheduling.WorkerSlot], expected_worker: str | None
) -> None:
    got = scheduling.plan(by_class(cand("t", 1, **req)), workers, NOW, POLICY)
    assert [a.worker_id for a in got] == ([expected_worker] if expected_worker else [])


def test_never_exceeds_max_jobs_or_cpu() -> None:
    workers = [slot("a", max_jobs=3, cpu=4), slot("b", max_jobs=1, cpu=4)]
    cands = [cand(f"t{i}", i, cpu_cores=1.5) for i in range(10)]
    got = scheduling.plan(by_class(*cands), workers, NOW, POLICY)
    per = {w.id: sum(1 for a in got if a.worker_id == w.id) for w in workers}
    assert per == {"a": 2, "b": 1}  # a: 3 jobs allowed but only 4 cores -> 2 x 1.5
    assert workers[0].cpu_used == 3.0 and workers[0].running == 2


def test_blocked_head_does_not_block_others() -> None:
    """A task that does not fit now is skipped; smaller ones behind it still run."""
    cands = [cand("huge", 1, cpu_cores=64), cand("small", 2)]
    got = scheduling.plan(by_class(*cands), [slot("w", cpu=4)], NOW, POLICY)
    assert [a.task_id for a in got] == ["small"]


def test_draining_worker_gets_nothing() -> None:
    w = slot("w", 4)
    w.accepting = False
    assert scheduling.plan(by_class(cand("t", 1)), [w], NOW, POLICY) == []


def offers(*caps: Resources) -> list[scheduling.WorkerSlot]:
    return [scheduling.WorkerSlot(f"w{i}", cap, 1) for i, cap in enumerate(caps)]


@pytest.mark.parametrize(
    ("req", "caps", "expected"),
    [
        ({}, [], "no worker is connected"),
        ({}, [Resources(cpu_cores=1, memory_mb=1)], None),
        ({"gpu": True}, [Resources(cpu_cores=1, memory_mb=1)], "needs a GPU"),
        ({"cpu_cores": 32}, [Resources(cpu_cores=4, memory_mb=1)], "largest worker has 4"),
        ({"memory_mb": 999}, [Resources(cpu_cores=4, memory_mb=10)], "largest worker has 10"),
        ({"labels": {"os": "mac"}}, [Resources(cpu_cores=4, memory_mb=10)], "needs label os=mac"),
        # each need is met by some worker, but no single worker meets all of them
        (
            {"gpu": True, "cpu_cores": 8},
            [Resources(cpu_cores=2, memory_mb=1, gpu=True), Resources(cpu_cores=8, memory_mb=1)],
            "no single connected worker",
        ),
    ],
)
def test_unfit_reason(req: dict[str, object], caps: list[Resources], expected: str | None) -> None:
    reason = scheduling.unfit_reason(Requirements(**req), offers(*caps))  # type: ignore[arg-type]
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


# -- sandbox levels: a worker gets only tasks it can sandbox --------------------------------


@pytest.mark.parametrize(
    ("sandboxes", "task_level", "problem"),
    [
        # a task without a level runs at the worker's minimum
        (NO_SANDBOX, None, None),
        (NO_SANDBOX, NONE, None),
        (NO_SANDBOX, BASIC, None),
        (NO_SANDBOX, STRICT, NO_BWRAP),
        (NO_SANDBOX, VERY, NO_BWRAP),
        (boxes(), STRICT, None),
        (boxes(very_strict="no netns"), STRICT, None),
        (boxes(very_strict="no netns"), VERY, "no netns"),
        # a task below the worker's minimum gets the minimum: that is what must work
        (boxes(STRICT), BASIC, None),
        (boxes(STRICT, strict=UNREACHABLE), None, f"strict (its minimum): {UNREACHABLE}"),
        (boxes(STRICT, strict=UNREACHABLE), NONE, f"strict (its minimum): {UNREACHABLE}"),
        (boxes(VERY), STRICT, None),
        # a report of a level below the minimum does not matter (no run gets it)
        (boxes(STRICT, basic="odd"), BASIC, None),
    ],
)
def test_which_task_levels_a_worker_can_run(
    sandboxes: scheduling.Sandboxes, task_level: models.SandboxLevel | None, problem: str | None
) -> None:
    assert sandboxes.problem(task_level) == problem
    assert (scheduling._level_key(task_level) in sandboxes.runnable) == (problem is None)


@pytest.mark.parametrize(
    ("sandboxes", "available"),
    [
        (boxes(), [BASIC, STRICT, VERY]),
        (NO_SANDBOX, [BASIC]),
        (boxes(NONE, very_strict="no netns"), [NONE, BASIC, STRICT]),
        (boxes(VERY), [VERY]),
        (boxes(STRICT, strict=UNREACHABLE, very_strict=UNREACHABLE), []),
    ],
)
def test_the_levels_a_worker_shows(
    sandboxes: scheduling.Sandboxes, available: list[models.SandboxLevel]
) -> None:
    assert sandboxes.available() == available


@pytest.mark.parametrize(
    ("level", "workers", "expected_worker"),
    [
        # the idle worker cannot sandbox: the busier one that can gets the strict task
        (STRICT, [slot("idle", 4, sandboxes=NO_SANDBOX), slot("able", 4, running=2)], "able"),
        (STRICT, [slot("w", 4, sandboxes=NO_SANDBOX)], None),
        (VERY, [slot("a", sandboxes=boxes(very_strict="no netns")), slot("b")], "b"),
        (VERY, [slot("a", sandboxes=boxes(very_strict="no netns"))], None),
        # no level, or one at or below the minimum: any worker (least loaded first)
        (None, [slot("a", 2, running=1), slot("b", 2, sandboxes=NO_SANDBOX)], "b"),
        (BASIC, [slot("a", 2, running=1), slot("b", 2, sandboxes=NO_SANDBOX)], "b"),
        (NONE, [slot("vs", sandboxes=boxes(VERY))], "vs"),
        # a worker whose own minimum fails runs nothing
        (None, [slot("w", sandboxes=boxes(STRICT, strict=UNREACHABLE))], None),
        # every worker can: the fast path, least loaded first
        (STRICT, [slot("a", 2, running=1), slot("b", 2)], "b"),
    ],
)
def test_sandbox_fit(
    level: models.SandboxLevel | None,
    workers: list[scheduling.WorkerSlot],
    expected_worker: str | None,
) -> None:
    got = scheduling.plan(by_class(cand("t", 1, level=level)), workers, NOW, POLICY)
    assert [a.worker_id for a in got] == ([expected_worker] if expected_worker else [])


def test_a_task_no_worker_can_sandbox_does_not_block_the_queue() -> None:
    cands = [cand("strict", 1, level=STRICT), cand("plain", 2), cand("basic", 3, level=BASIC)]
    got = scheduling.plan(by_class(*cands), [slot("w", 4, sandboxes=NO_SANDBOX)], NOW, POLICY)
    assert [a.task_id for a in got] == ["plain", "basic"]


def offer(worker_id: str, sandboxes: scheduling.Sandboxes, **cap: object) -> scheduling.WorkerSlot:
    capacity = Resources(**{"cpu_cores": 4, "memory_mb": 4096, **cap})  # type: ignore[arg-type]
    return scheduling.WorkerSlot(worker_id, capacity, 1, sandboxes=sandboxes)


@pytest.mark.parametrize(
    ("req", "level", "workers", "expected"),
    [
        (
            {},
            STRICT,
            [offer("w2", boxes(strict=UNREACHABLE)), offer("w1", NO_SANDBOX)],
            f"no worker can run sandbox level strict: w1: {NO_BWRAP}; w2: {UNREACHABLE}",
        ),
        (
            {},
            None,
            [offer("w1", boxes(STRICT, strict=UNREACHABLE))],
            f"no worker can run its sandbox level: w1: strict (its minimum): {UNREACHABLE}",
        ),
        # only the workers big enough are named: the small one is no help either way
        (
            {"cpu_cores": 8},
            STRICT,
            [offer("big", NO_SANDBOX, cpu_cores=16), offer("small", boxes())],
            f"no worker can run sandbox level strict: big: {NO_BWRAP}",
        ),
        # nobody is big enough: that is the reason, whatever the levels
        ({"gpu": True}, STRICT, [offer("w1", NO_SANDBOX)], "needs a GPU"),
        # one worker can: no reason
        ({}, STRICT, [offer("w1", NO_SANDBOX), offer("w2", boxes())], None),
        ({}, BASIC, [offer("w1", NO_SANDBOX)], None),
        # many workers: the first five by name, then a count
        (
            {},
            VERY,
            [offer(f"w{i}", NO_SANDBOX) for i in range(7)],
            f"w4: {NO_BWRAP}; and 2 more",
        ),
    ],
)
def test_unfit_reason_names_the_workers_that_cannot_sandbox(
    req: dict[str, object],
    level: models.SandboxLevel | None,
    workers: list[scheduling.WorkerSlot],
    expected: str | None,
) -> None:
    reason = scheduling.unfit_reason(Requirements(**req), workers, level)  # type: ignore[arg-type]
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason, reason


@pytest.mark.parametrize(
    ("failures", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, 300.0), (1000, 300.0)]
)
def test_retry_backoff(failures: int, delay: float) -> None:
    assert scheduling.retry_delay(failures, POLICY) == delay


@pytest.mark.parametrize(
    ("status", "attempts", "lost", "retries", "expected_status", "retry_in"),
    [
        (TaskStatus.COMPLETED, 1, 0, 3, TaskStatus.COMPLETED, None),
        (TaskStatus.FAILED, 1, 0, 0, TaskStatus.FAILED, None),
        (TaskStatus.FAILED, 1, 0, 2, TaskStatus.QUEUED, 1.0),
        (TaskStatus.FAILED, 2, 0, 2, TaskStatus.QUEUED, 2.0),
        (TaskStatus.FAILED, 3, 0, 2, TaskStatus.FAILED, None),
        (TaskStatus.TIMED_OUT, 1, 0, 1, TaskStatus.QUEUED, 1.0),
        # a run lost with its worker does not use up a retry
        (TaskStatus.FAILED, 2, 1, 1, TaskStatus.QUEUED, 1.0),
        (TaskStatus.CANCELLED, 1, 0, 5, TaskStatus.CANCELLED, None),
    ],
)
def test_after_run(
    status: TaskStatus,
    attempts: int,
    lost: int,
    retries: int,
    expected_status: TaskStatus,
    retry_in: float | None,
) -> None:
    out = scheduling.after_run(
        status=status,
        attempts=attempts,
        lost_count=lost,
        retry_count=retries,
        now=NOW,
        policy=POLICY,
    )
    assert out.status == expected_status
    assert out.not_before == (None if retry_in is None else NOW + retry_in)


def test_after_lost_gives_up_eventually() -> None:
    assert scheduling.after_lost(lost_count=1, policy=POLICY).status == TaskStatus.QUEUED
    final = scheduling.after_lost(lost_count=POLICY.max_lost, policy=POLICY)
    assert final.status == TaskStatus.FAILED and final.error and "lost" in final.error


def test_low_priority_never_starves() -> None:
    """A steady stream of fresh high-priority work cannot hold back an old low task forever."""
    low = cand("low", 0, Priority.LOW)
    now = NOW
    for step in range(1, 1000):
        now += 1.0
        fresh = scheduling.Candidate(f"h{step}", step, Priority.HIGH, now, Requirements())
        cands = {Priority.LOW: [low], Priority.HIGH: [fresh]}
        got = scheduling.plan(cands, [slot("w")], now, POLICY)
        if got[0].task_id == "low":
            break
    else:
        pytest.fail("the low-priority task never ran")
    assert step <= 2 * POLICY.aging_seconds + 1


def test_priority_parse() -> None:
    assert models.Priority.parse("HIGH") is Priority.HIGH
    assert models.Priority.parse(3) is Priority.CRITICAL
    for bad in ("urgent", 7, True, None, 1.5):
        with pytest.raises(ValueError):
            models.Priority.parse(bad)


# -- properties: the fast path for plain tasks decides exactly like a full scan ---------------

_req = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"cpu_cores": st.sampled_from([0.5, 1, 2, 8])}),
    st.fixed_dictionaries({"memory_mb": st.sampled_from([256, 4096, 20000])}),
    st.fixed_dictionaries({"gpu": st.just(True)}),
    st.fixed_dictionaries({"labels": st.just({"zone": "a"})}),
)
_levels = st.sampled_from([None, NONE, BASIC, STRICT, VERY])
_cands = st.lists(st.tuples(st.sampled_from(list(Priority)), _req, _levels), max_size=40)
_sandboxes = st.sampled_from(
    [
        boxes(),
        NO_SANDBOX,
        boxes(NONE, very_strict="no netns"),
        boxes(STRICT),
        boxes(STRICT, strict=UNREACHABLE, very_strict=UNREACHABLE),
    ]
)
_slots = st.lists(
    st.tuples(
        st.integers(1, 4),
        st.integers(0, 4),
        st.booleans(),
        st.sampled_from([{}, {"zone": "a"}]),
        st.booleans(),
        _sandboxes,
    ),
    max_size=12,
)


def _reference_plan(
    cands: dict[Priority, list[scheduling.Candidate]],
    slots: list[scheduling.WorkerSlot],
) -> list[scheduling.Assignment]:
    """The plain definition: by effective priority then FIFO, each to the fitting slot
    with the lowest (load, running, id)."""
    order = sorted(
        (c for seq in cands.values() for c in seq),
        key=lambda c: (-scheduling.effective_priority(c.priority, c.enqueued_at, NOW, POLICY),
                       c.queue_seq),
    )  # fmt: skip
    out = []
    for c in order:
        fitting = [
            s
            for s in slots
            if scheduling.fits_now(c.requirements, s)
            and s.sandboxes.problem(c.sandbox_level) is None
        ]
        if fitting:
            s = min(fitting, key=lambda s: (s.running / s.max_jobs, s.running, s.id))
            s.running += 1
            s.cpu_used += c.requirements.cpu_cores
            s.memory_used += c.requirements.memory_mb
            out.append(scheduling.Assignment(c.id, s.id))
    return out


_RawCand = tuple[Priority, dict[str, object], models.SandboxLevel | None]
_RawSlot = tuple[int, int, bool, dict[str, str], bool, scheduling.Sandboxes]


def _build(
    raw_cands: list[_RawCand], raw_slots: list[_RawSlot]
) -> tuple[dict[Priority, list[scheduling.Candidate]], list[scheduling.WorkerSlot]]:
    cands = by_class(
        *(cand(f"t{i}", i, p, level=lv, **r) for i, (p, r, lv) in enumerate(raw_cands))
    )
    slots = [
        scheduling.WorkerSlot(
            f"w{i}",
            Resources(cpu_cores=4, memory_mb=8192, gpu=gpu, labels=labels),
            max_jobs,
            min(running, max_jobs),
            accepting=accepting,
            sandboxes=sandboxes,
        )
        for i, (max_jobs, running, gpu, labels, accepting, sandboxes) in enumerate(raw_slots)
    ]
    return cands, slots


@hypothesis.given(_cands, _slots)
@hypothesis.settings(max_examples=300, deadline=None)
def test_plan_matches_full_scan_and_respects_capacity(
    raw_cands: list[_RawCand], raw_slots: list[_RawSlot]
) -> None:
    cands, slots = _build(raw_cands, raw_slots)
    ref_cands, ref_slots = _build(raw_cands, raw_slots)
    got = scheduling.plan(cands, slots, NOW, POLICY)
    assert got == _reference_plan(ref_cands, ref_slots)
    for s in slots:
        assert s.running <= s.max_jobs
        assert s.cpu_used <= s.capacity.cpu_cores and s.memory_used <= s.capacity.memory_mb
    assert len({a.task_id for a in got}) == len(got)
    # never a task to a worker that cannot give it its sandbox level
    tasks = {c.id: c for seq in cands.values() for c in seq}
    workers = {s.id: s for s in slots}
    for a in got:
        assert workers[a.worker_id].sandboxes.problem(tasks[a.task_id].sandbox_level) is None
