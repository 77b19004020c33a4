"""Schema migrations: numbered `migrations/NNN_name.sql` files applied in order.

Each migration runs in one transaction together with the bump of `PRAGMA user_version`,
so a database is always exactly at one version. A database newer than the code is
refused rather than guessed at.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import sqlite3
from importlib import resources

import aiosqlite

from octaskly import errors

_FILE_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: `NNN_name.sql` brings a database from version NNN-1 to NNN."""

    version: int
    name: str
    sql: str


@functools.cache
def migrations(directory: str = "migrations") -> tuple[Migration, ...]:
    """All migrations shipped with this octaskly, in version order (1, 2, … N): SQLite's
    in `migrations/`, PostgreSQL's in `migrations_pg/`."""
    found = []
    for entry in resources.files("octaskly.store").joinpath(directory).iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        # A packaging mistake, not a user error: fail loudly.
        raise RuntimeError(f"migration files are not numbered 1..N: {versions}")
    return tuple(found)


def latest_version() -> int:
    """The schema version this octaskly creates and understands."""
    return len(migrations())


async def current_version(db: aiosqlite.Connection) -> int:
    """The schema version recorded in the database (0: no octaskly schema yet)."""
    rows = list(await db.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


async def migrate(db: aiosqlite.Connection, *, target: int | None = None) -> int:
    """Bring the schema to `target` (default: the latest); return the version reached.

    `db` must be in autocommit mode (isolation_level=None). Raises StorageError when the
    database is newer than this code; lets sqlite3 errors through for the caller to
    translate (a full disk, a read-only file).
    """
    latest = latest_version()
    target = latest if target is None else target
    current = await current_version(db)
    if current > latest:
        raise errors.StorageError(
            f"database schema version {current} is newer than this octaskly supports "
            f"({latest}); upgrade octaskly"
        )
    for migration in migrations()[current:target]:
        await _apply(db, migration)
    return max(current, target)


async def _apply(db: aiosqlite.Connection, migration: Migration) -> None:
    # executescript runs the whole file; BEGIN/COMMIT inside it make the file and the
    # version bump one transaction (executescript itself would commit a pending one).
    script = (
        f"BEGIN IMMEDIATE;\n{migration.sql}\n;\nPRAGMA user_version = {migration.version};\nCOMMIT;"
    )
    try:
        await db.executescript(script)
    except sqlite3.Error:
        with contextlib.suppress(sqlite3.Error):
            await db.execute("ROLLBACK")
        raise
