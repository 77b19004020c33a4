"""The aiohttp application: routes, middleware and the OpenAPI document."""

from __future__ import annotations

import collections

from aiohttp import web

from octaskly.api import middleware, openapi, routes
from octaskly.services.dispatcher import Dispatcher

MAX_BODY_BYTES = 64 * 1024 * 1024


def build(dispatcher: Dispatcher, *, require_auth: bool = False) -> web.Application:
    """The API of `dispatcher`; with `require_auth`, every endpoint but /health, /ready and
    /metrics needs a bearer token of a role allowed to use it."""
    authenticator = _authenticator(dispatcher) if require_auth else middleware.allow_all
    app = web.Application(
        middlewares=middleware.build(authenticator, _denial_recorder(dispatcher)),
        client_max_size=MAX_BODY_BYTES,
    )
    app[routes.DISPATCHER_KEY] = dispatcher
    document = openapi.document()

    async def serve_openapi(request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_post("/api/v1/tasks", routes.submit)
    app.router.add_post("/api/v1/tasks/batch", routes.submit_batch)
    app.router.add_get("/api/v1/tasks", routes.list_tasks)
    app.router.add_get("/api/v1/tasks/{task_id}", routes.get_task)
    app.router.add_delete("/api/v1/tasks/{task_id}", routes.cancel_task)
    app.router.add_get("/api/v1/tasks/{task_id}/logs", routes.task_logs)
    app.router.add_get("/api/v1/workers", routes.workers)
    app.router.add_get("/api/v1/stats", routes.stats)
    app.router.add_get("/api/v1/openapi.json", serve_openapi)
    app.router.add_post("/api/v1/tokens", routes.create_token)
    app.router.add_delete("/api/v1/tokens/{jti}", routes.revoke_token)
    app.router.add_get("/api/v1/audit-logs", routes.audit_logs)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/ready", routes.ready)
    return app


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
