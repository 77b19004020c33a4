"""The in-memory queue window: ordering, refill from disk, delays, tombstones, parking."""

from __future__ import annotations

from octaskly.domain import queueing, scheduling
from octaskly.domain.models import Priority, Requirements


def ref(seq: int, prio: Priority = Priority.NORMAL) -> scheduling.Candidate:
    return scheduling.Candidate(f"t{seq}", seq, prio, 0.0, Requirements())


def ids(q: queueing.TaskQueue, prio: Priority = Priority.NORMAL, limit: int = 100) -> list[str]:
    return [r.id for r in q.candidates(limit).get(prio, [])]


def drained(q: queueing.TaskQueue) -> queueing.TaskQueue:
    """A queue that has learnt the disk holds nothing more (as after a first refill)."""
    for p in Priority:
        _after, pushes = q.refill_cursor(p)
        q.refill(p, [], limit=10, pushes=pushes, now=0.0)
    return q


def test_new_tasks_kept_in_memory_in_fifo_order() -> None:
    q = drained(queueing.TaskQueue(window=10))
    for seq in (1, 2, 3):
        q.push_new(ref(seq))
    assert ids(q) == ["t1", "t2", "t3"]
    assert not q.needs_refill(Priority.NORMAL)


def test_overflow_goes_to_disk_and_comes_back_in_order() -> None:
    q = drained(queueing.TaskQueue(window=4))
    for seq in range(1, 11):
        q.push_new(ref(seq))
    assert ids(q) == ["t1", "t2", "t3", "t4"]  # only the window is in memory
    for task_id in ("t1", "t2", "t3"):
        q.remove(task_id)
    assert q.needs_refill(Priority.NORMAL)
    after, pushes = q.refill_cursor(Priority.NORMAL)
    assert after == 4
    disk = [ref(s) for s in range(5, 11)]
    q.refill(Priority.NORMAL, disk[:4], limit=4, pushes=pushes, now=0.0)
    assert ids(q) == ["t4", "t5", "t6", "t7", "t8"]
    assert q.refill_cursor(Priority.NORMAL)[0] == 8  # a full read: t9, t10 may still be on disk
    for task_id in ("t4", "t5", "t6", "t7"):
        q.remove(task_id)
    after, pushes = q.refill_cursor(Priority.NORMAL)
    q.refill(
        Priority.NORMAL, [r for r in disk if r.queue_seq > after], limit=4, pushes=pushes, now=0.0
    )
    assert ids(q) == ["t8", "t9", "t10"]
    assert not q.needs_refill(Priority.NORMAL)  # a short read: the disk is empty


def test_push_during_refill_keeps_disk_flag() -> None:
    """A submit committed while a refill read was in flight must not be forgotten."""
    q = queueing.TaskQueue(window=4)
    _, pushes = q.refill_cursor(Priority.NORMAL)
    q.push_new(ref(1))  # lands while the read (which did not see it) is in flight
    q.refill(Priority.NORMAL, [], limit=4, pushes=pushes, now=0.0)
    assert q.needs_refill(Priority.NORMAL)
    _after, pushes = q.refill_cursor(Priority.NORMAL)
    q.refill(Priority.NORMAL, [ref(1)], limit=4, pushes=pushes, now=0.0)
    assert ids(q) == ["t1"]


def test_refill_skips_rows_already_in_memory() -> None:
    q = queueing.TaskQueue(window=4)
    q.requeue(ref(2))
    _after, pushes = q.refill_cursor(Priority.NORMAL)
    q.refill(Priority.NORMAL, [ref(1), ref(2), ref(3)], limit=10, pushes=pushes, now=0.0)
    assert ids(q) == ["t1", "t2", "t3"]


def test_requeue_goes_back_to_its_old_place() -> None:
    q = drained(queueing.TaskQueue(window=10))
    for seq in (1, 2, 3, 4):
        q.push_new(ref(seq))
    q.remove("t2")
    q.requeue(ref(2))
    assert ids(q) == ["t1", "t2", "t3", "t4"]


def test_removed_tasks_are_skipped_and_remove_is_idempotent() -> None:
    q = drained(queueing.TaskQueue(window=10))
    for seq in (1, 2, 3):
        q.push_new(ref(seq))
    assert q.remove("t2") is not None
    assert q.remove("t2") is None
    assert "t2" not in q
    assert ids(q) == ["t1", "t3"]
    assert q.in_memory() == 2


def test_delayed_retry_waits_for_its_time() -> None:
    q = drained(queueing.TaskQueue(window=10))
    q.requeue(ref(1), not_before=100.0)
    q.push_new(ref(2))
    assert q.release_due(50.0) == 100.0
    assert ids(q) == ["t2"]
    assert q.release_due(100.0) is None
    assert ids(q) == ["t1", "t2"]


def test_cancelled_delayed_task_never_comes_back() -> None:
    q = drained(queueing.TaskQueue(window=10))
    q.requeue(ref(1), not_before=100.0)
    q.remove("t1")
    assert q.release_due(200.0) is None
    assert ids(q) == []


def test_refill_delays_rows_waiting_to_retry() -> None:
    q = queueing.TaskQueue(window=10)
    _after, pushes = q.refill_cursor(Priority.NORMAL)
    q.refill(
        Priority.NORMAL,
        [ref(1), ref(2)],
        limit=10,
        pushes=pushes,
        now=10.0,
        not_before={"t1": 20.0},
    )
    assert ids(q) == ["t2"]
    assert q.release_due(25.0) is None
    assert ids(q) == ["t1", "t2"]


def test_park_and_unpark() -> None:
    q = drained(queueing.TaskQueue(window=10))
    q.push_new(ref(1))
    q.push_new(ref(2))
    q.park("t1", "needs a GPU")
    assert ids(q) == ["t2"]
    assert q.parked_reason("t1") == "needs a GPU"
    assert "t1" in q
    assert q.unpark_all() == 1
    assert ids(q) == ["t1", "t2"]
    assert q.parked_reason("t1") is None


def test_candidates_limit_per_priority() -> None:
    q = drained(queueing.TaskQueue(window=100))
    for seq in range(1, 50):
        q.push_new(ref(seq, Priority.HIGH if seq % 2 else Priority.LOW))
    got = q.candidates(5)
    assert [r.queue_seq for r in got[Priority.HIGH]] == [1, 3, 5, 7, 9]
    assert [r.queue_seq for r in got[Priority.LOW]] == [2, 4, 6, 8, 10]


def _refill_from(q: queueing.TaskQueue, disk: list[scheduling.Candidate], limit: int) -> None:
    """One refill of NORMAL from `disk` (the queued rows, in queue_seq order)."""
    after, pushes = q.refill_cursor(Priority.NORMAL)
    rows = [r for r in disk if r.queue_seq > after][:limit]
    q.refill(Priority.NORMAL, rows, limit=limit, pushes=pushes, now=0.0)


def test_own_tasks_behind_rows_already_read_are_not_lost() -> None:
    """Several dispatchers on one database: another one's rows 4-6 committed first and were
    read; this dispatcher's own batch 1-3 then commits while its window is full. The batch
    must be read back (it was lost: the cursor stayed at 6 and nothing rewound it)."""
    q = queueing.TaskQueue(window=4)
    disk = [ref(4), ref(5), ref(6), ref(7), ref(8)]
    _refill_from(q, disk, limit=4)  # reads 4-7; the disk has more
    assert ids(q) == ["t4", "t5", "t6", "t7"]
    own = [ref(1), ref(2), ref(3)]
    disk = sorted(own + disk, key=lambda r: r.queue_seq)
    for r in own:
        q.push_new(r)  # the window is full: to be read back from disk
    for task_id in ("t4", "t5", "t6", "t7"):
        q.remove(task_id)  # assigned
    _refill_from(q, [r for r in disk if r.id not in {"t4", "t5", "t6", "t7"}], limit=4)
    assert ids(q) == ["t1", "t2", "t3", "t8"]


def test_a_rewind_during_a_refill_is_not_overwritten() -> None:
    q = queueing.TaskQueue(window=4)
    _after, pushes = q.refill_cursor(Priority.NORMAL)  # a read starts at 0 …
    q.rewind(Priority.NORMAL, 1)  # … another dispatcher queued seq 2 meanwhile …
    q.refill(Priority.NORMAL, [ref(5), ref(6)], limit=4, pushes=pushes, now=0.0)
    assert q.refill_cursor(Priority.NORMAL)[0] == 1  # … so the next read starts before it
    q.remove("t5")  # the window drains below half: refill time
    assert q.needs_refill(Priority.NORMAL)
    _refill_from(q, [ref(2), ref(6)], limit=4)
    assert ids(q) == ["t2", "t6"]
