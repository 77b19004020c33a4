"""REST handlers: parse and check the request, call the dispatcher, render the answer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pydantic
from aiohttp import web

from octaskly.api import logs, middleware
from octaskly.api.middleware import HTTPProblem, rfc3339
from octaskly.domain import models
from octaskly.protocol import framing
from octaskly.services import auditing, live, tokens
from octaskly.services import metrics as metrics_module
from octaskly.services.dispatcher import Dispatcher

DISPATCHER_KEY: web.AppKey[Dispatcher] = web.AppKey("dispatcher", Dispatcher)


class Streams:
    """The endless responses (live events, followed logs). When the server shuts down they
    are ended cleanly, so that a SIGTERM does not wait for readers that never leave (they
    see the stream end, and reconnect or fail over)."""

    def __init__(self) -> None:
        self.closing = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        if self.closing:  # opened while shutting down: end at the first wait
            task.cancel()
        try:
            yield
        except asyncio.CancelledError:
            if not self.closing:
                raise
            task.uncancel()  # our own cancellation: end the response normally
        finally:
            self._tasks.discard(task)

    async def close(self, app: web.Application) -> None:
        """(on_shutdown)"""
        self.closing = True
        for task in list(self._tasks):
            task.cancel()


STREAMS_KEY: web.AppKey[Streams] = web.AppKey("streams", Streams)

# SPEC's permission matrix. A `client` sees and cancels only its own tasks (the store
# filters by owner, so another client's task is a 404); `worker` tokens are for the P2P
# port, not for the API.
TASKS = frozenset({"admin", "dispatcher", "client"})
CLUSTER = frozenset({"admin", "dispatcher"})
ADMIN = frozenset({"admin"})
ANY = frozenset({"admin", "dispatcher", "worker", "client"})
MAX_BATCH = 10_000
MAX_BODY_BYTES = 64 * 1024 * 1024
"""The largest request body (the application's client_max_size)."""
_TASK_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_spec_adapter = pydantic.TypeAdapter(models.TaskSpec)


def _dispatcher(request: web.Request) -> Dispatcher:
    return request.app[DISPATCHER_KEY]


def _owner(request: web.Request) -> str | None:
    return request[middleware.PRINCIPAL_KEY].owner


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


# -- input ----------------------------------------------------------------------------------
MIN_BODY_RATE = 500
"""Bytes a second a request body must keep up after its first `connection_timeout`
seconds (Apache mod_reqtimeout's rule, body=<timeout>,MinRate=500): a body trickled a byte
a second (slowloris's POST variant) is cut, a large upload on a slow link is not."""


async def _read_body(request: web.Request, grace: float) -> bytes:
    loop = asyncio.get_running_loop()
    started, received = loop.time(), 0
    chunks: list[bytes] = []
    while True:
        remaining = started + grace + received / MIN_BODY_RATE - loop.time()
        try:
            if remaining <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(request.content.readany(), remaining)
        except TimeoutError:
            raise HTTPProblem(
                408,
                f"the request body arrived too slowly ({received} bytes in "
                f"{loop.time() - started:.0f} s; at least {MIN_BODY_RATE} bytes/s after the "
                f"first {grace:g} s)",
                headers={"Connection": "close"},
            ) from None
        if not chunk:
            return b"".join(chunks)
        received += len(chunk)
        if received > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=received)
        chunks.append(chunk)


async def _body(request: web.Request) -> Any:
    declared = request.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        # refused from the header: aiohttp would read (and hold) 64 MiB before its 413
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=declared)
    raw = await _read_body(request, _dispatcher(request).options.connection_timeout)
    if not raw:
        raise HTTPProblem(400, "request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except RecursionError:  # "[[[[...": a 500 before
        raise HTTPProblem(400, "request body is not valid JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPProblem(400, f"request body is not valid JSON: {exc}") from None
    if framing.has_lone_surrogate(body):  # e.g. an env value "\udfff": a 500 when stored
        raise HTTPProblem(
            400, "request body is not valid JSON: a lone surrogate escape (\\ud800-\\udfff)"
        )
    return body


def _spec(
    raw: Any, where: str = "", min_sandbox: models.SandboxLevel | None = None
) -> models.TaskSpec:
    if not isinstance(raw, dict):
        raise HTTPProblem(400, f"{where or 'body'}: expected a JSON object", field=where or None)
    try:
        spec = _spec_adapter.validate_python(raw)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        field = f"{where}.{field}" if where else field
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        raise HTTPProblem(400, f"{field}: {message}", field=field) from None
    if min_sandbox is None:
        return spec
    try:
        return spec.with_min_sandbox_level(min_sandbox)
    except ValueError as exc:
        field = f"{where}.sandbox_level" if where else "sandbox_level"
        raise HTTPProblem(400, f"{field}: {exc}", field=field) from None


def _min_sandbox(request: web.Request) -> models.SandboxLevel | None:
    """The least sandbox level of the caller's tasks: `client_min_sandbox_level` for a
    client token; None (no minimum) for the other roles — and with authentication off,
    where every caller is admin."""
    if request[middleware.PRINCIPAL_KEY].role != "client":
        return None
    level = _dispatcher(request).options.client_min_sandbox_level
    return None if level is models.SandboxLevel.NONE else level


def _check_query(request: web.Request, allowed: set[str]) -> None:
    for name in request.query:
        if name not in allowed:
            raise HTTPProblem(400, f"unknown query parameter {name!r}", field=name)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPProblem(400, f"{name}: expected an integer, got {raw!r}", field=name) from None
    if not low <= value <= high:
        raise HTTPProblem(400, f"{name}: must be between {low} and {high}", field=name)
    return value


def _bool_param(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise HTTPProblem(400, f"{name}: expected true or false", field=name)
    return raw in ("true", "1")


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["task_id"]
    if not _TASK_ID.match(task_id):
        raise HTTPProblem(400, f"{task_id[:80]!r} is not a valid task id", field="id")
    return task_id


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise HTTPProblem(
            400, "Idempotency-Key must be 1-255 printable characters", field="Idempotency-Key"
        )
    return key


# -- output ----------------------------------------------------------------------------------
def task_summary(task: models.Task) -> dict[str, Any]:
    return {
        "id": task.id,
        "command": task.command,
        "status": task.status.value,
        "priority": task.priority.label,
        "worker_id": task.worker_id,
        "exit_code": task.exit_code,
        "duration_ms": task.duration_ms,
        "attempts": task.attempts,
        "created_at": rfc3339(task.created_at),
        "started_at": rfc3339(task.started_at) if task.started_at else None,
        "completed_at": rfc3339(task.completed_at) if task.completed_at else None,
    }


def task_record(
    task: models.Task, waiting_reason: str | None = None, source: live.OutputSource = "store"
) -> dict[str, Any]:
    spec = task.spec
    record = task_summary(task)
    record.update(logs.output_fields(task, source))
    record.update(
        error=task.error,
        timeout=task.timeout,
        retry_count=spec.retry_count,
        memory_limit_mb=spec.memory_limit_mb,
        cpu_seconds=spec.cpu_seconds,
        disk_limit_mb=spec.disk_limit_mb,
        open_files_limit=spec.open_files_limit,
        process_limit=spec.process_limit,
        limits_preset=spec.limits_preset.value if spec.limits_preset else None,
        effective_limits=dataclasses.asdict(spec.limits()),
        sandbox_level=spec.sandbox_level.value if spec.sandbox_level else None,
        env=spec.env,
        inputs=spec.inputs,
        outputs=spec.outputs,
        requirements=spec.requirements.model_dump(),
        owner=task.owner,
        retry_at=rfc3339(task.not_before) if task.not_before else None,
        waiting_reason=waiting_reason,
    )
    return record


def _audit_submit(request: web.Request, ids: list[str]) -> None:
    _dispatcher(request).audit.record(
        "task_submitted",
        action="submit",
        actor=request[middleware.PRINCIPAL_KEY].subject,
        task_id=ids[0] if len(ids) == 1 else None,
        details={"count": len(ids)} if len(ids) == 1 else {"count": len(ids), "task_ids": ids},
        source_ip=request.remote,
    )


# -- handlers ---------------------------------------------------------------------------------
async def submit(request: web.Request) -> web.Response:
    middleware.require(request, TASKS, "submit tasks")
    _check_query(request, set())
    spec = _spec(await _body(request), min_sandbox=_min_sandbox(request))
    tasks, created = await _dispatcher(request).submit(
        [spec],
        owner=_owner(request),
        idempotency_key=_idempotency_key(request),
        request_id=request[middleware.REQUEST_ID_KEY],
    )
    task = tasks[0]
    if created:
        _audit_submit(request, [task.id])
    body = {
        "id": task.id,
        "command": task.command,
        "status": task.status.value,
        "priority": task.priority.label,
        "created_at": rfc3339(task.created_at),
    }
    return _json(body, 201, {"Idempotent-Replayed": "false" if created else "true"})


async def submit_batch(request: web.Request) -> web.Response:
    middleware.require(request, TASKS, "submit tasks")
    _check_query(request, set())
    raw = await _body(request)
    if not isinstance(raw, dict) or set(raw) != {"tasks"} or not isinstance(raw["tasks"], list):
        raise HTTPProblem(400, 'tasks: expected {"tasks": [...]} and nothing else', field="tasks")
    items = raw["tasks"]
    if not 1 <= len(items) <= MAX_BATCH:
        raise HTTPProblem(400, f"tasks: a batch holds 1 to {MAX_BATCH} tasks", field="tasks")
    floor = _min_sandbox(request)
    specs = [_spec(item, f"tasks[{i}]", floor) for i, item in enumerate(items)]
    tasks, created = await _dispatcher(request).submit(
        specs,
        owner=_owner(request),
        idempotency_key=_idempotency_key(request),
        request_id=request[middleware.REQUEST_ID_KEY],
    )
    if created:
        _audit_submit(request, [t.id for t in tasks])
    return _json(
        {"ids": [t.id for t in tasks]}, 201, {"Idempotent-Replayed": "false" if created else "true"}
    )


async def list_tasks(request: web.Request) -> web.Response:
    middleware.require(request, TASKS, "list tasks")
    _check_query(request, {"status", "worker_id", "limit", "offset"})
    status_raw = request.query.get("status")
    status = None
    if status_raw is not None:
        try:
            status = models.TaskStatus(status_raw)
        except ValueError:
            names = ", ".join(s.value for s in models.TaskStatus)
            raise HTTPProblem(400, f"status: must be one of {names}", field="status") from None
    worker_id = request.query.get("worker_id")
    if worker_id is not None and not 1 <= len(worker_id) <= 128:
        raise HTTPProblem(400, "worker_id: must be 1-128 characters", field="worker_id")
    limit = _int_param(request, "limit", 100, 1, 1000)
    offset = _int_param(request, "offset", 0, 0, 1 << 62)
    page = await _dispatcher(request).list_tasks(
        status=status, worker_id=worker_id, owner=_owner(request), limit=limit, offset=offset
    )
    return _json(
        {
            "tasks": [task_summary(t) for t in page.tasks],
            "total": page.total,
            "returned": len(page.tasks),
            "limit": limit,
            "offset": offset,
        }
    )


async def get_task(request: web.Request) -> web.Response:
    middleware.require(request, TASKS, "read tasks")
    _check_query(request, set())
    dispatcher = _dispatcher(request)
    task = await dispatcher.get(_task_id(request), owner=_owner(request))
    task, source = await dispatcher.with_output_so_far(task)
    return _json(task_record(task, dispatcher.waiting_reason(task), source))


async def cancel_task(request: web.Request) -> web.Response:
    middleware.require(request, TASKS, "cancel tasks")
    _check_query(request, set())
    task = await _dispatcher(request).cancel(_task_id(request), owner=_owner(request))
    _dispatcher(request).audit.record(
        "task_cancelled",
        action="cancel",
        actor=request[middleware.PRINCIPAL_KEY].subject,
        task_id=task.id,
        source_ip=request.remote,
    )
    return _json(
        {
            "id": task.id,
            "status": task.status.value,
            "message": "task cancelled" + (" (its process was killed)" if task.started_at else ""),
        }
    )


def _logs_query(request: web.Request) -> tuple[str | None, bool]:
    """The stream `format=raw` answers (None: JSON of both) and `follow`, checked together."""
    fmt = request.query.get("format", "json")
    if fmt not in logs.FORMATS:
        raise HTTPProblem(400, f"format: must be one of {', '.join(logs.FORMATS)}", field="format")
    stream = request.query.get("stream")
    if stream is not None and stream not in logs.STREAMS:
        raise HTTPProblem(400, f"stream: must be one of {', '.join(logs.STREAMS)}", field="stream")
    follow = _bool_param(request, "follow")
    if fmt == "raw" and stream is None:
        raise HTTPProblem(
            400, "stream: format=raw answers one stream: stdout or stderr", field="stream"
        )
    if fmt == "raw" and follow:
        raise HTTPProblem(
            400, "format: format=raw cannot be followed (follow streams NDJSON)", field="format"
        )
    if fmt == "json" and stream is not None:
        raise HTTPProblem(
            400, "stream: only with format=raw (the JSON has both streams)", field="stream"
        )
    return stream, follow


async def task_logs(request: web.Request) -> web.StreamResponse:
    middleware.require(request, TASKS, "read task output")
    _check_query(request, {"follow", "format", "stream"})
    stream, follow = _logs_query(request)
    dispatcher = _dispatcher(request)
    task_id, owner = _task_id(request), _owner(request)
    if not follow:
        task, source = await dispatcher.with_output_so_far(
            await dispatcher.get(task_id, owner=owner)
        )
        if stream is not None:
            data, dropped = logs.raw(task, stream)
            headers = {
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "X-Octaskly-Dropped-Bytes": str(dropped),
                "X-Octaskly-Task-Status": task.status.value,
                "X-Octaskly-Output-Source": source,
            }
            return web.Response(body=data, content_type="application/octet-stream", headers=headers)
        return _json(
            {"id": task.id, "status": task.status.value, **logs.output_fields(task, source)}
        )
    await dispatcher.get(task_id, owner=owner)  # 404 before the stream starts
    response = web.StreamResponse(headers=middleware.stream_headers(request))
    response.content_type = "application/x-ndjson"
    await response.prepare(request)
    text = logs.EventText()
    try:
        async with request.app[STREAMS_KEY].open():
            async for event in dispatcher.follow(task_id, owner=owner):
                for line in text.events(event):
                    await response.write(json.dumps(line).encode() + b"\n")
        await response.write_eof()
    except ConnectionError:
        pass  # the reader went away (not an internal error with a traceback in the log)
    return response


async def workers(request: web.Request) -> web.Response:
    middleware.require(request, CLUSTER, "see workers")
    _check_query(request, set())
    views = await _dispatcher(request).federation.worker_views()
    for view in views:
        view["connected_at"] = rfc3339(view["connected_at"])
        view["last_heartbeat"] = rfc3339(view["last_heartbeat"])
    return _json({"workers": views, "total": len(views)})


async def whoami(request: web.Request) -> web.Response:
    """Who the token is and what its role may do (the dashboard's login; any role)."""
    principal = middleware.require(request, ANY, "ask who it is")
    _check_query(request, set())
    role = principal.role
    return _json(
        {
            "subject": principal.subject,
            "role": role,
            "token_id": principal.jti,
            "can": {
                "submit": role in TASKS,
                "see_all_tasks": role in CLUSTER,
                "see_cluster": role in CLUSTER,
                "admin": role in ADMIN,
            },
        }
    )


async def stats(request: web.Request) -> web.Response:
    middleware.require(request, CLUSTER, "see cluster statistics")
    _check_query(request, set())
    return _json(await _dispatcher(request).stats())


EVENT_SECONDS = 1.0
EVENT_BATCH = 500


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events for live views: `tasks` (summaries of tasks that changed: new,
    started, finished, cancelled — a client's own only) as they change, and `stats`
    (counts, workers) once a second. `reload` when a reader fell too far behind."""
    principal = middleware.require(request, TASKS, "watch live events")
    _check_query(request, set())
    dispatcher = _dispatcher(request)
    owner = principal.owner
    response = web.StreamResponse(
        headers={
            **middleware.stream_headers(request),
            "Content-Type": "text/event-stream",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    changed, wake = dispatcher.watchers.feed.subscribe()
    try:
        async with request.app[STREAMS_KEY].open():
            await _event_loop(response, dispatcher, owner, changed, wake)
    except (ConnectionResetError, ConnectionError):
        pass  # the reader went away
    finally:
        dispatcher.watchers.feed.unsubscribe((changed, wake))
    return response


async def _event_loop(
    response: web.StreamResponse,
    dispatcher: Dispatcher,
    owner: str | None,
    changed: set[str],
    wake: asyncio.Event,
) -> None:
    next_stats = 0.0
    while True:
        now = asyncio.get_running_loop().time()
        if now >= next_stats:
            await _event(response, "stats", await _live_stats(dispatcher, owner))
            next_stats = now + EVENT_SECONDS
        if changed:
            overflow = len(changed) >= live.Feed.LIMIT
            ids = [changed.pop() for _ in range(min(EVENT_BATCH, len(changed)))]
            if overflow:
                changed.clear()
                await _event(response, "reload", {"reason": "too many changes"})
            tasks = await dispatcher.store.get_tasks(ids)
            visible = [task_summary(t) for t in tasks if owner is None or t.owner == owner]
            if visible:
                await _event(response, "tasks", visible)
            continue
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), max(0.05, next_stats - now))


async def _event(response: web.StreamResponse, name: str, data: Any) -> None:
    await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())


async def _live_stats(dispatcher: Dispatcher, owner: str | None) -> dict[str, Any]:
    if owner is not None:  # a client sees nothing of the cluster but that it is alive
        return {"time": rfc3339(time.time())}
    stats = await dispatcher.stats()
    stats["workers_list"] = await dispatcher.federation.worker_views()
    stats["time"] = rfc3339(time.time())
    return stats


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format (no token needed, like /health: it holds no task data)."""
    dispatcher = _dispatcher(request)
    await dispatcher.metrics.refresh(dispatcher)
    return web.Response(
        body=dispatcher.metrics.render(), headers={"Content-Type": metrics_module.CONTENT_TYPE}
    )


async def health(request: web.Request) -> web.Response:
    dispatcher = _dispatcher(request)
    try:
        await dispatcher.store.check()
    except Exception as exc:
        return _json({"status": "unhealthy", "message": str(exc)}, 503)
    if dispatcher.failure is not None:
        return _json({"status": "unhealthy", "message": repr(dispatcher.failure)}, 503)
    return _json(dispatcher.health())


async def ready(request: web.Request) -> web.Response:
    """200 only on the node that accepts writes: the primary, not mid-switchover."""
    dispatcher = _dispatcher(request)
    role, term = dispatcher.role, dispatcher.ha.term
    try:
        await dispatcher.store.check()
    except Exception as exc:
        return _json({"ready": False, "role": role, "term": term, "message": str(exc)}, 503)
    if role != "primary":
        message = f"not the primary (the primary is {dispatcher.ha.primary_address or 'unknown'})"
        return _json({"ready": False, "role": role, "term": term, "message": message}, 503)
    if dispatcher.ha.switching:
        message = "switching over to the standby"
        return _json({"ready": False, "role": role, "term": term, "message": message}, 503)
    fenced = dispatcher.ha.fencer.check()
    if fenced is not None:
        return _json({"ready": False, "role": role, "term": term, "message": fenced}, 503)
    return _json({"ready": True, "role": role, "term": term})


# -- backup (admin) ------------------------------------------------------------------------------
async def backup(request: web.Request) -> web.StreamResponse:
    """A consistent copy of the database (SQLite's online backup, checked), streamed: for
    backups from another machine or a Kubernetes CronJob that cannot mount the volume."""
    principal = middleware.require(request, ADMIN, "download a backup")
    _check_query(request, set())
    dispatcher = _dispatcher(request)
    snapshot = getattr(dispatcher.store, "snapshot", None)
    if snapshot is None:
        raise HTTPProblem(
            501,
            "this dispatcher's database is PostgreSQL: back it up with pg_dump or the "
            "server's own backups (octaskly backups are of SQLite databases)",
        )
    path: Path = dispatcher.store.path  # type: ignore[attr-defined]
    target = path.with_name(f".{path.name}.download-{uuid.uuid4().hex}")
    try:
        position = await snapshot(target)
        size = target.stat().st_size
        response = web.StreamResponse(
            headers={
                **middleware.stream_headers(request),
                "Content-Type": "application/vnd.sqlite3",
                "Content-Length": str(size),
                "Content-Disposition": 'attachment; filename="octaskly.db"',
                "X-Octaskly-Lsn": str(position.lsn),
                "X-Octaskly-Term": str(position.term),
            }
        )
        await response.prepare(request)
        with target.open("rb") as fh:
            while chunk := await asyncio.to_thread(fh.read, 1 << 20):
                await response.write(chunk)
        await response.write_eof()
    finally:
        target.unlink(missing_ok=True)
    dispatcher.audit.record(
        "backup_downloaded",
        action="backup",
        actor=principal.subject,
        details={"bytes": size, "lsn": position.lsn},
        source_ip=request.remote,
    )
    return response


# -- high availability ---------------------------------------------------------------------------
async def ha_status(request: web.Request) -> web.Response:
    middleware.require(request, CLUSTER, "see the high-availability status")
    _check_query(request, set())
    return _json(_dispatcher(request).ha.status())


async def ha_switchover(request: web.Request) -> web.Response:
    principal = middleware.require(request, ADMIN, "switch the primary over")
    raw = await _body(request) if request.can_read_body else {}
    if not isinstance(raw, dict) or not set(raw) <= {"timeout"}:
        raise HTTPProblem(400, 'expected {"timeout"?: seconds}', field="body")
    timeout = raw.get("timeout", 30)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 1 <= timeout <= 600:
        raise HTTPProblem(400, "timeout: a number of seconds, 1-600", field="timeout")
    dispatcher = _dispatcher(request)
    _audit_ha(request, principal, "switchover requested", {})
    return _json(await dispatcher.ha.switchover(float(timeout)))


async def ha_promote(request: web.Request) -> web.Response:
    principal = middleware.require(request, ADMIN, "promote a standby")
    raw = await _body(request) if request.can_read_body else {}
    if not isinstance(raw, dict) or not set(raw) <= {"force"}:
        raise HTTPProblem(400, 'expected {"force"?: true|false}', field="body")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise HTTPProblem(400, "force: true or false", field="force")
    dispatcher = _dispatcher(request)
    _audit_ha(request, principal, "promotion requested", {"force": force})
    reason = f"promoted by {principal.subject or 'an admin'} through the API"
    term = await dispatcher.ha.promote(reason, force=force)
    return _json({"role": dispatcher.role, "term": term})


def _audit_ha(
    request: web.Request, principal: middleware.Principal, what: str, details: dict[str, Any]
) -> None:
    _dispatcher(request).audit.record(
        "config_change",
        action=what,
        actor=principal.subject,
        details=details,
        source_ip=request.remote,
    )


# -- tokens (admin) ---------------------------------------------------------------------------
def _ttl(raw: Any) -> float:
    """Seconds from a number or a duration text like "90s", "30m", "24h", "7d"."""
    if isinstance(raw, bool) or raw is None:
        raise HTTPProblem(400, "ttl: a number of seconds or a duration like 24h", field="ttl")
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        try:
            return tokens.parse_duration(raw)
        except ValueError as exc:
            raise HTTPProblem(400, f"ttl: {exc}", field="ttl") from None
    raise HTTPProblem(400, "ttl: a number of seconds or a duration like 24h", field="ttl")


async def create_token(request: web.Request) -> web.Response:
    principal = middleware.require(request, ADMIN, "issue tokens")
    _check_query(request, set())
    raw = await _body(request)
    if not isinstance(raw, dict) or not set(raw) <= {"role", "subject", "ttl"}:
        raise HTTPProblem(400, 'expected {"role", "subject"?, "ttl"?}', field="body")
    role = raw.get("role")
    subject = raw.get("subject", principal.subject if role == "admin" else None)
    if not isinstance(role, str):
        raise HTTPProblem(400, "role: required", field="role")
    if not isinstance(subject, str):
        raise HTTPProblem(400, "subject: required (who the token is for)", field="subject")
    ttl = _ttl(raw.get("ttl", tokens.DEFAULT_TTL))
    dispatcher = _dispatcher(request)
    token, claims = await dispatcher.tokens.issue(subject=subject, role=role, ttl=ttl)
    await dispatcher.replicated()
    dispatcher.audit.record(
        "token_issued",
        action="issue token",
        actor=principal.subject,
        details={"jti": claims.jti, "subject": claims.sub, "role": claims.role, "exp": claims.exp},
        source_ip=request.remote,
    )
    return _json(
        {
            "token": token,
            "id": claims.jti,
            "subject": claims.sub,
            "role": claims.role,
            "issued_at": rfc3339(claims.iat),
            "expires_at": rfc3339(claims.exp),
        },
        201,
    )


async def revoke_token(request: web.Request) -> web.Response:
    principal = middleware.require(request, ADMIN, "revoke tokens")
    _check_query(request, set())
    jti = request.match_info["jti"]
    dispatcher = _dispatcher(request)
    changed = await dispatcher.tokens.revoke(jti)
    await dispatcher.replicated()  # a revocation survives a failover
    dispatcher.audit.record(
        "token_revoked",
        action="revoke token",
        actor=principal.subject,
        details={"jti": jti, "already_revoked": not changed},
        source_ip=request.remote,
    )
    return _json({"id": jti, "revoked": True, "message": "revoked" if changed else "was revoked"})


async def audit_logs(request: web.Request) -> web.Response:
    middleware.require(request, ADMIN, "read the audit log")
    _check_query(request, {"limit", "offset", "event_type"})
    limit = _int_param(request, "limit", 100, 1, 1000)
    offset = _int_param(request, "offset", 0, 0, 1 << 62)
    event_type = request.query.get("event_type")
    if event_type is not None and not re.fullmatch(r"[a-z_]{1,64}", event_type):
        raise HTTPProblem(400, "event_type: lower-case letters and _", field="event_type")
    dispatcher = _dispatcher(request)
    path = dispatcher.options.audit_path
    if path is None:
        return _json({"entries": [], "total": 0, "returned": 0, "limit": limit,
                      "offset": offset, "enabled": False})  # fmt: skip
    dispatcher.audit.flush()
    entries, total = await asyncio.to_thread(
        auditing.read_entries, path, limit=limit, offset=offset, event_type=event_type
    )
    return _json({"entries": entries, "total": total, "returned": len(entries), "limit": limit,
                  "offset": offset, "enabled": True})  # fmt: skip
