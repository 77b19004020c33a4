"""The PostgreSQL store (`db_url = "postgresql://…"`): the same contract as the SQLite
store, on a database several dispatchers can share.

Writes go through one queue per store, like SQLite's: a writer task takes everything
pending (up to MAX_BATCH operations) and runs it in one transaction on one pooled
connection, each operation in its own savepoint, so callers share a commit and one
caller's failure (a duplicate idempotency key) rolls back only its own work, and
`apply_soon` stays ordered before later writes. Runs of inserts and of updates of one
shape go to the server as one statement over arrays (`unnest`), not one round trip per
row. Compare-and-set updates are plain `UPDATE … WHERE status = … AND attempts = …`:
PostgreSQL re-checks the condition on the newest row version after waiting for a
concurrent writer, so two dispatchers can never both win one task.

Reads use the other pooled connections. Errors name the server as host:port/database,
never the password.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

from octaskly import errors
from octaskly.domain import models
from octaskly.store import base, migrating, queries, writing

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # operations per transaction
POOL_SIZE = 4  # one writer and readers
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0
"""A statement taking longer than this fails (a server gone silent must not hang the
dispatcher's writer for ever)."""
PRUNE_BATCH = 1000
MIGRATION_LOCK = 0x6F637461736B6C79  # "octaskly": one dispatcher migrates at a time
CHANNEL = "octaskly"
"""LISTEN/NOTIFY channel on which dispatchers tell each other of the tasks they changed."""
NOTIFY_CHANGES = 150  # task changes per notification (PostgreSQL caps a payload at 8000 B)
LISTEN_PING = 5.0  # seconds between checks that the listening connection is alive
_STATUS_CODE = {
    "queued": "q",
    "running": "r",
    "completed": "c",
    "failed": "f",
    "timed_out": "t",
    "cancelled": "x",
}
STATUS_OF_CODE = {code: models.TaskStatus(name) for name, code in _STATUS_CODE.items()}

# PostgreSQL types of the task columns (arrays of them carry batched rows).
COLUMN_TYPES = {
    "queue_seq": "bigint",
    "id": "text",
    "status": "text",
    "priority": "integer",
    "command": "text",
    "spec": "text",
    "requirements": "text",
    "timeout": "bigint",
    "attempts": "bigint",
    "worker_id": "text",
    "exit_code": "bigint",
    "stdout": "bytea",
    "stderr": "bytea",
    "stdout_dropped": "bigint",
    "stderr_dropped": "bigint",
    "duration_ms": "bigint",
    "error": "text",
    "created_at": "double precision",
    "started_at": "double precision",
    "completed_at": "double precision",
    "not_before": "double precision",
    "lost_count": "bigint",
    "owner": "text",
    "idempotency_key": "text",
    "request_id": "text",
    "dispatcher_id": "text",
}
_BYTES = frozenset({"stdout", "stderr"})
_INSERT_COLUMNS = queries.INSERT_COLUMNS[1:]  # queue_seq comes from the sequence

INSERT_TASKS = (
    f"INSERT INTO tasks (queue_seq, {', '.join(_INSERT_COLUMNS)}) "
    "SELECT nextval('tasks_queue_seq'), * FROM unnest("
    + ", ".join(f"${i}::{COLUMN_TYPES[c]}[]" for i, c in enumerate(_INSERT_COLUMNS, 1))
    + ") RETURNING id, queue_seq"
)
_SELECT_TASK = f"SELECT {', '.join(queries.TASK_FIELDS)} FROM tasks"
GET_TASK = f"{_SELECT_TASK} WHERE id = $1"
GET_TASKS = f"{_SELECT_TASK} WHERE id = ANY($1::text[])"
FIND_BY_KEY = f"{_SELECT_TASK} WHERE coalesce(owner, '') = $1 AND idempotency_key = $2"
EXISTING_KEY = (
    "SELECT idempotency_key FROM tasks WHERE coalesce(owner, '') = $1 "
    "AND idempotency_key = ANY($2::text[]) LIMIT 1"
)
# (spec is text, kept byte for byte: its sandbox level is read as in SQLite, one parse a row)
QUEUED_REFS = (
    "SELECT id, queue_seq, priority, created_at, requirements, not_before, "
    "spec::json ->> 'sandbox_level' FROM tasks "
    "WHERE status = 'queued' AND priority = $1 AND queue_seq > $2 ORDER BY queue_seq LIMIT $3"
)
RUNNING_TASKS = f"{_SELECT_TASK} WHERE status = 'running' ORDER BY queue_seq"
COUNT_BY_STATUS = "SELECT status, count(*) FROM tasks GROUP BY status"
QUEUED_BY_PRIORITY = (
    "SELECT priority, count(*) FROM tasks WHERE status = 'queued' GROUP BY priority"
)
HAS_TASKS = "SELECT 1 FROM tasks LIMIT 1"
BUMP_SEQ = (
    "SELECT setval('tasks_queue_seq', greatest($1::bigint, "
    "(SELECT last_value FROM tasks_queue_seq)))"
)
# SKIP LOCKED: dispatchers pruning at the same moment take different rows, none waits.
PRUNE_TASKS = (
    "DELETE FROM tasks WHERE pk IN (SELECT pk FROM tasks "
    "WHERE status IN ('completed', 'failed', 'timed_out', 'cancelled') AND completed_at < $1 "
    "ORDER BY completed_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id"
)
# -- federation (migration 002) --
OWNED_RUNNING = f"{_SELECT_TASK} WHERE status = 'running' AND dispatcher_id = $1 ORDER BY queue_seq"
REGISTER = (
    "INSERT INTO dispatchers (id, instance, p2p_address, api_url, lease_until) "
    "VALUES ($1, $2, $3, $4, clock_timestamp() + make_interval(secs => $5)) "
    "ON CONFLICT (id) DO UPDATE SET instance = excluded.instance, "
    "p2p_address = excluded.p2p_address, api_url = excluded.api_url, "
    "started_at = clock_timestamp(), renewed_at = clock_timestamp(), "
    "lease_until = excluded.lease_until, summary = NULL "
    "WHERE dispatchers.instance = excluded.instance "
    "OR dispatchers.lease_until < clock_timestamp() RETURNING id"
)
RENEW = (
    "UPDATE dispatchers SET renewed_at = clock_timestamp(), "
    "lease_until = clock_timestamp() + make_interval(secs => $3), summary = $4 "
    "WHERE id = $1 AND instance = $2 RETURNING id"
)
RELEASE = (
    "UPDATE dispatchers SET lease_until = clock_timestamp() - interval '1 second' "
    "WHERE id = $1 AND instance = $2"
)
EXPIRED = (
    "SELECT id FROM dispatchers WHERE lease_until < clock_timestamp() AND id <> $1 "
    "FOR UPDATE SKIP LOCKED"
)
TAKE_OVER = (
    "UPDATE tasks SET status = 'queued', dispatcher_id = NULL, not_before = $2 "
    "WHERE status = 'running' AND dispatcher_id = $1 "
    "RETURNING id, status, priority, queue_seq"
)
FORGET_DISPATCHER = "DELETE FROM dispatchers WHERE id = $1"
LIVE_DISPATCHERS = (
    "SELECT id, p2p_address, api_url, extract(epoch FROM started_at), "
    "extract(epoch FROM clock_timestamp() - renewed_at), summary FROM dispatchers "
    "WHERE lease_until >= clock_timestamp() ORDER BY id"
)
NOTIFY = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"

_TOKEN_COLUMNS = "jti, subject, role, issued_at, expires_at, revoked_at"
INSERT_TOKEN = f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
INSERT_REVOCATION = (
    "INSERT INTO tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING"
)
REVOKE_TOKEN = "UPDATE tokens SET revoked_at = $1 WHERE jti = $2 AND revoked_at IS NULL"
REVOKED_TOKENS = "SELECT jti FROM tokens WHERE revoked_at IS NOT NULL AND expires_at > $1"
GET_TOKEN = f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE jti = $1"

# Errors confined to one operation: its savepoint is rolled back and the batch goes on.
OP_ERRORS = (
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.DataError,  # class 22 from the server: out of range, NUL in text, …
    ValueError,  # asyncpg's own check of an argument's type (its DataError is one)
    TypeError,
    OverflowError,
)
# The server or the link failed: the whole transaction is lost, nothing was saved.
LINK_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def describe(url: str) -> str:
    """host:port/database of `url`: what messages show (never the user or password)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or urllib.parse.parse_qs(parts.query).get("host", ["localhost"])[0]
    port = parts.port or 5432
    return f"{host}:{port}{parts.path or '/'}"


def storage_error(exc: BaseException, where: str) -> errors.StorageError:
    """A StorageError telling an operator what is wrong with the server and what to do."""
    if isinstance(exc, asyncpg.DiskFullError):
        return errors.StorageFullError(
            f"the disk of the PostgreSQL server {where} is full; the write was not saved. "
            "Free some space there, then retry",
            delay=5.0,
        )
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return errors.StorageError(
            f"PostgreSQL {where} is read-only (a hot standby?); point db_url at the primary"
        )
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return errors.StorageError(
            f"PostgreSQL {where} refused the login: {exc} (check the user and password in "
            "db_url, or the password file PGPASSFILE)"
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return errors.StorageError(
            f"PostgreSQL {where}: {exc} (create it: CREATE DATABASE … OWNER <the db_url user>)"
        )
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return errors.StorageError(
            f"PostgreSQL {where}: {exc} (the db_url user must own the database or its schema)"
        )
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError) or isinstance(
        exc, asyncpg.PostgresConnectionError | asyncpg.CannotConnectNowError
    ):
        detail = str(exc) or type(exc).__name__
        return errors.StorageError(f"PostgreSQL {where} is unreachable: {detail}")
    return errors.StorageError(f"PostgreSQL {where}: {exc}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Update:
    """One compare-and-set update, ready for the server."""

    columns: tuple[str, ...]
    values: tuple[Any, ...]
    task_id: str
    statuses: str | None  # the expected statuses, comma-separated ("" = none matches)
    attempts: int | None
    bump: int | None  # a new queue_seq (the sequence must stay ahead of it)
    owner: str | None  # only if this dispatcher holds the run


def _update(update: base.TaskUpdate, owner: str) -> _Update:
    """Checked in the caller, so a bad value fails there, not in the batch. A change of
    status moves the run's ownership: to `owner` when it becomes running, else to none."""
    changes = dict(update.changes)
    if "status" in changes:
        running = models.TaskStatus(changes["status"]) == models.TaskStatus.RUNNING
        changes["dispatcher_id"] = owner if running else None
    columns = tuple(sorted(changes))
    values = tuple(_column_value(c, changes[c]) for c in columns)
    expected = update.expect_status
    if isinstance(expected, models.TaskStatus | str):
        expected = frozenset({models.TaskStatus(expected)})
    statuses = None
    if expected is not None:
        statuses = ",".join(sorted(models.TaskStatus(s).value for s in expected))
    bump = update.changes.get("queue_seq")
    return _Update(
        columns,
        values,
        update.task_id,
        statuses,
        update.expect_attempts,
        bump,
        owner if update.owned else None,
    )


def _column_value(column: str, value: Any) -> Any:
    if column == "status":
        return models.TaskStatus(value).value
    if column in _BYTES:
        return value.encode("utf-8") if isinstance(value, str) else value
    if column == "error" and isinstance(value, str):
        return value.replace("\x00", "\ufffd")  # text cannot hold NUL; a worker's message
    return value


@functools.lru_cache(maxsize=256)
def _update_sql(columns: tuple[str, ...], skip_locked: bool = False) -> str:
    """Updates of one shape as one statement over arrays; returns (id, status, priority,
    queue_seq) of the tasks changed (or, with no columns, the ids whose expectations hold).
    With `skip_locked`, a row another transaction holds is left alone (not waited for)."""
    names = [*(f"v_{c}" for c in columns), "x_id", "x_statuses", "x_attempts", "x_owner"]
    types = [*(COLUMN_TYPES[c] for c in columns), "text", "text", "bigint", "text"]
    arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, 1))
    source = f"unnest({arrays}) AS v({', '.join(names)})"
    where = (
        "t.id = v.x_id AND (v.x_statuses IS NULL OR "
        "t.status = ANY(string_to_array(v.x_statuses, ','))) "
        "AND (v.x_attempts IS NULL OR t.attempts = v.x_attempts) "
        "AND (v.x_owner IS NULL OR t.dispatcher_id = v.x_owner)"
    )
    if not columns:
        return f"SELECT t.id FROM tasks t, {source} WHERE {where}"
    assignments = ", ".join(f"{c} = v.v_{c}" for c in columns)
    returning = "RETURNING t.id, t.status, t.priority, t.queue_seq"
    if not skip_locked:
        return f"UPDATE tasks t SET {assignments} FROM {source} WHERE {where} {returning}"
    n = len(types) - 3  # the ids' array
    return (
        f"WITH free AS (SELECT id FROM tasks WHERE id = ANY(${n}::text[]) "
        "FOR UPDATE SKIP LOCKED) "
        f"UPDATE tasks t SET {assignments} FROM {source}, free "
        f"WHERE t.id = free.id AND {where} {returning}"
    )


def _task_values(task: models.Task) -> list[Any]:
    row = list(queries.task_row(task))
    for i, column in enumerate(_INSERT_COLUMNS):
        row[i] = _column_value(column, row[i])
    return row


def _task(row: asyncpg.Record) -> models.Task:
    return queries.task_from_row(list(row))  # bytea comes back as the exact bytes


def _rowcount(status: str) -> int:
    """The row count of a command status ("UPDATE 1", "INSERT 0 1")."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PostgresStore(writing.WriteQueue):
    """Tasks and tokens in a PostgreSQL database, durable when a write returns (the
    server's `synchronous_commit` decides how: its default waits for the WAL flush)."""

    federated = True
    """Several dispatchers may share this store (see the federation methods)."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = POOL_SIZE,
        application_name: str = "octaskly-dispatcher",
        owner: str = "dispatcher",
    ) -> None:
        self.url = url
        self.where = describe(url)
        self.owner = owner
        """This dispatcher's id among those sharing the database (its node name)."""
        self._listening: asyncio.Task[None] | None = None
        self.commit_count = 0
        self.on_commit: Callable[[float], None] | None = None
        """Told the duration (seconds) of every committed transaction (metrics)."""
        self._pool_size = max(2, pool_size)
        self._application_name = application_name
        self._init_queue(self.where, MAX_BATCH)
        self._pool: asyncpg.Pool | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, create or migrate the schema; raise StorageError if unusable."""
        if self._state != "new":
            raise errors.StorageError(f"store {self.where} was opened already")
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=2,
                max_size=self._pool_size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"application_name": self._application_name},
            )
            async with self._pool.acquire() as conn:
                await migrate(conn, self.where)
        except BaseException as exc:
            self._state = "closed"
            if self._pool is not None:
                self._pool.terminate()
                self._pool = None
            if isinstance(exc, errors.StorageError):
                raise
            if isinstance(exc, LINK_ERRORS) or isinstance(exc, ValueError):
                raise storage_error(exc, self.where) from None
            raise
        self._start_writer()

    async def close(self) -> None:
        """Flush pending writes and close. Calling it again does nothing."""
        if self._state == "new":
            self._state = "closed"
        if self._state != "open":
            return
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
        try:
            await self._stop_writer()
        finally:
            self._state = "closed"
            pool, self._pool = self._pool, None
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), 10)
                except (TimeoutError, *LINK_ERRORS) as exc:
                    log.warning("closing the connections to %s: %s", self.where, exc)
                    pool.terminate()

    # -- writing --------------------------------------------------------------------------
    async def insert_tasks(self, tasks: Sequence[models.Task]) -> list[int]:
        """Insert all tasks atomically and durably; return their assigned queue_seq."""
        self._ensure_writable()
        if not tasks:
            return []
        writing.check_unique(tasks)
        rows = [_task_values(t) for t in tasks]
        future = asyncio.get_running_loop().create_future()
        self._submit(writing.Op(future, tasks=tasks, rows=[tuple(r) for r in rows]))
        return cast(list[int], await future)

    async def apply(self, updates: Sequence[base.TaskUpdate]) -> list[bool]:
        """Apply updates durably, each only if its expectations hold; report which did."""
        self._ensure_writable()
        if not updates:
            return []
        future = asyncio.get_running_loop().create_future()
        self._submit(writing.Op(future, statements=[_update(u, self.owner) for u in updates]))
        return cast(list[bool], await future)

    async def claim(self, updates: Sequence[base.TaskUpdate]) -> list[bool]:
        """`apply` with rows another dispatcher is claiming right now skipped (False)."""
        self._ensure_writable()
        if not updates:
            return []
        future = asyncio.get_running_loop().create_future()
        statements = [_update(u, self.owner) for u in updates]
        self._submit(writing.Op(future, statements=statements, skip_locked=True))
        return cast(list[bool], await future)

    def apply_soon(self, updates: Sequence[base.TaskUpdate]) -> None:
        """Queue updates behind every write already queued, without waiting for the commit."""
        self._ensure_writable()
        if updates:
            self._submit(writing.Op(None, statements=[_update(u, self.owner) for u in updates]))

    async def prune_tasks(self, completed_before: float, *, batch: int = PRUNE_BATCH) -> int:
        """Delete finished tasks that completed before `completed_before`, oldest first, at
        most `batch` a transaction; return how many."""
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

    async def _write_plain(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        self._ensure_writable()
        future = asyncio.get_running_loop().create_future()
        self._submit(writing.Op(future, plain=statements))
        return cast(list[int], await future)

    async def barrier(self) -> None:
        """Return once every write queued before this call is committed (or failed)."""
        await self._write_plain([])

    async def record_token(self, record: base.TokenRecord) -> None:
        await self._write_plain([(INSERT_TOKEN, queries.token_row(record))])

    async def revoke_token(self, jti: str, *, revoked_at: float, expires_at: float) -> bool:
        (_, changed) = await self._write_plain(
            [(INSERT_REVOCATION, (jti, expires_at)), (REVOKE_TOKEN, (revoked_at, jti))]
        )
        return changed == 1

    async def _write_batch(self, batch: list[writing.Op]) -> None:
        started = time.perf_counter()
        error: errors.StorageError | None = None
        try:
            assert self._pool is not None
            async with self._pool.acquire() as conn, conn.transaction():
                for kind, group in itertools.groupby(batch, key=lambda op: op.kind):
                    ops = list(group)
                    if kind == "insert":
                        await _run_group(conn, ops, _insert_all, _insert_one)
                    elif kind == "plain":
                        await _run_group(conn, ops, _plain_all, _plain_all)
                    elif kind == "prune":
                        await _run_group(conn, ops, _prune_all, _prune_all)
                    else:
                        await _run_group(conn, ops, _update_all, _update_all)
                changes = [c for op in batch if op.error is None for c in op.changed]
                if changes:  # delivered with the commit, never without it
                    await conn.execute(NOTIFY, CHANNEL, notifications(self.owner, changes))
        except LINK_ERRORS as exc:
            error = storage_error(exc, self.where)
        if error is None:
            self.commit_count += 1
            if self.on_commit is not None:
                self.on_commit(time.perf_counter() - started)
        else:
            log.error("a write of %d operations was rolled back: %s", len(batch), error)
            for op in batch:
                op.error = op.error or error
        for op in batch:
            writing.settle(op)

    # -- federation -----------------------------------------------------------------------
    async def register(
        self, *, instance: str, p2p_address: str | None, api_url: str | None, lease: float
    ) -> None:
        """Take this dispatcher's place (its `owner` id) with a lease of `lease` seconds.
        Refused while another live instance (a different data dir) holds the same id."""
        rows = await self._read(REGISTER, self.owner, instance, p2p_address, api_url, lease)
        if not rows:
            raise errors.StorageError(
                f"a dispatcher named {self.owner!r} is already running on PostgreSQL "
                f"{self.where} (its lease is live); give each dispatcher its own node_name"
            )

    async def renew(self, *, instance: str, lease: float, summary: str) -> bool:
        """Extend the lease; False if it was lost (it ran out and was taken over)."""
        return bool(await self._read(RENEW, self.owner, instance, lease, summary))

    async def release(self, *, instance: str) -> None:
        """End the lease now (a clean stop): the others take over its runs at once."""
        await self._read(RELEASE, self.owner, instance)

    async def take_over_expired(self, *, not_before: float) -> dict[str, list[str]]:
        """Re-queue the runs of every dispatcher whose lease ran out (they wait until
        `not_before`, for their workers to come back and re-attach) and forget it; the ids
        re-queued, by dispatcher."""
        pool = self._pool
        if pool is None or self._state != "open":
            raise self._not_open()
        taken: dict[str, list[str]] = {}
        try:
            async with pool.acquire() as conn, conn.transaction():
                for (dead,) in await conn.fetch(EXPIRED, self.owner):
                    rows = await conn.fetch(TAKE_OVER, dead, not_before)
                    await conn.execute(FORGET_DISPATCHER, dead)
                    taken[dead] = [r[0] for r in rows]
                    changes = [(r[0], r[1], int(r[2]), int(r[3])) for r in rows]
                    if changes:
                        await conn.execute(NOTIFY, CHANNEL, notifications(self.owner, changes))
        except LINK_ERRORS as exc:
            raise storage_error(exc, self.where) from exc
        return taken

    # -- migration from SQLite (octaskly migrate) -------------------------------------------
    async def is_empty(self) -> bool:
        """No task, token or archived audit chain yet."""
        rows = await self._read(
            "SELECT (SELECT count(*) FROM tasks) + (SELECT count(*) FROM tokens) "
            "+ (SELECT count(*) FROM audit_archive)"
        )
        return int(rows[0][0]) == 0

    async def wipe(self) -> None:
        """Delete every task, token and archived audit chain (`migrate --replace`)."""
        await self._read("TRUNCATE tasks, tokens, audit_archive, audit_archive_heads")

    async def import_tokens(self, records: Sequence[base.TokenRecord]) -> None:
        """Insert tokens and revocations as they are, in one transaction."""
        pool = self._pool
        if pool is None or self._state != "open":
            raise self._not_open()
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.executemany(INSERT_TOKEN, [queries.token_row(r) for r in records])
        except LINK_ERRORS as exc:
            raise storage_error(exc, self.where) from exc

    async def count_tokens(self) -> tuple[int, int]:
        """(tokens, of which revoked)."""
        rows = await self._read("SELECT count(*), count(revoked_at) FROM tokens")
        return int(rows[0][0]), int(rows[0][1])

    async def archive_audit(self, source: str, lines: Sequence[str], head: str) -> None:
        """Keep an audit chain's lines and head (one transaction)."""
        pool = self._pool
        if pool is None or self._state != "open":
            raise self._not_open()
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("DELETE FROM audit_archive WHERE source = $1", source)
                await conn.copy_records_to_table(
                    "audit_archive",
                    records=[(source, i, line) for i, line in enumerate(lines, 1)],
                    columns=["source", "line_no", "line"],
                )
                await conn.execute(
                    "INSERT INTO audit_archive_heads (source, head) VALUES ($1, $2) "
                    "ON CONFLICT (source) DO UPDATE SET head = excluded.head, "
                    "archived_at = clock_timestamp()",
                    source,
                    head,
                )
        except LINK_ERRORS as exc:
            raise storage_error(exc, self.where) from exc

    async def archived_audit(self, source: str) -> tuple[list[str], str | None]:
        """An archived chain's lines, in order, and its head."""
        lines = [
            str(r[0])
            for r in await self._read(
                "SELECT line FROM audit_archive WHERE source = $1 ORDER BY line_no", source
            )
        ]
        heads = await self._read("SELECT head FROM audit_archive_heads WHERE source = $1", source)
        return lines, (str(heads[0][0]) if heads else None)

    async def owned_running_tasks(self) -> list[models.Task]:
        """Running tasks this dispatcher (its earlier life, after a restart) holds."""
        return [_task(r) for r in await self._read(OWNED_RUNNING, self.owner)]

    async def dispatchers(self) -> list[dict[str, Any]]:
        """The dispatchers with a live lease: id, addresses, age of the last renewal and
        the summary each published."""
        found = []
        for did, p2p, api, started, silent, summary in await self._read(LIVE_DISPATCHERS):
            found.append(
                {
                    "id": did,
                    "p2p_address": p2p,
                    "api_url": api,
                    "started_at": float(started),
                    "renewed_seconds_ago": round(float(silent), 3),
                    "summary": json.loads(summary) if summary else None,
                }
            )
        return found

    def listen(
        self, on_change: Callable[[dict[str, Any]], None], on_gap: Callable[[], None]
    ) -> None:
        """Hear the changes other dispatchers commit (LISTEN): `on_change(message)` for each
        notification of theirs. When the listening connection was lost, what was said
        meanwhile is gone: `on_gap()` is called once listening again (resynchronise)."""
        self._listening = asyncio.get_running_loop().create_task(
            self._listen_forever(on_change, on_gap), name="octaskly-store-listen"
        )

    async def _listen_forever(
        self, on_change: Callable[[dict[str, Any]], None], on_gap: Callable[[], None]
    ) -> None:
        first, delay = True, 0.2

        def heard(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
            try:
                message = json.loads(str(payload))
            except ValueError:
                log.warning("ignored a malformed notification on %s", CHANNEL)
                return
            if isinstance(message, dict) and message.get("d") != self.owner:
                on_change(message)

        while self._state == "open":
            conn: asyncpg.Connection[asyncpg.Record] | None = None
            try:
                conn = await asyncpg.connect(
                    self.url,
                    timeout=CONNECT_TIMEOUT,
                    server_settings={"application_name": f"{self._application_name} listen"},
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, heard)
                if not first:
                    log.info("listening on %s again; resynchronising", self.where)
                    on_gap()
                first, delay = False, 0.2
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), LISTEN_PING)
                    except TimeoutError:
                        await conn.execute("SELECT 1", timeout=LISTEN_PING)
            except asyncio.CancelledError:
                raise
            except (*LINK_ERRORS, ValueError) as exc:
                if self._state == "open":
                    log.warning("listening on %s failed (%s); retrying", self.where, exc)
                first = False
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- reading --------------------------------------------------------------------------
    async def _read(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        pool = self._pool
        if pool is None or self._state != "open":
            raise self._not_open()
        try:
            return list(await pool.fetch(sql, *args))
        except LINK_ERRORS as exc:
            raise storage_error(exc, self.where) from exc

    def _none_stored(self, *values: Any) -> bool:
        """Whether a lookup value holds NUL: PostgreSQL text cannot hold it, so nothing
        stored can match (and the server would refuse the query)."""
        if self._state != "open":
            raise self._not_open()
        return any(isinstance(v, str) and "\x00" in v for v in values)

    async def get_task(self, task_id: str) -> models.Task | None:
        if self._none_stored(task_id):
            return None
        rows = await self._read(GET_TASK, task_id)
        return _task(rows[0]) if rows else None

    async def get_tasks(self, task_ids: Sequence[str]) -> list[models.Task]:
        ids = [i for i in dict.fromkeys(task_ids) if not self._none_stored(i)]
        if not ids:
            if self._state != "open":
                raise self._not_open()
            return []
        return [_task(r) for r in await self._read(GET_TASKS, ids)]

    async def find_by_idempotency_key(self, owner: str | None, key: str) -> models.Task | None:
        if self._none_stored(owner, key):
            return None
        rows = await self._read(FIND_BY_KEY, owner or "", key)
        return _task(rows[0]) if rows else None

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
        if self._none_stored(status, worker_id, owner):
            return base.TaskPage([], 0)
        terms: list[str] = []
        params: list[Any] = []
        for column, value in (("status", status), ("worker_id", worker_id), ("owner", owner)):
            if value is not None:
                params.append(str(value))
                terms.append(f"{column} = ${len(params)}")
        where = f" WHERE {' AND '.join(terms)}" if terms else ""
        n = len(params)
        rows = await self._read(
            f"{_SELECT_TASK}{where} ORDER BY created_at DESC, pk DESC "
            f"LIMIT ${n + 1} OFFSET ${n + 2}",
            *params,
            limit,
            offset,
        )
        total = (await self._read(f"SELECT count(*) FROM tasks{where}", *params))[0][0]
        return base.TaskPage([_task(r) for r in rows], int(total))

    async def queued_refs(
        self, priority: models.Priority, after_queue_seq: int, limit: int
    ) -> list[base.QueuedRef]:
        rows = await self._read(QUEUED_REFS, int(priority), after_queue_seq, limit)
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
        return [_task(r) for r in await self._read(RUNNING_TASKS)]

    async def count_by_status(self) -> dict[models.TaskStatus, int]:
        counts = dict.fromkeys(models.TaskStatus, 0)
        for status, count in await self._read(COUNT_BY_STATUS):
            counts[models.TaskStatus(status)] = int(count)
        return counts

    async def queued_by_priority(self) -> dict[models.Priority, int]:
        counts = dict.fromkeys(models.Priority, 0)
        for priority, count in await self._read(QUEUED_BY_PRIORITY):
            counts[models.Priority(int(priority))] = int(count)
        return counts

    async def size_bytes(self) -> int:
        """Bytes of the tasks and tokens tables with their indexes and TOAST data."""
        rows = await self._read(
            "SELECT pg_total_relation_size('tasks') + pg_total_relation_size('tokens')"
        )
        return int(rows[0][0])

    async def check(self) -> None:
        """Raise StorageError unless the writer is alive and a read succeeds."""
        self._check_writer()
        await self._read(HAS_TASKS)

    async def revoked_tokens(self, now: float) -> set[str]:
        return {row[0] for row in await self._read(REVOKED_TOKENS, now)}

    async def get_token(self, jti: str) -> base.TokenRecord | None:
        if self._none_stored(jti):
            return None
        rows = await self._read(GET_TOKEN, jti)
        return queries.token_from_row(tuple(rows[0])) if rows else None


def notifications(owner: str, changes: Sequence[tuple[str, str, int, int]]) -> list[str]:
    """Payloads telling the other dispatchers of `changes` (id, status, priority,
    queue_seq): {"d": sender, "c": [[id, status code], …], "q": {priority: lowest
    queue_seq that became queued}}, each within PostgreSQL's 8000-byte limit."""
    payloads = []
    for start in range(0, len(changes), NOTIFY_CHANGES):
        chunk = changes[start : start + NOTIFY_CHANGES]
        queued: dict[str, int] = {}
        for _, status, priority, seq in chunk:
            if status == "queued":
                key = str(priority)
                queued[key] = min(queued.get(key, seq), seq)
        body: dict[str, Any] = {
            "d": owner,
            "c": [[i, _STATUS_CODE.get(st, "?")] for i, st, _, _ in chunk],
        }
        if queued:
            body["q"] = queued
        payloads.append(json.dumps(body, separators=(",", ":")))
    return payloads


# -- the writer's statements (inside the batch's transaction) --------------------------------
_Run: TypeAlias = "Callable[[Conn, list[writing.Op]], Awaitable[None]]"


async def _run_group(conn: Conn, ops: list[writing.Op], run_all: _Run, run_one: _Run) -> None:
    """Consecutive operations of one kind: optimistically all in one savepoint; only if
    that fails, one savepoint per operation."""
    if len(ops) > 1:
        try:
            async with conn.transaction():
                await run_all(conn, ops)
            return
        except OP_ERRORS:
            for op in ops:
                op.result, op.changed = None, []
    for op in ops:
        try:
            async with conn.transaction():
                await run_one(conn, [op])
        except OP_ERRORS as exc:
            op.result, op.changed = None, []
            op.error = await _op_error(conn, op, exc)


async def _insert_all(conn: Conn, ops: list[writing.Op]) -> None:
    rows = [row for op in ops for row in op.rows]
    columns = [list(column) for column in zip(*rows, strict=True)]
    seqs = {r[0]: int(r[1]) for r in await conn.fetch(INSERT_TASKS, *columns)}
    for op in ops:
        op.result = [seqs[t.id] for t in op.tasks]
        op.changed = [
            (t.id, models.TaskStatus(t.status).value, int(t.spec.priority), seqs[t.id])
            for t in op.tasks
        ]


async def _insert_one(conn: Conn, ops: list[writing.Op]) -> None:
    await _insert_all(conn, ops)


async def _plain_all(conn: Conn, ops: list[writing.Op]) -> None:
    for op in ops:
        op.result = [_rowcount(await conn.execute(sql, *params)) for sql, params in op.plain]


async def _prune_all(conn: Conn, ops: list[writing.Op]) -> None:
    for op in ops:
        assert op.prune is not None
        op.result = [str(r[0]) for r in await conn.fetch(PRUNE_TASKS, *op.prune)]


async def _update_all(conn: Conn, ops: list[writing.Op]) -> None:
    """Every update of `ops` in order; a run of consecutive updates of one shape on
    distinct tasks goes as one statement."""
    run: list[tuple[writing.Op, int, _Update]] = []
    ids: set[str] = set()
    for op in ops:
        op.result = [False] * len(op.statements)
        for i, update in enumerate(cast(list[_Update], op.statements)):
            joins = (
                update.bump is None
                and run
                and run[0][2].columns == update.columns
                and update.task_id not in ids
            )
            if not joins:
                await _run_updates(conn, run, op.skip_locked)
                run, ids = [], set()
            run.append((op, i, update))
            ids.add(update.task_id)
            if update.bump is not None:
                await _run_updates(conn, run, op.skip_locked)
                await conn.execute(BUMP_SEQ, update.bump)
                run, ids = [], set()
    await _run_updates(conn, run, bool(ops) and ops[0].skip_locked)


async def _run_updates(
    conn: Conn, run: list[tuple[writing.Op, int, _Update]], skip_locked: bool = False
) -> None:
    if not run:
        return
    updates = [u for _, _, u in run]
    arrays = [list(column) for column in zip(*(u.values for u in updates), strict=True)]
    if not updates[0].columns:
        arrays = []
    arrays += [
        [u.task_id for u in updates],
        [u.statuses for u in updates],
        [u.attempts for u in updates],
    ]
    arrays.append([u.owner for u in updates])
    sql = _update_sql(updates[0].columns, skip_locked and bool(updates[0].columns))
    rows = {r[0]: r for r in await conn.fetch(sql, *arrays)}
    for op, i, update in run:
        row = rows.get(update.task_id)
        op.result[i] = row is not None
        if row is not None and len(row) == 4:
            op.changed.append((row[0], row[1], int(row[2]), int(row[3])))


async def _op_error(conn: Conn, op: writing.Op, exc: BaseException) -> BaseException:
    """The exception one rejected operation's caller gets."""
    constraint = getattr(exc, "constraint_name", None) or ""
    if op.is_insert and constraint == "tasks_idempotency":
        by_owner: dict[str | None, list[str]] = {}
        for task in op.tasks:
            if task.idempotency_key is not None:
                by_owner.setdefault(task.owner, []).append(task.idempotency_key)
        for owner, keys in by_owner.items():
            key = await conn.fetchval(EXISTING_KEY, owner or "", keys)
            if key is not None:
                return base.DuplicateIdempotencyKey(owner, str(key))
    if op.is_insert and constraint == "tasks_id_key":
        return errors.ConflictError("a task with one of these ids exists already")
    if constraint == "tokens_pkey":
        return errors.ConflictError("a token with this id is recorded already")
    if isinstance(exc, ValueError):
        return exc
    return ValueError(f"the database rejected the write: {exc}")


# -- schema --------------------------------------------------------------------------------
MIGRATIONS = "migrations_pg"
SCHEMA_TABLE = "octaskly_schema"


def latest_version() -> int:
    return len(migrating.migrations(MIGRATIONS))


async def current_version(conn: Conn) -> int:
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", SCHEMA_TABLE)
    if not exists:
        return 0
    return int(await conn.fetchval(f"SELECT version FROM {SCHEMA_TABLE} WHERE id = 1") or 0)


async def migrate(conn: Conn, where: str, *, target: int | None = None) -> int:
    """Bring the schema to `target` (default: the latest) in one transaction, under an
    advisory lock (dispatchers starting together migrate once); return the version."""
    latest = latest_version()
    target = latest if target is None else target
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        current = await current_version(conn)
        if current > latest:
            raise errors.StorageError(
                f"database schema version {current} of PostgreSQL {where} is newer than this "
                f"octaskly supports ({latest}); upgrade octaskly"
            )
        if current == 0:
            tables = await conn.fetchval(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
            )
            if tables:
                raise errors.StorageError(
                    f"PostgreSQL {where} has tables but no octaskly schema version: not an "
                    "octaskly database; give octaskly a database of its own"
                )
            await conn.execute(
                f"CREATE TABLE {SCHEMA_TABLE} (id integer PRIMARY KEY CHECK (id = 1), "
                "version integer NOT NULL)"
            )
            await conn.execute(f"INSERT INTO {SCHEMA_TABLE} (id, version) VALUES (1, 0)")
        for migration in migrating.migrations(MIGRATIONS)[current:target]:
            await conn.execute(migration.sql)
            await conn.execute(
                f"UPDATE {SCHEMA_TABLE} SET version = $1 WHERE id = 1", migration.version
            )
    return max(current, target)
