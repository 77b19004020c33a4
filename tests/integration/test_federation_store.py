"""The PostgreSQL store's federation primitives, with two stores (two dispatchers) on one
real database: claims, run ownership, leases, notifications — and hostile notifications."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from octaskly import errors, testing
from octaskly.domain import models
from octaskly.store import base, postgres

QUEUED = models.TaskStatus.QUEUED
RUNNING = models.TaskStatus.RUNNING


@pytest.fixture
async def pair(pg_url: str) -> AsyncIterator[tuple[postgres.PostgresStore, postgres.PostgresStore]]:
    a = postgres.PostgresStore(pg_url, owner="a")
    b = postgres.PostgresStore(pg_url, owner="b")
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def _claim(task: models.Task, worker: str) -> base.TaskUpdate:
    return base.TaskUpdate(
        task.id,
        {"status": RUNNING, "attempts": 1, "worker_id": worker},
        expect_status=QUEUED,
        expect_attempts=0,
    )


async def test_concurrent_claims_give_each_task_to_exactly_one_dispatcher(
    pair: tuple[postgres.PostgresStore, postgres.PostgresStore],
) -> None:
    a, b = pair
    tasks = [testing.new_task() for _ in range(200)]
    await a.insert_tasks(tasks)

    async def go(store: postgres.PostgresStore, worker: str, order: list[models.Task]) -> set[str]:
        won = set()
        for task in order:  # one claim at a time: the two writers race task by task
            if (await store.claim([_claim(task, worker)]))[0]:
                won.add(task.id)
        return won

    won_a, won_b = await asyncio.gather(go(a, "wa", tasks), go(b, "wb", tasks[::-1]))
    assert won_a.isdisjoint(won_b)
    assert won_a | won_b == {t.id for t in tasks}
    owner = {t.id: t.worker_id for t in await a.get_tasks([t.id for t in tasks])}
    assert all(owner[i] == "wa" for i in won_a) and all(owner[i] == "wb" for i in won_b)
    assert {t.id for t in await a.owned_running_tasks()} == won_a
    assert {t.id for t in await b.owned_running_tasks()} == won_b
    print(f"200 tasks claimed by two dispatchers racing: {len(won_a)} + {len(won_b)}, none twice")


async def test_a_claim_skips_rows_another_transaction_holds_instead_of_waiting(
    pg_url: str, pair: tuple[postgres.PostgresStore, postgres.PostgresStore]
) -> None:
    a, _ = pair
    tasks = [testing.new_task() for _ in range(4)]
    await a.insert_tasks(tasks)
    conn = await asyncpg.connect(pg_url)
    try:
        async with conn.transaction():  # another dispatcher in the middle of claiming 2
            await conn.execute(
                "SELECT 1 FROM tasks WHERE id = ANY($1::text[]) FOR UPDATE",
                [tasks[0].id, tasks[1].id],
            )
            started = time.monotonic()
            got = await asyncio.wait_for(a.claim([_claim(t, "w") for t in tasks]), 5)
            waited = time.monotonic() - started
    finally:
        await conn.close()
    assert got == [False, False, True, True]
    print(f"claim with 2 of 4 rows locked elsewhere: {got} in {waited * 1000:.0f} ms (no wait)")


async def test_an_owned_update_fails_once_another_dispatcher_took_the_run(
    pair: tuple[postgres.PostgresStore, postgres.PostgresStore],
) -> None:
    a, b = pair
    task = testing.new_task()
    await a.insert_tasks([task])
    assert await a.claim([_claim(task, "w1")]) == [True]
    # the worker moved to b, which adopts the run (the attempt the worker reports)
    adopt = base.TaskUpdate(
        task.id, {"status": RUNNING, "worker_id": "w1"}, expect_status=RUNNING, expect_attempts=1
    )
    assert await b.apply([adopt]) == [True]
    lost = base.TaskUpdate(
        task.id, {"status": QUEUED}, expect_status=RUNNING, expect_attempts=1, owned=True
    )
    assert await a.apply([lost]) == [False]  # a's late "worker lost" changes nothing
    assert await b.apply([lost]) == [True]
    assert [t.id for t in await b.owned_running_tasks()] == []


async def test_leases_take_over_a_dead_dispatchers_runs_and_refuse_a_second_instance(
    pg_url: str, pair: tuple[postgres.PostgresStore, postgres.PostgresStore]
) -> None:
    a, b = pair
    await a.register(instance="i-a", p2p_address="h:1", api_url="http://h:2", lease=3)
    await b.register(instance="i-b", p2p_address=None, api_url=None, lease=3)
    twin = postgres.PostgresStore(pg_url, owner="a")
    await twin.open()
    try:
        with pytest.raises(errors.StorageError, match="already running"):
            await twin.register(instance="i-other", p2p_address=None, api_url=None, lease=3)
        # the same data dir (same instance) may come back at once after a crash
        await twin.register(instance="i-a", p2p_address="h:1", api_url=None, lease=3)
    finally:
        await twin.close()
    tasks = [testing.new_task() for _ in range(3)]
    await a.insert_tasks(tasks)
    assert await a.claim([_claim(t, "w") for t in tasks]) == [True] * 3
    assert await b.take_over_expired(not_before=1.0) == {}  # a's lease is live
    assert {d["id"] for d in await b.dispatchers()} == {"a", "b"}
    await a.release(instance="i-a")  # a clean stop: no need to wait for the lease
    taken = await b.take_over_expired(not_before=123.0)
    assert sorted(taken["a"]) == sorted(t.id for t in tasks)
    for task in await b.get_tasks([t.id for t in tasks]):
        assert (task.status, task.attempts, task.not_before) == (QUEUED, 1, 123.0)
    assert [d["id"] for d in await b.dispatchers()] == ["b"]
    assert await a.renew(instance="i-a", lease=3, summary="{}") is False  # a lost its place
    assert await b.renew(instance="i-b", lease=3, summary='{"workers": []}') is True
    # a lease that just runs out is taken over too
    await a.register(instance="i-a", p2p_address=None, api_url=None, lease=3)
    started = time.monotonic()
    while not await b.take_over_expired(not_before=0.0):
        assert time.monotonic() - started < 10
        await asyncio.sleep(0.2)
    print(f"a 3 s lease ran out and was taken over after {time.monotonic() - started:.1f}s")


async def test_dispatchers_hear_each_others_changes_and_ignore_garbage(
    pg_url: str, pair: tuple[postgres.PostgresStore, postgres.PostgresStore]
) -> None:
    a, b = pair
    heard: list[dict[str, Any]] = []
    gaps: list[int] = []
    b.listen(heard.append, lambda: gaps.append(1))
    a.listen(lambda m: pytest.fail(f"a heard {m}"), lambda: None)  # its own changes: no
    await asyncio.sleep(0.5)  # listening
    high = models.TaskSpec(command="true", priority="high")
    tasks = [testing.new_task(spec=high) for _ in range(400)]
    seqs = await a.insert_tasks(tasks)
    await a.claim([_claim(tasks[0], "w")])
    # garbage on the channel (anyone who can log in to the database could send it)
    conn = await asyncpg.connect(pg_url)
    try:
        for junk in ("not json", "[1, 2]", '{"c": "x"}', '{"c": [[1, 2], ["id"]]}', "{}"):
            await conn.execute("SELECT pg_notify($1, $2)", postgres.CHANNEL, junk)
    finally:
        await conn.close()
    deadline = time.monotonic() + 10
    while sum(len(m.get("c", [])) for m in heard if isinstance(m.get("c"), list)) < 401:
        assert time.monotonic() < deadline, heard[-3:]
        await asyncio.sleep(0.05)
    changes = [c for m in heard if isinstance(m.get("c"), list) for c in m["c"]]
    queued_from = min(m["q"]["2"] for m in heard if "q" in m)
    assert queued_from == min(seqs)
    assert [c for c in changes if isinstance(c, list) and c[1:] == ["r"]] == [[tasks[0].id, "r"]]
    assert all(
        len(p) < 8000 for p in postgres.notifications("a", [("x" * 36, "queued", 2, 1)] * 400)
    )
    print(f"b heard {len(changes)} changes of a in {len(heard)} notifications; garbage ignored")
    assert not gaps
