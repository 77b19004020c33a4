"""What one OctasklyCluster becomes: the owned Kubernetes objects, as plain dicts.

Pure functions of the resource (its name, namespace, uid and spec — with the defaults the
API server filled in from the CRD schema), so they can be checked without a cluster and
applied idempotently with server-side apply. Names, for a cluster `N`:

- `N-key` Secret (the cluster key; the previous one during a rotation's grace period)
- `N-config` ConfigMap (octaskly.toml)
- `N-dispatcher` StatefulSet (pod 0 starts as primary, pod 1 as its standby), with the
  headless Service `N-dispatcher-hl` for stable pod names
- `N-rw` Service: API (3000) and P2P (5555 TCP+UDP) of the pod labelled as the primary
- `N-workers` Deployment
- `N-backup` CronJob and (unless an existing claim is named) `N-backups` PVC
- `N-dispatcher` PodDisruptionBudget (only with a standby: never blocks a node drain of
  a single-dispatcher cluster)

With `spec.database` (an external PostgreSQL, its URL in a Secret the user manages) the
dispatchers are all active and share that database instead:

- `N-dispatcher` Deployment of `spec.dispatcher.replicas` (2) pods, labelled
  `octaskly.io/mode=database`; the URL reaches them only as `OCTASKLY_DB_URL` from a
  `secretKeyRef` (never in the ConfigMap, args or annotations), the node name from the
  pod's name, the data dir (TLS identity, audit log, instance id) on an emptyDir
- `N-rw` Service: API and P2P of every such pod (no primary: all are active); the
  workers connect through it
- `N-dispatcher` PodDisruptionBudget when there is more than one dispatcher
- no StatefulSet, headless Service, standby, backup CronJob or backup volume: backups
  and durability are the database's job (pg_dump, the PostgreSQL operator's backups)
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from typing import Any

GROUP = "octaskly.io"
VERSION = "v1alpha1"
PLURAL = "octasklyclusters"
KIND = "OctasklyCluster"

API_PORT = 3000
P2P_PORT = 5555
PYZ = "/opt/octaskly/bin/octaskly.pyz"
CONFIG_DIR = "/etc/octaskly"
KEY_DIR = "/etc/octaskly/key"
KEY_FILE = "secret.key"
DATA_DIR = "/data"
BACKUP_DIR = "/backups"

CLUSTER_LABEL = "octaskly.io/cluster"
COMPONENT_LABEL = "octaskly.io/component"
ROLE_LABEL = "octaskly.io/role"
ROTATE_ANNOTATION = "octaskly.io/rotate-key"
CONFIG_HASH_ANNOTATION = "octaskly.io/config-hash"
KEY_GENERATION_ANNOTATION = "octaskly.io/key-generation"
MODE_LABEL = "octaskly.io/mode"
"""On the dispatcher pods of database mode (and in their selectors): keeps them apart
from a StatefulSet's pods while a cluster switches modes."""
DATABASE = "database"
SQLITE = "sqlite"
DB_URL_ENV = "OCTASKLY_DB_URL"
MAX_DATABASE_DISPATCHERS = 16
SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")


class Cluster:
    """One OctasklyCluster: its identity and spec (defaults applied by the API server)."""

    def __init__(
        self,
        name: str,
        namespace: str,
        uid: str,
        spec: dict[str, Any],
        primary: str | None = None,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.uid = uid
        self.spec = spec
        self.primary = primary
        """The pod that is primary now (status.currentPrimary), when known."""

    # -- spec parts, with the schema's defaults as a fallback ------------------------------
    @property
    def dispatcher(self) -> dict[str, Any]:
        return dict(self.spec.get("dispatcher") or {})

    @property
    def workers(self) -> dict[str, Any]:
        return dict(self.spec.get("workers") or {})

    @property
    def backup(self) -> dict[str, Any]:
        return dict(self.spec.get("backup") or {})

    @property
    def image(self) -> str:
        return str(self.spec.get("image") or "octaskly:0.2.0")

    @property
    def database(self) -> dict[str, Any] | None:
        """spec.database (external PostgreSQL), or None: SQLite in the dispatchers' volumes."""
        found = self.spec.get("database")
        return dict(found) if isinstance(found, dict) else None

    @property
    def mode(self) -> str:
        return DATABASE if self.database is not None else SQLITE

    @property
    def url_secret(self) -> tuple[str, str]:
        """(Secret name, key) holding the database URL (database mode only)."""
        ref = (self.database or {}).get("urlSecret") or {}
        return str(ref.get("name") or ""), str(ref.get("key") or "uri")

    @property
    def standby(self) -> bool:
        if self.database is not None:
            return False  # every dispatcher is active; PostgreSQL replicates itself
        return bool(self.dispatcher.get("standby", True))

    @property
    def dispatcher_replicas(self) -> int:
        """Database mode: spec.dispatcher.replicas (2). SQLite: 2 with a standby; also
        while pod 1 is the primary, even once the standby is turned off: scaling down
        would remove the primary (it switches over first)."""
        if self.database is not None:
            return int(self.dispatcher.get("replicas", 2))
        return 2 if self.standby or self.primary == self.pod(1) else 1

    def problems(self) -> list[str]:
        """What contradicts itself in the spec (the CRD's CEL rules say the same; this is
        for an API server that did not check them). The operator applies nothing then."""
        d, out = self.dispatcher, []
        if self.database is None:
            if "replicas" in d:
                out.append(
                    "spec.dispatcher.replicas is for database mode (spec.database); "
                    "with SQLite use spec.dispatcher.standby"
                )
            return out
        name, key = self.url_secret
        if not SECRET_NAME.fullmatch(name) or len(name) > 253:
            out.append("spec.database.urlSecret.name must name a Secret (DNS subdomain)")
        if not SECRET_KEY.fullmatch(key) or len(key) > 253:
            out.append("spec.database.urlSecret.key must be a Secret key ([-._a-zA-Z0-9]+)")
        if not 1 <= self.dispatcher_replicas <= MAX_DATABASE_DISPATCHERS:
            out.append(f"spec.dispatcher.replicas must be 1..{MAX_DATABASE_DISPATCHERS}")
        if d.get("standby"):
            out.append(
                "spec.dispatcher.standby is for SQLite: with spec.database every "
                "dispatcher is active (set spec.dispatcher.replicas)"
            )
        if "replication" in d:
            out.append(
                "spec.dispatcher.replication is SQLite replication: with spec.database "
                "PostgreSQL's own replication carries durability"
            )
        if self.spec.get("bootstrap"):
            out.append(
                "spec.bootstrap restores a SQLite backup: with spec.database load data with "
                "octaskly migrate or pg_restore"
            )
        backup = self.spec.get("backup")
        if isinstance(backup, dict) and backup.get("enabled", True):
            out.append(
                "spec.backup is the SQLite backup CronJob: with spec.database back the "
                "database up (pg_dump, your PostgreSQL operator); remove spec.backup or set "
                "enabled: false"
            )
        return out

    # -- names -----------------------------------------------------------------------------
    def n(self, suffix: str) -> str:
        return f"{self.name}-{suffix}"

    def pod(self, ordinal: int) -> str:
        return f"{self.name}-dispatcher-{ordinal}"

    def pod_address(self, ordinal: int) -> str:
        """The P2P address of dispatcher pod `ordinal` (stable DNS via the headless Service)."""
        return f"{self.pod(ordinal)}.{self.n('dispatcher-hl')}.{self.namespace}.svc:{P2P_PORT}"

    def labels(self, component: str) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "octaskly",
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "octaskly-operator",
            CLUSTER_LABEL: self.name,
            COMPONENT_LABEL: component,
        }

    def selector(self, component: str) -> dict[str, str]:
        return {CLUSTER_LABEL: self.name, COMPONENT_LABEL: component}

    def dispatcher_selector(self) -> dict[str, str]:
        """The dispatcher pods of the current mode (database mode's carry MODE_LABEL)."""
        if self.database is not None:
            return {**self.selector("dispatcher"), MODE_LABEL: DATABASE}
        return self.selector("dispatcher")

    def rw_address(self) -> str:
        """The P2P address of the `N-rw` Service."""
        return f"{self.n('rw')}.{self.namespace}.svc:{P2P_PORT}"

    def meta(self, name: str, component: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": self.labels(component),
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": KIND,
                    "name": self.name,
                    "uid": self.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            **extra,
        }


# -- configuration -----------------------------------------------------------------------------
def config_toml(c: Cluster) -> str:
    d, w = c.dispatcher, c.workers
    if c.database is not None:  # all dispatchers active: the Service spreads the workers
        addrs = f'"{c.rw_address()}"'
    else:
        addrs = ", ".join(f'"{c.pod_address(i)}"' for i in range(c.dispatcher_replicas))
    labels = "".join(
        f"\nlabels.{json.dumps(k)} = {json.dumps(v)}"
        for k, v in sorted((w.get("labels") or {}).items())
    )
    return f"""# Written by the octaskly operator for OctasklyCluster {c.namespace}/{c.name}.
# Edit the OctasklyCluster, not this file: the operator overwrites it.

[network]
bind_address = "0.0.0.0"
port = {P2P_PORT}
api_port = {API_PORT}

[security]
secret_key_file = "{KEY_DIR}/{KEY_FILE}"
require_auth = {str(bool(d.get("requireAuth", True))).lower()}

{_storage_part(c)}
[logging]
log_level = "{d.get("logLevel", "info")}"
log_format = "json"
{WORKER_PART}
[worker]
dispatcher_addr = [{addrs}]
max_jobs = {int(w.get("maxJobs", 4))}
sandbox_level = "{w.get("sandboxLevel", "basic")}"
{labels}
"""


WORKER_PART = "\n# -- the workers' part (a change here does not restart dispatchers) --\n"


def _storage_part(c: Cluster) -> str:
    d = c.dispatcher
    if c.database is not None:
        name, key = c.url_secret
        lease = int(c.database.get("leaseSeconds", 15))
        return f"""[storage]
# db_url: only in the environment ({DB_URL_ENV}, from Secret "{name}" key "{key}")

[dispatcher]
# several dispatchers share the database, all active; node_name is the pod's name
# ($OCTASKLY_NODE_NAME); a dispatcher's runs move to the others once its lease runs out
lease_seconds = {lease}
"""
    return f"""[storage]
db_path = "{DATA_DIR}/octaskly.db"

[dispatcher]
replication = "{d.get("replication", "sync")}"
# the operator decides failovers (it holds the leadership Lease): dispatchers never
# promote themselves here
auto_failover = false
failover_timeout = {int(d.get("failoverTimeoutSeconds", 5))}
"""


def dispatcher_config(c: Cluster) -> str:
    """The part of octaskly.toml the dispatchers read (what their pods' hash covers)."""
    return config_toml(c).split(WORKER_PART)[0]


def secret(c: Cluster, key: str, previous: str | None, generation: int) -> dict[str, Any]:
    data = {KEY_FILE: key}
    if previous:
        data["previous.key"] = previous
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": c.meta(
            c.n("key"), "key", annotations={KEY_GENERATION_ANNOTATION: str(generation)}
        ),
        "type": "Opaque",
        "stringData": data,
    }


def config_map(c: Cluster) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": c.meta(c.n("config"), "config"),
        "data": {"octaskly.toml": config_toml(c)},
    }


# -- dispatchers ---------------------------------------------------------------------------------
def _volumes(c: Cluster) -> list[dict[str, Any]]:
    return [
        {"name": "config", "configMap": {"name": c.n("config")}},
        {
            "name": "key",
            "secret": {"secretName": c.n("key"), "defaultMode": 0o400},
        },
    ]


def _mounts() -> list[dict[str, Any]]:
    return [
        {"name": "config", "mountPath": f"{CONFIG_DIR}/octaskly.toml", "subPath": "octaskly.toml"},
        {"name": "key", "mountPath": KEY_DIR, "readOnly": True},
    ]


def _security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "api"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def dispatcher_script(c: Cluster) -> str:
    """Pod 0 starts as the primary, pod 1 as its standby. After a failover the roles live
    in the data (terms): a restarted dispatcher finds the current primary itself."""
    primary = shlex.quote(c.pod_address(0))
    return (
        'ordinal="${HOSTNAME##*-}"\n'
        'if [ "$ordinal" = 0 ]; then set -- --role primary\n'
        f"else set -- --role standby --primary-addr {primary}\n"
        "fi\n"
        f'exec {PYZ} dispatcher --config {CONFIG_DIR}/octaskly.toml --node-name "$HOSTNAME" '
        '--data-dir /data "$@"\n'
    )


def _dispatcher_pod(
    c: Cluster, command: list[str], env: list[dict[str, Any]], data: dict[str, Any] | None
) -> dict[str, Any]:
    """The dispatcher pod spec both modes share (probes, ports, security, resources,
    placement); `data` is the data dir's volume when it is not a claim template."""
    d = c.dispatcher
    container: dict[str, Any] = {
        "name": "dispatcher",
        "image": c.image,
        "imagePullPolicy": c.spec.get("imagePullPolicy", "IfNotPresent"),
        "command": command,
        "env": [{"name": "OCTASKLY_LOG_FORMAT", "value": "json"}, *env],
        "ports": [
            {"name": "api", "containerPort": API_PORT, "protocol": "TCP"},
            {"name": "p2p", "containerPort": P2P_PORT, "protocol": "TCP"},
            {"name": "p2p-quic", "containerPort": P2P_PORT, "protocol": "UDP"},
        ],
        "readinessProbe": _probe("/ready", 2, 1),
        "livenessProbe": _probe("/health", 10, 3),
        "volumeMounts": [*_mounts(), {"name": "data", "mountPath": DATA_DIR}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if d.get("resources"):
        container["resources"] = d["resources"]
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": _security(),
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [*_volumes(c), *([data] if data else []), {"name": "tmp", "emptyDir": {}}],
        **_placement(d),
        **_pull_secrets(c),
    }
    container["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp"})
    return pod_spec


def statefulset(c: Cluster) -> dict[str, Any]:
    d = c.dispatcher
    storage = d.get("storage") or {}
    claim: dict[str, Any] = {
        "metadata": {"name": "data", "labels": c.labels("dispatcher")},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": storage.get("size", "10Gi")}},
        },
    }
    if storage.get("storageClassName"):
        claim["spec"]["storageClassName"] = storage["storageClassName"]
    policy = "Retain" if storage.get("retainOnDelete", True) else "Delete"
    pod_spec = _dispatcher_pod(c, ["/bin/sh", "-c", dispatcher_script(c)], [], None)
    restore = (c.spec.get("bootstrap") or {}).get("restoreFrom")
    if restore:
        pod_spec["initContainers"] = [restore_container(c, restore)]
        pod_spec["volumes"].append(
            {
                "name": "restore",
                "persistentVolumeClaim": {"claimName": restore["claimName"], "readOnly": True},
            }
        )
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": c.meta(c.n("dispatcher"), "dispatcher"),
        "spec": {
            "serviceName": c.n("dispatcher-hl"),
            "replicas": c.dispatcher_replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": c.selector("dispatcher")},
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": policy, "whenScaled": "Retain"},
            # the operator rolls dispatchers itself: standby first, then a switchover,
            # then the old primary (CloudNativePG's order)
            "updateStrategy": {"type": "OnDelete"},
            "template": {
                "metadata": {
                    "labels": c.labels("dispatcher"),
                    "annotations": {CONFIG_HASH_ANNOTATION: _hash(dispatcher_config(c))},
                },
                "spec": pod_spec,
            },
            "volumeClaimTemplates": [claim],
        },
    }


def restore_container(c: Cluster, restore: dict[str, Any]) -> dict[str, Any]:
    """A new cluster from a backup: pod 0, whose volume has no database yet, restores the
    file (checked by `octaskly restore`) before the dispatcher starts; the standby then
    gets a snapshot from it. A volume that has a database is never touched, so the
    (immutable) bootstrap can never restore in place."""
    file = f"/restore/{restore['file']}"
    script = (
        'ordinal="${HOSTNAME##*-}"\n'
        f'if [ "$ordinal" = 0 ] && [ ! -e {DATA_DIR}/octaskly.db ]; then\n'
        f"  exec {PYZ} restore {shlex.quote(file)} --data-dir {DATA_DIR}\n"
        "fi\n"
    )
    return {
        "name": "restore",
        "image": c.image,
        "imagePullPolicy": c.spec.get("imagePullPolicy", "IfNotPresent"),
        "command": ["/bin/sh", "-c", script],
        "volumeMounts": [
            {"name": "data", "mountPath": DATA_DIR},
            {"name": "restore", "mountPath": "/restore", "readOnly": True},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def dispatcher_deployment(c: Cluster) -> dict[str, Any]:
    """Database mode: N active dispatchers sharing the PostgreSQL database. The URL comes
    only from the user's Secret (secretKeyRef: the operator never reads it); the data dir
    is per pod (a new pod is a new member of the federation; after a dead pod, its lease
    runs out and the others take over its runs)."""
    name, key = c.url_secret
    env = [
        {"name": "OCTASKLY_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {
            "name": DB_URL_ENV,
            "valueFrom": {"secretKeyRef": {"name": name, "key": key, "optional": False}},
        },
    ]
    command = [PYZ, "dispatcher", "--config", f"{CONFIG_DIR}/octaskly.toml", "--data-dir", DATA_DIR]
    pod_spec = _dispatcher_pod(c, command, env, {"name": "data", "emptyDir": {}})
    selector = c.dispatcher_selector()
    # spread over nodes where it can (never blocks scheduling)
    pod_spec["topologySpreadConstraints"] = [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector},
        }
    ]
    labels = {**c.labels("dispatcher"), MODE_LABEL: DATABASE}
    meta = c.meta(c.n("dispatcher"), "dispatcher")
    meta["labels"] = labels
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": c.dispatcher_replicas,
            "selector": {"matchLabels": selector},
            # a new dispatcher is ready before an old one goes; the old one's runs move
            # to the others when it stops (it gives up its lease) or its lease runs out
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {CONFIG_HASH_ANNOTATION: _hash(dispatcher_config(c))},
                },
                "spec": pod_spec,
            },
        },
    }


def headless_service(c: Cluster) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": c.meta(c.n("dispatcher-hl"), "dispatcher"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # a standby is never "ready" yet must be found
            "selector": c.selector("dispatcher"),
            "ports": [
                {"name": "p2p", "port": P2P_PORT, "targetPort": "p2p", "protocol": "TCP"},
                {"name": "api", "port": API_PORT, "targetPort": "api", "protocol": "TCP"},
            ],
        },
    }


def rw_service(c: Cluster) -> dict[str, Any]:
    """API and P2P of the current primary: selects the pod the operator labels primary.
    Database mode: every dispatcher pod (all are active)."""
    if c.database is not None:
        selector = c.dispatcher_selector()
    else:
        selector = {**c.selector("dispatcher"), ROLE_LABEL: "primary"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": c.meta(c.n("rw"), "dispatcher"),
        "spec": {
            "selector": selector,
            "ports": [
                {"name": "api", "port": API_PORT, "targetPort": "api", "protocol": "TCP"},
                {"name": "p2p", "port": P2P_PORT, "targetPort": "p2p", "protocol": "TCP"},
                {"name": "p2p-quic", "port": P2P_PORT, "targetPort": "p2p-quic", "protocol": "UDP"},
            ],
        },
    }


def pdb(c: Cluster) -> dict[str, Any] | None:
    """One dispatcher may be disrupted at a time — only with a standby, or more than one
    dispatcher in database mode (otherwise a PDB would block every node drain)."""
    if not (c.standby or (c.database is not None and c.dispatcher_replicas > 1)):
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": c.meta(c.n("dispatcher"), "dispatcher"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": c.dispatcher_selector()}},
    }


# -- workers -------------------------------------------------------------------------------------
def workers_deployment(c: Cluster) -> dict[str, Any]:
    w = c.workers
    drain = int(w.get("drainTimeoutSeconds", 300))
    args = [
        "worker",
        "--config",
        f"{CONFIG_DIR}/octaskly.toml",
        "--name",
        "$(POD_NAME)",
        "--drain-timeout",
        str(drain),
    ]
    container: dict[str, Any] = {
        "name": "worker",
        "image": c.image,
        "imagePullPolicy": c.spec.get("imagePullPolicy", "IfNotPresent"),
        "command": [PYZ],
        "args": args,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "OCTASKLY_LOG_FORMAT", "value": "json"},
        ],
        "volumeMounts": [*_mounts(), {"name": "work", "mountPath": "/tmp"}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if w.get("resources"):
        container["resources"] = w["resources"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": c.meta(c.n("workers"), "worker"),
        "spec": {
            "replicas": int(w.get("replicas", 2)),
            "selector": {"matchLabels": c.selector("worker")},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": c.labels("worker"),
                    "annotations": {CONFIG_HASH_ANNOTATION: _hash(config_toml(c))},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    # a stopping worker finishes (or hands back) its tasks first
                    "terminationGracePeriodSeconds": drain + 30,
                    "containers": [container],
                    "volumes": [*_volumes(c), {"name": "work", "emptyDir": {}}],
                    **_placement(w),
                    **_pull_secrets(c),
                },
            },
        },
    }


# -- backups -------------------------------------------------------------------------------------
def backup_claim(c: Cluster) -> dict[str, Any] | None:
    b = c.backup
    storage = b.get("storage") or {}
    if c.database is not None or not b.get("enabled", True) or storage.get("existingClaim"):
        return None
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": storage.get("size", "20Gi")}},
    }
    if storage.get("storageClassName"):
        spec["storageClassName"] = storage["storageClassName"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": c.meta(c.n("backups"), "backup"),
        "spec": spec,
    }


def backup_script(c: Cluster) -> str:
    days = int(c.backup.get("retentionDays", 30))
    api = f"http://{c.n('rw')}.{c.namespace}.svc:{API_PORT}"
    return (
        "set -eu\n"
        f'out="{BACKUP_DIR}/octaskly-$(date -u +%Y%m%d-%H%M%S).db"\n'
        f'{PYZ} backup --api-url {api} --output "$out"\n'
        # exactly the backups older than the retention, nothing else in the volume
        f"find {BACKUP_DIR} -maxdepth 1 -name 'octaskly-*.db' -type f -mmin +{days * 1440}"
        " -delete\n"
    )


def backup_cronjob(c: Cluster) -> dict[str, Any] | None:
    """The nightly `octaskly backup` (SQLite only: a database's backups are its own job)."""
    b = c.backup
    if c.database is not None or not b.get("enabled", True):
        return None
    storage = b.get("storage") or {}
    claim = storage.get("existingClaim") or c.n("backups")
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": c.meta(c.n("backup"), "backup"),
        "spec": {
            "schedule": b.get("schedule", "0 2 * * *"),
            "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "spec": {
                    "backoffLimit": 2,
                    "template": {
                        "metadata": {"labels": c.labels("backup")},
                        "spec": {
                            "restartPolicy": "OnFailure",
                            "automountServiceAccountToken": False,
                            "securityContext": _security(),
                            "containers": [
                                {
                                    "name": "backup",
                                    "image": c.image,
                                    "imagePullPolicy": c.spec.get(
                                        "imagePullPolicy", "IfNotPresent"
                                    ),
                                    "command": ["/bin/sh", "-c", backup_script(c)],
                                    "env": [
                                        {
                                            "name": "OCTASKLY_SECRET_KEY_FILE",
                                            "value": f"{KEY_DIR}/{KEY_FILE}",
                                        }
                                    ],
                                    "volumeMounts": [
                                        {"name": "key", "mountPath": KEY_DIR, "readOnly": True},
                                        {"name": "backups", "mountPath": BACKUP_DIR},
                                    ],
                                    "securityContext": {
                                        "allowPrivilegeEscalation": False,
                                        "capabilities": {"drop": ["ALL"]},
                                    },
                                }
                            ],
                            "volumes": [
                                {
                                    "name": "key",
                                    "secret": {"secretName": c.n("key"), "defaultMode": 0o400},
                                },
                                {"name": "backups", "persistentVolumeClaim": {"claimName": claim}},
                            ],
                            **_pull_secrets(c),
                        },
                    },
                }
            },
        },
    }


# -- helpers -------------------------------------------------------------------------------------
def _placement(part: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if part.get("nodeSelector"):
        out["nodeSelector"] = part["nodeSelector"]
    if part.get("tolerations"):
        out["tolerations"] = part["tolerations"]
    return out


def _pull_secrets(c: Cluster) -> dict[str, Any]:
    secrets = c.spec.get("imagePullSecrets") or []
    return {"imagePullSecrets": secrets} if secrets else {}


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def desired(c: Cluster) -> list[dict[str, Any]]:
    """Every object the cluster should have (the key Secret is handled apart: its value is
    generated once and rotated, never re-rendered)."""
    if c.database is not None:
        objects = [
            config_map(c),
            rw_service(c),
            dispatcher_deployment(c),
            workers_deployment(c),
            pdb(c),
        ]
    else:
        objects = [
            config_map(c),
            headless_service(c),
            rw_service(c),
            statefulset(c),
            workers_deployment(c),
            pdb(c),
            backup_claim(c),
            backup_cronjob(c),
        ]
    return [o for o in objects if o is not None]


STATEFULSET = ("apps/v1", "StatefulSet")
DEPLOYMENT = ("apps/v1", "Deployment")


def absent(c: Cluster) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of optional objects the spec no longer wants — including
    the other mode's dispatchers after a switch between SQLite and database mode. Kept on
    purpose: the volumes (the dispatchers' SQLite files, the backups), which hold data."""
    out = []
    if c.database is not None:
        out.append((*STATEFULSET, c.n("dispatcher")))
        out.append(("v1", "Service", c.n("dispatcher-hl")))
    else:
        out.append((*DEPLOYMENT, c.n("dispatcher")))
    if pdb(c) is None:
        out.append(("policy/v1", "PodDisruptionBudget", c.n("dispatcher")))
    if backup_cronjob(c) is None:
        out.append(("batch/v1", "CronJob", c.n("backup")))
    return out
