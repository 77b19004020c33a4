"""The aiohttp application: routes, middleware and the OpenAPI document."""

from __future__ import annotations

from aiohttp import web

from octaskly.api import middleware, openapi, routes
from octaskly.services.dispatcher import Dispatcher

MAX_BODY_BYTES = 64 * 1024 * 1024


def build(
    dispatcher: Dispatcher, *, authenticator: middleware.Authenticator = middleware.allow_all
) -> web.Application:
    app = web.Application(
        middlewares=middleware.build(authenticator), client_max_size=MAX_BODY_BYTES
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
    app.router.add_get("/health", routes.health)
    app.router.add_get("/ready", routes.ready)
    return app
