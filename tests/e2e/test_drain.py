"""A worker stopped with SIGTERM drains: no new tasks, running ones finish within
`--drain-timeout`, what is left is handed back (re-queued, not counted as lost) — what a
Kubernetes scale-down relies on. Real processes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.e2e import procs
from tests.e2e.procs import SECRET, free_port, http, start, wait_for, wait_healthy


def _cluster(tmp_path: Path, ps: list) -> tuple[str, int]:  # type: ignore[type-arg]
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    data = tmp_path / "data"
    ps.append(
        start(
            ["dispatcher", "--port", str(port), "--api-port", str(api_port), "--bind",
             "127.0.0.1", "--data-dir", str(data), "--secret-key", SECRET],
            cwd=tmp_path,
        )
    )  # fmt: skip
    wait_healthy(api, ps[-1], data_dir=data)
    return api, port


def _worker(tmp_path: Path, port: int, name: str, drain: str) -> list[str]:
    return ["worker", "--name", name, "--dispatcher-addr", f"127.0.0.1:{port}", "--max-jobs",
            "2", "--transport", "tcp", "--drain-timeout", drain]  # fmt: skip


def _task(api: str, task_id: str) -> dict:  # type: ignore[type-arg]
    return http("GET", f"{api}/api/v1/tasks/{task_id}")[1]


def test_sigterm_lets_running_tasks_finish_and_takes_no_new_ones(tmp_path: Path) -> None:
    env = procs.clean_env(OCTASKLY_SECRET_KEY=SECRET)
    with procs.processes() as ps:
        api, port = _cluster(tmp_path, ps)
        worker = start(_worker(tmp_path, port, "leaving", "20"), cwd=tmp_path, env=env)
        ps.append(worker)
        wait_for(lambda: len(http("GET", f"{api}/api/v1/workers")[1]["workers"]) == 1)
        running = http("POST", f"{api}/api/v1/tasks", {"command": "sleep 2; echo finished"})[1]
        wait_for(lambda: _task(api, running["id"])["status"] == "running", what="running")
        worker.send_signal(signal.SIGTERM)
        wait_for(
            lambda: http("GET", f"{api}/api/v1/workers")[1]["workers"][0]["state"] == "draining",
            what="the worker draining",
        )
        later = http("POST", f"{api}/api/v1/tasks", {"command": "echo later"})[1]
        assert worker.wait(30) == 0
        done = _task(api, running["id"])
        print(
            f"drained: {done['status']} after {done['duration_ms']} ms, stdout {done['stdout']!r}"
        )
        assert done["status"] == "completed" and done["stdout"] == "finished\n"
        assert done["attempts"] == 1
        assert _task(api, later["id"])["status"] == "queued"  # never given to the draining one


def test_a_task_left_when_the_drain_time_is_up_is_handed_back_and_runs_elsewhere(
    tmp_path: Path,
) -> None:
    env = procs.clean_env(OCTASKLY_SECRET_KEY=SECRET)
    with procs.processes() as ps:
        api, port = _cluster(tmp_path, ps)
        worker = start(_worker(tmp_path, port, "short", "1"), cwd=tmp_path, env=env)
        ps.append(worker)
        wait_for(lambda: len(http("GET", f"{api}/api/v1/workers")[1]["workers"]) == 1)
        task = http("POST", f"{api}/api/v1/tasks", {"command": "sleep 1.5; echo $((6*7))"})[1]
        wait_for(lambda: _task(api, task["id"])["status"] == "running", what="running")
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        stopped = time.monotonic() - started
        record = _task(api, task["id"])
        assert record["status"] == "queued", record
        ps.append(start(_worker(tmp_path, port, "other", "0"), cwd=tmp_path, env=env))
        wait_for(lambda: _task(api, task["id"])["status"] == "completed", what="completion")
        record = _task(api, task["id"])
        print(f"handed back after {stopped:.1f}s; rerun on {record['worker_id']}")
        assert record["stdout"] == "42\n" and record["worker_id"] == "other"
        assert record["attempts"] == 2
        (log,) = tmp_path.glob("dispatcher-*.log")
        text = log.read_text()
        assert "handed them back (drained)" in text
        assert "running tasks lost" not in text  # handed back is not lost
