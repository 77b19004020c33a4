"""Task retention with real processes: a dispatcher started with `--task-retention-hours
0.0003` (about a second) and a worker run rounds of tasks that each print 20 KB. Finished
tasks must disappear (404, gone from the list) while a task that waits for a worker stays
queued, and the database (file plus WAL) must stop growing once freed pages are reused,
where without retention it grows by every round's output.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.e2e.procs import SECRET, free_port, http, processes, start, wait_for, wait_healthy

RETENTION_HOURS = 0.0003  # 1.08 s
ROUNDS = 8
PER_ROUND = 150
OUTPUT = 20_000
COMMAND = f"head -c {OUTPUT} /dev/zero | tr '\\0' x"


def _db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


def _total(api: str, status: str | None = None) -> int:
    query = f"?status={status}&limit=1" if status else "?limit=1"
    code, body = http("GET", f"{api}/api/v1/tasks{query}")
    assert code == 200, body
    return int(body["total"])


def test_finished_tasks_disappear_and_the_database_stops_growing(tmp_path: Path) -> None:
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    db = tmp_path / "q.db"
    dispatcher = [
        "dispatcher",
        *("--port", str(port), "--api-port", str(api_port), "--bind", "127.0.0.1"),
        *("--db-path", str(db), "--secret-key", SECRET),
        *("--task-retention-hours", str(RETENTION_HOURS)),
    ]
    worker = [
        "worker",
        *("--dispatcher-addr", f"127.0.0.1:{port}", "--name", "w1"),
        *("--secret-key", SECRET, "--max-jobs", "8"),
    ]
    with processes() as ps:
        ps.append(start(dispatcher, cwd=tmp_path, log=tmp_path / "dispatcher.log"))
        wait_healthy(api, ps[0], data_dir=tmp_path)
        ps.append(start(worker, cwd=tmp_path, log=tmp_path / "worker.log"))
        wait_for(lambda: http("GET", f"{api}/api/v1/workers")[1]["total"] == 1, what="worker")
        code, waiting = http(
            "POST",
            f"{api}/api/v1/tasks",
            {"command": "true", "requirements": {"labels": {"zone": "mars"}}},
        )
        assert code == 201
        first_round: list[str] = []
        peaks, settled = [], []
        started = time.monotonic()
        for round_ in range(ROUNDS):
            code, body = http(
                "POST", f"{api}/api/v1/tasks/batch", {"tasks": [{"command": COMMAND}] * PER_ROUND}
            )
            assert code == 201, body
            if round_ == 0:
                first_round = body["ids"]
            wait_for(
                lambda: _total(api, "queued") == 1 and _total(api, "running") == 0,
                timeout=60,
                what=f"round {round_} to run",
            )
            peaks.append(_db_bytes(db))
            wait_for(lambda: _total(api) == 1, timeout=15, what=f"round {round_} to be pruned")
            settled.append(_db_bytes(db))
        elapsed = time.monotonic() - started
        gone = sum(http("GET", f"{api}/api/v1/tasks/{t}")[0] == 404 for t in first_round)
        code, still = http("GET", f"{api}/api/v1/tasks/{waiting['id']}")
        log = (tmp_path / "dispatcher.log").read_text()
    mib = [round(s / 2**20, 2) for s in settled]
    print(
        f"{ROUNDS} rounds x {PER_ROUND} tasks x {OUTPUT // 1000} KB in {elapsed:.1f}s; "
        f"DB+WAL after each round (MiB): {mib}; peak {max(peaks) / 2**20:.2f} MiB; "
        f"first round 404: {gone}/{len(first_round)}; waiting task {still.get('status')}"
    )
    assert gone == len(first_round)
    assert code == 200 and still["status"] == "queued"
    assert "retention: deleted" in log
    one_round = PER_ROUND * OUTPUT  # 3 MB of output a round; without pruning, all of it stays
    assert settled[-1] - settled[2] < one_round / 2, mib
