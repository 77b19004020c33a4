"""Online backup and restore of the SQLite database.

`backup` uses SQLite's backup API in one step, i.e. inside one read transaction: the copy
is a consistent snapshot even while the dispatcher keeps committing (WAL lets it write
meanwhile). It goes to a temporary file next to the target, is checked with
`PRAGMA integrity_check`, made 0600 and renamed into place, so a half-written backup never
carries the final name. `restore` checks the backup first, keeps the current database
aside (`<db>.before-restore-<time>`) and copies the backup into place the same way.
Refusing to restore under a running dispatcher is the caller's job (the data dir lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import time
from pathlib import Path

from octaskly import errors
from octaskly.store import migrating

SIDE_FILES = ("-wal", "-shm", "-journal")


@dataclasses.dataclass(frozen=True)
class Info:
    path: Path
    bytes: int
    tasks: int
    schema_version: int


def copy(source: Path, target: Path) -> None:
    """A consistent copy of `source` at `target` (0600, atomically renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)  # pages=-1: all pages in one step, one read snapshot
                dst.execute("PRAGMA journal_mode = DELETE")  # a single self-contained file
            finally:
                dst.close()
        finally:
            src.close()
        check(tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def check(path: Path) -> Info:
    """The facts of a database file that passes `PRAGMA integrity_check` and has an
    octaskly schema this version can open; StorageError saying what is wrong otherwise."""
    if not path.is_file():
        raise errors.StorageError(f"{path}: no such file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = [row[0] for row in conn.execute("PRAGMA integrity_check")]
            if result != ["ok"]:
                raise errors.StorageError(
                    f"{path}: integrity check failed: {'; '.join(map(str, result[:5]))}"
                )
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            if "tasks" not in tables or version < 1:
                raise errors.StorageError(f"{path}: not an octaskly database")
            if version > migrating.latest_version():
                raise errors.StorageError(
                    f"{path}: schema version {version} is newer than this octaskly "
                    f"supports ({migrating.latest_version()})"
                )
            tasks = int(conn.execute("SELECT count(*) FROM tasks").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise errors.StorageError(f"{path}: not a usable SQLite database: {exc}") from None
    return Info(path, path.stat().st_size, tasks, version)


def backup(db_path: Path, output: Path, *, force: bool = False) -> Info:
    """Copy the live database at `db_path` to `output`."""
    if not db_path.is_file():
        raise errors.StorageError(f"no database at {db_path}")
    if output.exists() and not force:
        raise errors.ConfigError(f"{output} exists; choose another name or pass --force")
    try:
        copy(db_path, output)
    except sqlite3.Error as exc:
        raise errors.StorageError(f"backup of {db_path} failed: {exc}") from None
    return check(output)


def restore(backup_file: Path, db_path: Path) -> tuple[Info, Path | None]:
    """Replace the database at `db_path` by `backup_file` (checked first); the old one is
    kept beside it. Returns the restored database's facts and where the old one went."""
    check(backup_file)
    kept: Path | None = None
    if db_path.exists():
        kept = db_path.with_name(f"{db_path.name}.before-restore-{time.strftime('%Y%m%d%H%M%S')}")
        try:
            copy(db_path, kept)  # consistent, WAL folded in
        except (errors.StorageError, sqlite3.DatabaseError):
            # a corrupt database (the usual reason to restore) cannot be copied: keep its
            # files aside as they are
            for suffix in ("", "-wal"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{db_path}{suffix}", f"{kept}{suffix}")
    for suffix in SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            Path(f"{db_path}{suffix}").unlink()
    try:
        copy(backup_file, db_path)
    except sqlite3.Error as exc:
        raise errors.StorageError(f"restore of {backup_file} failed: {exc}") from None
    return check(db_path), kept
