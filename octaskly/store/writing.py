"""The synchronous half of group commit: one batch of writes, one transaction, one fsync,
run start to finish on the store's writer thread.

The whole batch is a single hand-off to that thread: a thread hop per statement (as an
async driver makes) costs more than the statements themselves once batches are large.
Each operation runs in its own savepoint, so one caller's failure (a duplicate
idempotency key) rolls back only its own work.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from octaskly import errors
from octaskly.domain import models
from octaskly.store import base, changes, faults, queries

log = logging.getLogger(__name__)

WAL_SIZE_LIMIT = 4 << 20
"""Bytes the WAL file is cut back to when it starts over after a checkpoint: about what
one auto-checkpoint interval (1000 pages) holds. A burst while a reader held an old
snapshot can make it larger; without a limit it would stay at that high-water mark."""

# Errors confined to one operation: its savepoint is rolled back and the batch goes on.
# Anything else (a full disk, I/O errors) fails the whole transaction.
OP_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
    OverflowError,
    TypeError,
    ValueError,
)


@dataclasses.dataclass(slots=True, eq=False)
class Op:
    """One queued write: rows to insert, or compare-and-set statements to run."""

    future: asyncio.Future[Any] | None
    tasks: Sequence[models.Task] = ()
    rows: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    statements: list[Any] = dataclasses.field(default_factory=list)
    """Compare-and-set updates, in the store's own form (queries.Update for SQLite)."""
    seq_bumps: list[int | None] = dataclasses.field(default_factory=list)
    plain: list[tuple[str, tuple[Any, ...]]] = dataclasses.field(default_factory=list)
    """Other statements (tokens), run in order; the result is their row counts."""
    tokens: list[str] = dataclasses.field(default_factory=list)
    """The tokens `plain` may change (for replication)."""
    replica: changes.Change | None = None
    """A primary's change for a standby to apply as it is."""
    prune: tuple[float, int] | None = None
    """Delete up to [1] finished tasks that completed before [0]; the result is their ids."""
    skip_locked: bool = False
    """Claims on a shared database: skip rows another dispatcher holds (PostgreSQL)."""
    changed: list[tuple[str, str, int, int]] = dataclasses.field(default_factory=list)
    """(id, status, priority, queue_seq) of the tasks it changed (PostgreSQL, to tell the
    other dispatchers)."""
    result: Any = None
    error: BaseException | None = None

    @property
    def is_insert(self) -> bool:
        return bool(self.rows)

    @property
    def kind(self) -> str:
        if self.replica is not None:
            return "replica"
        if self.prune is not None:
            return "prune"
        if self.skip_locked:
            return "claim"
        return "insert" if self.rows else "plain" if self.plain else "update"


class BatchWriter:
    """Owns the writing connection; every method runs on the writer thread."""

    def __init__(self, path: Path, *, synchronous: str, busy_timeout_ms: int) -> None:
        self.path = path
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._db: sqlite3.Connection | None = None
        self.next_seq = 1
        self.position = changes.Position("", 1, 0)
        self.capture = False
        """Read back each commit's rows as a Change (set while a standby may need them)."""
        self.last_change: changes.Change | None = None
        """The change the last write_batch committed (with capture on)."""
        self.clock: Callable[[], float] = time.time
        self._task_columns: tuple[str, ...] = ()
        self._token_columns: tuple[str, ...] = ()

    def open(self) -> None:
        # isolation_level=None: no implicit transactions; BEGIN is said explicitly.
        db = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=self._busy_timeout_ms / 1000,
            cached_statements=256,
        )
        db.execute(f"PRAGMA synchronous = {self._synchronous.upper()}")
        db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        self.next_seq = int(db.execute(queries.MAX_SEQ).fetchone()[0]) + 1
        db_id, lsn, term = db.execute(queries.GET_POSITION).fetchone()
        self.position = changes.Position(str(db_id), int(term), int(lsn))
        self._task_columns = _columns(db, "tasks")
        self._token_columns = _columns(db, "tokens")
        self._db = db

    @property
    def widths(self) -> tuple[int, int]:
        """Columns of a task row and of a token row in a Change."""
        return len(self._task_columns), len(self._token_columns)

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def write_batch(self, batch: list[Op]) -> BaseException | None:
        """Run and commit `batch`; on failure roll it all back and return the error.

        Results and per-operation errors are left on the ops for the loop to hand out.
        """
        db = self._db
        if db is None:
            return errors.StorageError(f"the database writer for {self.path} is closed")
        first_seq, position = self.next_seq, self.position
        self.last_change = None
        try:
            db.execute("BEGIN IMMEDIATE")
            for kind, group in itertools.groupby(batch, key=lambda op: op.kind):
                ops = list(group)
                if kind == "insert":
                    self._run_group(db, ops, self._insert_all, self._insert_one)
                elif kind == "plain":
                    self._run_group(db, ops, self._plain_all, self._plain_one)
                elif kind == "replica":
                    for op in ops:
                        self._apply_change(db, op)
                elif kind == "prune":
                    self._run_group(db, ops, self._prune_all, self._prune_one)
                else:
                    self._run_group(db, ops, self._update_all, self._update_one)
            task_ids, token_ids, deleted = _touched(batch)
            if task_ids or token_ids or deleted:
                db.execute(queries.BUMP_LSN)
                self.position = dataclasses.replace(position, lsn=position.lsn + 1)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")  # SQLite may have rolled back itself (SQLITE_FULL)
            self.next_seq, self.position = first_seq, position
            return faults.storage_error(exc, self.path)
        if self.capture and (task_ids or token_ids or deleted):
            self.last_change = self._read_change(db, task_ids, token_ids, deleted)
        return None

    # -- replication ----------------------------------------------------------------------
    def _read_change(
        self, db: sqlite3.Connection, task_ids: list[str], token_ids: list[str], deleted: list[str]
    ) -> changes.Change:
        """The rows of the transaction just committed (the next has not begun)."""
        tasks: list[tuple[Any, ...]] = []
        for start in range(0, len(task_ids), 500):
            chunk = task_ids[start : start + 500]
            tasks += db.execute(_select(self._task_columns, "tasks", "id", len(chunk)), chunk)
        tokens: list[tuple[Any, ...]] = []
        for start in range(0, len(token_ids), 500):
            chunk = token_ids[start : start + 500]
            tokens += db.execute(_select(self._token_columns, "tokens", "jti", len(chunk)), chunk)
        p = self.position
        return changes.Change(p.lsn, p.term, self.clock(), tasks, tokens, deleted)

    def _apply_change(self, db: sqlite3.Connection, op: Op) -> None:
        """A standby applies one of the primary's changes, taking over its lsn and term."""
        change = op.replica
        assert change is not None
        if change.lsn <= self.position.lsn:
            op.result = False  # applied already (a resent change after a reconnect)
            return
        if change.tasks:
            db.executemany(_upsert(self._task_columns, "tasks"), change.tasks)
            seq = self._task_columns.index("queue_seq")
            self.next_seq = max(self.next_seq, max(int(r[seq]) for r in change.tasks) + 1)
        if change.tokens:
            db.executemany(_upsert(self._token_columns, "tokens"), change.tokens)
        # after the upserts: a task updated and deleted in one transaction has no row image
        for start in range(0, len(change.deleted), 500):
            chunk = list(change.deleted[start : start + 500])
            db.execute(queries.delete_tasks(len(chunk)), chunk)
        db.execute(queries.SET_POSITION, (change.lsn, change.term))
        self.position = dataclasses.replace(self.position, lsn=change.lsn, term=change.term)
        op.result = True

    def begin_term(self, term: int) -> None:
        """Record that this database now writes as primary of `term` (after its last lsn)."""
        db = self._db
        if db is None:
            raise errors.StorageError(f"the database writer for {self.path} is closed")
        lsn = self.position.lsn
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute(queries.INSERT_TERM, (term, lsn))
            db.execute(queries.SET_POSITION, (lsn, term))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise faults.storage_error(exc, self.path) from exc
        self.position = dataclasses.replace(self.position, term=term)

    def set_history(self, history: list[tuple[int, int]]) -> None:
        """Take over a primary's term history (a standby, before it applies changes)."""
        db = self._db
        if db is None:
            raise errors.StorageError(f"the database writer for {self.path} is closed")
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute(queries.CLEAR_TERMS)
            db.executemany(queries.INSERT_TERM, history)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise faults.storage_error(exc, self.path) from exc

    def history(self) -> list[tuple[int, int]]:
        db = self._db
        if db is None:
            raise errors.StorageError(f"the database writer for {self.path} is closed")
        return [(int(t), int(s)) for t, s in db.execute(queries.GET_TERMS)]

    def _run_group(
        self,
        db: sqlite3.Connection,
        ops: list[Op],
        run_all: Callable[[sqlite3.Connection, list[Op]], None],
        run_one: Callable[[sqlite3.Connection, Op], None],
    ) -> None:
        """Consecutive operations of one kind: optimistically in one savepoint (one
        executemany for inserts); only if that fails, one savepoint per operation."""
        if len(ops) > 1:
            mark = self.next_seq
            try:
                _in_savepoint(db, lambda: run_all(db, ops))
                return
            except OP_ERRORS:
                self.next_seq = mark
        for op in ops:
            mark = self.next_seq
            try:
                _in_savepoint(db, lambda op=op: run_one(db, op))  # type: ignore[misc]
            except OP_ERRORS as exc:
                self.next_seq = mark  # no gap in queue_seq for a rejected insert
                op.error = _op_error(db, op, exc)

    def _number(self, op: Op) -> list[tuple[Any, ...]]:
        start = self.next_seq
        self.next_seq += len(op.rows)
        op.result = list(range(start, self.next_seq))
        return [(seq, *row) for seq, row in zip(op.result, op.rows, strict=True)]

    def _insert_all(self, db: sqlite3.Connection, ops: list[Op]) -> None:
        db.executemany(queries.INSERT_TASK, [row for op in ops for row in self._number(op)])

    def _insert_one(self, db: sqlite3.Connection, op: Op) -> None:
        db.executemany(queries.INSERT_TASK, self._number(op))

    def _plain_all(self, db: sqlite3.Connection, ops: list[Op]) -> None:
        for op in ops:
            self._plain_one(db, op)

    def _plain_one(self, db: sqlite3.Connection, op: Op) -> None:
        op.result = [db.execute(sql, params).rowcount for sql, params in op.plain]

    def _prune_all(self, db: sqlite3.Connection, ops: list[Op]) -> None:
        for op in ops:
            self._prune_one(db, op)

    def _prune_one(self, db: sqlite3.Connection, op: Op) -> None:
        op.result = [str(row[0]) for row in db.execute(queries.PRUNE_TASKS, op.prune or ())]

    def _update_all(self, db: sqlite3.Connection, ops: list[Op]) -> None:
        """Every update of `ops` in order; a run of consecutive updates of one shape on
        distinct tasks goes as one statement (one trip into SQLite, not one per task)."""
        run: list[tuple[Op, int, queries.Update]] = []
        ids: set[Any] = set()
        for op in ops:
            op.result = [False] * len(op.statements)
            for i, (update, bump) in enumerate(zip(op.statements, op.seq_bumps, strict=True)):
                joins = (
                    bump is None
                    and update.shape.columns
                    and run
                    and run[0][2].shape == update.shape
                    and update.task_id not in ids
                    and len(run) < _rows_per_statement(update.shape)
                )
                if not joins:
                    self._run_updates(db, run)
                    run, ids = [], set()
                if bump is None and update.shape.columns:
                    run.append((op, i, update))
                    ids.add(update.task_id)
                else:
                    op.result[i] = self._update(db, update, bump)
        self._run_updates(db, run)

    def _run_updates(
        self, db: sqlite3.Connection, run: list[tuple[Op, int, queries.Update]]
    ) -> None:
        if len(run) == 1:
            op, i, update = run[0]
            op.result[i] = self._update(db, update, None)
        elif run:
            shape = run[0][2].shape
            params = [p for _, _, update in run for p in update.params]
            changed = {row[0] for row in db.execute(queries.update_tasks(shape, len(run)), params)}
            for op, i, update in run:
                op.result[i] = update.task_id in changed

    def _update_one(self, db: sqlite3.Connection, op: Op) -> None:
        self._update_all(db, [op])

    def _update(self, db: sqlite3.Connection, update: queries.Update, bump: int | None) -> bool:
        done = db.execute(queries.update_task(update.shape), update.params).fetchone() is not None
        if done and bump is not None:
            self.next_seq = max(self.next_seq, bump + 1)
        return done


def _touched(batch: list[Op]) -> tuple[list[str], list[str], list[str]]:
    """The task ids and token ids the successful operations of `batch` changed, and the
    ids of the tasks they deleted."""
    tasks: dict[str, None] = {}
    tokens: dict[str, None] = {}
    deleted: dict[str, None] = {}
    for op in batch:
        if op.error is not None or op.replica is not None:
            continue
        if op.prune is not None:
            deleted.update(dict.fromkeys(op.result or ()))
        elif op.rows:
            tasks.update(dict.fromkeys(t.id for t in op.tasks))
        elif op.plain:
            if any(op.result or ()):
                tokens.update(dict.fromkeys(op.tokens))
        else:
            for statement, done in zip(op.statements, op.result or (), strict=False):
                if done:
                    tasks[str(statement.task_id)] = None
    return [t for t in tasks if t not in deleted], list(tokens), list(deleted)


def _columns(db: sqlite3.Connection, table: str) -> tuple[str, ...]:
    return tuple(str(row[1]) for row in db.execute(f"PRAGMA table_info({table})"))


@functools.cache
def _select(columns: tuple[str, ...], table: str, key: str, count: int) -> str:
    marks = ", ".join("?" * count)
    return f"SELECT {', '.join(columns)} FROM {table} WHERE {key} IN ({marks})"


@functools.cache
def _upsert(columns: tuple[str, ...], table: str) -> str:
    return (
        f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' * len(columns))})"
    )


def _rows_per_statement(shape: queries.UpdateShape) -> int:
    """Updates one statement may carry: at most 500, within SQLite's bound on parameters
    (32,766 since 3.32)."""
    width = len(shape.columns) + 1 + shape.statuses + int(shape.with_attempts)
    return min(500, 30_000 // width)


def _in_savepoint(db: sqlite3.Connection, work: Callable[[], None]) -> None:
    db.execute("SAVEPOINT op")
    try:
        work()
    except OP_ERRORS:
        db.execute("ROLLBACK TO op")
        db.execute("RELEASE op")
        raise
    db.execute("RELEASE op")


def _op_error(db: sqlite3.Connection, op: Op, exc: BaseException) -> BaseException:
    """The exception one rejected operation's caller gets."""
    text = str(exc)
    if op.is_insert and "tasks_idempotency" in text:
        duplicate = _existing_key(db, op.tasks)
        if duplicate is not None:
            return duplicate
    if op.is_insert and "tasks.id" in text:
        return errors.ConflictError("a task with one of these ids exists already")
    if "tokens.jti" in text:
        return errors.ConflictError("a token with this id is recorded already")
    if isinstance(exc, ValueError):
        return exc
    return ValueError(f"the database rejected the write: {exc}")


def _existing_key(
    db: sqlite3.Connection, tasks: Sequence[models.Task]
) -> base.DuplicateIdempotencyKey | None:
    by_owner: dict[str | None, list[str]] = {}
    for task in tasks:
        if task.idempotency_key is not None:
            by_owner.setdefault(task.owner, []).append(task.idempotency_key)
    for owner, keys in by_owner.items():
        row = db.execute(queries.existing_keys(len(keys)), [owner or "", *keys]).fetchone()
        if row is not None:
            return base.DuplicateIdempotencyKey(owner, str(row[0]))
    return None


def check_unique(tasks: Sequence[models.Task]) -> None:
    """Duplicates inside one insert fail before they reach the writer."""
    ids: set[str] = set()
    keys: set[tuple[str, str]] = set()
    for task in tasks:
        if task.id in ids:
            raise errors.ConflictError(f"task id {task.id} appears twice in one insert")
        ids.add(task.id)
        if task.idempotency_key is not None:
            key = (task.owner or "", task.idempotency_key)
            if key in keys:
                raise base.DuplicateIdempotencyKey(task.owner, task.idempotency_key)
            keys.add(key)


def settle(op: Op) -> None:
    if op.future is None:
        if op.error is not None:
            log.warning("a background write failed and was dropped: %s", op.error)
        return
    if op.future.done():
        return
    if op.error is not None:
        op.future.set_exception(op.error)
    else:
        op.future.set_result(op.result)


class WriteQueue:
    """The asynchronous half of group commit, shared by the SQLite and PostgreSQL stores:
    writes queue up as operations; one writer task takes what is pending (up to
    `max_batch`) and hands it to the store's `_write_batch` (one transaction), then
    settles the callers. `label` names the database in messages (a path, host:port/db)."""

    def _init_queue(self, label: str, max_batch: int) -> None:
        self._label = label
        self._max_batch = max_batch
        self._state: Literal["new", "open", "closing", "closed"] = "new"
        self._pending: collections.deque[Op] = collections.deque()
        self._inflight: list[Op] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._writer_failure: BaseException | None = None

    async def _write_batch(self, batch: list[Op]) -> None:
        raise NotImplementedError

    def _start_writer(self) -> None:
        self._state = "open"
        self._writer = asyncio.get_running_loop().create_task(
            self._write_forever(), name="octaskly-store-writer"
        )
        self._writer.add_done_callback(self._on_writer_done)

    async def _stop_writer(self) -> None:
        """Let the writer finish what is queued (state "closing"), then end."""
        self._state = "closing"
        self._wakeup.set()
        if self._writer is not None:
            await asyncio.wait([self._writer])

    def _submit(self, op: Op) -> None:
        self._pending.append(op)
        self._wakeup.set()

    def _not_open(self) -> errors.StorageError:
        state = "not open" if self._state == "new" else "closed"
        return errors.StorageError(f"store {self._label} is {state}")

    def _ensure_writable(self) -> None:
        if self._state != "open":
            raise self._not_open()
        if self._writer_failure is not None:
            raise errors.StorageError(
                f"the database writer for {self._label} stopped: {self._writer_failure!r}"
            )

    def _check_writer(self) -> None:
        """Raise StorageError unless the store is open and its writer alive."""
        self._ensure_writable()
        if self._writer is None or self._writer.done():
            raise errors.StorageError(f"the database writer for {self._label} is not running")

    async def _write_forever(self) -> None:
        try:
            while self._pending or self._state == "open":
                if not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._inflight = self._take_batch()
                if self._inflight:
                    await self._write_batch(self._inflight)
                self._inflight = []
        finally:
            # Normally nothing is left; after a crash of this task nobody may hang.
            error = errors.StorageError(f"the database writer for {self._label} stopped")
            for op in [*self._inflight, *self._pending]:
                op.error = op.error or error
                settle(op)
            self._inflight, self._pending = [], collections.deque()

    def _on_writer_done(self, task: asyncio.Task[None]) -> None:
        failure = asyncio.CancelledError("cancelled") if task.cancelled() else task.exception()
        if failure is None and self._state == "open":
            failure = RuntimeError("ended unexpectedly")
        if failure is not None:
            self._writer_failure = failure
            log.error("the database writer for %s died: %r", self._label, failure)

    def _take_batch(self) -> list[Op]:
        batch: list[Op] = []
        while self._pending and len(batch) < self._max_batch:
            op = self._pending.popleft()
            if op.future is not None and op.future.done():
                continue  # the caller was cancelled before the write began: skip it
            batch.append(op)
        return batch
