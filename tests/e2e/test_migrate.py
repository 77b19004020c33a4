"""`octaskly migrate --from sqlite:PATH --to postgresql://…` on a live installation, end to
end: real processes, a real SQLite file, a real PostgreSQL (tests/pg.py).

An SQLite dispatcher with a worker has finished tasks, a task still running, queued tasks,
an idempotency key, a client token and a revoked one, and an audit log. A migrate run
while clients keep submitting is refused (the copy is stale). Stopped, migrated: counts
and the audit chain verified; a dispatcher on PostgreSQL with the same data dir and port
then serves all of it — the running task re-attached by its worker (run once), the queued
ones run, the client token works, the revoked one does not, the key replays.
"""

from __future__ import annotations

import base64
import json
import signal
import sys
import threading
import time
from pathlib import Path

from tests.e2e import procs

EVERY_BYTE = (
    f"{sys.executable} -c 'import sys; sys.stdout.buffer.write(bytes(range(256))); "
    "sys.stderr.buffer.write(bytes(reversed(range(256))))'"
)


def _dispatcher_flags(tmp_path: Path) -> tuple[list[str], str, Path, Path]:
    port, api_port = procs.free_port(), procs.free_port()
    data, secret_file = tmp_path / "data", tmp_path / "secret.key"
    secret_file.write_text(procs.SECRET + "\n")
    secret_file.chmod(0o600)
    flags = [
        "dispatcher", "--port", str(port), "--api-port", str(api_port), "--bind", "127.0.0.1",
        "--data-dir", str(data), "--secret-key-file", str(secret_file),
        "--quic-enabled", "false", "--keepalive-interval", "1",
    ]  # fmt: skip
    return flags, f"http://127.0.0.1:{api_port}", data, secret_file


def test_migrate_a_live_installation_to_postgresql(tmp_path: Path, pg_url: str) -> None:
    flags, api, data, secret_file = _dispatcher_flags(tmp_path)
    port = flags[flags.index("--port") + 1]
    marks = tmp_path / "runs.txt"
    base_env = procs.clean_env()
    pg_env = procs.clean_env(OCTASKLY_DB_URL=pg_url)
    migrate = ["migrate", "--from", f"sqlite:{data / 'octaskly.db'}", "--data-dir", str(data),
               "--secret-key-file", str(secret_file)]  # fmt: skip
    with procs.processes() as ps:
        ps.append(procs.start(flags, cwd=tmp_path, env=base_env))
        procs.wait_healthy(api, ps[0], data_dir=data)
        ps.append(
            procs.start(
                ["worker", "--dispatcher-addr", f"127.0.0.1:{port}", "--name", "w1",
                 "--max-jobs", "1", "--transport", "tcp", "--secret-key-file", str(secret_file)],
                cwd=tmp_path,
            )
        )  # fmt: skip
        done = [procs.http("POST", f"{api}/api/v1/tasks", {"command": "echo done"})[1]["id"]
                for _ in range(3)]  # fmt: skip
        binary = procs.http("POST", f"{api}/api/v1/tasks", {"command": EVERY_BYTE})[1]["id"]
        done.append(binary)  # its output is every byte value: it must move exactly
        procs.wait_for(
            lambda: all(procs.http("GET", f"{api}/api/v1/tasks/{t}")[1]["status"] == "completed"
                        for t in done),
            what="3 finished tasks",
        )  # fmt: skip
        long_cmd = f'echo "$OCTASKLY_TASK_ID $OCTASKLY_ATTEMPT" >> {marks}; sleep 12; echo long'
        long_id = procs.http("POST", f"{api}/api/v1/tasks", {"command": long_cmd})[1]["id"]
        procs.wait_for(
            lambda: procs.http("GET", f"{api}/api/v1/tasks/{long_id}")[1]["status"] == "running",
            what="the long task running",
        )
        queued = [procs.http("POST", f"{api}/api/v1/tasks", {"command": f"echo q{i}"})[1]["id"]
                  for i in range(4)]  # fmt: skip
        status, keyed = procs.http(
            "POST", f"{api}/api/v1/tasks", {"command": "echo keyed"},
            extra_headers={"Idempotency-Key": "k-1"},
        )  # fmt: skip
        assert status == 201
        made = [
            json.loads(
                procs.run(
                    ["token", "create", "--role", "client", "--subject", who, "--ttl", "1h",
                     "--json", "--secret-key-file", str(secret_file)],
                    cwd=tmp_path,
                    env=procs.clean_env(OCTASKLY_API_URL=api),
                ).stdout
            )
            for who in ("carol", "mallory")
        ]  # fmt: skip
        revoke = procs.run(
            ["token", "revoke", made[1]["id"], "--data-dir", str(data)],
            cwd=tmp_path,
            env=procs.clean_env(OCTASKLY_API_URL=api),
        )
        assert revoke.returncode == 0, revoke.stderr

        # live: a client keeps submitting while migrate copies -> refused, says what to do
        stop = threading.Event()

        def keep_submitting() -> None:
            while not stop.is_set():
                procs.http("POST", f"{api}/api/v1/tasks", {"command": "true", "priority": "low"})
                time.sleep(0.01)

        feeder = threading.Thread(target=keep_submitting)
        feeder.start()
        try:
            live = procs.run(migrate, cwd=tmp_path, env=pg_env, timeout=120)
        finally:
            stop.set()
            feeder.join(10)
        print(f"\nmigrate under load: exit {live.returncode}: {live.stderr.strip()[-200:]}")
        assert live.returncode == 1 and "more transactions" in live.stderr, live.stderr
        refused = procs.run(migrate, cwd=tmp_path, env=pg_env)  # the target is not empty now
        assert refused.returncode != 0 and "--replace" in refused.stderr

        assert procs.stop(ps[0]) == 0  # stop the SQLite dispatcher (the worker keeps running)
        moved = procs.run([*migrate, "--replace"], cwd=tmp_path, env=pg_env, timeout=120)
        print(moved.stdout)
        assert moved.returncode == 0, moved.stderr
        assert "1 running tasks are queued there" in moved.stdout
        assert "tokens (1 revoked)" in moved.stdout and "audit chain" in moved.stdout
        assert pg_url.split("@")[0].split(":")[-1] not in moved.stdout + moved.stderr

        # the same data dir and port, now on PostgreSQL
        ps[0] = procs.start(flags, cwd=tmp_path, env=pg_env, log=tmp_path / "pg-dispatcher.log")
        procs.wait_healthy(api, ps[0], data_dir=data)
        everything = [*done, long_id, *queued, keyed["id"]]
        procs.wait_for(
            lambda: all(procs.http("GET", f"{api}/api/v1/tasks/{t}")[1]["status"] == "completed"
                        for t in everything),
            timeout=60,
            what="every migrated task completed",
        )  # fmt: skip
        moved_binary = procs.http("GET", f"{api}/api/v1/tasks/{binary}")[1]
        assert base64.b64decode(moved_binary["stdout_base64"]) == bytes(range(256))
        assert base64.b64decode(moved_binary["stderr_base64"]) == bytes(range(255, -1, -1))
        long_task = procs.http("GET", f"{api}/api/v1/tasks/{long_id}")[1]
        assert long_task["stdout"] == "long\n" and long_task["attempts"] == 1
        runs = marks.read_text().splitlines()
        assert runs == [f"{long_id} 1"], runs  # re-attached by its worker: ran once
        again_status, again = procs.http(
            "POST", f"{api}/api/v1/tasks", {"command": "echo keyed"},
            extra_headers={"Idempotency-Key": "k-1"},
        )  # fmt: skip
        assert again_status == 201 and again["id"] == keyed["id"]  # the same task, replayed
        carol, mallory = made[0]["token"], made[1]["token"]
        assert procs.http("GET", f"{api}/api/v1/tasks", token=carol)[0] == 200
        assert procs.http("GET", f"{api}/api/v1/tasks", token=mallory)[0] == 401
        print(
            f"on PostgreSQL: {len(everything)} tasks completed, the running one re-attached "
            f"(ran {len(runs)}x), key replayed, client token 200, revoked token 401"
        )
        ps[0].send_signal(signal.SIGTERM)


def test_migrate_refuses_bad_sources_and_a_tampered_audit_log(tmp_path: Path, pg_url: str) -> None:
    flags, api, data, secret_file = _dispatcher_flags(tmp_path)
    env = procs.clean_env(OCTASKLY_DB_URL=pg_url)
    base = ["migrate", "--data-dir", str(data), "--secret-key-file", str(secret_file)]
    for bad, expected in (
        (["--from", "/tmp/x.db"], "sqlite:PATH"),
        (["--from", "sqlite:"], "sqlite:PATH"),
        (["--from", f"sqlite:{tmp_path / 'none.db'}"], "no SQLite database"),
        (["--to", "mysql://x"], "postgresql://"),
    ):
        done = procs.run([*base, *bad], cwd=tmp_path, env=env)
        assert done.returncode != 0 and expected in done.stderr, (bad, done.stderr)
    with procs.processes() as ps:
        ps.append(procs.start(flags, cwd=tmp_path))
        procs.wait_healthy(api, ps[0], data_dir=data)
        assert procs.http("POST", f"{api}/api/v1/tasks", {"command": "true"})[0] == 201
        assert procs.stop(ps[0]) == 0
    log = data / "logs" / "audit.log"
    lines = log.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["actor"] = "someone-else"
    log.write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")
    tampered = procs.run(base, cwd=tmp_path, env=env)
    assert tampered.returncode != 0 and "does not verify" in tampered.stderr, tampered.stderr
    without = procs.run([*base, "--no-audit", "--replace"], cwd=tmp_path, env=env)
    assert without.returncode == 0, without.stderr
    assert "copied 1 tasks" in without.stdout and "audit chain" not in without.stdout
    print(f"\ntampered audit log: {tampered.stderr.strip()[-160:]}")
