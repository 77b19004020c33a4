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
