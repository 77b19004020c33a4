"""A dispatcher on PostgreSQL (`db_url`), end to end: real processes, a real server
(tests/pg.py), the URL given the ways a user gives it, and the ways it goes wrong."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

from tests import pg
from tests.e2e import procs


def _dispatcher(tmp_path: Path, url: str, *, name: str = "d1") -> tuple[list[str], str, Path]:
    port, api_port = procs.free_port(), procs.free_port()
    data = tmp_path / name
    args = [
        "dispatcher", "--port", str(port), "--api-port", str(api_port), "--bind", "127.0.0.1",
        "--data-dir", str(data), "--secret-key", procs.SECRET, "--quic-enabled", "false",
    ]  # fmt: skip
    return args, f"http://127.0.0.1:{api_port}", data


def _finished(api: str, task_id: str) -> Any:
    got = procs.http("GET", f"{api}/api/v1/tasks/{task_id}")[1]
    return got if got["status"] in ("completed", "failed") else None


async def test_a_dispatcher_on_postgresql_runs_tasks_and_keeps_them_across_restarts(
    tmp_path: Path, pg_url: str, pg_cluster: pg.Cluster
) -> None:
    args, api, data = _dispatcher(tmp_path, pg_url)
    env = procs.clean_env(OCTASKLY_DB_URL=pg_url)  # the password stays out of argv
    log = tmp_path / "dispatcher.log"
    port = args[args.index("--port") + 1]
    with procs.processes() as ps:
        ps.append(procs.start(args, cwd=tmp_path, env=env, log=log))
        await asyncio.to_thread(procs.wait_healthy, api, ps[0], data_dir=data)
        ps.append(
            procs.start(
                ["worker", "--dispatcher-addr", f"127.0.0.1:{port}", "--name", "w1",
                 "--transport", "tcp", "--secret-key", procs.SECRET],
                cwd=tmp_path,
            )
        )  # fmt: skip
        status, task = await asyncio.to_thread(
            procs.http, "POST", f"{api}/api/v1/tasks", {"command": "printf 'a\\0b'; echo pg"}
        )
        assert status == 201
        done = await asyncio.to_thread(
            procs.wait_for, lambda: _finished(api, task["id"]), timeout=60, what="the task"
        )
        assert done["status"] == "completed" and done["stdout"] == "a\x00bpg\n"
        health = (await asyncio.to_thread(procs.http, "GET", f"{api}/health"))[1]
        assert health["status"] == "healthy", health

        # the rows are in PostgreSQL, where an operator's psql finds them
        database = urllib.parse.urlsplit(pg_url).path.lstrip("/")
        row = pg_cluster.psql(f"SELECT status FROM tasks WHERE id = '{task['id']}'", database)
        assert row.strip() == "completed"

        assert procs.stop(ps[0]) == 0
        ps[0] = procs.start(args, cwd=tmp_path, env=env, log=tmp_path / "again.log")
        await asyncio.to_thread(procs.wait_healthy, api, ps[0], data_dir=data)
        again = await asyncio.to_thread(procs.http, "GET", f"{api}/api/v1/tasks/{task['id']}")
        assert again[0] == 200 and again[1]["stdout"] == "a\x00bpg\n"
        output = log.read_text()
        assert "database PostgreSQL 127.0.0.1:" in output
        password = urllib.parse.urlsplit(pg_url).password
        assert password and password not in output
        print(f"task on PostgreSQL: {done['status']}, output with a NUL byte kept, still there "
              "after a restart; the password never logged")  # fmt: skip


def _fails(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    args, _, _ = _dispatcher(tmp_path, url)
    return procs.run([*args, *extra], cwd=tmp_path, env=procs.clean_env(OCTASKLY_DB_URL=url))


def test_bad_database_urls_stop_the_dispatcher_with_a_clear_message(
    tmp_path: Path, pg_url: str, pg_cluster: pg.Cluster
) -> None:
    parts = urllib.parse.urlsplit(pg_url)
    secret = parts.password or ""
    wrong_password = pg_url.replace(f":{secret}@", ":not-the-password@")
    closed_port = f"postgresql://octaskly:{secret}@127.0.0.1:{procs.free_port()}/x"
    missing_db = pg_url.rsplit("/", 1)[0] + "/no_such_database"
    foreign = pg_cluster.create_database()
    pg_cluster.psql("CREATE TABLE invoices (id int)", urllib.parse.urlsplit(foreign).path[1:])
    cases = {
        "wrong password": (wrong_password, "refused the login"),
        "nothing listening": (closed_port, "is unreachable"),
        "no such database": (missing_db, "CREATE DATABASE"),
        "someone else's database": (foreign, "not an octaskly database"),
        "not postgresql://": ("mysql://x@y/z", "must start with postgresql://"),
    }
    for name, (url, expected) in cases.items():
        done = _fails(tmp_path, url)
        output = done.stdout + done.stderr
        assert done.returncode != 0, name
        assert expected in output, (name, output[-2000:])
        assert secret not in output and "not-the-password" not in output, name
        print(f"{name}: exit {done.returncode}: {output.strip().splitlines()[-1][:160]}")
    standby = _fails(tmp_path, pg_url, "--role", "standby", "--primary-addr", "127.0.0.1:1")
    assert standby.returncode != 0 and "all active" in standby.stderr + standby.stdout
    pg_cluster.drop_database(foreign)
