"""Properties of the P2P frame codec and of the scheduler, checked with Hypothesis.

Frame codec (octaskly.protocol.framing): any message — arbitrary JSON values, any
Unicode — encodes to frames that decode back to the same messages however the byte
stream is cut (one byte at a time, at random places, all at once), through the
incremental decoder and through the stream reader a connection uses.

Scheduler: the real Dispatcher (its queue window, refill from the store, planning,
parking of tasks no worker fits, run bookkeeping, results, retries, lost and released
runs) over the in-memory store, driven with a fake clock through a *sequence* of steps
— tasks arriving, finishing, failing and being retried, cancelled, workers joining,
leaving and draining — by a Hypothesis state machine. After every step:

- no worker runs more tasks than its max_jobs, nor more CPU cores or memory than it has;
- a draining worker gets no new task;
- every task is accounted for: running exactly where the dispatcher thinks (store,
  dispatcher, worker session agree), the queued count matches the store;
- nothing is forgotten in the queue: when a worker that fits everything joins and time
  passes, every queued task gets assigned.

Starvation: the aging rule is `effective priority = priority + waited / aging_seconds`
(domain/scheduling.py, aging_seconds = 60): a task of priority p created at t0 is
passed only by tasks created before it, or by tasks of priority q > p created before
t0 + 60 s * (q - p) (at exactly that instant the tie is decided by floating-point
rounding of `priority + waited / 60`, not by FIFO: immaterial, but not exact). So with a
stream of higher-priority work arriving at r_q tasks per second and a cluster finishing
c tasks per second, a `low` task waits at most about
(backlog + sum_q r_q * 60 * q) / c seconds — even when the stream alone exceeds what the
cluster can run (the queue grows without bound, the low task still runs). The test
checks both: every task that ran before the low one was entitled to by that rule, and the
wait stayed within the bound.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Coroutine
from typing import Any, TypeVar

import hypothesis
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from octaskly import errors, testing
from octaskly.domain import models, scheduling
from octaskly.domain.models import Priority, TaskStatus
from octaskly.protocol import framing, messages
from octaskly.services import dispatcher as dispatching
from octaskly.services import peering

T = TypeVar("T")

# -- the frame codec ---------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)  # NaN is not equal to itself; everything else round-trips
    | st.text()
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=25,
)
wire_messages = st.builds(
    lambda kind, rest: {**rest, "type": kind},
    st.text(max_size=30),
    st.dictionaries(st.text(max_size=12), json_values, max_size=6),
)


def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` in pieces of the given sizes (cycled), the last piece whatever is left."""
    pieces, at, i = [], 0, 0
    while at < len(data):
        size = sizes[i % len(sizes)] if sizes else len(data)
        pieces.append(data[at : at + size])
        at, i = at + size, i + 1
    return pieces


@hypothesis.given(st.lists(wire_messages, max_size=8), st.lists(st.integers(1, 300), max_size=20))
@hypothesis.settings(max_examples=400, deadline=None)
def test_frames_decode_to_what_was_encoded_however_the_stream_is_cut(
    msgs: list[dict[str, Any]], sizes: list[int]
) -> None:
    wire = b"".join(framing.encode(m) for m in msgs)
    decoder = framing.FrameDecoder()
    got: list[dict[str, Any]] = []
    fed = 0
    for piece in _cut(wire, sizes):
        got.extend(decoder.feed(piece))
        fed += len(piece)
        # what is buffered is exactly the part of the stream not yet decoded
        assert decoder.buffered == fed - sum(len(framing.encode(m)) for m in got)
    assert got == msgs
    assert decoder.buffered == 0


def _drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never really waits (its reads are served from memory)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the coroutine waited for something")


@hypothesis.given(
    st.lists(wire_messages, max_size=6), st.lists(st.integers(1, 64), min_size=1, max_size=10)
)
@hypothesis.settings(max_examples=200, deadline=None)
def test_the_stream_reader_returns_each_message_then_a_clean_end(
    msgs: list[dict[str, Any]], sizes: list[int]
) -> None:
    pieces = collections.deque(_cut(b"".join(framing.encode(m) for m in msgs), sizes))

    async def read(n: int) -> bytes:
        return pieces.popleft() if pieces else b""

    reader = framing.FrameReader(read)
    got = []
    while (message := _drive(reader.next())) is not None:
        got.append(message)
    assert got == msgs


@hypothesis.given(wire_messages, st.integers(1, 2**20))
@hypothesis.settings(max_examples=100, deadline=None)
def test_a_stream_cut_mid_frame_is_a_connection_error(message: dict[str, Any], keep: int) -> None:
    frame = framing.encode(message)
    pieces = collections.deque([frame[: min(keep, len(frame) - 1)]])

    async def read(n: int) -> bytes:
        return pieces.popleft() if pieces else b""

    with pytest.raises(ConnectionError):
        _drive(framing.FrameReader(read).next())


# -- the scheduler, as a sequence of steps --------------------------------------------------------

AGING = 60.0
WINDOW = 4  # a small in-memory window: most of the queue lives "on disk" and is refilled
_requirements = st.sampled_from(
    [
        {},
        {},
        {"cpu_cores": 0.5},
        {"cpu_cores": 1},
        {"cpu_cores": 1.5},
        {"cpu_cores": 2},
        {"cpu_cores": 3.5},
        {"memory_mb": 512},
        {"memory_mb": 1500},
        {"memory_mb": 3000},
        {"cpu_cores": 1, "memory_mb": 2000},
        {"gpu": True},
        {"labels": {"zone": "a"}},
        {"cpu_cores": 1, "memory_mb": 1024, "labels": {"zone": "a"}},
        {"cpu_cores": 64},  # fits no worker but the big one
    ]
)
_workers = st.fixed_dictionaries(
    {
        "cpu_cores": st.sampled_from([1, 2, 4]),
        "memory_mb": st.sampled_from([1024, 4096]),
        "gpu": st.booleans(),
        "labels": st.sampled_from([{}, {"zone": "a"}, {"zone": "b"}]),
        "max_jobs": st.integers(1, 6),
    }
)


class _Conn:
    """Stands in for a worker's P2P connection: the dispatcher only sends to it (into the
    session's outbox) and reads its address; the scheduler never touches a socket."""

    kind = "test"
    peer = "127.0.0.1:1"

    def close(self) -> None:
        pass


def _hello(name: str, spec: dict[str, Any]) -> messages.Hello:
    return messages.Hello(
        protocol=messages.PROTOCOL_VERSION,
        name=name,
        instance="a" * 32,
        nonce="b" * 32,
        proof="c" * 64,
        version="test",
        resources=models.Resources(
            cpu_cores=spec["cpu_cores"],
            memory_mb=spec["memory_mb"],
            gpu=spec["gpu"],
            labels=spec["labels"],
        ),
        max_jobs=spec["max_jobs"],
        sandbox_level=models.SandboxLevel.BASIC,
    )


BIG = {
    "cpu_cores": 4096,
    "memory_mb": 10**6,
    "gpu": True,
    "labels": {"zone": "a"},
    "max_jobs": 10000,
}


class Cluster:
    """A real Dispatcher on the in-memory store, a fake clock, hand-made worker sessions."""

    def __init__(self, *, window: int = WINDOW) -> None:
        self.loop = asyncio.new_event_loop()
        self.now = 1_000_000.0
        options = dispatching.Options(
            secret_key=b"property-test-secret-key",
            queue_window=window,
            policy=scheduling.Policy(aging_seconds=AGING),
        )
        self.store = testing.InMemoryStore()
        self.d = dispatching.Dispatcher(options=options, store=self.store, clock=lambda: self.now)
        self.run(self.store.open())
        self.submitted: dict[str, models.TaskSpec] = {}
        self.index: dict[str, int] = {}
        self.names = (f"w{i}" for i in range(10**6))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.store.close())
        self.loop.close()

    def submit(self, priority: Priority, requirements: dict[str, Any], retries: int = 0) -> str:
        spec = models.TaskSpec(
            command="true",
            priority=priority,
            retry_count=retries,
            requirements=models.Requirements(**requirements),
        )
        (task,), _ = self.run(self.d.submit([spec]))
        self.submitted[task.id] = spec
        self.index[task.id] = len(self.index)
        return task.id

    def join(self, spec: dict[str, Any]) -> peering.Session:
        name = next(self.names)
        session = peering.Session(name, _hello(name, spec), _Conn(), self.now, 0.0)  # type: ignore[arg-type]
        self.d.peers.sessions[name] = session
        self.d.on_workers_changed()
        return session

    def schedule(self) -> int:
        return self.run(self.d.schedule_once())

    def finish(self, run: dispatching.Run, status: str) -> None:
        result = messages.Result(
            task_id=run.task_id,
            attempt=run.attempt,
            status=status,  # type: ignore[arg-type]
            exit_code=0 if status == "completed" else 1,
            duration_ms=1,
        )
        assert self.run(self.d.on_result(run.worker_id, result))

    def order(self, run: dispatching.Run) -> int:
        """Runs in the order their tasks were submitted (ids are random: not replayable)."""
        return self.index[run.task_id]

    def sessions(self) -> list[peering.Session]:
        return sorted(self.d.peers.sessions.values(), key=lambda s: int(s.id[1:]))

    def tasks(self) -> dict[str, models.Task]:
        return {t.id: t for t in self.run(self.store.get_tasks(list(self.submitted)))}


class SchedulingSteps(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.c = Cluster()
        self.drained: dict[str, set[str]] = {}
        self.assignments = 0

    def teardown(self) -> None:
        try:
            if self.c.submitted:
                self._everything_queued_runs_eventually()
        finally:
            self.c.close()
        MACHINE["sequences"] += 1
        MACHINE["tasks submitted"] += len(self.c.submitted)
        MACHINE["assignments"] += self.assignments

    # -- steps ----------------------------------------------------------------------------
    @initialize(spec=_workers)
    def first_worker(self, spec: dict[str, Any]) -> None:
        self.c.join(spec)

    @rule(priority=st.sampled_from(list(Priority)), req=_requirements, retries=st.integers(0, 2))
    def submit(self, priority: Priority, req: dict[str, Any], retries: int) -> None:
        self.c.submit(priority, req, retries)

    @rule(reqs=st.lists(_requirements, min_size=1, max_size=8))
    def submit_many(self, reqs: list[dict[str, Any]]) -> None:
        for req in reqs:
            self.c.submit(Priority.NORMAL, req)
        self.schedule()  # the dispatcher schedules whenever something changed

    @rule()
    def schedule(self) -> None:
        self.assignments += self.c.schedule()

    @rule(seconds=st.sampled_from([0.5, 3.0, 61.0, 400.0]))
    def time_passes(self, seconds: float) -> None:
        self.c.now += seconds

    @precondition(lambda self: self.c.d.runs)
    @rule(data=st.data(), status=st.sampled_from(["completed", "completed", "failed", "timed_out"]))
    def a_run_ends(self, data: st.DataObject, status: str) -> None:
        run = data.draw(st.sampled_from(sorted(self.c.d.runs.values(), key=self.c.order)))
        self.c.finish(run, status)
        self.schedule()

    @rule(spec=_workers)
    def worker_joins(self, spec: dict[str, Any]) -> None:
        self.c.join(spec)
        self.schedule()

    @precondition(lambda self: self.c.d.peers.sessions)
    @rule(data=st.data())
    def worker_leaves(self, data: st.DataObject) -> None:
        session = data.draw(st.sampled_from(self.c.sessions()))
        self.c.run(self.c.d.peers._leave(session, "property test: gone"))
        self.drained.pop(session.id, None)

    @precondition(lambda self: self.c.d.peers.sessions)
    @rule(data=st.data())
    def worker_drains(self, data: st.DataObject) -> None:
        session = data.draw(st.sampled_from(self.c.sessions()))
        session.draining = True
        self.drained[session.id] = set(session.runs)

    @precondition(lambda self: any(s.draining and s.runs for s in self.c.d.peers.sessions.values()))
    @rule()
    def drained_worker_hands_back_its_runs(self) -> None:
        for session in self.c.sessions():
            if session.draining and session.runs:
                self.c.run(self.c.d.on_released(list(session.runs.values()), "drain timeout"))
                self.drained[session.id] = set()
                return

    @precondition(lambda self: self.c.submitted)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(list(self.c.submitted)))
        try:
            self.c.run(self.c.d.cancel(task_id))
        except errors.ConflictError:
            pass  # it had finished: a 409 for the user, nothing changes

    # -- what must hold after every step ----------------------------------------------------
    @invariant()
    def no_worker_runs_beyond_its_capacity(self) -> None:
        MACHINE["steps"] += 1
        for s in self.c.d.peers.sessions.values():
            reqs = [r.ref.requirements for r in s.runs.values()]
            cap = s.hello.resources
            # how often the limits were actually reached (else this could not fail)
            MACHINE["workers seen at max_jobs"] += len(reqs) == s.hello.max_jobs
            MACHINE["workers seen with < 1 core free"] += (
                cap.cpu_cores - sum(r.cpu_cores for r in reqs) < 1 and len(reqs) > 0
            )
            MACHINE["workers seen with < 1 GB free"] += (
                cap.memory_mb - sum(r.memory_mb for r in reqs) < 1000 and len(reqs) > 0
            )
            assert len(reqs) <= s.hello.max_jobs, (s.id, len(reqs), s.hello.max_jobs)
            assert sum(r.cpu_cores for r in reqs) <= cap.cpu_cores + 1e-9, s.id
            assert sum(r.memory_mb for r in reqs) <= cap.memory_mb, s.id
            for r in reqs:
                assert scheduling.fits_capacity(r, cap), (s.id, r)

    @invariant()
    def a_draining_worker_gets_nothing_new(self) -> None:
        for worker_id, runs_at_drain in self.drained.items():
            session = self.c.d.peers.sessions.get(worker_id)
            if session is not None:
                assert set(session.runs) <= runs_at_drain, worker_id

    @invariant()
    def every_task_is_accounted_for(self) -> None:
        d = self.c.d
        in_sessions = {tid: run for s in d.peers.sessions.values() for tid, run in s.runs.items()}
        assert in_sessions == d.runs
        for tid, run in d.runs.items():
            assert run.worker_id in d.peers.sessions and tid in d.peers.sessions[run.worker_id].runs
        tasks = self.c.tasks()
        assert set(tasks) == set(self.c.submitted)  # nothing lost
        running = {tid for tid, t in tasks.items() if t.status == TaskStatus.RUNNING}
        assert running == set(d.runs)
        queued = sum(1 for t in tasks.values() if t.status == TaskStatus.QUEUED)
        assert d.queued_count == queued

    def _everything_queued_runs_eventually(self) -> None:
        """Liveness: with a worker that fits every task, time passing (retry backoffs end)
        and scheduling rounds, nothing stays queued."""
        self.c.join(BIG)
        for _ in range(200):
            self.c.now += 301.0  # past the longest retry backoff
            if self.c.schedule() == 0 and self.c.schedule() == 0:
                break
        left = [t for t in self.c.tasks().values() if t.status == TaskStatus.QUEUED]
        assert not left, f"{len(left)} tasks never assigned, e.g. {left[0].id}"


MACHINE: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_machine() -> Any:
    yield
    if MACHINE:
        print(f"\nscheduler state machine: {dict(MACHINE)}")


TestSchedulingSteps = SchedulingSteps.TestCase
TestSchedulingSteps.settings = hypothesis.settings(
    max_examples=60, stateful_step_count=40, deadline=None
)


# -- starvation ---------------------------------------------------------------------------------


@hypothesis.given(
    backlog=st.integers(0, 40),
    rates=st.fixed_dictionaries(
        {
            Priority.NORMAL: st.integers(0, 2),
            Priority.HIGH: st.integers(0, 2),
            Priority.CRITICAL: st.integers(0, 1),
        }
    ),
    slots=st.integers(1, 3),
)
@hypothesis.settings(max_examples=12, deadline=None)
def test_aging_bounds_how_long_a_low_task_waits(
    backlog: int, rates: dict[Priority, int], slots: int
) -> None:
    c = Cluster(window=16)
    try:
        c.join({**BIG, "max_jobs": slots})
        for _ in range(backlog):
            c.submit(Priority.HIGH, {})
        t0 = c.now
        low = c.submit(Priority.LOW, {})
        # a priority-q task outranks the low one only if created before t0 + AGING * q
        bound_tasks = backlog + sum(r * math.ceil(AGING * q) for q, r in rates.items())
        bound_seconds = math.ceil(bound_tasks / slots) + 1
        assigned_before: list[str] = []
        while low not in c.d.runs:
            assert c.now - t0 <= bound_seconds, "the low task waited beyond the aging bound"
            for run in list(c.d.runs.values()):  # each slot finishes one task a second
                c.finish(run, "completed")
            c.now += 1.0
            for priority, rate in rates.items():
                for _ in range(rate):
                    c.submit(priority, {})
            before = set(c.d.runs)
            c.schedule()
            if low not in c.d.runs:  # (in the round it runs, others may come after it)
                assigned_before += [t for t in c.d.runs if t not in before]
        waited = c.now - t0
        tasks = c.tasks()
        for tid in assigned_before:  # each one was entitled to go first by the aging rule
            task = tasks[tid]
            # (at exactly t0 + AGING * q the two are equal and FIFO should favour the low
            # task, but p + waited / aging is computed in floating point: that exact tie
            # may go either way by one ulp, so the boundary is allowed)
            assert task.created_at <= t0 + AGING * int(task.priority), (
                task.priority,
                task.created_at - t0,
            )
        arrivals = sum(rates.values())
        print(
            f"\nbacklog {backlog}, {arrivals} higher tasks/s onto {slots} slots/s: low ran after "
            f"{waited:.0f} s (bound {bound_seconds} s), behind {len(assigned_before)} tasks, "
            f"{c.d.queued_count} still queued"
        )
    finally:
        c.close()
