"""Containment: how a worker makes sure a run ends with every process it started.

A run's shell gets its own session and process group, but a task can leave both
(``setsid``, a double fork, ``daemon()``). So ``none`` and ``basic`` runs are also put in
a control group of their own, which nothing inside can leave, and killed as a whole:

``cgroup-v2``
    A child of the worker's own cgroup in the unified hierarchy (root, or a subtree
    delegated to the worker's user: systemd's ``Delegate=yes``); killed with
    ``cgroup.kill`` (Linux 5.14), else frozen and killed process by process.
``cgroup-v1``
    A child of the worker's cgroup in the v1 ``freezer`` (else ``pids``) hierarchy, for a
    root worker on a machine without a usable unified hierarchy; frozen, killed, thawed
    until empty.
``pid-namespace``
    Where no cgroup can be had: the run starts under ``unshare --pid --fork --kill-child``
    (with a user namespace when the worker is not root), so every process of the run
    dies with the namespace's first process, or when the run is stopped.
``process-group``
    Nothing better works here (not Linux, no ``unshare``): only the process group is
    killed, and a process that left it can outlive its run. The worker says so at start.

``strict`` and ``very-strict`` runs always have a PID namespace of their own (bubblewrap's),
whose processes all die with it; they need no cgroup.

A process joins its run's cgroup before anything the task controls runs: the shell waits
on its standard input until the worker has moved it (see :mod:`octaskly.executing.running`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PROBE_SECONDS = 10.0
#: How long removing an emptied cgroup may wait for its killed processes to exit.
_EMPTY_SECONDS = 5.0
_KILL_ROUNDS = 100
_instances = itertools.count()


class Kind(enum.StrEnum):
    CGROUP_V2 = "cgroup-v2"
    CGROUP_V1 = "cgroup-v1"
    PID_NAMESPACE = "pid-namespace"
    PROCESS_GROUP = "process-group"


#: What ``containment = "auto"`` tries, in order.
PREFERENCE = (Kind.CGROUP_V2, Kind.CGROUP_V1, Kind.PID_NAMESPACE, Kind.PROCESS_GROUP)


class Unavailable(Exception):
    """The containment asked for cannot work on this machine."""


class Control(enum.Enum):
    """How a cgroup is stopped whole: what its hierarchy and kernel offer."""

    KILL = "cgroup.kill"  # v2, Linux 5.14+: one write
    FREEZE = "cgroup.freeze"  # older v2: frozen, killed process by process, thawed
    FREEZER = "freezer.state"  # v1 freezer
    SIGNALS = ""  # v1 pids: killed process by process until none is left


class RunGroup:
    """One run's cgroup: add its first process, signal or kill all of it, remove it."""

    def __init__(self, path: Path, control: Control) -> None:
        self.path = path
        self._control = control

    def add(self, pid: int) -> None:
        """Move ``pid`` (stopped at its gate, so it has no children yet) into the group."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every process of the group."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL every process of the group, also those forking meanwhile."""
        if self._control is Control.KILL:
            with contextlib.suppress(FileNotFoundError):
                (self.path / "cgroup.kill").write_text("1\n")
            return
        for _ in range(_KILL_ROUNDS):
            frozen = self._freeze(True)
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if frozen:
                self._freeze(False)
            if not pids:
                return
        log.warning("processes of %s kept forking through %d kill rounds", self.path, _KILL_ROUNDS)

    async def remove(self) -> None:
        """Remove the group once its processes are gone (the run killed them already;
        what is still there, or forked meanwhile, is killed again)."""
        deadline = time.monotonic() + _EMPTY_SECONDS
        delay = 0.001
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("could not remove %s: processes still in it", self.path)
                    return
            self.kill()
            await asyncio.sleep(delay)  # killed processes take a moment to exit
            delay = min(delay * 2, 0.1)

    def _freeze(self, frozen: bool) -> bool:
        if self._control is Control.FREEZE:
            value = "1" if frozen else "0"
        elif self._control is Control.FREEZER:
            value = "FROZEN" if frozen else "THAWED"
        else:
            return False
        try:
            (self.path / self._control.value).write_text(value + "\n")
        except OSError:
            return False
        return True


@dataclasses.dataclass
class Containment:
    """A worker's way of containing its ``none``/``basic`` runs (:func:`detect`)."""

    kind: Kind
    base: Path | None = None
    """Where the runs' cgroups are made (cgroup kinds)."""
    unshare: tuple[str, ...] = ()
    """The argv prefix that starts a run in its own PID namespace (pid-namespace)."""
    freezer: bool = False
    _names: itertools.count[int] = dataclasses.field(default_factory=itertools.count)

    @property
    def uses_cgroup(self) -> bool:
        return self.kind in (Kind.CGROUP_V2, Kind.CGROUP_V1)

    def describe(self) -> str:
        if self.kind is Kind.CGROUP_V2:
            return f"cgroup v2 ({self.base})"
        if self.kind is Kind.CGROUP_V1:
            return f"cgroup v1 ({self.base})"
        if self.kind is Kind.PID_NAMESPACE:
            return "a PID namespace per run (unshare)"
        return "the process group only: a process that calls setsid can outlive its task"

    @functools.cached_property
    def control(self) -> Control:
        """How this worker's run cgroups are stopped (looked up once)."""
        if self.kind is Kind.CGROUP_V1:
            return Control.FREEZER if self.freezer else Control.SIGNALS
        assert self.base is not None
        return Control.KILL if (self.base / "cgroup.kill").exists() else Control.FREEZE

    def new_group(self) -> RunGroup:
        """A new, empty cgroup for one run (cgroup kinds only); OSError if it cannot be made."""
        assert self.base is not None
        path = self.base / f"run-{next(self._names)}"
        os.mkdir(path)
        return RunGroup(path, self.control)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as this containment starts it."""
        if self.kind is Kind.PID_NAMESPACE:
            return [*self.unshare, "--", *argv]
        return list(argv)

    def close(self) -> None:
        """Remove the worker's cgroup directory (its runs are gone by now)."""
        if self.base is None:
            return
        for child in _children(self.base):
            RunGroup(child, self.control).kill()
            with contextlib.suppress(OSError):
                os.rmdir(child)
        with contextlib.suppress(OSError):
            os.rmdir(self.base)


def detect(choice: str = "auto", *, task_user: tuple[int, int] | None = None) -> Containment:
    """The best containment this machine gives (``choice="auto"``), or the one named.

    Each candidate is tried for real: a cgroup is made, a process moved into it and killed;
    ``unshare`` runs once. Raises :class:`Unavailable` when a named one does not work.
    ``task_user`` is who the runs start as (the PID namespace needs a user namespace then).
    """
    kinds = PREFERENCE if choice == "auto" else (Kind(choice),)
    problems = []
    for kind in kinds:
        try:
            found = _try(kind, task_user)
        except Unavailable as exc:
            problems.append(f"{kind.value}: {exc}")
            continue
        if problems:
            log.debug("containment: %s", "; ".join(problems))
        return found
    raise Unavailable("; ".join(problems))


def _try(kind: Kind, task_user: tuple[int, int] | None) -> Containment:
    if kind is Kind.PROCESS_GROUP:
        return Containment(kind)
    if not sys.platform.startswith("linux"):
        raise Unavailable(f"needs Linux; this is {sys.platform}")
    if kind is Kind.PID_NAMESPACE:
        return Containment(kind, unshare=_probe_unshare(task_user))
    if kind is Kind.CGROUP_V2:
        (mount, own), freezer = _v2_location(), False
    else:
        mount, own, freezer = _v1_location()
    # (several workers may live in one process: tests, `octaskly dev`)
    base = mount / own.lstrip("/") / f"octaskly-worker.{os.getpid()}.{next(_instances)}"
    _remove_stale(base.parent, kind, freezer)
    try:
        os.mkdir(base)
    except FileExistsError:
        pass
    except OSError as exc:
        raise Unavailable(f"cannot make {base}: {exc.strerror}") from None
    found = Containment(kind, base=base, freezer=freezer)
    try:
        _probe_group(found)
    except Unavailable:
        found.close()
        raise
    return found


def _probe_group(found: Containment) -> None:
    """Move a real process into a new group and kill it there."""
    try:
        group = found.new_group()
    except OSError as exc:
        raise Unavailable(f"cannot make a cgroup under {found.base}: {exc.strerror}") from None
    proc = subprocess.Popen(["/bin/sh", "-c", "read _"], stdin=subprocess.PIPE)
    try:
        try:
            group.add(proc.pid)
        except OSError as exc:
            raise Unavailable(f"cannot move a process into {group.path}: {exc.strerror}") from None
        if proc.pid not in group.pids():
            raise Unavailable(f"a process moved into {group.path} is not listed there")
        group.kill()
        try:
            proc.wait(_PROBE_SECONDS)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"killing {group.path} did not stop its process") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
    deadline = time.monotonic() + _EMPTY_SECONDS
    while True:
        try:
            os.rmdir(group.path)
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise Unavailable(f"cannot remove {group.path}: {exc.strerror}") from None
        time.sleep(0.01)  # (start-up only: the killed probe is being reaped)


def _v2_location() -> tuple[Path, str]:
    mount = _mount_point("cgroup2", None)
    if mount is None:
        raise Unavailable("no cgroup2 file system is mounted")
    for line in _read("/proc/self/cgroup").splitlines():
        if line.startswith("0::"):
            return mount, line[3:]
    raise Unavailable("this process is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")


def _v1_location() -> tuple[Path, str, bool]:
    for controller in ("freezer", "pids"):
        mount = _mount_point("cgroup", controller)
        if mount is None:
            continue
        for line in _read("/proc/self/cgroup").splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return mount, path, controller == "freezer"
    raise Unavailable("no cgroup v1 freezer or pids hierarchy is mounted")


def _mount_point(fstype: str, option: str | None) -> Path | None:
    """The first mount of ``fstype`` (whose super options include ``option``), if any."""
    for line in _read("/proc/self/mountinfo").splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] != fstype:
            continue
        if option is not None and option not in tail[2].split(","):
            continue
        return Path(fields[4].replace("\\040", " "))
    return None


def _remove_stale(parent: Path, kind: Kind, freezer: bool) -> None:
    """Kill and remove the cgroups of earlier workers here that died without cleaning up."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            prefix, _, rest = entry.name.partition(".")
            pid = rest.partition(".")[0]
            if prefix != "octaskly-worker" or not pid.isdigit() or not entry.is_dir():
                continue
            if int(pid) == os.getpid() or Path(f"/proc/{pid}").exists():
                continue
            log.info("removing %s, left by a worker that is gone", entry.path)
            Containment(kind, base=Path(entry.path), freezer=freezer).close()


def _children(path: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    return []


def _probe_unshare(task_user: tuple[int, int] | None) -> tuple[str, ...]:
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if unshare is None:
        raise Unavailable("util-linux unshare is not installed")
    argv: list[str] = [unshare]
    # A root worker starts unshare as root (it switches to task_user with setpriv inside);
    # otherwise unshare runs as the task's user and needs a user namespace for the rest.
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    switching = task_user is not None and task_user[0] != 0
    as_root = os.geteuid() == 0 and (not switching or setpriv is not None)
    if not as_root:
        argv += ["--user", "--map-current-user"]
    argv += ["--pid", "--fork", "--kill-child", "--mount-proc"]
    switch: dict[str, Any] = {}
    if os.geteuid() == 0 and not as_root and task_user is not None:
        switch = {"user": task_user[0], "group": task_user[1], "extra_groups": []}
    try:
        done = subprocess.run(
            [*argv, "--", "/bin/sh", "-c", "exit 0"],
            capture_output=True,
            timeout=_PROBE_SECONDS,
            check=False,
            cwd="/",
            **switch,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(f"unshare could not start: {exc}") from None
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        raise Unavailable(f"unshare does not work here: {detail}")
    return tuple(argv)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
