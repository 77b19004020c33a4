"""Test helpers shipped with octaskly: an in-memory store and a task factory.

`InMemoryStore` implements `octaskly.store.base.Store` with the semantics of the SQLite
store (compare-and-set updates, owner-scoped idempotency keys, queue_seq assignment,
ordering, lifecycle errors) and no I/O, so services can be unit-tested without a disk.
The store contract tests (`tests/integration/test_store_contract.py`) run against both.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from octaskly import errors
from octaskly.domain import models
from octaskly.store import base


def new_task(command: str = "true", **fields: Any) -> models.Task:
    """A valid task for tests; keyword arguments override Task fields (`spec=` the spec)."""
    spec = fields.pop("spec", None) or models.TaskSpec(command=command)
    fields.setdefault("id", models.new_task_id())
    fields.setdefault("timeout", spec.timeout or 3600)
    fields.setdefault("created_at", time.time())
    return models.Task(spec=spec, **fields)


class InMemoryStore:
    """The Store interface in a dict. Writes apply at once; `apply_soon` too."""

    def __init__(self) -> None:
        self.commit_count = 0
        self._state: Literal["new", "open", "closed"] = "new"
        self._tasks: dict[str, models.Task] = {}
        self._inserted: dict[str, int] = {}  # task id -> insertion number (list tie-break)
        self._keys: dict[tuple[str, str], str] = {}  # (owner or '', key) -> task id
        self._next_seq = 1
        self._counter = itertools.count()
        self._tokens: dict[str, base.TokenRecord] = {}

    # -- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        """Start accepting calls (once)."""
        if self._state != "new":
            raise errors.StorageError("in-memory store was opened already")
        self._state = "open"

    async def close(self) -> None:
        """Refuse further calls. Calling it again does nothing."""
        self._state = "closed"

    def _ensure_open(self) -> None:
        if self._state != "open":
            state = "not open" if self._state == "new" else "closed"
            raise errors.StorageError(f"in-memory store is {state}")

    # -- writing --------------------------------------------------------------------------
    async def insert_tasks(self, tasks: Sequence[models.Task]) -> list[int]:
        """Insert all tasks or none; return their assigned queue_seq."""
        self._ensure_open()
        if not tasks:
            return []
        self._check_insertable(tasks)
        seqs = []
        for task in tasks:
            stored = task.model_copy(update={"queue_seq": self._next_seq})
            seqs.append(self._next_seq)
            self._next_seq += 1
            self._tasks[task.id] = stored
            self._inserted[task.id] = next(self._counter)
            if task.idempotency_key is not None:
                self._keys[(task.owner or "", task.idempotency_key)] = task.id
        self.commit_count += 1
        return seqs

    def _check_insertable(self, tasks: Sequence[models.Task]) -> None:
        ids: set[str] = set()
        keys: set[tuple[str, str]] = set()
        for task in tasks:
            if task.id in ids or task.id in self._tasks:
                raise errors.ConflictError(f"task id {task.id} exists already")
            ids.add(task.id)
            if task.idempotency_key is not None:
                key = (task.owner or "", task.idempotency_key)
                if key in keys or key in self._keys:
                    raise base.DuplicateIdempotencyKey(task.owner, task.idempotency_key)
                keys.add(key)

    async def apply(self, updates: Sequence[base.TaskUpdate]) -> list[bool]:
        """Apply updates, each only if its expectations hold; report which did."""
        self._ensure_open()
        return self._apply(updates)

    def apply_soon(self, updates: Sequence[base.TaskUpdate]) -> None:
        """Apply updates now (there is no commit to wait for)."""
        self._ensure_open()
        self._apply(updates)

    def _apply(self, updates: Sequence[base.TaskUpdate]) -> list[bool]:
        # Stage every change first, so an invalid value leaves nothing half-applied.
        staged: dict[str, models.Task] = {}
        applied = []
        for update in updates:
            current = staged.get(update.task_id) or self._tasks.get(update.task_id)
            ok = current is not None and _expected(current, update)
            if current is not None and ok:
                staged[update.task_id] = models.Task.model_validate(
                    {**dict(current), **update.changes}
                )
            applied.append(ok)
        self._tasks.update(staged)
        for task in staged.values():
            self._next_seq = max(self._next_seq, task.queue_seq + 1)
        if updates:
            self.commit_count += 1
        return applied

    async def prune_tasks(self, completed_before: float, *, batch: int = 1000) -> int:
        """Delete finished tasks that completed before the cutoff, oldest first, `batch`
        per "transaction"; return how many."""
        self._ensure_open()
        if batch < 1:
            raise ValueError("batch must be at least 1")
        old = sorted(
            (
                t
                for t in self._tasks.values()
                if t.status in models.TERMINAL_STATUSES
                and t.completed_at is not None
                and t.completed_at < completed_before
            ),
            key=lambda t: t.completed_at or 0.0,
        )
        for start in range(0, len(old), batch):
            for task in old[start : start + batch]:
                del self._tasks[task.id]
                del self._inserted[task.id]
                if task.idempotency_key is not None:
                    self._keys.pop((task.owner or "", task.idempotency_key), None)
            self.commit_count += 1
        return len(old)

    # -- reading --------------------------------------------------------------------------
    async def get_task(self, task_id: str) -> models.Task | None:
        """A copy of the task with this id, or None."""
        self._ensure_open()
        task = self._tasks.get(task_id)
        return None if task is None else task.model_copy()

    async def get_tasks(self, task_ids: Sequence[str]) -> list[models.Task]:
        """Copies of the tasks that exist among `task_ids`."""
        self._ensure_open()
        return [self._tasks[i].model_copy() for i in dict.fromkeys(task_ids) if i in self._tasks]

    async def find_by_idempotency_key(self, owner: str | None, key: str) -> models.Task | None:
        """The task `owner` created with `key`, or None."""
        self._ensure_open()
        task_id = self._keys.get((owner or "", key))
        return None if task_id is None else self._tasks[task_id].model_copy()

    async def list_tasks(
        self,
        *,
        status: models.TaskStatus | None = None,
        worker_id: str | None = None,
        owner: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> base.TaskPage:
        """Newest first (by creation, then insertion), with the total matching count."""
        self._ensure_open()
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        matching = [
            t
            for t in self._tasks.values()
            if (status is None or t.status == status)
            and (worker_id is None or t.worker_id == worker_id)
            and (owner is None or t.owner == owner)
        ]
        matching.sort(key=lambda t: (t.created_at, self._inserted[t.id]), reverse=True)
        page = [t.model_copy() for t in matching[offset : offset + limit]]
        return base.TaskPage(page, len(matching))

    async def queued_refs(
        self, priority: models.Priority, after_queue_seq: int, limit: int
    ) -> list[base.QueuedRef]:
        """Queued tasks of one priority with queue_seq > after, in queue_seq order."""
        self._ensure_open()
        queued = sorted(
            (
                t
                for t in self._tasks.values()
                if t.status == models.TaskStatus.QUEUED
                and t.priority == priority
                and t.queue_seq > after_queue_seq
            ),
            key=lambda t: t.queue_seq,
        )
        return [
            base.QueuedRef(
                t.id,
                t.queue_seq,
                t.priority,
                t.created_at,
                t.spec.requirements,
                t.not_before,
                t.spec.sandbox_level,
            )
            for t in queued[:limit]
        ]

    async def running_tasks(self) -> list[models.Task]:
        """Tasks whose status is running, in queue_seq order."""
        self._ensure_open()
        running = [t for t in self._tasks.values() if t.status == models.TaskStatus.RUNNING]
        return [t.model_copy() for t in sorted(running, key=lambda t: t.queue_seq)]

    async def count_by_status(self) -> dict[models.TaskStatus, int]:
        """How many tasks are in each status; every status is present."""
        self._ensure_open()
        counts = dict.fromkeys(models.TaskStatus, 0)
        for task in self._tasks.values():
            counts[task.status] += 1
        return counts

    async def queued_by_priority(self) -> dict[models.Priority, int]:
        self._ensure_open()
        counts = dict.fromkeys(models.Priority, 0)
        for task in self._tasks.values():
            if task.status == models.TaskStatus.QUEUED:
                counts[task.spec.priority] += 1
        return counts

    async def size_bytes(self) -> int:
        """Always 0: nothing is on disk."""
        self._ensure_open()
        return 0

    async def check(self) -> None:
        """Raise StorageError unless the store is open."""
        self._ensure_open()

    # -- tokens ---------------------------------------------------------------------------
    async def barrier(self) -> None:
        self._ensure_open()

    async def claim(self, updates: Sequence[base.TaskUpdate]) -> list[bool]:
        """`apply`: this database has one dispatcher, nobody else claims."""
        return await self.apply(updates)

    async def record_token(self, record: base.TokenRecord) -> None:
        self._ensure_open()
        if record.jti in self._tokens:
            raise errors.ConflictError(f"token {record.jti} is recorded already")
        self._tokens[record.jti] = record

    async def revoke_token(self, jti: str, *, revoked_at: float, expires_at: float) -> bool:
        self._ensure_open()
        known = self._tokens.get(jti) or base.TokenRecord(jti=jti, expires_at=expires_at)
        if known.revoked_at is not None:
            return False
        self._tokens[jti] = dataclasses.replace(known, revoked_at=revoked_at)
        return True

    async def revoked_tokens(self, now: float) -> set[str]:
        self._ensure_open()
        return {
            t.jti for t in self._tokens.values() if t.revoked_at is not None and t.expires_at > now
        }

    async def get_token(self, jti: str) -> base.TokenRecord | None:
        self._ensure_open()
        return self._tokens.get(jti)


def _expected(task: models.Task, update: base.TaskUpdate) -> bool:
    expected = update.expect_status
    if isinstance(expected, models.TaskStatus):
        expected = frozenset({expected})
    if expected is not None and task.status not in expected:
        return False
    return update.expect_attempts is None or task.attempts == update.expect_attempts


def free_port() -> int:
    """A loopback port free for both TCP and UDP (the P2P port is shared with QUIC), chosen
    below the kernel's ephemeral range: a port from that range can be taken, between this
    check and the server's bind, as the local port of any outgoing connection (a test
    holding 10,000 connections takes thousands)."""
    low = _ephemeral_low()
    while True:
        port = random.randrange(max(1024, low - 20_000), low)
        try:
            with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        if _reserve(port):
            return port


PORT_RESERVATIONS = Path(tempfile.gettempdir()) / "octaskly-test-ports"
RESERVATION_SECONDS = 600.0


def _reserve(port: int) -> bool:
    """Claim `port` for this process for RESERVATION_SECONDS, across processes (test
    workers run in parallel, and a port found free is not bound until the server starts:
    two processes could pick the same one). False if another claimed it recently."""
    PORT_RESERVATIONS.mkdir(mode=0o700, exist_ok=True)
    marker = PORT_RESERVATIONS / str(port)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        try:
            if time.time() - marker.stat().st_mtime < RESERVATION_SECONDS:
                return False
            marker.touch()  # an old claim: take it over
            return True
        except FileNotFoundError:
            return False


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
