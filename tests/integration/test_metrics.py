"""`GET /metrics`: after known work, the scrape parses with prometheus-client's own
parser and its counters equal what happened (real dispatcher, worker and sockets)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import running_cluster


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_counters_equal_what_happened(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as cluster:
        await cluster.add_worker("w1", max_jobs=2)
        done = [await cluster.submit(command="true") for _ in range(3)]
        failed = [await cluster.submit(command="exit 3") for _ in range(2)]
        for task_id in done:
            await cluster.wait_status(task_id, "completed")
        for task_id in failed:
            await cluster.wait_status(task_id, "failed")
        running = await cluster.submit(command="sleep 30")
        await cluster.wait_status(running, "running")
        blocker = await cluster.submit(command="sleep 30")
        await cluster.wait_status(blocker, "running")
        queued = await cluster.submit(command="true")  # both slots are busy
        status, record = await cluster.api("GET", f"/api/v1/tasks/{queued}")
        assert record["status"] == "queued"
        for task_id in (queued, running):  # (the queued one first: nothing frees its slot)
            status, _ = await cluster.api("DELETE", f"/api/v1/tasks/{task_id}")
            assert status == 200
        await cluster.api("GET", "/api/v1/tasks/no-such-task")  # a 400: not a task id
        async with cluster.http.get(cluster.base_url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
            text = await resp.text()
        s = _samples(text)
        print({k: v for k, v in s.items() if k[0].startswith("octaskly_tasks")})
        assert value(s, "octaskly_tasks_submitted_total") == 8
        assert value(s, "octaskly_tasks_finished_total", status="completed") == 3
        assert value(s, "octaskly_tasks_finished_total", status="failed") == 2
        assert value(s, "octaskly_tasks_finished_total", status="cancelled") == 2
        assert value(s, "octaskly_task_duration_seconds_count", status="completed") == 3
        assert value(s, "octaskly_task_queue_wait_seconds_count") == 7  # 7 were assigned
        assert value(s, "octaskly_scheduler_assignments_total") == 7
        assert value(s, "octaskly_tasks", status="completed") == 3
        assert value(s, "octaskly_tasks", status="cancelled") == 2
        assert value(s, "octaskly_tasks", status="running") == 1  # the blocker
        assert value(s, "octaskly_tasks_running") == 1
        assert value(s, "octaskly_queue_depth", priority="normal") == 0
        assert value(s, "octaskly_workers", state="busy") == 1
        assert value(s, "octaskly_workers", state="idle") == 0
        created = value(
            s, "octaskly_api_request_duration_seconds_count",
            route="/api/v1/tasks", method="POST", status="201",
        )  # fmt: skip
        assert created == 8
        assert value(
            s, "octaskly_api_request_duration_seconds_count",
            route="/api/v1/tasks/{task_id}", method="GET", status="400",
        ) == 1  # fmt: skip
        assert value(s, "octaskly_db_commit_duration_seconds_count") > 0
        assert value(s, "octaskly_ha_role", role="primary") == 1
        assert value(s, "octaskly_ha_term") == 1
        assert value(s, "octaskly_replication_degraded") == 0
        assert value(s, "process_resident_memory_bytes") > 0
        # (no token needed, like /health) and the scrape itself is measured next time
        async with cluster.http.get(cluster.base_url + "/metrics") as resp:
            again = _samples(await resp.text())
        assert value(
            again, "octaskly_api_request_duration_seconds_count",
            route="/metrics", method="GET", status="200",
        ) == 1  # fmt: skip


async def test_metrics_need_no_token_but_reveal_no_task_data(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, require_auth=True) as cluster:
        async with cluster.http.get(cluster.base_url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert "octaskly_tasks_submitted_total" in text
        assert "command" not in text
        async with cluster.http.post(cluster.base_url + "/metrics") as resp:
            assert resp.status == 405


async def test_the_grafana_dashboard_uses_only_exported_metrics(tmp_path: Path) -> None:
    """docs/grafana/octaskly-dashboard.json (imported by nobody here): every metric its
    queries name is one the dispatcher exports, every panel has a query and a datasource."""
    import json
    import re

    dashboard = json.loads(
        (Path(__file__).resolve().parents[2] / "docs/grafana/octaskly-dashboard.json").read_text()
    )
    async with running_cluster(tmp_path) as cluster:
        await cluster.add_worker("w1")
        await cluster.wait_status(await cluster.submit(command="true"), "completed")
        async with cluster.http.get(cluster.base_url + "/metrics") as resp:
            exported = {s[0] for s in _samples(await resp.text())}
    ids = set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        assert panel["datasource"]["type"] == "prometheus" and panel["targets"]
        for target in panel["targets"]:
            names = re.findall(r"\b((?:octaskly|process)_[a-z_]+)", target["expr"])
            assert names, target["expr"]
            for name in names:
                assert name in exported, f"panel {panel['title']!r}: {name} is not exported"
