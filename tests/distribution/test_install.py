"""Bare-metal distribution: installers/install.sh, the systemd units and the backup script.

Everything here runs for real: a pyz built with `make pyz`, installed with `install.sh
--root` into temporary directories, units checked by `systemd-analyze`, scripts by
`shellcheck`, and the installed pyz running a dispatcher and a worker as an unprivileged
user (uid 65534) from its read-only pre-extracted dependencies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import aiosqlite
import pytest

from octaskly.store import migrating
from tests.e2e import procs
from tests.e2e.procs import free_port, wait_healthy

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "installers" / "install.sh"
UNITS = REPO / "systemd"
BACKUP_SCRIPT = UNITS / "octaskly-backup"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
NOBODY = 65534
# the interpreter the installed launcher uses: the system one when it is the pyz's CPython
# version (uid 65534 cannot reach a python under /root), else ours
SYSTEM_PY = Path("/usr/bin/python3.11")
PYTHON = str(SYSTEM_PY) if SYSTEM_PY.exists() else sys.executable
SHIV_DIR = "opt/octaskly/shiv"
EXPOSURE_PROPERTY = "systemd_exposure"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: `make system-deps` installs it")
    return path


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with octaskly.pyz (built by `make pyz`) and its SHA256SUMS, built once
    per test session and shared by the xdist workers (under a lock)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this session
    out = base / "distribution-release"
    out.mkdir(exist_ok=True)
    with (base / "distribution-release.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pyz = out / "octaskly.pyz"
        if not (out / "SHA256SUMS").exists():
            build = subprocess.run(
                ["make", "-s", "pyz", f"PYZ={pyz}"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert build.returncode == 0, build.stdout + build.stderr
            (out / "SHA256SUMS").write_text(f"{_sha256(pyz)}  octaskly.pyz\n")
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install(root: Path, *args: str, pyz: Path | None) -> subprocess.CompletedProcess[str]:
    argv = [str(INSTALL), "--root", str(root), *args]
    if pyz is not None:
        argv += ["--pyz", str(pyz)]
    env = procs.clean_env(PYTHON=PYTHON)
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def install_ok(root: Path, *args: str, pyz: Path | None) -> subprocess.CompletedProcess[str]:
    result = install(root, *args, pyz=pyz)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under root: mode, size, mtime and (outside the extracted pyz) content."""
    snap: dict[str, tuple[int, int, int, str]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        digest = ""
        if stat.S_ISREG(st.st_mode) and not rel.startswith(SHIV_DIR):
            digest = _sha256(path)
        snap[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return snap


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def installed_octaskly(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed launcher, with the pre-extracted dependencies under root."""
    env = procs.clean_env(SHIV_ROOT=str(root / SHIV_DIR))
    return subprocess.run(
        [str(root / "opt/octaskly/bin/octaskly"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=root,
    )


async def make_database(path: Path, marker: str) -> None:
    """A real (migrated) octaskly database, with a marker row to recognise copies by."""
    async with aiosqlite.connect(path) as db:
        await migrating.migrate(db)
        await db.execute("CREATE TABLE test_marker (value TEXT)")
        await db.execute("INSERT INTO test_marker VALUES (?)", (marker,))
        await db.commit()


def marker_of(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(conn.execute("SELECT value FROM test_marker").fetchone()[0])
    finally:
        conn.close()


# --------------------------------------------------------------------------------- tests
EXPECTED_MODES = {
    "opt/octaskly/bin": 0o755,
    "opt/octaskly/bin/octaskly.pyz": 0o755,
    "opt/octaskly/bin/octaskly": 0o755,
    "opt/octaskly/bin/octaskly-backup": 0o755,
    "opt/octaskly/shiv": 0o755,
    "etc/octaskly": 0o750,
    "etc/octaskly/secret": 0o600,
    "etc/octaskly/octaskly.toml": 0o640,
    "var/lib/octaskly": 0o700,
    "var/backups/octaskly": 0o700,
    "etc/systemd/system/octaskly-dispatcher.service": 0o644,
    "etc/systemd/system/octaskly-backup.service": 0o644,
    "etc/systemd/system/octaskly-backup.timer": 0o644,
}


def test_dispatcher_install_layout_is_complete_and_rerunning_changes_nothing(
    release: Path, root: Path
) -> None:
    pyz = release / "octaskly.pyz"
    install_ok(root, "--role", "dispatcher", "--no-start", pyz=pyz)

    for rel, want in EXPECTED_MODES.items():
        assert (root / rel).exists(), rel
        assert mode(root / rel) == want, f"{rel}: {oct(mode(root / rel))} != {oct(want)}"
    assert not (root / "etc/systemd/system/octaskly-worker@.service").exists()
    assert (root / "opt/octaskly/bin/octaskly.pyz").read_bytes() == pyz.read_bytes()
    secret = (root / "etc/octaskly/secret").read_bytes()
    assert re.fullmatch(rb"[0-9a-f]{64}", secret), secret
    # pre-extracted and compiled: nobody but the owner (root) may write there
    extracted = [p for p in (root / SHIV_DIR).iterdir() if p.is_dir()]
    assert len(extracted) == 1 and extracted[0].name.startswith("octaskly.pyz_")
    assert list(extracted[0].rglob("*.pyc")), "the extracted pyz was not compiled"
    for path in (root / SHIV_DIR).rglob("*"):
        assert not path.lstat().st_mode & 0o022, f"{path} is group/other writable"
    # the owners install.sh could not set (not root / --root) are recorded
    ownership = (root / "opt/octaskly/OWNERSHIP").read_text().splitlines()
    for line in (
        "octaskly:octaskly /etc/octaskly/secret",
        "root:octaskly /etc/octaskly",
        "root:octaskly /etc/octaskly/octaskly.toml",
        "octaskly:octaskly /var/lib/octaskly",
        "octaskly:octaskly /var/backups/octaskly",
        "root:root /opt/octaskly/bin/octaskly.pyz",
        "root:root /opt/octaskly/shiv (recursive)",
    ):
        assert line in ownership, line

    # the units: the service user, the read-only pre-extracted pyz, the secret by file
    for unit in ("octaskly-dispatcher.service", "octaskly-backup.service"):
        text = (root / "etc/systemd/system" / unit).read_text()
        assert "\nUser=octaskly\n" in text and "\nGroup=octaskly\n" in text, unit
        assert "\nEnvironment=SHIV_ROOT=/opt/octaskly/shiv\n" in text, unit
        assert re.search(r"^ExecStart=/opt/octaskly/bin/octaskly", text, re.M), unit
    dispatcher = (root / "etc/systemd/system/octaskly-dispatcher.service").read_text()
    assert "\nEnvironment=OCTASKLY_SECRET_KEY_FILE=/etc/octaskly/secret\n" in dispatcher
    assert "\nStateDirectory=octaskly\n" in dispatcher
    assert "\nStateDirectoryMode=0700\n" in dispatcher
    timer = (root / "etc/systemd/system/octaskly-backup.timer").read_text()
    for line in ("OnCalendar=daily", "OnBootSec=10min", "Persistent=true"):
        assert f"\n{line}\n" in timer, line
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        assert "OCTASKLY_SECRET_KEY=" not in text, unit
        assert "--secret-key " not in text and "--secret-key=" not in text, unit
        assert not re.search(r"^Environment=.*%i", text, re.M), unit

    # the written configuration is valid and points at the secret file and the data dir
    toml_text = (root / "etc/octaskly/octaskly.toml").read_text()
    assert 'secret_key_file = "/etc/octaskly/secret"' in toml_text
    assert 'data_dir = "/var/lib/octaskly"' in toml_text
    check = installed_octaskly(root, "config", "check", str(root / "etc/octaskly/octaskly.toml"))
    assert check.returncode == 0, check.stdout + check.stderr
    # the launcher it wrote is clean shell too
    lint = subprocess.run(
        [_need("shellcheck"), str(root / "opt/octaskly/bin/octaskly")],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout

    # idempotent: a second run changes nothing at all (not even a timestamp)
    before = snapshot(root)
    install_ok(root, "--role", "dispatcher", "--no-start", pyz=pyz)
    assert snapshot(root) == before
    assert (root / "etc/octaskly/secret").read_bytes() == secret
    # --dry-run of an installed system changes nothing either
    dry = install_ok(root, "--role", "dispatcher", "--dry-run", pyz=pyz)
    assert snapshot(root) == before
    assert "would run" in dry.stdout


def test_dry_run_on_an_empty_root_writes_nothing(release: Path, root: Path) -> None:
    dry = install_ok(root, "--role", "dispatcher", "--dry-run", pyz=release / "octaskly.pyz")
    assert list(root.iterdir()) == []
    assert "would run: mkdir -p" in dry.stdout
    assert "would write /etc/octaskly/octaskly.toml" in dry.stdout


def test_a_tampered_pyz_is_refused(release: Path, root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(release / "SHA256SUMS", bad / "SHA256SUMS")
    data = bytearray((release / "octaskly.pyz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "octaskly.pyz").write_bytes(bytes(data))
    result = install(root, "--role", "dispatcher", "--no-start", pyz=bad / "octaskly.pyz")
    assert result.returncode != 0
    assert "SHA-256 mismatch" in result.stderr and "refusing" in result.stderr
    assert list(root.iterdir()) == []
    # a SHA256SUMS without an entry for the file is refused too
    (bad / "SHA256SUMS").write_text(f"{'0' * 64}  something-else.pyz\n")
    result = install(root, "--role", "dispatcher", "--no-start", pyz=bad / "octaskly.pyz")
    assert result.returncode != 0 and "no entry for octaskly.pyz" in result.stderr


async def test_upgrade_keeps_config_secret_and_data_and_backs_up_first(
    release: Path, root: Path, tmp_path: Path
) -> None:
    # "the old release": the same program, other bytes (a different zip comment)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(release / "octaskly.pyz", old / "octaskly.pyz")
    with zipfile.ZipFile(old / "octaskly.pyz", "a") as zf:
        zf.comment = b"octaskly previous release"
    (old / "SHA256SUMS").write_text(f"{_sha256(old / 'octaskly.pyz')}  octaskly.pyz\n")
    install_ok(root, "--role", "dispatcher", "--no-start", pyz=old / "octaskly.pyz")

    config = root / "etc/octaskly/octaskly.toml"
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    secret = (root / "etc/octaskly/secret").read_bytes()
    db = root / "var/lib/octaskly/octaskly.db"
    await make_database(db, "before the upgrade")
    db_bytes = db.read_bytes()

    result = install_ok(root, "--role", "dispatcher", "--no-start", pyz=release / "octaskly.pyz")
    assert (root / "opt/octaskly/bin/octaskly.pyz").read_bytes() == (
        release / "octaskly.pyz"
    ).read_bytes()
    assert config.read_text().endswith("# edited by the operator\n")
    assert (root / "etc/octaskly/secret").read_bytes() == secret
    assert db.read_bytes() == db_bytes
    backups = list((root / "var/backups/octaskly").glob("pre-upgrade-*.db"))
    assert len(backups) == 1, result.stderr
    assert marker_of(backups[0]) == "before the upgrade"
    assert "sqlite3's backup API" not in result.stderr  # made by `octaskly backup`
    # only one extraction is left, the new one, and it runs
    assert len([p for p in (root / SHIV_DIR).iterdir() if p.is_dir()]) == 1
    version = installed_octaskly(root, "--version")
    assert version.stdout.strip() == f"octaskly {VERSION}", version.stderr


def test_worker_install(release: Path, root: Path, tmp_path: Path) -> None:
    dispatchers_secret = tmp_path / "secret"
    dispatchers_secret.write_text("the-dispatchers-cluster-secret-0123456789")
    install_ok(
        root,
        "--role",
        "worker",
        "--dispatcher-addr",
        "10.0.0.5:5555",
        "--name",
        "w1",
        "--secret-file",
        str(dispatchers_secret),
        "--no-start",
        pyz=release / "octaskly.pyz",
    )
    secret = root / "etc/octaskly/secret"
    assert secret.read_bytes() == dispatchers_secret.read_bytes()
    assert mode(secret) == 0o600
    units = sorted(p.name for p in (root / "etc/systemd/system").iterdir())
    assert units == ["octaskly-worker@.service"]
    assert not (root / "opt/octaskly/bin/octaskly-backup").exists()
    text = (root / "etc/systemd/system/octaskly-worker@.service").read_text()
    assert re.search(r"^ExecStart=/opt/octaskly/bin/octaskly worker .*--name %i$", text, re.M)
    assert "\nEnvironment=OCTASKLY_SECRET_KEY_FILE=/etc/octaskly/secret\n" in text
    config = root / "etc/octaskly/octaskly.toml"
    settings = tomllib.loads(config.read_text())
    assert settings["worker"]["dispatcher_addr"] == ["10.0.0.5:5555"]
    if shutil.which("bwrap"):
        assert settings["worker"]["sandbox_level"] == "strict"
    check = installed_octaskly(root, "config", "check", str(config))
    assert check.returncode == 0, check.stdout + check.stderr


async def test_uninstall_keeps_data_and_purge_removes_it(release: Path, root: Path) -> None:
    install_ok(root, "--role", "dispatcher", "--no-start", pyz=release / "octaskly.pyz")
    await make_database(root / "var/lib/octaskly/octaskly.db", "kept")
    install_ok(root, "--uninstall", pyz=None)
    assert not (root / "opt/octaskly").exists()
    assert list((root / "etc/systemd/system").iterdir()) == []
    assert (root / "etc/octaskly/secret").exists()
    assert (root / "etc/octaskly/octaskly.toml").exists()
    assert marker_of(root / "var/lib/octaskly/octaskly.db") == "kept"
    assert (root / "var/backups/octaskly").is_dir()
    install_ok(root, "--uninstall", "--purge", pyz=None)
    for gone in ("etc/octaskly", "var/lib/octaskly", "var/backups/octaskly", "opt/octaskly"):
        assert not (root / gone).exists(), gone


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = [INSTALL, BACKUP_SCRIPT]
    result = subprocess.run(
        [_need("shellcheck"), *map(str, scripts)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _units_pointing_at(target: Path, opt: Path) -> Path:
    """The units, copied with /opt/octaskly rewritten to a real installed tree."""
    target.mkdir()
    for unit in [*UNITS.glob("*.service"), *UNITS.glob("*.timer")]:
        text = unit.read_text().replace("/opt/octaskly/", f"{opt}/")
        (target / unit.name).write_text(text)
    shutil.copy(target / "octaskly-worker@.service", target / "octaskly-worker@w1.service")
    return target


def test_units_verify_cleanly_and_are_hardened(
    release: Path,
    root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    record_property: pytest.RecordProperty,
) -> None:
    analyze = _need("systemd-analyze")
    install_ok(root, "--role", "dispatcher", "--no-start", pyz=release / "octaskly.pyz")
    units = _units_pointing_at(tmp_path / "units", root / "opt/octaskly")
    names = sorted(p.name for p in units.iterdir())
    assert names == [
        "octaskly-backup.service",
        "octaskly-backup.timer",
        "octaskly-dispatcher.service",
        "octaskly-worker@.service",
        "octaskly-worker@w1.service",
    ]
    for name in names:
        result = subprocess.run(
            [analyze, "verify", "--man=no", f"./{name}"],
            cwd=units,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), name

    scores = {}
    for name in ("octaskly-dispatcher.service", "octaskly-worker@w1.service"):
        name_score = _exposure(analyze, units, name)
        scores[name] = name_score
    summary = "systemd-analyze security --offline=true: " + ", ".join(
        f"{name} {score}" for name, score in scores.items()
    )
    record_property(EXPOSURE_PROPERTY, summary)  # printed in the summary (conftest.py)
    with capsys.disabled():
        print(f"\n{summary}")
    assert scores["octaskly-dispatcher.service"] <= 3.0
    # the worker runs arbitrary tasks in bubblewrap: namespaces, mounts and its own /proc
    # have to stay possible, and it kills each none/basic task's cgroup in the subtree it
    # is delegated (Delegate=yes, so no ProtectControlGroups: +0.2); keep it where it is
    assert scores["octaskly-worker@w1.service"] <= 3.1
    assert _exposure(analyze, units, "octaskly-backup.service") <= 1.0


def _exposure(analyze: str, units: Path, name: str) -> float:
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", f"./{name}"],
        cwd=units,
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


def test_worker_unit_hardening_keeps_the_strict_sandbox_possible(tmp_path: Path) -> None:
    """The worker unit sets NoNewPrivileges and an empty capability bounding set and runs
    unprivileged; bubblewrap (the strict sandbox) must still work there. And the reason the
    unit does not set ProtectKernelTunables/ProtectKernelLogs: with part of /proc covered,
    the kernel refuses bubblewrap a fresh /proc."""
    bwrap = _need("bwrap")
    sandbox = [
        bwrap,
        *("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts"),
        *("--unshare-cgroup-try", "--disable-userns", "--die-with-parent"),
        *("--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"),
        "true",
    ]
    as_worker = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    hardened = [*as_worker, "--no-new-privs", "--bounding-set=-all", *sandbox]
    ok = subprocess.run(hardened, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    covered = 'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"'
    refused = subprocess.run(
        ["unshare", "--mount", "sh", "-c", covered, "sh", *hardened],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0 and "proc" in refused.stderr, refused.stderr


async def test_backup_script_copies_and_prunes(release: Path, root: Path, tmp_path: Path) -> None:
    install_ok(root, "--role", "dispatcher", "--no-start", pyz=release / "octaskly.pyz")
    await make_database(root / "var/lib/octaskly/octaskly.db", "nightly")
    backups = tmp_path / "backups"
    backups.mkdir()
    day = 86400
    now = time.time()
    aged = {
        "octaskly-20000101T000000Z.db": now - 31 * day,  # past 30 days: removed
        "octaskly-20000102T000000Z.db": now - 29 * day,  # kept
        "pre-upgrade-20000101T000000Z.db": now - 90 * day,  # not the script's: kept
    }
    for name, mtime in aged.items():
        (backups / name).write_text("old")
        os.utime(backups / name, (mtime, mtime))
    env = procs.clean_env(
        OCTASKLY=str(root / "opt/octaskly/bin/octaskly"),
        SHIV_ROOT=str(root / SHIV_DIR),
        BACKUP_DIR=str(backups),
        DATA_DIR=str(root / "var/lib/octaskly"),
        CONFIG=str(root / "etc/octaskly/octaskly.toml"),
    )
    result = subprocess.run(
        [str(root / "opt/octaskly/bin/octaskly-backup")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    names = sorted(p.name for p in backups.iterdir())
    new = [n for n in names if n not in aged]
    assert len(new) == 1 and re.fullmatch(r"octaskly-\d{8}T\d{6}Z\.db", new[0]), names
    assert marker_of(backups / new[0]) == "nightly"
    assert mode(backups / new[0]) == 0o600
    assert "octaskly-20000101T000000Z.db" not in names
    assert {"octaskly-20000102T000000Z.db", "pre-upgrade-20000101T000000Z.db"} <= set(names)
    # a bad KEEP_DAYS is refused before anything happens
    bad = subprocess.run(
        [str(BACKUP_SCRIPT)], capture_output=True, text=True, env=dict(env, KEEP_DAYS="x")
    )
    assert bad.returncode == 2 and "KEEP_DAYS" in bad.stderr


# MemoryDenyWriteExecute=yes of the dispatcher unit, approximated by the kernel's own
# PR_SET_MDWE (Linux 6.3+; inherited by exec): no writable+executable mappings
MDWE_EXEC = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def _kernel_has_mdwe() -> bool:
    major, minor = (int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    return (major, minor) >= (6, 3)


@contextlib.contextmanager
def world_readable_tmpdir() -> Iterator[Path]:
    """A directory uid 65534 can traverse (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="octaskly-dist-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_installed_pyz_runs_a_cluster_as_an_unprivileged_user(release: Path) -> None:
    with world_readable_tmpdir() as base:
        root = base / "root"
        root.mkdir()
        install_ok(root, "--role", "dispatcher", "--no-start", pyz=release / "octaskly.pyz")
        shiv = root / SHIV_DIR
        for path in [shiv, *shiv.rglob("*")]:  # read-only for everyone at run time
            if not path.is_symlink():
                path.chmod(stat.S_IMODE(path.lstat().st_mode) & ~0o222)
        shiv_before = snapshot(shiv)
        home = base / "home"  # a home nobody can write to
        home.mkdir(mode=0o555)
        elsewhere = base / "elsewhere"  # outside the repository; the service's data
        (elsewhere / "data").mkdir(parents=True)
        secret = elsewhere / "secret"
        secret.write_text("distribution-test-secret-0123456789")
        for path in (elsewhere, elsewhere / "data", secret):
            os.chown(path, NOBODY, NOBODY)
        (elsewhere / "data").chmod(0o700)
        secret.chmod(0o600)

        octaskly = str(root / "opt/octaskly/bin/octaskly")
        setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        env = procs.clean_env(
            HOME=str(home),
            SHIV_ROOT=str(shiv),
            OCTASKLY_SECRET_KEY_FILE=str(secret),
            OCTASKLY_LOG_FORMAT="text",
        )
        port, api_port = free_port(), free_port()
        api = f"http://127.0.0.1:{api_port}"
        data = ["--data-dir", str(elsewhere / "data")]
        dispatcher = [
            *("dispatcher", "--bind", "127.0.0.1", "--port", str(port)),
            *("--api-port", str(api_port), *data),
        ]
        level = "strict" if shutil.which("bwrap") else "basic"
        worker = [
            *("worker", "--dispatcher-addr", f"127.0.0.1:{port}", "--name", "dist-w"),
            *("--sandbox-level", level, "--transport", "tcp"),
        ]
        # as the units run them: no new privileges, no capabilities; the dispatcher
        # without writable+executable memory
        unit_like = [*setpriv, "--no-new-privs", "--bounding-set=-all"]
        mdwe = [PYTHON, "-c", MDWE_EXEC] if _kernel_has_mdwe() else []
        commands = {
            "dispatcher": [*unit_like, *mdwe, octaskly, *dispatcher],
            "worker": [*unit_like, octaskly, *worker],
        }
        with procs.processes() as ps, (base / "cluster.log").open("wb") as log:
            for args in (dispatcher, worker):
                ps.append(
                    subprocess.Popen(
                        commands[args[0]],
                        cwd=elsewhere,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
                if args is dispatcher:
                    try:
                        wait_healthy(api, ps[0], data_dir=elsewhere / "data")
                    except AssertionError:
                        raise AssertionError((base / "cluster.log").read_text()) from None
            submit = subprocess.run(
                [
                    *(*setpriv, octaskly, "submit", "--wait", "--api-url", api, *data),
                    *("--", "echo", "hello from $(id -u)"),
                ],
                cwd=elsewhere,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            log_text = (base / "cluster.log").read_text()
            assert submit.returncode == 0, submit.stderr + log_text
            # under bubblewrap the task sees itself as the worker's uid mapped in its ns
            assert submit.stdout.startswith("hello from "), submit.stdout
            version = subprocess.run(
                [*setpriv, octaskly, "--version"],
                cwd=elsewhere,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert version.stdout.strip() == f"octaskly {VERSION}", version.stderr
        assert snapshot(shiv) == shiv_before
        assert list(home.iterdir()) == []
        assert (elsewhere / "data" / "octaskly.db").exists()


REAL_ROOT_SCRIPT = r"""
set -eu
mount --make-rprivate /
for d in etc opt var; do
    mkdir -p "$OVL/$d-up" "$OVL/$d-work"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$OVL/$d-up,workdir=$OVL/$d-work" "/$d"
done
cd /
PYTHON="$PY" "$INSTALL" --role dispatcher --pyz "$OLD" >/dev/null
echo "passwd: $(getent passwd octaskly)"
stat -c 'stat: %a %U:%G %n' /opt/octaskly/bin/octaskly.pyz /opt/octaskly/shiv /etc/octaskly \
    /etc/octaskly/secret /etc/octaskly/octaskly.toml /var/lib/octaskly /var/backups/octaskly
runuser -u octaskly -- env SHIV_ROOT=/opt/octaskly/shiv /opt/octaskly/bin/octaskly \
    config check /etc/octaskly/octaskly.toml
# the dispatcher's database, made by the service user
runuser -u octaskly -- "$PY" -c 'import sqlite3
db = sqlite3.connect("/var/lib/octaskly/octaskly.db")
db.executescript("CREATE TABLE tasks (id TEXT); PRAGMA user_version = 1; PRAGMA journal_mode = WAL")
db.close()'
PYTHON="$PY" "$INSTALL" --role dispatcher --pyz "$NEW" >/dev/null
stat -c 'backup: %a %U:%G %n' /var/backups/octaskly/pre-upgrade-*.db
find /var/lib/octaskly /var/backups/octaskly ! -user octaskly -printf 'not octaskly: %p\n'
"$INSTALL" --uninstall --purge >/dev/null
getent passwd octaskly || echo "user removed"
"""


def test_a_real_install_as_root_creates_the_user_and_sets_owners(
    release: Path, tmp_path: Path
) -> None:
    """install.sh without --root, as root: useradd, chown, the upgrade backup made as the
    service user (runuser), uninstall --purge. In a private mount namespace with overlays
    over /etc, /opt and /var, so this machine is not changed."""
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(release / "octaskly.pyz", old / "octaskly.pyz")
    with zipfile.ZipFile(old / "octaskly.pyz", "a") as zf:
        zf.comment = b"octaskly previous release"
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    env = procs.clean_env(
        OVL=str(overlays),
        PY=PYTHON,
        INSTALL=str(INSTALL),
        OLD=str(old / "octaskly.pyz"),
        NEW=str(release / "octaskly.pyz"),
    )
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", REAL_ROOT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(
        r"^passwd: octaskly:x:\d+:\d+:[^:]*:/nonexistent:/usr/sbin/nologin$", out, re.M
    )
    for line in (
        "stat: 755 root:root /opt/octaskly/bin/octaskly.pyz",
        "stat: 755 root:root /opt/octaskly/shiv",
        "stat: 750 root:octaskly /etc/octaskly",
        "stat: 600 octaskly:octaskly /etc/octaskly/secret",
        "stat: 640 root:octaskly /etc/octaskly/octaskly.toml",
        "stat: 700 octaskly:octaskly /var/lib/octaskly",
        "stat: 700 octaskly:octaskly /var/backups/octaskly",
        "/etc/octaskly/octaskly.toml: OK",
        "user removed",
    ):
        assert line in out.splitlines(), f"{line!r} not in:\n{out}"
    assert re.search(
        r"^backup: 600 octaskly:octaskly /var/backups/octaskly/pre-upgrade-", out, re.M
    )
    assert "not octaskly" not in out, out
    # nothing leaked out of the namespace
    assert subprocess.run(["id", "octaskly"], capture_output=True).returncode != 0
    assert not Path("/opt/octaskly").exists()
