"""`octaskly backup` and `octaskly restore` against a real dispatcher: a consistent copy
while tasks pour in, restores that check before they touch anything, and one dispatcher
per data dir."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from tests.e2e import procs
from tests.e2e.procs import SECRET, free_port, http, run, start, wait_for, wait_healthy


def _dispatcher(tmp_path: Path, data: Path) -> tuple[str, list[str]]:
    port, api_port = free_port(), free_port()
    flags = ["--port", str(port), "--api-port", str(api_port), "--bind", "127.0.0.1"]
    flags += ["--data-dir", str(data), "--secret-key", SECRET]
    return f"http://127.0.0.1:{api_port}", ["dispatcher", *flags]


def _ids(db: Path) -> set[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {row[0] for row in conn.execute("SELECT id FROM tasks")}


def test_backup_while_submitting_then_restore(tmp_path: Path) -> None:
    data = tmp_path / "data"
    api, args = _dispatcher(tmp_path, data)
    acked: list[str] = []
    with procs.processes() as ps:
        ps.append(start(args, cwd=tmp_path))
        wait_healthy(api, ps[0], data_dir=data)

        def submit() -> None:  # 1,000 tasks, 20 per request, no worker: they stay queued
            for _ in range(50):
                status, body = http(
                    "POST", f"{api}/api/v1/tasks/batch", {"tasks": [{"command": "true"}] * 20}
                )
                assert status == 201
                acked.extend(body["ids"])

        writer = threading.Thread(target=submit)
        writer.start()
        wait_for(lambda: len(acked) >= 300, what="300 acknowledged tasks")
        before = set(acked)
        backup = tmp_path / "backups" / "octaskly.db"
        done = run(["backup", "--output", str(backup), "--data-dir", str(data)], cwd=tmp_path)
        writer.join(60)
        assert done.returncode == 0, done.stderr
        assert "tasks" in done.stdout
        assert backup.stat().st_mode & 0o777 == 0o600
        saved = _ids(backup)
        assert before <= saved, f"{len(before - saved)} acknowledged tasks missing"
        assert len(acked) == 1000
        again = run(["backup", "--output", str(backup), "--data-dir", str(data)], cwd=tmp_path)
        assert again.returncode == 2 and "exists" in again.stderr
        # a running dispatcher: restore refuses, and a second dispatcher cannot start
        busy = run(["restore", str(backup), "--data-dir", str(data)], cwd=tmp_path)
        assert busy.returncode == 2 and "running" in busy.stderr
        second = run(args, cwd=tmp_path)
        assert second.returncode == 2 and "another dispatcher" in second.stderr
        assert procs.stop(ps[0]) == 0
    restored = run(["restore", str(backup), "--data-dir", str(data)], cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert "kept as" in restored.stdout
    assert _ids(data / "octaskly.db") == saved
    kept = [p for p in data.iterdir() if ".before-restore-" in p.name]
    assert len(kept) == 1 and _ids(kept[0]) == set(acked)
    with procs.processes() as ps:
        ps.append(start(args, cwd=tmp_path))
        wait_healthy(api, ps[0], data_dir=data)
        assert http("GET", f"{api}/api/v1/tasks?limit=1")[1]["total"] == len(saved)


def test_restore_refuses_a_damaged_or_foreign_file_and_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    api, args = _dispatcher(tmp_path, data)
    with procs.processes() as ps:
        ps.append(start(args, cwd=tmp_path))
        wait_healthy(api, ps[0], data_dir=data)
        assert http("POST", f"{api}/api/v1/tasks", {"command": "true"})[0] == 201
        assert procs.stop(ps[0]) == 0
    live = _ids(data / "octaskly.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE other (x)")
    for bad, reason in ((garbage, "SQLite"), (foreign, "not an octaskly database"),
                        (tmp_path / "missing.db", "no such file")):  # fmt: skip
        done = run(["restore", str(bad), "--data-dir", str(data)], cwd=tmp_path)
        assert done.returncode == 1 and reason in done.stderr, done.stderr
    assert _ids(data / "octaskly.db") == live
    assert not [p for p in data.iterdir() if ".before-restore-" in p.name]


def test_backup_over_the_api_with_only_the_cluster_key(tmp_path: Path) -> None:
    """What a Kubernetes backup CronJob does: no access to the data dir, only the key —
    `octaskly backup --api-url` signs a short admin token and streams a checked copy."""
    data = tmp_path / "data"
    api, args = _dispatcher(tmp_path, data)
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    key_file.chmod(0o600)
    with procs.processes() as ps:
        ps.append(start(args, cwd=tmp_path))
        wait_healthy(api, ps[0], data_dir=data)
        status, body = http(
            "POST", f"{api}/api/v1/tasks/batch", {"tasks": [{"command": "true"}] * 30}
        )
        assert status == 201
        out = tmp_path / "remote" / "octaskly-1.db"
        env = procs.clean_env(HOME=str(tmp_path))  # no token file anywhere
        done = run(
            ["backup", "--api-url", api, "--output", str(out), "--secret-key-file", str(key_file)],
            cwd=tmp_path,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "30 tasks" in done.stdout
        assert out.stat().st_mode & 0o777 == 0o600
        assert _ids(out) == set(body["ids"])
        assert "backup_downloaded" in (data / "logs" / "audit.log").read_text()
        # hostile: a client token may not take backups; a wrong key is refused; no leftovers
        client_token = http(
            "POST", f"{api}/api/v1/tokens", {"role": "client", "subject": "someone"}
        )[1]["token"]
        denied = run(
            [
                "backup",
                "--api-url",
                api,
                "--output",
                str(tmp_path / "x.db"),
                "--token",
                client_token,
            ],
            cwd=tmp_path,
            env=env,
        )
        assert denied.returncode == 1 and "HTTP 403" in denied.stderr
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-cluster-key-at-all\n")
        refused = run(
            [
                "backup",
                "--api-url",
                api,
                "--output",
                str(tmp_path / "y.db"),
                "--secret-key-file",
                str(wrong),
            ],
            cwd=tmp_path,
            env=env,
        )
        assert refused.returncode == 1 and "HTTP 401" in refused.stderr
        assert not list(tmp_path.glob("*.db")) and not list(tmp_path.glob(".*partial"))
        again = run(
            ["backup", "--api-url", api, "--output", str(out), "--secret-key-file", str(key_file)],
            cwd=tmp_path,
            env=env,
        )
        assert again.returncode == 2 and "exists" in again.stderr
