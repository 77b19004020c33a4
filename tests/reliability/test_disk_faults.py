"""Disk faults under real dispatcher processes: a full disk, a read-only database, a
corrupted database.

Everything is real: `python -m octaskly dispatcher` and `worker` processes on loopback, the
data dir on a tmpfs mounted for the test (root) and filled to the last byte with a filler
file, a read-only remount, `chattr +i` (root ignores mode bits), garbage written over the
database's pages, and `octaskly backup` / `octaskly restore` run as a user would. The
store-level versions of these faults are in tests/integration/test_sqlite_store.py; this
file checks what a user of the running service sees:

- disk full: submits (single and batch) are refused with 507 and a message saying the disk
  is full, reads and /health keep answering, the dispatcher stays up; a task that finishes
  while the disk is full keeps its result (stored once space returns, not lost); once
  space returns, submits succeed again without a restart and a worker runs the new tasks;
  every acknowledged task is there and the database passes `PRAGMA integrity_check`;
- read-only database file or mount: the dispatcher exits non-zero at once, naming the file
  and "read-only", without a traceback;
- corrupted database: the dispatcher refuses to start, says it is corrupt and gives the
  `octaskly restore` command; that very command restores a backup taken earlier with
  `octaskly backup`, and the dispatcher then starts with the backup's tasks.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shlex
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e import procs
from tests.e2e.procs import SECRET, free_port, http, run, start, wait_for, wait_healthy
from tests.integration.test_sqlite_store import fill, tmpfs

TERMINAL = {"completed", "failed", "timed_out", "cancelled"}
BIG = "true " + "x" * 60_000  # a no-op whose row needs new database pages
START_TIMEOUT = 30.0  # a refused start must end well within this


def _dispatcher(data: Path, *extra: str) -> tuple[str, str, list[str]]:
    """(API URL, P2P address, argv) of a dispatcher keeping its data in `data`."""
    port, api_port = free_port(), free_port()
    args = ["dispatcher", "--port", str(port), "--api-port", str(api_port)]
    args += ["--bind", "127.0.0.1", "--data-dir", str(data), "--secret-key", SECRET, *extra]
    return f"http://127.0.0.1:{api_port}", f"127.0.0.1:{port}", args


def _worker(tmp_path: Path, addr: str, max_jobs: int) -> list[str]:
    return [
        "worker",
        "--dispatcher-addr",
        addr,
        "--name",
        "w1",
        "--secret-key",
        SECRET,
        "--transport",
        "tcp",
        "--max-jobs",
        str(max_jobs),
        "--work-dir",
        str(tmp_path / "work"),
        "--data-dir",
        str(tmp_path / "worker-data"),
    ]


def _post(api: str, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
    """POST JSON with the admin token; (status, body, headers)."""
    token = procs.TOKENS[api]  # (registered by wait_healthy)
    request = urllib.request.Request(
        f"{api}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null"), dict(exc.headers)


def _get_status(api: str, path: str) -> int:
    """Status of a GET with the admin token (any body, JSON or not)."""
    token = procs.TOKENS[api]
    request = urllib.request.Request(f"{api}{path}", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _tasks(api: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for task_id in ids:
        status, body = http("GET", f"{api}/api/v1/tasks/{task_id}")
        if status == 200:
            out[task_id] = body
    return out


def _db_ids(db: Path, *, immutable: bool = False) -> set[str]:
    """The task ids in `db` (`immutable`: on a read-only mount, where SQLite cannot make
    the -shm file a WAL database needs even for reading)."""
    uri = f"file:{db}?mode=ro" + ("&immutable=1" if immutable else "")
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM tasks")}


def _integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return "; ".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))


def _up(proc: subprocess.Popen[bytes], log: Path) -> bool:
    """True while `proc` runs; AssertionError with its log's end once it has exited."""
    if proc.poll() is not None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
        raise AssertionError(f"the dispatcher exited with {proc.returncode}:\n{tail}")
    return True


def _refused_start(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a dispatcher that must refuse to start: (its result, seconds it took)."""
    started = time.monotonic()
    done = run(args, cwd=cwd, timeout=START_TIMEOUT)  # TimeoutExpired fails the test
    took = time.monotonic() - started
    assert done.returncode != 0, f"the dispatcher started: {done.stdout}{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done, took


# -- disk full --------------------------------------------------------------------------------
def test_disk_full_refuses_writes_keeps_reads_and_results_then_recovers(tmp_path: Path) -> None:
    side = tmp_path / "side-effects.log"  # every task appends its marker: runs are counted
    with tmpfs(tmp_path / "mnt", "8m") as mount_point, procs.processes() as ps:
        data, filler = mount_point / "data", mount_point / "filler"
        api, addr, args = _dispatcher(data, "--log-level", "info")
        dispatcher_log = tmp_path / "dispatcher.log"
        dispatcher = start(args, cwd=tmp_path, log=dispatcher_log)
        ps.append(dispatcher)
        wait_healthy(api, dispatcher, data_dir=data)
        worker_log = tmp_path / "worker.log"
        ps.append(start(_worker(tmp_path, addr, 2), cwd=tmp_path, log=worker_log))
        wait_for(lambda: http("GET", f"{api}/api/v1/workers")[1]["total"] == 1, what="worker")

        # before: 20 tasks acknowledged and run
        before: list[str] = []
        for i in range(10):
            status, body = http("POST", f"{api}/api/v1/tasks", {"command": f"echo b{i} >> {side}"})
            assert status == 201, body
            before.append(body["id"])
        batch = [{"command": f"echo b{i} >> {side}"} for i in range(10, 20)]
        status, body = http("POST", f"{api}/api/v1/tasks/batch", {"tasks": batch})
        assert status == 201, body
        before += body["ids"]
        wait_for(
            lambda: all(t["status"] == "completed" for t in _tasks(api, before).values()),
            what="the first 20 tasks to complete",
        )
        # in flight when the disk fills: 2 running (they finish while it is full), 2 queued
        slow = [{"command": f"sleep 2; echo s{i} >> {side}; echo s{i}"} for i in range(4)]
        status, body = http("POST", f"{api}/api/v1/tasks/batch", {"tasks": slow})
        assert status == 201, body
        in_flight: list[str] = body["ids"]
        wait_for(
            lambda: http("GET", f"{api}/api/v1/stats")[1]["tasks"]["running"] == 2,
            what="2 slow tasks running",
        )

        fill(filler)
        full_since = time.monotonic()
        assert (mount_point / "data").exists() and filler.stat().st_size > 0
        during: list[str] = []
        refusals: dict[str, int] = {"single": 0, "batch": 0}
        messages: set[str] = set()
        for kind, path, payload in (
            ("single", "/api/v1/tasks", {"command": BIG}),
            ("batch", "/api/v1/tasks/batch", {"tasks": [{"command": BIG}] * 10}),
        ):
            # the WAL may still have room it reuses: what fits is acknowledged (and durable);
            # it runs out within a few MB
            for _ in range(200):
                status, body, headers = _post(api, path, payload)
                if status == 201:
                    during += body["ids"] if kind == "batch" else [body["id"]]
                    continue
                assert status == 507, (status, body)
                assert "disk" in body["error"] and "full" in body["error"], body
                assert headers.get("Retry-After"), headers
                refusals[kind] += 1
                messages.add(body["error"])
                if refusals[kind] == 3:
                    break
            assert refusals[kind] == 3, f"{kind} submits never refused on a full disk"
        # reads keep answering
        health_status, health = http("GET", f"{api}/health")
        assert health_status == 200, health
        reads = {
            path: _get_status(api, path)
            for path in (
                "/ready",
                "/api/v1/tasks?limit=5",
                f"/api/v1/tasks/{before[0]}",
                "/api/v1/stats",
                "/api/v1/workers",
                "/metrics",
            )
        }
        assert set(reads.values()) == {200}, reads
        # the 2 running tasks finish on the worker while the disk is still full
        wait_for(
            lambda: (
                _up(dispatcher, dispatcher_log)
                and side.exists()
                and {"s0", "s1"} <= set(side.read_text().split())
            ),
            timeout=20,
            what="the slow tasks to finish on the worker",
        )
        wait_for(  # their results reach the dispatcher, which cannot write them yet
            lambda: dispatcher_log.read_text().count("not saved; retrying") >= 2,
            timeout=20,
            what="the 2 results held for a retry",
        )
        assert _up(dispatcher, dispatcher_log)
        during_status = {t: b["status"] for t, b in _tasks(api, in_flight).items()}
        assert filler.exists() and _get_status(api, "/api/v1/stats") == 200
        for _ in range(30):  # audit entries (401s) while the disk is full
            assert http("GET", f"{api}/api/v1/stats", token="forged")[0] == 401
        full_seconds = time.monotonic() - full_since

        filler.unlink()  # space returns; the same dispatcher goes on
        after: list[str] = []
        attempts = 0
        deadline = time.monotonic() + 15
        while len(after) < 6 and time.monotonic() < deadline:
            attempts += 1
            if not after:
                status, body, _ = _post(api, "/api/v1/tasks", {"command": f"echo a0 >> {side}"})
                new = [body["id"]] if status == 201 else []
            else:
                tasks = [{"command": f"echo a{i} >> {side}"} for i in range(1, 6)]
                status, body, _ = _post(api, "/api/v1/tasks/batch", {"tasks": tasks})
                new = body["ids"] if status == 201 else []
            after += new
            if not new:
                time.sleep(0.5)
        assert len(after) == 6, f"submits still refused after space returned: {status} {body}"
        acked = [*before, *in_flight, *during, *after]
        wait_for(
            lambda: (
                {t["status"] for t in _tasks(api, acked).values()} <= TERMINAL
                and len(_tasks(api, acked)) == len(acked)
            ),
            timeout=45,
            what="every acknowledged task to end",
        )
        final = _tasks(api, acked)
        assert dispatcher.poll() is None, "the dispatcher was restarted or died"
        not_completed = {t: b["status"] for t, b in final.items() if b["status"] != "completed"}
        assert not not_completed, not_completed
        for i, task_id in enumerate(in_flight):  # results kept: output and side effect there
            assert final[task_id]["stdout"] == f"s{i}\n", final[task_id]
        marks = side.read_text().split()
        ran = {m: marks.count(m) for m in (f"s{i}" for i in range(4))}
        assert all(n >= 1 for n in ran.values()), ran
        worker_ran = sum(
            f"task {t} attempt" in line
            for line in worker_log.read_text().splitlines()
            for t in in_flight[:2]
        )
        assert procs.stop(dispatcher) == 0
        logged = dispatcher_log.read_text()
        paused, retried = logged.count("scheduling paused"), logged.count("not saved; retrying")
        db = data / "octaskly.db"
        integrity = _integrity(db)
        assert integrity == "ok", integrity
        audit = run(
            ["audit", "verify", "--data-dir", str(data), "--secret-key", SECRET], cwd=tmp_path
        )
        assert audit.returncode == 0, audit.stdout + audit.stderr
        stored = _db_ids(db)
        lost = set(acked) - stored
        assert not lost, f"{len(lost)} acknowledged tasks lost"
    print(
        f"\ndisk full ({full_seconds:.1f} s, 8 MiB tmpfs): acknowledged before {len(before)} + "
        f"in flight {len(in_flight)} / during {len(during)} (WAL room) / after {len(after)}; "
        f"found {len(set(acked) & stored)} / lost {len(lost)}; refused with 507: "
        f"{refusals['single']} single, {refusals['batch']} batch; messages {sorted(messages)}\n"
        f"  /health while full: {health_status} {health}; reads {reads}\n"
        f"  the 2 tasks that finished while full: {during_status} then "
        f"{[final[t]['status'] for t in in_flight[:2]]} (worker log lines {worker_ran}); "
        f"runs per slow task {ran}; first submits after space returned: {attempts} "
        f"request(s); integrity_check {integrity}\n  audit log: {audit.stdout.strip()}\n"
        f"  dispatcher log: scheduling paused {paused}x, results kept for a retry {retried}x"
    )


def test_a_worker_lost_while_the_disk_is_full_has_its_task_requeued_when_space_returns(
    tmp_path: Path,
) -> None:
    """The dispatcher cannot write the re-queue of a lost worker's task while the disk is
    full: it keeps trying, and once space returns the task runs again — no restart, not
    left `running` forever."""
    with tmpfs(tmp_path / "mnt", "8m") as mount_point, procs.processes() as ps:
        data, filler = mount_point / "data", mount_point / "filler"
        api, addr, args = _dispatcher(
            data, "--connection-timeout", "2", "--keepalive-interval", "0.5"
        )
        dispatcher_log = tmp_path / "dispatcher.log"
        ps.append(start(args, cwd=tmp_path, log=dispatcher_log))
        wait_healthy(api, ps[0], data_dir=data)
        ps.append(start(_worker(tmp_path, addr, 1), cwd=tmp_path))
        wait_for(lambda: http("GET", f"{api}/api/v1/workers")[1]["total"] == 1, what="worker")
        status, body = http("POST", f"{api}/api/v1/tasks", {"command": "sleep 1000"})
        assert status == 201, body
        task_id = body["id"]
        wait_for(
            lambda: http("GET", f"{api}/api/v1/tasks/{task_id}")[1]["status"] == "running",
            what="the task running",
        )
        fill(filler)
        ps[1].kill()  # the worker is lost while nothing can be written
        wait_for(
            lambda: "cannot re-queue lost tasks yet" in dispatcher_log.read_text(),
            what="the dispatcher to notice it cannot write the re-queue",
        )
        still = http("GET", f"{api}/api/v1/tasks/{task_id}")[1]["status"]
        filler.unlink()
        wait_for(
            lambda: http("GET", f"{api}/api/v1/tasks/{task_id}")[1]["status"] == "queued",
            timeout=15,
            what="the task re-queued once space returned",
        )
        record = http("GET", f"{api}/api/v1/tasks/{task_id}")[1]
        assert ps[0].poll() is None, "the dispatcher died"
        assert _integrity(data / "octaskly.db") == "ok"
    print(
        f"\nworker lost on a full disk: task {still} while full, then {record['status']} "
        f"(attempts {record['attempts']}) once space returned, without a restart"
    )


# -- read-only ----------------------------------------------------------------------------------
def _make_database(tmp_path: Path, data: Path, *extra: str) -> tuple[list[str], list[str]]:
    """Start a dispatcher once, acknowledge 20 tasks, stop it; (its argv, the task ids)."""
    api, _, args = _dispatcher(data, *extra)
    with procs.processes() as ps:
        ps.append(start(args, cwd=tmp_path))
        wait_healthy(api, ps[0], data_dir=data)
        status, body = http(
            "POST", f"{api}/api/v1/tasks/batch", {"tasks": [{"command": "true"}] * 20}
        )
        assert status == 201, body
        assert procs.stop(ps[0]) == 0
    return args, body["ids"]


def test_read_only_database_file_stops_startup_with_a_clear_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    args, ids = _make_database(tmp_path, data)
    db = data / "octaskly.db"
    # root ignores mode bits; the immutable attribute makes the file read-only even for root
    subprocess.run(["chattr", "+i", str(db)], check=True)
    try:
        done, took = _refused_start(args, tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)
    message = done.stderr.strip()
    assert "read-only" in message and str(db) in message, message
    assert _db_ids(db) == set(ids) and _integrity(db) == "ok"
    print(f"\nchattr +i {db.name}: exit {done.returncode} after {took:.2f} s: {message}")


def test_read_only_mount_stops_startup_with_a_clear_message(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "4m") as mount_point:
        data = mount_point / "data"
        args, ids = _make_database(tmp_path, data)
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        # the whole data dir read-only (a volume mounted ro) ...
        whole, took_whole = _refused_start(args, tmp_path)
        assert "read-only" in whole.stderr and str(data) in whole.stderr, whole.stderr
        # ... and only the database on it (data dir elsewhere, writable)
        db = data / "octaskly.db"
        _, _, db_only = _dispatcher(tmp_path / "other", "--db-path", str(db))
        only, took_only = _refused_start(db_only, tmp_path)
        assert "read-only" in only.stderr and str(db) in only.stderr, only.stderr
        assert _db_ids(db, immutable=True) == set(ids)
    print(
        f"\nread-only mount, data dir on it: exit {whole.returncode} after {took_whole:.2f} s: "
        f"{whole.stderr.strip()}\nread-only mount, database on it: exit {only.returncode} "
        f"after {took_only:.2f} s: {only.stderr.strip()}"
    )


# -- corrupt ------------------------------------------------------------------------------------
def test_corrupted_database_refuses_to_start_and_its_restore_command_works(
    tmp_path: Path,
) -> None:
    data, backups = tmp_path / "data", tmp_path / "backups"
    api, _, args = _dispatcher(data)
    with procs.processes() as ps:
        ps.append(start(args, cwd=tmp_path))
        wait_healthy(api, ps[0], data_dir=data)
        saved: list[str] = []
        for _ in range(5):  # 200 queued tasks (no worker), 2 KB each: many pages
            status, body = http(
                "POST", f"{api}/api/v1/tasks/batch", {"tasks": [{"command": BIG[:2000]}] * 40}
            )
            assert status == 201, body
            saved += body["ids"]
        backup = backups / "octaskly-backup.db"
        done = run(["backup", "--output", str(backup), "--data-dir", str(data)], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        status, body = http(
            "POST", f"{api}/api/v1/tasks/batch", {"tasks": [{"command": "true"}] * 50}
        )
        assert status == 201, body
        later = body["ids"]  # acknowledged after the backup: restoring it loses these
        assert procs.stop(ps[0]) == 0
    db = data / "octaskly.db"
    assert _db_ids(db) == {*saved, *later}
    size = db.stat().st_size
    with db.open("r+b") as file:  # keep the header and schema pages, ruin the rest
        file.seek(8192)
        file.write(random.Random(7).randbytes(size // 2))

    corrupt = db.read_bytes()
    refused, took = _refused_start(args, tmp_path)
    message = refused.stderr.strip()
    assert "corrupt" in message and str(db) in message, message
    assert len(message.splitlines()) <= 5, f"an unreadable message:\n{message}"
    commands = re.findall(r"`(octaskly restore [^`]*)`", message)
    assert commands, f"no `octaskly restore …` command in: {message}"
    # the command as printed, FILE replaced by the backup, run from elsewhere
    argv = [backup.as_posix() if a == "FILE" else a for a in shlex.split(commands[0])[1:]]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = procs.clean_env(HOME=str(elsewhere))
    restored = run(argv, cwd=elsewhere, env=env)
    assert restored.returncode == 0, restored.stderr
    assert _integrity(db) == "ok" and _db_ids(db) == set(saved)
    (kept,) = data.glob("octaskly.db.before-restore-*[0-9]")  # the damaged file, kept as is
    assert kept.read_bytes() == corrupt
    with procs.processes() as ps:
        ps.append(start(args, cwd=tmp_path))
        wait_healthy(api, ps[0], data_dir=data)
        total = http("GET", f"{api}/api/v1/tasks?limit=1")[1]["total"]
        listed = {
            t["id"]
            for offset in range(0, len(saved), 100)
            for t in http("GET", f"{api}/api/v1/tasks?limit=100&offset={offset}")[1]["tasks"]
        }
        assert total == len(saved) and listed == set(saved), (total, len(listed))
        assert procs.stop(ps[0]) == 0
    print(
        f"\ncorrupted database: exit {refused.returncode} after {took:.2f} s: {message}\n"
        f"ran `{shlex.join(['octaskly', *argv])}`: {restored.stdout.strip()}\n"
        f"restarted with {total} tasks (the backup's {len(saved)}; {len(later)} acknowledged "
        "after the backup are gone with the corrupt file, as expected)"
    )
