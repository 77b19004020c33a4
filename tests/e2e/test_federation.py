"""Federation: three dispatchers, all active, on one real PostgreSQL (tests/pg.py), two
workers spread over them; clients submit to every dispatcher; one dispatcher is killed
with SIGKILL in the middle. Real processes throughout.

Every run appends `ID ATTEMPT start TIME` and `ID ATTEMPT end TIME` to a shared file (the
end from an EXIT trap, so a run that is killed still says when it stopped): from it, how
many times each task ran and whether two runs of one task ever overlapped.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import signal
import threading
import time
from pathlib import Path
from typing import Any

from tests.e2e import procs

LEASE = 4.0
KEEPALIVE = 1.0
RUN = (
    "id=$OCTASKLY_TASK_ID; a=$OCTASKLY_ATTEMPT; f={file}; "
    'echo "$id $a start $(date +%s.%N)" >> $f; '
    "trap 'echo \"$id $a end $(date +%s.%N)\" >> $f' EXIT; trap 'exit 143' TERM; "
    "sleep {seconds} & wait $!"
)


class Member:
    def __init__(self, tmp_path: Path, name: str) -> None:
        self.name = name
        self.port, self.api_port = procs.free_port(), procs.free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.data = tmp_path / name
        self.log = tmp_path / f"{name}.log"
        self.args = [
            "dispatcher", "--port", str(self.port), "--api-port", str(self.api_port),
            "--bind", "127.0.0.1", "--data-dir", str(self.data), "--node-name", name,
            "--lease-seconds", str(LEASE), "--keepalive-interval", str(KEEPALIVE),
            "--secret-key", procs.SECRET, "--quic-enabled", "false",
        ]  # fmt: skip


class Clients:
    """One client thread per dispatcher, each moving on to the next when its own dies;
    batches of 3 tasks each second (9 tasks/s in all: below what 6 slots run, ~12/s)."""

    def __init__(self, members: list[Member], side: Path) -> None:
        self.members, self.side = members, side
        self.acked: dict[str, str] = {}  # task id -> the dispatcher that acknowledged it
        self.alive = {m.name for m in members}
        self.failures: list[BaseException] = []
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._threads = [threading.Thread(target=self._guarded, args=(i,)) for i in range(3)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        assert not self.failures, self.failures

    def _guarded(self, start: int) -> None:
        try:
            self._run(start)
        except BaseException as exc:  # surfaces in the test, not as a silent thread
            self.failures.append(exc)
            raise

    def _run(self, start: int) -> None:
        order = itertools.cycle(self.members[start:] + self.members[:start])
        m, n = next(order), 0
        while not self._stop.is_set():
            if m.name not in self.alive:
                m = next(order)
                continue
            tasks = [
                {"command": RUN.format(file=self.side, seconds=0.2 + 0.2 * ((n + i) % 4))}
                for i in range(3)
            ]
            n += 1
            try:
                status, body = procs.http("POST", f"{m.api}/api/v1/tasks/batch", {"tasks": tasks})
            except OSError:
                m = next(order)
                continue
            if status == 201:
                with self._lock:
                    self.acked.update(dict.fromkeys(body["ids"], m.name))
            time.sleep(1.0)


def _runs_per_task(side: Path, acked: dict[str, str]) -> tuple[int, int, int]:
    """From the runs file: tasks with no run, tasks run more than once, and overlapping
    runs of one task."""
    runs: dict[str, dict[str, list[float]]] = collections.defaultdict(dict)
    for line in side.read_text().splitlines():
        task_id, attempt, what, when = line.split()
        runs[task_id].setdefault(attempt, [])
        runs[task_id][attempt].append(float(when) if what == "start" else -float(when))
    missing, twice, overlaps = 0, 0, 0
    for task_id in acked:
        spans = []
        for marks in runs.get(task_id, {}).values():
            start = max(m for m in marks if m > 0)
            ends = [-m for m in marks if m < 0]
            spans.append((start, min(ends) if ends else float("inf")))
        missing += not spans
        twice += len(spans) > 1
        spans.sort()
        overlaps += sum(1 for a, b in itertools.pairwise(spans) if b[0] < a[1])
    return missing, twice, overlaps


def _get(api: str, path: str) -> Any:
    status, body = procs.http("GET", f"{api}{path}")
    assert status == 200, (path, status, body)
    return body


async def test_three_dispatchers_share_the_work_and_survive_a_kill_9(
    tmp_path: Path, pg_url: str
) -> None:
    members = [Member(tmp_path, f"d{i}") for i in (1, 2, 3)]
    env = procs.clean_env(OCTASKLY_DB_URL=pg_url)
    side = tmp_path / "runs.txt"
    side.touch()
    addrs = ",".join(f"127.0.0.1:{m.port}" for m in members)
    with procs.processes() as ps:
        for m in members:
            ps.append(procs.start(m.args, cwd=tmp_path, env=env, log=m.log))
        for m, p in zip(members, ps, strict=True):
            await asyncio.to_thread(procs.wait_healthy, m.api, p, data_dir=m.data)
        for name in ("wa", "wb"):
            ps.append(
                procs.start(
                    ["worker", "--dispatcher-addr", addrs, "--name", name, "--max-jobs", "3",
                     "--transport", "tcp", "--secret-key", procs.SECRET],
                    cwd=tmp_path,
                )
            )  # fmt: skip

        def both_joined() -> Any:
            workers = _get(members[0].api, "/api/v1/workers")["workers"]
            return workers if len(workers) == 2 else None

        workers = await asyncio.to_thread(procs.wait_for, both_joined, timeout=30, what="2 workers")
        placed = {w["name"]: w["dispatcher"] for w in workers}
        print(f"\nworkers placed (seen from d1, published by each dispatcher): {placed}")

        clients = Clients(members, side)
        victim = next(m for m in members if m.name in placed.values())
        clients.start()
        await asyncio.sleep(3)
        held = _get(victim.api, "/api/v1/stats")["federation"]["dispatchers"][0]["running"]
        ps[members.index(victim)].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        clients.alive.discard(victim.name)
        print(f"kill -9 {victim.name} (its worker(s) running {held} tasks)")
        survivor = next(m for m in members if m.name in clients.alive)

        def victim_gone() -> Any:
            fed = _get(survivor.api, "/api/v1/stats")["federation"]
            ids = {d["id"] for d in fed["dispatchers"]}
            return fed if victim.name not in ids else None

        def workers_moved() -> Any:
            ws = _get(survivor.api, "/api/v1/workers")["workers"]
            return ws if len(ws) == 2 and victim.name not in {w["dispatcher"] for w in ws} else None

        await asyncio.to_thread(procs.wait_for, workers_moved, timeout=30, what="workers moved")
        moved_after = time.monotonic() - killed_at
        await asyncio.to_thread(procs.wait_for, victim_gone, timeout=30, what="lease taken over")
        taken_after = time.monotonic() - killed_at
        await asyncio.sleep(2)
        clients.stop()
        acked = clients.acked

        def all_done() -> Any:
            for task_id in list(acked):
                status, task = procs.http("GET", f"{survivor.api}/api/v1/tasks/{task_id}")
                if status != 200 or task["status"] != "completed":
                    return None
            return True

        try:
            await asyncio.to_thread(procs.wait_for, all_done, timeout=60, what="every task done")
        except AssertionError:
            left = {}
            for task_id in acked:
                task = procs.http("GET", f"{survivor.api}/api/v1/tasks/{task_id}")[1]
                if task.get("status") != "completed":
                    left[task_id] = (
                        task.get("status"),
                        task.get("worker_id"),
                        task.get("attempts"),
                    )
            raise AssertionError(f"not completed: {left}") from None

        missing, twice, overlaps = _runs_per_task(side, acked)
        by_member = collections.Counter(acked.values())
        print(
            f"acknowledged {len(acked)} ({dict(by_member)}), found completed {len(acked)}, "
            f"lost 0, side effect missing {missing}, run more than once {twice}, "
            f"overlapping runs {overlaps}; the killed dispatcher's workers were connected "
            f"elsewhere {moved_after:.1f}s after the kill, its lease taken over after "
            f"{taken_after:.1f}s (lease {LEASE:g}s)"
        )
        assert missing == 0
        assert overlaps == 0
        assert twice == 0  # its workers re-attached their runs: nothing ran again
        assert taken_after <= LEASE + LEASE / 3 + 3
        assert len(by_member) == 3  # every dispatcher acknowledged work
        taken = [
            line
            for m in members
            if m is not victim
            for line in m.log.read_text().splitlines()
            if "took over task" in line or "left (its lease ended)" in line
        ]
        print(f"{len(taken)} take-over lines in the survivors' logs")
        assert taken

        await _cancel_through_another(members, clients.alive, survivor, side)


async def _cancel_through_another(
    members: list[Member], alive: set[str], survivor: Member, side: Path
) -> None:
    """Cancel through a dispatcher that does not run the task: its worker stops it."""
    workers = _get(survivor.api, "/api/v1/workers")["workers"]
    owner_of = {w["name"]: w["dispatcher"] for w in workers}
    status, long_task = procs.http(
        "POST", f"{survivor.api}/api/v1/tasks", {"command": RUN.format(file=side, seconds=30)}
    )
    assert status == 201

    def running() -> Any:
        t = _get(survivor.api, f"/api/v1/tasks/{long_task['id']}")
        return t if t["status"] == "running" else None

    run = await asyncio.to_thread(procs.wait_for, running, timeout=20, what="the long task")
    runner = next(m for m in members if m.name == owner_of[run["worker_id"]])
    other = next(m for m in members if m.name in alive and m is not runner)
    asked = time.monotonic()
    assert procs.http("DELETE", f"{other.api}/api/v1/tasks/{long_task['id']}")[0] == 200

    def stopped() -> Any:
        lines = [ln for ln in side.read_text().splitlines() if ln.startswith(long_task["id"])]
        return lines if any(" end " in ln for ln in lines) else None

    await asyncio.to_thread(procs.wait_for, stopped, timeout=15, what="the run stopped")
    final = _get(runner.api, f"/api/v1/tasks/{long_task['id']}")
    print(
        f"a task running on {runner.name}'s worker, cancelled through {other.name}: its run "
        f"stopped {time.monotonic() - asked:.1f}s later; {runner.name} says {final['status']}"
    )
    assert final["status"] == "cancelled"
