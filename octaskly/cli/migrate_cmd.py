"""`octaskly migrate --from sqlite:PATH --to postgresql://…`: move an installation from its
SQLite file to a PostgreSQL database, and prove nothing was lost.

What moves: every task with all its fields (a task that was running becomes queued with
its attempt count kept, so its worker re-attaches it to the new dispatcher instead of it
running again, exactly as after a restart), every token and revocation, and the audit
log's hash chain (into `audit_archive`, with its MAC'd head). What is checked afterwards:
tasks by status, tokens and revocations counted on both sides, and the audit chain read
back from PostgreSQL and verified with the cluster key.

It reads a consistent snapshot (SQLite's online backup), so it may run while the
dispatcher runs; if the dispatcher wrote anything after the snapshot, it says so and
fails: stop the dispatcher and run it again with `--replace`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path

from octaskly import errors
from octaskly.domain import models
from octaskly.services import auditing
from octaskly.store import backup, base, postgres, queries, sqlite

CHUNK = 1000


@dataclasses.dataclass
class Report:
    tasks: dict[str, int]
    requeued: int
    tokens: int
    revoked: int
    audit_entries: int | None
    lines: list[str] = dataclasses.field(default_factory=list)


def parse_source(text: str) -> Path:
    if not text.startswith("sqlite:") or len(text) == len("sqlite:"):
        raise errors.ConfigError(f"--from must be sqlite:PATH (got {text!r})")
    return Path(text.removeprefix("sqlite:"))


async def migrate(
    source: Path,
    url: str,
    *,
    audit_log: Path | None,
    secrets: Sequence[bytes],
    replace: bool = False,
) -> Report:
    if not source.is_file():
        raise errors.ConfigError(f"no SQLite database at {source}")
    if audit_log is not None and not secrets:
        raise errors.ConfigError(
            "the audit chain is verified with the cluster key: pass --secret-key-file PATH "
            "(or --no-audit to leave the audit log behind)"
        )
    with tempfile.TemporaryDirectory(prefix="octaskly-migrate-") as tmp:
        snapshot = Path(tmp) / "snapshot.db"
        try:
            backup.copy(source, snapshot)
        except (OSError, sqlite3.Error) as exc:
            raise errors.StorageError(f"cannot read {source}: {exc}") from exc
        before = sqlite.read_position(snapshot)
        tasks, tokens = _read(snapshot)
        target = postgres.PostgresStore(url, application_name="octaskly migrate", owner="migrate")
        await target.open()
        try:
            report = await _copy(target, tasks, tokens, replace=replace)
            if audit_log is not None:
                report.audit_entries = await _copy_audit(target, audit_log, secrets, Path(tmp))
        finally:
            await target.close()
    after = sqlite.read_position(source)
    if after.lsn != before.lsn:
        raise errors.StorageError(
            f"the dispatcher wrote {after.lsn - before.lsn} more transactions to {source} "
            "while it was being copied: stop it, then run octaskly migrate again with "
            "--replace (the copy in PostgreSQL is incomplete)"
        )
    return report


def _read(path: Path) -> tuple[list[models.Task], list[base.TokenRecord]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            f"SELECT {', '.join(queries.TASK_FIELDS)} FROM tasks ORDER BY queue_seq, pk"
        ).fetchall()
        token_rows = conn.execute(
            "SELECT jti, subject, role, issued_at, expires_at, revoked_at FROM tokens"
        ).fetchall()
    except sqlite3.Error as exc:
        raise errors.StorageError(f"{path} is not an octaskly database: {exc}") from None
    finally:
        conn.close()
    return [queries.task_from_row(r) for r in rows], [queries.token_from_row(r) for r in token_rows]


async def _copy(
    target: postgres.PostgresStore,
    tasks: list[models.Task],
    tokens: list[base.TokenRecord],
    *,
    replace: bool,
) -> Report:
    if not await target.is_empty():
        if not replace:
            raise errors.ConfigError(
                f"PostgreSQL {target.where} already holds octaskly data: migrate into an "
                "empty database, or pass --replace to delete what is there first"
            )
        await target.wipe()
    expected = dict.fromkeys((s.value for s in models.TaskStatus), 0)
    requeued = 0
    for task in tasks:
        if task.status == models.TaskStatus.RUNNING:
            # its worker reports it to the new dispatcher and re-attaches it (same attempt)
            task.status = models.TaskStatus.QUEUED
            requeued += 1
        expected[task.status.value] += 1
    for start in range(0, len(tasks), CHUNK):
        await target.insert_tasks(tasks[start : start + CHUNK])
    if tokens:
        await target.import_tokens(tokens)
    got = {s.value: n for s, n in (await target.count_by_status()).items()}
    if got != expected:
        raise errors.StorageError(
            f"task counts differ after the copy: expected {expected}, found {got}"
        )
    revoked = sum(1 for t in tokens if t.revoked_at is not None)
    if await target.count_tokens() != (len(tokens), revoked):
        raise errors.StorageError("token counts differ after the copy")
    return Report(expected, requeued, len(tokens), revoked, None)


async def _copy_audit(
    target: postgres.PostgresStore, path: Path, secrets: Sequence[bytes], tmp: Path
) -> int:
    if not path.is_file():
        raise errors.ConfigError(f"no audit log at {path} (pass --no-audit to go without)")
    verdict = auditing.verify(path, list(secrets))
    if not verdict.ok:
        raise errors.StorageError(
            f"the audit chain of {path} does not verify, not copied: "
            + "; ".join(verdict.problems[:3])
        )
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    head_path = path.with_name(path.name + auditing.HEAD_SUFFIX)
    head = head_path.read_text()
    source = f"{socket.gethostname()}:{path.resolve()}"
    await target.archive_audit(source, lines, head)
    back_lines, back_head = await target.archived_audit(source)
    check = tmp / "audit.log"
    check.write_text("".join(f"{ln}\n" for ln in back_lines))
    check.with_name(check.name + auditing.HEAD_SUFFIX).write_text(back_head or "")
    again = auditing.verify(check, list(secrets))
    with contextlib.suppress(OSError):
        os.unlink(check)
    if not again.ok or again.entries != verdict.entries or again.last_seq != verdict.last_seq:
        raise errors.StorageError(
            "the audit chain read back from PostgreSQL does not verify: "
            + "; ".join(again.problems[:3] or ["entry counts differ"])
        )
    return verdict.entries
