"""Client tasks are sandboxed by default: with a `client` token a task gets at least
`client_min_sandbox_level` (strict), stored in its spec; asking for less is a 400; and a
worker that cannot provide the level never gets the task, which waits saying why until a
worker that can joins. A real dispatcher, real workers, real bubblewrap, real SQLite (or
PostgreSQL in the suite's second pass).

The worker that cannot sandbox is made for real, not mocked: its workdirs sit where the
sandbox user cannot reach them, so its start-up probe of `strict` (a real bwrap run) fails.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from octaskly.domain import models
from tests.cluster import Cluster, running_cluster, until

Level = models.SandboxLevel
# in a PID namespace a task sees its own few processes; on the host, every process there is
PROCESSES = "ls /proc | grep -cE '^[0-9]+$'"


@pytest.fixture
def reachable(reachable_tmp: Path) -> Path:
    """A workdir root the sandbox user can reach (pytest's tmp_path is 0700 all the way)."""
    return reachable_tmp / "work"


@pytest.fixture
def unreachable(tmp_path: Path) -> Iterator[Path]:
    """A workdir root where strict cannot work. For a root worker: under pytest's tmp_path,
    whose 0700 directories uid 65534 cannot pass. For another user (who sandboxes as
    itself): a root it may not write, so no workdir can be made there."""
    if os.geteuid() == 0:
        yield tmp_path / "work"
        return
    root = tmp_path / "read-only-work"
    root.mkdir(mode=0o500)
    try:
        yield root
    finally:
        root.chmod(0o700)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path, require_auth=True) as c:
        yield c


async def bearer(cluster: Cluster, role: str, subject: str = "someone") -> dict[str, str]:
    value, _ = await cluster.dispatcher.tokens.issue(subject=subject, role=role, ttl=600)
    return {"Authorization": f"Bearer {value}"}


async def submit(cluster: Cluster, headers: dict[str, str], **spec: Any) -> str:
    status, body = await cluster.api("POST", "/api/v1/tasks", json=spec, headers=headers)
    assert status == 201, body
    return str(body["id"])


async def record(cluster: Cluster, task_id: str, headers: dict[str, str]) -> dict[str, Any]:
    status, body = await cluster.api("GET", f"/api/v1/tasks/{task_id}", headers=headers)
    assert status == 200, body
    return dict(body)


async def finished(
    cluster: Cluster, task_id: str, headers: dict[str, str], timeout: float = 30
) -> dict[str, Any]:
    async def done() -> bool:
        return (await record(cluster, task_id, headers))["status"] not in ("queued", "running")

    await until(done, timeout=timeout, what=f"task {task_id} finishes")
    return await record(cluster, task_id, headers)


async def test_a_client_task_is_stored_strict_and_runs_sandboxed(
    cluster: Cluster, reachable: Path
) -> None:
    await cluster.add_worker("w1", workdir_root=reachable)  # its own minimum: basic (the default)
    client, admin = await bearer(cluster, "client", "carol"), await bearer(cluster, "admin")
    task_id = await submit(cluster, client, command=PROCESSES)
    assert (await record(cluster, task_id, client))["sandbox_level"] == "strict"
    # the level is in the stored spec, not only in memory: the store reads it back
    stored = await cluster.dispatcher.store.get_task(task_id)
    assert stored is not None and stored.spec.sandbox_level is Level.STRICT
    done = await finished(cluster, task_id, client)
    assert done["status"] == "completed", done
    assert int(done["stdout"]) < 10  # its own PID namespace: bwrap, sh, ls, grep
    # an admin's task without a level keeps none and runs at the worker's own level
    plain = await submit(cluster, admin, command=PROCESSES)
    assert (await record(cluster, plain, admin))["sandbox_level"] is None
    assert (await finished(cluster, plain, admin))["status"] == "completed"


async def test_a_client_may_not_ask_for_less_and_an_admin_may(
    cluster: Cluster, reachable: Path
) -> None:
    await cluster.add_worker("w1", workdir_root=reachable)
    client, admin = await bearer(cluster, "client"), await bearer(cluster, "admin")
    for level in ("basic", "none"):
        status, body = await cluster.api(
            "POST", "/api/v1/tasks", json={"command": "true", "sandbox_level": level},
            headers=client,
        )  # fmt: skip
        assert status == 400, body
        assert body["field"] == "sandbox_level"
        assert body["error"].startswith(f"sandbox_level: {level} is below strict")
        assert "client_min_sandbox_level" in body["error"]
    # a batch is all or nothing: one task below the minimum refuses the whole batch
    batch = {"tasks": [{"command": "true"}, {"command": "true", "sandbox_level": "basic"}]}
    status, body = await cluster.api("POST", "/api/v1/tasks/batch", json=batch, headers=client)
    assert status == 400 and body["field"] == "tasks[1].sandbox_level", body
    status, listed = await cluster.api("GET", "/api/v1/tasks", headers=admin)
    assert listed["total"] == 0  # nothing of the refused requests was stored
    # more isolation than the minimum is always fine; a batch gets the minimum per task
    stricter = await submit(cluster, client, command="true", sandbox_level="very-strict")
    status, body = await cluster.api(
        "POST", "/api/v1/tasks/batch", json={"tasks": [{"command": "true"}] * 2}, headers=client
    )
    assert status == 201, body
    levels = [(await record(cluster, i, client))["sandbox_level"] for i in body["ids"]]
    assert levels == ["strict", "strict"]
    assert (await record(cluster, stricter, client))["sandbox_level"] == "very-strict"
    # admin and dispatcher tokens are not held to it
    for role in ("admin", "dispatcher"):
        headers = await bearer(cluster, role)
        loose = await submit(cluster, headers, command=PROCESSES, sandbox_level="basic")
        done = await finished(cluster, loose, headers)
        assert (done["sandbox_level"], done["status"]) == ("basic", "completed"), done
    for task_id in [stricter, *body["ids"]]:
        assert (await finished(cluster, task_id, client))["status"] == "completed"


async def test_the_minimum_is_configurable(tmp_path: Path) -> None:
    async with running_cluster(
        tmp_path, require_auth=True, client_min_sandbox_level=Level.BASIC
    ) as cluster:
        client = await bearer(cluster, "client")
        task_id = await submit(cluster, client, command="true")
        assert (await record(cluster, task_id, client))["sandbox_level"] == "basic"
        status, body = await cluster.api(
            "POST", "/api/v1/tasks", json={"command": "true", "sandbox_level": "none"},
            headers=client,
        )  # fmt: skip
        assert status == 400 and "none is below basic" in body["error"], body
    async with running_cluster(
        tmp_path / "off", require_auth=True, client_min_sandbox_level=Level.NONE
    ) as cluster:
        client = await bearer(cluster, "client")
        task_id = await submit(cluster, client, command="true", sandbox_level="none")
        assert (await record(cluster, task_id, client))["sandbox_level"] == "none"
        task_id = await submit(cluster, client, command="true")
        assert (await record(cluster, task_id, client))["sandbox_level"] is None


async def test_without_authentication_every_caller_is_admin_and_unrestricted(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path) as cluster:  # require_auth off
        task_id = await cluster.submit(command="true", sandbox_level="none")
        assert (await cluster.task(task_id))["sandbox_level"] == "none"
        task_id = await cluster.submit(command="true")
        assert (await cluster.task(task_id))["sandbox_level"] is None


async def test_a_worker_that_cannot_sandbox_gets_no_client_task_until_one_that_can_joins(
    cluster: Cluster, reachable: Path, unreachable: Path
) -> None:
    weak = await cluster.add_worker("w1", workdir_root=unreachable)
    client, admin = await bearer(cluster, "client"), await bearer(cluster, "admin")
    # the worker says which levels it provides, and why not the others
    status, listed = await cluster.api("GET", "/api/v1/workers", headers=admin)
    assert status == 200, listed
    (view,) = listed["workers"]
    assert view["sandbox_level"] == "basic" and view["sandbox_levels"] == ["basic"]
    assert set(view["sandbox_unavailable"]) == {"strict", "very-strict"}
    why = view["sandbox_unavailable"]["strict"]
    assert ("cannot reach" if os.geteuid() == 0 else "cannot make a workdir") in why, why

    task_id = await submit(cluster, client, command=PROCESSES)
    # an admin's task without a level still runs there: the worker is alive and scheduled
    plain = await submit(cluster, admin, command="true")
    done = await finished(cluster, plain, admin)
    assert (done["status"], done["worker_id"]) == ("completed", "w1"), done

    async def says_why() -> bool:
        reason = (await record(cluster, task_id, client))["waiting_reason"] or ""
        return reason.startswith("no worker can run sandbox level strict: w1: ")

    await until(says_why, what="the waiting reason")
    waiting = await record(cluster, task_id, client)
    assert waiting["status"] == "queued" and waiting["attempts"] == 0, waiting
    assert why in waiting["waiting_reason"]
    assert weak.completed == 1  # the admin's task only: the client's never reached it

    await cluster.add_worker("w2", workdir_root=reachable)
    done = await finished(cluster, task_id, client)
    assert (done["status"], done["worker_id"], done["attempts"]) == ("completed", "w2", 1), done
    assert int(done["stdout"]) < 10
    assert done["waiting_reason"] is None
