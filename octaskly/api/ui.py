"""The web dashboard at /ui: three static files shipped in the package (no build step, no
CDN), served without a token — they hold no data. The page logs in with a token that it
keeps in the tab's sessionStorage and sends as `Authorization: Bearer` to the REST API
and to the server-sent events it reads (`GET /api/v1/events`), like any other client.

The content security policy allows only this origin's script, style and API: no inline
script, no third-party anything, and the page cannot be framed.
"""

from __future__ import annotations

import hashlib
import importlib.resources

from aiohttp import web

from octaskly.api.middleware import HTTPProblem

ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
    "icon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated with the ETag: an upgrade shows at once
}


class Assets:
    """The dashboard's files, read once from the package (a wheel, a source tree or the
    zipapp's unpacked site-packages alike)."""

    def __init__(self) -> None:
        root = importlib.resources.files("octaskly") / "ui"
        self._files: dict[str, tuple[bytes, str]] = {}
        for name in ASSETS:
            body = (root / name).read_bytes()
            self._files[name] = (body, f'"{hashlib.sha256(body).hexdigest()[:32]}"')

    def response(self, request: web.Request, name: str) -> web.Response:
        if name not in self._files:
            raise HTTPProblem(404, f"no such dashboard file {name[:80]!r}")
        body, etag = self._files[name]
        headers = {**SECURITY_HEADERS, "ETag": etag}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=ASSETS[name], headers=headers)


def add_routes(app: web.Application) -> None:
    assets = Assets()

    async def redirect(request: web.Request) -> web.Response:
        # (returned, not raised: the API's envelope turns raised HTTP errors into JSON)
        return web.Response(status=302, headers={"Location": "/ui/", **SECURITY_HEADERS})

    async def page(request: web.Request) -> web.Response:
        return assets.response(request, "index.html")

    async def asset(request: web.Request) -> web.Response:
        return assets.response(request, request.match_info["asset"])

    app.router.add_get("/ui", redirect)
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/{asset}", asset)
