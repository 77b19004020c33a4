"""Hostile input on the REST API: schemathesis against a real dispatcher process.

A dispatcher runs as its own process with authentication on. schemathesis takes the
OpenAPI document (the one the dispatcher serves at /api/v1/openapi.json: checked to be
identical) and, for every documented operation, sends the schema's boundary cases (its
"coverage" phase: every enum value, every length and range edge, every missing required
field, every wrong type) and then Hypothesis-generated valid and invalid requests
("fuzzing"), with an admin token in the Authorization header. What a 201 creates is then
used along the document's links (the task's record, output, cancel; the token's
revocation), so the full-record schemas meet real tasks. Each response must

- never be a 5xx;
- have a status code the document lists for that operation, with the documented content
  type, headers and body schema;
- reject what the document calls invalid (4xx), honour authentication (no token, a bad
  token: 401), and answer 405 with an exact `Allow` header to undocumented methods.

Left out, each for a reason:

- `GET /api/v1/events`: an endless text/event-stream (there is no response to validate);
- `GET /api/v1/tasks/{id}/logs?follow=true`: streams until the task ends, which a queued
  task (no worker here) never does, so `follow` is always sent as false;
- `DELETE /api/v1/tokens/{jti}` of the test's own admin token: it would lock the test out
  of the rest of the run (any other jti is fair game);
- the check `positive_data_acceptance`: the document cannot express every rule of the
  validators (a command that is not blank, environment variable names, a 64 KiB limit in
  UTF-8 bytes, label names): a request valid by the schema may still get a 400, rightly;
- the check `use_after_free`: DELETE /api/v1/tasks/{id} *cancels* a task, whose record
  stays readable (status "cancelled", SPEC), so a GET after it is a 200 by design.

Everything else — task submit/list/get/cancel, batches, tokens, audit log, backup,
workers, stats, whoami, HA status/switchover/promote (on a lone primary these must answer
409, not break), health, metrics, the dashboard's files — is exercised.
"""

from __future__ import annotations

import base64
import collections
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis

from octaskly.api import openapi
from tests import pg
from tests.e2e import procs

EXAMPLES_PER_OPERATION = 150
STATS: collections.Counter[tuple[str, int]] = collections.Counter()
FOLLOWED: collections.Counter[str] = collections.Counter()


def _jti(token: str) -> str:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["jti"])


@pytest.fixture(scope="module")
def dispatcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("schema")
    port, api_port = procs.free_port(), procs.free_port()
    api = f"http://127.0.0.1:{api_port}"
    log = tmp / "dispatcher.log"
    args = [
        "dispatcher",
        "--port",
        str(port),
        "--api-port",
        str(api_port),
        "--bind",
        "127.0.0.1",
        "--data-dir",
        str(tmp / "data"),
        "--secret-key",
        procs.SECRET,
        "--quic-enabled",
        "false",
    ]
    with procs.processes() as ps:
        ps.append(procs.start(args, cwd=tmp, log=log))
        procs.wait_healthy(api, ps[0], data_dir=tmp / "data")
        token = procs.TOKENS[api]
        started = time.monotonic()
        yield {"api": api, "token": token, "jti": _jti(token), "proc": ps[0], "log": log}
        took = time.monotonic() - started
        alive = ps[0].poll() is None
        status, health = procs.http("GET", f"{api}/health")
        output = log.read_text(errors="replace")
        by_status: collections.Counter[int] = collections.Counter()
        for (_, code), n in STATS.items():
            by_status[code] += n
        server_errors = sum(n for code, n in by_status.items() if code >= 500)
        print(
            f"\nschemathesis: {sum(STATS.values())} requests over "
            f"{len({op for op, _ in STATS})} operations in {took:.1f} s; statuses "
            f"{dict(sorted(by_status.items()))}; 5xx {server_errors}"
            f"; links followed from created tasks {FOLLOWED['tasks']}, tokens "
            f"{FOLLOWED['tokens']}; dispatcher alive {alive}, "
            f"/health {status} {health.get('status')}; "
            f"tracebacks in its log {output.count('Traceback')}"
        )
        assert alive and status == 200 and health["status"] == "healthy"
        assert "Traceback" not in output, output[-4000:]


CONFIG = schemathesis.Config.from_dict(
    {
        # the admin token is added to every request below; the no-token and bad-token
        # cases are schemathesis's `ignored_auth` check (so not generated as parameters)
        "generation": {
            "max-examples": EXAMPLES_PER_OPERATION,
            "mode": "all",
            "with-security-parameters": False,
        },
        "phases": {"examples": {"enabled": False}},
        "checks": {
            "positive_data_acceptance": {"enabled": False},
            "use_after_free": {"enabled": False},
        },
        "request-timeout": 10,
    }
)
# The document the dispatcher serves is built once by openapi.document() (app.py); the
# tests are generated from it at collection, when no dispatcher runs yet, and
# test_the_served_document_is_the_one_tested checks that the dispatcher serves exactly it.
# (schemathesis.pytest.from_fixture, which would load it from the URL at run time, does
# not work with pytest 9: it touches Node._nodeid, which pytest 9 removed.)
schema = schemathesis.openapi.from_dict(openapi.document(), config=CONFIG).exclude(
    path="/api/v1/events"
)


def test_the_served_document_is_the_one_tested(dispatcher: dict[str, Any]) -> None:
    status, served = procs.http("GET", f"{dispatcher['api']}/api/v1/openapi.json")
    assert status == 200
    assert served == json.loads(json.dumps(openapi.document()))
    print(f"\nserved document: {len(served['paths'])} paths, identical to the one tested")


def _guard(case: schemathesis.Case, dispatcher: dict[str, Any]) -> None:
    """The two exclusions of the module docstring, applied to one generated request."""
    if case.path.endswith("/logs") and isinstance(case.query, dict):
        follow = case.query.get("follow")
        if isinstance(follow, str) and follow.lower() in ("true", "1"):
            case.query["follow"] = "false"
    if case.path == "/api/v1/tokens/{jti}" and case.path_parameters:
        if case.path_parameters.get("jti") == dispatcher["jti"]:
            case.path_parameters["jti"] = "not" + dispatcher["jti"][3:]


@schema.parametrize()
@hypothesis.settings(
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)
def test_every_operation_conforms_to_the_served_document(
    case: schemathesis.Case, dispatcher: dict[str, Any]
) -> None:
    _guard(case, dispatcher)
    response = _call(case, dispatcher)
    if response.status_code == 201 and case.method == "POST":
        _follow_links(case, response.json(), dispatcher)


def _call(case: schemathesis.Case, dispatcher: dict[str, Any]) -> Any:
    headers = {"Authorization": f"Bearer {dispatcher['token']}"}
    excluded = []
    if pg.STORE == "postgresql" and case.path == "/api/v1/backup":
        # a dispatcher on PostgreSQL cannot make SQLite backups: a documented 501 (pg_dump)
        excluded = [schemathesis.checks.not_a_server_error]
    response = case.call_and_validate(
        base_url=dispatcher["api"], headers=headers, timeout=10, excluded_checks=excluded
    )
    if excluded:
        assert response.status_code < 500 or response.status_code == 501, response.status_code
    STATS[(f"{case.method} {case.path}", response.status_code)] += 1
    return response


def _follow_links(case: schemathesis.Case, body: Any, dispatcher: dict[str, Any]) -> None:
    """What the document's links say can be done with what was just created — read the
    task's record and output, cancel it, read it again; revoke the token — each response
    checked against the document too, so the record and cancel schemas meet real tasks,
    not only 404s. (schemathesis's own stateful runner is not used: its rule selection
    depends on the server's answers, which Hypothesis reports as flaky generation.)"""
    if case.path in ("/api/v1/tasks", "/api/v1/tasks/batch"):
        task_id = body["id"] if case.path == "/api/v1/tasks" else body["ids"][0]
        one, logs = schema["/api/v1/tasks/{task_id}"], schema["/api/v1/tasks/{task_id}/logs"]
        ids = {"task_id": task_id}
        first = _call(one["GET"].Case(path_parameters=ids), dispatcher)
        assert first.status_code == 200
        _call(logs["GET"].Case(path_parameters=ids), dispatcher)
        if first.json()["status"] in ("queued", "running"):
            assert _call(one["DELETE"].Case(path_parameters=ids), dispatcher).status_code == 200
        again = _call(one["GET"].Case(path_parameters=ids), dispatcher)
        assert again.json()["status"] not in ("queued", "running")
        FOLLOWED["tasks"] += 1
    elif case.path == "/api/v1/tokens":
        revoke = schema["/api/v1/tokens/{jti}"]["DELETE"]
        revoked = _call(revoke.Case(path_parameters={"jti": body["id"]}), dispatcher)
        assert revoked.status_code == 200
        FOLLOWED["tokens"] += 1


def _log_errors(dispatcher: dict[str, Any]) -> int:
    return Path(dispatcher["log"]).read_text(errors="replace").count("unhandled error")


def test_an_idempotency_key_clash_is_a_409_not_a_500(dispatcher: dict[str, Any]) -> None:
    """A batch's tasks get the keys KEY#0, KEY#1, ...: a single submit that already took
    one of them made the batch's insert fail on the unique key (a 500 before)."""
    api, token = dispatcher["api"], dispatcher["token"]
    errors_before = _log_errors(dispatcher)
    key = f"clash-{time.monotonic_ns()}"
    single = _post(api, "/api/v1/tasks", {"command": "true"}, token, key=f"{key}#1")
    batch = _post(api, "/api/v1/tasks/batch", {"tasks": [{"command": "true"}] * 3}, token, key)
    print(f"\nsingle {single[0]}, clashing batch {batch[0]} {batch[1]['error']!r}")
    assert single[0] == 201
    assert batch[0] == 409 and "Idempotency-Key" in batch[1]["error"]
    assert _log_errors(dispatcher) == errors_before


def test_a_follower_that_hangs_up_is_not_an_internal_error(dispatcher: dict[str, Any]) -> None:
    """`logs?follow=true` whose reader went away: the next event's write fails; that is
    the reader's doing, not an "unhandled error" with a traceback in the log (as before)."""
    api, token = dispatcher["api"], dispatcher["token"]
    errors_before = _log_errors(dispatcher)
    status, task = _post(api, "/api/v1/tasks", {"command": "true"}, token)
    assert status == 201
    port = int(api.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"GET /api/v1/tasks/{task['id']}/logs?follow=true HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    time.sleep(0.2)
    assert procs.http("DELETE", f"{api}/api/v1/tasks/{task['id']}", token=token)[0] == 200
    time.sleep(0.5)  # the stream's write of the "cancelled" event, to a closed socket
    assert procs.http("GET", f"{api}/health")[0] == 200
    errors = _log_errors(dispatcher) - errors_before
    print(f"\nfollower hung up, task cancelled: unhandled errors logged {errors}")
    assert errors == 0


def _post(api: str, path: str, body: Any, token: str, key: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    request = urllib.request.Request(
        api + path, data=json.dumps(body).encode(), method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


HOSTILE_BODIES = {
    "array nested 100k deep": b"[" * 100_000 + b"]" * 100_000,
    "env nested 100k deep": b'{"command":"x","env":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001,
    "lone surrogate in an env value": b'{"command":"x","env":{"A":"\\udfff"}}',
    "lone surrogate in a label": b'{"command":"x","requirements":{"labels":{"a":"\\ud800"}}}',
    "lone surrogate in the command": b'{"command":"echo \\ud800"}',
    "gpu: 0": b'{"command":"x","requirements":{"gpu":0}}',
    'gpu: "yes"': b'{"command":"x","requirements":{"gpu":"yes"}}',
    "timeout: true": b'{"command":"x","timeout":true}',
    'timeout: "60"': b'{"command":"x","timeout":"60"}',
    'retry_count: "1"': b'{"command":"x","retry_count":"1"}',
    'cpu_cores: "2"': b'{"command":"x","requirements":{"cpu_cores":"2"}}',
    "timeout: 1e999": b'{"command":"x","timeout":1e999}',
    "timeout: NaN": b'{"command":"x","timeout":NaN}',
    "timeout: 5000 digits": b'{"command":"x","timeout":1' + b"0" * 5000 + b"}",
    "memory_mb past 64 bits": b'{"command":"x","requirements":{"memory_mb":18446744073709551616}}',
    "invalid UTF-8": b'{"command":"\xff\xfe"}',
}


@pytest.mark.parametrize("body", HOSTILE_BODIES.values(), ids=HOSTILE_BODIES.keys())
def test_hostile_json_is_a_400_not_a_500(dispatcher: dict[str, Any], body: bytes) -> None:
    """JSON that schemathesis cannot produce (it generates valid JSON text only): deep
    nesting and lone surrogate escapes were 500s; lax number/boolean parsing accepted
    `"gpu": 0` and `"timeout": true` against the document."""
    errors_before = _log_errors(dispatcher)
    request = urllib.request.Request(
        dispatcher["api"] + "/api/v1/tasks",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {dispatcher['token']}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    answer = json.loads(refused.value.read())
    print(f"\n{body[:50]!r}: {refused.value.code} {answer['error'][:70]}")
    assert refused.value.code == 400 and answer["status"] == 400
    assert _log_errors(dispatcher) == errors_before
