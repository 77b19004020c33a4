"""The test control plane is a working Kubernetes API: controllers reconcile (Deployment ->
ReplicaSet -> Pods, StatefulSet -> Pods, Job -> Pods), garbage collection cascades, RBAC is on,
server-side dry-run validates without persisting, and helm can install into it."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.k8s import testenv
from tests.k8s.conftest import Kubectl, KubectlError


def _eventually(what: str, probe: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def _items(kubectl: Kubectl, kind: str, namespace: str, *selector: str) -> list[dict[str, Any]]:
    out = kubectl("get", kind, "-n", namespace, *selector, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def _owner(obj: dict[str, Any]) -> tuple[str, str]:
    (ref,) = obj["metadata"]["ownerReferences"]
    return ref["kind"], ref["name"]


def test_versions(control_plane: testenv.ControlPlane, kubectl: Kubectl) -> None:
    version = json.loads(kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == testenv.KUBERNETES_VERSION
    server_minor = int(version["serverVersion"]["minor"])
    assert abs(int(version["clientVersion"]["minor"].rstrip("+")) - server_minor) <= 1
    assert control_plane.server.startswith("https://127.0.0.1:")
    assert "default" in kubectl("get", "namespaces", "-o", "name").stdout


def test_deployment_replicaset_pods_and_garbage_collection(
    kubectl: Kubectl, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    kubectl(
        "create", "deployment", "web", "--image=example.invalid/web:1", "--replicas=2", "-n", ns
    )

    (rs,) = _eventually(
        "a ReplicaSet for the Deployment",
        lambda: _items(kubectl, "replicasets", ns, "-l", "app=web"),
    )
    assert _owner(rs) == ("Deployment", "web")

    def two_pods() -> list[dict[str, Any]] | None:
        pods = _items(kubectl, "pods", ns, "-l", "app=web")
        return pods if len(pods) == 2 else None

    pods = _eventually("2 Pods of the ReplicaSet", two_pods)
    for pod in pods:
        assert _owner(pod) == ("ReplicaSet", rs["metadata"]["name"])
        assert pod["status"]["phase"] == "Pending"  # no kubelet, no scheduler
        assert "nodeName" not in pod["spec"]

    kubectl("delete", "deployment", "web", "-n", ns)  # background cascade: the GC's work
    _eventually(
        "the ReplicaSet and Pods to be garbage-collected",
        lambda: not _items(kubectl, "replicasets,pods", ns, "-l", "app=web"),
    )


STATEFULSET_AND_JOB = """
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 1
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: db, image: example.invalid/db:1}]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: once}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers: [{name: once, image: example.invalid/once:1}]
"""


def test_statefulset_job_and_cronjob(kubectl: Kubectl, k8s_namespace: str) -> None:
    ns = k8s_namespace
    kubectl("apply", "-n", ns, "-f", "-", input=STATEFULSET_AND_JOB)
    (pod,) = _eventually(
        "the StatefulSet's pod", lambda: _items(kubectl, "pods", ns, "-l", "app=db")
    )
    assert pod["metadata"]["name"] == "db-0"
    assert _owner(pod) == ("StatefulSet", "db")
    (job_pod,) = _eventually(
        "the Job's pod",
        lambda: _items(kubectl, "pods", ns, "-l", "batch.kubernetes.io/job-name=once"),
    )
    assert _owner(job_pod) == ("Job", "once")

    kubectl(
        "create",
        "cronjob",
        "nightly",
        "-n",
        ns,
        "--image=example.invalid/x:1",
        "--schedule=0 3 * * *",
    )
    cronjob = json.loads(kubectl("get", "cronjob", "nightly", "-n", ns, "-o", "json").stdout)
    assert cronjob["spec"]["schedule"] == "0 3 * * *"
    kubectl("create", "job", "manual", "-n", ns, "--from=cronjob/nightly")
    job = json.loads(kubectl("get", "job", "manual", "-n", ns, "-o", "json").stdout)
    assert _owner(job) == ("CronJob", "nightly")
    kubectl("delete", "cronjob", "nightly", "-n", ns)
    _eventually(
        "the CronJob's Job to be garbage-collected",
        lambda: "manual" not in kubectl("get", "jobs", "-n", ns, "-o", "name").stdout,
    )


CONFIGMAP = """
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {level: "%s"}
"""

INVALID_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: broken}
spec:
  replicas: -1
  selector: {matchLabels: {app: broken}}
  template:
    metadata: {labels: {app: broken}}
    spec: {containers: [{name: c, image: example.invalid/c:1}]}
"""


def test_server_side_dry_run(kubectl: Kubectl, k8s_namespace: str) -> None:
    ns = k8s_namespace
    out = kubectl(
        "apply", "--dry-run=server", "-n", ns, "-o", "json", "-f", "-", input=CONFIGMAP % "debug"
    ).stdout
    assert json.loads(out)["metadata"]["creationTimestamp"]  # the server filled it in
    missing = kubectl("get", "configmap", "settings", "-n", ns, check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr  # ... and did not keep it

    kubectl("apply", "-n", ns, "-f", "-", input=CONFIGMAP % "info")
    kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=CONFIGMAP % "debug")
    stored = json.loads(kubectl("get", "configmap", "settings", "-n", ns, "-o", "json").stdout)
    assert stored["data"] == {"level": "info"}

    # validation is the server's: client-side dry-run lets this through, server-side does not
    kubectl("apply", "--dry-run=client", "-n", ns, "-f", "-", input=INVALID_DEPLOYMENT)
    with pytest.raises(KubectlError, match=r"spec\.replicas"):
        kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=INVALID_DEPLOYMENT)


def test_rbac_is_enforced(kubectl: Kubectl, k8s_namespace: str) -> None:
    assert kubectl("auth", "can-i", "*", "*", "--all-namespaces").stdout.strip() == "yes"
    service_account = f"system:serviceaccount:{k8s_namespace}:default"
    denied = kubectl(
        "auth", "can-i", "list", "pods", "-n", k8s_namespace, f"--as={service_account}", check=False
    )
    assert denied.stdout.strip() == "no"
    with pytest.raises(KubectlError, match="Forbidden"):
        kubectl("get", "pods", "-n", k8s_namespace, f"--as={service_account}")


def test_helm_installs_a_chart(
    control_plane: testenv.ControlPlane, kubectl: Kubectl, k8s_namespace: str, tmp_path: Path
) -> None:
    helm = str(control_plane.binaries["helm"])
    env = {
        **control_plane.env(),
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }

    def run(*args: str) -> str:
        proc = subprocess.run([helm, *args], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert run("version", "--short").startswith(testenv.HELM_VERSION)
    run("create", str(tmp_path / "demo"))
    run("install", "demo", str(tmp_path / "demo"), "-n", k8s_namespace)
    (release,) = json.loads(run("list", "-n", k8s_namespace, "-o", "json"))
    assert (release["name"], release["status"]) == ("demo", "deployed")
    deployments = _items(kubectl, "deployments", k8s_namespace)
    assert [d["metadata"]["name"] for d in deployments] == ["demo"]
