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
import json
import logging
import secrets
import time
from typing import Any, cast

import kopf
from kubernetes.client import exceptions

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
    problems = c.problems()
    if problems:  # (the CRD's rules refuse these; an API server without them may not)
        kopf.warn(body, reason="InvalidSpec", message="spec not applied: " + "; ".join(problems))
        return
    k = _kube()
    await asyncio.to_thread(ensure_secret, k, c)
    errors, dispatchers_applied = await asyncio.to_thread(apply_all, k, c)
    switched = False
    for api_version, kind, gone in model.absent(c):
        if kind in ("StatefulSet", "Deployment") and not dispatchers_applied:
            continue  # the other mode's dispatchers stay until this mode's are in place
        if await asyncio.to_thread(remove, k, c, api_version, kind, gone):
            kopf.info(body, reason="Removed", message=f"{kind} {gone} is no longer wanted")
            switched = switched or kind in ("StatefulSet", "Deployment")
    if switched:
        kopf.warn(body, reason="ModeChanged", message=mode_change_message(c))
    if errors:
        kopf.warn(body, reason="ApplyFailed", message="; ".join(errors))
        raise kopf.TemporaryError("; ".join(errors), delay=30)
    patch.status["observedGeneration"] = meta.get("generation")
    if c.database is not None:
        secret_name, key = c.url_secret
        dispatchers = (
            f"{c.dispatcher_replicas} active dispatchers on PostgreSQL (Secret {secret_name} "
            f"key {key}; backups are the database's job)"
        )
    else:
        dispatchers = f"{c.dispatcher_replicas} dispatchers"
    kopf.info(
        body,
        reason="Reconciled",
        message=f"{len(model.desired(c))} objects applied "
        f"({dispatchers}, {c.workers.get('replicas', 2)} workers)",
    )


def apply_all(k: kube.Kube, c: model.Cluster) -> tuple[list[str], bool]:
    """Apply every object the spec wants; one the API server refuses (e.g. a claim that
    cannot shrink) does not stop the others. Returns what failed, and whether the
    dispatchers' workload (StatefulSet or Deployment) was applied."""
    errors, dispatchers_applied = [], True
    for obj in model.desired(c):
        try:
            k.apply(obj)
        except exceptions.ApiException as exc:
            kind, name = obj["kind"], obj["metadata"]["name"]
            errors.append(f"{kind} {name}: {_reason(exc)}")
            if kind in ("StatefulSet", "Deployment") and name == c.n("dispatcher"):
                dispatchers_applied = False
    return errors, dispatchers_applied


def _reason(exc: exceptions.ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)[:300]
    except (ValueError, TypeError, AttributeError):
        return str(exc.reason)


def mode_change_message(c: model.Cluster) -> str:
    if c.database is not None:
        return (
            "dispatchers now keep the queue in PostgreSQL; nothing was copied from the "
            "SQLite volumes (octaskly migrate --from sqlite:… --to postgresql://… does that), "
            f"which are kept: data-{c.n('dispatcher')}-0/1"
        )
    return (
        "dispatchers now keep the queue in SQLite volumes; nothing was copied from "
        "PostgreSQL, and volumes kept from an earlier SQLite mode are reused as they are"
    )


def _owned(obj: dict[str, Any], c: model.Cluster) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(ref.get("uid") == c.uid for ref in refs)


def remove(k: kube.Kube, c: model.Cluster, api_version: str, kind: str, name: str) -> bool:
    """Delete an object the spec no longer wants — only if this cluster owns it. A
    StatefulSet's data volumes are kept even with retainOnDelete: false (they are the
    SQLite queue a switch to database mode may still need to migrate)."""
    found = k.get(api_version, kind, name, c.namespace)
    if found is None:
        return False
    if not _owned(found, c):
        log.warning("not deleting %s %s/%s: not owned by this cluster", kind, c.namespace, name)
        return False
    if kind == "StatefulSet":
        keep_claims(k, c, found)
    return k.delete(api_version, kind, name, c.namespace)


def keep_claims(k: kube.Kube, c: model.Cluster, sts: dict[str, Any]) -> None:
    """Make the StatefulSet's claims outlive it: retention Retain, and no owner reference
    to it left on them (the garbage collector would delete them with it)."""
    name, sts_uid = sts["metadata"]["name"], sts["metadata"]["uid"]
    policy = (sts.get("spec") or {}).get("persistentVolumeClaimRetentionPolicy") or {}
    if policy.get("whenDeleted", "Retain") != "Retain":
        retain = {"whenDeleted": "Retain", "whenScaled": "Retain"}
        k.patch(*model.STATEFULSET, name, c.namespace,
                {"spec": {"persistentVolumeClaimRetentionPolicy": retain}})  # fmt: skip
    for _ in range(5):
        claims = k.list("v1", "PersistentVolumeClaim", c.namespace, c.selector("dispatcher"))
        held = [
            pvc
            for pvc in claims
            if any(r.get("uid") == sts_uid for r in pvc["metadata"].get("ownerReferences") or [])
        ]
        if not held:
            return
        for pvc in held:
            meta = pvc["metadata"]
            refs = [r for r in meta.get("ownerReferences") or [] if r.get("uid") != sts_uid]
            body = {"metadata": {"resourceVersion": meta["resourceVersion"],
                                 "ownerReferences": refs or None}}  # fmt: skip
            try:
                k.patch("v1", "PersistentVolumeClaim", meta["name"], c.namespace, body)
            except exceptions.ApiException as exc:
                if exc.status not in (404, 409):  # changed meanwhile: read again
                    raise
    raise kopf.TemporaryError("the dispatcher volumes still belong to the StatefulSet", delay=5)


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
    if c.problems():
        return  # nothing is applied for a spec that contradicts itself
    ensure_secret(k, c)
    for error in apply_all(k, c)[0]:
        log.warning("%s/%s: %s", c.namespace, c.name, error)


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
    if not roles.primary_ready and before in (None, "Provisioning", "Failed"):
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
    gen = meta.get("generation")
    previous = status.get("conditions") or []
    problems = c.problems()
    if problems:
        return _observe_refused(k, obj, c, status, problems)
    pods = {
        p["metadata"]["name"]: p
        for p in k.list("v1", "Pod", c.namespace, c.dispatcher_selector())
        # (SQLite: not the pods of database mode, which may linger after a switch)
        if c.database is not None
        or (p["metadata"].get("labels") or {}).get(model.MODE_LABEL) != model.DATABASE
    }
    key_rotation = rotation.step(k, c, obj)
    rotating = bool(key_rotation.pop("rotating", False))
    deployment = k.get("apps/v1", "Deployment", c.n("workers"), c.namespace) or {}
    dstatus = deployment.get("status") or {}
    desired = int((spec.get("workers") or {}).get("replicas", 2))
    ready = int(dstatus.get("readyReplicas") or 0)
    current = int(dstatus.get("replicas") or 0)
    live = [p for p in pods.values() if not p["metadata"].get("deletionTimestamp")]
    dispatchers_ready = sum(1 for p in live if pod_ready(p))
    dispatchers = {
        "desired": c.dispatcher_replicas,
        "current": len(live),
        "ready": dispatchers_ready,
        "text": f"{dispatchers_ready}/{c.dispatcher_replicas}",
    }
    workers_ready = _condition(
        previous,
        "WorkersReady",
        ready >= desired,
        "AllReady" if ready >= desired else "NotAllReady",
        f"{ready}/{desired} ready",
        gen,
    )
    key_rotating = _condition(
        previous,
        "KeyRotating",
        rotating,
        "InGracePeriod" if rotating else "Idle",
        "old and new keys both accepted" if rotating else "one key",
        gen,
    )
    spec_valid = _condition(previous, "SpecValid", True, "Valid", "spec applied", gen)
    if c.database is not None:
        phase, message, fields, mode_conditions = _observe_database(
            k, c, status, live, ready, desired, previous, gen
        )
    else:
        phase, message, fields, mode_conditions = _observe_sqlite(
            k, c, obj, status, pods, ready, desired, previous, gen
        )
    ready_condition, second, backup = mode_conditions
    conditions = [ready_condition, second, workers_ready, backup, key_rotating, spec_valid]
    new_status: dict[str, Any] = {
        "phase": phase,
        "message": message,
        **fields,
        "mode": c.mode,
        "dispatchers": dispatchers,
        "workers": {
            "desired": desired,
            "current": current,
            "ready": ready,
            "text": f"{ready}/{desired}",
            "selector": ",".join(f"{k_}={v}" for k_, v in c.selector("worker").items()),
        },
        "conditions": conditions,
    }
    new_status.update(key_rotation)
    if status.get("phase") != phase:
        event(k, obj, "Normal" if phase == "Healthy" else "Warning", phase, message)
    k.patch_status(model.GROUP, model.VERSION, model.PLURAL, c.name, c.namespace, new_status)
    return new_status


def _observe_sqlite(
    k: kube.Kube,
    c: model.Cluster,
    obj: dict[str, Any],
    status: dict[str, Any],
    pods: dict[str, dict[str, Any]],
    ready: int,
    desired: int,
    previous: list[dict[str, Any]],
    gen: Any,
) -> tuple[str, str, dict[str, Any], list[dict[str, Any]]]:
    """Primary and standby: failover, rollout, the primary label, backups. Returns the
    phase, its message, status fields and the conditions Ready, StandbyReady and
    LastBackupSucceeded."""
    roles = _roles(k, c, obj, status, pods)
    primary, standby = roles.primary, roles.standby
    primary_ready, standby_ready = roles.primary_ready, roles.standby_ready
    _label_roles(k, c, pods, primary)
    cron = k.get("batch/v1", "CronJob", c.n("backup"), c.namespace) or {}
    last_backup = (cron.get("status") or {}).get("lastSuccessfulTime")
    last_schedule = (cron.get("status") or {}).get("lastScheduleTime")
    backup_ok = bool(last_backup) and (not last_schedule or last_backup >= last_schedule)
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
            "LastBackupSucceeded",
            backup_ok,
            "Succeeded" if backup_ok else ("NoBackupYet" if not last_backup else "Failed"),
            f"last successful backup {last_backup or 'never'}",
            gen,
        ),
    ]
    fields: dict[str, Any] = {"currentPrimary": primary, "currentStandby": standby or ""}
    fields.update(roles.failover)
    if last_backup:
        fields["lastBackup"] = last_backup
        fields["lastBackupSucceeded"] = backup_ok
    return phase, message, fields, conditions


def _observe_database(
    k: kube.Kube,
    c: model.Cluster,
    status: dict[str, Any],
    live: list[dict[str, Any]],
    ready: int,
    desired: int,
    previous: list[dict[str, Any]],
    gen: Any,
) -> tuple[str, str, dict[str, Any], list[dict[str, Any]]]:
    """All dispatchers active on PostgreSQL: no roles, failover or switchover (the
    dispatchers' leases move a dead one's runs; PostgreSQL replicates itself), no backups.
    Returns the phase, its message, status fields and the conditions Ready,
    DispatchersReady and LastBackupSucceeded."""
    want = c.dispatcher_replicas
    up = sum(1 for p in live if pod_ready(p))
    dep = k.get(*model.DEPLOYMENT, c.n("dispatcher"), c.namespace) or {}
    dst = dep.get("status") or {}
    updated, total = int(dst.get("updatedReplicas") or 0), int(dst.get("replicas") or 0)
    pending = int((dep.get("metadata") or {}).get("generation") or 0) > int(
        dst.get("observedGeneration") or 0
    )
    rolling = bool(dep) and (pending or updated < want or total > updated)
    hint = _waiting(live)
    before = status.get("phase")
    if up == 0 and before in (None, "Provisioning", "Failed"):  # (Failed: a refused spec)
        phase, message = "Provisioning", "waiting for a dispatcher to be ready" + hint
    elif rolling:
        phase = "Upgrading"
        message = f"rolling the dispatchers onto a new template ({updated}/{want} updated)"
    elif up >= want and ready >= desired:
        phase, message = "Healthy", "all dispatchers and workers are ready"
    else:
        missing = []
        if up < want:
            missing.append(f"{up}/{want} dispatchers ready")
        if ready < desired:
            missing.append(f"{ready}/{desired} workers ready")
        phase, message = "Degraded", "; ".join(missing) + hint
    conditions = [
        _condition(
            previous,
            "Ready",
            up > 0,
            "DispatcherReady" if up else "NoDispatcherReady",
            f"{up}/{want} dispatchers ready (all active)",
            gen,
        ),
        _condition(
            previous,
            "DispatchersReady",
            up >= want,
            "AllReady" if up >= want else "NotAllReady",
            f"{up}/{want} ready",
            gen,
        ),
        {
            **_condition(
                previous,
                "LastBackupSucceeded",
                False,
                "DatabaseManaged",
                "database mode: backups are the database's job (pg_dump, or your "
                "PostgreSQL operator's backups); the operator runs none",
                gen,
            ),
            "status": "Unknown",
        },
    ]
    # what only SQLite mode has: cleared (a merge patch deletes keys set to null)
    fields = dict.fromkeys(
        ("currentPrimary", "currentStandby", "term", "lastFailover", "lastBackup",
         "lastBackupSucceeded")
    )  # fmt: skip
    return phase, message, fields, conditions


def _waiting(pods: list[dict[str, Any]]) -> str:
    """Why a pod's container does not start, from its status (e.g. a missing Secret)."""
    for pod in pods:
        if pod_ready(pod):
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") and waiting.get("reason") != "ContainerCreating":
                detail = f": {waiting['message']}" if waiting.get("message") else ""
                return f" ({pod['metadata']['name']}: {waiting['reason']}{detail})"
    return ""


def _observe_refused(
    k: kube.Kube,
    obj: dict[str, Any],
    c: model.Cluster,
    status: dict[str, Any],
    problems: list[str],
) -> dict[str, Any]:
    """A spec that contradicts itself: nothing is applied, failed over or rotated until
    it is fixed; the status and an Event say why."""
    message = "spec not applied: " + "; ".join(problems)
    gen = obj["metadata"].get("generation")
    previous = status.get("conditions") or []
    conditions = [cond for cond in previous if cond.get("type") != "SpecValid"]
    conditions.append(_condition(previous, "SpecValid", False, "Contradictory", message, gen))
    new_status = {"phase": "Failed", "message": message, "conditions": conditions}
    if status.get("phase") != "Failed" or status.get("message") != message:
        event(k, obj, "Warning", "InvalidSpec", message)
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
