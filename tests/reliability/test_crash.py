"""Crash test: `kill -9` of the dispatcher at random moments (10 rounds) while 4 clients
submit and 2 workers execute. Nothing acknowledged may be lost, nothing may end up in two
states, everything must end, and every task's side effect must have happened.

Everything is real: a `python -m octaskly dispatcher` process with its SQLite database in
tmp_path, two `octaskly worker` processes (TCP transport), four client threads posting
single and batch submits over HTTP, and SIGKILL. The seed of the random kill moments is
printed (set `RELIABILITY_SEED` to replay one).

Each task's command ends with `echo MARKER >> side-effects.log`, MARKER unique per
submitted task (the task id is not known before the submit): one run that gets that far
appends exactly one line, so the number of lines with a marker is the number of runs of
that task that did their work. Some tasks only do that; others sleep 0.2-1 s first, so that
kills land while runs are in progress on the workers.

Checked, after every restart: every task that got a 201 before the kill is in the
database (listed by the API). At the end (clients stopped, every task ended):

- every 201 id is found (`GET /api/v1/tasks/{id}`), completed; a submit that got no answer
  (connection reset by the kill) may or may not exist — only 201s count;
- no task is in two states: the per-status listings are disjoint and together are the
  whole table, and each record is consistent (completed => exit code 0, started_at and
  completed_at set, attempts >= 1); no task is left queued or running;
- every completed task's side effect happened at least once;
- "the worker and the dispatcher both survived" is defined as: no kill of the dispatcher
  between the task's creation (`created_at`) and its end (`completed_at`) — its whole life
  fell within one dispatcher lifetime (the workers are never killed in this test). Such a
  task's side effect happened exactly once. A task that ran more than once must have had a
  kill inside its life (printed: how many ran more than once, all explained by a kill);
- after a clean stop, `PRAGMA integrity_check` of the database is "ok".

The dispatcher runs with a 2.5 s heartbeat interval, so tasks found running after a restart
wait a 5 s grace for their worker to come back and re-attach them rather than run again.
After every restart both workers must be connected again within that grace (they
reconnect with a backoff that starts again at 0.2 s after a connection that worked).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http import client as http_client
from pathlib import Path
from typing import Any

from tests import pg
from tests.e2e import procs
from tests.e2e.procs import SECRET, free_port, http, start, wait_for, wait_healthy

ROUNDS = 10
CLIENTS = 4
KEEPALIVE = 2.5
STATUSES = ("queued", "running", "completed", "failed", "timed_out", "cancelled")
MARKER = re.compile(r"echo (\S+) >> ")


@dataclasses.dataclass(frozen=True)
class Ack:
    marker: str
    task_id: str


class Clients:
    """`CLIENTS` threads submitting until stopped: a single task or a batch of 2-3, each task
    appending its own marker to the side-effect file. Connection errors (the dispatcher is
    down) are retried with a new submit; only 201s are recorded as acknowledged."""

    def __init__(self, api: str, side_effects: Path, seed: int) -> None:
        self.api = api
        self.side_effects = side_effects
        self.acks: list[Ack] = []
        self.tried: set[str] = set()
        self.errors: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._submit_forever, args=(i, seed + i), daemon=True)
            for i in range(CLIENTS)
        ]

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"

    def count(self) -> int:
        with self._lock:
            return len(self.acks)

    def snapshot(self) -> list[Ack]:
        with self._lock:
            return list(self.acks)

    def _command(self, rng: random.Random, marker: str) -> str:
        echo = f"echo {marker} >> {self.side_effects}"
        if rng.random() < 0.4:
            return f"sleep {rng.uniform(0.2, 1.0):.2f}; {echo}"
        return echo

    def _submit_forever(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        while not self._stop.is_set():
            size = rng.randint(2, 3) if rng.random() < 0.25 else 1
            markers = [f"c{index}-{n + k}" for k in range(size)]
            n += size
            with self._lock:
                self.tried.update(markers)
            tasks = [{"command": self._command(rng, m)} for m in markers]
            try:
                if size == 1:
                    status, body = _post(f"{self.api}/api/v1/tasks", tasks[0])
                    ids = [body["id"]] if status == 201 else []
                else:
                    status, body = _post(f"{self.api}/api/v1/tasks/batch", {"tasks": tasks})
                    ids = list(body["ids"]) if status == 201 else []
            except (OSError, http_client.HTTPException) as exc:
                # refused, reset or timed out: not acknowledged (it may still exist)
                with self._lock:
                    self.errors[type(exc).__name__] += 1
                self._stop.wait(0.1)
                continue
            with self._lock:
                if status == 201:
                    assert len(ids) == size, body
                    self.acks.extend(Ack(m, i) for m, i in zip(markers, ids, strict=True))
                else:
                    self.errors[f"HTTP {status}"] += 1
            self._stop.wait(rng.uniform(0.25, 0.55))


def _post(url: str, body: Any) -> tuple[int, Any]:
    token = procs.TOKENS.get(procs._base(url), "")
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _listed(api: str, status: str | None = None) -> dict[str, dict[str, Any]]:
    """Every task the API lists (with `status`), paging newest first: a task submitted
    meanwhile shifts the pages, which can repeat a task but never skip one."""
    out: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        query = f"limit=1000&offset={offset}" + (f"&status={status}" if status else "")
        code, page = http("GET", f"{api}/api/v1/tasks?{query}")
        assert code == 200, page
        out.update((t["id"], t) for t in page["tasks"])
        offset += page["returned"]
        if page["returned"] == 0 or offset >= page["total"]:
            return out


def _missing(api: str, acks: list[Ack]) -> list[str]:
    """The acknowledged ids the dispatcher does not have (a listing miss is confirmed by a
    direct GET)."""
    listed = _listed(api)
    return [
        a.task_id
        for a in acks
        if a.task_id not in listed and http("GET", f"{api}/api/v1/tasks/{a.task_id}")[0] != 200
    ]


def _worker(tmp: Path, name: str, p2p: int) -> list[str]:
    return [
        "worker",
        *("--dispatcher-addr", f"127.0.0.1:{p2p}", "--name", name, "--secret-key", SECRET),
        *("--transport", "tcp", "--max-jobs", "4"),
        *("--work-dir", str(tmp / f"{name}-work"), "--data-dir", str(tmp / f"{name}-data")),
    ]


def _workers(api: str) -> int:
    code, body = http("GET", f"{api}/api/v1/workers")
    return int(body["total"]) if code == 200 else 0


def _all_ended(api: str) -> dict[str, int] | None:
    code, stats = http("GET", f"{api}/api/v1/stats")
    if code != 200:
        return None
    tasks: dict[str, int] = stats["tasks"]
    return tasks if tasks["queued"] == 0 and tasks["running"] == 0 else None


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    status: str
    exit_code: int | None
    started_at: float | None
    completed_at: float | None
    attempts: int
    command: str
    created_at: float

    def consistent(self) -> bool:
        if self.status in ("queued", "running"):
            return False  # everything has ended
        if self.completed_at is None or self.completed_at < self.created_at:
            return False
        return self.status != "completed" or (
            self.exit_code == 0 and self.started_at is not None and self.attempts >= 1
        )


def _database(path: Path) -> tuple[str, dict[str, Row]]:
    """`PRAGMA integrity_check` of the database file and its tasks (opened read-only);
    on PostgreSQL (OCTASKLY_TEST_STORE), amcheck's check of every index and the tasks."""
    if pg.STORE == "postgresql":
        url = pg.database_for(str(path.parent.resolve()))
        pg.fetch(url, "CREATE EXTENSION IF NOT EXISTS amcheck")
        checked = pg.fetch(
            url,
            "SELECT count(bt_index_check(c.oid, true)) FROM pg_class c "
            "JOIN pg_am a ON a.oid = c.relam WHERE c.relkind = 'i' AND a.amname = 'btree' "
            "AND c.relnamespace = 'public'::regnamespace",
        )
        rows = pg.fetch(
            url,
            "SELECT id, status, exit_code, started_at, completed_at, attempts, command,"
            " created_at FROM tasks",
        )
        return (
            "ok" if checked[0][0] else "no index checked",
            {str(r[0]): Row(*r) for r in rows},  # type: ignore[arg-type]
        )
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with contextlib.closing(db):
        integrity = "; ".join(r[0] for r in db.execute("PRAGMA integrity_check"))
        rows = db.execute(
            "SELECT id, status, exit_code, started_at, completed_at, attempts, command,"
            " created_at FROM tasks"
        )
        return integrity, {r[0]: Row(*r) for r in rows}


@dataclasses.dataclass
class SideEffects:
    lines: int = 0
    never: list[str] = dataclasses.field(default_factory=list)
    twice: list[str] = dataclasses.field(default_factory=list)
    unexplained: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    undisturbed: int = 0
    stray: list[str] = dataclasses.field(default_factory=list)


def _side_effects(path: Path, rows: dict[str, Row], kills: list[float]) -> SideEffects:
    """Runs per completed task, told apart by whether a kill fell inside its life."""
    lines = path.read_text().split() if path.exists() else []
    runs = collections.Counter(lines)
    marker_of = {}
    for row in rows.values():
        match = MARKER.search(row.command)
        assert match, row.command
        marker_of[row.id] = match.group(1)
    assert len(set(marker_of.values())) == len(marker_of), "a marker was submitted twice"
    out = SideEffects(lines=len(lines))
    # ran, but is not in the database
    out.stray = sorted(set(runs) - set(marker_of.values()))
    for row in rows.values():
        if row.status != "completed" or row.completed_at is None:
            continue
        count = runs[marker_of[row.id]]
        killed_inside = any(row.created_at - 0.1 <= k <= row.completed_at + 0.1 for k in kills)
        out.undisturbed += not killed_inside
        if count == 0:
            out.never.append(row.id)
        elif count > 1:
            out.twice.append(row.id)
            if not killed_inside:
                out.unexplained.append((row.id, count))
    return out


def _states(api: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every task, and the ids that are not listed under exactly their own status."""
    by_status = {s: _listed(api, s) for s in STATUSES}
    everything = _listed(api)
    seen: collections.Counter[str] = collections.Counter()
    for listed in by_status.values():
        seen.update(listed.keys())
    wrong = {t for t, c in seen.items() if c > 1} | (set(everything) - set(seen))
    wrong |= {t for s, ts in by_status.items() for t, rec in ts.items() if rec["status"] != s}
    return everything, sorted(wrong)


def test_kill_9_dispatcher_ten_times_under_load(tmp_path: Path) -> None:
    seed = int(os.environ.get("RELIABILITY_SEED") or random.SystemRandom().randrange(1 << 30))
    rng = random.Random(seed)
    print(f"seed {seed} (RELIABILITY_SEED={seed} replays the kill moments)")
    began = time.monotonic()
    p2p, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    data = tmp_path / "data"
    args = [
        "dispatcher",
        *("--port", str(p2p), "--api-port", str(api_port), "--bind", "127.0.0.1"),
        *("--data-dir", str(data), "--secret-key", SECRET),
        *("--keepalive-interval", str(KEEPALIVE), "--connection-timeout", "8"),
    ]
    side_effects = tmp_path / "side-effects.log"
    kills: list[float] = []  # wall clock, just before each SIGKILL
    dispatchers: list[subprocess.Popen[bytes]] = []

    def start_dispatcher() -> None:
        proc = start(args, cwd=tmp_path, log=tmp_path / f"dispatcher-{len(dispatchers)}.log")
        ps.append(proc)
        dispatchers.append(proc)
        wait_healthy(api, proc, data_dir=data)

    with procs.processes() as ps:
        start_dispatcher()
        for name in ("w1", "w2"):
            ps.append(start(_worker(tmp_path, name, p2p), cwd=tmp_path))
        wait_for(lambda: _workers(api) == 2, what="2 workers")
        with Clients(api, side_effects, seed) as clients:
            wait_for(lambda: clients.count() >= 10, timeout=30, what="10 acknowledged tasks")
            for round_ in range(1, ROUNDS + 1):
                time.sleep(rng.uniform(0.05, 3.5))
                in_flight = _all_ended(api) is None
                before = clients.snapshot()
                kills.append(time.time())
                dispatchers[-1].send_signal(signal.SIGKILL)
                dispatchers[-1].wait()
                restart = time.monotonic()
                start_dispatcher()
                healthy = time.monotonic()
                wait_for(lambda: _workers(api) == 2, timeout=15, what="the workers back")
                back = time.monotonic() - healthy
                missing = _missing(api, before)
                print(
                    f"round {round_}: killed {kills[-1] - kills[0]:.1f}s after the first kill"
                    f" ({'tasks in flight' if in_flight else 'idle'}); healthy again in "
                    f"{healthy - restart:.2f}s, workers back {back:.2f}s later; "
                    f"acknowledged before the kill {len(before)}, "
                    f"found {len(before) - len(missing)}"
                )
                assert not missing, f"round {round_}: acknowledged tasks lost: {missing[:10]}"
                # back within the grace, so that their runs are re-attached, not run again
                assert back < 2 * KEEPALIVE, f"round {round_}: workers slow to return"
            time.sleep(1.0)
        acks = clients.snapshot()
        assert len({a.task_id for a in acks}) == len(acks)
        counts = wait_for(lambda: _all_ended(api), timeout=60, what="every task to end")
        found = {}
        for ack in acks:
            code, task = http("GET", f"{api}/api/v1/tasks/{ack.task_id}")
            if code == 200:
                found[ack.task_id] = task
        everything, wrong_states = _states(api)
        assert procs.stop(dispatchers[-1]) == 0  # a clean stop, then read the file directly

    integrity, rows = _database(data / "octaskly.db")
    lost = [a.task_id for a in acks if a.task_id not in found]
    not_completed = [(t, r["status"], r.get("error")) for t, r in found.items()]
    not_completed = [x for x in not_completed if x[1] != "completed"]
    inconsistent = [r for r in rows.values() if not r.consistent()]
    api_vs_db = [t for t, r in everything.items() if t not in rows or rows[t].status != r["status"]]
    effects = _side_effects(side_effects, rows, kills)
    reattached = sum(p.read_text().count("re-attached task") for p in tmp_path.glob("dispatcher-*"))
    print(
        f"rounds {ROUNDS}; acknowledged {len(acks)} / found {len(found)} / lost {len(lost)}; "
        f"tasks in the database {len(rows)} ({len(rows) - len(acks)} from submits whose answer "
        f"was lost); final states {counts}; client errors {dict(clients.errors)}"
    )
    print(
        f"side effects: {effects.lines} lines; never ran {len(effects.never)}; ran more than "
        f"once {len(effects.twice)} (explained by a kill inside the task's life: "
        f"{len(effects.twice) - len(effects.unexplained)}); undisturbed tasks "
        f"{effects.undisturbed}, each exactly once: {not effects.unexplained}; runs re-attached "
        f"after a restart {reattached}; integrity_check {integrity}; "
        f"duration {time.monotonic() - began:.1f}s"
    )
    assert not lost, f"acknowledged tasks lost: {lost[:10]}"
    assert integrity == "ok", integrity
    assert sum(counts.values()) == len(everything) == len(rows)
    assert not wrong_states, f"tasks not in exactly one state: {wrong_states[:10]}"
    assert not api_vs_db, api_vs_db[:10]
    assert not inconsistent, inconsistent[:10]
    assert not not_completed, not_completed[:10]
    assert not effects.never, f"completed, side effect never happened: {effects.never[:10]}"
    assert not effects.unexplained, f"ran twice with no kill in their life: {effects.unexplained}"
    assert not effects.stray, f"side effects of tasks not in the database: {effects.stray[:10]}"
