"""The worker service: connect to a dispatcher, run assigned tasks, report results.

Runs survive a lost connection: the worker reconnects with backoff (rotating through the
dispatcher addresses it was given), tells the dispatcher which runs it still holds and
which results are unacknowledged, and re-sends those results. A result is dropped only
after the dispatcher acknowledged it.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import logging
import os
import resource
import secrets
from pathlib import Path
from typing import TypeVar

from octaskly import __version__, errors, executing
from octaskly.domain import models
from octaskly.protocol import auth, messages
from octaskly.transport import base as transport
from octaskly.transport import p2p

log = logging.getLogger(__name__)
FLUSH_SECONDS = 0.05
FLUSH_BYTES = 64 * 1024
_M = TypeVar("_M")


@dataclasses.dataclass(frozen=True)
class Options:
    name: str
    dispatcher_addrs: tuple[tuple[str, int], ...]
    secret_key: bytes
    resources: models.Resources
    max_jobs: int
    sandbox_level: models.SandboxLevel = models.SandboxLevel.BASIC
    output_limit: int = 1 << 20
    workdir_root: Path = Path("/tmp")
    connect_timeout: float = 10.0
    reconnect_max_delay: float = 10.0
    transport: p2p.Transport = "auto"
    #: More paths sandboxed tasks must not see (data directory, key file).
    sandbox_hide: tuple[Path, ...] = ()


def rlimits(
    assignment: messages.TaskAssignment,
    level: models.SandboxLevel = models.SandboxLevel.NONE,
) -> dict[int, tuple[int, int]]:
    """The run's limits as rlimits: memory -> address space, CPU seconds, disk -> file
    size, open files, processes; each the task's own, else its preset's, else the default.

    The process limit is set only in a sandbox (``strict`` and up): there the kernel counts
    the processes of the task's own user namespace; outside, it would count every process
    of the worker's user (and ignore the limit for root). No limit is set above what this
    worker's own hard limit allows (raising it would fail the run).
    """
    limits = models.effective_limits(
        preset=assignment.limits_preset,
        cpu_seconds=assignment.cpu_seconds,
        memory_limit_mb=assignment.memory_limit_mb,
        disk_limit_mb=assignment.disk_limit_mb,
        open_files_limit=assignment.open_files_limit,
        process_limit=assignment.process_limit,
    )
    memory = limits.memory_limit_mb * 1024 * 1024
    disk = limits.disk_limit_mb * 1024 * 1024
    wanted = {
        resource.RLIMIT_AS: (memory, memory),
        # hard = soft + 1: SIGXCPU first (reported as the CPU limit), SIGKILL a second later
        resource.RLIMIT_CPU: (limits.cpu_seconds, limits.cpu_seconds + 1),
        resource.RLIMIT_FSIZE: (disk, disk),
        resource.RLIMIT_NOFILE: (limits.open_files_limit, limits.open_files_limit),
    }
    if executing.is_sandboxed(level):
        wanted[resource.RLIMIT_NPROC] = (limits.process_limit, limits.process_limit)
    return {r: _within_hard_limit(r, soft, hard) for r, (soft, hard) in wanted.items()}


def sandbox_problem(level: models.SandboxLevel, workdir_root: Path) -> str | None:
    """Why this machine cannot run tasks at ``level`` (None when it can): for start-up checks."""
    problem = executing.unavailable(level, workdir_root)
    return None if problem is None else f"not available on this machine: {problem}"


def _within_hard_limit(limit: int, soft: int, hard: int) -> tuple[int, int]:
    ceiling = resource.getrlimit(limit)[1]
    if ceiling == resource.RLIM_INFINITY:
        return soft, hard
    return min(soft, ceiling), min(hard, ceiling)


class FatalWorkerError(errors.PermanentError):
    """The dispatcher refused this worker for a reason retrying cannot fix."""


@dataclasses.dataclass(eq=False)
class _Running:
    assignment: messages.TaskAssignment
    execution: executing.Execution
    pending: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    pending_bytes: int = 0
    decoders: dict[str, codecs.IncrementalDecoder] = dataclasses.field(default_factory=dict)
    flush_handle: asyncio.TimerHandle | None = None
    aborted: bool = False


class Worker:
    def __init__(self, *, options: Options) -> None:
        self.options = options
        self.instance = secrets.token_hex(16)
        self._key = auth.derive_auth_key(options.secret_key)
        self.running: dict[str, _Running] = {}
        self.unacked: dict[str, messages.Result] = {}
        self._conn: transport.Connection | None = None
        self._exec_tasks: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.worker_id: str | None = None
        self.completed = 0
        # Runs reuse the working directories earlier runs left empty (see executing.workdirs).
        self._workdirs = executing.Workdirs(options.workdir_root, keep=options.max_jobs)
        # Read the environment once: iterating os.environ per task costs more than a spawn.
        self._base_env = {
            k: v
            for k, v in os.environ.items()
            if not k.upper().startswith(executing.PRIVATE_ENV_PREFIX)
        }

    # -- connection loop ------------------------------------------------------------------
    async def run(self) -> None:
        """Serve forever; raises FatalWorkerError if the dispatcher refuses this worker."""
        executing.install_fast_child_watcher()
        delay, index = 0.2, 0
        addrs = self.options.dispatcher_addrs
        try:
            while True:
                host, port = addrs[index % len(addrs)]
                try:
                    await self._session(host, port)
                    delay = 0.2
                except FatalWorkerError:
                    raise
                except (ConnectionError, OSError, TimeoutError, errors.ProtocolError) as exc:
                    log.warning("dispatcher %s:%d: %s", host, port, exc or type(exc).__name__)
                    index += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.options.reconnect_max_delay)
        finally:
            await self._shutdown()

    async def _session(self, host: str, port: int) -> None:
        conn = await p2p.dial(
            host, port, transport=self.options.transport, timeout=self.options.connect_timeout
        )
        try:
            welcome = await self._handshake(conn)
            self._conn, self.worker_id = conn, welcome.worker_id
            log.info(
                "connected to dispatcher %s:%d over %s as %s",
                host,
                port,
                conn.kind,
                welcome.worker_id,
            )
            for ref in welcome.abort:
                self._cancel(ref.task_id, ref.attempt, reason="dispatcher gave the run away")
            for result in list(self.unacked.values()):
                await conn.send(messages.to_wire(result))
            self.connected.set()
            beat = asyncio.create_task(self._heartbeat(conn, welcome.keepalive_interval))
            try:
                await self._receive(conn)
            finally:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
        finally:
            self.connected.clear()
            self._conn = None
            conn.close()
            await conn.wait_closed()

    async def _handshake(self, conn: transport.Connection) -> messages.Welcome:
        timeout = self.options.connect_timeout
        challenge = await self._expect(conn, messages.Challenge, timeout)
        nonce = auth.new_nonce()
        hello = messages.Hello(
            protocol=messages.PROTOCOL_VERSION,
            name=self.options.name,
            instance=self.instance,
            nonce=nonce,
            version=__version__,
            resources=self.options.resources,
            max_jobs=self.options.max_jobs,
            sandbox_level=self.options.sandbox_level,
            proof=auth.worker_proof(
                self._key,
                dispatcher_nonce=challenge.nonce,
                worker_nonce=nonce,
                name=self.options.name,
                binding=conn.binding,
            ),
            running=[
                messages.RunRef(task_id=r.assignment.task_id, attempt=r.assignment.attempt)
                for r in self.running.values()
            ],
            finished=[
                messages.RunRef(task_id=r.task_id, attempt=r.attempt) for r in self.unacked.values()
            ],
        )
        await conn.send(messages.to_wire(hello))
        welcome = await self._expect(conn, messages.Welcome, timeout)
        expected = auth.dispatcher_proof(
            self._key,
            dispatcher_nonce=challenge.nonce,
            worker_nonce=nonce,
            worker_id=welcome.worker_id,
            binding=conn.binding,
        )
        if not auth.verify(expected, welcome.proof):
            raise FatalWorkerError("the dispatcher could not prove it has the cluster secret key")
        return welcome

    async def _expect(self, conn: transport.Connection, kind: type[_M], timeout: float) -> _M:
        raw = await asyncio.wait_for(conn.recv(), timeout)
        if raw is None:
            raise ConnectionError("dispatcher closed the connection during the handshake")
        message = messages.parse_dispatcher_message(raw)
        if isinstance(message, messages.Reject):
            if "already connected" in message.reason:
                raise ConnectionError(f"refused: {message.reason}")
            raise FatalWorkerError(f"the dispatcher refused this worker: {message.reason}")
        if not isinstance(message, kind):
            raise errors.ProtocolError(f"expected {kind.__name__}, got {message.type}")
        return message

    async def _heartbeat(self, conn: transport.Connection, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            running = [
                messages.RunRef(task_id=r.assignment.task_id, attempt=r.assignment.attempt)
                for r in self.running.values()
            ]
            await conn.send(messages.to_wire(messages.Heartbeat(running=running)))

    async def _receive(self, conn: transport.Connection) -> None:
        while True:
            raw = await conn.recv()
            if raw is None:
                raise ConnectionError("dispatcher closed the connection")
            message = messages.parse_dispatcher_message(raw)
            if isinstance(message, messages.Assign):
                self._start(message.task)
            elif isinstance(message, messages.Cancel):
                self._cancel(message.task_id, message.attempt, reason="cancelled by dispatcher")
            elif isinstance(message, messages.ResultAck):
                result = self.unacked.get(message.task_id)
                if result is not None and result.attempt == message.attempt:
                    del self.unacked[message.task_id]
            else:
                raise errors.ProtocolError(f"unexpected {message.type} after the handshake")

    # -- running tasks -------------------------------------------------------------------------
    def _start(self, assignment: messages.TaskAssignment) -> None:
        if assignment.task_id in self.running:
            log.warning(
                "task %s is already running here; ignoring a duplicate assignment",
                assignment.task_id,
            )
            return
        refusal = self._refusal(assignment)
        if refusal is not None:
            log.warning("task %s refused: %s", assignment.task_id, refusal)
            self._report(assignment, executing.not_run("failed", refusal))
            return
        level = self._level(assignment)
        request = executing.ExecRequest(
            task_id=assignment.task_id,
            attempt=assignment.attempt,
            command=assignment.command,
            env=assignment.env,
            timeout=float(assignment.timeout),
            workdir_root=self.options.workdir_root,
            output_limit=self.options.output_limit,
            rlimits=rlimits(assignment, level),
            sandbox_level=level,
            hidden=self.options.sandbox_hide,
        )
        holder: list[_Running] = []
        execution = executing.Execution(
            request,
            base_env=self._base_env,
            workdirs=self._workdirs,
            on_output=lambda stream, data: self._on_output(holder[0], stream, data),
        )
        run = _Running(assignment, execution)
        holder.append(run)
        self.running[assignment.task_id] = run
        task = asyncio.create_task(self._execute(run), name=f"run-{assignment.task_id}")
        self._exec_tasks.add(task)
        task.add_done_callback(self._exec_tasks.discard)

    async def _execute(self, run: _Running) -> None:
        a = run.assignment
        try:
            outcome = await run.execution.run(cleanup=False)
        except Exception as exc:  # a bug here must not kill the worker
            log.exception("task %s attempt %d crashed the executor", a.task_id, a.attempt)
            outcome = executing.not_run("failed", f"worker error: {exc}")
        self._flush(run)
        if self.running.get(a.task_id) is run:
            del self.running[a.task_id]
        if not (outcome.status == "cancelled" and run.aborted):
            self._report(a, outcome)  # (an aborted run is no longer wanted: no report)
        await run.execution.cleanup()  # after the report: its latency is nobody's

    def _report(self, a: messages.TaskAssignment, outcome: executing.ExecResult) -> None:
        """Keep the result until the dispatcher acknowledges it, and send it now if we can."""
        result = messages.Result(
            task_id=a.task_id,
            attempt=a.attempt,
            status=outcome.status,
            exit_code=outcome.exit_code,
            duration_ms=outcome.duration_ms,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            stdout_dropped=outcome.stdout_dropped,
            stderr_dropped=outcome.stderr_dropped,
            error=outcome.error,
        )
        self.completed += 1
        self.unacked[a.task_id] = result
        self._send_nowait(result)

    def _level(self, assignment: messages.TaskAssignment) -> models.SandboxLevel:
        """A task may ask for more isolation than this worker's minimum, never for less."""
        return executing.effective_level(assignment.sandbox_level, self.options.sandbox_level)

    def _refusal(self, assignment: messages.TaskAssignment) -> str | None:
        """A task this worker cannot run as asked is failed, never run with less isolation."""
        level = self._level(assignment)
        # (checked once per level, by running bwrap: a few ms on the loop, then remembered)
        problem = executing.unavailable(level, self.options.workdir_root)
        if problem is not None:
            return f"sandbox level {level.value} is not available on this worker: {problem}"
        return None

    def _cancel(self, task_id: str, attempt: int, *, reason: str) -> None:
        run = self.running.get(task_id)
        if run is not None and run.assignment.attempt == attempt:
            log.info("cancelling task %s attempt %d: %s", task_id, attempt, reason)
            run.aborted = True
            run.execution.cancel()

    def _on_output(self, run: _Running, stream: str, data: bytes) -> None:
        decoder = run.decoders.get(stream)
        if decoder is None:
            decoder = run.decoders[stream] = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(data)
        if not text:
            return
        run.pending.setdefault(stream, []).append(text)
        run.pending_bytes += len(text)
        if run.pending_bytes >= FLUSH_BYTES:
            self._flush(run)
        elif run.flush_handle is None:
            run.flush_handle = asyncio.get_running_loop().call_later(
                FLUSH_SECONDS, self._flush, run
            )

    def _flush(self, run: _Running) -> None:
        if run.flush_handle is not None:
            run.flush_handle.cancel()
            run.flush_handle = None
        pending, run.pending, run.pending_bytes = run.pending, {}, 0
        for stream, parts in pending.items():
            self._send_nowait(
                messages.Output(
                    task_id=run.assignment.task_id,
                    attempt=run.assignment.attempt,
                    stream=stream,
                    data="".join(parts),
                )
            )

    def _send_nowait(self, message: messages._Message) -> None:
        conn = self._conn
        if conn is None:
            return  # results stay in `unacked` and go out after the reconnect
        try:
            conn.send_nowait(messages.to_wire(message))
        except (ConnectionError, OSError):
            conn.close()

    async def _shutdown(self) -> None:
        for run in list(self.running.values()):
            run.execution.cancel()
        tasks = list(self._exec_tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workdirs.close()
