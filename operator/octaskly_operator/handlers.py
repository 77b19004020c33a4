"""The kopf handlers: reconcile an OctasklyCluster's owned objects when it is created,
changed or found at start-up, and observe every cluster in a loop to report truthful
status (from the pods and workloads as they are, never from the last handler that ran).

No finalizer: owned objects carry owner references, so deleting the cluster deletes them
(the garbage collector), and nothing else needs cleaning up. That is also why status is
observed by a loop started with the operator rather than by kopf timers, which would put
a finalizer on every cluster.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import logging
import secrets
import time
from typing import Any, cast

import kopf

from octaskly_operator import failover, kube, model, rollout, rotation

log = logging.getLogger(__name__)

OBSERVE_SECONDS = 2.0
RESYNC_SECONDS = 15.0
_resynced: dict[tuple[str, str, str], float] = {}
_state: dict[str, Any] = {}


def _kube() -> kube.Kube:
    k = _state.get("kube")
    if k is None:
        k = _state["kube"] = kube.Kube(kube.api_client(_state.get("kubeconfig")))
    assert isinstance(k, kube.Kube)
    return k


def configure(*, kubeconfig: str | None, namespaces: list[str]) -> None:
    _state.update(kubeconfig=kubeconfig, namespaces=namespaces)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: its service account; elsewhere: --kubeconfig, $KUBECONFIG or ~/.kube."""
    if not _state.get("kubeconfig"):
        info = kopf.login_with_service_account(**kwargs)
        if info is not None:
            return info
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # progress and last-handled state in annotations: undeclared status fields would be
    # dropped by the API server (the CRD declares every status field it has)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="octaskly.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="octaskly.io", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "octaskly.io/operator"
    # watch streams that go silent are a known kopf issue: make the server end them
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.posting.level = logging.INFO
    _state["observer"] = asyncio.get_running_loop().create_task(_observe_forever())


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    task = _state.pop("observer", None)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- reconcile ---------------------------------------------------------------------------------
@kopf.on.resume(model.GROUP, model.VERSION, model.PLURAL)
@kopf.on.create(model.GROUP, model.VERSION, model.PLURAL)
@kopf.on.update(model.GROUP, model.VERSION, model.PLURAL, field="spec")
async def reconcile(
    name: str,
    namespace: str | None,
    uid: str,
    spec: kopf.Spec,
    meta: kopf.Meta,
    body: kopf.Body,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    assert namespace is not None  # the CRD is namespaced
    current = (body.get("status") or {}).get("currentPrimary")
    c = model.Cluster(name, namespace, uid, dict(spec), primary=current)
    k = _kube()
    await asyncio.to_thread(ensure_secret, k, c)
    for obj in model.desired(c):
        await asyncio.to_thread(k.apply, obj)
    for api_version, kind, gone in model.absent(c):
        if await asyncio.to_thread(k.delete, api_version, kind, gone, namespace):
            kopf.info(body, reason="Removed", message=f"{kind} {gone} is no longer wanted")
    patch.status["observedGeneration"] = meta.get("generation")
    kopf.info(
        body,
        reason="Reconciled",
        message=f"{len(model.desired(c))} objects applied "
        f"({c.dispatcher_replicas} dispatchers, {c.workers.get('replicas', 2)} workers)",
    )


def ensure_secret(k: kube.Kube, c: model.Cluster) -> None:
    """The cluster key: generated once (never logged), then left alone (rotation replaces
    it deliberately)."""
    if k.get("v1", "Secret", c.n("key"), c.namespace) is not None:
        return
    k.apply(model.secret(c, secrets.token_urlsafe(32), None, 1))
    log.info("generated the cluster key for %s/%s", c.namespace, c.name)


# -- observe -----------------------------------------------------------------------------------
async def _observe_forever() -> None:
    while True:
        try:
            await asyncio.to_thread(observe_all)
        except Exception:  # a bad cluster or a flaky API must not stop the loop
            log.exception("observing clusters failed; retrying")
        await asyncio.sleep(OBSERVE_SECONDS)


def observe_all() -> None:
    k = _kube()
    namespaces = _state.get("namespaces") or [None]
    for ns in namespaces:
        if ns is None:
            items = k.custom.list_cluster_custom_object(model.GROUP, model.VERSION, model.PLURAL)
        else:
            items = k.custom.list_namespaced_custom_object(
                model.GROUP, model.VERSION, ns, model.PLURAL
            )
        listed = cast(dict[str, Any], items)
        for obj in listed.get("items", []):
            if obj["metadata"].get("deletionTimestamp"):
                continue
            resync(k, obj)
            observe(k, obj)


def resync(k: kube.Kube, obj: dict[str, Any]) -> None:
    """Every RESYNC_SECONDS, apply the owned objects again: whatever was deleted or edited
    behind the operator's back (or missed while it was down) comes back as specified."""
    meta = obj["metadata"]
    key = (meta["namespace"], meta["name"], meta["uid"])
    now = time.monotonic()
    if now - _resynced.get(key, 0.0) < RESYNC_SECONDS:
        return
    _resynced[key] = now
    current = (obj.get("status") or {}).get("currentPrimary")
    c = model.Cluster(
        meta["name"], meta["namespace"], meta["uid"], obj.get("spec") or {}, primary=current
    )
    ensure_secret(k, c)
    for desired in model.desired(c):
        k.apply(desired)


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _condition(
    previous: list[dict[str, Any]], kind: str, ok: bool, reason: str, message: str, gen: Any
) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    since = _now()
    if old is not None and old.get("status") == status:
        since = old.get("lastTransitionTime") or since
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": gen,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class Roles:
    primary: str
    standby: str | None
    primary_ready: bool
    standby_ready: bool
    failover: dict[str, Any]
    rolling: str | None


def _roles(
    k: kube.Kube,
    c: model.Cluster,
    obj: dict[str, Any],
    status: dict[str, Any],
    pods: dict[str, dict[str, Any]],
) -> Roles:
    """Who is primary now: the recorded one, unless it is lost (failover) or a rollout
    switches over."""
    primary = status.get("currentPrimary") or c.pod(0)
    if primary not in {c.pod(i) for i in range(c.dispatcher_replicas)}:
        primary = c.pod(0)
    standby = next((c.pod(i) for i in range(c.dispatcher_replicas) if c.pod(i) != primary), None)
    primary_ready = primary in pods and pod_ready(pods[primary])
    standby_ready = standby is not None and standby in pods and pod_ready(pods[standby])
    if not primary_ready and standby_ready and standby is not None:
        lost_for = failover.lost_for(c, primary, pods.get(primary))
        if lost_for >= int(c.dispatcher.get("failoverTimeoutSeconds", 5)):
            outcome = failover.promote(k, c, obj, pods[standby], lost_for)
            if outcome is not None:
                return Roles(standby, primary, True, False, outcome, None)
    rolling = None
    if primary_ready and not c.standby and primary == c.pod(1) and standby_ready:
        # the standby was turned off while pod 1 is primary: hand back to pod 0 first
        primary, standby, rolling = rollout.hand_back(k, c, obj, pods, primary, standby)
    elif primary_ready:
        primary, standby, rolling = rollout.step(k, c, obj, pods, primary, standby)
        if rolling == "SwitchingOver":
            primary_ready, standby_ready = True, False
    return Roles(primary, standby, primary_ready, standby_ready, {}, rolling)


def _phase(
    c: model.Cluster, roles: Roles, before: str | None, ready: int, desired: int
) -> tuple[str, str]:
    if roles.failover:
        return "FailingOver", f"promoted {roles.primary}"
    if roles.rolling is not None:
        return roles.rolling, "rolling the dispatchers onto a new template"
    if roles.primary_ready and (roles.standby_ready or not c.standby) and ready >= desired:
        return "Healthy", "all dispatchers and workers are ready"
    if not roles.primary_ready and before in (None, "Provisioning"):
        return "Provisioning", f"waiting for the primary {roles.primary} to be ready"
    missing = []
    if not roles.primary_ready:
        missing.append(f"primary {roles.primary} not ready")
    if c.standby and not roles.standby_ready:
        missing.append(f"standby {roles.standby} not ready")
    if ready < desired:
        missing.append(f"{ready}/{desired} workers ready")
    return "Degraded", "; ".join(missing)


def observe(k: kube.Kube, obj: dict[str, Any]) -> dict[str, Any]:
    """Read what exists, fail over if the primary is lost, label the primary, and write
    the status that is true now."""
    meta, spec = obj["metadata"], obj.get("spec") or {}
    c = model.Cluster(
        meta["name"],
        meta["namespace"],
        meta["uid"],
        spec,
        primary=(obj.get("status") or {}).get("currentPrimary"),
    )
    status = dict(obj.get("status") or {})
    pods = {
        p["metadata"]["name"]: p for p in k.list("v1", "Pod", c.namespace, c.selector("dispatcher"))
    }
    key_rotation = rotation.step(k, c, obj)
    rotating = bool(key_rotation.pop("rotating", False))
    roles = _roles(k, c, obj, status, pods)
    primary, standby = roles.primary, roles.standby
    primary_ready, standby_ready, extra = roles.primary_ready, roles.standby_ready, roles.failover
    _label_roles(k, c, pods, primary)
    deployment = k.get("apps/v1", "Deployment", c.n("workers"), c.namespace) or {}
    dstatus = deployment.get("status") or {}
    desired = int((spec.get("workers") or {}).get("replicas", 2))
    ready = int(dstatus.get("readyReplicas") or 0)
    current = int(dstatus.get("replicas") or 0)
    cron = k.get("batch/v1", "CronJob", c.n("backup"), c.namespace) or {}
    last_backup = (cron.get("status") or {}).get("lastSuccessfulTime")
    last_schedule = (cron.get("status") or {}).get("lastScheduleTime")
    backup_ok = bool(last_backup) and (not last_schedule or last_backup >= last_schedule)
    gen = meta.get("generation")
    previous = status.get("conditions") or []
    phase, message = _phase(c, roles, status.get("phase"), ready, desired)
    conditions = [
        _condition(
            previous,
            "Ready",
            primary_ready,
            "PrimaryReady" if primary_ready else "PrimaryNotReady",
            f"primary {primary}",
            gen,
        ),
        _condition(
            previous,
            "StandbyReady",
            standby_ready,
            "StandbyReady" if standby_ready else ("NoStandby" if not c.standby else "NotReady"),
            f"standby {standby}" if standby else "no standby configured",
            gen,
        ),
        _condition(
            previous,
            "WorkersReady",
            ready >= desired,
            "AllReady" if ready >= desired else "NotAllReady",
            f"{ready}/{desired} ready",
            gen,
        ),
        _condition(
            previous,
            "LastBackupSucceeded",
            backup_ok,
            "Succeeded" if backup_ok else ("NoBackupYet" if not last_backup else "Failed"),
            f"last successful backup {last_backup or 'never'}",
            gen,
        ),
        _condition(
            previous,
            "KeyRotating",
            rotating,
            "InGracePeriod" if rotating else "Idle",
            "old and new keys both accepted" if rotating else "one key",
            gen,
        ),
    ]
    new_status: dict[str, Any] = {
        "phase": phase,
        "message": message,
        "currentPrimary": primary,
        "currentStandby": standby or "",
        "workers": {
            "desired": desired,
            "current": current,
            "ready": ready,
            "text": f"{ready}/{desired}",
            "selector": ",".join(f"{k_}={v}" for k_, v in c.selector("worker").items()),
        },
        "conditions": conditions,
    }
    new_status.update(extra)
    new_status.update(key_rotation)
    if last_backup:
        new_status["lastBackup"] = last_backup
        new_status["lastBackupSucceeded"] = backup_ok
    if status.get("phase") != phase:
        event(k, obj, "Normal" if phase == "Healthy" else "Warning", phase, message)
    k.patch_status(model.GROUP, model.VERSION, model.PLURAL, c.name, c.namespace, new_status)
    return new_status


def _label_roles(
    k: kube.Kube, c: model.Cluster, pods: dict[str, dict[str, Any]], primary: str
) -> None:
    """The `N-rw` Service selects the pod labelled primary: keep exactly that one so."""
    for name, pod in pods.items():
        want = "primary" if name == primary else "standby"
        if (pod["metadata"].get("labels") or {}).get(model.ROLE_LABEL) != want:
            k.patch_labels(name, c.namespace, {model.ROLE_LABEL: want})


def event(k: kube.Kube, obj: dict[str, Any], kind: str, reason: str, message: str) -> None:
    meta = obj["metadata"]
    now = datetime.datetime.now(datetime.UTC)
    body = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": kind,
        "reason": reason,
        "message": message[:1000],
        "source": {"component": "octaskly-operator"},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        k.core.create_namespaced_event(meta["namespace"], body)  # type: ignore[arg-type]
    except Exception as exc:  # an event is best effort
        log.warning("could not post event %s: %s", reason, exc)


def secret_value(k: kube.Kube, c: model.Cluster) -> str | None:
    found = k.get("v1", "Secret", c.n("key"), c.namespace)
    data = (found or {}).get("data") or {}
    raw = data.get(model.KEY_FILE)
    return base64.b64decode(raw).decode() if raw else None
