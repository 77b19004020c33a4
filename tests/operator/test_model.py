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
        "keyGeneration", "term", "lastFailover",
    }  # fmt: skip
    assert written <= declared
    assert set(schema["properties"]["workers"]["properties"]) >= {
        "desired", "current", "ready", "text", "selector"
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
