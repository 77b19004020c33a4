"""Pushing `true` tasks through the REST API and reading back what happened to them.

Submission (batch or single) runs beside a completion watcher that polls /api/v1/stats
at 10 Hz; afterwards the task list endpoint gives each task's created/started/completed
times, from which the latencies are computed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from bench import api, procs, stats

TASK = {"command": "true"}
POLL_SECONDS = 0.1
PAGE = 1000
TERMINAL = ("completed", "failed", "timed_out", "cancelled")


@dataclasses.dataclass
class Submission:
    """What the client saw: when the first request left, each request's latency, the ids."""

    first_sent: float = 0.0  # wall clock, comparable with the dispatcher's timestamps
    latencies: list[float] = dataclasses.field(default_factory=list)
    ids: list[str] = dataclasses.field(default_factory=list)

    def mark_first(self) -> None:
        if not self.first_sent:
            self.first_sent = time.time()


def session(connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections)
    return aiohttp.ClientSession(
        connector=connector, headers=api.headers(), timeout=aiohttp.ClientTimeout(total=120)
    )


async def post(http: aiohttp.ClientSession, url: str, body: Any, sub: Submission) -> Any:
    sub.mark_first()
    started = time.perf_counter()
    async with http.post(url, json=body) as response:
        payload = await response.json()
        if response.status != 201:
            raise procs.HarnessError(f"POST {url} answered {response.status}: {payload}")
    sub.latencies.append(time.perf_counter() - started)
    return payload


async def submit_batches(
    http: aiohttp.ClientSession, base: str, n: int, *, size: int, in_flight: int
) -> Submission:
    """`n` tasks in batches of `size`, `in_flight` batch requests at a time."""
    sub = Submission()
    sizes = iter([min(size, n - start) for start in range(0, n, size)])
    url = f"{base}/api/v1/tasks/batch"

    async def lane() -> None:
        for count in sizes:  # one iterator shared by all lanes
            payload = await post(http, url, {"tasks": [TASK] * count}, sub)
            sub.ids.extend(payload["ids"])

    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return sub


async def submit_singles(
    http: aiohttp.ClientSession, base: str, n: int, *, clients: int
) -> Submission:
    """`n` tasks one per request from `clients` concurrent clients."""
    sub = Submission()
    numbers = iter(range(n))
    url = f"{base}/api/v1/tasks"

    async def client() -> None:
        for _ in numbers:
            sub.ids.append((await post(http, url, TASK, sub))["id"])

    await asyncio.gather(*(client() for _ in range(clients)))
    return sub


async def submit_paced(
    http: aiohttp.ClientSession, base: str, n: int, *, rate: float
) -> Submission:
    """`n` single submits started at `rate` per second regardless of their latency."""
    sub = Submission()
    url = f"{base}/api/v1/tasks"
    started = time.monotonic()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        sub.ids.append((await post(http, url, TASK, sub))["id"])

    await asyncio.gather(*(one(i) for i in range(n)))
    return sub


async def wait_terminal(
    http: aiohttp.ClientSession,
    base: str,
    total: int,
    *,
    check_alive: Callable[[], None],
    timeout: float,
    stall: float = 60.0,
) -> dict[str, int]:
    """Poll /api/v1/stats at 10 Hz until `total` tasks ended; HarnessError if they never
    do (lost tasks), if progress stalls for `stall` s, or if a process died."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while True:
        check_alive()
        async with http.get(f"{base}/api/v1/stats") as response:
            if response.status != 200:
                raise procs.HarnessError(f"GET /api/v1/stats answered {response.status}")
            counts = (await response.json())["tasks"]
        ended = sum(counts[s] for s in TERMINAL)
        if ended >= total:
            return {k: int(v) for k, v in counts.items()}
        now = time.monotonic()
        if ended != last:
            last, last_change = ended, now
        if now > deadline or now - last_change > stall:
            raise procs.HarnessError(
                f"only {ended} of {total} tasks ended after {timeout - (deadline - now):.0f} s "
                f"(last progress {now - last_change:.0f} s ago): lost tasks? counts {counts}"
            )
        await asyncio.sleep(POLL_SECONDS)


async def fetch_records(http: aiohttp.ClientSession, base: str, count: int) -> list[dict[str, Any]]:
    """The newest `count` task summaries, via the list endpoint in pages of 1,000."""
    records: list[dict[str, Any]] = []
    for offset in range(0, count, PAGE):
        limit = min(PAGE, count - offset)
        url = f"{base}/api/v1/tasks?limit={limit}&offset={offset}"
        async with http.get(url) as response:
            if response.status != 200:
                raise procs.HarnessError(f"GET {url} answered {response.status}")
            records.extend((await response.json())["tasks"])
    return records


def check_records(sub: Submission, records: list[dict[str, Any]]) -> None:
    """Every acknowledged task is there and completed with exit code 0."""
    by_id = {r["id"]: r for r in records}
    missing = [i for i in sub.ids if i not in by_id]
    if missing:
        raise procs.HarnessError(
            f"{len(missing)} acknowledged tasks are missing, e.g. {missing[0]}"
        )
    bad = [by_id[i] for i in sub.ids if by_id[i]["status"] != "completed" or by_id[i]["exit_code"]]
    if bad:
        raise procs.HarnessError(f"{len(bad)} `true` tasks did not complete, e.g. {bad[0]}")


def _times(record: dict[str, Any]) -> tuple[float, float, float]:
    """(created, started, completed) of a finished task, epoch seconds."""
    parsed = [api.parse_time(record[k]) for k in ("created_at", "started_at", "completed_at")]
    created, started, completed = parsed
    if created is None or started is None or completed is None:
        raise procs.HarnessError(f"task {record['id']} lacks a timestamp: {record}")
    return created, started, completed


def latencies(sub: Submission, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput and latency summary of the submitted tasks."""
    mine = set(sub.ids)
    times = [_times(r) for r in records if r["id"] in mine]
    last = max(t[2] for t in times)
    return {
        "tasks": len(times),
        "seconds": last - sub.first_sent,
        "tasks_per_second": len(times) / (last - sub.first_sent),
        "submit_request": stats.latency_ms(sub.latencies),
        "queue_to_start": stats.latency_ms([s - c for c, s, _ in times]),
        "submit_to_complete": stats.latency_ms([e - c for c, _, e in times]),
        "first_created_after_first_sent_ms": (min(t[0] for t in times) - sub.first_sent) * 1000,
        "start_span_seconds": max(t[1] for t in times) - min(t[1] for t in times),
    }
