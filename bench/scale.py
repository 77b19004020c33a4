"""The scale scenario: a dispatcher process on a database pre-filled with 1k..1M queued
tasks, fed by 200 simulated workers (bench.simworkers) that execute nothing.

Per queue depth: assignments/s, dispatcher CPU seconds per assignment and dispatcher RSS,
so one can see whether the per-task cost stays flat and memory bounded as the queue grows.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import cluster, procs
from octaskly.domain import models
from octaskly.store import sqlite

PREFILL_BATCH = 5000


async def _prefill(path: Path, depth: int) -> None:
    """`depth` queued `true` tasks through the store's own insert path, batches of 5,000;
    the next batch is built while the previous one is written."""
    store = sqlite.SQLiteStore(path, synchronous="normal")  # set-up data: no fsync needed
    await store.open()
    try:
        spec, now = models.TaskSpec(command="true"), time.time()
        pending: asyncio.Future[list[int]] | None = None
        for start in range(0, depth, PREFILL_BATCH):
            batch = [
                models.Task(id=models.new_task_id(), spec=spec, timeout=3600, created_at=now)
                for _ in range(min(PREFILL_BATCH, depth - start))
            ]
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(store.insert_tasks(batch))
        if pending is not None:
            await pending
    finally:
        await store.close()


def prefill(path: Path, depth: int) -> float:
    started = time.perf_counter()
    asyncio.run(_prefill(path, depth))
    return time.perf_counter() - started


class SimProcess:
    """One `python -m bench.simworkers` child and the latest status line it printed."""

    def __init__(self, processes: procs.Processes, log: Path, argv: list[str], env: dict[str, str]):
        self.proc = processes.start(
            argv, log=log, env=env, cwd=procs.REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.log = log
        self.latest: dict[str, Any] = {}
        self.connected = threading.Event()
        self.final: dict[str, Any] | None = None
        threading.Thread(target=self._read, daemon=True, name=f"sim-{self.proc.pid}").start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # not a status line (stray output); the log has stderr
            if line["event"] == "connected":
                self.connected.set()
            elif line["event"] == "final":
                self.final = line
            self.latest = line

    def command(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{word}\n".encode())
        self.proc.stdin.flush()

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise procs.HarnessError(
                f"simulated workers exited with {self.proc.returncode}: "
                f"{(self.final or {}).get('error')}\n{procs.tail(self.log)}"
            )


def _start_sims(
    processes: procs.Processes, c: cluster.Cluster, workers: int, max_jobs: int, parts: int
) -> list[SimProcess]:
    sims = []
    for part in range(parts):
        count = workers // parts + (1 if part < workers % parts else 0)
        argv = [
            sys.executable,
            "-m",
            "bench.simworkers",
            "--port",
            str(c.port),
            "--count",
            str(count),
            "--max-jobs",
            str(max_jobs),
            "--prefix",
            f"sim{part}",
        ]
        sims.append(SimProcess(processes, c.workdir / f"sim-{part}.log", argv, c.env))
    return sims


def _total(sims: list[SimProcess], key: str) -> int:
    return sum(int(s.latest.get(key, 0)) for s in sims)


def _alive(c: cluster.Cluster, sims: list[SimProcess]) -> None:
    c.check_alive()
    for s in sims:
        s.check()


def _join(c: cluster.Cluster, sims: list[SimProcess], expected_held: int) -> float:
    """Wait until every simulated worker joined and holds its first assigns; seconds."""
    started = time.monotonic()

    def joined() -> bool:
        _alive(c, sims)
        return all(s.connected.is_set() for s in sims)

    procs.wait_until(joined, timeout=120, what="the simulated workers to connect")
    connect_seconds = time.monotonic() - started

    def holding() -> bool:
        _alive(c, sims)
        return _total(sims, "held") >= expected_held

    procs.wait_until(holding, timeout=60, what=f"{expected_held} held first assignments")
    return connect_seconds


def _window(c: cluster.Cluster, sims: list[SimProcess], target: int) -> dict[str, Any]:
    """Release the held assigns and run until `target` results were acknowledged."""
    assert c.dispatcher is not None
    pid, sim_pids = c.dispatcher.pid, [s.proc.pid for s in sims]
    cpu0, sim0 = procs.cpu_seconds(pid), sum(procs.cpu_seconds(p) for p in sim_pids)
    main0 = procs.main_thread_cpu_seconds(pid)
    t0 = time.monotonic()
    for s in sims:
        s.command("release")

    def reached() -> bool:
        _alive(c, sims)
        return _total(sims, "acks") >= target

    procs.wait_until(reached, timeout=120 + target / 100, what=f"{target} acknowledged results")
    cpu1, sim1 = procs.cpu_seconds(pid), sum(procs.cpu_seconds(p) for p in sim_pids)
    main1 = procs.main_thread_cpu_seconds(pid)
    wall = time.monotonic() - t0
    acks, t1 = _total(sims, "acks"), max(float(s.latest["t"]) for s in sims)
    return {
        "assignments": acks,
        "seconds": t1 - t0,
        "assignments_per_second": acks / (t1 - t0),
        "dispatcher_cpu_seconds": cpu1 - cpu0,
        "dispatcher_cpu_ms_per_assignment": (cpu1 - cpu0) * 1000 / acks,
        "dispatcher_cpu_utilisation": (cpu1 - cpu0) / wall,
        "dispatcher_main_thread_utilisation": (main1 - main0) / wall,
        "simulator_cpu_utilisation": (sim1 - sim0) / wall,
    }


def run_depth(
    depth: int, processes: procs.Processes, root: Path, secret: str, *, options: dict[str, int]
) -> dict[str, Any]:
    """One queue depth on a fresh database; `options`: workers, max_jobs, window, sim_procs."""
    workdir = root / f"scale-{depth}"
    workdir.mkdir()
    c = cluster.Cluster(processes, workdir, secret=secret)
    prefill_seconds = prefill(c.db_path, depth)
    sims: list[SimProcess] = []
    try:
        start_seconds = c.start_dispatcher(timeout=300)
        assert c.dispatcher is not None
        with procs.RssSampler({"dispatcher": c.dispatcher.pid}) as rss:
            rss_start = rss.current("dispatcher")
            sims = _start_sims(
                processes, c, options["workers"], options["max_jobs"], options["sim_procs"]
            )
            held = min(depth, options["workers"] * options["max_jobs"])
            connect_seconds = _join(c, sims, held)
            window = _window(c, sims, min(options["window"], depth))
        return {
            "depth": depth,
            "prefill_seconds": prefill_seconds,
            "dispatcher_start_seconds": start_seconds,
            "connect_seconds": connect_seconds,
            "held_before_window": held,
            **window,
            "dispatcher_rss_start": rss_start,
            "dispatcher_rss_peak": rss.peak["dispatcher"],
            "db_bytes": c.db_bytes(),
        }
    finally:
        for s in sims:
            processes.stop(s.proc, timeout=5)
        c.stop()


def run(
    depths: list[int], processes: procs.Processes, root: Path, secret: str, **options: int
) -> dict[str, Any]:
    rows = []
    for depth in depths:
        print(f"  scale: depth {depth:,} ...", file=sys.stderr, flush=True)
        rows.append(run_depth(depth, processes, root, secret, options=options))
    return {"options": options, "depths": rows}
