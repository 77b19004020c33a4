"""Running one task's shell command: the Execution, its request and its result."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from octaskly.domain import models, output
from octaskly.executing import containment, sandboxing, tails, workdirs
from octaskly.executing.workdirs import Workdirs

log = logging.getLogger(__name__)

SHELL = "/bin/sh"
#: Seconds between SIGTERM and SIGKILL when a run times out or is cancelled.
KILL_GRACE_SECONDS = 2.0
#: Seconds to keep reading output after the shell exited and its group was killed.
DRAIN_SECONDS = 0.5
#: Environment variables with this prefix (any case) are the worker's own and never
#: reach a task: OCTASKLY_SECRET_KEY lives there.
PRIVATE_ENV_PREFIX = sandboxing.PRIVATE_ENV_PREFIX

Status = Literal["completed", "failed", "timed_out", "cancelled"]
OutputCallback = Callable[[str, bytes], None]
"""``(stream, chunk)`` with stream ``"stdout"`` or ``"stderr"``; called on the event loop
for every chunk read, so it must be quick (append to a queue, nothing more)."""

_STREAMS = {1: "stdout", 2: "stderr"}
_RLIMIT_OPTIONS: dict[int, str] = {
    getattr(resource, "RLIMIT_" + name.upper()): name
    for name in (
        "as cpu core data fsize locks memlock msgqueue nice nofile nproc rss rtprio "
        "rttime sigpending stack"
    ).split()
    if hasattr(resource, "RLIMIT_" + name.upper())
}
# Signals the kernel sends on an rlimit breach, with the limit that sent them.
_LIMIT_SIGNALS: dict[int, tuple[int, str]] = {
    signal.SIGXCPU: (resource.RLIMIT_CPU, "CPU time limit exceeded"),
    signal.SIGXFSZ: (resource.RLIMIT_FSIZE, "file size limit exceeded"),
}
_EXIT_HINTS = {126: "command not executable", 127: "command not found"}
_MIB = 1024 * 1024
# What programs print when a limit stops them (an rlimit breach is an error return, not a
# signal): a failed run whose stderr ends with one of these names the limit, if it was set.
_BREACHES: tuple[tuple[int, re.Pattern[str]], ...] = (
    (
        resource.RLIMIT_NPROC,
        re.compile(
            r"Cannot fork|can't fork|fork: retry|fork failed|BlockingIOError|"
            r"Resource temporarily unavailable|unable to create (?:new )?native thread|"
            r"pthread_create failed|can't start new thread"
        ),
    ),
    (
        resource.RLIMIT_AS,
        re.compile(
            r"MemoryError|Cannot allocate memory|[Oo]ut of memory|bad_alloc|memory exhausted|"
            r"OutOfMemoryError|[Ff]ailed to allocate|allocation failed|[Cc]ould not allocate"
        ),
    ),
    (resource.RLIMIT_NOFILE, re.compile(r"Too many open files")),
    (resource.RLIMIT_FSIZE, re.compile(r"File too large")),
)
_BREACH_SCAN_CHARS = 4096
# Fallback when util-linux's prlimit is missing: set the limits in a fresh interpreter,
# then exec the shell (fork-safe, unlike preexec_fn, but ~20 ms slower per spawn).
_SETRLIMIT_SHIM = (
    "import os, resource, signal, sys\n"
    "for spec in sys.argv[1:-1]:\n"
    "    r, soft, hard = map(int, spec.split(':'))\n"
    "    resource.setrlimit(r, (soft, hard))\n"
    # Python ignores these at startup and exec keeps ignored signals ignored.
    "signal.signal(signal.SIGPIPE, signal.SIG_DFL)\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n"
    f"os.execv({SHELL!r}, [{SHELL!r}, '-c', sys.argv[-1]])\n"
)


@dataclasses.dataclass(frozen=True)
class ExecRequest:
    """One attempt of one task: what to run, where, and within which limits.

    ``env`` is applied on top of the worker's base environment (what of it a task gets
    depends on ``sandbox_level``, see :mod:`octaskly.executing.sandboxing`); ``timeout`` is
    wall-clock seconds; ``output_limit`` is how many bytes of the tail of each stream are
    kept; ``rlimits`` maps ``resource.RLIMIT_*`` to ``(soft, hard)`` limits set in the
    child (inside the sandbox, from ``strict`` on); ``hidden`` are more paths a sandboxed
    task must not see (the worker's data directory, its key file); ``exposed`` more paths
    it sees read-only (``sandbox_read_only_paths``); ``task_user`` the uid/gid a root
    worker runs ``none``/``basic`` tasks as (None: as itself).
    """

    task_id: str
    attempt: int
    command: str
    env: Mapping[str, str]
    timeout: float
    workdir_root: Path
    output_limit: int = 1 << 20
    rlimits: Mapping[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    sandbox_level: models.SandboxLevel = models.SandboxLevel.NONE
    hidden: tuple[Path, ...] = ()
    exposed: tuple[Path, ...] = ()
    task_user: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if self.output_limit < 0:
            raise ValueError(f"output_limit must be >= 0, got {self.output_limit}")
        unknown = sorted(set(self.rlimits) - set(_RLIMIT_OPTIONS))
        if unknown:
            raise ValueError(f"unknown resource limits: {unknown}")


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """How a run ended.

    ``exit_code`` is the shell's exit status, 128+N after death by signal N, None when the
    command never ran. ``stdout_bytes``/``stderr_bytes`` are the kept tails, exactly as the
    command wrote them; ``*_dropped`` count the bytes cut from their heads. ``stdout`` and
    ``stderr`` are their text views (UTF-8, U+FFFD for what does not decode). ``error``
    says why a run did not complete ("exit status 3", "timed out after 5s", ...).
    """

    status: Status
    exit_code: int | None
    duration_ms: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    stdout_dropped: int
    stderr_dropped: int
    error: str | None

    @property
    def stdout(self) -> str:
        return output.as_text(self.stdout_bytes, dropped=self.stdout_dropped).text

    @property
    def stderr(self) -> str:
        return output.as_text(self.stderr_bytes, dropped=self.stderr_dropped).text


class Execution:
    """One run of a task's command: create it, ``await run()``, ``cancel()`` at any time.

    ``base_env`` defaults to ``os.environ`` (read when the run starts). ``kill_grace`` and
    ``drain_timeout`` default to :data:`KILL_GRACE_SECONDS` and :data:`DRAIN_SECONDS`.
    ``contain`` is how ``none``/``basic`` runs are kept whole (the worker detects it once,
    :func:`~octaskly.executing.containment.detect`); None: the process group only.
    Use it from one event loop thread; it runs once.
    """

    def __init__(
        self,
        request: ExecRequest,
        *,
        on_output: OutputCallback | None = None,
        base_env: Mapping[str, str] | None = None,
        kill_grace: float = KILL_GRACE_SECONDS,
        drain_timeout: float = DRAIN_SECONDS,
        workdirs: Workdirs | None = None,
        contain: containment.Containment | None = None,
    ) -> None:
        self.request = request
        self._workdirs = workdirs
        self._contain = contain
        self._on_output = on_output
        self._base_env = base_env
        self._workdir: Path | None = None
        self._kill_grace = kill_grace
        self._drain_timeout = drain_timeout
        self._started = False
        self._cancel_requested = False
        self._wakeup: asyncio.Future[None] | None = None
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        """The pid of the shell (of bwrap, in a sandbox) once it was spawned.

        It is also the run's process group and session id.
        """
        return self._pid

    def cancel(self) -> None:
        """Stop the run: kill its process group; ``run()`` then returns "cancelled".

        Idempotent; before ``run()`` it makes the run return at once without spawning.
        """
        self._cancel_requested = True
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def run(self, *, cleanup: bool = True) -> ExecResult:
        """Run the command to its end; task failures are results, never exceptions.

        With ``cleanup=False`` the workdir stays until :meth:`cleanup` is awaited, so a
        caller can report the result first: removing a directory can block for a journal
        commit when the file system is busy (e.g. with database fsyncs).
        """
        if self._started:
            raise RuntimeError("an Execution runs only once")
        self._started = True
        if self._cancel_requested:
            return not_run("cancelled", "cancelled")
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            if self._workdirs is not None:
                self._workdir = self._workdirs.acquire()
            else:
                self._workdir = _make_workdir(self.request)
        except OSError as exc:
            return not_run("failed", f"could not start: cannot create a workdir: {exc}")
        try:
            return await self._run_in(self._workdir)
        finally:
            if cleanup:
                await self.cleanup()

    async def cleanup(self) -> None:
        """Remove the run's workdir, off the event loop; idempotent."""
        workdir, self._workdir = self._workdir, None
        if workdir is None:
            return
        if self._workdirs is not None:
            await self._workdirs.release(workdir)
            return
        try:
            os.rmdir(workdir)  # the common case, an empty workdir: one syscall, no thread
        except OSError:
            # In a thread: a task may leave a large tree behind; the loop must not stall.
            await asyncio.to_thread(workdirs.remove_tree, workdir)

    async def _run_in(self, workdir: Path) -> ExecResult:
        request, loop = self.request, asyncio.get_running_loop()
        buffers = {name: tails.TailBuffer(request.output_limit) for name in _STREAMS.values()}
        protocol = _Protocol(loop, buffers, self._on_output, request.task_id)
        try:
            launch = self._launch(workdir)
        except (sandboxing.Unavailable, OSError, ValueError) as exc:
            return not_run("failed", f"could not start: {exc}")
        argv, group = launch.argv, None
        contain = self._contain
        if contain is not None and not sandboxing.is_sandboxed(request.sandbox_level):
            argv = contain.wrap(argv)
            if contain.uses_cgroup:
                try:
                    group = contain.new_group()
                except OSError as exc:
                    return not_run("failed", f"could not start: cannot make its cgroup: {exc}")
        try:
            return await self._spawn(argv, launch, workdir, protocol, buffers, group)
        finally:
            if group is not None:
                await group.remove()

    async def _spawn(
        self,
        argv: list[str],
        launch: sandboxing.Launch,
        workdir: Path,
        protocol: _Protocol,
        buffers: dict[str, tails.TailBuffer],
        group: containment.RunGroup | None,
    ) -> ExecResult:
        request, loop = self.request, asyncio.get_running_loop()
        switch_user: dict[str, Any] = {}
        if launch.user is not None:
            switch_user = {"user": launch.user, "group": launch.group, "extra_groups": []}
        # The task's environment goes in on stdin (never in argv or the launchers' env);
        # the shell waits for it, so it runs nothing of the task's before we let it.
        env_in, env_out = os.pipe()
        feed = _Feed(env_out)
        started = time.monotonic()
        try:
            if launch.owner is not None:
                os.fchown(env_in, *launch.owner)  # (its shell reopens it)
            transport, _ = await loop.subprocess_exec(
                lambda: protocol,
                *argv,
                stdin=env_in,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=launch.env,
                # Own session and group: killpg reaches every child. In a sandbox, bwrap
                # stays in the group too, and its PID namespace dies with it.
                start_new_session=True,
                **switch_user,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            feed.close()
            return not_run("failed", f"could not start: {exc}")
        finally:
            os.close(env_in)
        self._pid = pgid = transport.get_pid()
        log.debug("task %s attempt %d: pid %d", request.task_id, request.attempt, pgid)
        try:
            try:
                if group is not None:
                    try:
                        # (its shell waits for its environment: no children yet; the write
                        # can take milliseconds, so off the loop)
                        await asyncio.to_thread(group.add, pgid)
                    except OSError as exc:
                        # It reads no complete environment: it exits 126 having run nothing.
                        log.warning(
                            "task %s: cannot move it into %s: %s", request.task_id, group.path, exc
                        )
                        return not_run("failed", f"could not start: cannot contain it: {exc}")
                await feed.send(launch.stdin)
                stopped = await self._supervise(pgid, protocol, group)
                duration_ms = int((time.monotonic() - started) * 1000)
            finally:
                # Background processes the shell left (or all of them, if run() itself
                # was cancelled): nothing of the run outlives it.
                _signal_group(pgid, signal.SIGKILL)
                if group is not None:
                    group.kill()
                feed.close()
            await self._drain(protocol)
        finally:
            transport.close()
        returncode = transport.get_returncode()
        assert returncode is not None  # _supervise returns only after the exit
        return self._result(stopped, returncode, duration_ms, buffers)

    def _launch(self, workdir: Path) -> sandboxing.Launch:
        request = self.request
        level = request.sandbox_level
        if sandboxing.is_sandboxed(level) and request.rlimits and _find_prlimit() is None:
            # (the Python shim may not be visible inside the sandbox)
            raise sandboxing.Unavailable("util-linux prlimit is not installed")
        fsize = request.rlimits.get(resource.RLIMIT_FSIZE)
        # Unsandboxed runs set their limits with the shell's ulimit (an extra exec of
        # prlimit per task would cost about as much as the shell itself).
        sandboxed = sandboxing.is_sandboxed(level)
        script = sandboxing.shell_prologue() + request.command
        return sandboxing.prepare(
            level,
            command=_argv(script, request.rlimits, sandboxed=sandboxed),
            base_env=os.environ if self._base_env is None else self._base_env,
            env=request.env,
            task_id=request.task_id,
            attempt=request.attempt,
            workdir=workdir,
            workdir_root=request.workdir_root,
            hidden=request.hidden,
            exposed=request.exposed,
            tmp_size=None if fsize is None or fsize[0] == resource.RLIM_INFINITY else fsize[0],
            task_user=request.task_user,
        )

    async def _supervise(
        self, pgid: int, protocol: _Protocol, group: containment.RunGroup | None
    ) -> Status | None:
        """Wait for the exit, the timeout or cancel(); returns why we stopped it, if we did."""
        assert self._wakeup is not None
        await asyncio.wait(
            (protocol.exited, self._wakeup),
            timeout=self.request.timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if protocol.exited.done():
            return None
        reason: Status = "cancelled" if self._wakeup.done() else "timed_out"
        log.debug("task %s: %s, stopping group %d", self.request.task_id, reason, pgid)
        _signal_group(pgid, signal.SIGTERM)
        if group is not None:
            group.signal(signal.SIGTERM)
        await asyncio.wait((protocol.exited,), timeout=self._kill_grace)
        _signal_group(pgid, signal.SIGKILL)
        if group is not None:
            group.kill()
        await protocol.exited
        return reason

    async def _drain(self, protocol: _Protocol) -> None:
        """Read what is left in the pipes, but not forever: an escaped process may hold them."""
        await asyncio.wait((protocol.pipes_closed,), timeout=self._drain_timeout)
        if not protocol.pipes_closed.done():
            log.warning(
                "task %s: a process outside its group still holds its output; stopped reading",
                self.request.task_id,
            )

    def _result(
        self,
        stopped: Status | None,
        returncode: int,
        duration_ms: int,
        buffers: dict[str, tails.TailBuffer],
    ) -> ExecResult:
        out, err = buffers["stdout"], buffers["stderr"]
        status: Status
        if stopped == "timed_out":
            status, error = stopped, f"timed out after {self.request.timeout:g}s"
        elif stopped == "cancelled":
            status, error = stopped, "cancelled"
        elif returncode == 0:
            status, error = "completed", None
        else:
            stderr = output.as_text(err.getvalue(), dropped=err.dropped).text
            status, error = "failed", _describe_exit(returncode, self.request, stderr)
        return ExecResult(
            status=status,
            exit_code=returncode if returncode >= 0 else 128 - returncode,
            duration_ms=duration_ms,
            stdout_bytes=out.getvalue(),
            stderr_bytes=err.getvalue(),
            stdout_dropped=out.dropped,
            stderr_dropped=err.dropped,
            error=error,
        )


class _Protocol(asyncio.SubprocessProtocol):
    """Feeds output into the tail buffers and the callback; tells when the shell exited.

    The exit is reported by the child watcher, independently of the pipes: on 3.11,
    ``Process.wait()`` also waits for the pipes, which orphans can hold open forever.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        buffers: dict[str, tails.TailBuffer],
        on_output: OutputCallback | None,
        task_id: str,
    ) -> None:
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        self._open = set(_STREAMS)
        self._buffers = buffers
        self._on_output = on_output
        self._task_id = task_id

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        stream = _STREAMS[fd]
        self._buffers[stream].feed(data)
        if self._on_output is not None:
            try:
                self._on_output(stream, data)
            except Exception:  # a broken consumer must not break the run
                log.exception("task %s: output callback failed; not streaming", self._task_id)
                self._on_output = None

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open.discard(fd)
        if not self._open and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


def not_run(status: Status, error: str) -> ExecResult:
    """The result of a run that never started (or ended before its process existed)."""
    return ExecResult(
        status=status,
        exit_code=None,
        duration_ms=0,
        stdout_bytes=b"",
        stderr_bytes=b"",
        stdout_dropped=0,
        stderr_dropped=0,
        error=error,
    )


def _make_workdir(request: ExecRequest) -> Path:
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", request.task_id)[:64]
    root = Path(os.path.abspath(request.workdir_root))
    return workdirs.make_dir(root, f"octaskly-{safe_id}-{request.attempt}-")


def _argv(
    command: str, rlimits: Mapping[int, tuple[int, int]], *, sandboxed: bool = False
) -> list[str]:
    """The argv that runs ``command`` with ``rlimits`` set in the child.

    Unsandboxed, the shell sets them itself with ``ulimit`` before the command. Inside a
    sandbox (where only the system's tools are), limits are set by a wrapper that then
    execs the shell (same pid), rather than by
    ``preexec_fn``, which runs Python between fork and exec and can deadlock in a threaded
    process (3.11's default child watcher starts threads) and rules out vfork.
    """
    if not rlimits:
        return [SHELL, "-c", command]
    script = _ulimit_script(rlimits) if not sandboxed else None
    if script is not None:
        # One line: the command's own line numbers (in shell errors) stay as they were.
        return [SHELL, "-c", f"{script} || exit 126; {command}"]
    prlimit = _find_prlimit()
    if prlimit is not None:
        options = [
            f"--{_RLIMIT_OPTIONS[r]}={_prlimit_value(soft)}:{_prlimit_value(hard)}"
            for r, (soft, hard) in sorted(rlimits.items())
        ]
        return [prlimit, *options, "--", SHELL, "-c", command]
    specs = [f"{r}:{soft}:{hard}" for r, (soft, hard) in sorted(rlimits.items())]
    return [sys.executable, "-I", "-S", "-c", _SETRLIMIT_SHIM, *specs, command]


# The shell's own `ulimit` (POSIX units: -v KiB, -f 512-byte blocks) for unsandboxed runs:
# no extra exec, and the limits hold before the first word of the command runs.
_ULIMIT_FLAGS = {
    resource.RLIMIT_CPU: ("t", 1),
    resource.RLIMIT_AS: ("v", 1024),
    resource.RLIMIT_FSIZE: ("f", 512),
    resource.RLIMIT_NOFILE: ("n", 1),
}


def _ulimit_script(rlimits: Mapping[int, tuple[int, int]]) -> str | None:
    """`ulimit` builtins setting `rlimits` (soft, then hard), or None if one has no flag."""
    parts = []
    for which, (soft, hard) in sorted(rlimits.items()):
        if which not in _ULIMIT_FLAGS:
            return None
        flag, unit = _ULIMIT_FLAGS[which]
        for kind, value in (("S", soft), ("H", hard)):
            amount = "unlimited" if value == resource.RLIM_INFINITY else str(value // unit)
            parts.append(f"ulimit -{kind}{flag} {amount}")
    return " && ".join(parts)


@functools.cache
def _find_prlimit() -> str | None:
    return shutil.which("prlimit") or shutil.which("prlimit", path="/usr/bin:/bin")


def _prlimit_value(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


#: What a pipe takes without blocking (Linux's default capacity); more is written off the loop.
_PIPE_CAPACITY = 65536


class _Feed:
    """The write end of a run's stdin pipe: the task's environment goes through it once."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._transport: asyncio.WriteTransport | None = None

    async def send(self, data: bytes) -> None:
        """Write ``data`` and close (the shell reads to the end of its input)."""
        if len(data) <= _PIPE_CAPACITY:
            with contextlib.suppress(BrokenPipeError):  # (a failed start: its status says why)
                os.write(self._fd, data)  # a new, empty pipe takes it at once
            self.close()
            return
        pipe = os.fdopen(self._fd, "wb", buffering=0)
        self._fd = -1
        transport, _ = await asyncio.get_running_loop().connect_write_pipe(
            asyncio.BaseProtocol, pipe
        )
        self._transport = transport
        transport.write(data)
        transport.close()  # once all is written

    def close(self) -> None:
        """Close now (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        transport, self._transport = self._transport, None
        if transport is not None and not transport.is_closing():
            transport.abort()  # (the shell is gone before reading it all)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # A group id is not reused while any member (zombies too) exists; once the group is
    # empty, reuse would need the pid counter to wrap between the shell's exit and here.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _describe_exit(returncode: int, request: ExecRequest, stderr: str) -> str:
    rlimits = request.rlimits
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        limit = _LIMIT_SIGNALS.get(-returncode)
        return f"killed by signal {name}" + (f" ({limit[1]})" if limit else "")
    # The shell (and bwrap) report a child killed by signal N as 128+N.
    limit = _LIMIT_SIGNALS.get(returncode - 128)
    if limit is not None and limit[0] in rlimits:
        return f"{limit[1]} (exit status {returncode})"
    if (
        returncode == 1
        and sandboxing.is_sandboxed(request.sandbox_level)
        and stderr.startswith("bwrap: ")
    ):
        return f"could not start the sandbox: {stderr.splitlines()[0]}"
    breach = _breached_limit(rlimits, stderr[-_BREACH_SCAN_CHARS:])
    if breach is not None:
        return f"{breach} (exit status {returncode})"
    hint = _EXIT_HINTS.get(returncode)
    return f"exit status {returncode}" + (f" ({hint})" if hint else "")


def _breached_limit(rlimits: Mapping[int, tuple[int, int]], stderr: str) -> str | None:
    """The limit a failed run's last words say it ran into, among those it had."""
    for limit, pattern in _BREACHES:
        if limit in rlimits and pattern.search(stderr):
            soft = rlimits[limit][0]
            if limit == resource.RLIMIT_NPROC:
                return f"process limit ({soft}) reached"
            if limit == resource.RLIMIT_AS:
                return f"memory limit ({soft // _MIB} MB) exceeded"
            if limit == resource.RLIMIT_NOFILE:
                return f"open files limit ({soft}) reached"
            return "file size limit exceeded"
    return None
