"""The aiohttp application: routes, middleware and the OpenAPI document."""

from __future__ import annotations

import collections
import time
from typing import Any

from aiohttp import web

from octaskly.api import middleware, openapi, routes, ui
from octaskly.services.dispatcher import Dispatcher

MAX_BODY_BYTES = routes.MAX_BODY_BYTES


def build(dispatcher: Dispatcher, *, require_auth: bool = False) -> web.Application:
    """The API of `dispatcher`; with `require_auth`, every endpoint but /health, /ready,
    /metrics and the dashboard's static files (/ui) needs a bearer token of a role allowed
    to use it."""
    authenticator = _authenticator(dispatcher) if require_auth else middleware.allow_all
    app = web.Application(
        middlewares=[
            _measured(dispatcher),
            *middleware.build(authenticator, _denial_recorder(dispatcher)),
            _primary_only(dispatcher),
        ],
        client_max_size=MAX_BODY_BYTES,
    )
    app[routes.DISPATCHER_KEY] = dispatcher
    streams = app[routes.STREAMS_KEY] = routes.Streams()
    app.on_shutdown.append(streams.close)
    document = openapi.document()

    async def serve_openapi(request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_post("/api/v1/tasks", routes.submit)
    app.router.add_post("/api/v1/tasks/batch", routes.submit_batch)
    app.router.add_get("/api/v1/tasks", routes.list_tasks)
    # not "batch": GET/DELETE/OPTIONS /api/v1/tasks/batch are a 405 with `Allow: POST`, not a
    # 400 for a malformed task id (and its Allow header lists only POST)
    task = r"/api/v1/tasks/{task_id:(?!batch$)[^/]+}"
    app.router.add_get(task, routes.get_task)
    app.router.add_delete(task, routes.cancel_task)
    app.router.add_get("/api/v1/tasks/{task_id}/logs", routes.task_logs)
    app.router.add_get("/api/v1/workers", routes.workers)
    app.router.add_get("/api/v1/stats", routes.stats)
    app.router.add_get("/api/v1/whoami", routes.whoami)
    app.router.add_get("/api/v1/openapi.json", serve_openapi)
    app.router.add_post("/api/v1/tokens", routes.create_token)
    app.router.add_delete("/api/v1/tokens/{jti}", routes.revoke_token)
    app.router.add_get("/api/v1/audit-logs", routes.audit_logs)
    app.router.add_get("/api/v1/events", routes.events)
    app.router.add_get("/api/v1/backup", routes.backup)
    app.router.add_get("/api/v1/ha/status", routes.ha_status)
    app.router.add_post("/api/v1/ha/switchover", routes.ha_switchover)
    app.router.add_post("/api/v1/ha/promote", routes.ha_promote)
    app.router.add_get("/metrics", routes.metrics)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/ready", routes.ready)
    ui.add_routes(app)
    return app


def _measured(dispatcher: Dispatcher) -> Any:
    """Every request's latency, by route (its pattern, not its path), method and status."""

    @web.middleware
    async def measure(request: web.Request, handler: middleware.Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            dispatcher.metrics.api.labels(route, request.method, str(status)).observe(
                time.perf_counter() - started
            )

    return measure


ANY_ROLE_PATHS = (
    "/api/v1/ha/status",
    "/api/v1/ha/promote",
    "/api/v1/openapi.json",
    "/health",
    "/ready",
    "/metrics",
    "/ui",
)


def _primary_only(dispatcher: Dispatcher) -> Any:
    """Only the primary serves tasks, workers, stats, tokens and audit: a standby (or a
    primary handing over) answers 503 with where the primary is, so clients move on.
    Every response says the node's role and term (X-Octaskly-Role, X-Octaskly-Term)."""

    @web.middleware
    async def gate(request: web.Request, handler: middleware.Handler) -> web.StreamResponse:
        ha = dispatcher.ha
        headers = {"X-Octaskly-Role": dispatcher.role, "X-Octaskly-Term": str(ha.term)}
        if (dispatcher.role != "primary" or ha.switching) and not request.path.startswith(
            ANY_ROLE_PATHS
        ):
            if dispatcher.role != "primary":
                where = ha.primary_address
                message = (
                    f"this dispatcher is a standby (term {ha.term}); the primary is "
                    f"{'at P2P ' + where if where else 'unknown'}: use its API"
                )
            else:
                message = "this dispatcher is handing over to its standby; retry there"
            return middleware.error_response(503, message, headers={"Retry-After": "1", **headers})
        if request.method not in ("GET", "HEAD", "OPTIONS") and not request.path.startswith(
            ANY_ROLE_PATHS
        ):
            refusal = ha.fencer.refusal()  # (a primary that may have been replaced: no writes)
            if refusal is not None:
                return middleware.error_response(
                    503, refusal, headers={"Retry-After": "1", **headers}
                )
        response = await handler(request)
        if not response.prepared:
            response.headers.update(headers)
        return response

    return gate


def _authenticator(dispatcher: Dispatcher) -> middleware.Authenticator:
    """Bearer tokens, verified by the dispatcher; the first use of each token in this
    process is audited as a successful authentication."""
    verify = middleware.bearer(dispatcher.tokens.verify)
    seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    async def authenticate(request: web.Request) -> middleware.Principal:
        principal = await verify(request)
        if principal.jti is not None and principal.jti not in seen:
            seen[principal.jti] = None
            if len(seen) > 10_000:
                seen.popitem(last=False)
            dispatcher.audit.record(
                "auth_success",
                action="authenticate",
                actor=principal.subject,
                details={"role": principal.role, "jti": principal.jti},
                source_ip=request.remote,
            )
        return principal

    return authenticate


def _denial_recorder(dispatcher: Dispatcher) -> middleware.DenialHook:
    def record(request: web.Request, status: int, reason: str) -> None:
        principal = request.get(middleware.PRINCIPAL_KEY)
        dispatcher.audit.record(
            "auth_failure" if status == 401 else "access_denied",
            action=f"{request.method} {request.path}",
            severity="warning",
            actor=principal.subject if principal is not None else None,
            details={"status": status, "reason": reason},
            source_ip=request.remote,
        )

    return record
