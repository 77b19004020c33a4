"""Cross-cutting HTTP concerns: request ids, timing, caching headers, authentication and
the one place where octaskly errors become HTTP error responses."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from octaskly import errors

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})
# the dashboard's static files (no data in them), by matched route, not by path prefix:
# "/ui/../api/v1/tasks" is not a dashboard file
PUBLIC_ROUTES = frozenset({"/ui", "/ui/", "/ui/{asset}"})


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling. `owner` scopes what a `client` may see; None means everything."""

    subject: str
    role: str
    jti: str | None = None

    @property
    def owner(self) -> str | None:
        return self.subject if self.role == "client" else None


Authenticator = Callable[[web.Request], Awaitable[Principal]]
DenialHook = Callable[[web.Request, int, str], None]
"""Called for every 401 and 403 (request, status, reason): the audit trail."""
PRINCIPAL_KEY: web.RequestKey[Principal] = web.RequestKey("principal", Principal)
REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("request_id", str)


async def allow_all(request: web.Request) -> Principal:
    """The authenticator used while API authentication is off: everyone is admin."""
    return Principal(subject="anonymous", role="admin")


def rfc3339(ts: float | None = None) -> str:
    moment = datetime.datetime.fromtimestamp(time.time() if ts is None else ts, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HTTPProblem(Exception):
    """An error response with a JSON body (raised by handlers for input problems)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_response(
    status: int, message: str, *, field: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    body: dict[str, Any] = {"error": message, "status": status, "timestamp": rfc3339()}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status, headers=headers)


def _translate(exc: BaseException) -> web.Response:
    if isinstance(exc, HTTPProblem):
        return error_response(exc.status, exc.message, field=exc.field, headers=exc.headers)
    if isinstance(exc, errors.ValidationError):
        return error_response(400, str(exc), field=exc.field)
    if isinstance(exc, errors.AuthenticationError):
        return error_response(
            401, f"unauthorized: {exc}", headers={"WWW-Authenticate": 'Bearer realm="octaskly"'}
        )
    if isinstance(exc, errors.PermissionDeniedError):
        return error_response(403, f"forbidden: {exc}")
    if isinstance(exc, errors.NotFoundError):
        return error_response(404, str(exc))
    if isinstance(exc, errors.ConflictError):
        return error_response(409, str(exc))
    if isinstance(exc, errors.StorageFullError):
        return error_response(
            507, f"the database disk is full: {exc}", headers={"Retry-After": "5"}
        )
    if isinstance(exc, errors.TemporaryError):
        retry = str(max(1, round(exc.delay or 1)))
        return error_response(503, str(exc), headers={"Retry-After": retry})
    if isinstance(exc, errors.StorageError):
        return error_response(503, f"the database is unavailable: {exc}")
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal error; see the dispatcher log")


def _http_exception(exc: web.HTTPException) -> web.Response:
    reasons = {404: "no such endpoint", 405: "method not allowed", 413: "request body too large"}
    message = reasons.get(exc.status, exc.reason)
    return error_response(
        exc.status, message, headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    )


def bearer(verify: Callable[[str], Any]) -> Authenticator:
    """An authenticator for `Authorization: Bearer <JWT>`; `verify` returns the claims
    (sub, role, jti) or raises AuthenticationError."""

    async def authenticate(request: web.Request) -> Principal:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise errors.AuthenticationError(
                "a token is required (header Authorization: Bearer <token>)"
            )
        claims = verify(value.strip())
        return Principal(subject=claims.sub, role=claims.role, jti=claims.jti)

    return authenticate


def require(request: web.Request, roles: frozenset[str], action: str) -> Principal:
    """The caller, if its role may do `action`; else PermissionDeniedError."""
    principal = request[PRINCIPAL_KEY]
    if principal.role not in roles:
        raise errors.PermissionDeniedError(f"role {principal.role!r} may not {action}")
    return principal


def build(authenticator: Authenticator, on_denied: DenialHook | None = None) -> list[Any]:
    """The middleware chain, outermost first."""

    @web.middleware
    async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else ""
        request[REQUEST_ID_KEY] = request_id or uuid.uuid4().hex
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = _http_exception(exc)
        except Exception as exc:
            response = _translate(exc)
            if on_denied is not None and response.status in (401, 403):
                on_denied(request, response.status, str(exc))
        if not response.prepared:
            response.headers["X-Request-ID"] = request[REQUEST_ID_KEY]
            response.headers["X-Response-Time-ms"] = f"{(time.perf_counter() - started) * 1000:.2f}"
            if response.content_type == "application/json":
                response.headers["Cache-Control"] = "no-store"
        return response

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        public = request.path in PUBLIC_PATHS or (
            resource is not None and resource.canonical in PUBLIC_ROUTES
        )
        if not public:
            request[PRINCIPAL_KEY] = await authenticator(request)
        return await handler(request)

    return [envelope, authenticate]


def stream_headers(request: web.Request) -> dict[str, str]:
    """Headers for a streaming response, which the envelope cannot add after prepare()."""
    return {
        "X-Request-ID": request[REQUEST_ID_KEY],
        "Cache-Control": "no-store",
        "X-Response-Time-ms": "0",
    }
