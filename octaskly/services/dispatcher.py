"""The dispatcher service: the durable queue, scheduling, and the task operations the API
exposes. Worker connections are handled in `peering`; storage sits behind `store.base`.

Invariants:
- a task is acknowledged only after `store.insert_tasks` returned (committed);
- the in-memory `runs` map is the authority on which attempt of a task may report a
  result; a result for any other attempt is rejected (the attempt number is a lease);
- every state change of a task notifies its watchers (followers of its logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from octaskly import __version__, errors, keyring
from octaskly.domain import models, queueing, scheduling
from octaskly.protocol import messages
from octaskly.services import auditing, federation, fencer, ha, live, metrics, peering, tokens
from octaskly.store import base as store_base

log = logging.getLogger(__name__)
SCAN_LIMIT = 64
KEY_CHECK_SECONDS = 2.0
STORAGE_RETRY_SECONDS = 2.0
FENCE_RECHECK_SECONDS = 0.1
"""How often held-back assignments look whether the fence is down."""
"""How long scheduling pauses after the disk filled up before it tries again."""
PRUNE_SECONDS = 60.0
"""How often finished tasks past their retention are deleted (and once PRUNE_FIRST_SECONDS
after becoming primary); more often when the retention itself is short."""
PRUNE_FIRST_SECONDS = 5.0
RUNNING = models.TaskStatus.RUNNING
QUEUED = models.TaskStatus.QUEUED


@dataclasses.dataclass(frozen=True)
class Options:
    """What the dispatcher needs from the configuration (built by the CLI)."""

    secret_key: bytes
    whitelist: frozenset[str] = frozenset()
    keys: keyring.Keyring | None = None
    """The key file's keys (re-read when it changes); None: just `secret_key`."""
    default_timeout: int = 3600
    default_cpu_seconds: int | None = None
    """CPU seconds for tasks that set none ([limits] default_cpu_seconds)."""
    default_memory_mb: int | None = None
    """Memory (MB) for tasks that set none ([limits] default_memory_mb)."""
    task_queue_size: int = 1_000_000
    keepalive_interval: float = 5.0
    connection_timeout: float = 15.0
    output_limit: int = 1 << 20
    policy: scheduling.Policy = dataclasses.field(default_factory=scheduling.Policy)
    queue_window: int = 4096
    ha: ha.Options = dataclasses.field(default_factory=ha.Options)
    """Role, replication and failover (see services.ha)."""
    federation: federation.Options = dataclasses.field(default_factory=federation.Options)
    """Leases and addresses when several dispatchers share a PostgreSQL database."""
    audit_path: Path | None = None
    """Where the audit log goes (`<data dir>/logs/audit.log`); None: audit logging off."""
    audit_retention_days: int | None = None
    """Prune audit entries older than this (checked at start and hourly); None: keep all."""
    task_retention_hours: float = 0
    """Delete finished tasks this many hours after they finished ([storage]
    task_retention_hours; checked every PRUNE_SECONDS by the primary); 0: keep all."""
    client_min_sandbox_level: models.SandboxLevel = models.SandboxLevel.STRICT
    """The least sandbox level of a task submitted with a `client` token ([dispatcher]
    client_min_sandbox_level; applied by the API at submit)."""


@dataclasses.dataclass(slots=True)
class Run:
    """One attempt of a task in progress on a worker."""

    task_id: str
    worker_id: str
    attempt: int
    ref: queueing.Ref
    retry_count: int
    lost_count: int
    started_at: float


class Dispatcher:
    def __init__(
        self,
        *,
        options: Options,
        store: store_base.Store,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options
        self.store = store
        self.clock = clock
        self.queue = queueing.TaskQueue(window=options.queue_window)
        self.runs: dict[str, Run] = {}
        self.outputs: dict[str, live.LiveOutput] = {}
        self.watchers = live.Watchers()
        self.keys = options.keys or keyring.Keyring([options.secret_key])
        self.audit = auditing.AuditLog(options.audit_path, options.secret_key)
        self.tokens = tokens.Tokens(self.keys, store, clock)
        self.peers = peering.Peers(self)
        self.ha = ha.HA(self, options.ha)
        self.federation = federation.Federation(self, options.federation)
        self.metrics = metrics.Metrics()
        self._hook_commits(store)
        self.queued_count = 0
        self.started_at = clock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._primary_tasks: list[asyncio.Task[None]] = []
        self._stepping_down = False
        self._tokens_reload: asyncio.Task[None] | None = None
        self._due_handle: asyncio.TimerHandle | None = None
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        self.failure: BaseException | None = None
        self.stopped = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------
    @property
    def role(self) -> str:
        """ "primary" (serves) or "standby" (replicates; the API answers 503)."""
        return self.ha.role

    async def start(self) -> None:
        self.audit.open()
        await self.store.open()
        await self.tokens.load()
        await self.federation.register()
        await self.ha.start()
        if self.keys.path is not None:
            self.spawn(self._watch_keys_forever(), "key-file-watch")
        if self.options.audit_path is not None and self.options.audit_retention_days:
            self.spawn(self._prune_audit_forever(), "audit-retention")

    async def start_primary(self) -> None:
        """Serve as the primary: recover what was running, schedule, watch heartbeats."""
        self._stepping_down = False
        self.queue = queueing.TaskQueue(window=self.options.queue_window)
        self.runs.clear()
        self.outputs.clear()
        counts = await self.store.count_by_status()
        await self._recover_running()
        self.queued_count = counts[QUEUED] + counts[RUNNING]
        self._primary_tasks = [
            self.spawn(self._schedule_forever(), "scheduler"),
            self.spawn(self.peers.reap_forever(), "heartbeat-reaper"),
            self.spawn(self.peers.announce_forever(), "state-announcer"),
        ]
        if self.options.task_retention_hours > 0:
            self._primary_tasks.append(self.spawn(self._prune_tasks_forever(), "task-retention"))
        self.federation.start()
        self.wake()

    async def stop_primary(self, redirect: messages.Redirect) -> None:
        """Stop serving (stepping down to standby): finish the scheduling round in hand,
        send workers to `redirect`, flush every write. Runs stay `running` in the database:
        the next primary re-attaches them when their workers reconnect."""
        self._stepping_down = True
        tasks = list(self._primary_tasks)
        if tasks:
            scheduler, *others = tasks
            for task in others:
                task.cancel()
            self.wake()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(scheduler), 5.0)
            scheduler.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            with contextlib.suppress(ValueError):
                self._tasks.remove(task)
        self._primary_tasks = []
        await self.peers.close_all(redirect)
        await self.store.barrier()
        if self._due_handle:
            self._due_handle.cancel()
            self._due_handle = None
        self.queue = queueing.TaskQueue(window=self.options.queue_window)
        for out in self.outputs.values():
            out.close()
        self.runs.clear()
        self.outputs.clear()
        self.queued_count = 0

    def _hook_commits(self, store: store_base.Store) -> None:
        if hasattr(store, "on_commit"):
            store.on_commit = self.metrics.commit.observe

    async def replace_store(self, store: store_base.Store) -> None:
        """A standby installed a snapshot: use the new database from now on."""
        self.store = store
        self._hook_commits(store)
        self.tokens.use_store(store)
        await self.tokens.load()

    def reload_tokens_soon(self) -> None:
        """Replicated token changes (revocations) take effect on this standby too."""
        if self._tokens_reload is None or self._tokens_reload.done():
            self._tokens_reload = asyncio.get_running_loop().create_task(self.tokens.load())

    async def replicated(self) -> None:
        """Return once every write made so far may be acknowledged: with sync replication
        the standby has it; without the standby, a majority of witnesses know it lacks it.
        FencedError (503) when this primary may have been replaced (services.fencer)."""
        source = self.ha.source
        lsn = self.ha.store.position.lsn if self.ha.enabled else 0
        if source is not None and source.sync:
            await source.wait(lsn)
        await self.ha.fencer.acknowledge(lsn)

    async def _watch_keys_forever(self) -> None:
        """A rotated key file (a Kubernetes Secret is updated in place) takes effect
        without a restart: new keys are accepted, the first becomes current."""
        while True:
            await asyncio.sleep(KEY_CHECK_SECONDS)
            if self.keys.reload_if_changed():
                self.audit.record(
                    "config_change",
                    action="reload keys",
                    actor="dispatcher",
                    details={"file": str(self.keys.path), "keys": len(self.keys.accepted)},
                )

    async def _prune_audit_forever(self) -> None:
        days = self.options.audit_retention_days
        assert days
        while True:
            pruned = self.audit.prune(self.clock() - days * 86400)
            if pruned:
                log.info("audit log: pruned %d entries older than %d days", pruned, days)
            await asyncio.sleep(3600)

    async def prune_tasks(self) -> int:
        """Delete the finished tasks older than the retention; return how many."""
        hours = self.options.task_retention_hours
        if hours <= 0:
            return 0
        pruned = await self.store.prune_tasks(self.clock() - hours * 3600)
        if pruned:
            self.metrics.pruned.inc(pruned)
            log.info(
                "retention: deleted %d tasks that finished more than %g hours ago", pruned, hours
            )
        return pruned

    async def _prune_tasks_forever(self) -> None:
        # a short retention (tests, benchmarks) is enforced more often than every minute
        interval = min(PRUNE_SECONDS, max(0.2, self.options.task_retention_hours * 900))
        await asyncio.sleep(min(PRUNE_FIRST_SECONDS, interval))
        while True:
            try:
                await self.prune_tasks()
            except errors.StorageError as exc:  # a full disk, say: try again next time
                log.warning("retention: could not delete finished tasks: %s", exc)
            await asyncio.sleep(interval)

    def spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        """Run a background task that must not end while the dispatcher runs."""
        task = asyncio.get_running_loop().create_task(coro, name=f"octaskly-{name}")
        task.add_done_callback(self._on_side_task_done)
        self._tasks.append(task)
        return task

    def _on_side_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (task in self._primary_tasks and self._stepping_down):
            return
        exc = task.exception()
        self.failure = exc or RuntimeError(f"{task.get_name()} ended unexpectedly")
        log.error("background task %s died: %r; shutting down", task.get_name(), self.failure)
        self.stopped.set()

    async def stop(self) -> None:
        if self._due_handle:
            self._due_handle.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._tokens_reload is not None:
            self._tokens_reload.cancel()
        await self.ha.stop()
        # Runs stay `running` in the database: their workers report them to whichever
        # dispatcher they reach next (this one restarted, another member of a federation)
        # and re-attach them; re-queueing them here would let another worker start them
        # while the first still runs them.
        self._stepping_down = True
        await self.peers.close_all()
        await self.federation.stop()
        await self.store.close()
        self.audit.close()
        self.stopped.set()

    async def _recover_running(self) -> None:
        """Tasks that were running when the dispatcher stopped go back to the queue.

        They wait a short grace before they may run again, so a worker still running one
        can reconnect and report it (it is then re-attached instead of run twice).
        """
        if self.federation.enabled:  # the others' runs are theirs
            running = await self.federation.store.owned_running_tasks()
        else:
            running = await self.store.running_tasks()
        if not running:
            return
        grace = self.clock() + 2 * self.options.keepalive_interval
        await self.store.apply(
            [
                store_base.TaskUpdate(
                    t.id, {"status": QUEUED, "not_before": grace}, expect_status=RUNNING
                )
                for t in running
            ]
        )
        log.info(
            "re-queued %d tasks found running (after a restart or failover); their workers "
            "have %gs to report back before they run again",
            len(running),
            2 * self.options.keepalive_interval,
        )

    # -- submitting -----------------------------------------------------------------
    async def submit(
        self,
        specs: Sequence[models.TaskSpec],
        *,
        owner: str | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
    ) -> tuple[list[models.Task], bool]:
        """Queue tasks durably; return them and whether they were created just now.

        With an idempotency key, a repeated request returns the tasks the first one made.
        """
        keys = _idempotency_keys(idempotency_key, len(specs))
        if keys:
            existing = await self._find_idempotent(owner, keys)
            if existing is not None:
                return existing, False
        if self.queued_count + len(specs) > self.options.task_queue_size:
            raise errors.QueueFullError(
                f"queue is full ({self.options.task_queue_size} tasks); retry later", delay=1.0
            )
        now = self.clock()
        tasks = [
            models.Task(
                id=models.new_task_id(),
                spec=spec,
                timeout=spec.timeout or self.options.default_timeout,
                created_at=now,
                owner=owner,
                idempotency_key=keys[i] if keys else None,
                request_id=request_id,
            )
            for i, spec in enumerate(specs)
        ]
        try:
            seqs = await self.store.insert_tasks(tasks)
        except store_base.DuplicateIdempotencyKey:
            found = await self._find_idempotent(owner, keys)
            if found is None:  # another request's key, e.g. "K#1" of a single submit
                raise _idempotency_conflict(idempotency_key) from None
            return found, False
        self.queued_count += len(tasks)
        self.metrics.submitted.inc(len(tasks))
        for task, seq in zip(tasks, seqs, strict=True):
            task.queue_seq = seq
            self.queue.push_new(_candidate(task))
            self.watchers.feed.publish(task.id)
        self.wake()
        await self.replicated()  # sync replication: acknowledged once the standby has it
        return tasks, True

    async def _find_idempotent(
        self, owner: str | None, keys: list[str]
    ) -> list[models.Task] | None:
        first = await self.store.find_by_idempotency_key(owner, keys[0])
        if first is None:
            return None
        found = [first]
        for key in keys[1:]:
            task = await self.store.find_by_idempotency_key(owner, key)
            if task is not None:
                found.append(task)
        if len(found) != len(keys):  # a batch is stored whole: this is not its replay
            raise _idempotency_conflict(keys[0].rpartition("#")[0] or keys[0])
        return found

    # -- reading --------------------------------------------------------------------------
    async def get(self, task_id: str, *, owner: str | None = None) -> models.Task:
        task = await self.store.get_task(task_id)
        if task is None or (owner is not None and task.owner != owner):
            raise errors.NotFoundError(f"task {task_id} not found")
        return task

    async def with_output_so_far(self, task: models.Task) -> tuple[models.Task, live.OutputSource]:
        """The task with the output its running attempt has written so far, when this
        dispatcher receives it ("live"); as stored otherwise ("store": a finished task's
        tail, or a queued one's from its previous attempt). "unavailable": the task runs
        but its output does not come here — another dispatcher of a federation receives
        it, or its worker has not reconnected since this dispatcher started — so only what
        the store has is shown. After a failover or a re-attach, the output so far begins
        where this dispatcher started to receive it."""
        if task.status != RUNNING:
            return task, "store"
        out = self.outputs.get(task.id)
        if out is None or out.attempt != task.attempts:
            # The run may have just ended here, its result being written: wait for that.
            await self.store.barrier()
            task = await self.get(task.id)
            out = self.outputs.get(task.id)
            if task.status != RUNNING:
                return task, "store"
            if out is None or out.attempt != task.attempts:
                return task, "unavailable"
        stdout, stdout_dropped = out.so_far("stdout")
        stderr, stderr_dropped = out.so_far("stderr")
        changes = {
            "stdout": stdout,
            "stderr": stderr,
            "stdout_dropped": stdout_dropped,
            "stderr_dropped": stderr_dropped,
        }
        return task.model_copy(update=changes), "live"

    def waiting_reason(self, task: models.Task) -> str | None:
        """Why a queued task is not running yet, if the dispatcher can tell."""
        if task.status != QUEUED:
            return None
        parked = self.queue.parked_reason(task.id)
        if parked:
            return parked
        if task.not_before and task.not_before > self.clock():
            return "waiting to retry after a failure"
        return scheduling.unfit_reason(
            task.spec.requirements, self.peers.offers(), task.spec.sandbox_level
        )

    async def list_tasks(
        self,
        *,
        status: models.TaskStatus | None = None,
        worker_id: str | None = None,
        owner: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> store_base.TaskPage:
        return await self.store.list_tasks(
            status=status, worker_id=worker_id, owner=owner, limit=limit, offset=offset
        )

    # -- cancelling --------------------------------------------------------------------------
    async def cancel(self, task_id: str, *, owner: str | None = None) -> models.Task:
        """Cancel a queued or running task durably; a running one is killed on its worker."""
        for _ in range(5):
            task = await self.get(task_id, owner=owner)
            if task.status.is_terminal:
                raise errors.ConflictError(f"task {task_id} already finished ({task.status})")
            run = self.runs.get(task_id)
            now = self.clock()
            changes = {
                "status": models.TaskStatus.CANCELLED,
                "completed_at": now,
                "error": "cancelled",
            }
            if run is not None:
                update = store_base.TaskUpdate(
                    task_id, changes, expect_status=RUNNING, expect_attempts=run.attempt
                )
            elif task.status == RUNNING and self.federation.enabled:
                # another dispatcher runs it: it hears of the cancel and stops the run
                update = store_base.TaskUpdate(
                    task_id, changes, expect_status=RUNNING, expect_attempts=task.attempts
                )
            else:
                update = store_base.TaskUpdate(task_id, changes, expect_status=QUEUED)
            (applied,) = await self.store.apply([update])
            if not applied:
                continue  # it changed state meanwhile: look again
            self.metrics.finished.labels("cancelled").inc()
            if run is not None and self.runs.get(task_id) is run:
                self._end_run(run)
                self.peers.send_cancel(run.worker_id, task_id, run.attempt)
            elif run is None and task.status == QUEUED:
                self.queue.remove(task_id)
                self.queued_count -= 1
            self.watchers.notify(task_id)
            await self.replicated()
            return await self.get(task_id)
        raise errors.TemporaryError(f"task {task_id} keeps changing state; retry", delay=0.1)

    # -- following ----------------------------------------------------------------------------
    async def follow(
        self, task_id: str, *, owner: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield output chunks of a task as they come, across attempts, then an end event.

        A chunk is ``{"stream": "stdout" | "stderr", "data": bytes}``; the other events are
        ``attempt``, ``dropped`` (chunks were dropped before the follower read them) and
        ``end`` (status, exit code, error)."""
        await self.get(task_id, owner=owner)
        held: live.LiveOutput | None = None
        seq, streamed_attempt = 0, 0
        while True:
            changed = self.watchers.event(task_id)
            task = await self.get(task_id)
            out = self.outputs.get(task_id)
            if held is not None and held is not out:
                for chunk in held.since(seq)[0]:
                    yield {"stream": chunk.stream, "data": chunk.data}
                held = None
            if task.status.is_terminal:
                if streamed_attempt != task.attempts:
                    for event in _stored_output(task):
                        yield event
                yield {
                    "event": "end",
                    "status": task.status.value,
                    "exit_code": task.exit_code,
                    "error": task.error,
                }
                return
            if out is not None:
                if out is not held:
                    held, seq, streamed_attempt = out, 0, out.attempt
                    yield {"event": "attempt", "attempt": out.attempt}
                chunks, skipped = out.since(seq)
                if skipped:
                    yield {"event": "dropped"}
                for chunk in chunks:
                    yield {"stream": chunk.stream, "data": chunk.data}
                    seq = chunk.seq + 1
                if not out.closed:
                    await _first(changed.wait(), out.changed())
                    continue
            await changed.wait()

    # -- scheduling -------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def _schedule_forever(self) -> None:
        while not self._stepping_down:
            await self._wake.wait()
            self._wake.clear()
            if self._stepping_down:
                return
            try:
                await self.schedule_once()
            except errors.StorageFullError as exc:
                # the round's runs were taken back (_mark_running); reads and the API go on
                log.error("scheduling paused for %gs: %s", STORAGE_RETRY_SECONDS, exc)
                await asyncio.sleep(STORAGE_RETRY_SECONDS)
                self.wake()

    async def schedule_once(self) -> int:
        """One scheduling round; returns the number of tasks assigned (none while fenced:
        the fence's lifting wakes the scheduler)."""
        if self.ha.fencer.check() is not None:
            return 0
        now = self.clock()
        self._arm_due_timer(self.queue.release_due(now))
        await self._refill(now)
        candidates = self.queue.candidates(SCAN_LIMIT)
        if not candidates:
            return 0
        slots = self.peers.slots()
        assignments = scheduling.plan(candidates, slots, now, self.options.policy)
        self._park_unfit(candidates, assignments)
        if assignments:
            await self._dispatch(assignments)
            self.wake()  # there may be more to place
        return len(assignments)

    def _arm_due_timer(self, due: float | None) -> None:
        if self._due_handle:
            self._due_handle.cancel()
            self._due_handle = None
        if due is not None:
            delay = max(0.0, due - self.clock())
            self._due_handle = asyncio.get_running_loop().call_later(delay, self.wake)

    async def _refill(self, now: float) -> None:
        for priority in models.Priority:
            if not self.queue.needs_refill(priority):
                continue
            after, pushes = self.queue.refill_cursor(priority)
            limit = self.queue.window
            rows = await self.store.queued_refs(priority, after, limit)
            self.queue.refill(
                priority,
                [_ref_candidate(r) for r in rows],
                limit=limit,
                pushes=pushes,
                now=now,
                not_before={r.id: r.not_before for r in rows if r.not_before},
            )
            self._arm_due_timer(self.queue.release_due(now))

    def _park_unfit(
        self,
        candidates: dict[models.Priority, list[queueing.Ref]],
        assignments: list[scheduling.Assignment],
    ) -> None:
        offers = self.peers.offers()
        if not offers:
            return
        common = scheduling.common_levels(offers)
        assigned = {a.task_id for a in assignments}
        for refs in candidates.values():
            for ref in refs:
                if scheduling.runs_anywhere(ref, common):
                    continue  # fits any worker: waiting for a free slot, not unfit
                if ref.id not in assigned:
                    reason = scheduling.unfit_reason(ref.requirements, offers, ref.sandbox_level)
                    if reason:
                        self.queue.park(ref.id, reason)

    async def _dispatch(self, assignments: list[scheduling.Assignment]) -> None:
        tasks = {t.id: t for t in await self.store.get_tasks([a.task_id for a in assignments])}
        now = self.clock()
        updates = []
        sends: list[tuple[str, models.Task, int]] = []
        new_runs: list[Run] = []
        for a in assignments:
            task = tasks.get(a.task_id)
            ref = self.queue.remove(a.task_id)
            if ref is None or task is None or task.status != QUEUED:
                continue  # cancelled or changed while we read it
            if not self.peers.is_connected(a.worker_id):
                self.queue.requeue(ref)
                continue
            attempt = task.attempts + 1
            run = Run(
                a.task_id, a.worker_id, attempt, ref, task.spec.retry_count, task.lost_count, now
            )
            self.runs[a.task_id] = run
            new_runs.append(run)
            self.queued_count -= 1
            self.outputs[a.task_id] = live.LiveOutput(attempt, limit=self.options.output_limit)
            self.peers.add_run(run)
            updates.append(
                store_base.TaskUpdate(
                    a.task_id,
                    {
                        "status": RUNNING,
                        "attempts": attempt,
                        "worker_id": a.worker_id,
                        "started_at": now,
                        "not_before": None,
                    },
                    expect_status=QUEUED,
                    expect_attempts=task.attempts,  # (another dispatcher may have run it)
                )
            )
            sends.append((a.worker_id, task, attempt))
            self.metrics.assignments.inc()
            if attempt == 1:
                self.metrics.queue_wait.observe(max(0.0, now - task.created_at))
            self.audit.record(
                "task_started",
                action="assign",
                actor=a.worker_id,
                task_id=a.task_id,
                details={"attempt": attempt},
            )
        source = self.ha.source
        if self.federation.enabled:
            await self._claim_and_send(updates, new_runs, sends)
        elif source is not None and source.sync and source.synced:
            # Sync replication: the standby learns of each assignment before any worker
            # starts it, so after a failover no task runs twice.
            await self._mark_running(updates, new_runs)
            if not await self._replicated_or_unfenced():
                return  # (replaced meanwhile: the new primary owns these tasks)
            for worker_id, task, attempt in sends:
                if self.runs.get(task.id) is not None and self.peers.is_connected(worker_id):
                    self.peers.send_assign(worker_id, task, attempt)
        else:
            # The workers get their tasks at once; the running marks share one commit,
            for worker_id, task, attempt in sends:
                self.peers.send_assign(worker_id, task, attempt)
            await self._mark_running(updates, new_runs)
        # and watchers hear of the change only once a reader would see it.
        for update in updates:
            self.watchers.notify(update.task_id)

    async def _replicated_or_unfenced(self) -> bool:
        """Wait until this round's running marks may be acted on: replicated, or, fenced
        meanwhile, until the fence lifts (True) or this node stops being primary (False).
        The marks stay as they are: the runs are sent once the fence is down."""
        while True:
            try:
                await self.replicated()
                return True
            except fencer.FencedError as exc:
                log.warning("assignments held back: %s", exc)
            while self.ha.fencer.check() is not None:
                if self._stepping_down or self.role != "primary":
                    return False
                await asyncio.sleep(FENCE_RECHECK_SECONDS)
            if self._stepping_down or self.role != "primary":
                return False

    async def _claim_and_send(
        self,
        updates: list[store_base.TaskUpdate],
        runs: list[Run],
        sends: list[tuple[str, models.Task, int]],
    ) -> None:
        """Other dispatchers may be after the same tasks: the claims commit first (rows
        being claimed elsewhere are skipped), and only the tasks won are sent."""
        won = await self._mark_running(updates, runs, claim=True)
        for (worker_id, task, attempt), ok in zip(sends, won, strict=True):
            mine = self.runs.get(task.id)
            if not ok:
                if mine is not None and mine.attempt == attempt:
                    self._end_run(mine)
                    self.queued_count += 1  # (the next refresh counts it again)
            elif mine is not None and self.peers.is_connected(worker_id):
                self.peers.send_assign(worker_id, task, attempt)

    async def _mark_running(
        self, updates: list[store_base.TaskUpdate], runs: list[Run], *, claim: bool = False
    ) -> list[bool]:
        """Commit the running marks of new runs (as claims: skipping tasks another
        dispatcher is taking); which applied. On a full disk the runs are taken back
        (re-queued in memory, as the database still has them; their workers told to drop
        them) before the error is raised."""
        try:
            if claim:
                return await self.store.claim(updates)
            return await self.store.apply(updates)
        except errors.StorageFullError:
            for run in runs:
                if self.runs.get(run.task_id) is run:
                    self._end_run(run)
                    self.peers.send_cancel(run.worker_id, run.task_id, run.attempt)
                    self.queued_count += 1
                    self.queue.requeue(run.ref)
            raise

    # -- run outcomes (called by peering) ------------------------------------------------------
    def _end_run(self, run: Run) -> None:
        self.runs.pop(run.task_id, None)
        self.peers.remove_run(run)
        out = self.outputs.pop(run.task_id, None)
        if out is not None:
            out.close()
        self.wake()

    def on_output(
        self, worker_id: str, task_id: str, attempt: int, stream: str, data: bytes
    ) -> bool:
        run = self.runs.get(task_id)
        if run is None or run.worker_id != worker_id or run.attempt != attempt:
            return False
        out = self.outputs.get(task_id)
        if out is not None:
            out.append(stream, data)
        return True

    async def on_result(self, worker_id: str, result: Any) -> bool:
        """Record a run's result if its lease is still valid; True if it was accepted."""
        run = self.runs.get(result.task_id)
        if run is None or run.worker_id != worker_id or run.attempt != result.attempt:
            return await self._on_late_result(worker_id, result)
        self._end_run(run)
        try:
            return await self._record_result(
                run.ref, result, RUNNING, run.retry_count, run.lost_count, reporter=worker_id
            )
        except errors.StorageFullError:
            # not saved: the run goes on (as the database says) until its result is
            if run.task_id not in self.runs:
                self.runs[run.task_id] = run
                if self.peers.is_connected(run.worker_id):
                    self.peers.add_run(run)
            raise

    async def _on_late_result(self, worker_id: str, result: Any) -> bool:
        """A result for a run we had re-queued but not yet restarted is still good work."""
        task = await self.store.get_task(result.task_id)
        if (
            task is None
            or task.status != QUEUED
            or task.attempts not in (result.attempt, result.attempt - 1)
            or result.task_id in self.runs
        ):
            log.info(
                "rejected stale result of task %s attempt %s from %s",
                result.task_id,
                result.attempt,
                worker_id,
            )
            return False
        ref = self.queue.remove(task.id) or _candidate(task)
        self.queued_count -= 1
        try:
            ok = await self._record_result(
                ref,
                result,
                QUEUED,
                task.spec.retry_count,
                task.lost_count,
                worker_id=worker_id,
                reporter=worker_id,
                expect_attempts=task.attempts,
            )
        except errors.StorageFullError:
            self.queued_count += 1  # not saved: still queued (the result is tried again)
            self.queue.requeue(ref)
            raise
        if not ok:
            self.queued_count += 1
            self.queue.requeue(ref)
        return ok

    async def _record_result(
        self,
        ref: queueing.Ref,
        result: Any,
        expect: models.TaskStatus,
        retry_count: int,
        lost_count: int,
        worker_id: str | None = None,
        *,
        reporter: str,
        expect_attempts: int | None = None,
    ) -> bool:
        now = self.clock()
        outcome = scheduling.after_run(
            status=models.TaskStatus(result.status),
            attempts=result.attempt,
            lost_count=lost_count,
            retry_count=retry_count,
            now=now,
            policy=self.options.policy,
            error=result.error,
        )
        changes: dict[str, Any] = {
            "status": outcome.status,
            "exit_code": result.exit_code,
            "duration_ms": result.duration_ms,
            "stdout": result.stdout,
            "stderr": result.stderr,
            "stdout_dropped": result.stdout_dropped,
            "stderr_dropped": result.stderr_dropped,
            "error": outcome.error,
            "not_before": outcome.not_before,
            "completed_at": None if outcome.status == QUEUED else now,
        }
        if worker_id is not None:
            changes["worker_id"] = worker_id
        if expect_attempts is None:
            expect_attempts = result.attempt
        elif expect_attempts != result.attempt:
            changes["attempts"] = result.attempt  # its running mark was lost in a failover
        update = store_base.TaskUpdate(
            result.task_id, changes, expect_status=expect, expect_attempts=expect_attempts
        )
        (applied,) = await self.store.apply([update])
        if applied and outcome.status == QUEUED:
            self.queued_count += 1
            self.queue.requeue(ref, not_before=outcome.not_before)
            self._arm_due_timer(self.queue.release_due(now))
        if applied:
            status = models.TaskStatus(result.status).value
            self.metrics.finished.labels(status).inc()
            self.metrics.duration.labels(status).observe(result.duration_ms / 1000)
            self.audit.record(
                "task_finished",
                action="finish",
                actor=reporter,
                task_id=result.task_id,
                details={
                    "attempt": result.attempt,
                    "status": models.TaskStatus(result.status).value,
                    "exit_code": result.exit_code,
                    "next": outcome.status.value,
                },
            )
        self.watchers.notify(result.task_id)
        return applied

    async def on_lost(self, runs: Sequence[Run], reason: str) -> None:
        """Runs whose worker went away go back to the queue (or fail if lost too often)."""
        if self._stepping_down:
            return  # the next primary re-attaches them (or re-queues them after a grace)
        updates, requeue = [], []
        for run in runs:
            if self.runs.get(run.task_id) is not run:
                continue
            self._end_run(run)
            outcome = scheduling.after_lost(
                lost_count=run.lost_count + 1, policy=self.options.policy
            )
            changes: dict[str, Any] = {"status": outcome.status, "lost_count": run.lost_count + 1}
            if outcome.status == QUEUED:
                requeue.append(run)
            else:
                changes.update(completed_at=self.clock(), error=outcome.error)
            updates.append(
                store_base.TaskUpdate(
                    run.task_id,
                    changes,
                    expect_status=RUNNING,
                    expect_attempts=run.attempt,
                    owned=True,  # not if its worker re-attached it to another dispatcher
                )
            )
        if not updates:
            return
        log.warning("%d running tasks lost (%s)", len(updates), reason)
        applied = await self._apply_retrying(updates, "re-queue lost tasks")
        by_id = {u.task_id: ok for u, ok in zip(updates, applied, strict=True)}
        for run in requeue:
            if by_id.get(run.task_id):
                self.queued_count += 1
                self.queue.requeue(run.ref)
        for update in updates:
            self.watchers.notify(update.task_id)
        self.wake()

    async def _apply_retrying(
        self, updates: list[store_base.TaskUpdate], what: str
    ) -> Sequence[bool]:
        """Apply updates that must not be dropped (their runs are already ended in
        memory): on a full disk, try again every STORAGE_RETRY_SECONDS until space returns
        or the dispatcher stops — else the tasks would stay `running` until a restart."""
        warned = False
        while True:
            try:
                return await self.store.apply(updates)
            except errors.StorageFullError as exc:
                if not warned:
                    log.error(
                        "cannot %s yet, retrying every %gs: %s", what, STORAGE_RETRY_SECONDS, exc
                    )
                    warned = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopped.wait(), STORAGE_RETRY_SECONDS)
                if self.stopped.is_set():
                    raise

    async def on_released(self, runs: Sequence[Run], reason: str) -> None:
        """Runs a draining worker handed back unfinished go back to the queue as they were
        (not counted as lost: nothing went wrong)."""
        updates, released = [], []
        for run in runs:
            if self.runs.get(run.task_id) is not run:
                continue
            self._end_run(run)
            released.append(run)
            updates.append(
                store_base.TaskUpdate(
                    run.task_id,
                    {"status": QUEUED, "not_before": None},
                    expect_status=RUNNING,
                    expect_attempts=run.attempt,
                    owned=True,
                )
            )
        if not updates:
            return
        log.info("%d running tasks re-queued: %s", len(updates), reason)
        applied = await self._apply_retrying(updates, "re-queue handed-back tasks")
        for run, ok in zip(released, applied, strict=True):
            if ok:
                self.queued_count += 1
                self.queue.requeue(run.ref)
            self.watchers.notify(run.task_id)
        self.wake()

    async def reattach(self, worker_id: str, task_id: str, attempt: int) -> Run | None:
        """A reconnecting worker still holds an attempt we had re-queued: take it back
        instead of running the task again."""
        task = await self.store.get_task(task_id)
        if (
            task is not None
            and task.status == RUNNING
            and task.attempts == attempt
            and task_id not in self.runs
            and self.federation.enabled
        ):
            return await self._adopt(worker_id, task, attempt)
        if (
            task is None
            or task.status != QUEUED
            or task.attempts not in (attempt, attempt - 1)
            or task_id in self.runs
        ):
            return None
        # attempts == attempt - 1: the primary that assigned it died before its standby
        # had the running mark (async replication): the worker's run is the next attempt.
        update = store_base.TaskUpdate(
            task_id,
            {
                "status": RUNNING,
                "worker_id": worker_id,
                "not_before": None,
                "attempts": attempt,
                "started_at": task.started_at or self.clock(),
            },
            expect_status=QUEUED,
            expect_attempts=task.attempts,
        )
        (ok,) = await self.store.apply([update])
        if not ok or task_id in self.runs:
            return None
        ref = self.queue.remove(task_id) or _candidate(task)
        self.queued_count -= 1
        run = Run(
            task_id,
            worker_id,
            attempt,
            ref,
            task.spec.retry_count,
            task.lost_count,
            task.started_at or self.clock(),
        )
        self.runs[task_id] = run
        self.outputs[task_id] = live.LiveOutput(attempt, limit=self.options.output_limit)
        self.watchers.notify(task_id)
        log.info("re-attached task %s attempt %d to worker %s", task_id, attempt, worker_id)
        return run

    async def _adopt(self, worker_id: str, task: models.Task, attempt: int) -> Run | None:
        """A worker that moved here from another dispatcher (which died, or which it lost)
        still runs this attempt: the run becomes ours, it is not run again."""
        update = store_base.TaskUpdate(
            task.id,
            {"status": RUNNING, "worker_id": worker_id},
            expect_status=RUNNING,
            expect_attempts=attempt,
        )
        (ok,) = await self.store.apply([update])
        if not ok or task.id in self.runs:
            return None
        run = Run(
            task.id,
            worker_id,
            attempt,
            _candidate(task),
            task.spec.retry_count,
            task.lost_count,
            task.started_at or self.clock(),
        )
        self.runs[task.id] = run
        self.outputs[task.id] = live.LiveOutput(attempt, limit=self.options.output_limit)
        self.watchers.notify(task.id)
        log.info("took over task %s attempt %d with its worker %s", task.id, attempt, worker_id)
        return run

    def end_run(self, run: Run) -> None:
        """Forget a run another dispatcher ended or took (federation)."""
        if self.runs.get(run.task_id) is run:
            self._end_run(run)

    def on_workers_changed(self) -> None:
        if self.queue.unpark_all():
            log.info("a worker joined: parked tasks are considered again")
        self.wake()

    # -- introspection ----------------------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        counts = await self.store.count_by_status()
        depth = await self.store.queued_by_priority()
        workers = await self.federation.worker_views()  # (federated: every dispatcher's)
        busy = sum(1 for w in workers if w["current_jobs"] > 0)
        mem = self._process.memory_info().rss / (1024 * 1024)
        extra = {"federation": await self.federation.summary()} if self.federation.enabled else {}
        return {
            "workers": {"total": len(workers), "active": busy, "idle": len(workers) - busy},
            "tasks": {s.value: counts.get(s, 0) for s in models.TaskStatus},
            "queue": {p.label: depth.get(p, 0) for p in sorted(models.Priority, reverse=True)},
            "throughput": {"finished_total": self.metrics.finished_total()},
            "system": {
                "uptime_seconds": int(self.clock() - self.started_at),
                "memory_usage_mb": round(mem, 1),
                "cpu_usage_percent": self._process.cpu_percent(None),
            },
            "database": {
                "total_tasks": sum(counts.values()),
                "disk_size_mb": round(await self.store.size_bytes() / (1024 * 1024), 3),
            },
            "ha": self.ha_summary(),
            **extra,
        }

    def health(self) -> dict[str, Any]:
        """Liveness facts; status "degraded" (still 200) when replication is impaired."""
        degraded = self.ha.degraded()
        out = {
            "status": "degraded" if degraded else "healthy",
            "version": __version__,
            "uptime_seconds": int(self.clock() - self.started_at),
            "role": self.role,
            "term": self.ha.term,
        }
        if degraded:
            out["degraded_reason"] = degraded
        fenced = self.ha.fencer.describe()
        if fenced is not None:
            out["fenced"] = fenced
        return out

    def ha_summary(self) -> dict[str, Any]:
        status = self.ha.status()
        replication = status.get("replication") or {}
        return {
            "role": status["role"],
            "term": status["term"],
            "degraded": status.get("degraded"),
            "replication": replication.get("mode"),
            "synced": replication.get("synced"),
            "lag_records": replication.get("lag_records", 0),
            "lag_seconds": replication.get("lag_seconds", 0.0),
        }


def _idempotency_keys(key: str | None, count: int) -> list[str]:
    if key is None:
        return []
    return [key] if count == 1 else [f"{key}#{i}" for i in range(count)]


def _idempotency_conflict(key: str | None) -> errors.ConflictError:
    return errors.ConflictError(
        f"Idempotency-Key {key!r} was already used by a different request (a batch of "
        "another size, or a single task whose key is one of this batch's keys KEY#N)"
    )


def _stored_output(task: models.Task) -> list[dict[str, Any]]:
    """A finished task's stored output as follow events (for a follower who saw none of
    its last attempt live)."""
    events: list[dict[str, Any]] = []
    if task.stdout_dropped or task.stderr_dropped:
        events.append({"event": "dropped"})  # the stored tails begin after a cut
    for stream, data in (("stdout", task.stdout), ("stderr", task.stderr)):
        if data:
            events.append({"stream": stream, "data": data})
    return events


def _candidate(task: models.Task) -> queueing.Ref:
    spec = task.spec
    return scheduling.Candidate(
        task.id,
        task.queue_seq,
        spec.priority,
        task.created_at,
        spec.requirements,
        spec.sandbox_level,
    )


def _ref_candidate(ref: store_base.QueuedRef) -> queueing.Ref:
    return scheduling.Candidate(
        ref.id, ref.queue_seq, ref.priority, ref.created_at, ref.requirements, ref.sandbox_level
    )


async def _first(*aws: Any) -> None:
    """Wait until the first of several awaitables completes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
