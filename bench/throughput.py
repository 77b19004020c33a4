"""The cluster scenarios: N `true` tasks through a fresh dispatcher + 2 workers, by batch
or single submits, and a latency probe at a rate the cluster serves with free slots."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from bench import cluster, load, procs

WORKERS = 2
MAX_JOBS = 4
BATCH_SIZE = 500
BATCHES_IN_FLIGHT = 4
SINGLE_CLIENTS = 64
PROBE_TASKS = 500
PROBE_RATE = 100.0


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    named = {name: procs.cpu_seconds(pid) for name, pid in pids.items()}
    named["bench"] = procs.cpu_seconds(os.getpid())
    named["machine"] = procs.machine_busy_seconds()
    return named


async def push(kind: str, n: int, c: cluster.Cluster) -> dict[str, Any]:
    """Submit, wait for all to end, read the records back; the scenario's numbers."""
    async with load.session(SINGLE_CLIENTS) as http:
        watcher = asyncio.create_task(
            load.wait_terminal(http, c.api, n, check_alive=c.check_alive, timeout=120 + n / 50)
        )
        try:
            if kind == "batch":
                sub = await load.submit_batches(
                    http, c.api, n, size=BATCH_SIZE, in_flight=BATCHES_IN_FLIGHT
                )
            else:
                sub = await load.submit_singles(http, c.api, n, clients=SINGLE_CLIENTS)
            counts = await watcher
        finally:
            watcher.cancel()
        db = c.db_bytes()
        records = await load.fetch_records(http, c.api, n)
    load.check_records(sub, records)
    return {**load.latencies(sub, records), "counts": counts, "db_bytes": db}


async def _probe(c: cluster.Cluster, n: int, *, before: int) -> dict[str, Any]:
    """`n` single submits paced at PROBE_RATE on a cluster that already ran `before` tasks."""
    async with load.session(16) as http:
        sub = await load.submit_paced(http, c.api, n, rate=PROBE_RATE)
        await load.wait_terminal(http, c.api, before + n, check_alive=c.check_alive, timeout=60)
        records = await load.fetch_records(http, c.api, n)
    load.check_records(sub, records)
    return {"rate": PROBE_RATE, **load.latencies(sub, records)}


def run(
    kind: str,
    n: int,
    processes: procs.Processes,
    root: Path,
    secret: str,
    *,
    transport: str = "tcp",
) -> dict[str, Any]:
    """One scenario (`batch` or `single`) on a fresh cluster with workers on `transport`
    (TLS over TCP, or QUIC); batch adds a latency probe."""
    workdir = root / f"{kind}-{transport}"
    workdir.mkdir()
    c = cluster.Cluster(processes, workdir, secret=secret)
    try:
        started = c.start_dispatcher()
        c.start_workers(WORKERS, MAX_JOBS, transport=transport)
        with procs.RssSampler(c.pids()) as rss:
            cpu_before, rss_before = cpu_snapshot(c.pids()), rss.current("dispatcher")
            result = asyncio.run(push(kind, n, c))
            cpu_after = cpu_snapshot(c.pids())
        result.update(
            dispatcher_start_seconds=started,
            dispatcher_rss_before=rss_before,
            peak_rss=rss.peak,
            cpu_seconds={k: cpu_after[k] - cpu_before[k] for k in cpu_before},
            transport=transport,
        )
        if kind == "batch":
            result["probe"] = asyncio.run(_probe(c, PROBE_TASKS, before=n))
        return result
    finally:
        c.stop()
