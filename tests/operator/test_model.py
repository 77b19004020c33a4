"""The operator's rendering of an OctasklyCluster, checked without a cluster: the config
it writes is one octaskly accepts, every object is owned, labelled and wired as intended.
(Against a real API server: tests/k8s.)"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from octaskly_operator import model

from octaskly.config import loading

REPO = Path(__file__).resolve().parents[2]


def cluster(**spec: Any) -> model.Cluster:
    return model.Cluster("demo", "prod", "1234-uid", spec)


def test_the_config_it_writes_is_valid_octaskly_config(tmp_path: Path) -> None:
    c = cluster(workers={"labels": {"zone": "eu-1", "gpu.kind": "t4"}, "maxJobs": 8})
    path = tmp_path / "octaskly.toml"
    path.write_text(model.config_toml(c))
    settings = loading.load(flags={}, env={}, config_file=str(path)).settings
    assert settings.dispatcher.auto_failover is False  # the operator decides failovers
    assert settings.worker.max_jobs == 8
    assert settings.worker.labels == {"zone": "eu-1", "gpu.kind": "t4"}
    assert settings.worker.dispatcher_addr == (
        "demo-dispatcher-0.demo-dispatcher-hl.prod.svc:5555",
        "demo-dispatcher-1.demo-dispatcher-hl.prod.svc:5555",
    )
    assert str(settings.security.secret_key_file) == "/etc/octaskly/key/secret.key"


def test_every_object_is_owned_labelled_and_namespaced() -> None:
    c = cluster()
    objects = [*model.desired(c), model.secret(c, "k" * 32, None, 1)]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["ConfigMap", "Service", "Service", "StatefulSet", "Deployment",
         "PodDisruptionBudget", "PersistentVolumeClaim", "CronJob", "Secret"]
    )  # fmt: skip
    for o in objects:
        meta = o["metadata"]
        assert meta["namespace"] == "prod"
        (owner,) = meta["ownerReferences"]
        assert owner["uid"] == "1234-uid" and owner["controller"] is True
        assert meta["labels"][model.CLUSTER_LABEL] == "demo"


def test_dispatchers_probes_volumes_and_roles() -> None:
    c = cluster(dispatcher={"storage": {"size": "7Gi", "retainOnDelete": False}})
    sts = model.statefulset(c)
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"] == {
        "storage": "7Gi"
    }
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    script = container["command"][-1]
    assert "--role standby --primary-addr demo-dispatcher-0.demo-dispatcher-hl.prod.svc:5555" in (
        script
    )
    rw = model.rw_service(c)
    assert rw["spec"]["selector"][model.ROLE_LABEL] == "primary"
    assert {p["protocol"] for p in rw["spec"]["ports"]} == {"TCP", "UDP"}


def test_a_single_dispatcher_gets_no_pdb_and_workers_know_only_it() -> None:
    c = cluster(dispatcher={"standby": False})
    assert model.pdb(c) is None
    assert ("policy/v1", "PodDisruptionBudget", "demo-dispatcher") in model.absent(c)
    assert model.statefulset(c)["spec"]["replicas"] == 1
    settings = tomllib.loads(model.config_toml(c))
    assert settings["worker"]["dispatcher_addr"] == [
        "demo-dispatcher-0.demo-dispatcher-hl.prod.svc:5555"
    ]


def test_workers_drain_before_their_pod_goes() -> None:
    c = cluster(workers={"replicas": 5, "drainTimeoutSeconds": 90, "nodeSelector": {"a": "b"}})
    d = model.workers_deployment(c)
    assert d["spec"]["replicas"] == 5
    pod = d["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120
    assert "--drain-timeout" in pod["containers"][0]["args"]
    assert pod["nodeSelector"] == {"a": "b"}


def test_backups_use_the_api_and_prune_exactly_their_files() -> None:
    c = cluster(backup={"schedule": "15 3 * * *", "retentionDays": 7})
    cron = model.backup_cronjob(c)
    assert cron is not None and cron["spec"]["schedule"] == "15 3 * * *"
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "backup --api-url http://demo-rw.prod.svc:3000" in script
    assert "-name 'octaskly-*.db'" in script and f"-mmin +{7 * 1440}" in script
    assert model.backup_cronjob(cluster(backup={"enabled": False})) is None
    claim = cluster(backup={"storage": {"existingClaim": "mine"}})
    assert model.backup_claim(claim) is None


@pytest.mark.parametrize(
    "path",
    ["operator/crds/octasklyclusters.octaskly.io.yaml", "operator/examples/octaskly-cluster.yaml"],
)
def test_manifests_are_plain_yaml_without_anchors(path: str) -> None:
    text = (REPO / path).read_text()
    assert "&" not in "".join(line.split("#")[0] for line in text.splitlines() if ": &" in line)
    assert yaml.safe_load(text)


def test_the_crd_declares_every_status_field_the_operator_writes() -> None:
    crd = yaml.safe_load((REPO / "operator/crds/octasklyclusters.octaskly.io.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    declared = set(schema["properties"])
    written = {
        "phase", "message", "currentPrimary", "currentStandby", "workers", "conditions",
        "lastBackup", "lastBackupSucceeded", "observedGeneration", "lastRotation",
        "keyGeneration", "term", "lastFailover", "mode", "dispatchers",
    }  # fmt: skip
    assert written <= declared
    assert set(schema["properties"]["workers"]["properties"]) >= {
        "desired", "current", "ready", "text", "selector"
    }  # fmt: skip
    assert set(schema["properties"]["dispatchers"]["properties"]) >= {
        "desired", "current", "ready", "text"
    }  # fmt: skip


def test_a_cluster_bootstrapped_from_a_backup_restores_once_on_pod_0() -> None:
    c = cluster(bootstrap={"restoreFrom": {"claimName": "old-backups", "file": "octaskly-1.db"}})
    pod = model.statefulset(c)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    script = init["command"][-1]
    assert 'if [ "$ordinal" = 0 ] && [ ! -e /data/octaskly.db ]' in script
    assert "restore /restore/octaskly-1.db --data-dir /data" in script
    volume = next(v for v in pod["volumes"] if v["name"] == "restore")
    assert volume["persistentVolumeClaim"] == {"claimName": "old-backups", "readOnly": True}
    assert "initContainers" not in model.statefulset(cluster())["spec"]["template"]["spec"]


def test_the_standby_off_keeps_two_pods_while_pod_1_is_primary() -> None:
    off = {"dispatcher": {"standby": False}}
    assert (
        model.Cluster("demo", "prod", "u", off, primary="demo-dispatcher-1").dispatcher_replicas
        == 2
    )
    assert (
        model.Cluster("demo", "prod", "u", off, primary="demo-dispatcher-0").dispatcher_replicas
        == 1
    )


# -- database mode (spec.database: an external PostgreSQL) ---------------------------------------
URL = "postgresql://octaskly:hunter2-secret@pg.example:5432/octaskly"
DB = {"urlSecret": {"name": "pg-app", "key": "uri"}}


def db_cluster(**spec: Any) -> model.Cluster:
    return cluster(**{"database": DB, **spec})


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_database_mode_runs_n_active_dispatchers_as_a_deployment() -> None:
    spec = {
        "replicas": 3,
        "resources": {"limits": {"memory": "1Gi"}},
        "nodeSelector": {"pool": "core"},
        "tolerations": [{"key": "core", "operator": "Exists", "effect": "NoSchedule"}],
    }
    c = db_cluster(dispatcher=spec, imagePullSecrets=[{"name": "regcred"}])
    d = model.dispatcher_deployment(c)
    assert (d["apiVersion"], d["kind"], d["metadata"]["name"]) == (
        "apps/v1", "Deployment", "demo-dispatcher"
    )  # fmt: skip
    assert d["spec"]["replicas"] == 3
    assert d["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    selector = d["spec"]["selector"]["matchLabels"]
    assert selector[model.MODE_LABEL] == "database"
    template = d["spec"]["template"]
    assert selector.items() <= template["metadata"]["labels"].items()
    container = _container(d)
    env = {e["name"]: e for e in container["env"]}
    assert env["OCTASKLY_DB_URL"] == {
        "name": "OCTASKLY_DB_URL",
        "valueFrom": {"secretKeyRef": {"name": "pg-app", "key": "uri", "optional": False}},
    }
    assert env["OCTASKLY_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "--role" not in container["command"] and "--primary-addr" not in container["command"]
    pod = template["spec"]
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data == {"name": "data", "emptyDir": {}}
    # the same pod as SQLite mode's dispatchers in everything but storage and start-up
    sqlite_spec = {k: v for k, v in spec.items() if k != "replicas"}
    sqlite = model.statefulset(
        cluster(dispatcher=sqlite_spec, imagePullSecrets=[{"name": "regcred"}])
    )
    sqlite_pod, sqlite_container = sqlite["spec"]["template"]["spec"], _container(sqlite)
    for key in (
        "readinessProbe",
        "livenessProbe",
        "ports",
        "securityContext",
        "resources",
        "volumeMounts",
        "image",
        "imagePullPolicy",
    ):
        assert container[key] == sqlite_container[key], key
    for key in (
        "securityContext",
        "automountServiceAccountToken",
        "nodeSelector",
        "tolerations",
        "imagePullSecrets",
        "terminationGracePeriodSeconds",
    ):
        assert pod[key] == sqlite_pod[key], key
    assert model.dispatcher_deployment(db_cluster())["spec"]["replicas"] == 2  # the default


def test_the_database_url_stays_in_its_secret_and_the_config_is_valid(tmp_path: Path) -> None:
    """The URL reaches the pods only through the secretKeyRef: no db_url or db_path in the
    ConfigMap, no flag; with the env the pod gets, octaskly loads a PostgreSQL config."""
    c = db_cluster(database={**DB, "leaseSeconds": 20}, dispatcher={"replicas": 2})
    rendered = yaml.safe_dump_all(model.desired(c))
    assert "db_path" not in rendered and "db_url =" not in rendered
    assert "--db-url" not in rendered
    container = _container(model.dispatcher_deployment(c))
    assert all("value" not in e for e in container["env"] if e["name"] == "OCTASKLY_DB_URL")
    path = tmp_path / "octaskly.toml"
    path.write_text(model.config_toml(c))
    env = {"OCTASKLY_DB_URL": URL, "OCTASKLY_NODE_NAME": "demo-dispatcher-5f7-abcde"}
    settings = loading.load(flags={}, env=env, config_file=str(path)).settings
    assert settings.storage.db_url == URL and settings.storage.db_path is None
    assert settings.dispatcher.node_name == "demo-dispatcher-5f7-abcde"
    assert settings.dispatcher.lease_seconds == 20
    assert settings.dispatcher.role == "primary" and settings.dispatcher.primary_addr is None
    assert settings.worker.dispatcher_addr == ("demo-rw.prod.svc:5555",)


def test_database_mode_services_and_pdb_select_every_dispatcher() -> None:
    c = db_cluster(dispatcher={"replicas": 3})
    selector = model.dispatcher_deployment(c)["spec"]["selector"]["matchLabels"]
    rw = model.rw_service(c)
    assert rw["spec"]["selector"] == selector and model.ROLE_LABEL not in rw["spec"]["selector"]
    assert {(p["port"], p["protocol"]) for p in rw["spec"]["ports"]} == {
        (3000, "TCP"), (5555, "TCP"), (5555, "UDP")
    }  # fmt: skip
    budget = model.pdb(c)
    assert budget is not None
    assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    # one dispatcher: no PDB (it would block every node drain)
    single = db_cluster(dispatcher={"replicas": 1})
    assert model.pdb(single) is None
    assert ("policy/v1", "PodDisruptionBudget", "demo-dispatcher") in model.absent(single)
    # the workers: the Service, and they roll when it changes (their config hash)
    workers = model.workers_deployment(c)
    sqlite_workers = model.workers_deployment(cluster())
    hashes = [w["spec"]["template"]["metadata"]["annotations"] for w in (workers, sqlite_workers)]
    assert hashes[0] != hashes[1]


def test_database_mode_has_no_statefulset_standby_or_backups_and_absent_lists_them() -> None:
    # (the backup settings a SQLite cluster would get by default are not rendered)
    c = db_cluster()
    kinds = sorted(o["kind"] for o in model.desired(c))
    assert kinds == sorted(
        ["ConfigMap", "Service", "Deployment", "Deployment", "PodDisruptionBudget"]
    )
    assert model.backup_cronjob(c) is None and model.backup_claim(c) is None
    assert not c.standby
    gone = model.absent(c)
    for wanted in (
        ("apps/v1", "StatefulSet", "demo-dispatcher"),
        ("v1", "Service", "demo-dispatcher-hl"),
        ("batch/v1", "CronJob", "demo-backup"),
    ):
        assert wanted in gone, wanted
    # the volumes are data (the SQLite queue, the backups): never deleted by a switch
    assert not [g for g in gone if g[1] == "PersistentVolumeClaim"]
    # and back: SQLite mode removes database mode's dispatchers
    assert ("apps/v1", "Deployment", "demo-dispatcher") in model.absent(cluster())
    assert ("apps/v1", "StatefulSet", "demo-dispatcher") not in model.absent(cluster())


def test_dispatchers_roll_on_their_config_not_on_worker_changes() -> None:
    def annotations(c: model.Cluster) -> dict[str, str]:
        return dict(model.dispatcher_deployment(c)["spec"]["template"]["metadata"]["annotations"])

    base = annotations(db_cluster())
    assert annotations(db_cluster(workers={"maxJobs": 9})) == base
    assert annotations(db_cluster(database={**DB, "leaseSeconds": 30})) != base
    moved = model.dispatcher_deployment(
        db_cluster(database={"urlSecret": {"name": "other-app", "key": "uri"}})
    )
    assert _container(moved)["env"][-1]["valueFrom"]["secretKeyRef"]["name"] == "other-app"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"database": DB, "dispatcher": {"standby": True}}, "spec.dispatcher.standby"),
        ({"database": DB, "dispatcher": {"replication": "sync"}}, "spec.dispatcher.replication"),
        ({"database": DB, "backup": {"schedule": "0 1 * * *"}}, "spec.backup"),
        (
            {"database": DB, "bootstrap": {"restoreFrom": {"claimName": "b", "file": "x.db"}}},
            "spec.bootstrap",
        ),
        ({"database": DB, "dispatcher": {"replicas": 0}}, "spec.dispatcher.replicas"),
        ({"database": DB, "dispatcher": {"replicas": 17}}, "spec.dispatcher.replicas"),
        ({"database": {"urlSecret": {}}}, "urlSecret.name"),
        ({"database": {"urlSecret": {"name": "a\nb = 1"}}}, "urlSecret.name"),
        ({"database": {"urlSecret": {"name": "a", "key": "x/y"}}}, "urlSecret.key"),
        ({"dispatcher": {"replicas": 3}}, "spec.dispatcher.replicas"),
    ],
)
def test_contradictory_specs_are_refused_by_the_operator(
    spec: dict[str, Any], fragment: str
) -> None:
    problems = cluster(**spec).problems()
    assert problems and any(fragment in p for p in problems), problems


def test_consistent_specs_have_no_problems() -> None:
    for spec in (
        {},
        {"dispatcher": {"standby": False}, "backup": {"enabled": False}},
        {"database": DB},
        {"database": DB, "dispatcher": {"standby": False, "replicas": 16}},
        {"database": DB, "backup": {"enabled": False, "schedule": "0 2 * * *"}},
    ):
        assert cluster(**spec).problems() == [], spec


def test_the_postgres_example_is_complete_and_consistent() -> None:
    secret, doc = yaml.safe_load_all(
        (REPO / "operator/examples/octaskly-cluster-postgres.yaml").read_text()
    )
    assert secret["kind"] == "Secret" and doc["kind"] == "OctasklyCluster"
    ref = doc["spec"]["database"]["urlSecret"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    c = model.Cluster(doc["metadata"]["name"], "prod", "u", doc["spec"])
    assert c.problems() == [] and c.dispatcher_replicas == 3
