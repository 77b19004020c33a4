"""What the web dashboard relies on, over HTTP against a real dispatcher with
authentication on: its files (public, strict headers, cached by ETag, nothing else
reachable under /ui), `GET /api/v1/whoami` for every role and for hostile requests, and
the queue-by-priority and throughput figures in the stats it reads once a second."""

from __future__ import annotations

import asyncio
import importlib.resources
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, running_cluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path, require_auth=True) as c:
        yield c


async def bearer(c: Cluster, role: str, subject: str) -> dict[str, str]:
    value, _ = await c.dispatcher.tokens.issue(subject=subject, role=role, ttl=600)
    return {"Authorization": f"Bearer {value}"}


async def test_the_files_need_no_token_and_carry_a_strict_policy(cluster: Cluster) -> None:
    shipped = importlib.resources.files("octaskly") / "ui"
    async with cluster.http.get(f"{cluster.base_url}/ui", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (302, "/ui/")
    for path, kind, name in [
        ("/ui/", "text/html", "index.html"),
        ("/ui/app.js", "text/javascript", "app.js"),
        ("/ui/app.css", "text/css", "app.css"),
        ("/ui/icon.svg", "image/svg+xml", "icon.svg"),
    ]:
        async with cluster.http.get(f"{cluster.base_url}{path}") as resp:
            assert resp.status == 200, path
            assert resp.content_type == kind
            assert await resp.read() == (shipped / name).read_bytes()
            policy = resp.headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "script-src 'self'" in policy
            assert "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            etag = resp.headers["ETag"]
        async with cluster.http.get(
            f"{cluster.base_url}{path}", headers={"If-None-Match": etag}
        ) as resp:
            assert resp.status == 304 and not await resp.read()


@pytest.mark.parametrize(
    "path",
    [
        "/ui/index.htm",
        "/ui/app.js.map",
        "/ui/__init__.py",
        "/ui/sub/app.js",
        "/ui/./app.js",
        "/ui/../api/v1/tasks",
        "/ui/%2e%2e/api/v1/tasks",
        "/ui/..%2Fapi/v1/tasks",
        "/ui/%2e%2e%2fapi%2fv1%2ftasks",
        "/ui//../api/v1/stats",
        "/ui/..%2F..%2Fpyproject.toml",
        "/ui/" + "a" * 5000,
    ],
)
async def test_nothing_else_is_reachable_under_ui(cluster: Cluster, path: str) -> None:
    """Sent byte for byte (an HTTP client library would normalise the dots away): no
    token, and neither a file nor an API answer comes back."""
    status, _ = await cluster.api(
        "POST",
        "/api/v1/tasks",
        json={"command": "echo secret-task"},
        headers=await bearer(cluster, "admin", "a"),
    )
    assert status == 201
    host, port = cluster.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    status = int(answer.split(b" ", 2)[1])
    assert status in (401, 404), (path, answer[:200])
    assert b"secret-task" not in answer and b"[tool." not in answer


async def test_whoami_tells_each_role_what_it_may_do(cluster: Cluster) -> None:
    expected = {
        "admin": {"submit": True, "see_all_tasks": True, "see_cluster": True, "admin": True},
        "dispatcher": {"submit": True, "see_all_tasks": True, "see_cluster": True, "admin": False},
        "client": {"submit": True, "see_all_tasks": False, "see_cluster": False, "admin": False},
        "worker": {"submit": False, "see_all_tasks": False, "see_cluster": False, "admin": False},
    }
    for role, can in expected.items():
        status, body = await cluster.api(
            "GET", "/api/v1/whoami", headers=await bearer(cluster, role, f"{role}-1")
        )
        assert status == 200, body
        assert (body["subject"], body["role"], body["can"]) == (f"{role}-1", role, can)
        assert len(body["token_id"]) >= 16
    # what `can` says is what the API then does: a client is refused the cluster's stats
    status, _ = await cluster.api(
        "GET", "/api/v1/stats", headers=await bearer(cluster, "client", "c")
    )
    assert status == 403


@pytest.mark.parametrize(
    ("headers", "query", "status"),
    [
        ({}, "", 401),
        ({"Authorization": "Bearer "}, "", 401),
        ({"Authorization": "Bearer not.a.jwt"}, "", 401),
        ({"Authorization": "Basic YWRtaW46YWRtaW4="}, "", 401),
        ({"Authorization": "Bearer " + "x" * 8000}, "", 401),
        (None, "?verbose=1", 400),
    ],
)
async def test_whoami_with_hostile_requests(
    cluster: Cluster, headers: dict[str, str] | None, query: str, status: int
) -> None:
    headers = headers if headers is not None else await bearer(cluster, "admin", "a")
    got, body = await cluster.api("GET", f"/api/v1/whoami{query}", headers=headers)
    assert got == status, body
    assert body["status"] == status and body["error"]


async def test_stats_count_the_queue_by_priority_and_finished_runs(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as cluster:  # no worker yet: everything stays queued
        for priority, n in (("critical", 1), ("high", 2), ("low", 3)):
            for _ in range(n):
                await cluster.submit(command="true", priority=priority)
        status, stats = await cluster.api("GET", "/api/v1/stats")
        assert status == 200
        assert stats["queue"] == {"critical": 1, "high": 2, "normal": 0, "low": 3}
        assert list(stats["queue"]) == ["critical", "high", "normal", "low"]
        assert stats["throughput"] == {"finished_total": 0}
        await cluster.add_worker("w", max_jobs=4)
        failing = await cluster.submit(command="exit 3")
        await cluster.wait_status(failing, "failed")
        status, stats = await cluster.api("GET", "/api/v1/stats")
        assert sum(stats["queue"].values()) == stats["tasks"]["queued"]
        finished = sum(stats["tasks"][s] for s in ("completed", "failed"))
        assert stats["throughput"]["finished_total"] == finished
