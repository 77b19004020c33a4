"""Fixtures for tests against a real Kubernetes control plane (tests/k8s/testenv.py).

    control_plane   session: builds the binaries if needed, starts etcd + kube-apiserver +
                    kube-controller-manager in a temporary directory, stops them at the end
    kubectl         session: kubectl("get", "pods", "-n", ns) -> CompletedProcess[str], with
                    the control plane's kubeconfig; raises KubectlError (stderr included) on
                    failure unless check=False
    k8s_namespace   function: a fresh namespace, deleted afterwards

OCTASKLY_TESTENV_DIR=DIR uses a control plane that `python -m tests.k8s.testenv start --dir DIR`
left running (and leaves it running) instead of starting one per session.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from tests.k8s import testenv


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr:\n{self.stderr}"


class Kubectl(Protocol):
    def __call__(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]: ...


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build missing binaries before any test runs: a cold build takes many minutes, which
    must neither count against a test's timeout nor run with its output captured."""
    if not any("control_plane" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    if os.environ.get("OCTASKLY_TESTENV_DIR") or not testenv.missing():
        return
    capman = session.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        testenv.build()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[testenv.ControlPlane]:
    existing = os.environ.get("OCTASKLY_TESTENV_DIR")
    if existing:
        yield testenv.attach(Path(existing))
        return
    plane = testenv.start(tmp_path_factory.mktemp("control-plane"), binaries=testenv.build())
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubectl(control_plane: testenv.ControlPlane) -> Kubectl:
    def run(
        *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = control_plane.kubectl_argv(*args)
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    return run


@pytest.fixture
def k8s_namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
