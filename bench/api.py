"""Talking to the REST API: the optional bearer token and small synchronous helpers."""

from __future__ import annotations

import datetime
import json
import os
import urllib.error
import urllib.request
from typing import Any

TOKEN_ENV = "OCTASKLY_TOKEN"


def headers() -> dict[str, str]:
    """`Authorization: Bearer <token>`: the admin token of the cluster under test (the
    harness puts the dispatcher's admin.token in $OCTASKLY_TOKEN), as every client must."""
    token = os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


def auth_note() -> str:
    return "API auth: on (require_auth = true); every request carries a JWT bearer token."


def get_json(url: str, *, timeout: float = 5.0) -> tuple[int, Any]:
    """GET `url`; (status, parsed body). Connection errors raise OSError."""
    request = urllib.request.Request(url, headers=headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def parse_time(value: str | None) -> float | None:
    """An RFC 3339 timestamp of the API (millisecond resolution) as epoch seconds."""
    if value is None:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
