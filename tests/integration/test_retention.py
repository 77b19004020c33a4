"""Task retention in the dispatcher: finished tasks older than `task_retention_hours` are
deleted by the primary (never queued or running ones), their ids answer 404, their
idempotency keys are forgotten, and the count shows in `octaskly_tasks_pruned_total`.

Real SQLite files throughout; the cutoff arithmetic is checked with an injected clock, the
periodic pruning with a real in-process cluster (real worker subprocesses) and a retention
of half a second.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from octaskly import testing
from octaskly.domain import models
from octaskly.services import dispatcher as dispatching
from octaskly.services import ha
from octaskly.store import sqlite
from tests.cluster import SECRET, running_cluster, until

RETENTION_SECONDS = 0.5


async def test_the_cutoff_is_now_minus_the_retention(tmp_path: Path) -> None:
    now = 1_700_000_000.0
    options = dispatching.Options(secret_key=SECRET, task_retention_hours=2)
    store = sqlite.SQLiteStore(tmp_path / "octaskly.db")
    dispatcher = dispatching.Dispatcher(options=options, store=store, clock=lambda: now)
    await store.open()
    try:
        done = models.TaskStatus.COMPLETED
        older = testing.new_task(status=done, completed_at=now - 2 * 3600 - 1)
        newer = testing.new_task(status=done, completed_at=now - 2 * 3600 + 1)
        await store.insert_tasks([older, newer])
        assert await dispatcher.prune_tasks() == 1
        assert await store.get_task(older.id) is None
        assert await store.get_task(newer.id) is not None
        assert dispatcher.metrics.pruned._value.get() == 1
        # 0 keeps everything, however old
        keep = dispatching.Dispatcher(
            options=dispatching.Options(secret_key=SECRET, task_retention_hours=0),
            store=store,
            clock=lambda: now + 10**9,
        )
        assert await keep.prune_tasks() == 0
        assert await store.get_task(newer.id) is not None
    finally:
        await store.close()
    print("cut off at now - 2 h: 1 s older pruned, 1 s newer kept; retention 0 keeps all")


async def test_the_primary_prunes_finished_tasks_and_keeps_queued_and_running(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path, task_retention_hours=RETENTION_SECONDS / 3600) as cluster:
        await cluster.add_worker("w1", max_jobs=4)
        done_ids = [await cluster.submit(command=f"echo {i}") for i in range(5)]
        status, body = await cluster.api(
            "POST", "/api/v1/tasks", json={"command": "true"}, headers={"Idempotency-Key": "k1"}
        )
        assert status == 201
        keyed = body["id"]
        done_ids.append(keyed)
        running = await cluster.submit(command="sleep 3")
        queued = await cluster.submit(command="true", requirements={"labels": {"zone": "mars"}})
        for task_id in done_ids:
            await cluster.wait_status(task_id, "completed")
        await cluster.wait_status(running, "running")
        finished_at = time.monotonic()

        async def all_gone() -> bool:
            for task_id in done_ids:
                status, _ = await cluster.api("GET", f"/api/v1/tasks/{task_id}")
                if status != 404:
                    return False
            return True

        await until(all_gone, timeout=10, what="finished tasks pruned")
        pruned_after = time.monotonic() - finished_at
        # still there: the task that is running, the one that waits for a worker
        assert (await cluster.task(running))["status"] == "running"
        assert (await cluster.task(queued))["status"] == "queued"
        status, page = await cluster.api("GET", "/api/v1/tasks")
        assert status == 200 and {t["id"] for t in page["tasks"]} == {running, queued}
        # the idempotency key went with its task: the same key makes a new task
        status, again = await cluster.api(
            "POST", "/api/v1/tasks", json={"command": "true"}, headers={"Idempotency-Key": "k1"}
        )
        assert status == 201 and again["id"] != keyed
        # the running task, once it finishes, goes too
        await cluster.wait_status(running, "completed", timeout=15)
        await until(
            lambda: _gone(cluster, running), timeout=10, what="the long task pruned after it ended"
        )
        assert (await cluster.task(queued))["status"] == "queued"
        status, metrics = await cluster.api("GET", "/metrics")
        pruned_metric = _metric(metrics, "octaskly_tasks_pruned_total")
        assert pruned_metric >= len(done_ids) + 1
    print(
        f"retention {RETENTION_SECONDS}s: {len(done_ids)} finished tasks answered 404 "
        f"{pruned_after:.2f}s after the last finished; running and queued kept; "
        f"key reused -> new task; octaskly_tasks_pruned_total {pruned_metric:g}"
    )


async def test_a_standby_does_not_prune(tmp_path: Path) -> None:
    """Only the primary deletes (its deletions replicate); a dispatcher that stepped down
    stops pruning."""
    async with running_cluster(
        tmp_path,
        task_retention_hours=RETENTION_SECONDS / 3600,
        ha=ha.Options(auto_failover=False),  # it must stay a standby of a primary that is away
    ) as c:
        assert _pruning(c.dispatcher)
        await c.dispatcher.ha.demote(7, f"127.0.0.1:{testing.free_port()}", "a test")
        assert c.dispatcher.role == "standby"
        assert not _pruning(c.dispatcher)
        old = testing.new_task(status=models.TaskStatus.COMPLETED, completed_at=1.0)
        await c.dispatcher.store.insert_tasks([old])
        await asyncio.sleep(4 * RETENTION_SECONDS)
        assert await c.dispatcher.store.get_task(old.id) is not None
    print("standby: no retention task; a task finished long ago is kept")


def _pruning(dispatcher: dispatching.Dispatcher) -> bool:
    return any(
        t.get_name() == "octaskly-task-retention" and not t.done() for t in asyncio.all_tasks()
    )


async def _gone(cluster: object, task_id: str) -> bool:
    status, _ = await cluster.api("GET", f"/api/v1/tasks/{task_id}")  # type: ignore[attr-defined]
    return bool(status == 404)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
