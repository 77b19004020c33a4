"""Failover on Kubernetes: the operator, not the dispatchers, decides (they run with
`auto_failover = false`). When the primary pod has been unready (or gone) for
`failoverTimeoutSeconds` and the standby pod is ready, the operator:

1. takes the leadership Lease `N-primary` for the standby (holderIdentity, one more
   leaseTransition) — the record of who may write, fenced by the dispatchers' term;
2. asks the standby to promote itself (`POST /api/v1/ha/promote`, an admin token signed
   with the cluster key). A standby that may lack acknowledged writes refuses: the
   operator reports that (Event `FailoverBlocked`) and does not force it;
3. moves the `octaskly.io/role=primary` label (the `N-rw` Service follows it) and records
   `currentPrimary`, `term` and `lastFailover` in the status, with Events.

A returning old primary finds the newer term on its own and rejoins as standby.

None of this happens in database mode (`spec.database`): all dispatchers are active, a
dead one's runs move to the others when its lease in the database runs out, and
PostgreSQL's own replication carries durability.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from kubernetes.client import exceptions

from octaskly.services import tokens
from octaskly_operator import handlers, kube, model

log = logging.getLogger(__name__)

_missing_since: dict[tuple[str, str], float] = {}


def lost_for(c: model.Cluster, name: str, pod: dict[str, Any] | None) -> float:
    """Seconds the primary pod has been unready (or missing), as far as we can tell."""
    key = (c.namespace, name)
    if pod is None:
        first = _missing_since.setdefault(key, time.monotonic())
        return time.monotonic() - first
    _missing_since.pop(key, None)
    status = pod.get("status") or {}
    if status.get("phase") in ("Failed", "Succeeded") or pod["metadata"].get("deletionTimestamp"):
        return float("inf")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready" and condition.get("status") != "True":
            since = condition.get("lastTransitionTime")
            if not since:
                return 0.0
            when = since if isinstance(since, datetime.datetime) else _parse(str(since))
            return (datetime.datetime.now(datetime.UTC) - when).total_seconds()
    return 0.0


def _parse(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def admin_token(k: kube.Kube, c: model.Cluster) -> str:
    key = handlers.secret_value(k, c)
    if key is None:
        raise RuntimeError(f"no cluster key in Secret {c.n('key')}")
    signed, _ = tokens.sign(
        tokens.signing_key(key.encode()),
        subject="octaskly-operator",
        role="admin",
        ttl=300,
        now=time.time(),
    )
    return signed


def _take_lease(k: kube.Kube, c: model.Cluster, holder: str) -> int:
    """Record `holder` as the primary in the Lease; returns its transitions count."""
    name = c.n("primary")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    current = k.get("coordination.k8s.io/v1", "Lease", name, c.namespace)
    transitions = int(((current or {}).get("spec") or {}).get("leaseTransitions") or 0)
    if current is not None and (current.get("spec") or {}).get("holderIdentity") == holder:
        return transitions
    count = transitions + 1 if current is not None else 0
    lease: dict[str, Any] = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": c.meta(name, "dispatcher"),
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": int(c.dispatcher.get("failoverTimeoutSeconds", 5)),
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": count,
        },
    }
    k.apply(lease)
    return count


def promote(
    k: kube.Kube, c: model.Cluster, obj: dict[str, Any], standby: dict[str, Any], lost: float
) -> dict[str, Any] | None:
    """Promote the standby pod; the status fields to record, or None if it did not happen.
    Never in database mode: there is no standby (every dispatcher is active)."""
    if c.database is not None:
        return None
    name = standby["metadata"]["name"]
    ip = (standby.get("status") or {}).get("podIP")
    if not ip:
        handlers.event(k, obj, "Warning", "FailoverBlocked", f"standby {name} has no pod IP yet")
        return None
    handlers.event(
        k,
        obj,
        "Warning",
        "FailingOver",
        f"primary unready for {lost:.0f}s: promoting the standby {name}",
    )
    try:
        body = post(k, c, ip, "/api/v1/ha/promote", {}, timeout=10)
    except urllib.error.HTTPError as exc:
        reason = error_text(exc)
        if exc.code == 409 and "already" in reason:  # promoted earlier (we died mid-way)
            body = {"term": None}
        else:
            handlers.event(k, obj, "Warning", "FailoverBlocked", f"{name}: {reason}")
            log.warning("failover of %s/%s blocked: %s", c.namespace, c.name, reason)
            return None
    except (urllib.error.URLError, OSError) as exc:
        handlers.event(k, obj, "Warning", "FailoverBlocked", f"{name} unreachable: {exc}")
        return None
    try:
        transitions = _take_lease(k, c, name)
    except exceptions.ApiException as exc:
        log.warning("could not record the lease: %s", exc)
        transitions = None
    handlers.event(
        k,
        obj,
        "Normal",
        "FailedOver",
        f"{name} is the primary now (term {body.get('term')}, lease transition {transitions})",
    )
    log.warning("failed over %s/%s to %s", c.namespace, c.name, name)
    out: dict[str, Any] = {
        "lastFailover": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    }
    if body.get("term"):
        out["term"] = int(body["term"])
    return out


def post(
    k: kube.Kube, c: model.Cluster, ip: str, path: str, body: dict[str, Any], *, timeout: float
) -> dict[str, Any]:
    """POST to the API of the dispatcher at `ip` as admin (a short token signed with the
    cluster key); its JSON answer. Raises urllib's HTTPError / URLError."""
    request = urllib.request.Request(
        f"http://{ip}:{model.API_PORT}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {admin_token(k, c)}",
        },
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error"))
    except (ValueError, AttributeError):
        return f"HTTP {exc.code}"
