"""Sandbox levels: the environment a task gets and, from ``strict`` on, its bubblewrap jail.

The level of a run is the stricter of the task's and the worker's (:func:`effective_level`):
a task may ask for more isolation than the worker's minimum, never for less.

``none``
    The worker's environment minus every ``OCTASKLY_*`` variable; own session, process
    group and workdir; rlimits.
``basic``
    As ``none``, but the environment is an allow-list: ``HOME``, ``LANG``, ``LANGUAGE``,
    ``LC_*``, ``TZ``, ``TERM``, ``USER``, ``LOGNAME``, and ``PATH`` set to the standard
    system directories (:data:`SAFE_PATH`). Tokens, keys and passwords in the worker's
    environment never reach the task. Not a security boundary: the task runs as the
    worker's user.
``strict``
    ``bwrap`` (Linux, Debian package ``bubblewrap``): a user, PID, IPC, UTS and cgroup
    namespace; the system read-only (``--ro-bind / /``); a private ``/tmp`` (tmpfs) and
    the workdir (bound at its own path) are the only writable places; ``/home``, ``/root``,
    ``/run/user``, ``/etc/octaskly``, the worker's home and data directory and the workdir
    root are hidden behind empty read-only mounts (so other tasks' workdirs are out of
    sight); ``HOME`` is an empty read-only directory; the environment is ``PATH``,
    ``HOME``, ``LANG``, ``LANGUAGE``, ``LC_*``, ``TZ``, ``TERM``; no view of the worker's
    (or any other) processes; no new user namespaces inside; ``--die-with-parent``. A
    worker running as root starts ``bwrap`` as uid/gid 65534 with no supplementary groups
    (:data:`SANDBOX_UID`), so the process limit applies; the rlimits are set inside the
    sandbox, where the kernel counts processes per user namespace, i.e. per task.
``very-strict``
    As ``strict``, plus its own network namespace (loopback only: no network), an empty
    environment (only the task's ``env`` and ``OCTASKLY_TASK_ID``/``ATTEMPT``/``WORKDIR``)
    and no writable place but the workdir (``/tmp`` and ``/dev`` read-only).

A killed sandbox leaves nothing behind: ``bwrap`` stays in the run's process group, and its
PID namespace dies with its init. :func:`task_env` and :func:`bwrap_argv` are pure;
:func:`prepare` adds what depends on the machine, :func:`unavailable` checks it can work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from octaskly.domain import models
from octaskly.executing import workdirs

Level = models.SandboxLevel

#: Environment variables with this prefix (any case) are the worker's own and never
#: reach a task: OCTASKLY_SECRET_KEY lives there.
PRIVATE_ENV_PREFIX = "OCTASKLY_"
#: PATH from ``basic`` on: the standard system directories only.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Who a root worker's sandboxed tasks run as (``nobody``/``nogroup`` on Debian).
SANDBOX_UID = 65534
SANDBOX_GID = 65534
#: Directories a ``strict`` task never sees: the homes, users' runtime directories (agent
#: sockets), the system configuration of octaskly (it may hold the cluster key).
ALWAYS_HIDDEN = (Path("/home"), Path("/root"), Path("/run/user"), Path("/etc/octaskly"))

_BASIC_KEEP = frozenset({"HOME", "LANG", "LANGUAGE", "TZ", "TERM", "USER", "LOGNAME"})
_STRICT_KEEP = frozenset({"LANG", "LANGUAGE", "TZ", "TERM"})
_LOCALE_VAR = re.compile(r"^LC_[A-Z]+$")
# Never hidden behind a tmpfs, whatever the configuration says: the sandbox needs them.
_SYSTEM_DIRS = frozenset(
    Path(p) for p in ("/", "/bin", "/sbin", "/lib", "/lib64", "/usr", "/etc", "/var", "/dev")
)
_PROBE_SECONDS = 10.0


class Unavailable(Exception):
    """This machine cannot give the sandbox level asked for (the run must not happen)."""


def is_sandboxed(level: Level) -> bool:
    """Whether ``level`` runs the task inside bubblewrap."""
    return level.rank >= Level.STRICT.rank


def effective_level(task_level: Level | None, worker_level: Level) -> Level:
    """The stricter of the task's level (if it asked for one) and the worker's minimum."""
    if task_level is None or task_level.rank < worker_level.rank:
        return worker_level
    return task_level


def task_env(
    level: Level,
    base_env: Mapping[str, str],
    env: Mapping[str, str],
    *,
    task_id: str,
    attempt: int,
    workdir: Path,
    home: Path | None = None,
) -> dict[str, str]:
    """The environment of a run at ``level``.

    ``base_env`` is the worker's environment, ``env`` the task's own (applied on top);
    ``home`` is ``HOME`` inside a ``strict`` sandbox.
    """
    result: dict[str, str]
    if level is Level.NONE:
        result = {k: v for k, v in base_env.items() if not k.upper().startswith(PRIVATE_ENV_PREFIX)}
    elif level is Level.BASIC:
        result = {k: v for k, v in base_env.items() if k in _BASIC_KEEP or _LOCALE_VAR.match(k)}
        result["PATH"] = SAFE_PATH
    elif level is Level.STRICT:
        result = {k: v for k, v in base_env.items() if k in _STRICT_KEEP or _LOCALE_VAR.match(k)}
        result["PATH"] = SAFE_PATH
        if home is not None:
            result["HOME"] = str(home)
    else:
        result = {}
    result.update(env)
    result["OCTASKLY_TASK_ID"] = task_id
    result["OCTASKLY_ATTEMPT"] = str(attempt)
    result["OCTASKLY_WORKDIR"] = str(workdir)
    return result


@dataclasses.dataclass(frozen=True)
class Mounts:
    """What a sandbox hides and where its workdir is; paths are absolute and exist."""

    workdir: Path
    hidden_dirs: tuple[Path, ...] = ()
    hidden_files: tuple[Path, ...] = ()
    home: Path | None = None
    tmp_size: int | None = None
    """Bytes the private /tmp may hold (``strict``); None: the tmpfs default."""


def bwrap_argv(
    level: Level,
    *,
    bwrap: str,
    mounts: Mounts,
    command: Sequence[str],
    disable_userns: bool = True,
) -> list[str]:
    """The bubblewrap command line that runs ``command`` at ``level`` (strict or stricter).

    Mount order matters to bwrap: the read-only root, /dev, /proc, the tmpfs masks, the
    workdir bound at its own path on top of them, then the masks made read-only.
    """
    if not is_sandboxed(level):
        raise ValueError(f"sandbox level {level.value} does not use bubblewrap")
    very_strict = level is Level.VERY_STRICT
    argv = [
        bwrap,
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    if very_strict:
        argv.append("--unshare-net")
    if disable_userns:
        argv.append("--disable-userns")
    argv += ["--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    if mounts.tmp_size is not None and not very_strict:
        argv += ["--size", str(mounts.tmp_size)]
    argv += ["--tmpfs", "/tmp"]
    hidden = _outermost(d for d in mounts.hidden_dirs if not _under(d, Path("/tmp")))
    for path in hidden:
        argv += ["--tmpfs", str(path)]
    for path in mounts.hidden_files:
        if not any(_under(path, d) for d in (Path("/tmp"), *hidden)):
            argv += ["--ro-bind", "/dev/null", str(path)]
    home = mounts.home
    if home is not None and not very_strict and home not in hidden:
        if any(_under(home, d) for d in hidden):
            argv += ["--dir", str(home)]  # an empty directory in the (read-only) mask
    argv += ["--bind", str(mounts.workdir), str(mounts.workdir)]
    for path in hidden:
        argv += ["--remount-ro", str(path)]
    if very_strict:
        argv += ["--remount-ro", "/tmp", "--remount-ro", "/dev"]
    argv += ["--chdir", str(mounts.workdir), "--", *command]
    return argv


# -- what depends on the machine -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launch:
    """How to start one run: its argv and environment, and the uid/gid to switch to first."""

    argv: list[str]
    env: dict[str, str]
    user: int | None = None
    group: int | None = None


def prepare(
    level: Level,
    *,
    command: Sequence[str],
    base_env: Mapping[str, str],
    env: Mapping[str, str],
    task_id: str,
    attempt: int,
    workdir: Path,
    workdir_root: Path,
    hidden: Sequence[Path] = (),
    tmp_size: int | None = None,
) -> Launch:
    """The launch of ``command`` (the rlimit wrapper and shell) at ``level`` in ``workdir``.

    From ``strict`` on, a root worker hands the workdir to :data:`SANDBOX_UID`. Raises
    :class:`Unavailable` when the machine cannot give the level.
    """
    if not is_sandboxed(level):
        run_env = task_env(level, base_env, env, task_id=task_id, attempt=attempt, workdir=workdir)
        return Launch(argv=list(command), env=run_env)
    problem = _missing_tool()
    if problem is not None:
        raise Unavailable(problem)
    bwrap = find_bwrap()
    assert bwrap is not None  # _missing_tool checked it
    uid, gid = sandbox_ids()
    problem = _unreachable(workdir, uid, gid)
    if problem is not None:
        raise Unavailable(problem)
    home = _home(base_env)
    mounts = Mounts(
        workdir=workdir,
        hidden_dirs=tuple(_hideable_dirs(workdir_root, home, hidden, uid, gid)),
        hidden_files=tuple(
            p for p in map(_absolute, hidden) if p.is_file() and _reachable(p.parent, uid, gid)
        ),
        home=home,
        tmp_size=tmp_size,
    )
    argv = bwrap_argv(
        level, bwrap=bwrap, mounts=mounts, command=command, disable_userns=_has_disable_userns()
    )
    run_env = task_env(
        level, base_env, env, task_id=task_id, attempt=attempt, workdir=workdir, home=home
    )
    if os.geteuid() != 0:
        return Launch(argv=argv, env=run_env)
    os.chown(workdir, uid, gid)
    return Launch(argv=argv, env=run_env, user=uid, group=gid)


def sandbox_ids() -> tuple[int, int]:
    """The uid and gid sandboxed tasks run as: 65534 for a root worker, else the worker's."""
    if os.geteuid() == 0:
        return SANDBOX_UID, SANDBOX_GID
    return os.geteuid(), os.getegid()


_working: set[tuple[Level, Path, str]] = set()


def unavailable(level: Level, workdir_root: Path) -> str | None:
    """Why this machine cannot run tasks at ``level`` with workdirs under ``workdir_root``.

    None when it can. From ``strict`` on it checks Linux, ``bwrap`` and ``prlimit``, that the
    sandbox user can reach the workdirs, and runs ``bwrap`` once (the result is kept when it
    worked): a kernel without unprivileged user namespaces fails there, not in a task.
    """
    if not is_sandboxed(level):
        return None
    problem = _missing_tool()
    if problem is not None:
        return problem
    bwrap = find_bwrap()
    assert bwrap is not None
    root = _absolute(workdir_root)
    if (level, root, bwrap) in _working:
        return None
    try:
        probe_dir = workdirs.make_dir(root, "octaskly-probe-")
    except OSError as exc:
        return f"cannot make a workdir under {root}: {exc}"
    try:
        prlimit = find_tool("prlimit")
        assert prlimit is not None
        launch = prepare(
            level,
            command=[prlimit, "--nofile=64:64", "--", "/bin/sh", "-c", "exit 0"],
            base_env=os.environ,
            env={},
            task_id="probe",
            attempt=1,
            workdir=probe_dir,
            workdir_root=root,
        )
        done = subprocess.run(
            launch.argv,
            env=launch.env,
            cwd=probe_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_PROBE_SECONDS,
            check=False,
            user=launch.user,
            group=launch.group,
            extra_groups=[] if launch.user is not None else None,
        )
    except Unavailable as exc:
        return str(exc)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bubblewrap could not start: {exc}"
    finally:
        workdirs.remove_tree(probe_dir)
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        return f"bubblewrap does not work on this machine: {detail}"
    _working.add((level, root, bwrap))
    return None


@functools.cache
def find_tool(name: str) -> str | None:
    """A system tool by name: in the system's directories first, else on PATH."""
    return shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin") or shutil.which(name)


def find_bwrap() -> str | None:
    """The bubblewrap executable, if installed."""
    return find_tool("bwrap")


def _missing_tool() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"sandboxing needs Linux with bubblewrap; this is {sys.platform}"
    if find_bwrap() is None:
        return "bubblewrap (bwrap) is not installed (Debian: apt-get install bubblewrap)"
    if find_tool("prlimit") is None:
        return "util-linux prlimit is not installed"
    return None


@functools.cache
def _has_disable_userns() -> bool:
    """bwrap >= 0.8 can forbid new user namespaces inside the sandbox."""
    bwrap = find_bwrap()
    if bwrap is None:
        return False
    try:
        done = subprocess.run(
            [bwrap, "--help"], capture_output=True, timeout=_PROBE_SECONDS, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return b"--disable-userns" in done.stdout + done.stderr


def _home(base_env: Mapping[str, str]) -> Path | None:
    raw = base_env.get("HOME")
    if not raw:
        with contextlib.suppress(RuntimeError, KeyError):
            raw = str(Path.home())
    if not raw or not os.path.isabs(raw):
        return None
    home = _absolute(Path(raw))
    return None if home in _SYSTEM_DIRS else home


def _hideable_dirs(
    workdir_root: Path, home: Path | None, extra: Iterable[Path], uid: int, gid: int
) -> list[Path]:
    candidates = [*ALWAYS_HIDDEN, _absolute(workdir_root), *map(_absolute, extra)]
    if home is not None:
        candidates.append(home)
    found: list[Path] = []
    for path in candidates:
        if path in _SYSTEM_DIRS or path in found or _under(path, Path("/tmp")):
            continue
        # bwrap cannot mount where the sandbox user cannot reach, and there it cannot read
        # anything either: nothing to hide then.
        if path.is_dir() and not path.is_symlink() and _reachable(path.parent, uid, gid):
            found.append(path)
    return found


def _unreachable(workdir: Path, uid: int, gid: int) -> str | None:
    if _reachable(workdir.parent, uid, gid):
        return None
    return (
        f"the sandbox user (uid {uid}) cannot reach the task workdirs under {workdir.parent}: "
        "every directory above them must be searchable (chmod o+x), or set work_dir elsewhere"
    )


def _reachable(path: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` (no other groups) may search every directory down to ``path``."""
    if uid == os.geteuid() and uid != 0:
        return os.access(path, os.X_OK)
    current = Path("/")
    for name in path.parts[1:]:
        if not _searchable(current, uid, gid):
            return False
        current = current / name
    return _searchable(current, uid, gid)


def _searchable(directory: Path, uid: int, gid: int) -> bool:
    try:
        st = os.stat(directory)
    except OSError:
        return False
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """The paths that are not inside another one of them, in order."""
    ordered = sorted(dict.fromkeys(paths), key=lambda p: len(p.parts))  # (stable)
    kept: list[Path] = []
    for path in ordered:
        if not any(_under(path, k) for k in kept):
            kept.append(path)
    return kept


def _under(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))
