"""The worker service: connect to a dispatcher, run assigned tasks, report results.

Runs survive a lost connection: the worker reconnects with backoff (rotating through the
dispatcher addresses it was given), tells the dispatcher which runs it still holds and
which results are unacknowledged, and re-sends those results. A result is dropped only
after the dispatcher acknowledged it (with sync replication: once the standby has it).

High availability: the worker follows the primary. A standby answers its hello with a
redirect; every welcome and state message carries the dispatcher's term, and the worker
never works for a lower term than the highest it has seen. It also keeps a witness
session with every other dispatcher it knows (given, or learnt from the primary), and
reports there once a second whether it still hears from the primary: a standby promotes
itself only when most witnesses lost the primary too. A promoted standby tells its
witnesses at once, and they move their work to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import secrets
import zlib
from pathlib import Path
from typing import TypeVar

from octaskly import __version__, errors, executing, keyring
from octaskly.domain import models
from octaskly.protocol import auth, messages
from octaskly.transport import base as transport
from octaskly.transport import p2p

log = logging.getLogger(__name__)
FLUSH_SECONDS = 0.05
FLUSH_BYTES = 64 * 1024
WITNESS_INTERVAL = 1.0
MAX_SANDBOX_REASON = 500
"""Characters of a reason a level is unavailable sent in the hello (bwrap's stderr can be long)."""
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
    keys: keyring.Keyring | None = None
    """The key file's keys (re-read when it changes); None: just `secret_key`."""
    task_user: tuple[int, int] | None = None
    """uid/gid a root worker runs none/basic tasks as (see `resolve_task_user`); None: itself."""
    sandbox_read_only_paths: tuple[Path, ...] = ()
    """More paths strict tasks see read-only."""
    containment: str | executing.Containment = "auto"
    """How none/basic runs are kept whole: a detected Containment, or what to detect."""


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


def sandbox_report(
    minimum: models.SandboxLevel, workdir_root: Path
) -> dict[models.SandboxLevel, str]:
    """The levels from ``minimum`` up that this machine cannot provide, each with the reason:
    what the hello reports, so that the dispatcher sends this worker only tasks it can
    sandbox. Blocking: each sandboxed level runs ``bwrap`` once."""
    report = {}
    for level in models.SandboxLevel:
        if level.rank >= minimum.rank:
            problem = executing.unavailable(level, workdir_root)
            if problem is not None:
                report[level] = problem[:MAX_SANDBOX_REASON]
    return report


def _within_hard_limit(limit: int, soft: int, hard: int) -> tuple[int, int]:
    ceiling = resource.getrlimit(limit)[1]
    if ceiling == resource.RLIM_INFINITY:
        return soft, hard
    return min(soft, ceiling), min(hard, ceiling)


class FatalWorkerError(errors.PermanentError):
    """The dispatcher refused this worker for a reason retrying cannot fix."""


class _Moved(ConnectionError):
    """Go to another dispatcher now (a redirect, or a newer primary found): no backoff."""


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


@dataclasses.dataclass(eq=False)
class _Running:
    assignment: messages.TaskAssignment
    execution: executing.Execution
    pending: dict[str, list[bytes]] = dataclasses.field(default_factory=dict)
    pending_bytes: int = 0
    flush_handle: asyncio.TimerHandle | None = None
    aborted: bool = False


class Worker:
    def __init__(self, *, options: Options) -> None:
        self.options = options
        self.instance = secrets.token_hex(16)
        self.keys = options.keys or keyring.Keyring([options.secret_key])
        self.running: dict[str, _Running] = {}
        self.unacked: dict[str, messages.Result] = {}
        self._conn: transport.Connection | None = None
        self._exec_tasks: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.worker_id: str | None = None
        self.completed = 0
        self.term = 0
        """The highest dispatcher term seen: never work for a lower one."""
        self.primary: str | None = None
        """Where the primary of `term` was reached (HOST:PORT)."""
        self.known = [_addr(h, p) for h, p in options.dispatcher_addrs]
        self._preferred: str | None = None
        self._current: str | None = None
        self._last_heard = 0.0
        self._primary_lsn = 0
        self._standby_synced: bool | None = None
        self._population = 0
        """How many witnesses the primary counted in its last State."""
        self._witnesses: dict[str, asyncio.Task[None]] = {}
        self._nudge = asyncio.Event()
        self._welcomed = False
        """A session was established since the last reconnect delay was reset."""
        self.draining = False
        self.sandbox_unavailable: dict[models.SandboxLevel, str] | None = None
        """The sandbox report of the hello (see `sandbox_report`); None until `run` probed."""
        # Runs reuse the working directories earlier runs left empty (see executing.workdirs).
        self._workdirs = executing.Workdirs(
            options.workdir_root,
            keep=options.max_jobs,
            owners=(
                *([options.task_user[0]] if options.task_user else []),
                *([executing.sandboxing.SANDBOX_UID] if os.geteuid() == 0 else []),
            ),
        )
        contain = options.containment
        if isinstance(contain, str):
            contain = executing.detect_containment(contain, task_user=options.task_user)
        self.containment: executing.Containment = contain
        """How this worker's none/basic runs are kept whole (strict and up: bubblewrap)."""
        # Read the environment once: iterating os.environ per task costs more than a spawn.
        self._base_env = {
            k: v
            for k, v in os.environ.items()
            if not k.upper().startswith(executing.PRIVATE_ENV_PREFIX)
        }

    # -- connection loop ------------------------------------------------------------------
    async def run(self) -> None:
        """Serve forever; raises FatalWorkerError once every known dispatcher, one after
        the other, refused this worker or failed to prove the cluster key (one bad address
        in a list of several is skipped, not fatal)."""
        executing.install_fast_child_watcher()
        await self._probe_sandboxes()
        # Workers given the same list of dispatchers start at different places in it
        # (by name, so a restart goes back to the same one): several active dispatchers
        # on one database share the workers; one primary redirects the rest to itself.
        delay, index = 0.2, zlib.crc32(self.options.name.encode())
        refused: set[str] = set()
        witnessing = asyncio.create_task(self._witness_forever(), name="octaskly-witnesses")
        try:
            while True:
                if self._preferred is not None:
                    addr, self._preferred = self._preferred, None
                else:
                    addr = self.known[index % len(self.known)]
                try:
                    await self._session(addr)
                    delay = 0.2
                    refused.clear()
                except FatalWorkerError as exc:
                    refused.add(addr)
                    if refused.issuperset(self.known):
                        raise
                    log.error("dispatcher %s: %s; trying the others", addr, exc)
                    index += 1
                except _Moved as exc:
                    log.info("dispatcher %s: %s", addr, exc)
                    delay = 0.2
                    continue
                except (ConnectionError, OSError, TimeoutError, errors.ProtocolError) as exc:
                    log.warning("dispatcher %s: %s", addr, exc or type(exc).__name__)
                    index += 1
                    if self._welcomed:  # a session that worked ended: a new outage, not
                        self._welcomed, delay = False, 0.2  # the next failure in a row
                        refused.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._nudge.wait(), delay)  # or a newer primary
                self._nudge.clear()
                delay = min(delay * 2, self.options.reconnect_max_delay)
        finally:
            witnessing.cancel()
            await asyncio.gather(witnessing, return_exceptions=True)
            await self._shutdown()

    async def _probe_sandboxes(self) -> None:
        minimum, root = self.options.sandbox_level, self.options.workdir_root
        report = await asyncio.to_thread(sandbox_report, minimum, root)
        self.sandbox_unavailable = report
        available = [
            level.value
            for level in models.SandboxLevel
            if level.rank >= minimum.rank and level not in report
        ]
        log.info("sandbox levels this worker provides: %s", ", ".join(available) or "no level")
        for level, reason in report.items():
            log.warning(
                "sandbox level %s is not available here (tasks that need it go to other "
                "workers): %s",
                level.value,
                reason,
            )

    def _auth_keys(self) -> list[bytes]:
        self.keys.reload_if_changed()  # a rotated key file is used from the next handshake
        return self.keys.derived("p2p-auth", auth.derive_auth_key)

    def _learn(self, addrs: list[str]) -> None:
        for addr in addrs:
            if addr not in self.known:
                log.info("learnt of dispatcher %s", addr)
                self.known.append(addr)

    def _see_term(self, term: int, primary: str | None) -> None:
        if term > self.term:
            self.term = term
            self.primary = primary

    async def _session(self, addr: str) -> None:
        host, port = _split(addr)
        conn = await p2p.dial(
            host, port, transport=self.options.transport, timeout=self.options.connect_timeout
        )
        try:
            welcome = await self._handshake(conn)
            self._welcomed = True
            self._conn, self.worker_id, self._current = conn, welcome.worker_id, addr
            self._last_heard = asyncio.get_running_loop().time()
            self._see_term(welcome.term, addr)
            self._learn(welcome.dispatchers)
            log.info(
                "connected to dispatcher %s over %s as %s (term %d)",
                addr,
                conn.kind,
                welcome.worker_id,
                welcome.term,
            )
            for ref in welcome.abort:
                self._cancel(ref.task_id, ref.attempt, reason="dispatcher gave the run away")
            for result in list(self.unacked.values()):
                await conn.send(messages.to_wire(result))
            if self.draining:
                await conn.send(messages.to_wire(messages.Drain()))
            self.connected.set()
            beat = asyncio.create_task(self._heartbeat(conn, welcome.keepalive_interval))
            try:
                await self._receive(conn)
            finally:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
        finally:
            self.connected.clear()
            self._conn = self._current = None
            conn.close()
            await conn.wait_closed()

    async def _handshake(
        self, conn: transport.Connection, *, witness: bool = False
    ) -> messages.Welcome:
        """Prove the key, get the dispatcher's welcome and check its proof. A work session
        reports the runs and results it holds and refuses a dispatcher of an older term; a
        witness session only reports."""
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
            sandbox_unavailable=self.sandbox_unavailable,
            proof=auth.worker_proof(
                self._auth_keys()[0],
                dispatcher_nonce=challenge.nonce,
                worker_nonce=nonce,
                name=self.options.name,
                binding=conn.binding,
            ),
            running=[]
            if witness
            else [
                messages.RunRef(task_id=r.assignment.task_id, attempt=r.assignment.attempt)
                for r in self.running.values()
            ],
            finished=[]
            if witness
            else [
                messages.RunRef(task_id=r.task_id, attempt=r.attempt) for r in self.unacked.values()
            ],
            purpose="witness" if witness else "work",
            term=self.term,
            primary=self.primary,
        )
        await conn.send(messages.to_wire(hello))
        welcome = await self._expect(conn, messages.Welcome, timeout)
        proved = auth.first_key(
            self._auth_keys(),
            lambda key: auth.dispatcher_proof(
                key,
                dispatcher_nonce=challenge.nonce,
                worker_nonce=nonce,
                worker_id=welcome.worker_id,
                binding=conn.binding,
            ),
            welcome.proof,
        )
        if proved is None:
            if witness:  # not fatal: that dispatcher is simply not believed
                raise ConnectionError("it could not prove it has the cluster secret key")
            raise FatalWorkerError("the dispatcher could not prove it has the cluster secret key")
        if not witness and welcome.term < self.term:
            raise ConnectionError(
                f"its term {welcome.term} is older than term {self.term} of primary "
                f"{self.primary}: not working for it"
            )
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
        if isinstance(message, messages.Redirect):
            self._redirected(message)
        if not isinstance(message, kind):
            raise errors.ProtocolError(f"expected {kind.__name__}, got {message.type}")
        return message

    def _redirected(self, redirect: messages.Redirect) -> None:
        if redirect.term >= self.term and redirect.primary:
            self._see_term(redirect.term, redirect.primary)
            self._learn([redirect.primary])
            self._preferred = redirect.primary
            raise _Moved(f"{redirect.reason}; the primary is {redirect.primary}")
        raise ConnectionError(f"not the primary ({redirect.reason})")

    async def _heartbeat(self, conn: transport.Connection, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            silent = loop.time() - self._last_heard
            if silent > self.options.connect_timeout:
                log.warning("no word from the dispatcher for %.1fs: reconnecting", silent)
                conn.close()
                return
            running = [
                messages.RunRef(task_id=r.assignment.task_id, attempt=r.assignment.attempt)
                for r in self.running.values()
            ]
            await conn.send(messages.to_wire(messages.Heartbeat(running=running)))

    async def _receive(self, conn: transport.Connection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            raw = await conn.recv()
            if raw is None:
                raise ConnectionError("dispatcher closed the connection")
            self._last_heard = loop.time()
            message = messages.parse_dispatcher_message(raw)
            if isinstance(message, messages.State):
                if message.term < self.term:
                    raise ConnectionError(f"its term {message.term} is older than {self.term}")
                self._see_term(message.term, self._current)
                self._primary_lsn, self._standby_synced = message.lsn, message.standby_synced
                self._population = message.population
                self._learn(message.dispatchers)
                if message.seq:  # the primary's proof that we hear it (it fences without)
                    conn.send_nowait(messages.to_wire(messages.StateAck(seq=message.seq)))
            elif isinstance(message, messages.Redirect):
                self._redirected(message)
            elif isinstance(message, messages.Assign):
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
        if self.draining:  # assigned before the dispatcher heard of the drain: hand it back
            ref = messages.RunRef(task_id=assignment.task_id, attempt=assignment.attempt)
            self._send_nowait(messages.Release(runs=[ref]))
            return
        if assignment.task_id in self.running:
            log.warning(
                "task %s is already running here; ignoring a duplicate assignment",
                assignment.task_id,
            )
            return
        refusal = self._refusal(assignment)
        if refusal is not None:
            log.warning(
                "task %s refused: %s", assignment.task_id, refusal, extra=self._fields(assignment)
            )
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
            exposed=self.options.sandbox_read_only_paths,
            task_user=self.options.task_user,
        )
        holder: list[_Running] = []
        execution = executing.Execution(
            request,
            base_env=self._base_env,
            workdirs=self._workdirs,
            contain=self.containment,
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
        if log.isEnabledFor(logging.INFO):
            log.info(
                "task %s attempt %d %s in %d ms%s",
                a.task_id,
                a.attempt,
                "aborted" if run.aborted else outcome.status,
                outcome.duration_ms,
                f" (exit code {outcome.exit_code})" if outcome.exit_code else "",
                extra=self._fields(a),
            )
        await run.execution.cleanup()  # after the report: its latency is nobody's

    def _fields(self, a: messages.TaskAssignment) -> dict[str, object]:
        """The structured fields of a task's log lines (JSON logs carry them as keys)."""
        return {
            "task_id": a.task_id,
            "attempt": a.attempt,
            "worker_id": self.worker_id or self.options.name,
            "request_id": a.request_id,
        }

    def _report(self, a: messages.TaskAssignment, outcome: executing.ExecResult) -> None:
        """Keep the result until the dispatcher acknowledges it, and send it now if we can."""
        result = messages.Result(
            task_id=a.task_id,
            attempt=a.attempt,
            status=outcome.status,
            exit_code=outcome.exit_code,
            duration_ms=outcome.duration_ms,
            stdout=outcome.stdout_bytes,
            stderr=outcome.stderr_bytes,
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
        # Rare: the dispatcher knows the levels this worker reported unavailable (an older
        # dispatcher, or a machine changed since the start, may still send one). Checked
        # once per level, by running bwrap: a few ms on the loop, then remembered.
        problem = (self.sandbox_unavailable or {}).get(level) or executing.unavailable(
            level, self.options.workdir_root
        )
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
        if not data:
            return
        run.pending.setdefault(stream, []).append(data)
        run.pending_bytes += len(data)
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
                    data=b"".join(parts),
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

    # -- draining --------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        """Stop taking tasks; let the running ones finish for up to `timeout` seconds, hand
        back the rest (re-queued, not counted as lost), and wait for the dispatcher to
        acknowledge the results — so a stopping worker drops no task."""
        self.draining = True
        self._send_nowait(messages.Drain())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.running:
            log.info("draining: waiting up to %gs for %d running tasks", timeout, len(self.running))
        while self.running and loop.time() < deadline:
            await asyncio.sleep(0.1)
        left = list(self.running.values())
        if left:
            log.warning("drain time is up: handing %d running tasks back", len(left))
            for run in left:
                run.aborted = True
                run.execution.cancel()
            refs = [
                messages.RunRef(task_id=r.assignment.task_id, attempt=r.assignment.attempt)
                for r in left
            ]
            self._send_nowait(messages.Release(runs=refs))
            await asyncio.gather(*list(self._exec_tasks), return_exceptions=True)
        # finished results must reach the dispatcher before we go
        settle = loop.time() + max(5.0, deadline - loop.time())
        while self.unacked and loop.time() < settle:
            await asyncio.sleep(0.1)
        if self.unacked:
            log.warning("stopping with %d unacknowledged results", len(self.unacked))

    # -- witnessing --------------------------------------------------------------------------
    async def _witness_forever(self) -> None:
        """Keep a witness session with every known dispatcher but the one we work for."""
        try:
            while True:
                # (one known dispatcher: nobody to witness for)
                wanted = (
                    {a for a in self.known if a not in (self._current, self.primary)}
                    if len(self.known) > 1
                    else set()
                )
                for addr in list(self._witnesses):
                    if addr not in wanted:
                        self._witnesses.pop(addr).cancel()
                for addr in wanted - set(self._witnesses):
                    self._witnesses[addr] = asyncio.create_task(
                        self._witness(addr), name=f"octaskly-witness-{addr}"
                    )
                await asyncio.sleep(WITNESS_INTERVAL)
        finally:
            tasks = list(self._witnesses.values())
            self._witnesses.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _witness(self, addr: str) -> None:
        while True:
            try:
                await self._witness_session(addr)
            except _Moved:
                pass
            except (ConnectionError, OSError, TimeoutError, errors.ProtocolError) as exc:
                log.debug("witness session with %s: %s", addr, exc or type(exc).__name__)
            await asyncio.sleep(WITNESS_INTERVAL)

    async def _witness_session(self, addr: str) -> None:
        host, port = _split(addr)
        timeout = self.options.connect_timeout
        conn = await p2p.dial(host, port, transport="tcp", timeout=timeout)
        try:
            welcome = await self._handshake(conn, witness=True)
            self._check_newer(addr, welcome.role, welcome.term)
            reader = asyncio.create_task(self._witness_read(addr, conn))
            try:
                loop = asyncio.get_running_loop()
                while not reader.done():
                    reachable = self._conn is not None
                    await conn.send(
                        messages.to_wire(
                            messages.Witness(
                                term=self.term,
                                primary=self.primary,
                                reachable=reachable,
                                silent_for=max(0.0, loop.time() - self._last_heard)
                                if self._last_heard
                                else 1e9,
                                primary_lsn=self._primary_lsn,
                                standby_synced=self._standby_synced,
                                population=self._population,
                            )
                        )
                    )
                    await asyncio.wait([reader], timeout=WITNESS_INTERVAL)
                reader.result()
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
        finally:
            conn.close()
            await conn.wait_closed()

    async def _witness_read(self, addr: str, conn: transport.Connection) -> None:
        while True:
            raw = await conn.recv()
            if raw is None:
                raise ConnectionError("closed")
            message = messages.parse_dispatcher_message(raw)
            if isinstance(message, messages.State):
                self._check_newer(addr, message.role, message.term)

    def _check_newer(self, addr: str, role: str, term: int) -> None:
        """A dispatcher we witness for is primary of a newer term: work for it now. (Not
        before our own first welcome: a witness session answering first must not pick the
        dispatcher for us — with several active dispatchers every one is "primary".)"""
        if role == "primary" and term > self.term and self.term > 0:
            log.warning("dispatcher %s is primary of term %d: moving there", addr, term)
            self._see_term(term, addr)
            self._preferred = addr
            self._nudge.set()
            conn = self._conn
            if conn is not None:
                conn.close()

    async def _shutdown(self) -> None:
        for run in list(self.running.values()):
            run.execution.cancel()
        tasks = list(self._exec_tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workdirs.close()
        self.containment.close()
