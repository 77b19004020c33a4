"""The durable SQLite store: WAL, fsync on commit, and group commit through one writer.

Writes (`insert_tasks`, `apply`, `apply_soon`) become operations on a queue. One writer
task takes everything pending (up to MAX_BATCH operations), runs it in a single
transaction with each operation in its own savepoint, commits once, and only then
resolves the callers' futures. Concurrent callers thus share one fsync, and one caller's
failure (a duplicate idempotency key) rolls back only its own savepoint. Reads use
separate connections, which WAL lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import aiosqlite

from octaskly import errors
from octaskly.domain import models
from octaskly.store import backup, base, changes, faults, migrating, queries, writing

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # operations per transaction: bounds one commit's latency
READERS = 2
BUSY_TIMEOUT_MS = 5000
_ID_CHUNK = 500  # ids per `IN (...)`; far below SQLite's variable limit
PRUNE_BATCH = 1000  # finished tasks deleted per transaction: bounds the writer's pause


class SQLiteStore(writing.WriteQueue):
    """The default store: one SQLite file in WAL mode, durable when a write returns.

    `synchronous="full"` fsyncs every commit (survives power loss); `"normal"` survives a
    crash of the process but may lose the last commits on power loss. `commit_count`
    counts transactions committed (for metrics and tests of group commit).
    """

    def __init__(self, path: Path, *, synchronous: Literal["full", "normal"] = "full") -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self.commit_count = 0
        self._init_queue(str(self.path), MAX_BATCH)
        self._db: aiosqlite.Connection | None = None
        self._readers: list[aiosqlite.Connection] = []
        self._next_reader = 0
        self._batches = writing.BatchWriter(
            self.path, synchronous=synchronous, busy_timeout_ms=BUSY_TIMEOUT_MS
        )
        self._capture: Callable[[changes.Change], None] | None = None
        self.on_commit: Callable[[float], None] | None = None
        """Told the duration (seconds) of every committed transaction (metrics)."""
        # One thread runs whole batches: one hand-off per transaction, not per statement.
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="octaskly-store-writer"
        )

    # -- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        """Create or migrate the schema; raise StorageError if the database is unusable."""
        if self._state != "new":
            raise errors.StorageError(f"store {self.path} was opened already")
        try:
            await self._connect_all()
        except BaseException as exc:
            await self._close_connections()
            self._state = "closed"
            if isinstance(exc, sqlite3.Error):
                raise faults.storage_error(exc, self.path) from exc
            if isinstance(exc, OSError):
                raise faults.os_error(exc, self.path) from exc
            raise
        self._start_writer()

    async def close(self) -> None:
        """Flush pending writes and close. Calling it again does nothing."""
        if self._state == "new":
            self._state = "closed"
        if self._state != "open":
            return
        try:
            await self._stop_writer()
        finally:
            self._state = "closed"
            await self._close_connections()

    async def _connect_all(self) -> None:
        _prepare_file(self.path)
        self._db = await self._connect()
        await faults.check_intact(self._db, self.path)  # before WAL changes the file
        await self._configure_writer(self._db)
        await migrating.migrate(self._db)
        await faults.check_writable(self._db)
        for _ in range(READERS):
            reader = await self._connect()
            self._readers.append(reader)
            await reader.execute("PRAGMA query_only = ON")
        await asyncio.get_running_loop().run_in_executor(self._thread, self._batches.open)

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: no implicit transactions; the writer says BEGIN itself.
        return await aiosqlite.connect(
            self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, cached_statements=256
        )

    async def _configure_writer(self, db: aiosqlite.Connection) -> None:
        mode = await faults.scalar(db, "PRAGMA journal_mode = WAL")
        if str(mode).lower() != "wal":
            raise errors.StorageError(
                f"cannot use write-ahead logging for {self.path} (journal mode stays {mode}); "
                "put the database on a local filesystem"
            )
        await db.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await db.execute("PRAGMA foreign_keys = ON")

    async def _close_connections(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._batches.close)
        self._thread.shutdown(wait=True)
        # Readers first: the last connection to close checkpoints and removes the WAL.
        connections = [*self._readers, *([self._db] if self._db is not None else [])]
        self._readers, self._db = [], None
        for connection in connections:
            try:
                await connection.close()
            except (sqlite3.Error, ValueError) as exc:
                log.warning("closing %s: %s", self.path, exc)

    # -- writing --------------------------------------------------------------------------
    async def insert_tasks(self, tasks: Sequence[models.Task]) -> list[int]:
        """Insert all tasks atomically and durably; return their assigned queue_seq."""
        self._ensure_writable()
        if not tasks:
            return []
        writing.check_unique(tasks)
        future = asyncio.get_running_loop().create_future()
        self._submit(writing.Op(future, tasks=tasks, rows=[queries.task_row(t) for t in tasks]))
        return cast(list[int], await future)

    async def apply(self, updates: Sequence[base.TaskUpdate]) -> list[bool]:
        """Apply updates durably, each only if its expectations hold; report which did."""
        self._ensure_writable()
        if not updates:
            return []
        future = asyncio.get_running_loop().create_future()
        self._submit(_update_op(updates, future))
        return cast(list[bool], await future)

    async def prune_tasks(self, completed_before: float, *, batch: int = PRUNE_BATCH) -> int:
        """Delete finished tasks that completed before `completed_before` (oldest first, at
        most `batch` a transaction, other writes going between); return how many.

        Freed pages go to SQLite's free list and are reused by new rows: the file stops
        growing once deletions keep up with inserts (it does not shrink).
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        total = 0
        while True:
            self._ensure_writable()
            future = asyncio.get_running_loop().create_future()
            self._submit(writing.Op(future, prune=(completed_before, batch)))
            deleted = len(cast(list[str], await future))
            total += deleted
            if deleted < batch:
                return total

    async def _write_plain(
        self, statements: list[tuple[str, tuple[Any, ...]]], *, tokens: list[str]
    ) -> list[int]:
        self._ensure_writable()
        future = asyncio.get_running_loop().create_future()
        self._submit(writing.Op(future, plain=statements, tokens=tokens))
        return cast(list[int], await future)

    async def barrier(self) -> None:
        """Return once every write queued before this call is committed (or failed)."""
        await self._write_plain([], tokens=[])

    async def claim(self, updates: Sequence[base.TaskUpdate]) -> list[bool]:
        """`apply`: this database has one dispatcher, nobody else claims."""
        return await self.apply(updates)

    async def record_token(self, record: base.TokenRecord) -> None:
        await self._write_plain(
            [(queries.INSERT_TOKEN, queries.token_row(record))], tokens=[record.jti]
        )

    async def revoke_token(self, jti: str, *, revoked_at: float, expires_at: float) -> bool:
        (_, changed) = await self._write_plain(
            [
                (queries.INSERT_REVOCATION, (jti, expires_at)),
                (queries.REVOKE_TOKEN, (revoked_at, jti)),
            ],
            tokens=[jti],
        )
        return changed == 1

    async def revoked_tokens(self, now: float) -> set[str]:
        return {row[0] for row in await self._read(queries.REVOKED_TOKENS, (now,))}

    async def get_token(self, jti: str) -> base.TokenRecord | None:
        rows = await self._read(queries.GET_TOKEN, (jti,))
        return queries.token_from_row(rows[0]) if rows else None

    def apply_soon(self, updates: Sequence[base.TaskUpdate]) -> None:
        """Queue updates behind every write already queued, without waiting for the commit."""
        self._ensure_writable()
        if updates:
            self._submit(_update_op(updates, None))

    async def _write_batch(self, batch: list[writing.Op]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        error = await loop.run_in_executor(self._thread, self._batches.write_batch, batch)
        if error is None:
            self.commit_count += 1
            if self.on_commit is not None:
                self.on_commit(time.perf_counter() - started)
            change = self._batches.last_change
            if change is not None and self._capture is not None:
                self._capture(change)  # before any caller hears of its commit
        else:
            log.error("a write of %d operations was rolled back: %s", len(batch), error)
            for op in batch:
                op.error = op.error or error
        for op in batch:
            writing.settle(op)

    # -- replication -----------------------------------------------------------------------
    @property
    def position(self) -> changes.Position:
        """This database's history id, term and last transaction number."""
        return self._batches.position

    @property
    def change_widths(self) -> tuple[int, int]:
        """Columns of a task row and of a token row in a Change."""
        return self._batches.widths

    async def capture_changes(self, callback: Callable[[changes.Change], None]) -> int:
        """Hand every commit from the next one on to `callback` as a Change; return the
        number of the last transaction not captured (armed between two transactions on
        the writer thread, so none is missed or half-captured)."""
        self._capture = callback

        def arm() -> int:
            self._batches.capture = True
            return self._batches.position.lsn

        return cast(int, await self._on_writer(arm))

    def stop_capture(self) -> None:
        self._capture = None
        self._batches.capture = False

    async def apply_change(self, change: changes.Change) -> bool:
        """Apply a primary's change durably (a standby); False if it was applied already."""
        self._ensure_writable()
        future = asyncio.get_running_loop().create_future()
        self._submit(writing.Op(future, replica=change))
        return cast(bool, await future)

    async def _on_writer(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._ensure_writable()
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def begin_term(self, term: int) -> None:
        """Durably start writing as the primary of `term`."""
        await self._on_writer(self._batches.begin_term, term)

    async def set_history(self, history: Sequence[tuple[int, int]]) -> None:
        """Durably take over a primary's term history."""
        await self._on_writer(self._batches.set_history, list(history))

    async def history(self) -> list[tuple[int, int]]:
        """The term history [(term, start_lsn)], ascending."""
        return cast(list[tuple[int, int]], await self._on_writer(self._batches.history))

    async def snapshot(self, target: Path) -> changes.Position:
        """A consistent copy of the database at `target` (0600); its position."""
        self._ensure_writable()
        await asyncio.to_thread(backup.copy, self.path, target)
        return await asyncio.to_thread(read_position, target)

    # -- reading --------------------------------------------------------------------------
    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if not self._readers:
            raise self._not_open()
        self._next_reader = (self._next_reader + 1) % len(self._readers)
        reader = self._readers[self._next_reader]
        try:
            return list(await reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise faults.storage_error(exc, self.path) from exc
        except ValueError as exc:  # aiosqlite: the connection was closed meanwhile
            raise errors.StorageError(f"store {self.path} is closed") from exc

    async def get_task(self, task_id: str) -> models.Task | None:
        """The task with this id, or None."""
        rows = await self._read(queries.GET_TASK, (task_id,))
        return queries.task_from_row(rows[0]) if rows else None

    async def get_tasks(self, task_ids: Sequence[str]) -> list[models.Task]:
        """The tasks that exist among `task_ids`, in any order."""
        ids = list(dict.fromkeys(task_ids))
        found: list[models.Task] = []
        for start in range(0, len(ids), _ID_CHUNK):
            chunk = ids[start : start + _ID_CHUNK]
            rows = await self._read(queries.get_tasks(len(chunk)), chunk)
            found.extend(queries.task_from_row(r) for r in rows)
        return found

    async def find_by_idempotency_key(self, owner: str | None, key: str) -> models.Task | None:
        """The task an earlier request of `owner` created with `key`, or None."""
        rows = await self._read(queries.FIND_BY_KEY, (owner or "", key))
        return queries.task_from_row(rows[0]) if rows else None

    async def list_tasks(
        self,
        *,
        status: models.TaskStatus | None = None,
        worker_id: str | None = None,
        owner: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> base.TaskPage:
        """Newest first (by creation), with the total matching count."""
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        where, params = queries.list_filter(status, worker_id, owner)
        rows = await self._read(queries.list_tasks(where), [*params, limit, offset])
        total = (await self._read(queries.count_tasks(where), params))[0][0]
        return base.TaskPage([queries.task_from_row(r) for r in rows], int(total))

    async def queued_refs(
        self, priority: models.Priority, after_queue_seq: int, limit: int
    ) -> list[base.QueuedRef]:
        """Queued tasks of one priority with queue_seq > after, in queue_seq order."""
        rows = await self._read(queries.QUEUED_REFS, (int(priority), after_queue_seq, limit))
        return [
            base.QueuedRef(
                id=task_id,
                queue_seq=seq,
                priority=priority,
                created_at=created_at,
                requirements=queries.requirements(requirements),
                not_before=not_before,
                sandbox_level=queries.sandbox_level(level),
            )
            for task_id, seq, _, created_at, requirements, not_before, level in rows
        ]

    async def running_tasks(self) -> list[models.Task]:
        """Tasks whose status is running (used for recovery after a restart)."""
        return [queries.task_from_row(r) for r in await self._read(queries.RUNNING_TASKS)]

    async def count_by_status(self) -> dict[models.TaskStatus, int]:
        """How many tasks are in each status; every status is present."""
        counts = dict.fromkeys(models.TaskStatus, 0)
        for status, count in await self._read(queries.COUNT_BY_STATUS):
            counts[models.TaskStatus(status)] = int(count)
        return counts

    async def queued_by_priority(self) -> dict[models.Priority, int]:
        """How many tasks are queued at each priority (every priority present)."""
        counts = dict.fromkeys(models.Priority, 0)
        for priority, count in await self._read(queries.QUEUED_BY_PRIORITY):
            counts[models.Priority(int(priority))] = int(count)
        return counts

    async def size_bytes(self) -> int:
        """Bytes of the database file and its -wal and -shm files."""
        if self._state != "open":
            raise self._not_open()
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    async def check(self) -> None:
        """Raise StorageError unless the writer is alive and a read succeeds."""
        self._check_writer()
        await self._read(queries.HAS_TASKS)


# -- helpers --------------------------------------------------------------------------------
def _update_op(
    updates: Sequence[base.TaskUpdate], future: asyncio.Future[Any] | None
) -> writing.Op:
    # Statements are built in the caller, so a bad value fails there, not in the batch.
    op = writing.Op(future, statements=[queries.update_statement(u) for u in updates])
    op.seq_bumps = [u.changes.get("queue_seq") for u in updates]
    return op


def read_position(path: Path) -> changes.Position:
    """The replication position recorded in the database file at `path`."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db_id, lsn, term = conn.execute(queries.GET_POSITION).fetchone()
    except sqlite3.Error as exc:
        raise errors.StorageError(f"{path}: no replication position: {exc}") from None
    finally:
        conn.close()
    return changes.Position(str(db_id), int(term), int(lsn))


def _prepare_file(path: Path) -> None:
    """Create the directory, and the file private (0600): SQLite would make it readable
    by all, and its -wal and -shm files copy the database file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))
