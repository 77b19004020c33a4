"""The REST contract of SPEC.md against a real dispatcher on a free port, with hostile input."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from octaskly.domain import models
from tests import pg
from tests.cluster import Cluster, running_cluster


@pytest.fixture
async def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with running_cluster(tmp_path, task_queue_size=50) as c:
        yield c


async def test_submit_answer_and_headers(cluster: Cluster) -> None:
    async with cluster.http.post(
        f"{cluster.base_url}/api/v1/tasks", json={"command": "echo hi", "priority": "high"}
    ) as resp:
        assert resp.status == 201
        body = await resp.json()
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["X-Request-ID"]
        assert float(resp.headers["X-Response-Time-ms"]) >= 0
    assert body["status"] == "queued" and body["command"] == "echo hi"
    assert body["created_at"].endswith("Z") and len(body["id"]) == 36
    record = await cluster.task(body["id"])
    assert record["priority"] == "high" and record["timeout"] == 3600


async def test_request_id_is_echoed(cluster: Cluster) -> None:
    async with cluster.http.get(
        f"{cluster.base_url}/health", headers={"X-Request-ID": "abc-123"}
    ) as resp:
        assert resp.headers["X-Request-ID"] == "abc-123"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "command"),
        ({"command": ""}, "command"),
        ({"command": "   "}, "command"),
        ({"command": "x" * (64 * 1024 + 1)}, "command"),
        ({"command": 42}, "command"),
        ({"command": "a\u0000b"}, "command"),
        ({"command": "true", "timeout": 0}, "timeout"),
        ({"command": "true", "timeout": 86401}, "timeout"),
        ({"command": "true", "timeout": "soon"}, "timeout"),
        ({"command": "true", "priority": "urgent"}, "priority"),
        ({"command": "true", "retry_count": 11}, "retry_count"),
        ({"command": "true", "retry_count": -1}, "retry_count"),
        ({"command": "true", "memory_limit_mb": 1}, "memory_limit_mb"),
        ({"command": "true", "disk_limit_mb": 5}, "disk_limit_mb"),
        ({"command": "true", "sandbox_level": "paranoid"}, "sandbox_level"),
        ({"command": "true", "env": {"1BAD": "x"}}, "env"),
        ({"command": "true", "env": {"OK": 5}}, "env.OK"),
        ({"command": "true", "requirements": {"cpu_cores": -1}}, "requirements.cpu_cores"),
        ({"command": "true", "requirements": {"gpus": 1}}, "requirements.gpus"),
        ({"command": "true", "colour": "blue"}, "colour"),
        ({"command": "true", "inputs": "not-a-list"}, "inputs"),
    ],
)
async def test_bad_task_is_400_naming_the_field(cluster: Cluster, body: Any, field: str) -> None:
    status, answer = await cluster.api("POST", "/api/v1/tasks", json=body)
    assert status == 400, answer
    assert answer["field"] == field
    assert answer["status"] == 400 and answer["timestamp"]
    assert (await cluster.dispatcher.store.count_by_status())[models.TaskStatus.QUEUED] == 0


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"null", b"[1,2]", b'"command"', b"\xff\xfe", b'{"command": "x"} trailing']
)
async def test_malformed_bodies(cluster: Cluster, raw: bytes) -> None:
    status, answer = await cluster.api(
        "POST", "/api/v1/tasks", data=raw, headers={"Content-Type": "application/json"}
    )
    assert status == 400 and "error" in answer


async def test_huge_body_is_413(cluster: Cluster) -> None:
    status, answer = await cluster.api("POST", "/api/v1/tasks", data=io.BytesIO(b"x" * (65 << 20)))
    assert status == 413 and answer["status"] == 413


async def test_batch_is_all_or_nothing(cluster: Cluster) -> None:
    tasks = [{"command": "true"}, {"command": ""}, {"command": "true"}]
    status, answer = await cluster.api("POST", "/api/v1/tasks/batch", json={"tasks": tasks})
    assert status == 400 and answer["field"] == "tasks[1].command"
    _, page = await cluster.api("GET", "/api/v1/tasks")
    assert page["total"] == 0
    for bad in ({}, {"tasks": []}, {"tasks": "x"}, {"tasks": [], "extra": 1}, [1]):
        status, _ = await cluster.api("POST", "/api/v1/tasks/batch", json=bad)
        assert status == 400
    status, answer = await cluster.api(
        "POST", "/api/v1/tasks/batch", json={"tasks": [{"command": f"echo {i}"} for i in range(3)]}
    )
    assert status == 201 and len(answer["ids"]) == 3


async def test_list_filters_and_pagination(cluster: Cluster) -> None:
    ids = [await cluster.submit(command=f"echo {i}") for i in range(7)]
    await cluster.api("DELETE", f"/api/v1/tasks/{ids[0]}")
    _, page = await cluster.api("GET", "/api/v1/tasks?limit=3&offset=2")
    assert (page["total"], page["returned"], page["limit"], page["offset"]) == (7, 3, 3, 2)
    assert [t["id"] for t in page["tasks"]] == list(reversed(ids))[2:5]  # newest first
    _, page = await cluster.api("GET", "/api/v1/tasks?status=cancelled")
    assert [t["id"] for t in page["tasks"]] == [ids[0]]
    _, page = await cluster.api("GET", "/api/v1/tasks?status=queued&limit=1000")
    assert page["total"] == 6
    _, page = await cluster.api("GET", "/api/v1/tasks?worker_id=nobody")
    assert page["total"] == 0


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("status=done", "status"),
        ("sort=asc", "sort"),
        ("worker_id=", "worker_id"),
    ],
)
async def test_bad_query_parameters(cluster: Cluster, query: str, field: str) -> None:
    status, answer = await cluster.api("GET", f"/api/v1/tasks?{query}")
    assert status == 400 and answer["field"] == field


async def test_idempotent_submit(cluster: Cluster) -> None:
    headers = {"Idempotency-Key": "order-42"}
    s1, first = await cluster.api(
        "POST", "/api/v1/tasks", json={"command": "echo once"}, headers=headers
    )
    s2, again = await cluster.api(
        "POST", "/api/v1/tasks", json={"command": "echo once"}, headers=headers
    )
    assert s1 == s2 == 201 and first["id"] == again["id"]
    _, page = await cluster.api("GET", "/api/v1/tasks")
    assert page["total"] == 1
    status, _ = await cluster.api(
        "POST", "/api/v1/tasks", json={"command": "x"}, headers={"Idempotency-Key": "k" * 300}
    )
    assert status == 400


async def test_backpressure_when_queue_full(cluster: Cluster) -> None:
    status, _ = await cluster.api(
        "POST", "/api/v1/tasks/batch", json={"tasks": [{"command": "true"}] * 50}
    )
    assert status == 201
    async with cluster.http.post(
        f"{cluster.base_url}/api/v1/tasks", json={"command": "one too many"}
    ) as resp:
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) >= 1
        assert "full" in (await resp.json())["error"]
    _, page = await cluster.api("GET", "/api/v1/tasks?status=queued")
    assert page["total"] == 50  # nothing already queued was affected


async def test_health_ready_stats_openapi(cluster: Cluster) -> None:
    status, health = await cluster.api("GET", "/health")
    assert status == 200 and health["status"] == "healthy" and "version" in health
    assert isinstance(health["uptime_seconds"], int)
    status, ready = await cluster.api("GET", "/ready")
    assert status == 200 and ready["role"] == "primary"
    status, stats = await cluster.api("GET", "/api/v1/stats")
    assert status == 200
    sections = {"workers", "tasks", "queue", "throughput", "system", "database", "ha"}
    if pg.STORE == "postgresql":  # a dispatcher on PostgreSQL is a member of a federation
        sections.add("federation")
    assert set(stats) == sections
    assert stats["ha"]["role"] == "primary" and stats["ha"]["degraded"] is None
    assert set(stats["tasks"]) == {
        "queued",
        "running",
        "completed",
        "failed",
        "cancelled",
        "timed_out",
    }
    assert set(stats["workers"]) == {"total", "active", "idle"}
    assert set(stats["system"]) == {"uptime_seconds", "memory_usage_mb", "cpu_usage_percent"}
    assert set(stats["database"]) == {"total_tasks", "disk_size_mb"}
    status, doc = await cluster.api("GET", "/api/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {
        "/api/v1/tasks",
        "/api/v1/tasks/batch",
        "/api/v1/tasks/{task_id}",
        "/api/v1/tasks/{task_id}/logs",
        "/api/v1/workers",
        "/api/v1/stats",
        "/health",
        "/ready",
    } <= set(doc["paths"])
    assert "command" in doc["components"]["schemas"]["TaskSpec"]["properties"]


async def test_unknown_route_and_method(cluster: Cluster) -> None:
    status, body = await cluster.api("GET", "/api/v1/nothing")
    assert status == 404 and body["status"] == 404
    status, body = await cluster.api("PUT", "/api/v1/tasks")
    assert status == 405 and body["status"] == 405


async def test_health_503_when_database_unusable(cluster: Cluster) -> None:
    await cluster.dispatcher.store.close()
    status, body = await cluster.api("GET", "/health")
    assert status == 503 and body["status"] == "unhealthy" and body["message"]
    status, _ = await cluster.api("GET", "/ready")
    assert status == 503


async def test_every_route_is_in_the_openapi_document(cluster: Cluster) -> None:
    status, doc = await cluster.api("GET", "/api/v1/openapi.json")
    assert status == 200
    served = {
        (route.resource.canonical, route.method.lower())
        for route in cluster.runner.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {
        (path, method)
        for path, ops in doc["paths"].items()
        for method in ops
        if method != "parameters"
    }
    assert served == documented


async def _post_trickled(port: int, body: bytes, chunk: int, every: float) -> bytes:
    """POST /api/v1/tasks over a raw socket, the body sent `chunk` bytes every `every` s;
    the whole answer (the server closes or answers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received: list[bytes] = []

    async def read_answer() -> None:  # until the JSON answer is complete, or EOF
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.append(chunk)
                if b"".join(received).endswith(b"}"):
                    return

    answer = asyncio.create_task(read_answer())
    writer.write(
        b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with contextlib.suppress(ConnectionError):  # cut off mid-body: the answer came first
        for i in range(0, len(body), chunk):
            if answer.done():
                break
            writer.write(body[i : i + chunk])
            await writer.drain()
            await asyncio.sleep(every)
    await answer
    writer.close()
    return b"".join(received)


async def test_a_trickled_body_is_cut_with_408_and_a_slow_but_steady_one_is_not(
    tmp_path: Path,
) -> None:
    """After connection_timeout (1 s here) a body must keep up 500 bytes/s."""
    async with running_cluster(tmp_path, connection_timeout=1.0) as c:
        port = int(c.base_url.rsplit(":", 1)[1])
        steady = json.dumps({"command": "echo " + "s" * 3000}).encode()  # 2 kB/s for 1.5 s
        answer = await _post_trickled(port, steady, 200, 0.1)
        assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
        trickle = json.dumps({"command": "echo " + "t" * 100}).encode()  # 1 byte/0.25 s
        answer = await _post_trickled(port, trickle, 1, 0.25)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"arrived too slowly" in answer
        status, page = await c.api("GET", "/api/v1/tasks")
        assert (status, page["total"]) == (200, 1)  # only the steady one was stored
