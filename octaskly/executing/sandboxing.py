"""Sandbox levels: the environment a task gets and, from ``strict`` on, its bubblewrap jail.

The level of a run is the stricter of the task's and the worker's (:func:`effective_level`):
a task may ask for more isolation than the worker's minimum, never for less.

``none``
    The worker's environment minus every ``OCTASKLY_*`` variable; own session, process
    group, cgroup (see :mod:`~octaskly.executing.containment`) and workdir; rlimits. On a
    root worker the task runs as ``task_user`` (default ``nobody``, :data:`SANDBOX_UID`).
``basic``
    As ``none``, but the environment is an allow-list: ``HOME``, ``LANG``, ``LANGUAGE``,
    ``LC_*``, ``TZ``, ``TERM``, ``USER``, ``LOGNAME``, and ``PATH`` set to the standard
    system directories (:data:`SAFE_PATH`). Tokens, keys and passwords in the worker's
    environment never reach the task. Not a boundary against the task: it runs as the
    worker's user (or ``task_user``) and sees what that user may read.
``strict``
    ``bwrap`` (Linux, Debian package ``bubblewrap``): a user, PID, IPC, UTS and cgroup
    namespace and an **allow-list** of what the task sees: the system directories needed
    to run programs, read-only (:data:`SYSTEM_PATHS`, ``/etc`` without ``/etc/octaskly``,
    and what the operator lists in ``sandbox_read_only_paths``), a fresh ``/dev`` and
    ``/proc``, a private ``/tmp`` (tmpfs) and its own workdir (bound at its own path),
    nothing else: no homes, no data directories, no other workdirs, no ``/srv``, ``/opt``,
    ``/var``, whoever the worker runs as. ``HOME`` is an empty read-only directory; the
    environment is ``PATH``, ``HOME``, ``LANG``, ``LANGUAGE``, ``LC_*``, ``TZ``, ``TERM``; no
    view of the worker's (or any other) processes; no new user namespaces inside;
    ``--die-with-parent``. A worker running as root starts ``bwrap`` as uid/gid 65534 with
    no supplementary groups (:data:`SANDBOX_UID`), so the process limit applies; the
    rlimits are set inside the sandbox, where the kernel counts processes per user
    namespace, i.e. per task.
``very-strict``
    As ``strict``, plus its own network namespace (loopback only: no network), an empty
    environment (only the task's ``env`` and ``OCTASKLY_TASK_ID``/``ATTEMPT``/``WORKDIR``)
    and no writable place but the workdir (``/tmp`` and ``/dev`` read-only).

The task's own ``env`` never reaches a process outside the task: ``bwrap``, ``unshare``,
``prlimit`` and the shell that applies the limits all start with a fixed environment
(:func:`launcher_env`); the task's variables are read by the task's shell from its
standard input (:func:`env_script`) right before the command, so a loader or interpreter
hook (``LD_PRELOAD``, ``GCONV_PATH``, ``BASH_ENV``...) only ever runs in the task's own
processes, inside its sandbox and limits.

A killed sandbox leaves nothing behind: ``bwrap`` stays in the run's process group, and its
PID namespace dies with its init. :func:`task_env`, :func:`launcher_env`,
:func:`env_script` and :func:`bwrap_argv` are pure; :func:`prepare` adds what depends on
the machine, :func:`unavailable` checks it can work.
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
#: Directories a ``strict`` task never sees, even where a directory it sees holds them:
#: the system configuration of octaskly (it may hold the cluster key), the homes.
ALWAYS_HIDDEN = (Path("/etc/octaskly"), Path("/home"), Path("/root"), Path("/run/user"))
#: What a ``strict`` task sees of the system, read-only (those that exist; symlinks, as on
#: merged-/usr systems, are recreated as symlinks), with ``/etc``.
SYSTEM_PATHS = (
    Path("/usr"),
    Path("/bin"),
    Path("/sbin"),
    Path("/lib"),
    Path("/lib32"),
    Path("/lib64"),
    Path("/libx32"),
    Path("/etc"),
)
#: The name of the variable the task's shell checks after reading its environment: the
#: worker writes it last, once the run is contained (a run never starts half-set-up).
READY_VAR = "OCTASKLY_READY"

_BASIC_KEEP = frozenset({"HOME", "LANG", "LANGUAGE", "TZ", "TERM", "USER", "LOGNAME"})
_STRICT_KEEP = frozenset({"LANG", "LANGUAGE", "TZ", "TERM"})
_LOCALE_VAR = re.compile(r"^LC_[A-Z]+$")
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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
    """The environment a task's command sees at ``level``.

    ``base_env`` is the worker's environment, ``env`` the task's own (applied on top of
    :func:`launcher_env`; the run's own ``OCTASKLY_*`` ids win); ``home`` is ``HOME``
    inside a ``strict`` sandbox.
    """
    result = launcher_env(
        level, base_env, task_id=task_id, attempt=attempt, workdir=workdir, home=home
    )
    result.update({k: v for k, v in env.items() if k not in _RUN_IDS})
    return result


_RUN_IDS = frozenset({"OCTASKLY_TASK_ID", "OCTASKLY_ATTEMPT", "OCTASKLY_WORKDIR"})


def launcher_env(
    level: Level,
    base_env: Mapping[str, str],
    *,
    task_id: str,
    attempt: int,
    workdir: Path,
    home: Path | None = None,
) -> dict[str, str]:
    """The fixed environment the processes that start a run (``bwrap``, ``unshare``,
    ``prlimit``, the shell that applies the limits) get at ``level``: nothing of the task's
    own ``env``, which the task's shell reads itself (:func:`env_script`).
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
    result["OCTASKLY_TASK_ID"] = task_id
    result["OCTASKLY_ATTEMPT"] = str(attempt)
    result["OCTASKLY_WORKDIR"] = str(workdir)
    return result


def env_script(env: Mapping[str, str]) -> bytes:
    """Shell code exporting ``env`` (the task's own variables), then setting
    :data:`READY_VAR`: what the task's shell reads from its standard input.

    The run's own ``OCTASKLY_*`` ids are not overridden. Raises ValueError for a name that
    is not a shell identifier or a value holding NUL (the API refuses both already; this
    is shell code, so it checks again).
    """
    for name, value in env.items():
        if not _SHELL_NAME.fullmatch(name):
            raise ValueError(f"environment variable name {name!r} is not valid")
        if "\0" in value:
            raise ValueError(f"environment variable {name!r} contains a NUL byte")
    lines = [
        f"export {name}={_quote(value)}\n" for name, value in env.items() if name not in _RUN_IDS
    ]
    lines.append(f"{READY_VAR}=1\n")
    return "".join(lines).encode()  # (the API refuses lone surrogates)


def shell_prologue() -> str:
    """The start of the task's shell script: read the environment from standard input
    (:func:`env_script`), refuse to go on unless it was complete, then give the command
    /dev/null as its input. One line: the command's own line numbers stay as they were.
    """
    return (
        f'. /dev/stdin && [ "${{{READY_VAR}-}}" = 1 ] || exit 126; '
        f"unset {READY_VAR}; exec </dev/null; "
    )


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


@dataclasses.dataclass(frozen=True)
class Mounts:
    """What a sandbox sees; paths are absolute and exist.

    ``exposed`` are the read-only directories and files (system ones and the operator's);
    ``symlinks`` are ``(target, path)`` pairs recreated as they are on the host (``/bin``
    -> ``usr/bin``); ``hidden_dirs`` and ``hidden_files`` lie inside exposed directories
    and are covered (an empty read-only directory, /dev/null).
    """

    workdir: Path
    exposed: tuple[Path, ...] = ()
    symlinks: tuple[tuple[str, Path], ...] = ()
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

    The root is bubblewrap's empty tmpfs: on it only what is listed appears, then it is
    made read-only. Mount order matters to bwrap: the exposed paths, /dev, /proc, /tmp, the
    masks inside exposed directories, the workdir bound at its own path, then the masks and
    the root made read-only.
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
    argv.append("--die-with-parent")
    for target, path in mounts.symlinks:
        argv += ["--symlink", target, str(path)]
    exposed = _outermost(mounts.exposed)
    in_tmp = [p for p in exposed if _under(p, Path("/tmp"))]
    for path in exposed:
        if path not in in_tmp:
            argv += ["--ro-bind", str(path), str(path)]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    if mounts.tmp_size is not None and not very_strict:
        argv += ["--size", str(mounts.tmp_size)]
    argv += ["--tmpfs", "/tmp"]
    for path in in_tmp:  # (on the private /tmp, not under it)
        argv += ["--ro-bind", str(path), str(path)]
    hidden = _outermost(d for d in mounts.hidden_dirs if not _under(d, Path("/tmp")))
    argv += _masks(mounts, hidden, very_strict=very_strict)
    argv += ["--bind", str(mounts.workdir), str(mounts.workdir)]
    for path in hidden:
        argv += ["--remount-ro", str(path)]
    argv += ["--remount-ro", "/"]
    if very_strict:
        argv += ["--remount-ro", "/tmp", "--remount-ro", "/dev"]
    argv += ["--chdir", str(mounts.workdir), "--", *command]
    return argv


def _masks(mounts: Mounts, hidden: Sequence[Path], *, very_strict: bool) -> list[str]:
    """Cover what must not be seen inside what is exposed; make the empty ``HOME``."""
    argv: list[str] = []
    for path in hidden:
        argv += ["--tmpfs", str(path)]
    for path in mounts.hidden_files:
        if not any(_under(path, d) for d in (Path("/tmp"), *hidden)):
            argv += ["--ro-bind", "/dev/null", str(path)]
    home = mounts.home
    if home is not None and not very_strict and not _under(home, Path("/tmp")):
        if home not in hidden and not any(_under(home, e) for e in mounts.exposed):
            argv += ["--dir", str(home)]  # empty, and read-only with the root
    return argv


# -- what depends on the machine -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launch:
    """How to start one run: its argv and fixed environment, and the task's own
    environment as the shell code its shell reads on stdin.

    ``owner`` is who the task runs as when that is not the worker (its stdin pipe is
    handed to it); ``argv`` starts with ``setpriv`` then, which switches user before it
    execs the rest. Without ``setpriv``, ``user``/``group`` ask the spawner to switch
    (Python then forks instead of vforking: slower).
    """

    argv: list[str]
    env: dict[str, str]
    stdin: bytes
    user: int | None = None
    group: int | None = None
    owner: tuple[int, int] | None = None


def as_user(argv: list[str], env: dict[str, str], stdin: bytes, uid: int, gid: int) -> Launch:
    """A launch of `argv` as uid/gid, without supplementary groups."""
    setpriv = find_tool("setpriv")
    if setpriv is None:
        return Launch(argv, env, stdin, user=uid, group=gid, owner=(uid, gid))
    switch = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    return Launch([*switch, *argv], env, stdin, owner=(uid, gid))


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
    exposed: Sequence[Path] = (),
    tmp_size: int | None = None,
    task_user: tuple[int, int] | None = None,
) -> Launch:
    """The launch of ``command`` (the rlimit wrapper and shell) at ``level`` in ``workdir``.

    ``exposed`` are more read-only paths a sandboxed task sees (``sandbox_read_only_paths``);
    ``hidden`` paths inside what it sees are covered. ``task_user`` is who a root worker runs
    ``none``/``basic`` tasks as (None: as itself; a worker gives :data:`SANDBOX_UID` unless
    its ``task_user`` says otherwise). A root worker hands the workdir to the user the task
    runs as. Raises :class:`Unavailable` when the machine cannot give
    the level.
    """
    stdin = env_script(env)
    if not is_sandboxed(level):
        run_env = launcher_env(level, base_env, task_id=task_id, attempt=attempt, workdir=workdir)
        if task_user is None or os.geteuid() != 0 or task_user[0] == 0:
            return Launch(argv=list(command), env=run_env, stdin=stdin)
        uid, gid = task_user
        os.chown(workdir, uid, gid)
        return as_user(list(command), run_env, stdin, uid, gid)
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
    mounts = _mounts(level, workdir, workdir_root, home, hidden, exposed, uid, gid, tmp_size)
    argv = bwrap_argv(
        level, bwrap=bwrap, mounts=mounts, command=command, disable_userns=_has_disable_userns()
    )
    run_env = launcher_env(
        level, base_env, task_id=task_id, attempt=attempt, workdir=workdir, home=home
    )
    if os.geteuid() != 0:
        return Launch(argv=argv, env=run_env, stdin=stdin)
    os.chown(workdir, uid, gid)
    return as_user(argv, run_env, stdin, uid, gid)


def _mounts(
    level: Level,
    workdir: Path,
    workdir_root: Path,
    home: Path | None,
    hidden: Sequence[Path],
    exposed: Sequence[Path],
    uid: int,
    gid: int,
    tmp_size: int | None,
) -> Mounts:
    system, symlinks = system_mounts()
    seen = (*system, *(_absolute(p) for p in exposed if os.path.lexists(p)))
    if level is not Level.VERY_STRICT:
        seen += _resolver(seen)
    extra_hidden = [_absolute(workdir_root), *map(_absolute, hidden)]
    if home is not None:
        extra_hidden.append(home)
    candidates = [*ALWAYS_HIDDEN, *extra_hidden]
    inside = [p for p in candidates if any(_under(p, e) for e in seen)]
    return Mounts(
        workdir=workdir,
        exposed=seen,
        symlinks=symlinks,
        hidden_dirs=tuple(_hideable_dirs(inside, uid, gid)),
        hidden_files=tuple(p for p in inside if p.is_file() and _reachable(p.parent, uid, gid)),
        home=home,
        tmp_size=tmp_size,
    )


@functools.cache
def system_mounts() -> tuple[tuple[Path, ...], tuple[tuple[str, Path], ...]]:
    """The :data:`SYSTEM_PATHS` of this machine: directories to bind, symlinks to recreate."""
    dirs: list[Path] = []
    links: list[tuple[str, Path]] = []
    for path in SYSTEM_PATHS:
        if path.is_symlink():
            links.append((os.readlink(path), path))
        elif path.is_dir():
            dirs.append(path)
    return tuple(dirs), tuple(links)


def _resolver(seen: Sequence[Path]) -> tuple[Path, ...]:
    """/etc/resolv.conf's target where it lies outside what the sandbox sees
    (systemd-resolved's /run/systemd/resolve/stub-resolv.conf), so names still resolve."""
    link = Path("/etc/resolv.conf")
    if not link.is_symlink():
        return ()
    target = Path(os.path.realpath(link))
    if not target.is_file() or any(_under(target, e) for e in seen):
        return ()
    return (target,)


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
            input=b"",
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


def _hideable_dirs(candidates: Iterable[Path], uid: int, gid: int) -> list[Path]:
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
