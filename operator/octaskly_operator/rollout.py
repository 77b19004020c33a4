"""Rolling the dispatchers onto a new pod template (image, resources, config), in
CloudNativePG's order, one step per observation:

1. the standby, if outdated, is deleted (the StatefulSet recreates it from the new
   template; `updateStrategy: OnDelete` leaves the timing to us) and must be ready again;
2. then, if the primary is outdated, the operator asks it to switch over
   (`POST /api/v1/ha/switchover`: writes pause, the up-to-date standby catches up and
   takes over with no loss) and moves the primary label;
3. the old primary — now the standby — is deleted and comes back from the new template.

A single dispatcher (no standby) can only be restarted: its pod is deleted once, with
the downtime that implies.
"""

from __future__ import annotations

import logging
import urllib.error
from typing import Any

from octaskly_operator import failover, handlers, kube, model

log = logging.getLogger(__name__)


def _revision(pod: dict[str, Any]) -> str | None:
    labels = pod["metadata"].get("labels") or {}
    return labels.get("controller-revision-hash")


def step(
    k: kube.Kube,
    c: model.Cluster,
    obj: dict[str, Any],
    pods: dict[str, dict[str, Any]],
    primary: str,
    standby: str | None,
) -> tuple[str, str | None, str | None]:
    """One step of a rollout if one is due: (primary, standby, phase or None). Database
    mode has no StatefulSet: its Deployment rolls itself (maxUnavailable 0)."""
    if c.database is not None:
        return primary, standby, None
    sts = k.get("apps/v1", "StatefulSet", c.n("dispatcher"), c.namespace) or {}
    target = (sts.get("status") or {}).get("updateRevision")
    if not target:
        return primary, standby, None
    outdated = {name for name, pod in pods.items() if _revision(pod) not in (None, target)}
    if not outdated:
        return primary, standby, None
    ready = {name for name, pod in pods.items() if handlers.pod_ready(pod)}
    if standby is not None and standby in outdated:
        if standby in ready or standby not in pods:
            handlers.event(k, obj, "Normal", "Upgrading", f"replacing the standby {standby}")
            k.delete("v1", "Pod", standby, c.namespace)
        return primary, standby, "Upgrading"
    if primary in outdated:
        if standby is None:
            handlers.event(k, obj, "Normal", "Upgrading", f"restarting {primary} (no standby)")
            k.delete("v1", "Pod", primary, c.namespace)
            return primary, standby, "Upgrading"
        if standby not in ready:
            return primary, standby, "Upgrading"  # wait for the new standby
        new_primary, new_standby = _switch(k, c, obj, pods, primary, standby, "rolling update")
        return new_primary, new_standby, "SwitchingOver" if new_primary == standby else "Upgrading"
    return primary, standby, None


def hand_back(
    k: kube.Kube,
    c: model.Cluster,
    obj: dict[str, Any],
    pods: dict[str, dict[str, Any]],
    primary: str,
    standby: str | None,
) -> tuple[str, str | None, str | None]:
    """The standby is being turned off while pod 1 is the primary: switch over to pod 0,
    which stays; only then may the StatefulSet shrink to one pod."""
    assert standby is not None
    if c.database is not None:
        return primary, standby, None
    new_primary, new_standby = _switch(k, c, obj, pods, primary, standby, "standby turned off")
    return new_primary, new_standby, "SwitchingOver"


def _switch(
    k: kube.Kube,
    c: model.Cluster,
    obj: dict[str, Any],
    pods: dict[str, dict[str, Any]],
    primary: str,
    standby: str,
    why: str,
) -> tuple[str, str]:
    """Switch over from `primary` to `standby` (with Events): the new (primary, standby)."""
    handlers.event(
        k, obj, "Normal", "SwitchingOver", f"{why}: switching over from {primary} to {standby}"
    )
    if not _switchover(k, c, obj, pods[primary]):
        return primary, standby
    handlers.event(k, obj, "Normal", "SwitchedOver", f"{standby} is the primary now")
    return standby, primary


def _switchover(k: kube.Kube, c: model.Cluster, obj: dict[str, Any], pod: dict[str, Any]) -> bool:
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return False
    try:
        body = failover.post(k, c, ip, "/api/v1/ha/switchover", {"timeout": 60}, timeout=90)
    except urllib.error.HTTPError as exc:
        handlers.event(k, obj, "Warning", "SwitchoverFailed", failover.error_text(exc))
        return False
    except (urllib.error.URLError, OSError) as exc:
        handlers.event(k, obj, "Warning", "SwitchoverFailed", str(exc))
        return False
    log.info("switched over %s/%s: %s", c.namespace, c.name, body)
    return True
