"""Dispatcher + workers end to end over real sockets, real SQLite and real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from octaskly.services import worker as working
from tests.cluster import Cluster, running_cluster, until


@pytest.fixture
async def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with running_cluster(tmp_path) as c:
        yield c


async def test_task_runs_and_records_everything(cluster: Cluster) -> None:
    await cluster.add_worker("w1")
    task_id = await cluster.submit(command="echo hello; echo oops >&2; exit 0")
    record = await cluster.wait_status(task_id, "completed")
    assert record["stdout"] == "hello\n"
    assert record["stderr"] == "oops\n"
    assert record["exit_code"] == 0
    assert record["worker_id"] == "w1"
    assert record["attempts"] == 1
    assert record["duration_ms"] is not None and record["duration_ms"] >= 0
    for field in ("created_at", "started_at", "completed_at"):
        assert record[field].endswith("Z")


async def test_failed_exit_code_and_env(cluster: Cluster) -> None:
    await cluster.add_worker("w1")
    task_id = await cluster.submit(command='echo "$GREETING"; exit 3', env={"GREETING": "hi"})
    record = await cluster.wait_status(task_id, "failed")
    assert record["exit_code"] == 3
    assert record["stdout"] == "hi\n"


async def test_timeout_kills_the_task(cluster: Cluster) -> None:
    await cluster.add_worker("w1")
    task_id = await cluster.submit(command="sleep 30", timeout=1)
    record = await cluster.wait_status(task_id, "timed_out")
    assert "timed out" in (record["error"] or "")


async def test_retries_with_backoff_then_fail(cluster: Cluster) -> None:
    await cluster.add_worker("w1")
    task_id = await cluster.submit(command="exit 1", retry_count=2)
    record = await cluster.wait_status(task_id, "failed", timeout=30)
    assert record["attempts"] == 3  # one run + two retries


async def test_retry_that_succeeds(cluster: Cluster) -> None:
    await cluster.add_worker("w1")
    marker = cluster.tmp / "ran-once"
    task_id = await cluster.submit(
        command=f"if [ -e {marker} ]; then echo second; else touch {marker}; exit 1; fi",
        retry_count=3,
    )
    record = await cluster.wait_status(task_id, "completed")
    assert record["attempts"] == 2 and record["stdout"] == "second\n"


async def test_cancel_queued_and_running(cluster: Cluster) -> None:
    queued = await cluster.submit(command="true")  # no worker yet: stays queued
    status, body = await cluster.api("DELETE", f"/api/v1/tasks/{queued}")
    assert status == 200 and body["status"] == "cancelled"
    await cluster.add_worker("w1")
    pidfile = cluster.tmp / "pid"
    running = await cluster.submit(command=f"echo $$ > {pidfile}; exec sleep 60")
    await cluster.wait_status(running, "running")
    await until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", what="pid file")
    pid = int(pidfile.read_text())
    status, body = await cluster.api("DELETE", f"/api/v1/tasks/{running}")
    assert status == 200 and body["status"] == "cancelled"
    await until(lambda: not Path(f"/proc/{pid}").exists(), what="task process killed")
    status, body = await cluster.api("DELETE", f"/api/v1/tasks/{running}")
    assert status == 409
    # the cancelled queued task never ran, even with a worker now present
    assert (await cluster.task(queued))["attempts"] == 0


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/v1/tasks/00000000-0000-0000-0000-000000000000", 404),
        ("/api/v1/tasks/not-an-id", 400),
        ("/api/v1/tasks/%00", 400),
    ],
)
async def test_bad_ids(cluster: Cluster, path: str, expected: int) -> None:
    for method in ("GET", "DELETE"):
        status, body = await cluster.api(method, path)
        assert status == expected
        assert body["status"] == expected and body["error"] and body["timestamp"]


async def test_logs_follow_streams_until_the_end(cluster: Cluster) -> None:
    await cluster.add_worker("w1")
    gate = cluster.tmp / "gate"
    task_id = await cluster.submit(
        command=f"echo first; while [ ! -e {gate} ]; do sleep 0.05; done; echo second"
    )
    async with cluster.http.get(
        f"{cluster.base_url}/api/v1/tasks/{task_id}/logs?follow=true"
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/x-ndjson"
        events = []
        async for line in resp.content:
            event = json.loads(line)
            events.append(event)
            if event.get("data") == "first\n":
                gate.touch()  # the first line arrived while the task still runs
        assert events[-1]["event"] == "end" and events[-1]["status"] == "completed"
    output = "".join(e.get("data", "") for e in events)
    assert output == "first\nsecond\n"


async def test_logs_of_a_finished_task(cluster: Cluster) -> None:
    await cluster.add_worker("w1")
    task_id = await cluster.submit(command="echo out; echo err >&2")
    await cluster.wait_status(task_id, "completed")
    status, body = await cluster.api("GET", f"/api/v1/tasks/{task_id}/logs")
    assert (status, body["stdout"], body["stderr"]) == (200, "out\n", "err\n")
    async with cluster.http.get(f"{cluster.base_url}/api/v1/tasks/{task_id}/logs?follow=1") as resp:
        events = [json.loads(line) async for line in resp.content]
    assert {"stream": "stdout", "data": "out\n", "data_base64": "b3V0Cg=="} in events
    assert events[-1]["event"] == "end"


async def test_priorities_run_in_order(cluster: Cluster) -> None:
    gate = cluster.tmp / "gate"
    log = cluster.tmp / "order"
    await cluster.add_worker("w1", max_jobs=1)
    blocker = await cluster.submit(command=f"while [ ! -e {gate} ]; do sleep 0.02; done")
    await cluster.wait_status(blocker, "running")
    ids = []
    for prio in ("low", "normal", "critical", "high", "normal"):
        ids.append(await cluster.submit(command=f"echo {prio} >> {log}", priority=prio))
    gate.touch()
    for task_id in ids:
        await cluster.wait_status(task_id, "completed")
    assert log.read_text().split() == ["critical", "high", "normal", "normal", "low"]


async def test_unfit_task_waits_and_says_why(cluster: Cluster) -> None:
    await cluster.add_worker("cpu-only")
    task_id = await cluster.submit(command="echo gpu", requirements={"gpu": True})
    ok = await cluster.submit(command="echo fine")
    await cluster.wait_status(ok, "completed")
    record = await cluster.task(task_id)
    assert record["status"] == "queued"
    assert "GPU" in record["waiting_reason"]
    await cluster.add_worker("gpu-box", gpu=True)
    record = await cluster.wait_status(task_id, "completed")
    assert record["worker_id"] == "gpu-box"


async def test_labels_route_tasks(cluster: Cluster) -> None:
    await cluster.add_worker("eu", labels={"zone": "eu"})
    await cluster.add_worker("us", labels={"zone": "us"})
    ids = [
        await cluster.submit(command="true", requirements={"labels": {"zone": "us"}})
        for _ in range(4)
    ]
    for task_id in ids:
        assert (await cluster.wait_status(task_id, "completed"))["worker_id"] == "us"


async def test_max_jobs_is_respected(cluster: Cluster) -> None:
    await cluster.add_worker("w1", max_jobs=2)
    gate = cluster.tmp / "gate"
    ids = [
        await cluster.submit(command=f"while [ ! -e {gate} ]; do sleep 0.02; done")
        for _ in range(5)
    ]
    await until(lambda: len(cluster.dispatcher.runs) == 2, what="two running")
    _, body = await cluster.api("GET", "/api/v1/workers")
    assert body["workers"][0]["current_jobs"] == 2 and body["workers"][0]["max_jobs"] == 2
    _status, page = await cluster.api("GET", "/api/v1/tasks?status=running")
    assert page["total"] == 2
    gate.touch()
    for task_id in ids:
        await cluster.wait_status(task_id, "completed")


async def test_lost_worker_tasks_are_requeued(cluster: Cluster) -> None:
    await cluster.add_worker("doomed", max_jobs=1)
    task_id = await cluster.submit(command="sleep 60")
    record = await cluster.wait_status(task_id, "running")
    assert record["worker_id"] == "doomed"
    await cluster.stop_worker("doomed")  # its connection drops
    record = await cluster.wait_status(task_id, "queued")
    assert record["attempts"] == 1
    await cluster.add_worker("rescuer", max_jobs=1)
    record = await cluster.wait_status(task_id, "running")
    assert record["worker_id"] == "rescuer" and record["attempts"] == 2
    await cluster.api("DELETE", f"/api/v1/tasks/{task_id}")


async def test_wrong_key_worker_is_refused(cluster: Cluster) -> None:
    worker = await cluster.add_worker("intruder", secret=b"not-the-cluster-secret", wait=False)
    _, job = cluster.workers["intruder"]
    with pytest.raises(Exception, match="secret key"):
        await asyncio.wait_for(job, 10)
    assert "intruder" not in cluster.dispatcher.peers.sessions
    assert worker.worker_id is None
    cluster.workers.pop("intruder")


async def test_many_tasks_two_workers(cluster: Cluster) -> None:
    await cluster.add_worker("a", max_jobs=4)
    await cluster.add_worker("b", max_jobs=4)
    status, body = await cluster.api(
        "POST", "/api/v1/tasks/batch", json={"tasks": [{"command": f"echo {i}"} for i in range(60)]}
    )
    assert status == 201 and len(body["ids"]) == 60
    for task_id in body["ids"]:
        await cluster.wait_status(task_id, "completed")
    status, page = await cluster.api("GET", "/api/v1/tasks?status=completed&limit=1000")
    assert page["total"] == 60
    workers_used = {t["worker_id"] for t in page["tasks"]}
    assert workers_used == {"a", "b"}
    _, stats = await cluster.api("GET", "/api/v1/stats")
    assert stats["tasks"]["completed"] == 60 and stats["workers"]["total"] == 2
    assert stats["database"]["total_tasks"] == 60


async def test_task_limits_are_enforced(cluster: Cluster) -> None:
    await cluster.add_worker("w1", max_jobs=3)
    cpu = await cluster.submit(command="while :; do :; done", cpu_seconds=1, timeout=60)
    disk = await cluster.submit(command="head -c 120000000 /dev/zero > big", disk_limit_mb=100)
    mem = await cluster.submit(
        command="python3 -c 'bytearray(512 * 1024 * 1024)' || exit 9", memory_limit_mb=256
    )
    record = await cluster.wait_status(cpu, "failed")
    assert "CPU time limit exceeded" in record["error"]
    record = await cluster.wait_status(disk, "failed")
    assert "file size limit exceeded" in record["error"]
    record = await cluster.wait_status(mem, "failed")
    assert record["exit_code"] == 9 and "MemoryError" in record["stderr"]


# The cluster's workdirs are under pytest's tmp_path: a root worker's sandbox user cannot
# reach them, so its start-up probe finds strict and very-strict unavailable.
_CANNOT_SANDBOX = pytest.mark.skipif(
    os.geteuid() != 0, reason="a worker not running as root sandboxes as itself: it can reach"
)


@_CANNOT_SANDBOX
async def test_a_level_this_worker_cannot_give_waits_for_another_worker(
    cluster: Cluster,
) -> None:
    await cluster.add_worker("w1")
    marker = cluster.tmp / "ran"
    task_id = await cluster.submit(command=f"touch {marker}", sandbox_level="very-strict")

    async def says_why() -> bool:
        reason = (await cluster.task(task_id))["waiting_reason"] or ""
        return "no worker can run sandbox level very-strict: w1: " in reason

    await until(says_why, what="the waiting reason")
    assert (await cluster.task(task_id))["status"] == "queued" and not marker.exists()


@_CANNOT_SANDBOX
async def test_a_worker_refuses_a_level_it_can_no_longer_give(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rare case: a worker that reported a level (the machine changed since its start,
    simulated here by an empty report) is assigned a task it cannot sandbox: it fails the
    task with the reason and never runs it weaker."""
    monkeypatch.setattr(working, "sandbox_report", lambda minimum, root: {})
    await cluster.add_worker("w1")
    marker = cluster.tmp / "ran"
    task_id = await cluster.submit(command=f"touch {marker}", sandbox_level="very-strict")
    record = await cluster.wait_status(task_id, "failed")
    assert "very-strict" in record["error"] and "not available" in record["error"]
    assert not marker.exists()


async def test_each_task_gets_its_own_workdir_under_work_dir(cluster: Cluster) -> None:
    await cluster.add_worker("w1")
    first = await cluster.submit(command="pwd; touch mine; ls")
    second = await cluster.submit(command="pwd; ls")
    out1 = (await cluster.wait_status(first, "completed"))["stdout"].split()
    out2 = (await cluster.wait_status(second, "completed"))["stdout"].split()
    assert out1[0].startswith(str(cluster.tmp)) and out1[1:] == ["mine"]
    assert out2[0] != out1[0] and out2[1:] == []
    # removed after the run (just after the result is reported)
    await until(lambda: not Path(out1[0]).exists(), what="workdir removed")


async def test_cluster_limit_defaults_apply_to_tasks_without_limits(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, default_memory_mb=256, default_cpu_seconds=7) as c:
        await c.add_worker("w1")
        grab = f"{sys.executable} -c 'bytearray(1 << 30)'"
        failed = await c.wait_status(await c.submit(command=grab), "failed")
        assert "memory limit (256 MB) exceeded" in failed["error"]
        shown = await c.wait_status(await c.submit(command="ulimit -t"), "completed")
        assert shown["stdout"] == "7\n"
        # a preset (and a task's own value) beats the cluster's default
        relaxed = await c.submit(command="ulimit -t", limits_preset="relaxed")
        assert (await c.wait_status(relaxed, "completed"))["stdout"] == "86400\n"
        own = await c.submit(command="ulimit -t", cpu_seconds=30)
        assert (await c.wait_status(own, "completed"))["stdout"] == "30\n"
