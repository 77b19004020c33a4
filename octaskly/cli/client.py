"""A small blocking client of the REST API for the CLI (stdlib only, so it starts fast)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from octaskly import errors


class APIError(errors.OctasklyError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise errors.ConfigError(f"API URL {base_url!r} must look like http://HOST:PORT")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise APIError(exc.code, _error_message(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise errors.TemporaryError(
                f"cannot reach the dispatcher API at {self.base_url}: {reason}"
            ) from None

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        with self._request(method, path, body, headers) as response:
            return json.loads(response.read() or b"null")

    def stream(self, path: str) -> Iterator[dict[str, Any]]:
        """Yield the NDJSON events of a streaming endpoint until it ends."""
        with self._request("GET", path, timeout=24 * 3600) as response:
            for line in response:
                if line.strip():
                    yield json.loads(line)


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return str(body.get("error") or body)
    except (ValueError, AttributeError):
        return f"HTTP {exc.code} {exc.reason}"
