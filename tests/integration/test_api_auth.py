"""API authentication and authorisation with real tokens on a real dispatcher: who may do
what (SPEC's matrix), what a bad token gets (401) and a wrong role (403), that every
denial is audited and that a revocation survives a restart."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from octaskly.services import tokens
from tests.cluster import SECRET, Cluster, running_cluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path, require_auth=True) as c:
        yield c


async def token(c: Cluster, role: str, subject: str, ttl: float = 3600) -> str:
    value, _ = await c.dispatcher.tokens.issue(subject=subject, role=role, ttl=ttl)
    return value


async def call(
    c: Cluster, method: str, path: str, tok: str | None, **kwargs: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {tok}"} if tok is not None else {}
    return await c.api(method, path, headers=headers, **kwargs)


def audit(c: Cluster) -> list[dict[str, Any]]:
    path = c.tmp / "logs" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_public_endpoints_need_no_token(cluster: Cluster) -> None:
    for path in ("/health", "/ready"):
        assert (await call(cluster, "GET", path, None))[0] == 200


async def test_bad_tokens_are_401_audited_and_never_logged(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    now = time.time()
    forged, _ = tokens.sign(b"k" * 32, subject="eve", role="admin", ttl=3600, now=now)
    expired, _ = tokens.sign(
        tokens.signing_key(SECRET), subject="old", role="admin", ttl=60, now=now - 3600
    )
    revoked = await token(cluster, "admin", "gone")
    claims = tokens.decode(tokens.signing_key(SECRET), revoked, now=now)
    admin = await token(cluster, "admin", "root")
    status, body = await call(cluster, "DELETE", f"/api/v1/tokens/{claims.jti}", admin)
    assert (status, body["revoked"]) == (200, True)
    none_alg = jwt.encode({"sub": "x", "role": "admin", "iat": 1, "exp": 2**40, "jti": "j"},
                          key="", algorithm="none")  # fmt: skip
    cases = {
        None: "a token is required",
        "not-a-jwt": "malformed",
        forged: "signature is invalid",
        expired: "expired",
        revoked: "revoked",
        none_alg: "malformed",
    }
    for bad, reason in cases.items():
        status, body = await call(cluster, "GET", "/api/v1/tasks", bad)
        assert status == 401 and reason in body["error"], (bad, body)
    status, body = await cluster.api(
        "GET", "/api/v1/tasks", headers={"Authorization": f"Basic {admin}"}
    )
    assert status == 401
    failures = [e for e in audit(cluster) if e["event_type"] == "auth_failure"]
    assert len(failures) == len(cases) + 1
    assert all(e["source_ip"] == "127.0.0.1" and e["severity"] == "warning" for e in failures)
    everything = caplog.text + (cluster.tmp / "logs" / "audit.log").read_text()
    for secret in (admin, forged, expired, revoked):
        assert secret not in everything


async def test_client_sees_and_cancels_only_its_own_tasks(cluster: Cluster) -> None:
    alice, bob = await token(cluster, "client", "alice"), await token(cluster, "client", "bob")
    status, mine = await call(cluster, "POST", "/api/v1/tasks", alice, json={"command": "sleep 60"})
    assert status == 201
    status, theirs = await call(cluster, "POST", "/api/v1/tasks", bob, json={"command": "true"})
    assert status == 201
    status, page = await call(cluster, "GET", "/api/v1/tasks", alice)
    assert status == 200 and [t["id"] for t in page["tasks"]] == [mine["id"]]
    assert page["total"] == 1
    for method, path in (
        ("GET", f"/api/v1/tasks/{theirs['id']}"),
        ("GET", f"/api/v1/tasks/{theirs['id']}/logs"),
        ("DELETE", f"/api/v1/tasks/{theirs['id']}"),
    ):
        assert (await call(cluster, method, path, alice))[0] == 404, (method, path)
    assert (await call(cluster, "DELETE", f"/api/v1/tasks/{mine['id']}", alice))[0] == 200
    status, record = await call(cluster, "GET", f"/api/v1/tasks/{theirs['id']}", bob)
    assert status == 200 and record["owner"] == "bob" and record["status"] == "queued"
    for path in ("/api/v1/workers", "/api/v1/stats"):
        assert (await call(cluster, "GET", path, alice))[0] == 403
    status, _ = await call(cluster, "POST", "/api/v1/tokens", alice, json={"role": "admin"})
    assert status == 403


async def test_roles_follow_the_permission_matrix(cluster: Cluster) -> None:
    worker = await token(cluster, "worker", "w1")
    disp = await token(cluster, "dispatcher", "peer")
    admin = await token(cluster, "admin", "root")
    status, task = await call(cluster, "POST", "/api/v1/tasks", admin, json={"command": "true"})
    assert status == 201
    checks = [
        ("POST", "/api/v1/tasks", {"json": {"command": "true"}}, {worker: 403, disp: 201}),
        ("GET", "/api/v1/tasks", {}, {worker: 403, disp: 200}),
        ("GET", f"/api/v1/tasks/{task['id']}", {}, {worker: 403, disp: 200}),
        ("GET", "/api/v1/workers", {}, {worker: 403, disp: 200}),
        ("GET", "/api/v1/stats", {}, {worker: 403, disp: 200}),
        ("POST", "/api/v1/tokens", {"json": {"role": "client", "subject": "x"}},
         {worker: 403, disp: 403, admin: 201}),
    ]  # fmt: skip
    for method, path, kwargs, expected in checks:
        for tok, want in expected.items():
            status, body = await call(cluster, method, path, tok, **kwargs)
            assert status == want, (method, path, body)
    denied = [e for e in audit(cluster) if e["event_type"] == "access_denied"]
    assert {(e["actor"], e["details"]["status"]) for e in denied} == {("w1", 403), ("peer", 403)}
    assert len(denied) == 7


async def test_admin_issues_and_revokes_tokens_and_revocation_survives_restart(
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path, require_auth=True) as c:
        admin = await token(c, "admin", "root")
        status, issued = await call(
            c, "POST", "/api/v1/tokens", admin, json={"role": "client", "subject": "carol",
                                                      "ttl": "2h"}
        )  # fmt: skip
        assert status == 201 and issued["role"] == "client" and issued["subject"] == "carol"
        carol = issued["token"]
        assert (await call(c, "GET", "/api/v1/tasks", carol))[0] == 200
        status, _ = await call(c, "DELETE", f"/api/v1/tokens/{issued['id']}", admin)
        assert status == 200
        assert (await call(c, "GET", "/api/v1/tasks", carol))[0] == 401
        kinds = [e["event_type"] for e in audit(c)]
        assert "token_issued" in kinds and "token_revoked" in kinds
    async with running_cluster(tmp_path, require_auth=True) as again:
        assert (await call(again, "GET", "/api/v1/tasks", carol))[0] == 401
        assert (await call(again, "GET", "/api/v1/tasks", admin))[0] == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"role": "root", "subject": "x"}, "role"),
        ({"role": "client"}, "subject"),
        ({"role": "client", "subject": ""}, "subject"),
        ({"role": "client", "subject": "x", "ttl": 10}, "ttl"),
        ({"role": "client", "subject": "x", "ttl": 10**12}, "ttl"),
        ({"role": "client", "subject": "x", "ttl": "forever"}, "ttl"),
        ({"role": "client", "subject": "x", "ttl": True}, "ttl"),
        ({"role": "client", "subject": "x", "extra": 1}, "body"),
        (["role", "client"], "body"),
    ],
)
async def test_hostile_token_requests_are_400_naming_the_field(
    cluster: Cluster, body: Any, field: str
) -> None:
    admin = await token(cluster, "admin", "root")
    status, answer = await call(cluster, "POST", "/api/v1/tokens", admin, json=body)
    assert status == 400 and answer.get("field") == field, answer


async def test_revoking_a_bad_token_id_is_400(cluster: Cluster) -> None:
    admin = await token(cluster, "admin", "root")
    for bad in ("x" * 65, "semi;colon", "%00"):
        status, _ = await call(cluster, "DELETE", f"/api/v1/tokens/{bad}", admin)
        assert status in (400, 404)


async def test_audit_log_endpoint_is_admin_only_and_records_task_events(cluster: Cluster) -> None:
    admin = await token(cluster, "admin", "root")
    alice = await token(cluster, "client", "alice")
    status, task = await call(cluster, "POST", "/api/v1/tasks", alice, json={"command": "true"})
    assert status == 201
    assert (await call(cluster, "DELETE", f"/api/v1/tasks/{task['id']}", alice))[0] == 200
    assert (await call(cluster, "GET", "/api/v1/audit-logs", alice))[0] == 403
    status, page = await call(cluster, "GET", "/api/v1/audit-logs?limit=50", admin)
    assert status == 200 and page["enabled"] is True
    by_kind = {e["event_type"]: e for e in page["entries"]}
    assert by_kind["task_submitted"]["actor"] == "alice"
    assert by_kind["task_submitted"]["task_id"] == task["id"]
    assert by_kind["task_cancelled"]["source_ip"] == "127.0.0.1"
    assert by_kind["access_denied"]["actor"] == "alice"
    seqs = [e["seq"] for e in page["entries"]]
    assert seqs == sorted(seqs, reverse=True), "newest first"
    status, only = await call(cluster, "GET", "/api/v1/audit-logs?event_type=task_cancelled", admin)
    assert status == 200 and [e["event_type"] for e in only["entries"]] == ["task_cancelled"]
    for query in ("limit=0", "limit=abc", "offset=-1", "event_type=DROP%20TABLE", "bogus=1"):
        status, _ = await call(cluster, "GET", f"/api/v1/audit-logs?{query}", admin)
        assert status == 400, query
