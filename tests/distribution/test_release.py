"""`make release` (scripts/release.py), the Dockerfile and docker-compose.yml.

Only this machine's target is built here (twice, to compare bytes), plus one foreign
target whose wheel tags and ELF machine are checked; `make release` builds every target
and checks the wheel tags of each itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts import release

REPO = Path(__file__).resolve().parents[2]
PROJECT = release.Project.read()
LOCAL = release.local_target()
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}


def build(dist: Path, targets: str) -> subprocess.CompletedProcess[str]:
    """The release command as `make release` runs it (cached wheels, no index if cached)."""
    command = [sys.executable, "-m", "scripts.release", "--targets", targets]
    done = subprocess.run(
        [*command, "--dist", str(dist), "--offline", "--no-measure", "--jobs", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """Two independent builds of this machine's target, shared by the xdist workers."""
    assert LOCAL is not None, "this machine must be a release target"
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    base = tmp_path_factory.getbasetemp()
    shared = base.parent / f"release-{run_id}" if run_id else base / "release-local"
    shared.mkdir(exist_ok=True)
    with (shared / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "done").exists():
            for name in ("one", "two"):
                shutil.rmtree(shared / name, ignore_errors=True)
                build(shared / name, "local")
            (shared / "done").touch()
        fcntl.flock(lock, fcntl.LOCK_UN)
    yield shared / "one", shared / "two"


def artefacts(dist: Path) -> list[str]:
    return sorted(p.name for p in dist.iterdir() if p.name != "SHA256SUMS")


def test_the_local_target_is_named_after_its_platform(releases: tuple[Path, Path]) -> None:
    dist, _ = releases
    assert LOCAL is not None
    stem = f"octaskly-{PROJECT.version}-{LOCAL.name}"
    assert artefacts(dist) == sorted([f"{stem}.pyz", f"{stem}.tar.gz", "octaskly.pyz"])
    assert (dist / "octaskly.pyz").read_bytes() == (dist / f"{stem}.pyz").read_bytes()


def test_two_builds_give_the_same_bytes(releases: tuple[Path, Path]) -> None:
    one, two = releases
    assert artefacts(one) == artefacts(two)
    for name in [*artefacts(one), "SHA256SUMS"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_sha256sums_cover_every_artefact(releases: tuple[Path, Path]) -> None:
    dist, _ = releases
    listed = {}
    for line in (dist / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    assert sorted(listed) == artefacts(dist)
    for name, digest in listed.items():
        assert hashlib.sha256((dist / name).read_bytes()).hexdigest() == digest
    if shutil.which("sha256sum"):
        check = subprocess.run(
            ["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=dist, capture_output=True
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_the_tarball_keeps_the_executable_bit(releases: tuple[Path, Path], tmp_path: Path) -> None:
    dist, _ = releases
    assert LOCAL is not None
    tarball = dist / PROJECT.tarball_name(LOCAL)
    folder = f"octaskly-{PROJECT.version}-{LOCAL.name}"
    with tarfile.open(tarball) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == [folder, f"{folder}/octaskly.pyz"]
    assert members[f"{folder}/octaskly.pyz"].mode == 0o755
    # extracted by the system's tar, as a user would
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(tmp_path)], check=True)
    pyz = tmp_path / folder / "octaskly.pyz"
    assert pyz.stat().st_mode & 0o777 == 0o755
    assert pyz.read_bytes() == (dist / "octaskly.pyz").read_bytes()
    assert os.access(pyz, os.X_OK)


def test_bundled_wheels_match_the_target(releases: tuple[Path, Path]) -> None:
    dist, _ = releases
    assert LOCAL is not None
    pyz = dist / "octaskly.pyz"
    bundled = release.wheel_tags(pyz)
    dists = {name.split("-")[0].lower() for name in bundled}
    assert {"octaskly", "aiohttp", "cryptography", "pydantic_core", "zeroconf"} <= dists
    assert release.tag_mismatches(pyz, LOCAL) == []
    # the check is not vacuous: the same pyz is wrong for another CPU or Python
    for other in release.TARGETS:
        if other.name in {f"linux-aarch64-cp{LOCAL.python[0]}{LOCAL.python[1]}"}:
            assert release.tag_mismatches(pyz, other)
        if other.os == LOCAL.os and other.arch == LOCAL.arch and other.python > LOCAL.python:
            assert release.tag_mismatches(pyz, other)


def test_the_pyz_runs_and_reports_the_project_version(
    releases: tuple[Path, Path], tmp_path: Path
) -> None:
    dist, _ = releases
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SHIV_ROOT": str(tmp_path)}
    done = subprocess.run(
        [str(dist / "octaskly.pyz"), "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"octaskly {version}"), done.stderr


def test_start_up_extracts_once_then_is_quick(releases: tuple[Path, Path], tmp_path: Path) -> None:
    """The strict < 1 s budget is checked by `make release`, on an idle machine; here (4
    test workers on 2 CPUs) the loose bound plus "no second extraction" is what holds."""
    dist, _ = releases
    env = dict(os.environ, SHIV_ROOT=str(tmp_path / "shiv"))
    command = [str(dist / "octaskly.pyz"), "--version"]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=60)

    def snapshot() -> dict[str, float]:
        return {str(p): p.stat().st_mtime for p in (tmp_path / "shiv").rglob("*")}

    extracted = snapshot()
    assert len(extracted) > 500
    first, median, output = release.measure_start(dist / "octaskly.pyz", runs=3)
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=60)
    assert snapshot() == extracted  # the warm path reads what the first run unpacked
    assert output == f"octaskly {PROJECT.version}"
    assert median < 3 * release.START_BUDGET_SECONDS, (first, median)


def elf_machines(pyz: Path) -> set[int]:
    machines = set()
    with zipfile.ZipFile(pyz) as zf:
        for name in zf.namelist():
            if name.endswith(".so") or ".so." in name:
                head = zf.open(name).read(20)
                assert head[:4] == b"\x7fELF", name
                machines.add(int.from_bytes(head[18:20], "little"))
    return machines


@pytest.mark.slow
def test_a_foreign_target_carries_its_own_wheels(tmp_path: Path) -> None:
    """linux-aarch64-cp312: wheel tags and the ELF machine of every extension module."""
    target = next(t for t in release.TARGETS if t.name == "linux-aarch64-cp312")
    done = build(tmp_path, target.name)
    pyz = tmp_path / PROJECT.pyz_name(target)
    assert "linux-aarch64-cp312" in done.stdout
    assert not (tmp_path / "octaskly.pyz").exists()  # not this machine's
    assert release.tag_mismatches(pyz, target) == []
    assert elf_machines(pyz) == {ELF_MACHINE["aarch64"]}
    tags_ = [t for lines in release.wheel_tags(pyz).values() for t in lines]
    assert any(t.startswith("cp312-cp312-manylinux") for t in tags_), tags_
    with zipfile.ZipFile(pyz) as zf:
        assert zf.read("__main__.py")  # a shiv zipapp
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3.12\n")


def test_target_platform_lists() -> None:
    linux = next(t for t in release.TARGETS if t.name == "linux-x86_64-cp311")
    # pip needs each manylinux tag spelled out; glibc 2.28 is the newest accepted
    assert "manylinux2014_x86_64" in linux.pip_platforms
    assert "manylinux_2_17_x86_64" in linux.pip_platforms
    assert "manylinux_2_28_x86_64" in linux.pip_platforms
    assert "manylinux_2_34_x86_64" not in linux.pip_platforms
    mac = next(t for t in release.TARGETS if t.name == "macos-arm64-cp313")
    assert "macosx_11_0_universal2" in mac.platforms
    names = [t.name for t in release.TARGETS]
    assert len(names) == len(set(names)) == 15


# -- Docker ---------------------------------------------------------------------------------
DOCKERFILE = (REPO / "Dockerfile").read_text()
COMPOSE = REPO / "docker-compose.yml"


def dockerfile_instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in (raw.strip() for raw in joined.splitlines())
        if line and not line.startswith("#")
    ]


def test_the_image_builds_the_pyz_like_make_release() -> None:
    steps = dockerfile_instructions()
    assert LOCAL is not None
    args = dict(v.split("=", 1) for k, v in steps if k == "ARG" and "=" in v)
    python = f"{LOCAL.python[0]}.{LOCAL.python[1]}"
    assert args["PYTHON_VERSION"] == python  # the Python the local pyz is built for
    froms = [v for k, v in steps if k == "FROM"]
    assert froms == ["python:${PYTHON_VERSION}-slim AS builder", "python:${PYTHON_VERSION}-slim"]
    runs = " ".join(v for k, v in steps if k == "RUN")
    assert "python -m scripts.release --targets local" in runs
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^release:.*\n(\t.*\n)*\t.*-m scripts\.release", makefile, re.M)
    # shiv pinned to the version the local build uses
    from importlib.metadata import version

    assert f'"shiv=={version("shiv")}"' in runs
    copied = " ".join(v for k, v in steps if k == "COPY")
    for source in [*release.SOURCES, "scripts"]:
        assert source in copied, source
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for source in [*release.SOURCES, "scripts"]:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source


def test_the_runtime_image_runs_the_pyz_as_a_non_root_user() -> None:
    steps = dockerfile_instructions()
    final = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    get = {k: v for k, v in final}
    assert "/opt/octaskly/bin/octaskly.pyz" in get["COPY"]
    assert get["ENTRYPOINT"] == '["/opt/octaskly/bin/octaskly.pyz"]'
    assert get["USER"] == "10001:10001"
    assert "useradd --system --uid 10001" in " ".join(v for k, v in final if k == "RUN")
    # pre-extracted as root at build time, into SHIV_ROOT
    assert "SHIV_ROOT=/opt/octaskly/shiv" in get["ENV"]
    user_at = [k for k, _ in final].index("USER")
    assert any(k == "RUN" and "octaskly.pyz --version" in v for k, v in final[:user_at])
    assert sorted(get["EXPOSE"].split()) == ["3000/tcp", "5555/tcp", "5555/udp"]
    assert get["VOLUME"] == "/data"
    assert "/health" in get["HEALTHCHECK"] and "3000" in get["HEALTHCHECK"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "operator/Dockerfile"])
def test_hadolint_passes(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    done = subprocess.run([hadolint, dockerfile], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_matches_the_compose_specification() -> None:
    cli = shutil.which("check-jsonschema") or str(
        Path(sys.executable).with_name("check-jsonschema")
    )
    done = subprocess.run(
        [cli, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_runs_the_guides_cluster() -> None:
    from ruamel.yaml import YAML  # check-jsonschema's YAML parser

    doc = YAML(typ="safe").load(COMPOSE.read_text())
    services = doc["services"]
    assert set(services) == {"dispatcher", "worker"}
    dispatcher, worker = services["dispatcher"], services["worker"]
    assert "octaskly-data:/data" in dispatcher["volumes"]
    assert "octaskly-data" in doc["volumes"]
    assert dispatcher["command"][0] == "dispatcher"
    assert dispatcher["command"][dispatcher["command"].index("--db-path") + 1] == (
        "/data/octaskly.db"
    )
    assert {"5555:5555/tcp", "5555:5555/udp", "3000:3000/tcp"} <= set(dispatcher["ports"])
    assert worker["command"][:3] == ["worker", "--dispatcher-addr", "dispatcher:5555"]
    for service in (dispatcher, worker):
        assert service["environment"]["RUST_LOG"] == "info"
        assert service["secrets"] == ["octaskly_secret"]
        assert service["environment"]["OCTASKLY_SECRET_KEY_FILE"] == "/run/secrets/octaskly_secret"
        # the secret never appears on a command line
        assert not any("secret" in str(arg) for arg in service["command"])
    assert "file" in doc["secrets"]["octaskly_secret"]
    assert worker["depends_on"]["dispatcher"]["condition"] == "service_healthy"
    assert "/data/admin.token" in COMPOSE.read_text()


def test_a_target_without_wheels_is_skipped_with_the_reason(tmp_path: Path) -> None:
    nowhere = release.Target("linux", "mips", (3, 11))
    with pytest.raises(release.Skipped, match="No matching distribution"):
        release.download(PROJECT, nowhere, tmp_path, offline=False)


def test_the_image_layout_runs_as_the_unprivileged_user(releases: tuple[Path, Path]) -> None:
    """The runtime stage without Docker: the pyz pre-extracted by root into a read-only
    SHIV_ROOT, a dispatcher and a worker run as uid 10001 with the secret in a file, and the
    image's HEALTHCHECK command passes."""
    from tests.e2e.procs import free_port, processes, stop, wait_for

    assert os.geteuid() == 0, "needs root to run the image's user 10001 (CI runs as root)"
    dist, _ = releases
    root = Path(tempfile.mkdtemp(prefix="octaskly-image-"))  # not under root's 0700 tmp
    try:
        root.chmod(0o755)
        (root / "bin").mkdir()
        pyz = root / "bin" / "octaskly.pyz"
        shutil.copy2(dist / "octaskly.pyz", pyz)
        interpreter = str(Path(os.path.realpath(sys.executable)).parent)
        env = {"PATH": f"{interpreter}:/usr/bin:/bin", "SHIV_ROOT": str(root / "shiv")}
        subprocess.run([str(pyz), "--version"], env=env, check=True, capture_output=True)
        subprocess.run(["chmod", "-R", "go-w", str(root / "shiv")], check=True)
        data, secret = root / "data", root / "secret.key"
        data.mkdir(mode=0o700)
        secret.write_text("image-test-secret-0123456789\n")
        for path in (data, secret):
            os.chown(path, 10001, 10001)
        secret.chmod(0o400)
        port, api_port = free_port(), free_port()
        env |= {"HOME": str(data), "RUST_LOG": "info", "OCTASKLY_SECRET_KEY_FILE": str(secret)}
        as_user: dict[str, object] = {"user": 10001, "group": 10001, "extra_groups": []}
        dispatcher = ["dispatcher", "--port", str(port), "--api-port", str(api_port)]
        dispatcher += ["--bind", "127.0.0.1", "--db-path", str(data / "octaskly.db")]
        worker = ["worker", "--dispatcher-addr", f"127.0.0.1:{port}", "--name", "image-w"]
        healthcheck = dict(dockerfile_instructions())["HEALTHCHECK"]
        health = json.loads(healthcheck.split(" CMD ", 1)[1])
        health = [arg.replace(":3000/", f":{api_port}/") for arg in health]
        with processes() as ps, (root / "log").open("wb") as log:
            for args in (dispatcher, worker):
                ps.append(
                    subprocess.Popen(  # type: ignore[call-overload]
                        [str(pyz), *args], cwd=data, env=env, stdout=log, stderr=log, **as_user
                    )
                )

            def healthy() -> bool:
                assert ps[0].poll() is None, (root / "log").read_text()
                check = subprocess.run(health, env=env, capture_output=True, **as_user)  # type: ignore[call-overload]
                return bool(check.returncode == 0)

            wait_for(healthy, timeout=60, what="the image's HEALTHCHECK")
            token = data / "admin.token"
            assert token.stat().st_uid == 10001 and token.stat().st_mode & 0o777 == 0o600
            wait_for(lambda: b"image-w" in (root / "log").read_bytes(), what="the worker")
            assert all(p.poll() is None for p in ps), (root / "log").read_text()
            for proc in reversed(ps):
                stop(proc)
        # nothing was written into the root-owned extraction by the unprivileged user
        written = [p for p in (root / "shiv").rglob("*") if p.stat().st_uid == 10001]
        assert written == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
