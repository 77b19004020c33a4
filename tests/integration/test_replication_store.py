"""The SQLite store's replication half: positions, captured changes, applying them on a
second database, term history and snapshots. Real files, two stores side by side."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from octaskly import errors, testing
from octaskly.domain import models
from octaskly.store import base, changes, sqlite


@contextlib.asynccontextmanager
async def opened(path: Path) -> AsyncIterator[sqlite.SQLiteStore]:
    store = sqlite.SQLiteStore(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def rows(path: Path, sql: str) -> list[Any]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql).fetchall()


async def test_a_new_database_starts_at_term_1_lsn_0_with_its_own_id(tmp_path: Path) -> None:
    async with opened(tmp_path / "a.db") as a, opened(tmp_path / "b.db") as b:
        assert (a.position.term, a.position.lsn) == (1, 0)
        assert len(a.position.db_id) == 32 and a.position.db_id != b.position.db_id
        assert await a.history() == [(1, 0)]


async def test_every_changing_commit_counts_one_and_is_captured_as_row_images(
    tmp_path: Path,
) -> None:
    captured: list[changes.Change] = []
    async with opened(tmp_path / "p.db") as primary:
        await primary.capture_changes(captured.append)
        task = testing.new_task("echo hi")
        await primary.insert_tasks([task])
        assert primary.position.lsn == 1 and [c.lsn for c in captured] == [1]
        # a compare-and-set that does not match changes nothing: no transaction number
        (ok,) = await primary.apply(
            [base.TaskUpdate(task.id, {"attempts": 5}, expect_status=models.TaskStatus.RUNNING)]
        )
        assert not ok and primary.position.lsn == 1 and len(captured) == 1
        await primary.apply([base.TaskUpdate(task.id, {"status": models.TaskStatus.RUNNING})])
        await primary.record_token(base.TokenRecord(jti="j1", expires_at=2e9, role="admin"))
        await primary.revoke_token("j1", revoked_at=1.0, expires_at=2e9)
        assert [c.lsn for c in captured] == [1, 2, 3, 4]
        assert primary.position.lsn == 4
        assert "running" in captured[1].tasks[0]
        assert len(captured[1].tasks) == 1 and not captured[1].tokens
        assert [r[0] for r in captured[3].tokens] == ["j1"]
    assert rows(tmp_path / "p.db", "SELECT lsn FROM replication") == [(4,)]


async def test_a_standby_applying_the_changes_ends_identical(tmp_path: Path) -> None:
    captured: list[changes.Change] = []
    async with opened(tmp_path / "p.db") as primary, opened(tmp_path / "s.db") as standby:
        await primary.capture_changes(captured.append)
        tasks = [testing.new_task(f"echo {i}") for i in range(50)]
        await primary.insert_tasks(tasks[:25])
        await primary.insert_tasks(tasks[25:])
        await primary.apply(
            [base.TaskUpdate(t.id, {"status": models.TaskStatus.RUNNING}) for t in tasks[::2]]
        )
        await primary.record_token(base.TokenRecord(jti="j1", expires_at=2e9))
        await standby.set_history(await primary.history())
        for change in captured:
            wire = change.to_wire()
            task_width, token_width = standby.change_widths
            parsed = changes.Change.from_wire(wire, task_width=task_width, token_width=token_width)
            assert await standby.apply_change(parsed)
        assert not await standby.apply_change(captured[0])  # a resend is a no-op
        assert standby.position.lsn == primary.position.lsn == 4
        assert await standby.get_tasks([t.id for t in tasks]) and (
            sorted(await standby.get_tasks([t.id for t in tasks]), key=lambda t: t.id)
            == sorted(await primary.get_tasks([t.id for t in tasks]), key=lambda t: t.id)
        )
        assert await standby.get_token("j1") == await primary.get_token("j1")
        # a standby promoted later numbers new tasks after the replicated ones
        await standby.begin_term(2)
        (seq,) = await standby.insert_tasks([testing.new_task("after")])
        assert seq == 51
        assert standby.position.term == 2 and standby.position.lsn == 5
        assert await standby.history() == [(1, 0), (2, 4)]
    for table in ("tasks", "tokens"):
        p = rows(tmp_path / "p.db", f"SELECT * FROM {table} ORDER BY 1")
        s = rows(tmp_path / "s.db", f"SELECT * FROM {table} ORDER BY 1")
        assert s[: len(p)] == p


async def test_a_snapshot_carries_its_position(tmp_path: Path) -> None:
    async with opened(tmp_path / "p.db") as primary:
        await primary.insert_tasks([testing.new_task()])
        await primary.begin_term(3)
        await primary.insert_tasks([testing.new_task()])
        position = await primary.snapshot(tmp_path / "snap.db")
        assert position == primary.position
        assert (position.term, position.lsn) == (3, 2)
    assert (tmp_path / "snap.db").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("term", "lsn", "expected"),
    [
        (1, 4, True),
        (1, 5, False),
        (2, 7, True),
        (2, 9, True),
        (3, 9, True),
        (3, 10, False),
        (4, 1, False),
    ],
)
def test_on_history(term: int, lsn: int, expected: bool) -> None:
    history = [(1, 0), (2, 4), (3, 9)]
    assert changes.on_history(history, term, lsn, last_lsn=9) is expected


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {},
        {"lsn": 0, "term": 1, "at": 0, "tasks": [], "tokens": []},
        {"lsn": True, "term": 1, "at": 0, "tasks": [], "tokens": []},
        {"lsn": 1, "term": 1, "at": "x", "tasks": [], "tokens": []},
        {"lsn": 1, "term": 1, "at": 0, "tasks": [[1, 2]], "tokens": []},
        {"lsn": 1, "term": 1, "at": 0, "tasks": [], "tokens": [[{"a": 1}] * 6]},
        {"lsn": 1, "term": 1, "at": 0, "tasks": "x", "tokens": []},
    ],
)
def test_a_malformed_change_is_a_protocol_error(raw: Any) -> None:
    with pytest.raises(errors.ProtocolError):
        changes.Change.from_wire(raw, task_width=27, token_width=6)
