"""The SQLite store's replication half: positions, captured changes, applying them on a
second database, term history and snapshots. Real files, two stores side by side."""

from __future__ import annotations

import contextlib
import json
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


async def test_output_bytes_reach_the_standby_exactly(tmp_path: Path) -> None:
    """Task output is bytes (every value, invalid UTF-8 too): a change carries it through
    JSON, as on the wire, and the standby stores exactly what the primary has."""
    every = bytes(range(256))
    captured: list[changes.Change] = []
    async with opened(tmp_path / "p.db") as primary, opened(tmp_path / "s.db") as standby:
        await primary.capture_changes(captured.append)
        task = testing.new_task("binary", stdout=every, stderr=every[::-1])
        other = testing.new_task("later")
        await primary.insert_tasks([task, other])
        result = {"status": models.TaskStatus.COMPLETED, "stdout": every * 2, "stderr": b"\xff"}
        await primary.apply([base.TaskUpdate(other.id, result)])
        await standby.set_history(await primary.history())
        task_width, token_width = standby.change_widths
        for change in captured:
            wire = json.loads(json.dumps(change.to_wire()))
            parsed = changes.Change.from_wire(wire, task_width=task_width, token_width=token_width)
            assert await standby.apply_change(parsed)
        got = {t.id: t for t in await standby.get_tasks([task.id, other.id])}
        assert (got[task.id].stdout, got[task.id].stderr) == (every, every[::-1])
        assert (got[other.id].stdout, got[other.id].stderr) == (every * 2, b"\xff")
    p = rows(tmp_path / "p.db", "SELECT * FROM tasks ORDER BY 1")
    assert rows(tmp_path / "s.db", "SELECT * FROM tasks ORDER BY 1") == p


async def test_a_snapshot_carries_its_position(tmp_path: Path) -> None:
    async with opened(tmp_path / "p.db") as primary:
        await primary.insert_tasks([testing.new_task()])
        await primary.begin_term(3)
        await primary.insert_tasks([testing.new_task()])
        position = await primary.snapshot(tmp_path / "snap.db")
        assert position == primary.position
        assert (position.term, position.lsn) == (3, 2)
    assert (tmp_path / "snap.db").stat().st_mode & 0o777 == 0o600


async def test_pruned_tasks_are_deleted_on_the_standby_too(tmp_path: Path) -> None:
    """A deletion is a replicated transaction: the standby ends with the same rows (it
    does not keep pruned tasks forever, and a failover does not bring them back)."""
    captured: list[changes.Change] = []
    done = models.TaskStatus.COMPLETED
    async with opened(tmp_path / "p.db") as primary, opened(tmp_path / "s.db") as standby:
        await primary.capture_changes(captured.append)
        old = [testing.new_task(status=done, completed_at=10.0 + i) for i in range(30)]
        recent = [testing.new_task(status=done, completed_at=500.0) for _ in range(5)]
        queued = [testing.new_task() for _ in range(5)]
        await primary.insert_tasks([*old, *recent, *queued])
        assert await primary.prune_tasks(100.0, batch=20) == 30  # two transactions
        prunes = [c for c in captured if c.deleted]
        assert [len(c.deleted) for c in prunes] == [20, 10]
        assert all(not c.tasks and not c.tokens for c in prunes)
        assert {i for c in prunes for i in c.deleted} == {t.id for t in old}
        await standby.set_history(await primary.history())
        for change in captured:
            task_width, token_width = standby.change_widths
            parsed = changes.Change.from_wire(
                change.to_wire(), task_width=task_width, token_width=token_width
            )
            assert await standby.apply_change(parsed)
        # idempotent: the same deletions again (a new lsn, as after a re-sent frame that
        # a standby already had by a snapshot) change nothing and do not fail
        again = changes.Change(primary.position.lsn + 1, 1, 0.0, deleted=prunes[0].deleted)
        assert await standby.apply_change(again)
        assert standby.position.lsn == primary.position.lsn + 1
        ids = [t.id for t in [*old, *recent, *queued]]
        on_standby = {t.id for t in await standby.get_tasks(ids)}
        assert on_standby == {t.id for t in [*recent, *queued]}
    p = rows(tmp_path / "p.db", "SELECT * FROM tasks ORDER BY 1")
    s = rows(tmp_path / "s.db", "SELECT * FROM tasks ORDER BY 1")
    assert s == p
    print(f"primary pruned 30 in {len(prunes)} changes; standby rows {len(s)} == primary {len(p)}")


def test_a_change_without_deletions_keeps_its_old_wire_form() -> None:
    """A primary that deletes nothing sends what older standbys parse; the key is optional."""
    wire = changes.Change(1, 1, 0.0, tasks=[], tokens=[]).to_wire()
    assert "deleted" not in wire
    parsed = changes.Change.from_wire(wire, task_width=27, token_width=6)
    assert list(parsed.deleted) == []
    wire = changes.Change(2, 1, 0.0, deleted=["a", "b"]).to_wire()
    assert changes.Change.from_wire(wire, task_width=27, token_width=6).deleted == ["a", "b"]


@pytest.mark.parametrize(
    "deleted",
    [
        None,
        "task-id",
        {"a": 1},
        [1],
        [None],
        [["a"]],
        [""],
        ["x" * (changes.MAX_ID_LENGTH + 1)],
        ["a"] * (changes.MAX_DELETED + 1),
        [True],
    ],
)
def test_malformed_deleted_ids_are_a_protocol_error(deleted: Any) -> None:
    raw = {"lsn": 1, "term": 1, "at": 0, "tasks": [], "tokens": [], "deleted": deleted}
    with pytest.raises(errors.ProtocolError):
        changes.Change.from_wire(raw, task_width=27, token_width=6)


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
        {"lsn": 1, "term": 1, "at": 0, "tasks": [], "tokens": [[{"base64": "%%"}] * 6]},
        {"lsn": 1, "term": 1, "at": 0, "tasks": [], "tokens": [[{"base64": 5}] * 6]},
        {"lsn": 1, "term": 1, "at": 0, "tasks": [], "tokens": [[{"base64": "", "x": 1}] * 6]},
        {"lsn": 1, "term": 1, "at": 0, "tasks": [], "tokens": [[["AA=="]] * 6]},
    ],
)
def test_a_malformed_change_is_a_protocol_error(raw: Any) -> None:
    with pytest.raises(errors.ProtocolError):
        changes.Change.from_wire(raw, task_width=27, token_width=6)
