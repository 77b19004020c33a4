"""A small blocking client of the REST API for the CLI (stdlib only, so it starts fast).

Given several API URLs (primary and standby), it finds the primary and rides out a
failover: a node that is unreachable, or answers 503 as a standby or mid-switchover, is
skipped, and the round is retried with backoff for up to `failover_wait` seconds. A
request is repeated only when that cannot run it twice: the node refused the connection
or answered 503 before doing anything, or the request is idempotent (reads, cancel, and
submits, which always carry an Idempotency-Key that the standby has replicated). A node
reporting an older term (X-Octaskly-Term) than one already seen is a deposed primary and
is not believed.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from octaskly import errors

FAILOVER_WAIT = 30.0
"""Seconds a command with several API URLs keeps looking for a primary."""


class APIError(errors.OctasklyError):
    def __init__(self, status: int, message: str, role: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.role = role


class _NotPrimary(Exception):
    """Try the next URL: the node is not (or no longer) the primary."""


def split_urls(value: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    for url in urls:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise errors.ConfigError(f"API URL {url!r} must look like http://HOST:PORT")
    if not urls:
        raise errors.ConfigError("no API URL given")
    return urls


class Client:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        failover_wait: float | None = None,
    ) -> None:
        self.urls = split_urls(base_url)
        self.token = token
        self.timeout = timeout
        self.failover_wait = (
            failover_wait
            if failover_wait is not None
            else FAILOVER_WAIT
            if len(self.urls) > 1
            else 0
        )
        self._current = 0
        self.term = 0
        """The highest term a node reported."""

    @property
    def base_url(self) -> str:
        return self.urls[self._current]

    def _open(
        self,
        url: str,
        method: str,
        path: str,
        data: bytes | None,
        headers: dict[str, str] | None,
        timeout: float | None,
    ) -> Any:
        req = urllib.request.Request(url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            response = urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            role = exc.headers.get("X-Octaskly-Role")
            self._check_term(exc.headers.get("X-Octaskly-Term"))
            message = _error_message(exc)
            if exc.code == 503 and role is not None and path.startswith("/api/v1/"):
                raise _NotPrimary(message) from None
            raise APIError(exc.code, message, role) from None
        try:
            self._check_term(response.headers.get("X-Octaskly-Term"))
        except _NotPrimary:
            response.close()
            raise
        return response

    def _check_term(self, raw: str | None) -> None:
        if raw is None or not raw.isdigit():
            return
        term = int(raw)
        if term < self.term:
            raise _NotPrimary(f"it reports term {term}, older than term {self.term}")
        self.term = term

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        repeatable = method in ("GET", "DELETE") or "Idempotency-Key" in (headers or {})
        deadline = time.monotonic() + self.failover_wait
        delay = 0.2
        while True:
            problems: list[str] = []
            for i in [*range(self._current, len(self.urls)), *range(self._current)]:
                url = self.urls[i]
                try:
                    response = self._open(url, method, path, data, headers, timeout)
                except _NotPrimary as exc:
                    problems.append(f"{url}: {exc}")
                    continue
                except (urllib.error.URLError, OSError) as exc:
                    reason = getattr(exc, "reason", exc)
                    refused = isinstance(reason, ConnectionRefusedError)
                    if not (refused or repeatable):
                        raise errors.TemporaryError(
                            f"the dispatcher API at {url} failed mid-request ({reason}); the "
                            "request may or may not have been carried out"
                        ) from None
                    problems.append(f"cannot reach the dispatcher API at {url}: {reason}")
                    continue
                self._current = i
                return response
            if time.monotonic() + delay > deadline:
                raise errors.TemporaryError("; ".join(problems))
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        with self._request(method, path, body, headers) as response:
            return json.loads(response.read() or b"null")

    def call_each(self, method: str, path: str) -> list[tuple[str, Any]]:
        """The same request to every URL, for views of all nodes: (url, body or error)."""
        out: list[tuple[str, Any]] = []
        for url in self.urls:
            try:
                with self._open(url, method, path, None, None, None) as response:
                    out.append((url, json.loads(response.read() or b"null")))
            except (APIError, _NotPrimary) as exc:
                out.append((url, exc))
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                out.append((url, errors.TemporaryError(f"cannot reach it: {reason}")))
        return out

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
