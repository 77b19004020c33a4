"""Release build (`make release`): one reproducible shiv zipapp per supported target.

For each target (OS, CPU, CPython version) this downloads binary wheels for that target
into a cache outside the repository (`~/.cache/octaskly-release/`), installs them into a
staging directory with pip's `--platform/--python-version/--implementation/--only-binary`,
and zips it with `shiv --reproducible`. Then it checks every wheel tag inside each pyz
against the target, writes a tarball per target (the pyz keeps mode 0755), `SHA256SUMS`,
and `dist/octaskly.pyz` (the pyz for this machine), and measures this machine's start-up.

    python -m scripts.release                      # every target
    python -m scripts.release --targets local      # only this machine's target
    python -m scripts.release --list               # the targets and their pip platforms
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "octaskly-release"
# Fixed timestamp for every file in the pyz and the tarballs: 1980-01-01, shiv's default.
SOURCE_DATE_EPOCH = 315532800
PYTHONS = ((3, 11), (3, 12), (3, 13))
# glibc 2.28+ (Debian 10, RHEL 8, Ubuntu 18.10): pip needs every manylinux tag spelled out.
MANYLINUX_MAX_MINOR = 28
MACOS_MIN = (12, 0)
START_BUDGET_SECONDS = 1.0
# What the project's wheel is built from (the Dockerfile copies the same, plus scripts/).
SOURCES = ("pyproject.toml", "README.md", "octaskly")


@dataclasses.dataclass(frozen=True)
class Target:
    os: str  # linux | macos | windows
    arch: str  # x86_64 | aarch64 | arm64 | amd64
    python: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.os}-{self.arch}-cp{self.python[0]}{self.python[1]}"

    @property
    def pip_platforms(self) -> list[str]:
        """The `--platform` values given to pip (pip expands a macOS one by itself)."""
        if self.os == "linux":
            tags_ = [f"manylinux_2_{m}_{self.arch}" for m in range(MANYLINUX_MAX_MINOR, 16, -1)]
            tags_.append(f"manylinux2014_{self.arch}")
            if self.arch == "x86_64":
                tags_ += [f"manylinux_2_12_{self.arch}", f"manylinux2010_{self.arch}"]
                tags_ += [f"manylinux_2_5_{self.arch}", f"manylinux1_{self.arch}"]
            return tags_
        if self.os == "macos":
            return [f"macosx_{MACOS_MIN[0]}_{MACOS_MIN[1]}_{self.arch}"]
        return [f"win_{self.arch}"]

    @property
    def platforms(self) -> list[str]:
        """Every platform tag a wheel for this target may carry (what pip accepts)."""
        if self.os == "macos":
            return list(tags.mac_platforms(MACOS_MIN, self.arch))
        return self.pip_platforms

    def supported_tags(self) -> frozenset[tags.Tag]:
        interpreter = f"cp{self.python[0]}{self.python[1]}"
        return frozenset(
            [
                *tags.cpython_tags(self.python, abis=[interpreter], platforms=self.platforms),
                *tags.compatible_tags(self.python, interpreter, self.platforms),
            ]
        )

    @property
    def shebang(self) -> str:
        return f"/usr/bin/env python{self.python[0]}.{self.python[1]}"

    def pip_target_args(self) -> list[str]:
        args = ["--only-binary=:all:", "--implementation", "cp"]
        args += ["--python-version", f"{self.python[0]}.{self.python[1]}"]
        for plat in self.pip_platforms:
            args += ["--platform", plat]
        return args


TARGETS: tuple[Target, ...] = tuple(
    Target(os_, arch, py)
    for os_, arches in (
        ("linux", ("x86_64", "aarch64")),
        ("macos", ("x86_64", "arm64")),
        ("windows", ("amd64",)),
    )
    for arch in arches
    for py in PYTHONS
)


def local_target() -> Target | None:
    machine = platform.machine().lower()
    system = {"linux": "linux", "darwin": "macos", "win32": "windows"}.get(sys.platform)
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if system == "macos":
        arch = "arm64" if machine == "arm64" else "x86_64"
    elif system == "windows":
        arch = "amd64"
    wanted = (system, arch, sys.version_info[:2])
    return next((t for t in TARGETS if (t.os, t.arch, t.python) == wanted), None)


@dataclasses.dataclass(frozen=True)
class Project:
    name: str
    version: str
    dependencies: tuple[str, ...]

    @classmethod
    def read(cls, root: Path = REPO) -> Project:
        meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
        return cls(meta["name"], meta["version"], tuple(meta["dependencies"]))

    def pyz_name(self, target: Target) -> str:
        return f"{self.name}-{self.version}-{target.name}.pyz"

    def tarball_name(self, target: Target) -> str:
        return f"{self.name}-{self.version}-{target.name}.tar.gz"


class Skipped(Exception):
    """A target some dependency has no wheel for."""


# -- building -------------------------------------------------------------------------------
def run(cmd: Sequence[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [str(c) for c in cmd], capture_output=True, text=True, check=False, **kwargs
    )


def pip(*args: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]


def build_project_wheel(project: Project, out: Path) -> Path:
    """The project's own wheel, built from a clean copy of the sources (no stale build/)."""
    with tempfile.TemporaryDirectory(prefix="octaskly-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in SOURCES:
            if (REPO / name).is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(REPO / name, src / name, ignore=ignore)
            else:
                shutil.copy2(REPO / name, src / name)
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH))
        done = run(pip("wheel", "--no-deps", "--wheel-dir", out, src), env=env)
        if done.returncode != 0:
            raise RuntimeError(f"building the {project.name} wheel failed:\n{done.stdout}")
    return next(out.glob(f"{project.name}-{project.version}-*.whl"))


def _has_every_dependency(wheelhouse: Path, dependencies: Iterable[str]) -> bool:
    """Whether the cached wheels include one for each direct dependency (a dependency
    added since the cache was filled must be downloaded, offline or not)."""
    have = {canonicalize_name(path.name.split("-")[0]) for path in wheelhouse.glob("*.whl")}
    wanted = {canonicalize_name(Requirement(d).name) for d in dependencies}
    return bool(have) and wanted <= have


def download(project: Project, target: Target, cache: Path, offline: bool) -> Path:
    """The target's wheels in `<cache>/wheels/<target>`: pip only downloads what is missing."""
    wheelhouse = cache / "wheels" / target.name
    if offline and _has_every_dependency(wheelhouse, project.dependencies):
        return wheelhouse
    wheelhouse.mkdir(parents=True, exist_ok=True)
    done = run(
        pip(
            "download",
            "--cache-dir",
            cache / "pip",
            "--dest",
            wheelhouse,
            *target.pip_target_args(),
            *project.dependencies,
        )
    )
    if done.returncode != 0:
        missing = [line for line in done.stderr.splitlines() if "No matching" in line]
        raise Skipped("; ".join(missing) or done.stderr.strip()[-500:])
    return wheelhouse


def build_pyz(
    project: Project, target: Target, wheel_dir: Path, wheelhouse: Path, out: Path
) -> Path:
    """Install the wheels for `target` into a staging dir, then zip it with shiv."""
    with tempfile.TemporaryDirectory(prefix=f"octaskly-{target.name}-") as tmp:
        stage = Path(tmp) / "site-packages"
        done = run(
            pip(
                "install",
                "--no-index",
                "--find-links",
                wheel_dir,
                "--find-links",
                wheelhouse,
                "--no-compile",
                "--no-warn-script-location",
                "--target",
                stage,
                *target.pip_target_args(),
                f"{project.name}=={project.version}",
            ),
            env=dict(os.environ, PIP_REQUIRE_VIRTUALENV="0"),
        )
        if done.returncode != 0:
            raise RuntimeError(f"{target.name}: pip install failed:\n{done.stdout}{done.stderr}")
        # Console scripts carry this machine's interpreter path: not for the target, not
        # reproducible elsewhere. The pyz's entry point comes from entry_points.txt.
        shutil.rmtree(stage / "bin", ignore_errors=True)
        drop_scripts_from_records(stage)
        shiv = Path(sys.executable).with_name("shiv")
        done = run(
            [
                shiv if shiv.exists() else "shiv",
                "--reproducible",
                "--compressed",
                "--console-script",
                project.name,
                "--python",
                target.shebang,
                "--site-packages",
                stage,
                "--output-file",
                out,
            ],
            env=dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH)),
        )
        if done.returncode != 0:
            raise RuntimeError(f"{target.name}: shiv failed:\n{done.stdout}{done.stderr}")
    out.chmod(0o755)
    return out


def drop_scripts_from_records(stage: Path) -> None:
    """Forget the removed console scripts in each RECORD: their hashes cover this machine's
    interpreter path, which would make the pyz differ between build environments."""
    for record in stage.glob("*.dist-info/RECORD"):
        lines = record.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.startswith("../../bin/")]
        if kept != lines:
            record.write_text("".join(kept))


# -- checks ---------------------------------------------------------------------------------
def wheel_tags(pyz: Path) -> dict[str, list[str]]:
    """`{dist-info dir: [Tag: lines]}` of every distribution bundled in the pyz."""
    found: dict[str, list[str]] = {}
    with zipfile.ZipFile(pyz) as zf:
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) >= 2 and parts[-2].endswith(".dist-info") and parts[-1] == "WHEEL":
                lines = zf.read(name).decode().splitlines()
                found[parts[-2]] = [
                    line.split(":", 1)[1].strip() for line in lines if line.startswith("Tag:")
                ]
    return found


def tag_mismatches(pyz: Path, target: Target) -> list[str]:
    """Bundled distributions none of whose wheel tags this target's interpreter accepts."""
    supported = target.supported_tags()
    bad = []
    for dist, lines in sorted(wheel_tags(pyz).items()):
        parsed = {tag for line in lines for tag in tags.parse_tag(line)}
        if not parsed & supported:
            bad.append(f"{dist}: {', '.join(lines) or 'no Tag line'}")
    if not wheel_tags(pyz):
        bad.append("no .dist-info/WHEEL in the archive")
    return bad


# -- packaging ------------------------------------------------------------------------------
def write_tarball(pyz: Path, tarball: Path, folder: str) -> Path:
    """`folder/octaskly.pyz` (mode 0755, root, fixed mtime) as a reproducible .tar.gz."""
    data = pyz.read_bytes()
    info = tarfile.TarInfo(f"{folder}/octaskly.pyz")
    info.size, info.mode, info.mtime = len(data), 0o755, SOURCE_DATE_EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    folder_info = tarfile.TarInfo(folder)
    folder_info.type, folder_info.mode = tarfile.DIRTYPE, 0o755
    folder_info.mtime = SOURCE_DATE_EPOCH
    folder_info.uname = folder_info.gname = "root"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(folder_info)
        tar.addfile(info, io.BytesIO(data))
    with tarball.open("wb") as fh, gzip.GzipFile("", "wb", 9, fh, mtime=0) as gz:
        gz.write(raw.getvalue())
    return tarball


def write_sha256sums(dist: Path, names: Iterable[str]) -> Path:
    lines = [
        f"{hashlib.sha256((dist / name).read_bytes()).hexdigest()}  {name}\n"
        for name in sorted(names)
    ]
    out = dist / "SHA256SUMS"
    out.write_text("".join(lines))
    return out


def measure_start(pyz: Path, runs: int = 5) -> tuple[float, float, str]:
    """(first run with extraction, median of `runs` runs after it, --version output)."""
    with tempfile.TemporaryDirectory(prefix="octaskly-shiv-") as root:
        env = dict(os.environ, SHIV_ROOT=root)
        times = []
        output = ""
        for _ in range(runs + 1):
            start = time.perf_counter()
            done = run([pyz, "--version"], env=env, cwd=root)
            times.append(time.perf_counter() - start)
            if done.returncode != 0:
                raise RuntimeError(f"{pyz} --version failed: {done.stderr}")
            output = done.stdout.strip()
    return times[0], statistics.median(times[1:]), output


# -- main -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    target: Target
    pyz: Path | None = None
    skipped: str = ""


def build_target(
    project: Project, target: Target, wheel_dir: Path, dist: Path, cache: Path, offline: bool
) -> Result:
    try:
        wheelhouse = download(project, target, cache, offline)
    except Skipped as exc:
        return Result(target, skipped=str(exc))
    pyz = build_pyz(project, target, wheel_dir, wheelhouse, dist / project.pyz_name(target))
    bad = tag_mismatches(pyz, target)
    if bad:
        raise RuntimeError(f"{target.name}: wheels for another platform:\n  " + "\n  ".join(bad))
    return Result(target, pyz)


def select(names: str) -> list[Target]:
    if names == "all":
        return list(TARGETS)
    chosen = []
    by_name = {t.name: t for t in TARGETS}
    for name in names.split(","):
        if name == "local":
            here = local_target()
            if here is None:
                raise SystemExit("this machine is not one of the release targets")
            chosen.append(here)
        elif name in by_name:
            chosen.append(by_name[name])
        else:
            raise SystemExit(f"unknown target {name!r}: one of {', '.join(by_name)}")
    return chosen


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.release", description=__doc__)
    parser.add_argument("--targets", default="all", help="all, local, or names (comma-separated)")
    parser.add_argument("--dist", type=Path, default=REPO / "dist")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--offline", action="store_true", help="reuse cached wheels, no index")
    parser.add_argument("--jobs", type=int, default=4, help="targets built at once")
    parser.add_argument(
        "--verify-reproducible", action="store_true", help="build this machine's pyz twice"
    )
    parser.add_argument("--no-measure", action="store_true", help="skip the start-up timing")
    parser.add_argument("--list", action="store_true", help="print the targets and exit")
    return parser.parse_args(argv)


def report(results: list[Result], dist: Path) -> None:
    for r in results:
        if r.pyz is not None:
            size = r.pyz.stat().st_size / 1e6
            print(f"  built   {r.target.name:<22} {r.pyz.relative_to(dist)}  {size:.1f} MB")
        else:
            print(f"  skipped {r.target.name:<22} {r.skipped}")


def finish(project: Project, results: list[Result], dist: Path) -> list[str]:
    """Tarballs, dist/octaskly.pyz and SHA256SUMS; returns the artefact names."""
    names = []
    here = local_target()
    for r in results:
        if r.pyz is None:
            continue
        tarball = dist / project.tarball_name(r.target)
        write_tarball(r.pyz, tarball, f"{project.name}-{project.version}-{r.target.name}")
        names += [r.pyz.name, tarball.name]
        if r.target == here:
            shutil.copy2(r.pyz, dist / "octaskly.pyz")
            names.append("octaskly.pyz")
    write_sha256sums(dist, names)
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    targets = select(args.targets)
    if args.list:
        for t in targets:
            print(t.name, " ".join(t.pip_platforms))
        return 0
    project = Project.read()
    dist: Path = args.dist.resolve()
    dist.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="octaskly-wheel-") as tmp:
        wheel_dir = Path(tmp)
        build_project_wheel(project, wheel_dir)
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = [
                pool.submit(build_target, project, t, wheel_dir, dist, args.cache, args.offline)
                for t in targets
            ]
            results = [f.result() for f in futures]
        here = local_target()
        if args.verify_reproducible and here in targets:
            again = build_pyz(
                project,
                here,
                wheel_dir,
                args.cache / "wheels" / here.name,
                Path(tmp) / "again.pyz",
            )
            if again.read_bytes() != (dist / project.pyz_name(here)).read_bytes():
                print(f"NOT reproducible: two builds of {here.name} differ", file=sys.stderr)
                return 1
            print(f"reproducible: a second build of {here.name} is byte-identical")
    finish(project, results, dist)
    print(f"release {project.version} in {dist} ({time.monotonic() - started:.0f} s):")
    report(results, dist)
    print("  wheel tags of every pyz match its target; SHA256SUMS written")
    if here is not None and not args.no_measure and (dist / "octaskly.pyz").exists():
        first, median, version = measure_start(dist / "octaskly.pyz")
        verdict = "ok" if median < START_BUDGET_SECONDS else "OVER BUDGET"
        print(
            f"start-up of dist/octaskly.pyz ({version}): first run (extracts) {first:.2f} s, "
            f"then median of 5 `--version` runs {median:.2f} s "
            f"(budget {START_BUDGET_SECONDS:.0f} s: {verdict})"
        )
        if median >= START_BUDGET_SECONDS:
            return 1
    if not any(r.pyz for r in results):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
