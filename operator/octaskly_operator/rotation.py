"""Rotating a cluster's key with a grace period, so that no worker drops a task.

The key Secret's `secret.key` lists the current key first and keys still accepted after
it; dispatchers and workers re-read the mounted file when the kubelet updates it. A
rotation — every `spec.secret.rotationInterval`, or at once when the annotation
`octaskly.io/rotate-key` is set to a new value — goes through two stages of half the
`spec.secret.gracePeriod` each:

1. `old, new`: everyone still proves with the old key; the new one is accepted;
2. `new, old`: everyone proves with the new key; the old one is still accepted;
3. `new`: the old key is retired. `status.lastRotation` and `keyGeneration` record it.

The grace must exceed how long the kubelet takes to update mounted Secrets (about a
minute by default): the default is 10 minutes.
"""

from __future__ import annotations

import base64
import datetime
import logging
import re
import secrets
import time
from typing import Any

from octaskly_operator import handlers, kube, model

log = logging.getLogger(__name__)

STAGE = "octaskly.io/rotation-stage"
SINCE = "octaskly.io/rotation-since"
ROTATED_AT = "octaskly.io/rotated-at"
REQUEST_SEEN = "octaskly.io/rotate-request-seen"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> float:
    """`720h`, `30d`, `1h30m` -> seconds (the CRD's pattern guarantees the form)."""
    return float(sum(int(n) * _UNITS[u] for n, u in re.findall(r"([0-9]+)([smhd])", text)))


def _now() -> float:
    return time.time()


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def step(k: kube.Kube, c: model.Cluster, obj: dict[str, Any]) -> dict[str, Any]:
    """Advance a rotation if one is due or under way; status fields to record."""
    secret = k.get("v1", "Secret", c.n("key"), c.namespace)
    if secret is None:
        return {}
    notes = dict(secret["metadata"].get("annotations") or {})
    raw = (secret.get("data") or {}).get(model.KEY_FILE)
    if not raw:
        return {}
    keys = [line for line in base64.b64decode(raw).decode().split("\n") if line.strip()]
    generation = int(notes.get(model.KEY_GENERATION_ANNOTATION, "1") or 1)
    spec = c.spec.get("secret") or {}
    grace = seconds(str(spec.get("gracePeriod", "10m")))
    now = _now()
    stage = notes.get(STAGE, "")
    since = float(notes.get(SINCE, "0") or 0)
    out: dict[str, Any] = {"keyGeneration": generation}
    if notes.get(ROTATED_AT):
        out["lastRotation"] = _iso(float(notes[ROTATED_AT]))
    if stage == "adding" and now - since >= grace / 2:
        old, new = keys[0], keys[-1]
        _write(k, c, [new, old], generation, {STAGE: "switching", SINCE: str(now)}, notes)
        handlers.event(k, obj, "Normal", "KeyRotating", "the new key is now current; old accepted")
        out["rotating"] = True
    elif stage == "switching" and now - since >= grace / 2:
        done = {STAGE: "", SINCE: "", ROTATED_AT: str(now)}
        _write(k, c, [keys[0]], generation + 1, done, notes)
        handlers.event(k, obj, "Normal", "KeyRotated", f"key generation {generation + 1}")
        log.info("rotated the key of %s/%s (generation %d)", c.namespace, c.name, generation + 1)
        out.update(keyGeneration=generation + 1, lastRotation=_iso(now))
    elif stage in ("adding", "switching"):
        out["rotating"] = True
    else:
        request = (obj["metadata"].get("annotations") or {}).get(model.ROTATE_ANNOTATION)
        created = _created(secret)
        last = float(notes.get(ROTATED_AT, "0") or 0) or created
        interval = seconds(str(spec.get("rotationInterval", "720h")))
        asked = request is not None and request != notes.get(REQUEST_SEEN)
        if asked or now - last >= interval:
            new = secrets.token_urlsafe(32)
            extra = {STAGE: "adding", SINCE: str(now)}
            if asked:
                extra[REQUEST_SEEN] = str(request)
            _write(k, c, [keys[0], new], generation, extra, notes)
            why = "requested by annotation" if asked else "rotation interval reached"
            handlers.event(k, obj, "Normal", "KeyRotating", f"adding a new key ({why})")
            out["rotating"] = True
    return out


def _created(secret: dict[str, Any]) -> float:
    stamp = secret["metadata"].get("creationTimestamp")
    if isinstance(stamp, datetime.datetime):
        return stamp.timestamp()
    if isinstance(stamp, str):
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return _now()


def _write(
    k: kube.Kube,
    c: model.Cluster,
    keys: list[str],
    generation: int,
    notes: dict[str, str],
    before: dict[str, str],
) -> None:
    """Apply the Secret with every annotation we manage (server-side apply removes the
    ones a manager stops sending)."""
    body = model.secret(c, keys[0], None, generation)
    body["stringData"] = {model.KEY_FILE: "\n".join(keys) + "\n"}
    kept = {key: v for key, v in before.items() if key.startswith("octaskly.io/")}
    annotations = body["metadata"].setdefault("annotations", {})
    annotations.update({**kept, **notes, model.KEY_GENERATION_ANNOTATION: str(generation)})
    k.apply(body)
