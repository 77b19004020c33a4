"""The dispatcher's side of worker connections: admission, sessions, heartbeats.

A worker proves the cluster key (protocol.auth), may be restricted by the whitelist, then
keeps one session. A reconnecting worker process (same name, same instance id) takes its
session over and keeps the runs it still holds; runs it does not report are lost and go
back to the queue. A session silent for `connection_timeout` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from octaskly import errors
from octaskly.domain import models, scheduling
from octaskly.protocol import auth, messages
from octaskly.services import auditing, fencer
from octaskly.transport import base as transport

if TYPE_CHECKING:
    from octaskly.services.dispatcher import Dispatcher, Run

log = logging.getLogger(__name__)
RESULT_RETRY_SECONDS = 2.0
"""How often a result the dispatcher could not save (disk full) is tried again."""


@dataclasses.dataclass(eq=False)
class Session:
    id: str
    hello: messages.Hello
    conn: transport.Connection
    connected_at: float
    last_seen: float
    runs: dict[str, Run] = dataclasses.field(default_factory=dict)
    draining: bool = False
    """The worker is stopping: it gets no new tasks."""
    outbox: asyncio.Queue[dict[str, Any] | None] = dataclasses.field(default_factory=asyncio.Queue)
    gone: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    """Set when the connection ended."""
    sandboxes: scheduling.Sandboxes = dataclasses.field(init=False)
    """The sandbox levels the worker can give its tasks (from its hello)."""

    def __post_init__(self) -> None:
        self.sandboxes = sandboxes(self.hello)

    def send(self, message: messages._Message) -> None:
        self.outbox.put_nowait(messages.to_wire(message))


def sandboxes(hello: messages.Hello) -> scheduling.Sandboxes:
    """The sandbox levels a worker reported it can give. A hello without the report: only
    the worker's own level is assumed, none stricter (tasks that need more wait for
    another worker rather than being refused by this one)."""
    minimum = hello.sandbox_level
    if hello.sandbox_unavailable is None:
        unavailable = {
            level: f"not reported by this worker (only its own level, {minimum.value}, is assumed)"
            for level in models.SandboxLevel
            if level.rank > minimum.rank
        }
    else:
        unavailable = {
            level: reason
            for level, reason in hello.sandbox_unavailable.items()
            if level.rank >= minimum.rank
        }
    return scheduling.Sandboxes(minimum, unavailable)


class Peers:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._d = dispatcher
        self.sessions: dict[str, Session] = {}
        self._handlers: set[asyncio.Task[Any]] = set()
        self._work_handlers: set[asyncio.Task[Any]] = set()
        # A worker's runs being re-queued after it left: its reconnect waits for that.
        self._leaving: dict[str, asyncio.Future[None]] = {}

    # -- views for the scheduler and the API ---------------------------------------------
    def slots(self) -> list[scheduling.WorkerSlot]:
        out = []
        for s in self.sessions.values():
            if s.draining:
                continue
            reqs = [r.ref.requirements for r in s.runs.values()]
            out.append(
                scheduling.WorkerSlot(
                    id=s.id,
                    capacity=s.hello.resources,
                    max_jobs=s.hello.max_jobs,
                    running=len(s.runs),
                    cpu_used=sum(r.cpu_cores for r in reqs),
                    memory_used=sum(r.memory_mb for r in reqs),
                    sandboxes=s.sandboxes,
                )
            )
        return out

    def offers(self) -> list[scheduling.WorkerSlot]:
        """Every connected worker (draining ones too) as what it could ever run: for
        telling why a task cannot run anywhere."""
        return [
            scheduling.WorkerSlot(
                id=s.id,
                capacity=s.hello.resources,
                max_jobs=s.hello.max_jobs,
                running=len(s.runs),
                accepting=not s.draining,
                sandboxes=s.sandboxes,
            )
            for s in self.sessions.values()
        ]

    def is_connected(self, worker_id: str) -> bool:
        return worker_id in self.sessions

    def views(self) -> list[dict[str, Any]]:
        now_wall, now_mono = time.time(), time.monotonic()
        return [
            {
                "id": s.id,
                "name": s.hello.name,
                "address": s.conn.peer,
                "version": s.hello.version,
                "resources": s.hello.resources.model_dump(),
                "max_jobs": s.hello.max_jobs,
                "current_jobs": len(s.runs),
                "sandbox_level": s.hello.sandbox_level.value,
                "sandbox_levels": [level.value for level in s.sandboxes.available()],
                "sandbox_unavailable": {
                    level.value: reason for level, reason in s.sandboxes.unavailable.items()
                },
                "state": (
                    models.WorkerState.DRAINING.value
                    if s.draining
                    else (models.WorkerState.BUSY if s.runs else models.WorkerState.IDLE).value
                ),
                "connected_at": s.connected_at,
                "last_heartbeat": now_wall - (now_mono - s.last_seen),
            }
            for s in sorted(self.sessions.values(), key=lambda s: s.id)
        ]

    # -- bookkeeping the dispatcher drives -------------------------------------------------
    def add_run(self, run: Run) -> None:
        self.sessions[run.worker_id].runs[run.task_id] = run

    def remove_run(self, run: Run) -> None:
        session = self.sessions.get(run.worker_id)
        if session is not None and session.runs.get(run.task_id) is run:
            del session.runs[run.task_id]

    def send_assign(self, worker_id: str, task: models.Task, attempt: int) -> None:
        spec = task.spec
        options = self._d.options
        # The cluster's [limits] defaults stand in for limits a task (or its preset) leaves
        # open; the worker fills what is still open with SPEC's defaults.
        preset = spec.limits_preset is not None
        cpu = spec.cpu_seconds or (None if preset else options.default_cpu_seconds)
        memory = spec.memory_limit_mb or (None if preset else options.default_memory_mb)
        self.sessions[worker_id].send(
            messages.Assign(
                task=messages.TaskAssignment(
                    task_id=task.id,
                    attempt=attempt,
                    command=spec.command,
                    env=spec.env,
                    timeout=task.timeout,
                    sandbox_level=spec.sandbox_level,
                    memory_limit_mb=memory,
                    cpu_seconds=cpu,
                    disk_limit_mb=spec.disk_limit_mb,
                    open_files_limit=spec.open_files_limit,
                    process_limit=spec.process_limit,
                    limits_preset=spec.limits_preset,
                    request_id=task.request_id,
                )
            )
        )

    def send_cancel(self, worker_id: str, task_id: str, attempt: int) -> None:
        session = self.sessions.get(worker_id)
        if session is not None:
            session.send(messages.Cancel(task_id=task_id, attempt=attempt))

    # -- connections ---------------------------------------------------------------------
    async def handle(self, conn: transport.Connection) -> None:
        """Serve one P2P connection from handshake to close: a worker, a worker's witness
        session, or a standby dispatcher."""
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            nonce = auth.new_nonce()
            challenged = time.monotonic()  # (a worker that answers it heard us after this)
            await conn.send(
                messages.to_wire(
                    messages.Challenge(protocol=messages.PROTOCOL_VERSION, nonce=nonce)
                )
            )
            raw = await asyncio.wait_for(conn.recv(), self._d.options.connection_timeout)
            if raw is None:
                return
            hello = messages.parse_worker_message(raw)
            if isinstance(hello, messages.ReplicaHello):
                key = await self._check_replica(conn, hello, nonce)
                if key is not None:
                    await self._d.ha.accept_replica(conn, hello, nonce, key)
            elif not isinstance(hello, messages.Hello):
                raise errors.ProtocolError(f"expected hello, got {hello.type}")
            elif hello.purpose == "witness":
                await self._witness(conn, hello, nonce)
            else:
                if task is not None:
                    self._work_handlers.add(task)
                session = await self._admit(conn, hello, nonce, challenged)
                if session is not None:
                    await self._serve(session)
        except (errors.ProtocolError, ConnectionError, TimeoutError, OSError) as exc:
            log.warning("dropping P2P connection from %s: %s", conn.peer, exc or type(exc).__name__)
        finally:
            if task is not None:
                self._handlers.discard(task)
                self._work_handlers.discard(task)

    async def _check_replica(
        self, conn: transport.Connection, hello: messages.ReplicaHello, nonce: str
    ) -> bytes | None:
        """A dispatcher asking to replicate must prove the cluster key too; the key it
        proved (None: refused)."""
        refusal, key = None, None
        if hello.protocol != messages.PROTOCOL_VERSION:
            refusal = f"unsupported protocol version {hello.protocol}"
        else:
            key = self._proof_ok(hello.name, hello.nonce, hello.proof, nonce, conn.binding)
            if key is None:
                refusal = "authentication failed: the dispatcher does not have this cluster's key"
        if refusal is None:
            conn.trust()
            return key
        log.warning("refused standby %r from %s: %s", hello.name, conn.peer, refusal)
        self._d.audit.record(
            "standby_rejected",
            action="replicate",
            severity="warning",
            actor=hello.name,
            details={"reason": refusal},
            source_ip=auditing.source_ip(conn.peer),
        )
        await conn.send(messages.to_wire(messages.Reject(reason=refusal)))
        return None

    def _proof_ok(
        self, name: str, worker_nonce: str, proof: str, nonce: str, binding: bytes
    ) -> bytes | None:
        """The accepted key (derived for P2P) the peer proved it has, or None."""
        return auth.first_key(
            self._d.keys.derived("p2p-auth", auth.derive_auth_key),
            lambda key: auth.worker_proof(
                key, dispatcher_nonce=nonce, worker_nonce=worker_nonce, name=name, binding=binding
            ),
            proof,
        )

    def _welcome(
        self,
        conn: transport.Connection,
        hello: messages.Hello,
        nonce: str,
        key: bytes,
        **fields: Any,
    ) -> messages.Welcome:
        """(proved with `key`, the one the worker used: during a key rotation a worker may
        not have the new key yet)"""
        ha = self._d.ha
        return messages.Welcome(
            worker_id=hello.name,
            proof=auth.dispatcher_proof(
                key,
                dispatcher_nonce=nonce,
                worker_nonce=hello.nonce,
                worker_id=hello.name,
                binding=conn.binding,
            ),
            keepalive_interval=self._d.options.keepalive_interval,
            term=ha.term,
            role="primary" if ha.role == "primary" else "standby",
            dispatchers=ha.peers() if ha.enabled else [],
            **fields,
        )

    async def _witness(self, conn: transport.Connection, hello: messages.Hello, nonce: str) -> None:
        """A worker reports, about once a second, whether it reaches the primary."""
        ha = self._d.ha
        key = self._proof_ok(hello.name, hello.nonce, hello.proof, nonce, conn.binding)
        if key is None:
            await conn.send(messages.to_wire(messages.Reject(reason="authentication failed")))
            return
        conn.trust()
        await conn.send(messages.to_wire(self._welcome(conn, hello, nonce, key)))
        if hello.term > ha.term:
            ha.observe_term(hello.term, hello.primary)
        ha.witness_conns.add(conn)
        try:
            while True:
                raw = await asyncio.wait_for(conn.recv(), self._d.options.connection_timeout)
                if raw is None:
                    return
                report = messages.parse_worker_message(raw)
                if not isinstance(report, messages.Witness):
                    raise errors.ProtocolError(f"expected witness, got {report.type}")
                ha.on_witness(hello.name, report)
        finally:
            ha.witness_conns.discard(conn)

    async def _admit(
        self, conn: transport.Connection, hello: messages.Hello, nonce: str, challenged: float
    ) -> Session | None:
        ha = self._d.ha
        if ha.role != "primary" or ha.switching:
            if self._proof_ok(hello.name, hello.nonce, hello.proof, nonce, conn.binding):
                if hello.term > ha.term:
                    ha.observe_term(hello.term, hello.primary)
                primary = None if ha.role == "primary" else ha.primary_address
                await conn.send(
                    messages.to_wire(
                        messages.Redirect(
                            term=ha.term, primary=primary, reason=f"{ha.name} is not the primary"
                        )
                    )
                )
                return None
        elif hello.term > ha.term and self._proof_ok(
            hello.name, hello.nonce, hello.proof, nonce, conn.binding
        ):
            # this worker has seen a newer primary: we are the stale one
            ha.observe_term(hello.term, hello.primary)
            await conn.send(
                messages.to_wire(
                    messages.Redirect(
                        term=hello.term, primary=hello.primary, reason="a newer primary exists"
                    )
                )
            )
            return None
        key = self._proof_ok(hello.name, hello.nonce, hello.proof, nonce, conn.binding)
        refusal = self._refusal(hello, key)
        if refusal is not None or key is None:
            refusal = refusal or "authentication failed"
            log.warning("refused worker %r from %s: %s", hello.name, conn.peer, refusal)
            self._d.audit.record(
                "worker_rejected",
                action="join",
                severity="warning",
                actor=hello.name,
                details={"reason": refusal, "transport": conn.kind},
                source_ip=auditing.source_ip(conn.peer),
            )
            await conn.send(messages.to_wire(messages.Reject(reason=refusal)))
            return None
        conn.trust()
        now = time.monotonic()
        session = Session(hello.name, hello, conn, time.time(), now)
        abort = await self._reconcile(session)
        self.sessions[session.id] = session
        self._d.ha.fencer.joined(session.id, heard_at=challenged)
        await conn.send(messages.to_wire(self._welcome(conn, hello, nonce, key, abort=abort)))
        self._d.audit.record(
            "worker_joined",
            action="join",
            actor=session.id,
            details={"transport": conn.kind, "version": hello.version},
            source_ip=auditing.source_ip(conn.peer),
        )
        log.info(
            "worker %s joined from %s over %s (%g cores, %d MB, max_jobs %d, sandbox levels %s)",
            session.id,
            conn.peer,
            conn.kind,
            hello.resources.cpu_cores,
            hello.resources.memory_mb,
            hello.max_jobs,
            ", ".join(level.value for level in session.sandboxes.available()) or "none usable",
        )
        self._d.on_workers_changed()
        return session

    def _refusal(self, hello: messages.Hello, key: bytes | None) -> str | None:
        if hello.protocol != messages.PROTOCOL_VERSION:
            return f"unsupported protocol version {hello.protocol}"
        if key is None:
            return "authentication failed: the worker does not have this cluster's secret key"
        whitelist = self._d.options.whitelist
        if whitelist and hello.name not in whitelist:
            return f"worker {hello.name!r} is not in the dispatcher's whitelist"
        existing = self.sessions.get(hello.name)
        if existing is not None and existing.hello.instance != hello.instance:
            return f"another worker named {hello.name!r} is already connected"
        return None

    async def _reconcile(self, session: Session) -> list[messages.RunRef]:
        """Keep the runs the worker still holds; re-attach re-queued ones; abort the rest."""
        leaving = self._leaving.get(session.id)
        if leaving is not None:  # its runs are still being re-queued: let that finish
            await asyncio.shield(leaving)
        old = self.sessions.pop(session.id, None)
        held = {r.task_id: r.attempt for r in (*session.hello.running, *session.hello.finished)}
        finished = {r.task_id for r in session.hello.finished}
        previous: dict[str, Run] = dict(old.runs) if old is not None else {}
        if old is not None:
            old.runs.clear()
            old.conn.close()
        abort = []
        for task_id, attempt in held.items():
            run = self._d.runs.get(task_id)
            if run is not None and run.worker_id == session.id and run.attempt == attempt:
                session.runs[task_id] = run
                previous.pop(task_id, None)
            elif run is None and (taken := await self._d.reattach(session.id, task_id, attempt)):
                session.runs[task_id] = taken
            elif task_id not in finished:
                abort.append(messages.RunRef(task_id=task_id, attempt=attempt))
        if previous:
            await self._d.on_lost(list(previous.values()), f"worker {session.id} reconnected")
        return abort

    async def _serve(self, session: Session) -> None:
        sender = asyncio.create_task(self._send_forever(session), name=f"send-{session.id}")
        pending: set[asyncio.Task[None]] = set()
        reason = "connection closed"
        try:
            while True:
                raw = await session.conn.recv()
                if raw is None:
                    break
                session.last_seen = time.monotonic()
                await self._handle(session, messages.parse_worker_message(raw), pending)
        except errors.ProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning("worker %s sent a bad frame, disconnecting: %s", session.id, exc)
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc or type(exc).__name__}"
        finally:
            session.gone.set()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            session.outbox.put_nowait(None)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await self._leave(session, reason)

    async def _handle(
        self, session: Session, message: messages.WorkerMessage, pending: set[asyncio.Task[None]]
    ) -> None:
        if isinstance(message, messages.Result):
            t = asyncio.create_task(self._on_result(session, message))
            pending.add(t)
            t.add_done_callback(pending.discard)
        elif isinstance(message, messages.Output):
            if not self._d.on_output(
                session.id, message.task_id, message.attempt, message.stream, message.data
            ):
                session.send(messages.Cancel(task_id=message.task_id, attempt=message.attempt))
        elif isinstance(message, messages.Drain):
            if not session.draining:
                log.info("worker %s is draining: no new tasks for it", session.id)
            session.draining = True
        elif isinstance(message, messages.Release):
            await self._release(session, message.runs)
        elif isinstance(message, messages.StateAck):
            self._d.ha.fencer.confirmed(session.id, message.seq)
        elif isinstance(message, messages.Hello):
            raise errors.ProtocolError("hello sent twice")

    async def _release(self, session: Session, refs: list[messages.RunRef]) -> None:
        runs = [
            run
            for ref in refs
            if (run := session.runs.get(ref.task_id)) is not None and run.attempt == ref.attempt
        ]
        if runs:
            await self._d.on_released(runs, f"worker {session.id} handed them back (drained)")

    async def _on_result(self, session: Session, result: messages.Result) -> None:
        tries = 0
        while True:
            try:
                await self._d.on_result(session.id, result)
                break
            except errors.StorageFullError as exc:
                # Not saved, so not acknowledged: the worker keeps the result (and sends it
                # again if it reconnects); try again while it is connected.
                if not tries:
                    log.warning(
                        "result of task %s attempt %d not saved; retrying every %gs: %s",
                        result.task_id,
                        result.attempt,
                        RESULT_RETRY_SECONDS,
                        exc,
                    )
                tries += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(session.gone.wait(), RESULT_RETRY_SECONDS)
                if session.gone.is_set():
                    return
        # acknowledged (the worker forgets it) only once durable, with sync replication
        # on the standby too: a failover right now loses no finished work; a fenced
        # primary acknowledges nothing (the worker keeps it for whoever is primary)
        while True:
            try:
                await self._d.replicated()
                break
            except fencer.FencedError as exc:
                log.warning("result of task %s not acknowledged: %s", result.task_id, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(session.gone.wait(), RESULT_RETRY_SECONDS)
                if session.gone.is_set():
                    return
        session.send(messages.ResultAck(task_id=result.task_id, attempt=result.attempt))

    async def _send_forever(self, session: Session) -> None:
        """Write what is queued for the worker, all of it in one go (one syscall)."""
        while True:
            batch = [await session.outbox.get()]
            while not session.outbox.empty() and batch[-1] is not None:
                batch.append(session.outbox.get_nowait())
            closing = batch[-1] is None
            frames = [m for m in batch if m is not None]
            try:
                if frames:
                    await session.conn.send_many(frames)
            except (ConnectionError, OSError):
                session.conn.close()
                return
            if closing:
                return

    async def _leave(self, session: Session, reason: str) -> None:
        if self.sessions.get(session.id) is not session:
            return  # replaced by a reconnect of the same worker; its runs moved over
        del self.sessions[session.id]
        self._d.ha.fencer.left(session.id)
        log.info("worker %s left: %s", session.id, reason)
        self._d.audit.record(
            "worker_left",
            action="leave",
            actor=session.id,
            details={"reason": reason, "running": len(session.runs)},
            source_ip=auditing.source_ip(session.conn.peer),
        )
        runs = list(session.runs.values())
        session.runs.clear()
        done = self._leaving[session.id] = asyncio.get_running_loop().create_future()
        try:
            await self._d.on_lost(runs, f"worker {session.id} left: {reason}")
        finally:
            done.set_result(None)
            if self._leaving.get(session.id) is done:
                del self._leaving[session.id]
        self._d.on_workers_changed()

    async def reap_forever(self) -> None:
        """Close sessions that stopped heart-beating; their runs are then re-queued."""
        interval = self._d.options.keepalive_interval
        while True:
            await asyncio.sleep(interval)
            cutoff = time.monotonic() - self._d.options.connection_timeout
            for session in list(self.sessions.values()):
                if session.last_seen < cutoff:
                    log.warning(
                        "worker %s missed heartbeats for %.1fs; disconnecting",
                        session.id,
                        time.monotonic() - session.last_seen,
                    )
                    session.conn.close()

    async def announce_forever(self) -> None:
        """Every state interval (a second at most), tell every worker this primary's term
        and peers: its sign of life, how a worker learns of the standby it should witness
        for, and, confirmed by each worker, what fencing counts (services.fencer)."""
        self._d.ha.fencer.broadcast = self.broadcast
        while True:
            await asyncio.sleep(self._d.ha.fencer.timing.state_interval)
            self.broadcast()

    def broadcast(self) -> None:
        """Send every worker a new numbered State now."""
        if not self.sessions:
            return
        state = self._d.ha.fencer.announce()
        for session in list(self.sessions.values()):
            session.send(state)

    async def close_all(self, redirect: messages.Redirect | None = None) -> None:
        """Close every connection; with `redirect` (stepping down), only the workers'
        sessions, each told where to go first."""
        sessions = list(self.sessions.values())
        if redirect is not None:
            frame = messages.to_wire(redirect)
            await asyncio.gather(
                *(asyncio.wait_for(s.conn.send(frame), 1.0) for s in sessions),
                return_exceptions=True,
            )
        for session in sessions:
            session.conn.close()
        handlers = list(self._work_handlers if redirect is not None else self._handlers)
        if redirect is not None and handlers:
            # workers' handlers end by themselves once their connections closed
            await asyncio.wait(handlers, timeout=5.0)
        for h in handlers:
            h.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
