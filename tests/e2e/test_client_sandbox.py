"""Client tasks are strict by default, in every deployment mode, with real processes: one
dispatcher on SQLite (and the CLI), a primary and a standby (the level replicates; the
promoted standby's scheduler honours it), and two dispatchers sharing PostgreSQL (each
schedules onto its own workers).

A worker that cannot provide `strict` is made for real: its `--work-dir` sits where the
sandbox user cannot reach (under pytest's tmp_path, 0700 all the way, as these tests run
as root), so its start-up probe — a real bwrap run — fails there.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import procs
from tests.e2e.procs import SECRET, TOKENS, clean_env, free_port, http, run, start, wait_for
from tests.e2e.test_ha import ha_pair

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the worker that cannot sandbox relies on a root worker"
)
# in a PID namespace a task sees its own few processes
PROCESSES = "ls /proc | grep -cE '^[0-9]+$'"


@pytest.fixture
def reachable(reachable_tmp: Path) -> Path:
    """A work dir the sandbox user can reach."""
    return reachable_tmp / "work"


def worker(name: str, addrs: str, work_dir: Path) -> list[str]:
    return [
        "worker", "--name", name, "--dispatcher-addr", addrs, "--work-dir", str(work_dir),
        "--max-jobs", "2", "--transport", "tcp", "--connection-timeout", "5",
        "--secret-key", SECRET,
    ]  # fmt: skip


def client_token(api: str, subject: str = "carol") -> str:
    status, issued = http("POST", f"{api}/api/v1/tokens", {"role": "client", "subject": subject})
    assert status == 201, issued
    return str(issued["token"])


def task(api: str, task_id: str, token: str) -> dict[str, Any]:
    status, body = http("GET", f"{api}/api/v1/tasks/{task_id}", token=token)
    assert status == 200, body
    return dict(body)


def waits_naming(api: str, task_id: str, token: str, worker_name: str) -> dict[str, Any]:
    """Until the queued task says no worker can run its level, naming `worker_name`."""
    prefix = f"no worker can run sandbox level strict: {worker_name}: "

    def says_why() -> dict[str, Any] | None:
        code, body = http("GET", f"{api}/api/v1/tasks/{task_id}", token=token)
        return body if code == 200 and (body["waiting_reason"] or "").startswith(prefix) else None

    record: dict[str, Any] = wait_for(says_why, timeout=30, what=f"the waiting reason on {api}")
    assert record["status"] == "queued" and record["attempts"] == 0, record
    return record


def completes_on(api: str, task_id: str, token: str, worker_name: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = task(api, task_id, token)
        return body if body["status"] not in ("queued", "running") else None

    record: dict[str, Any] = wait_for(done, timeout=60, what="the client's task to finish")
    assert (record["status"], record["worker_id"]) == ("completed", worker_name), record
    assert record["attempts"] == 1 and record["sandbox_level"] == "strict"
    assert int(record["stdout"]) < 10, record  # it ran in its own PID namespace
    return record


def test_one_dispatcher_on_sqlite_and_the_cli(tmp_path: Path, reachable: Path) -> None:
    port, api_port = free_port(), free_port()
    api, data = f"http://127.0.0.1:{api_port}", tmp_path / "data"
    addr = f"127.0.0.1:{port}"
    with procs.processes() as ps:
        ps.append(
            start(
                ["dispatcher", "--port", str(port), "--api-port", str(api_port), "--bind",
                 "127.0.0.1", "--data-dir", str(data), "--secret-key", SECRET,
                 "--keepalive-interval", "1"],
                cwd=tmp_path,
            )
        )  # fmt: skip
        procs.wait_healthy(api, ps[0], data_dir=data)
        ps.append(start(worker("weak", addr, tmp_path / "work"), cwd=tmp_path))
        wait_for(lambda: http("GET", f"{api}/api/v1/workers")[1]["total"] == 1, what="weak")
        carol = client_token(api)
        env = clean_env(OCTASKLY_API_URL=api, OCTASKLY_TOKEN=carol)

        refused = run(["submit", "--sandbox-level", "basic", "--", "true"], cwd=tmp_path, env=env)
        assert refused.returncode == 2, refused  # a 400: a usage error
        assert "sandbox_level: basic is below strict" in refused.stderr, refused.stderr
        submitted = run(["submit", "--", PROCESSES], cwd=tmp_path, env=env)
        assert submitted.returncode == 0, submitted.stderr
        task_id = submitted.stdout.strip()
        assert task(api, task_id, carol)["sandbox_level"] == "strict"
        record = waits_naming(api, task_id, carol, "weak")
        assert "cannot reach the task workdirs" in record["waiting_reason"]
        status = run(["status", task_id], cwd=tmp_path, env=env)
        assert "no worker can run sandbox level strict: weak:" in status.stdout, status.stdout
        # the operator sees which levels each worker provides
        admin = procs.client_env(api)
        table = run(["workers"], cwd=tmp_path, env=admin).stdout
        header, row = table.splitlines()[:2]
        assert row.split()[header.split().index("SANDBOX")] == "basic", table

        ps.append(start(worker("able", addr, reachable), cwd=tmp_path))
        completes_on(api, task_id, carol, "able")
        table = run(["workers"], cwd=tmp_path, env=admin).stdout
        assert "basic,strict,very-strict" in table, table


def test_the_level_replicates_and_the_promoted_standby_honours_it(
    tmp_path: Path, reachable: Path
) -> None:
    with ha_pair(tmp_path, replication="sync", workers=0) as pair:
        addrs = f"127.0.0.1:{pair.a.p2p},127.0.0.1:{pair.b.p2p}"
        weak = start(worker("weak", addrs, tmp_path / "work"), cwd=tmp_path, env=pair.env)
        pair.procs.append(weak)
        pair.wait_workers(1)
        carol = client_token(pair.a.api)
        status, body = http("POST", f"{pair.a.api}/api/v1/tasks", {"command": PROCESSES}, carol)
        assert status == 201, body  # sync replication: the standby has it now
        task_id = body["id"]
        waits_naming(pair.a.api, task_id, carol, "weak")

        assert pair.a.proc is not None
        pair.a.proc.send_signal(signal.SIGKILL)
        pair.a.proc.wait()
        wait_for(lambda: http("GET", f"{pair.b.api}/ready")[0] == 200, what="b promoted")
        # the promoted standby has the level from the replicated spec and holds the task
        # back from the worker that came over with it, saying why
        record = waits_naming(pair.b.api, task_id, carol, "weak")
        assert record["sandbox_level"] == "strict"

        able = start(worker("able", addrs, reachable), cwd=tmp_path, env=pair.env)
        pair.procs.append(able)
        completes_on(pair.b.api, task_id, carol, "able")


def test_federated_dispatchers_each_schedule_onto_their_own_workers(
    tmp_path: Path, reachable: Path, pg_url: str
) -> None:
    env = clean_env(OCTASKLY_DB_URL=pg_url)
    members = []
    with procs.processes() as ps:
        for name in ("d1", "d2"):
            port, api_port = free_port(), free_port()
            api, data = f"http://127.0.0.1:{api_port}", tmp_path / name
            ps.append(
                start(
                    ["dispatcher", "--port", str(port), "--api-port", str(api_port), "--bind",
                     "127.0.0.1", "--data-dir", str(data), "--node-name", name,
                     "--secret-key", SECRET, "--lease-seconds", "4", "--keepalive-interval", "1",
                     "--quic-enabled", "false"],
                    cwd=tmp_path,
                    env=env,
                    log=tmp_path / f"{name}.log",
                )
            )  # fmt: skip
            procs.wait_healthy(api, ps[-1], data_dir=data)
            members.append((f"127.0.0.1:{port}", api))
        (addr1, api1), (addr2, api2) = members
        ps.append(start(worker("weak", addr1, tmp_path / "work"), cwd=tmp_path))

        def listed(api: str, count: int) -> list[dict[str, Any]] | None:
            code, body = http("GET", f"{api}/api/v1/workers")
            return body["workers"] if code == 200 and len(body["workers"]) == count else None

        wait_for(lambda: listed(api1, 1), what="weak on d1")
        carol = client_token(api1)
        status, body = http("POST", f"{api1}/api/v1/tasks", {"command": PROCESSES}, carol)
        assert status == 201, body
        task_id = body["id"]
        # d1 holds it back from its own worker; d2 has none yet
        waits_naming(api1, task_id, carol, "weak")

        ps.append(start(worker("able", addr2, reachable), cwd=tmp_path))
        # d2 claims it for the worker connected to it
        completes_on(api2, task_id, TOKENS[api2], "able")
        # every dispatcher shows every worker of the federation with its levels
        workers = wait_for(lambda: listed(api1, 2), what="both workers seen from d1")
        levels = {w["name"]: (w["dispatcher"], w["sandbox_levels"]) for w in workers}
        assert levels == {
            "weak": ("d1", ["basic"]),
            "able": ("d2", ["basic", "strict", "very-strict"]),
        }, levels
