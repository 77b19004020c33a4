"""The store interface: everything the dispatcher needs from durable storage.

Implementations: `octaskly.store.sqlite.SQLiteStore` (the default, embedded) and
`octaskly.testing.InMemoryStore` (unit tests). A later one will speak PostgreSQL.

Durability contract: when an awaited write method returns, the change is committed
(with SQLite: fsynced under `synchronous=FULL`). Concurrent writers are group-committed:
many callers share one transaction and one fsync, each isolated by its own savepoint, so
one caller's failure never undoes another's write.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from octaskly.domain import models

# Columns a TaskUpdate may set. Everything else in a task is immutable after insert.
UPDATABLE_COLUMNS = frozenset(
    {
        "status",
        "attempts",
        "worker_id",
        "exit_code",
        "stdout",
        "stderr",
        "stdout_dropped",
        "stderr_dropped",
        "duration_ms",
        "error",
        "started_at",
        "completed_at",
        "not_before",
        "lost_count",
        "queue_seq",
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class QueuedRef:
    """The little the scheduler needs of a queued task; the full record stays on disk."""

    id: str
    queue_seq: int
    priority: models.Priority
    created_at: float
    requirements: models.Requirements
    not_before: float | None = None
    sandbox_level: models.SandboxLevel | None = None
    """The level the task asked for (`spec.sandbox_level`)."""


@dataclasses.dataclass(frozen=True, slots=True)
class TaskUpdate:
    """Set `changes` on one task, but only if the expectations still hold (compare-and-set).

    `expect_status` / `expect_attempts` guard against lost races: a late result from an
    attempt that was already given up on does not match and is not applied.
    """

    task_id: str
    changes: Mapping[str, Any]
    expect_status: models.TaskStatus | frozenset[models.TaskStatus] | None = None
    expect_attempts: int | None = None
    owned: bool = False
    """Only if this dispatcher holds the run (a store shared by several dispatchers checks
    the run's owner; one dispatcher's own store owns everything)."""

    def __post_init__(self) -> None:
        unknown = set(self.changes) - UPDATABLE_COLUMNS
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")


@dataclasses.dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[models.Task]
    total: int


class DuplicateIdempotencyKey(Exception):
    """insert_tasks hit an (owner, idempotency_key) pair that already exists."""

    def __init__(self, owner: str | None, key: str) -> None:
        super().__init__(key)
        self.owner = owner
        self.key = key


@dataclasses.dataclass(frozen=True, slots=True)
class TokenRecord:
    """An API token the dispatcher knows of: issued by it, or revoked through it."""

    jti: str
    expires_at: float
    subject: str | None = None
    role: str | None = None
    issued_at: float | None = None
    revoked_at: float | None = None


class Store(Protocol):
    """Durable task storage. All methods are coroutine-safe."""

    async def open(self) -> None:
        """Create or migrate the schema; raise StorageError if the database is unusable."""

    async def close(self) -> None:
        """Flush pending writes and close."""

    async def insert_tasks(self, tasks: Sequence[models.Task]) -> list[int]:
        """Insert all tasks atomically and durably; return their assigned queue_seq.

        `Task.seq` of the inputs is ignored. Raises DuplicateIdempotencyKey (and inserts
        nothing) when a task's (owner, idempotency_key) exists already.
        """

    async def apply(self, updates: Sequence[TaskUpdate]) -> list[bool]:
        """Apply updates durably, each only if its expectations hold; report which did."""

    def apply_soon(self, updates: Sequence[TaskUpdate]) -> None:
        """Queue updates behind every write already queued, without waiting for the commit.

        For bookkeeping whose loss in a crash is harmless (e.g. `running` marks, which
        recovery re-queues anyway). Ordering with later awaited writes is preserved.
        """

    async def barrier(self) -> None:
        """Return once every write queued before this call is committed (or failed)."""

    async def claim(self, updates: Sequence[TaskUpdate]) -> list[bool]:
        """`apply` for assignments (queued → running): on a database shared by several
        dispatchers a task another one is claiming at this moment is skipped (False)
        rather than waited for; the winner owns the run."""

    async def prune_tasks(self, completed_before: float, *, batch: int = 1000) -> int:
        """Delete, durably, every finished task (completed, failed, timed_out, cancelled)
        whose `completed_at` is before `completed_before`, in transactions of at most
        `batch` tasks; return how many were deleted. Queued and running tasks are never
        deleted. A deleted task's idempotency key is forgotten with it."""

    async def get_task(self, task_id: str) -> models.Task | None: ...

    async def get_tasks(self, task_ids: Sequence[str]) -> list[models.Task]:
        """The tasks that exist among `task_ids`, in any order."""

    async def find_by_idempotency_key(self, owner: str | None, key: str) -> models.Task | None: ...

    async def list_tasks(
        self,
        *,
        status: models.TaskStatus | None = None,
        worker_id: str | None = None,
        owner: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> TaskPage:
        """Newest first (by creation), with the total matching count."""

    async def queued_refs(
        self, priority: models.Priority, after_queue_seq: int, limit: int
    ) -> list[QueuedRef]:
        """Queued tasks of one priority with queue_seq > after, in queue_seq order."""

    async def running_tasks(self) -> list[models.Task]:
        """Tasks whose status is running (used for recovery after a restart)."""

    async def count_by_status(self) -> dict[models.TaskStatus, int]: ...

    async def queued_by_priority(self) -> dict[models.Priority, int]:
        """How many tasks are queued at each priority (every priority present)."""

    async def size_bytes(self) -> int:
        """Bytes the database uses on disk (0 for in-memory stores)."""

    async def check(self) -> None:
        """Raise StorageError if the database cannot serve reads and writes now."""

    async def record_token(self, record: TokenRecord) -> None:
        """Remember an issued token (durably); a jti is recorded once."""

    async def revoke_token(self, jti: str, *, revoked_at: float, expires_at: float) -> bool:
        """Mark a token revoked (durably), recording it if unknown; False if it was revoked
        already."""

    async def revoked_tokens(self, now: float) -> set[str]:
        """The jti of every revoked token that has not expired yet."""

    async def get_token(self, jti: str) -> TokenRecord | None: ...
