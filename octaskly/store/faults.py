"""What can be wrong with the database file: found early, told so an operator can act.

On open, `check_intact` and `check_writable` find corruption, a foreign database and a
read-only file before the first write would. `storage_error` turns SQLite's result codes
into StorageErrors whose message names the file, the cause and the remedy (restore a
backup, fix permissions, free space).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite

from octaskly import errors
from octaskly.store import migrating, queries

# Primary result codes (an exception's sqlite_errorcode is extended: primary = code & 0xff).
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26


async def check_intact(db: aiosqlite.Connection, path: Path) -> None:
    """Raise StorageError if the file is corrupt or some other program's database."""
    # quick_check reads every page (about 1 s per 500 MB) but skips the costly index
    # cross-checks of integrity_check: cheap enough for every start.
    problems = [str(r[0]) for r in await db.execute_fetchall("PRAGMA quick_check")]
    if problems != ["ok"]:
        # one row may hold hundreds of lines ("Page 35 is never used", …): name a few
        lines = [x for p in problems for x in p.splitlines() if x.strip() and x[:3] != "***"]
        lines = lines or problems
        more = f"; {len(lines) - 3} more problems" if len(lines) > 3 else ""
        raise errors.StorageError(corrupt_message(path, "; ".join(lines[:3]) + more))
    if await migrating.current_version(db) == 0 and await scalar(db, queries.USER_TABLES):
        raise errors.StorageError(
            f"{path} is an SQLite database but not an octaskly one (it has tables but no "
            "octaskly schema version); choose another --db-path"
        )


async def check_writable(db: aiosqlite.Connection) -> None:
    """Fail now if the file is read-only: SQLite silently opens such a file read-only."""
    version = await migrating.current_version(db)
    await db.execute("BEGIN IMMEDIATE")
    try:
        await db.execute(f"PRAGMA user_version = {version}")  # a write, rolled back
    finally:
        await rollback(db)


async def rollback(db: aiosqlite.Connection) -> None:
    """Roll back the open transaction, if SQLite has not done so itself already."""
    # After SQLITE_FULL, for instance, SQLite may have rolled back: then ROLLBACK fails.
    with contextlib.suppress(sqlite3.Error, ValueError):
        await db.execute("ROLLBACK")


async def scalar(db: aiosqlite.Connection, sql: str) -> Any:
    """The first column of the first row."""
    return next(iter(await db.execute_fetchall(sql)))[0]


def storage_error(exc: sqlite3.Error, path: Path) -> errors.StorageError:
    """A StorageError that tells an operator what is wrong with `path` and what to do."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == _SQLITE_FULL or (code == _SQLITE_IOERR and _no_space(path)):
        return full_error(path)
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return errors.StorageError(corrupt_message(path, str(exc)))
    if code == _SQLITE_READONLY or (code == _SQLITE_CANTOPEN and _read_only(path)):
        return errors.StorageError(read_only_message(path, str(exc)))
    if code == _SQLITE_CANTOPEN and path.is_dir():
        return errors.StorageError(f"cannot open database {path}: it is a directory")
    if code == _SQLITE_IOERR:
        return errors.StorageError(f"I/O error on database {path} ({exc}); check the disk")
    return errors.StorageError(f"database {path}: {exc}")


def os_error(exc: OSError, path: Path) -> errors.StorageError:
    """A StorageError for a failure to create the database's directory or file."""
    if exc.errno == errno.ENOSPC:
        return full_error(path)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return errors.StorageError(read_only_message(path, exc.strerror or str(exc)))
    where = f"{exc.filename}: " if exc.filename and str(exc.filename) != str(path) else ""
    return errors.StorageError(f"cannot open database {path}: {where}{exc.strerror or exc}")


def full_error(path: Path) -> errors.StorageFullError:
    """The disk is full: temporary, the caller may retry once space is freed."""
    return errors.StorageFullError(
        f"the disk holding {path} is full; the write was not saved. Free some space, then retry",
        delay=5.0,
    )


def corrupt_message(path: Path, detail: str) -> str:
    """What to do about a corrupt database file."""
    return (
        f"database {path} is corrupt ({detail}). Stop octaskly and restore the last good "
        f"backup with `octaskly restore FILE --db-path {shlex.quote(str(path))}` (backups "
        f"come from `octaskly backup --output FILE`), or move {path} aside to start with an "
        "empty queue"
    )


def read_only_message(path: Path, detail: str) -> str:
    """What to do about a database octaskly cannot write."""
    return (
        f"database {path} is read-only ({detail}): octaskly must write it and create "
        f"{path.name}-wal and {path.name}-shm beside it in {path.parent}. Check the "
        "permissions, the mount options and `lsattr`, or choose another --db-path"
    )


def _read_only(path: Path) -> bool:
    """Whether the file or its directory cannot be written (read-only mount, mode, chattr)."""
    for candidate in (path, path.parent):
        try:
            if os.statvfs(candidate).f_flag & os.ST_RDONLY:
                return True
        except OSError:
            continue
        if not os.access(candidate, os.W_OK):
            return True
    return False


def _no_space(path: Path) -> bool:
    # A full disk can surface as an I/O error (e.g. while growing the -shm file).
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False
