"""An "envtest"-style Kubernetes control plane on 127.0.0.1 for tests: etcd, kube-apiserver and
kube-controller-manager (no kubelet, so pods stay Pending), plus helm, all built from their Go
modules into a cache directory the first time they are needed.

    build()      -> {"kube-apiserver": Path, ..., "kubectl": Path}; builds only what's missing
    start(dir)   -> ControlPlane (kubeconfig, server, stop())
    stop(dir)    kills what start(dir) started, from any process (pid files in dir)
    attach(dir)  -> ControlPlane for a control plane another process started

    python -m tests.k8s.testenv build
    python -m tests.k8s.testenv start --dir DIR      # prints the kubeconfig path, leaves it running
    python -m tests.k8s.testenv stop --dir DIR

The apiserver is driven with a kubectl within one minor version of it (KUBECTL). Everything
that start() writes (certificates, kubeconfigs, etcd data, one log per process, pid files,
state.json) goes into dir.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import dataclasses
import datetime
import fcntl
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KUBERNETES_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"

#: the kubectl that drives the apiserver: within one minor version of KUBERNETES_VERSION
KUBECTL = Path(
    os.environ.get("OCTASKLY_TESTENV_KUBECTL", "/usr/lib/google-cloud-sdk/bin/kubectl.1.33")
)

DEFAULT_CACHE_DIR = Path(
    os.environ.get("OCTASKLY_TESTENV_CACHE", "~/.cache/octaskly-testenv")
).expanduser()

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
#: processes in start order; stop() goes the other way
PROCESSES = ("etcd", "kube-apiserver", "kube-controller-manager")


def _log(message: str) -> None:
    print(f"[testenv] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# build


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GOFLAGS="-mod=mod",
        GOWORK="off",
        GOTOOLCHAIN="local",  # never fetch a toolchain behind our back
        CGO_ENABLED="0",  # static binaries, no C compiler needed
        GO111MODULE="on",
    )
    return env


def _go(args: Sequence[str], cwd: Path, *, capture: bool = False) -> str:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("the Go toolchain (`go`) is needed to build the test control plane")
    proc = subprocess.Popen(
        [go, *args],
        cwd=cwd,
        env=_go_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else 2,  # our stdout is for results only
        stderr=None,  # fd 2, whatever sys.stderr is (pytest's capture may have no fileno)
        text=True,
    )
    began = time.monotonic()
    out = ""
    while True:  # a heartbeat, so a 10-minute silent compile does not look hung
        try:
            out, _ = proc.communicate(timeout=60)
            break
        except subprocess.TimeoutExpired:
            _log(f"  ... go {args[0]} still running ({time.monotonic() - began:.0f}s)")
    if proc.returncode != 0:
        tail = "\n".join((out or "").splitlines()[-20:])  # `go mod download -json` errors
        raise RuntimeError(
            f"`go {' '.join(args)}` failed (exit {proc.returncode}) in {cwd}\n{tail}"
        )
    return out or ""


def _download(module: str, version: str, cwd: Path) -> dict[str, Any]:
    """`go mod download` a module; returns its metadata (Dir, GoMod, ...)."""
    info: dict[str, Any] = json.loads(
        _go(["mod", "download", "-json", f"{module}@{version}"], cwd, capture=True)
    )
    if info.get("Error"):
        raise RuntimeError(f"go mod download {module}@{version}: {info['Error']}")
    return info


def _parse_go_mod(path: Path, cwd: Path) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(_go(["mod", "edit", "-json", str(path)], cwd, capture=True))
    return parsed


def _wrapper_go_mod(
    name: str, dependency: str, version: str, dep_mod: dict[str, Any], extra_replace: dict[str, str]
) -> str:
    """A go.mod for a module that only exists to build `dependency`: same go directive and
    godebug settings as the dependency, the dependency's version replaces (its local-path ones
    are dropped: they mean nothing outside its repository) plus extra_replace."""
    lines = [f"module octaskly.testenv/{name}", "", f"go {dep_mod.get('Go') or '1.22'}", ""]
    godebugs = [f"godebug {g['Key']}={g['Value']}" for g in dep_mod.get("GoDebug") or []]
    lines += [*godebugs, ""] if godebugs else []
    lines += [f"require {dependency} {version}", ""]
    replaces: dict[str, str] = {}
    for rep in dep_mod.get("Replace") or []:
        old, new = rep["Old"], rep["New"]
        if new.get("Version"):
            key = old["Path"] + (f" {old['Version']}" if old.get("Version") else "")
            replaces[key] = f"{new['Path']} {new['Version']}"
    replaces.update(extra_replace)
    if replaces:
        lines.append("replace (")
        lines += [f"\t{old} => {new}" for old, new in sorted(replaces.items())]
        lines.append(")")
    return "\n".join(lines) + "\n"


def _staging_replaces(k8s_mod: dict[str, Any], k8s_version: str) -> dict[str, str]:
    """k8s.io/kubernetes requires its staging modules (k8s.io/api, k8s.io/client-go, ...) at
    v0.0.0 and points them at ./staging; outside its repository they have to be the published
    v0.MINOR.PATCH releases of the same tree."""
    staging_version = "v0." + k8s_version.removeprefix("v").split(".", 1)[1]
    return {
        req["Path"]: f"{req['Path']} {staging_version}"
        for req in k8s_mod.get("Require") or []
        if req["Path"].startswith("k8s.io/") and req["Version"] == "v0.0.0"
    }


@dataclasses.dataclass(frozen=True)
class _Component:
    name: str  # the versioned bin subdirectory is f"{name}-{version}"
    module: str
    version: str
    packages: tuple[str, ...]  # package paths to `go build`, one binary each
    binaries: tuple[str, ...]
    ldflags: tuple[str, ...]
    main_go: str | None = None  # a main package of the wrapper module itself


def _k8s_ldflags(version: str) -> tuple[str, ...]:
    major, minor = version.removeprefix("v").split(".")[:2]
    flags: list[str] = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return tuple(flags)


ETCD_MAIN = """\
// The etcd server binary: what go.etcd.io/etcd/v3's main.go does.
package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
\tetcdmain.Main(os.Args)
}
"""


def components() -> tuple[_Component, ...]:
    return (
        _Component(
            name="kubernetes",
            module="k8s.io/kubernetes",
            version=KUBERNETES_VERSION,
            packages=(
                "k8s.io/kubernetes/cmd/kube-apiserver",
                "k8s.io/kubernetes/cmd/kube-controller-manager",
            ),
            binaries=("kube-apiserver", "kube-controller-manager"),
            ldflags=_k8s_ldflags(KUBERNETES_VERSION),
        ),
        _Component(
            name="etcd",
            module="go.etcd.io/etcd/server/v3",
            version=ETCD_VERSION,
            packages=(".",),
            binaries=("etcd",),
            ldflags=(),
            main_go=ETCD_MAIN,
        ),
        _Component(
            name="helm",
            module="helm.sh/helm/v3",
            version=HELM_VERSION,
            packages=("helm.sh/helm/v3/cmd/helm",),
            binaries=("helm",),
            ldflags=(
                f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
                "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
            ),
        ),
    )


def _bin_dir(cache_dir: Path, comp: _Component) -> Path:
    return cache_dir / "bin" / f"{comp.name}-{comp.version}"


def _build_component(cache_dir: Path, comp: _Component) -> None:
    src = cache_dir / "src" / f"{comp.name}-{comp.version}"
    src.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    _log(f"{comp.name} {comp.version}: fetching {comp.module} (go module proxy)")
    (src / "go.mod").write_text(f"module octaskly.testenv/{comp.name}\n\ngo 1.22\n")
    info = _download(comp.module, comp.version, src)
    dep_mod = _parse_go_mod(Path(info["GoMod"]), src)
    extra = _staging_replaces(dep_mod, comp.version) if comp.name == "kubernetes" else {}
    (src / "go.mod").write_text(
        _wrapper_go_mod(comp.name, comp.module, comp.version, dep_mod, extra)
    )
    (src / "go.sum").unlink(missing_ok=True)
    if comp.main_go is not None:
        (src / "main.go").write_text(comp.main_go)
    _log(f"{comp.name}: downloading the modules {comp.packages} import")
    _go(["list", "-deps", "-f", "{{.ImportPath}}", *comp.packages], src, capture=True)
    downloaded = time.monotonic()
    _log(f"{comp.name}: modules fetched in {downloaded - began:.0f}s; compiling {comp.binaries}")
    final = _bin_dir(cache_dir, comp)
    final.parent.mkdir(parents=True, exist_ok=True)
    for leftover in final.parent.glob(f".{final.name}.*"):  # an interrupted build's (we hold
        shutil.rmtree(leftover, ignore_errors=True)  # the build lock: nobody else is building)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        out = str(staging / comp.binaries[0]) if comp.packages == (".",) else f"{staging}/"
        ldflags = " ".join(("-s", "-w", *comp.ldflags))
        _go(["build", "-trimpath", f"-ldflags={ldflags}", "-o", out, *comp.packages], src)
        built = time.monotonic()
        (staging / "BUILD_INFO.json").write_text(
            json.dumps(
                {
                    "module": comp.module,
                    "version": comp.version,
                    "go": _go(["env", "GOVERSION"], src, capture=True).strip(),
                    "download_seconds": round(downloaded - began, 1),
                    "compile_seconds": round(built - downloaded, 1),
                },
                indent=2,
            )
            + "\n"
        )
        for binary in comp.binaries:
            if not (staging / binary).is_file():
                raise RuntimeError(f"{comp.name}: go build produced no {binary}")
        staging.chmod(0o755)  # mkdtemp made it 0700
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # all binaries appear at once, or none
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log(f"{comp.name}: built in {built - downloaded:.0f}s (total {built - began:.0f}s)")


@contextlib.contextmanager
def _build_lock(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / "build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another build in {cache_dir} to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _binaries(cache_dir: Path) -> dict[str, Path]:
    paths = {
        binary: _bin_dir(cache_dir, comp) / binary
        for comp in components()
        for binary in comp.binaries
    }
    paths["kubectl"] = KUBECTL
    return paths


def _missing(cache_dir: Path) -> list[_Component]:
    return [
        comp
        for comp in components()
        if not all((_bin_dir(cache_dir, comp) / b).is_file() for b in comp.binaries)
    ]


def missing(cache_dir: Path = DEFAULT_CACHE_DIR) -> list[str]:
    """The binaries build() would have to build."""
    return [b for comp in _missing(cache_dir.expanduser().resolve()) for b in comp.binaries]


def build(cache_dir: Path = DEFAULT_CACHE_DIR) -> dict[str, Path]:
    """Build whatever of kube-apiserver, kube-controller-manager, etcd and helm is missing from
    cache_dir/bin/<component>-<version>/ (a version bump builds anew); returns the binaries'
    paths, kubectl included. Safe to call from parallel processes (a file lock)."""
    cache_dir = cache_dir.expanduser().resolve()
    if _missing(cache_dir):
        with _build_lock(cache_dir):
            for comp in _missing(cache_dir):  # again: another process may have built them
                _build_component(cache_dir, comp)
    if not KUBECTL.is_file():
        raise RuntimeError(f"kubectl not found at {KUBECTL} (set OCTASKLY_TESTENV_KUBECTL)")
    return _binaries(cache_dir)


# ---------------------------------------------------------------------------------------------
# certificates


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,  # EC keys sign; they do not encipher
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _name(common_name: str, *organizations: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_pki(pki: Path) -> None:
    """A CA (client CA, serving-cert issuer, cluster signer), the apiserver's serving cert, an
    admin and a controller-manager client cert (both O=system:masters) and the
    service-account signing key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(_name("octaskly-testenv-ca"), ca_key, None, ca=True)
    _write_key(pki / "ca.key", ca_key)
    (pki / "ca.crt").write_bytes(_pem(ca))

    service_ip = ipaddress.IPv4Network(SERVICE_CLUSTER_IP_RANGE)[1]  # the kubernetes Service
    dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
    dns.append("kubernetes.default.svc.cluster.local")
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(service_ip)]
    leaves = {
        "apiserver": (_name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, sans),
        "admin": (_name("admin", "system:masters"), ExtendedKeyUsageOID.CLIENT_AUTH, []),
        "controller-manager": (
            _name("system:kube-controller-manager", "system:masters"),
            ExtendedKeyUsageOID.CLIENT_AUTH,
            [],
        ),
    }
    for stem, (subject, usage, names) in leaves.items():
        key = ec.generate_private_key(ec.SECP256R1())
        _write_key(pki / f"{stem}.key", key)
        (pki / f"{stem}.crt").write_bytes(
            _pem(_cert(subject, key, (ca, ca_key), usage=usage, sans=names))
        )

    sa_key = ec.generate_private_key(ec.SECP256R1())
    _write_key(pki / "sa.key", sa_key)
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _write_kubeconfig(path: Path, server: str, pki: Path, user: str, stem: str) -> None:
    """A self-contained kubeconfig (JSON is YAML): certificates embedded, context selected."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "testenv",
                "cluster": {"server": server, "certificate-authority-data": _b64(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(pki / f"{stem}.crt"),
                    "client-key-data": _b64(pki / f"{stem}.key"),
                },
            }
        ],
        "contexts": [{"name": "testenv", "context": {"cluster": "testenv", "user": user}}],
        "current-context": "testenv",
        "preferences": {},
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


# ---------------------------------------------------------------------------------------------
# processes


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _spawn(
    name: str, argv: Sequence[str], directory: Path, *, tied: bool
) -> subprocess.Popen[bytes]:
    with open(directory / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            list(argv),
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a ^C at the terminal is not ours to forward
            preexec_fn=_die_with_parent if tied else None,
        )
    (directory / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc


def _log_tail(directory: Path, name: str, lines: int = 30) -> str:
    try:
        text = (directory / f"{name}.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    procs: dict[str, subprocess.Popen[bytes]],
    directory: Path,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} while waiting for {what}; "
                    f"tail of {directory / (name + '.log')}:\n{_log_tail(directory, name)}"
                )
        if check():
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n}:\n{_log_tail(directory, n, 10)}" for n in procs)
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(0.2)


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        return False


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child: reap it
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone already


def _pid_is(pid: int, name: str) -> bool:
    """Guards against a pid recycled since the pid file was written."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return False
    return os.path.basename(argv0.decode(errors="replace")) == name


def _terminate(
    directory: Path, procs: dict[str, subprocess.Popen[bytes]] | None = None, timeout: float = 15
) -> None:
    for name in reversed(PROCESSES):
        pid_file = directory / f"{name}.pid"
        proc = (procs or {}).get(name)
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            pid = proc.pid if proc is not None else 0
        if pid and (proc is not None or _pid_is(pid, name)) and _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                _log(f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f}s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if proc is not None:
            proc.wait()  # the Popen learns it is gone (no ResourceWarning)
        pid_file.unlink(missing_ok=True)
    (directory / "state.json").unlink(missing_ok=True)  # logs and certificates stay


def stop(dir: Path) -> None:
    """Stop what start(dir) started, from this or any other process."""
    _terminate(Path(dir))


@dataclasses.dataclass
class ControlPlane:
    dir: Path
    kubeconfig: Path
    server: str
    etcd: str
    kubectl: Path
    binaries: dict[str, Path]
    _procs: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def ca_file(self) -> Path:
        return self.dir / "pki" / "ca.crt"

    @property
    def admin_cert(self) -> tuple[Path, Path]:
        return self.dir / "pki" / "admin.crt", self.dir / "pki" / "admin.key"

    def env(self) -> dict[str, str]:
        """os.environ with KUBECONFIG pointing here (for kubectl, helm, kopf, ...)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl_argv(self, *args: str) -> list[str]:
        return [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args]

    def ssl_context(self) -> ssl.SSLContext:
        """Trusts the apiserver and presents the admin (system:masters) client cert."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(*(str(p) for p in self.admin_cert))
        return context

    def stop(self) -> None:
        _terminate(self.dir, self._procs)
        self._procs.clear()

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def attach(dir: Path) -> ControlPlane:
    """A ControlPlane for one that start(dir) left running (e.g. from the command line)."""
    directory = Path(dir).resolve()
    state = json.loads((directory / "state.json").read_text())
    return ControlPlane(
        dir=directory,
        kubeconfig=Path(state["kubeconfig"]),
        server=state["server"],
        etcd=state["etcd"],
        kubectl=Path(state["kubectl"]),
        binaries={k: Path(v) for k, v in state["binaries"].items()},
    )


def start(
    dir: Path,
    *,
    binaries: dict[str, Path] | None = None,
    tied_to_caller: bool = True,
    timeout: float = 120,
) -> ControlPlane:
    """Start etcd, kube-apiserver and kube-controller-manager on free 127.0.0.1 ports, with
    state in dir (a fresh cluster: what an earlier start left there is wiped); return once
    /readyz is ok and the default namespace has its default service account.
    tied_to_caller: the processes get SIGTERM when the calling process dies (what a test
    session wants; the command line's `start` turns it off)."""
    directory = Path(dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for name in PROCESSES:
        pid_file = directory / f"{name}.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError):
                pid = int(pid_file.read_text())
                if _pid_is(pid, name) and _pid_alive(pid):
                    raise RuntimeError(f"{directory} already has a running {name} (pid {pid})")
            pid_file.unlink()
    for stale in ("etcd-data", "pki", "apiserver-certs", "controller-manager-certs", "flexvolume"):
        shutil.rmtree(directory / stale, ignore_errors=True)  # every start is a fresh cluster
    (directory / "state.json").unlink(missing_ok=True)
    bins = binaries if binaries is not None else build()
    pki = directory / "pki"
    _make_pki(pki)
    etcd_port, peer_port, api_port, kcm_port = _free_ports(4)
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    server = f"https://127.0.0.1:{api_port}"
    kubeconfig = directory / "kubeconfig"
    _write_kubeconfig(kubeconfig, server, pki, "admin", "admin")
    kcm_kubeconfig = directory / "controller-manager.kubeconfig"
    _write_kubeconfig(
        kcm_kubeconfig, server, pki, "system:kube-controller-manager", "controller-manager"
    )

    plane = ControlPlane(
        dir=directory,
        kubeconfig=kubeconfig,
        server=server,
        etcd=etcd_url,
        kubectl=bins["kubectl"],
        binaries=bins,
    )
    began = time.monotonic()
    try:
        _start_processes(
            plane, pki, etcd_port, peer_port, api_port, kcm_port, tied_to_caller, timeout
        )
    except BaseException:
        plane.stop()
        raise
    (directory / "state.json").write_text(
        json.dumps(
            {
                "server": server,
                "etcd": etcd_url,
                "kubeconfig": str(kubeconfig),
                "kubectl": str(plane.kubectl),
                "binaries": {k: str(v) for k, v in bins.items()},
                "pids": {n: p.pid for n, p in plane._procs.items()},
            },
            indent=2,
        )
        + "\n"
    )
    _log(f"control plane up at {server} in {time.monotonic() - began:.1f}s (dir {directory})")
    return plane


def _start_processes(
    plane: ControlPlane,
    pki: Path,
    etcd_port: int,
    peer_port: int,
    api_port: int,
    kcm_port: int,
    tied: bool,
    timeout: float,
) -> None:
    directory, bins, procs = plane.dir, plane.binaries, plane._procs
    peer_url = f"http://127.0.0.1:{peer_port}"
    procs["etcd"] = _spawn(
        "etcd",
        [
            str(bins["etcd"]),
            "--name=default",
            f"--data-dir={directory / 'etcd-data'}",
            f"--listen-client-urls={plane.etcd}",
            f"--advertise-client-urls={plane.etcd}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync",  # test data: speed over durability
            "--log-level=warn",
        ],
        directory,
        tied=tied,
    )
    _wait_for("etcd /health", lambda: _http_ok(f"{plane.etcd}/health"), 30, procs, directory)

    procs["kube-apiserver"] = _spawn(
        "kube-apiserver",
        [
            str(bins["kube-apiserver"]),
            f"--etcd-servers={plane.etcd}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",  # Endpoints may not hold a loopback address
            f"--secure-port={api_port}",
            f"--cert-dir={directory / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            "--profiling=false",
        ],
        directory,
        tied=tied,
    )
    context = plane.ssl_context()
    _wait_for(
        "kube-apiserver /readyz",
        lambda: _http_ok(f"{plane.server}/readyz", context),
        timeout,
        procs,
        directory,
    )

    kcm_kubeconfig = directory / "controller-manager.kubeconfig"
    procs["kube-controller-manager"] = _spawn(
        "kube-controller-manager",
        [
            str(bins["kube-controller-manager"]),
            f"--kubeconfig={kcm_kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={kcm_port}",
            f"--cert-dir={directory / 'controller-manager-certs'}",
            f"--flex-volume-plugin-dir={directory / 'flexvolume'}",  # else it mkdirs in /usr
            "--leader-elect=false",
            "--use-service-account-credentials=false",
            "--controllers=*",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--cluster-name=octaskly-testenv",
            "--kube-api-qps=100",
            "--kube-api-burst=200",
            "--profiling=false",
        ],
        directory,
        tied=tied,
    )
    _wait_for(
        "the default namespace's default service account",
        lambda: _http_ok(
            f"{plane.server}/api/v1/namespaces/default/serviceaccounts/default", context
        ),
        timeout,
        procs,
        directory,
    )


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.k8s.testenv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build the missing binaries; print their paths")
    p_build.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p_start = sub.add_parser("start", help="start a control plane; print its kubeconfig path")
    p_start.add_argument("--dir", type=Path, required=True)
    p_start.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p_stop = sub.add_parser("stop", help="stop what `start --dir DIR` started")
    p_stop.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "build":
        for name, path in build(args.cache_dir).items():
            print(f"{name}\t{path}")
    elif args.command == "start":
        plane = start(args.dir, binaries=build(args.cache_dir), tied_to_caller=False)
        print(plane.kubeconfig)
    else:
        stop(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
