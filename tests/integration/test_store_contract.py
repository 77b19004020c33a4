"""The store contract: every behaviour the dispatcher relies on, run against each store.

`InMemoryStore` (unit tests of services use it) must behave exactly like `SQLiteStore`
and `PostgresStore` (production uses them); running one suite against all three keeps
them from drifting apart. PostgreSQL is a real server (tests/pg.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from octaskly import errors, testing
from octaskly.domain import models
from octaskly.store import base, postgres, sqlite

QUEUED = models.TaskStatus.QUEUED
RUNNING = models.TaskStatus.RUNNING
COMPLETED = models.TaskStatus.COMPLETED
FAILED = models.TaskStatus.FAILED

StoreFactory = Callable[[], base.Store]


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """A factory of unopened stores of the parametrised kind (all on one database; for
    PostgreSQL a fresh database in the test process's throwaway cluster)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else ""

    def make() -> base.Store:
        if request.param == "memory":
            return testing.InMemoryStore()
        if request.param == "postgresql":
            return postgres.PostgresStore(url)
        return sqlite.SQLiteStore(tmp_path / "octaskly.db")

    return make


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[base.Store]:
    opened = make_store()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def full_task() -> models.Task:
    """A task with every field set to something other than its default."""
    spec = models.TaskSpec(
        command="printf 'héllo\\n' && exit 3",
        timeout=120,
        priority="high",
        retry_count=2,
        memory_limit_mb=256,
        cpu_seconds=60,
        disk_limit_mb=500,
        sandbox_level=models.SandboxLevel.STRICT,
        env={"A": "1", "B": "two words"},
        inputs=["in/a.txt"],
        outputs=["out/b.txt"],
        requirements=models.Requirements(
            cpu_cores=1.5, memory_mb=512, gpu=True, labels={"zone": "a"}
        ),
    )
    return models.Task(
        id=models.new_task_id(),
        spec=spec,
        timeout=120,
        status=models.TaskStatus.FAILED,
        attempts=2,
        worker_id="worker-1",
        exit_code=3,
        stdout="héllo\n",
        stderr="oops\x01",
        stdout_dropped=5,
        stderr_dropped=7,
        duration_ms=1234,
        error="exit code 3",
        created_at=1_700_000_000.25,
        started_at=1_700_000_001.5,
        completed_at=1_700_000_002.75,
        not_before=1_700_000_010.0,
        lost_count=1,
        owner="alice",
        idempotency_key="key-1",
        request_id="req-1",
    )


async def test_insert_get_round_trips_every_field(store: base.Store) -> None:
    task = full_task()
    (seq,) = await store.insert_tasks([task])
    got = await store.get_task(task.id)
    assert got == task.model_copy(update={"queue_seq": seq})
    assert got is not None and got.spec.priority == models.Priority.HIGH


EVERY_BYTE = bytes(range(256))


async def test_output_is_stored_as_the_exact_bytes(store: base.Store) -> None:
    """Every byte value (NUL, invalid UTF-8, a torn character) comes back as written, both
    from an insert and from an update (a result)."""
    inserted = testing.new_task(stdout=EVERY_BYTE, stderr=EVERY_BYTE[::-1], stdout_dropped=3)
    updated = testing.new_task()
    await store.insert_tasks([inserted, updated])
    result = {"stdout": EVERY_BYTE[::-1] * 3, "stderr": b"\xe2\x82", "stderr_dropped": 1}
    assert await store.apply([base.TaskUpdate(updated.id, result)]) == [True]
    got = {t.id: t for t in await store.get_tasks([inserted.id, updated.id])}
    assert (got[inserted.id].stdout, got[inserted.id].stderr) == (EVERY_BYTE, EVERY_BYTE[::-1])
    assert got[inserted.id].stdout_dropped == 3
    one = await store.get_task(updated.id)
    assert one is not None and (one.stdout, one.stderr) == (EVERY_BYTE[::-1] * 3, b"\xe2\x82")
    assert (one.stdout_dropped, one.stderr_dropped) == (0, 1)
    page = await store.list_tasks()
    assert {t.id: t.stdout for t in page.tasks}[inserted.id] == EVERY_BYTE


async def test_queue_seq_is_assigned_in_acknowledgement_order(store: base.Store) -> None:
    first = await store.insert_tasks([testing.new_task(), testing.new_task()])
    second = await store.insert_tasks([testing.new_task(queue_seq=999)])  # input seq ignored
    assert first[0] < first[1] < second[0]
    assert second[0] != 999


async def test_get_unknown_and_get_tasks_subset(store: base.Store) -> None:
    a, b = testing.new_task(), testing.new_task()
    await store.insert_tasks([a, b])
    assert await store.get_task("nope") is None
    got = await store.get_tasks([b.id, "nope", a.id, b.id])
    assert sorted(t.id for t in got) == sorted([a.id, b.id])
    assert await store.get_tasks([]) == []


async def test_insert_nothing(store: base.Store) -> None:
    assert await store.insert_tasks([]) == []
    assert await store.apply([]) == []


async def test_batch_with_existing_key_inserts_nothing(store: base.Store) -> None:
    await store.insert_tasks([testing.new_task(owner="bob", idempotency_key="k")])
    batch = [
        testing.new_task(owner="bob", idempotency_key="other"),
        testing.new_task(owner="bob", idempotency_key="k"),
    ]
    with pytest.raises(base.DuplicateIdempotencyKey) as caught:
        await store.insert_tasks(batch)
    assert (caught.value.owner, caught.value.key) == ("bob", "k")
    assert await store.get_tasks([t.id for t in batch]) == []
    assert await store.find_by_idempotency_key("bob", "other") is None


async def test_batch_with_key_twice_inserts_nothing(store: base.Store) -> None:
    batch = [testing.new_task(idempotency_key="k"), testing.new_task(idempotency_key="k")]
    with pytest.raises(base.DuplicateIdempotencyKey):
        await store.insert_tasks(batch)
    assert (await store.list_tasks()).total == 0


async def test_duplicate_task_id_is_a_conflict(store: base.Store) -> None:
    task = testing.new_task()
    await store.insert_tasks([task])
    fresh = testing.new_task()
    with pytest.raises(errors.ConflictError):
        await store.insert_tasks([fresh, testing.new_task(id=task.id)])
    assert await store.get_task(fresh.id) is None


async def test_idempotency_keys_are_scoped_by_owner(store: base.Store) -> None:
    alice = testing.new_task(owner="alice", idempotency_key="k")
    bob = testing.new_task(owner="bob", idempotency_key="k")
    nobody = testing.new_task(owner=None, idempotency_key="k")
    await store.insert_tasks([alice])
    await store.insert_tasks([bob])
    await store.insert_tasks([nobody])
    found = [await store.find_by_idempotency_key(o, "k") for o in ("alice", "bob", None)]
    assert [t.id if t else None for t in found] == [alice.id, bob.id, nobody.id]
    assert await store.find_by_idempotency_key("carol", "k") is None
    assert await store.find_by_idempotency_key("alice", "other") is None
    # A missing owner is one owner, not a fresh one per task.
    with pytest.raises(base.DuplicateIdempotencyKey) as caught:
        await store.insert_tasks([testing.new_task(owner=None, idempotency_key="k")])
    assert (caught.value.owner, caught.value.key) == (None, "k")


async def test_tasks_without_key_never_collide(store: base.Store) -> None:
    await store.insert_tasks([testing.new_task(), testing.new_task()])
    await store.insert_tasks([testing.new_task()])
    assert (await store.list_tasks()).total == 3


async def test_apply_with_expected_status(store: base.Store) -> None:
    task = testing.new_task()
    await store.insert_tasks([task])
    to_running = base.TaskUpdate(
        task.id, {"status": RUNNING, "attempts": 1, "worker_id": "w"}, expect_status=QUEUED
    )
    assert await store.apply([to_running]) == [True]
    assert await store.apply([to_running]) == [False]  # no longer queued
    got = await store.get_task(task.id)
    assert got is not None
    assert (got.status, got.attempts, got.worker_id) == (RUNNING, 1, "w")


async def test_apply_with_a_set_of_statuses_and_attempts(store: base.Store) -> None:
    task = testing.new_task(status=RUNNING, attempts=2)
    await store.insert_tasks([task])
    either = frozenset({QUEUED, RUNNING})
    stale = base.TaskUpdate(task.id, {"status": COMPLETED}, expect_status=either, expect_attempts=1)
    current = base.TaskUpdate(
        task.id, {"status": COMPLETED, "exit_code": 0}, expect_status=either, expect_attempts=2
    )
    assert await store.apply([stale, current]) == [False, True]
    got = await store.get_task(task.id)
    assert got is not None and (got.status, got.exit_code) == (COMPLETED, 0)


async def test_apply_without_expectations_and_to_unknown_tasks(store: base.Store) -> None:
    task = testing.new_task()
    await store.insert_tasks([task])
    updates = [
        base.TaskUpdate(task.id, {"error": "x", "not_before": 5.0}),
        base.TaskUpdate("nope", {"error": "x"}),
        base.TaskUpdate(task.id, {}, expect_status=QUEUED),  # a pure check
        base.TaskUpdate(task.id, {}, expect_status=RUNNING),
        base.TaskUpdate(task.id, {"error": "y"}, expect_status=frozenset()),
    ]
    assert await store.apply(updates) == [True, False, True, False, False]
    got = await store.get_task(task.id)
    assert got is not None and (got.error, got.not_before) == ("x", 5.0)


async def test_updates_in_one_apply_see_each_other(store: base.Store) -> None:
    task = testing.new_task()
    await store.insert_tasks([task])
    first = base.TaskUpdate(task.id, {"status": RUNNING}, expect_status=QUEUED)
    second = base.TaskUpdate(task.id, {"status": FAILED}, expect_status=RUNNING)
    assert await store.apply([first, second]) == [True, True]
    got = await store.get_task(task.id)
    assert got is not None and got.status == FAILED


async def test_invalid_status_is_rejected_and_changes_nothing(store: base.Store) -> None:
    task = testing.new_task()
    await store.insert_tasks([task])
    with pytest.raises(ValueError):
        await store.apply(
            [
                base.TaskUpdate(task.id, {"error": "set"}),
                base.TaskUpdate(task.id, {"status": "sleeping"}),
            ]
        )
    got = await store.get_task(task.id)
    assert got is not None and (got.status, got.error) == (QUEUED, None)


async def test_apply_soon_keeps_order_with_later_awaited_writes(store: base.Store) -> None:
    task = testing.new_task()
    await store.insert_tasks([task])
    store.apply_soon(
        [base.TaskUpdate(task.id, {"status": RUNNING, "attempts": 1}, expect_status=QUEUED)]
    )
    done = base.TaskUpdate(task.id, {"status": COMPLETED}, expect_status=RUNNING, expect_attempts=1)
    assert await store.apply([done]) == [True]  # the earlier apply_soon went first
    got = await store.get_task(task.id)
    assert got is not None and (got.status, got.attempts) == (COMPLETED, 1)


async def test_updated_queue_seq_keeps_numbering_monotonic(store: base.Store) -> None:
    task = testing.new_task()
    await store.insert_tasks([task])
    assert await store.apply([base.TaskUpdate(task.id, {"queue_seq": 100})]) == [True]
    assert await store.insert_tasks([testing.new_task()]) == [101]


async def listing_fixture(store: base.Store) -> dict[str, models.Task]:
    """Six tasks with mixed statuses, workers and owners; created_at not in insert order."""
    tasks = {
        "a": testing.new_task(created_at=10.0, owner="alice"),
        "b": testing.new_task(created_at=30.0, owner="bob", status=RUNNING, worker_id="w1"),
        "c": testing.new_task(created_at=20.0, owner="alice", status=COMPLETED, worker_id="w1"),
        "d": testing.new_task(created_at=20.0, owner="alice", status=COMPLETED, worker_id="w2"),
        "e": testing.new_task(created_at=50.0, owner=None),
        "f": testing.new_task(created_at=40.0, owner="bob", status=COMPLETED, worker_id="w2"),
    }
    await store.insert_tasks(list(tasks.values()))
    return tasks


async def test_list_newest_first_with_pages_and_total(store: base.Store) -> None:
    tasks = await listing_fixture(store)
    names = {t.id: name for name, t in tasks.items()}
    page = await store.list_tasks(limit=4)
    # Equal created_at (c, d): the later inserted comes first.
    assert [names[t.id] for t in page.tasks] == ["e", "f", "b", "d"]
    assert page.total == 6
    page = await store.list_tasks(limit=4, offset=4)
    assert [names[t.id] for t in page.tasks] == ["c", "a"] and page.total == 6
    page = await store.list_tasks(limit=4, offset=10)
    assert page.tasks == [] and page.total == 6
    page = await store.list_tasks(limit=0)
    assert page.tasks == [] and page.total == 6


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"status": COMPLETED}, ["f", "d", "c"]),
        ({"status": QUEUED}, ["e", "a"]),
        ({"status": FAILED}, []),
        ({"worker_id": "w1"}, ["b", "c"]),
        ({"owner": "alice"}, ["d", "c", "a"]),
        ({"owner": "alice", "status": COMPLETED, "worker_id": "w2"}, ["d"]),
        ({"owner": "nobody"}, []),
    ],
)
async def test_list_filters(
    store: base.Store, filters: dict[str, str], expected: list[str]
) -> None:
    tasks = await listing_fixture(store)
    names = {t.id: name for name, t in tasks.items()}
    page = await store.list_tasks(limit=2, **filters)  # type: ignore[arg-type]
    assert [names[t.id] for t in page.tasks] == expected[:2]
    assert page.total == len(expected)


async def test_list_rejects_negative_paging(store: base.Store) -> None:
    with pytest.raises(ValueError):
        await store.list_tasks(limit=-1)
    with pytest.raises(ValueError):
        await store.list_tasks(offset=-1)


async def test_queued_refs_order_cursor_and_filter(store: base.Store) -> None:
    needs = models.Requirements(cpu_cores=2, gpu=True, labels={"os": "linux"})

    def high(**fields: Any) -> models.Task:
        spec = models.TaskSpec(command="true", priority="high", requirements=needs)
        return testing.new_task(spec=spec, **fields)

    batch = [
        high(),
        testing.new_task(),  # normal priority
        high(status=RUNNING),
        high(not_before=123.5),
        high(),
        high(status=COMPLETED),
        high(),
    ]
    seqs = await store.insert_tasks(batch)
    expected = [
        (t.id, seq)
        for t, seq in zip(batch, seqs, strict=True)
        if t.status == QUEUED and t.priority == models.Priority.HIGH
    ]
    refs = await store.queued_refs(models.Priority.HIGH, 0, 10)
    assert [(r.id, r.queue_seq) for r in refs] == expected
    assert all(r.priority == models.Priority.HIGH and r.requirements == needs for r in refs)
    assert [r.not_before for r in refs] == [None, 123.5, None, None]
    assert refs[0].created_at == batch[0].created_at
    page = await store.queued_refs(models.Priority.HIGH, refs[0].queue_seq, 2)
    assert [r.id for r in page] == [expected[1][0], expected[2][0]]
    assert await store.queued_refs(models.Priority.HIGH, refs[-1].queue_seq, 10) == []
    normal = await store.queued_refs(models.Priority.NORMAL, 0, 10)
    assert [r.id for r in normal] == [batch[1].id]
    assert normal[0].requirements == models.Requirements()
    assert await store.queued_refs(models.Priority.LOW, 0, 10) == []


async def test_queued_refs_follow_status_changes(store: base.Store) -> None:
    task = testing.new_task()
    await store.insert_tasks([task])
    await store.apply([base.TaskUpdate(task.id, {"status": RUNNING})])
    assert await store.queued_refs(models.Priority.NORMAL, 0, 10) == []
    await store.apply([base.TaskUpdate(task.id, {"status": QUEUED})])
    assert [r.id for r in await store.queued_refs(models.Priority.NORMAL, 0, 10)] == [task.id]


async def test_running_tasks(store: base.Store) -> None:
    running = [testing.new_task(status=RUNNING, worker_id="w") for _ in range(2)]
    await store.insert_tasks([testing.new_task(), running[0], running[1]])
    await store.insert_tasks([testing.new_task(status=COMPLETED)])
    got = await store.running_tasks()
    assert [t.id for t in got] == [t.id for t in running]


async def test_count_by_status_has_every_status(store: base.Store) -> None:
    assert await store.count_by_status() == dict.fromkeys(models.TaskStatus, 0)
    await listing_fixture(store)
    counts = await store.count_by_status()
    assert counts == {**dict.fromkeys(models.TaskStatus, 0), QUEUED: 2, RUNNING: 1, COMPLETED: 3}


async def test_returned_tasks_are_copies(store: base.Store) -> None:
    task = testing.new_task()
    await store.insert_tasks([task])
    task.status = COMPLETED  # the caller's object is not the stored one
    got = await store.get_task(task.id)
    assert got is not None and got.status == QUEUED
    got.status = FAILED
    again = await store.get_task(task.id)
    assert again is not None and again.status == QUEUED


async def test_check_and_size_while_open(store: base.Store) -> None:
    await store.check()
    assert await store.size_bytes() >= 0


async def test_lifecycle_errors(make_store: StoreFactory) -> None:
    store = make_store()
    with pytest.raises(errors.StorageError, match="not open"):
        await store.get_task("x")
    with pytest.raises(errors.StorageError, match="not open"):
        await store.insert_tasks([testing.new_task()])
    await store.open()
    with pytest.raises(errors.StorageError, match="opened already"):
        await store.open()
    await store.insert_tasks([testing.new_task()])
    await store.close()
    await store.close()  # a second close is harmless
    closed_calls: list[Callable[[], Awaitable[object]]] = [
        store.check,
        lambda: store.get_task("x"),
        store.list_tasks,
        store.count_by_status,
        store.size_bytes,
        lambda: store.insert_tasks([testing.new_task()]),
        lambda: store.apply([base.TaskUpdate("x", {"error": "e"})]),
    ]
    for call in closed_calls:
        with pytest.raises(errors.StorageError, match="closed"):
            await call()
    with pytest.raises(errors.StorageError, match="closed"):
        store.apply_soon([base.TaskUpdate("x", {"error": "e"})])


# -- tokens -----------------------------------------------------------------------------------


async def test_tokens_are_recorded_revoked_once_and_expire_from_the_revocation_list(
    store: base.Store,
) -> None:
    issued = base.TokenRecord(
        jti="j1", subject="alice", role="client", issued_at=100.0, expires_at=1000.0
    )
    await store.record_token(issued)
    assert await store.get_token("j1") == issued
    with pytest.raises(errors.OctasklyError):
        await store.record_token(issued)  # a jti is recorded once
    assert await store.revoked_tokens(now=200.0) == set()
    assert await store.revoke_token("j1", revoked_at=300.0, expires_at=1000.0) is True
    assert await store.revoke_token("j1", revoked_at=301.0, expires_at=1000.0) is False
    # a token signed elsewhere (CLI with the key) can be revoked without being recorded
    assert await store.revoke_token("elsewhere", revoked_at=300.0, expires_at=500.0) is True
    assert await store.revoked_tokens(now=400.0) == {"j1", "elsewhere"}
    assert await store.revoked_tokens(now=600.0) == {"j1"}
    record = await store.get_token("j1")
    assert record is not None and record.revoked_at == 300.0 and record.subject == "alice"
    assert await store.get_token("unknown") is None


# -- retention --------------------------------------------------------------------------------
async def test_prune_deletes_only_finished_tasks_that_completed_before_the_cutoff(
    store: base.Store,
) -> None:
    """Old finished tasks of every terminal status go; queued and running ones never do (even
    with an old completed_at, e.g. a retry), nor those that finished at or after the cutoff."""
    cutoff = 1_000.0
    old = [
        testing.new_task(status=status, completed_at=cutoff - 1 - i)
        for i, status in enumerate(models.TERMINAL_STATUSES)
    ]
    kept = [
        testing.new_task(status=COMPLETED, completed_at=cutoff),  # not before: kept
        testing.new_task(status=FAILED, completed_at=cutoff + 5),
        testing.new_task(status=QUEUED, completed_at=1.0),  # a retry after a failed run
        testing.new_task(status=RUNNING, completed_at=1.0),
        testing.new_task(status=QUEUED),
        testing.new_task(status=COMPLETED, completed_at=None),  # never from the dispatcher
    ]
    await store.insert_tasks([*old, *kept])
    assert await store.prune_tasks(cutoff) == len(old)
    assert await store.get_tasks([t.id for t in old]) == []
    assert sorted(t.id for t in await store.get_tasks([t.id for t in kept])) == sorted(
        t.id for t in kept
    )
    assert (await store.list_tasks()).total == len(kept)
    assert await store.prune_tasks(cutoff) == 0  # nothing left to delete
    print(f"pruned {len(old)} old finished / kept {len(kept)} (queued, running, recent)")


async def test_prune_goes_in_bounded_batches_oldest_first(store: base.Store) -> None:
    tasks = [testing.new_task(status=COMPLETED, completed_at=100.0 + i) for i in range(25)]
    await store.insert_tasks(tasks)
    commits = store.commit_count  # type: ignore[attr-defined]
    assert await store.prune_tasks(110.0, batch=4) == 10
    batches = store.commit_count - commits  # type: ignore[attr-defined]
    assert batches == 3  # 4 + 4 + 2: no transaction deletes more than `batch`
    left = {t.id for t in await store.get_tasks([t.id for t in tasks])}
    assert left == {t.id for t in tasks[10:]}  # the oldest went
    with pytest.raises(ValueError):
        await store.prune_tasks(110.0, batch=0)
    print(f"pruned 10 in {batches} transactions of at most 4; kept 15")


async def test_a_pruned_tasks_idempotency_key_is_forgotten(store: base.Store) -> None:
    done = testing.new_task(status=COMPLETED, completed_at=5.0, owner="bob", idempotency_key="k")
    await store.insert_tasks([done])
    assert await store.prune_tasks(10.0) == 1
    assert await store.find_by_idempotency_key("bob", "k") is None
    again = testing.new_task(owner="bob", idempotency_key="k")
    await store.insert_tasks([again])  # the key may be used again
    found = await store.find_by_idempotency_key("bob", "k")
    assert found is not None and found.id == again.id


async def test_lookups_with_a_nul_character_find_nothing(store: base.Store) -> None:
    """A NUL in a filter or id (hostile query strings) matches nothing, on every store —
    PostgreSQL's text cannot hold NUL, and the query must not fail ("database
    unavailable") because of it."""
    await store.insert_tasks([testing.new_task(worker_id="w", owner="o", idempotency_key="k")])
    assert await store.get_task("a\x00b") is None
    assert await store.get_tasks(["a\x00b"]) == []
    assert await store.find_by_idempotency_key("o\x00", "k") is None
    assert await store.find_by_idempotency_key("o", "k\x00") is None
    assert (await store.list_tasks(worker_id="w\x00")).total == 0
    assert (await store.list_tasks(owner="\x00")).tasks == []
    assert await store.get_token("j\x00") is None
    assert (await store.list_tasks(worker_id="w")).total == 1
