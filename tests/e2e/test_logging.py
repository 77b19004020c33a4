"""Structured logs across processes: the request id of an API call (X-Request-ID) travels
with the task to the worker and appears, as a field, in the worker's log line for it."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from tests.e2e import procs
from tests.e2e.procs import SECRET, TOKENS, free_port, http, start, wait_for, wait_healthy


def test_the_request_id_reaches_the_workers_log_line(tmp_path: Path) -> None:
    port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    data = tmp_path / "data"
    worker_log = tmp_path / "worker.log"
    env = procs.clean_env(OCTASKLY_SECRET_KEY=SECRET)
    with procs.processes() as ps:
        ps.append(
            start(
                ["dispatcher", "--port", str(port), "--api-port", str(api_port), "--bind",
                 "127.0.0.1", "--data-dir", str(data)],
                cwd=tmp_path, env=env,
            )
        )  # fmt: skip
        wait_healthy(api, ps[0], data_dir=data)
        ps.append(
            start(
                ["worker", "--name", "logger", "--dispatcher-addr", f"127.0.0.1:{port}",
                 "--transport", "tcp"],
                cwd=tmp_path, env=env, log=worker_log,
            )
        )  # fmt: skip
        request = urllib.request.Request(
            f"{api}/api/v1/tasks",
            data=json.dumps({"command": "echo traced"}).encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {TOKENS[api]}",
                "X-Request-ID": "req-7f3a-trace",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.headers["X-Request-ID"] == "req-7f3a-trace"
            task = json.loads(resp.read())
        wait_for(
            lambda: http("GET", f"{api}/api/v1/tasks/{task['id']}")[1]["status"] == "completed",
            what="the task to complete",
        )

        def line_for_task() -> dict[str, object] | None:
            for raw in worker_log.read_text().splitlines():
                entry = json.loads(raw)  # one JSON object per line (not a terminal)
                if entry.get("task_id") == task["id"]:
                    return entry  # type: ignore[no-any-return]
            return None

        entry = wait_for(line_for_task, what="the worker's log line for the task")
    print(entry)
    assert entry["request_id"] == "req-7f3a-trace"
    assert entry["worker_id"] == "logger" and entry["attempt"] == 1
    assert "completed" in str(entry["message"])
