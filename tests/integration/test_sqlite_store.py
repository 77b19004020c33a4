"""What only the SQLite store does: durability, group commit, migrations, and faults.

Faults are real, not mocked: a SIGKILLed writer process, a tmpfs that runs out of space, a
read-only mount, an immutable file, bytes overwritten in the database file. Mounting
needs root; where it is refused the test fails rather than skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import pytest

from octaskly import errors, testing
from octaskly.domain import models
from octaskly.store import base, migrating, queries, sqlite, writing

REPO = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def opened(path: Path, **options: Any) -> AsyncIterator[sqlite.SQLiteStore]:
    store = sqlite.SQLiteStore(path, **options)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Read the database with plain sqlite3, independent of the store under test."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql, params).fetchall()


def schema(path: Path) -> list[Any]:
    return query(path, "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name")


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        check=True,
        capture_output=True,
    )
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


# -- durability and group commit ----------------------------------------------------------
KILL_SCRIPT = """
import asyncio, sys
from pathlib import Path
from octaskly import testing
from octaskly.store import sqlite

async def writer(store, n):
    while True:
        tasks = [testing.new_task(f"echo {n}") for _ in range(1 + n % 3)]
        await store.insert_tasks(tasks)
        sys.stdout.write("".join(t.id + "\\n" for t in tasks))
        sys.stdout.flush()

async def main():
    store = sqlite.SQLiteStore(Path(sys.argv[1]))
    await store.open()
    await asyncio.gather(*(writer(store, n) for n in range(8)))

asyncio.run(main())
"""


async def test_acknowledged_inserts_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "octaskly.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILL_SCRIPT, str(db), stdout=asyncio.subprocess.PIPE, cwd=REPO
    )
    assert proc.stdout is not None
    acknowledged: list[str] = []
    try:
        while len(acknowledged) < 500:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, "the writer process ended early"
            acknowledged.append(line.decode().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        rest = await proc.stdout.read()
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Lines printed before the kill are acknowledged too; a torn last line is not.
    acknowledged += [line for line in rest.decode().split("\n")[:-1] if line]
    async with opened(db) as store:
        found = await store.get_tasks(acknowledged)
        assert len(found) == len(set(acknowledged))
        total = (await store.list_tasks(limit=0)).total
    assert total >= len(acknowledged)


async def test_concurrent_inserts_share_commits_and_fail_only_the_duplicate(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path / "octaskly.db") as store:
        tasks = [testing.new_task(idempotency_key=f"k{i}") for i in range(200)]
        duplicate = testing.new_task(idempotency_key="k7")
        calls = [[t] for t in tasks]
        calls.insert(100, [duplicate])  # after its twin, so the twin wins
        before = store.commit_count
        results = await asyncio.gather(
            *(store.insert_tasks(c) for c in calls), return_exceptions=True
        )
        commits = store.commit_count - before
        failed = results.pop(100)
        assert isinstance(failed, base.DuplicateIdempotencyKey) and failed.key == "k7"
        assert all(isinstance(r, list) and len(r) == 1 for r in results)
        seqs = [r[0] for r in results if isinstance(r, list)]
        assert seqs == sorted(set(seqs)), "queue_seq follows submission order, no repeats"
        assert 1 <= commits < 20, f"{commits} transactions for 201 concurrent inserts"
        assert len(await store.get_tasks([t.id for t in tasks])) == 200
        assert await store.get_task(duplicate.id) is None


async def test_reopen_keeps_tasks_and_continues_queue_seq(tmp_path: Path) -> None:
    db = tmp_path / "octaskly.db"
    task = testing.new_task()
    async with opened(db) as store:
        seqs = await store.insert_tasks([task, testing.new_task(), testing.new_task()])
    async with opened(db) as store:
        assert await store.get_task(task.id) == task.model_copy(update={"queue_seq": seqs[0]})
        assert await store.insert_tasks([testing.new_task()]) == [seqs[-1] + 1]


async def test_close_flushes_writes_queued_with_apply_soon(tmp_path: Path) -> None:
    db = tmp_path / "octaskly.db"
    task = testing.new_task()
    async with opened(db) as store:
        await store.insert_tasks([task])
        store.apply_soon([base.TaskUpdate(task.id, {"status": models.TaskStatus.RUNNING})])
    assert query(db, "SELECT status FROM tasks WHERE id = ?", (task.id,)) == [("running",)]


async def test_a_rejected_update_fails_only_its_caller(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(tmp_path / "octaskly.db") as store:
        task = testing.new_task()
        await store.insert_tasks([task])
        unstorable = object()  # sqlite3 cannot bind it: the statement fails in the batch
        store.apply_soon([base.TaskUpdate(task.id, {"stdout": unstorable})])
        results = await asyncio.gather(
            store.apply([base.TaskUpdate(task.id, {"error": "lost", "stderr": unstorable})]),
            store.apply([base.TaskUpdate(task.id, {"error": "kept"})]),
            return_exceptions=True,
        )
        assert isinstance(results[0], ValueError) and results[1] == [True]
        got = await store.get_task(task.id)
        assert got is not None and (got.error, got.stdout, got.stderr) == ("kept", b"", b"")
    assert "a background write failed" in caplog.text


async def test_updates_sharing_a_batch_apply_in_order_with_their_own_outcomes(
    tmp_path: Path,
) -> None:
    """The writer sends runs of same-shaped updates as one statement; the outcome must be
    what applying them one by one, in order, gives."""
    running, completed = models.TaskStatus.RUNNING, models.TaskStatus.COMPLETED
    queued = models.TaskStatus.QUEUED
    async with opened(tmp_path / "octaskly.db") as store:
        tasks = [testing.new_task() for _ in range(60)]
        await store.insert_tasks(tasks)
        ids = [t.id for t in tasks]
        marks = [
            base.TaskUpdate(i, {"status": running, "attempts": 1, "worker_id": "w"},
                            expect_status=queued)
            for i in ids[:50]
        ]  # fmt: skip

        def result(task_id: str, code: int) -> base.TaskUpdate:
            return base.TaskUpdate(
                task_id,
                {"status": completed, "exit_code": code},
                expect_status=running,
                expect_attempts=1,
            )

        calls = [
            store.apply(marks),
            *(store.apply([result(i, 0)]) for i in ids[:40]),
            store.apply([result(ids[0], 9)]),  # same task again: now completed, must not apply
            store.apply([result(ids[55], 0)]),  # never marked running
            store.apply([result(ids[41], 0), result(ids[41], 7)]),  # twice in one call
            store.apply([result(ids[44], 3)]),
        ]
        before = store.commit_count
        got = await asyncio.gather(*calls)
        assert store.commit_count - before <= 2, "the calls were meant to share batches"
        assert got[0] == [True] * 50
        assert got[1:41] == [[True]] * 40
        assert got[41:] == [[False], [False], [True, False], [True]]
        # One call's unbindable value fails that call alone, in a batch that then goes
        # update by update.
        got = await asyncio.gather(
            store.apply([result(ids[45], 1)]),
            store.apply([result(ids[42], 0), base.TaskUpdate(ids[43], {"stdout": object()})]),
            store.apply([result(ids[46], 2)]),
            return_exceptions=True,
        )
        assert got[0] == [True] and isinstance(got[1], ValueError) and got[2] == [True]
        final = {t.id: t for t in await store.get_tasks(ids)}
        assert [final[i].exit_code for i in ids[:40]] == [0] * 40
        assert (final[ids[41]].status, final[ids[41]].exit_code) == (completed, 0)
        assert (final[ids[42]].status, final[ids[42]].exit_code) == (running, None)
        assert [final[i].exit_code for i in ids[44:47]] == [3, 1, 2]
        assert final[ids[55]].status == queued
        assert all(final[i].status == running for i in ids[47:50])


async def test_writer_is_one_named_task_that_ends_on_close(tmp_path: Path) -> None:
    def writers() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "octaskly-store-writer"]

    async with opened(tmp_path / "octaskly.db") as store:
        await store.insert_tasks([testing.new_task()])
        assert len(writers()) == 1
    assert writers() == []


@pytest.mark.parametrize(("synchronous", "level"), [("full", 2), ("normal", 1)])
async def test_connection_settings(
    tmp_path: Path, synchronous: Literal["full", "normal"], level: int
) -> None:
    db = tmp_path / "octaskly.db"
    async with opened(db, synchronous=synchronous) as store:
        writer = store._db  # the settings are per connection: ask the writer's own
        assert writer is not None
        for pragma, value in [("synchronous", level), ("foreign_keys", 1), ("busy_timeout", 5000)]:
            assert list(await writer.execute_fetchall(f"PRAGMA {pragma}")) == [(value,)]
    assert query(db, "PRAGMA journal_mode") == [("wal",)]


async def test_database_file_is_private_and_sized(tmp_path: Path) -> None:
    db = tmp_path / "data" / "octaskly.db"  # the directory is created too
    async with opened(db) as store:
        empty = await store.size_bytes()
        await store.insert_tasks([testing.new_task("x" * 60_000) for _ in range(5)])
        assert await store.size_bytes() >= empty + 300_000  # counts the -wal file
        for suffix in ("", "-wal", "-shm"):
            assert stat.S_IMODE(os.stat(f"{db}{suffix}").st_mode) == 0o600


# -- migrations ---------------------------------------------------------------------------
def test_migration_files_are_numbered_from_one() -> None:
    found = migrating.migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert migrating.latest_version() == len(found) >= 1


async def test_fresh_database_gets_the_latest_schema(tmp_path: Path) -> None:
    db = tmp_path / "octaskly.db"
    async with opened(db):
        pass
    assert query(db, "PRAGMA user_version") == [(migrating.latest_version(),)]
    names = {row[1] for row in schema(db)}
    assert {"tasks", "tasks_queue", "tasks_created", "tasks_idempotency"} <= names
    columns = [row[1] for row in query(db, "PRAGMA table_info(tasks)")]
    assert set(queries.INSERT_COLUMNS) <= set(columns)
    before = schema(db)
    async with opened(db):  # reopening changes nothing
        pass
    assert schema(db) == before
    assert query(db, "PRAGMA user_version") == [(migrating.latest_version(),)]


@pytest.mark.parametrize("version", range(migrating.latest_version()))
async def test_database_at_every_earlier_version_migrates(tmp_path: Path, version: int) -> None:
    old, fresh = tmp_path / "old.db", tmp_path / "fresh.db"
    async with aiosqlite.connect(old, isolation_level=None) as db:
        assert await migrating.migrate(db, target=version) == version
    assert query(old, "PRAGMA user_version") == [(version,)]
    written = None
    if version >= 1:  # a task as that version wrote it: output as TEXT (before 005)
        written = testing.new_task("echo old", status=models.TaskStatus.COMPLETED)
        row = list(queries.task_row(written))
        row[queries.INSERT_COLUMNS.index("stdout") - 1] = "héllo\x00€\n"
        row[queries.INSERT_COLUMNS.index("stderr") - 1] = "\ufffdoops"
        with contextlib.closing(sqlite3.connect(old)) as conn:
            conn.execute(queries.INSERT_TASK, [7, *row])
            conn.commit()
    for path in (old, fresh):
        async with opened(path) as store:
            await store.insert_tasks([testing.new_task()])
            if written is not None and path == old:
                got = await store.get_task(written.id)
                assert got is not None and got.queue_seq == 7
                assert (got.stdout, got.stderr) == ("héllo\x00€\n".encode(), "\ufffdoops".encode())
    assert schema(old) == schema(fresh)
    assert query(old, "PRAGMA user_version") == [(migrating.latest_version(),)]
    assert query(old, "SELECT DISTINCT typeof(stdout), typeof(stderr) FROM tasks") == [
        ("blob", "blob")
    ]
    assert query(old, "PRAGMA integrity_check") == [("ok",)]


async def test_newer_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "octaskly.db"
    async with opened(db):
        pass
    newer = migrating.latest_version() + 1
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")
    store = sqlite.SQLiteStore(db)
    with pytest.raises(errors.StorageError) as caught:
        await store.open()
    assert str(caught.value) == (
        f"database schema version {newer} is newer than this octaskly supports "
        f"({migrating.latest_version()}); upgrade octaskly"
    )
    with pytest.raises(errors.StorageError, match="closed"):
        await store.check()


async def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE photos (name TEXT)")
    with pytest.raises(errors.StorageError, match="not an octaskly one"):
        await sqlite.SQLiteStore(db).open()
    assert schema(db) == [("table", "photos", "photos", "CREATE TABLE photos (name TEXT)")]
    assert query(db, "PRAGMA journal_mode") == [("delete",)]  # left as it was


@pytest.mark.parametrize(
    ("sql", "params", "index"),
    [
        (queries.QUEUED_REFS, (2, 0, 10), "tasks_queue"),
        (queries.FIND_BY_KEY, ("", "k"), "tasks_idempotency"),
        (queries.list_tasks(""), (10, 0), "tasks_created"),
        (queries.list_tasks(" WHERE status = ?"), ("queued", 10, 0), "tasks_status"),
        (queries.list_tasks(" WHERE worker_id = ?"), ("w", 10, 0), "tasks_worker"),
        (queries.list_tasks(" WHERE owner = ?"), ("o", 10, 0), "tasks_owner"),
        (queries.COUNT_BY_STATUS, (), "tasks_status"),
        (queries.GET_TASK, ("x",), "sqlite_autoindex_tasks_1"),
        (queries.PRUNE_TASKS, (1.0, 1000), "tasks_finished"),
        (queries.delete_tasks(2), ("x", "y"), "sqlite_autoindex_tasks_1"),
    ],
)
async def test_queries_use_an_index_and_never_sort(
    tmp_path: Path, sql: str, params: tuple[Any, ...], index: str
) -> None:
    """With a million queued tasks a scan or a sort would stall the dispatcher."""
    db = tmp_path / "octaskly.db"
    async with opened(db):
        pass
    plan = " | ".join(row[3] for row in query(db, f"EXPLAIN QUERY PLAN {sql}", params))
    assert f"INDEX {index}" in plan
    assert "TEMP B-TREE" not in plan


# -- retention ----------------------------------------------------------------------------
def _finished(count: int, completed_at: float, output: int) -> list[models.Task]:
    return [
        testing.new_task(
            status=models.TaskStatus.COMPLETED, completed_at=completed_at, stdout="o" * output
        )
        for _ in range(count)
    ]


async def test_pruned_pages_are_reused_so_the_file_stops_growing(tmp_path: Path) -> None:
    """Insert-finish-prune rounds at a steady rate: after the first rounds the database
    file keeps its size (freed pages hold the new rows) instead of growing every round."""
    db = tmp_path / "octaskly.db"
    sizes: list[int] = []
    async with opened(db) as store:
        for round_ in range(8):
            await store.insert_tasks(_finished(400, float(round_), 4000))
            # keep the last two rounds, delete what finished before them
            await store.prune_tasks(round_ - 1.5)
            sizes.append(await store.size_bytes())  # with the -wal file
        kept = (await store.list_tasks()).total
    free = query(db, "PRAGMA freelist_count")[0][0]
    print(f"file size per round (MiB): {[round(s / 2**20, 2) for s in sizes]}; free pages {free}")
    # flat once the first freed pages were reused: 4 more rounds (6.4 MB of output) later it
    # has grown by less than a tenth of one round, where without pruning it grows by all
    one_round = 400 * 4000
    assert sizes[-1] - sizes[3] < one_round / 10, sizes
    assert kept == 800


async def test_other_writes_go_between_the_batches_of_a_large_prune(tmp_path: Path) -> None:
    """The writer is shared: a big prune must not hold it for its whole length."""
    async with opened(tmp_path / "octaskly.db") as store:
        for _ in range(6):
            await store.insert_tasks(_finished(1000, 1.0, 2000))
        prune = asyncio.create_task(store.prune_tasks(2.0))
        await asyncio.sleep(0)  # the first batch is queued
        started = time.perf_counter()
        await store.insert_tasks([testing.new_task()])
        insert_ms = (time.perf_counter() - started) * 1000
        inserted_during_prune = not prune.done()
        pruned = await prune
        total_ms = (time.perf_counter() - started) * 1000
        print(f"pruned {pruned} in {total_ms:.0f} ms; an insert meanwhile took {insert_ms:.0f} ms")
        assert pruned == 6000
        assert inserted_during_prune and insert_ms < total_ms / 2


async def test_the_wal_shrinks_back_after_a_burst_a_reader_held_open(tmp_path: Path) -> None:
    """A reader holding an old snapshot stops checkpoints from restarting the WAL, which
    then grows past its usual size; once the reader is gone and the WAL starts over, it is
    cut back (journal_size_limit) instead of keeping its high-water mark for ever."""
    db = tmp_path / "octaskly.db"
    wal = Path(f"{db}-wal")
    async with opened(db) as store:
        await store.insert_tasks([testing.new_task()])
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM tasks").fetchall()  # holds its snapshot
            for _ in range(12):
                await store.insert_tasks([testing.new_task("x" * 60_000) for _ in range(10)])
            burst = wal.stat().st_size
            reader.execute("COMMIT")
        for _ in range(60):  # past an auto-checkpoint: the WAL starts over
            await store.insert_tasks([testing.new_task("y" * 4000) for _ in range(10)])
        after = wal.stat().st_size
    print(f"WAL {burst / 2**20:.1f} MiB during the burst, {after / 2**20:.1f} MiB after")
    assert burst > writing.WAL_SIZE_LIMIT * 1.5
    assert after <= writing.WAL_SIZE_LIMIT


# -- faults -------------------------------------------------------------------------------
async def test_file_that_is_not_a_database(tmp_path: Path) -> None:
    db = tmp_path / "octaskly.db"
    db.write_bytes(b"these are my notes, not a database\n" * 200)
    store = sqlite.SQLiteStore(db)
    with pytest.raises(errors.StorageError) as caught:
        await store.open()
    message = str(caught.value)
    assert "corrupt" in message and "octaskly restore" in message and str(db) in message


async def test_corrupted_database(tmp_path: Path) -> None:
    db = tmp_path / "octaskly.db"
    async with opened(db) as store:
        await store.insert_tasks([testing.new_task("x" * 2000) for _ in range(100)])
    size = db.stat().st_size
    garbage = random.Random(7).randbytes(size // 2)
    with db.open("r+b") as file:  # keep page 1 (the header and schema), ruin the rest
        file.seek(8192)
        file.write(garbage)
    with pytest.raises(errors.StorageError) as caught:
        await sqlite.SQLiteStore(db).open()
    message = str(caught.value)
    assert "corrupt" in message and "octaskly restore" in message


async def test_read_only_filesystem(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "1m") as mount_point:
        db = mount_point / "octaskly.db"
        async with opened(db) as store:
            await store.insert_tasks([testing.new_task()])
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        for path in (db, mount_point / "new.db"):
            with pytest.raises(errors.StorageError) as caught:
                await sqlite.SQLiteStore(path).open()
            assert "read-only" in str(caught.value) and str(path) in str(caught.value)


async def test_read_only_file(tmp_path: Path) -> None:
    db = tmp_path / "octaskly.db"
    async with opened(db):
        pass
    # Root ignores mode bits; the immutable attribute makes the file read-only even for root.
    subprocess.run(["chattr", "+i", str(db)], check=True)
    try:
        with pytest.raises(errors.StorageError, match="is read-only"):
            await sqlite.SQLiteStore(db).open()
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)


def fill(filler: Path) -> None:
    """Write `filler` until the filesystem has no byte left."""
    with filler.open("wb", buffering=0) as file:
        for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
            with contextlib.suppress(OSError):
                while True:
                    file.write(b"\0" * chunk)


async def test_disk_full_fails_the_batch_and_recovers(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "2m") as mount_point:
        db, filler = mount_point / "octaskly.db", mount_point / "filler"
        async with opened(db) as store:
            first = testing.new_task()
            await store.insert_tasks([first])
            fill(filler)
            batches = [[testing.new_task("x" * 40_000) for _ in range(5)] for _ in range(2)]
            results = await asyncio.gather(
                *(store.insert_tasks(b) for b in batches), return_exceptions=True
            )
            assert all(isinstance(r, errors.StorageFullError) for r in results), results
            assert "full" in str(results[0])
            ids = [t.id for b in batches for t in b]
            assert await store.get_tasks(ids) == []  # nothing half-written
            assert (await store.list_tasks(limit=0)).total == 1
            await store.check()  # the writer survived
            filler.unlink()  # space returns
            for batch in batches:
                assert len(await store.insert_tasks(batch)) == 5
            assert len(await store.get_tasks(ids)) == 10
        assert query(db, "PRAGMA integrity_check") == [("ok",)]
        assert query(db, "SELECT count(*) FROM tasks") == [(11,)]


async def test_writer_death_fails_every_waiting_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with opened(tmp_path / "octaskly.db") as store:
        started, release = asyncio.Event(), asyncio.Event()

        async def broken_batch(batch: list[Any]) -> None:
            started.set()
            await release.wait()
            raise RuntimeError("bug in the writer")

        monkeypatch.setattr(store, "_write_batch", broken_batch)
        calls = [asyncio.ensure_future(store.insert_tasks([testing.new_task()]))]
        await started.wait()  # the first is in flight; the next two wait behind it
        calls += [asyncio.ensure_future(store.insert_tasks([testing.new_task()])) for _ in "ab"]
        deadline = time.monotonic() + 10
        while len(store._pending) < 2:
            assert time.monotonic() < deadline, "callers never queued"
            await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, errors.StorageError) for r in results), results
        with pytest.raises(errors.StorageError, match="bug in the writer"):
            await store.check()
        with pytest.raises(errors.StorageError, match="writer"):
            await store.insert_tasks([testing.new_task()])
