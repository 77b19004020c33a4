"""Every SQL statement of the SQLite store, and the mapping between a task and its row.

Only `octaskly.store.sqlite` reads this module. The schema itself lives in
`migrations/NNN_*.sql`; the column names here must match it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

from octaskly.domain import models
from octaskly.store import base

# Columns written by an insert, in the order of `task_row` (queue_seq is prepended by the
# writer, which alone knows the next number).
INSERT_COLUMNS = (
    "queue_seq",
    "id",
    "status",
    "priority",
    "command",
    "spec",
    "requirements",
    "timeout",
    "attempts",
    "worker_id",
    "exit_code",
    "stdout",
    "stderr",
    "stdout_dropped",
    "stderr_dropped",
    "duration_ms",
    "error",
    "created_at",
    "started_at",
    "completed_at",
    "not_before",
    "lost_count",
    "owner",
    "idempotency_key",
    "request_id",
)

# Columns read back into a Task. `priority`, `command` and `requirements` are copies of
# parts of `spec`, kept in their own columns for indexes and cheap queue reads.
TASK_FIELDS = tuple(c for c in INSERT_COLUMNS if c not in {"priority", "command", "requirements"})

INSERT_TASK = (
    f"INSERT INTO tasks ({', '.join(INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in INSERT_COLUMNS)})"
)

_SELECT_TASK = f"SELECT {', '.join(TASK_FIELDS)} FROM tasks"

GET_TASK = f"{_SELECT_TASK} WHERE id = ?"

MAX_SEQ = "SELECT ifnull(max(queue_seq), 0) FROM tasks"

# Replication (migration 003): the position and the term history.
GET_POSITION = "SELECT db_id, lsn, term FROM replication WHERE id = 1"
BUMP_LSN = "UPDATE replication SET lsn = lsn + 1 WHERE id = 1"
SET_POSITION = "UPDATE replication SET lsn = ?, term = ? WHERE id = 1"
GET_TERMS = "SELECT term, start_lsn FROM terms ORDER BY term"
INSERT_TERM = "INSERT OR REPLACE INTO terms (term, start_lsn) VALUES (?, ?)"
CLEAR_TERMS = "DELETE FROM terms"

# `ifnull(owner, '')` matches the expression of the unique index, so a NULL owner is one
# owner rather than a fresh one per row (SQLite treats NULLs as distinct in UNIQUE).
FIND_BY_KEY = f"{_SELECT_TASK} WHERE ifnull(owner, '') = ? AND idempotency_key = ?"

# The literal 'queued' (not a parameter) lets the planner use the partial queue index. The
# sandbox level is read from the spec ('$.sandbox_level' is the top-level key, never one in
# `env` or `labels`): one JSON parse per row, about 1 us for a typical spec.
QUEUED_REFS = (
    "SELECT id, queue_seq, priority, created_at, requirements, not_before, "
    "json_extract(spec, '$.sandbox_level') FROM tasks "
    "WHERE status = 'queued' AND priority = ? AND queue_seq > ? ORDER BY queue_seq LIMIT ?"
)

RUNNING_TASKS = f"{_SELECT_TASK} WHERE status = 'running' ORDER BY queue_seq"

COUNT_BY_STATUS = "SELECT status, count(*) FROM tasks GROUP BY status"
QUEUED_BY_PRIORITY = (
    "SELECT priority, count(*) FROM tasks WHERE status = 'queued' GROUP BY priority"
)

HAS_TASKS = "SELECT 1 FROM tasks LIMIT 1"

# Retention (migration 004): finished tasks that completed before a cutoff, oldest first,
# at most a batch; the ids of those deleted come back (for replication). INDEXED BY: left to
# itself the planner prefers tasks_status and sorts every finished task by completed_at.
# The status list is the literal WHERE of the partial index tasks_finished (else SQLite may
# not use it), so queued and running tasks are never touched.
PRUNE_TASKS = (
    "DELETE FROM tasks WHERE pk IN (SELECT pk FROM tasks INDEXED BY tasks_finished "
    "WHERE status IN ('completed', 'failed', 'timed_out', 'cancelled') AND completed_at < ? "
    "ORDER BY completed_at LIMIT ?) RETURNING id"
)

USER_TABLES = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"


def get_tasks(count: int) -> str:
    """Tasks by id; `count` placeholders."""
    return f"{_SELECT_TASK} WHERE id IN ({', '.join('?' for _ in range(count))})"


def delete_tasks(count: int) -> str:
    """Delete tasks by id (a standby applying the primary's deletions); `count` placeholders."""
    return f"DELETE FROM tasks WHERE id IN ({', '.join('?' for _ in range(count))})"


def existing_keys(count: int) -> str:
    """Which of `count` idempotency keys of one owner exist (owner is the first parameter)."""
    marks = ", ".join("?" for _ in range(count))
    return (
        "SELECT idempotency_key FROM tasks "
        f"WHERE ifnull(owner, '') = ? AND idempotency_key IN ({marks}) LIMIT 1"
    )


def list_filter(
    status: models.TaskStatus | None, worker_id: str | None, owner: str | None
) -> tuple[str, list[Any]]:
    """The WHERE clause (possibly empty) and its parameters for `list_tasks`."""
    terms: list[str] = []
    params: list[Any] = []
    for column, value in (("status", status), ("worker_id", worker_id), ("owner", owner)):
        if value is not None:
            terms.append(f"{column} = ?")
            params.append(str(value))
    return (f" WHERE {' AND '.join(terms)}" if terms else ""), params


def list_tasks(where: str) -> str:
    """A page of tasks matching `where`, newest first; LIMIT and OFFSET come last."""
    # created_at can repeat (a batch shares one clock reading): pk keeps insertion order.
    return f"{_SELECT_TASK}{where} ORDER BY created_at DESC, pk DESC LIMIT ? OFFSET ?"


def count_tasks(where: str) -> str:
    """How many tasks match `where`."""
    return f"SELECT count(*) FROM tasks{where}"


class UpdateShape(NamedTuple):
    """What a compare-and-set update changes and checks; updates of one shape can share
    one statement. `columns` come from `store.base.UPDATABLE_COLUMNS` (validated by
    TaskUpdate), so formatting them into SQL is safe."""

    columns: tuple[str, ...]
    statuses: int
    with_attempts: bool


class Update(NamedTuple):
    """One compare-and-set update: its shape and its parameters (the new values in
    `columns` order, the task id, the expected statuses, then the expected attempts)."""

    shape: UpdateShape
    params: list[Any]

    @property
    def task_id(self) -> Any:
        return self.params[len(self.shape.columns)]


@functools.lru_cache(maxsize=256)
def update_task(shape: UpdateShape) -> str:
    """The statement of one update, returning a row only when it applied."""
    where = "id = ?"
    if shape.statuses:
        where += f" AND status IN ({', '.join('?' for _ in range(shape.statuses))})"
    if shape.with_attempts:
        where += " AND attempts = ?"
    if not shape.columns:  # nothing to change: report whether the expectations hold
        return f"SELECT 1 FROM tasks WHERE {where}"
    assignments = ", ".join(f"{c} = ?" for c in shape.columns)
    return f"UPDATE tasks SET {assignments} WHERE {where} RETURNING 1"


@functools.lru_cache(maxsize=1024)
def update_tasks(shape: UpdateShape, rows: int) -> str:
    """One statement for `rows` updates of one shape (distinct task ids), returning the ids
    of the tasks it changed. Parameters: each update's, one after the other."""
    width = len(shape.columns) + 1 + shape.statuses + int(shape.with_attempts)
    row = f"({', '.join('?' for _ in range(width))})"
    col = [f"v.column{i}" for i in range(1, width + 1)]
    n = len(shape.columns)
    assignments = ", ".join(f"{c} = {col[i]}" for i, c in enumerate(shape.columns))
    where = f"tasks.id = {col[n]}"
    if shape.statuses:
        where += f" AND tasks.status IN ({', '.join(col[n + 1 : n + 1 + shape.statuses])})"
    if shape.with_attempts:
        where += f" AND tasks.attempts = {col[-1]}"
    return (
        f"UPDATE tasks SET {assignments} FROM (VALUES {', '.join([row] * rows)}) AS v "
        f"WHERE {where} RETURNING tasks.id"
    )


def update_statement(update: base.TaskUpdate) -> Update:
    """The compare-and-set statement of one TaskUpdate and its parameters."""
    columns = tuple(sorted(update.changes))
    values = [
        models.TaskStatus(update.changes[c]).value if c == "status" else update.changes[c]
        for c in columns
    ]
    expected = update.expect_status
    if isinstance(expected, models.TaskStatus):
        expected = frozenset({expected})
    statuses = sorted(models.TaskStatus(s).value for s in expected or ())
    if expected is not None and not statuses:
        statuses = [""]  # no status expected: match no row (CHECK forbids '')
    attempts = [] if update.expect_attempts is None else [update.expect_attempts]
    shape = UpdateShape(columns, len(statuses), bool(attempts))
    return Update(shape, [*values, update.task_id, *statuses, *attempts])


_DEFAULT_REQUIREMENTS = models.Requirements()


def task_row(task: models.Task) -> tuple[Any, ...]:
    """A task's column values in INSERT_COLUMNS order, without the leading queue_seq."""
    spec = task.spec
    requirements = None
    if spec.requirements != _DEFAULT_REQUIREMENTS:
        requirements = spec.requirements.model_dump_json()
    return (
        task.id,
        models.TaskStatus(task.status).value,
        int(spec.priority),
        spec.command,
        spec.model_dump_json(),
        requirements,
        task.timeout,
        task.attempts,
        task.worker_id,
        task.exit_code,
        task.stdout,
        task.stderr,
        task.stdout_dropped,
        task.stderr_dropped,
        task.duration_ms,
        task.error,
        task.created_at,
        task.started_at,
        task.completed_at,
        task.not_before,
        task.lost_count,
        task.owner,
        task.idempotency_key,
        task.request_id,
    )


def task_from_row(row: Sequence[Any]) -> models.Task:
    """A Task from a row selected with TASK_FIELDS."""
    data = dict(zip(TASK_FIELDS, row, strict=True))
    data["spec"] = models.TaskSpec.model_validate_json(data["spec"])
    return models.Task.model_validate(data)


def sandbox_level(value: str | None) -> models.SandboxLevel | None:
    """A stored spec's `sandbox_level` (as the queue query reads it)."""
    return None if value is None else models.SandboxLevel(value)


@functools.lru_cache(maxsize=4096)
def requirements(encoded: str | None) -> models.Requirements:
    """Parsed requirements; cached because most queued tasks share a handful of them.

    Requirements are frozen, so sharing one instance between tasks is safe.
    """
    if encoded is None:
        return _DEFAULT_REQUIREMENTS
    return models.Requirements.model_validate_json(encoded)


# -- tokens ---------------------------------------------------------------------------------
_TOKEN_COLUMNS = "jti, subject, role, issued_at, expires_at, revoked_at"
INSERT_TOKEN = f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
INSERT_REVOCATION = "INSERT OR IGNORE INTO tokens (jti, expires_at) VALUES (?, ?)"
REVOKE_TOKEN = "UPDATE tokens SET revoked_at = ? WHERE jti = ? AND revoked_at IS NULL"
REVOKED_TOKENS = "SELECT jti FROM tokens WHERE revoked_at IS NOT NULL AND expires_at > ?"
GET_TOKEN = f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE jti = ?"


def token_row(record: base.TokenRecord) -> tuple[Any, ...]:
    return (
        record.jti,
        record.subject,
        record.role,
        record.issued_at,
        record.expires_at,
        record.revoked_at,
    )


def token_from_row(row: Sequence[Any]) -> base.TokenRecord:
    jti, subject, role, issued_at, expires_at, revoked_at = row
    return base.TokenRecord(
        jti=jti,
        subject=subject,
        role=role,
        issued_at=issued_at,
        expires_at=expires_at,
        revoked_at=revoked_at,
    )
