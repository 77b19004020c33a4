"""`make soak` / `python -m bench.soak`: a long run of mixed load on a real cluster, checking
that the dispatcher's resources level off instead of growing with time.

A dispatcher and 2 workers (TLS over TCP, 4 jobs each) as separate processes on loopback
get, for `--minutes` (30): single and batch submits at a steady rate (about 20 tasks/s),
some failing (`exit 3`, a few retried), some timing out, long tasks cancelled while
queued or running, log follows read to the end, list/stats/workers/metrics queries,
event-stream readers that connect and go away after a few seconds, and client tokens
created, used, revoked and refused. Every `--interval` (30 s) it samples the dispatcher's
RSS and open file descriptors (psutil), the database file and its WAL, the workers'
RSS, tasks stored and finished, throughput and submit latency, and prints a row.

**Levels off**, for each judged series: the samples after a warm-up (the first 10 % of the
run, at least one interval) are cut in thirds by time, and the median of the last third
may exceed the median of the middle third by at most the series' tolerance (an absolute
amount plus a share of the middle level, shown in the summary). A leak grows each third
by the same amount and fails; growth that slows down (caches filling) passes. The slope
over the last half is printed too (per hour). With RSS's tolerance (1 MiB + 1 %), a
30-minute run flags a steady leak from about 12 MiB/h up; a shorter run sees less.

The dispatcher deletes finished tasks `--task-retention-minutes` (2) after they finished
(`--task-retention-hours`, checked every minute or more often), so the database holds a
steady window of tasks and its size (file + WAL) must level off like the rest: freed
pages take the new rows. The warm-up lasts at least until that window has filled. With
`--task-retention-minutes 0` (keep every task) the total grows by design, and the size per
stored task is judged instead. At the end the load stops, the queue drains, and every
acknowledged task must be accounted for: in a terminal state, or deleted by retention
(only tasks acknowledged more than the retention before the check may be, and no more
of them than the dispatcher's `octaskly_tasks_pruned_total`).

Exit status: 0 when every judged series levels off and nothing broke; 1 when one does
not, a process died, a request got an unexpected answer or a task was lost; 2 for bad
arguments. `--out FILE` writes the samples and verdicts as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import psutil

from bench import api, cluster, procs, stats
from octaskly.services import dispatcher as dispatching

WORKERS = 2
MAX_JOBS = 4
MIB = 1024 * 1024
TERMINAL = ("completed", "failed", "timed_out", "cancelled")
WARMUP_SHARE = 0.10
DRAIN_SECONDS = 120.0
PRUNE_SLACK_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one series is judged: it levels off if the median of the last third of the
    run exceeds the middle third's by at most `absolute + relative * middle`."""

    key: str
    label: str
    unit: str
    absolute: float
    relative: float


RULES = (
    Rule("rss_mib", "dispatcher RSS", "MiB", 1.0, 0.01),
    Rule("fds", "dispatcher open fds", "fds", 6.0, 0.0),
    Rule("db_mib", "database (file + WAL)", "MiB", 0.25, 0.02),
    Rule("wal_mib", "WAL file", "MiB", 2.0, 0.10),
    Rule("db_kib_per_task", "database per stored task", "KiB", 0.0, 0.05),
    Rule("worker_rss_mib", "worker RSS (largest)", "MiB", 1.0, 0.01),
)


@dataclasses.dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mib: float
    fds: int
    db_mib: float
    wal_mib: float
    db_kib_per_task: float
    worker_rss_mib: float
    stored: int
    finished: int  # runs finished since the dispatcher started (stats throughput)
    per_second: float
    queued: int
    running: int
    submit_p99_ms: float | None


@dataclasses.dataclass
class Verdict:
    rule: Rule
    levels: tuple[float, float, float] | None
    allowed: float
    slope_per_hour: float | None
    ok: bool
    note: str


# -- load -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Load:
    """Mixed load on one dispatcher; counts what it did and every unexpected answer."""

    base: str
    http: aiohttp.ClientSession
    stop: asyncio.Event
    rate: float
    rng: random.Random = dataclasses.field(default_factory=lambda: random.Random(20261127))
    retention: float = 0.0
    """Seconds finished tasks are kept (0: for ever): older ones may answer 404."""
    acked: dict[str, float] = dataclasses.field(default_factory=dict)
    """Acknowledged task ids and when (monotonic)."""
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def problem(self, text: str) -> None:
        self.count("unexpected")
        if len(self.problems) < 20:
            self.problems.append(text)

    def task(self) -> dict[str, Any]:
        """One task of the mix: mostly quick, some failing, retried or timing out."""
        roll = self.rng.random()
        if roll < 0.08:
            return {"command": "echo failing >&2; exit 3"}
        if roll < 0.12:
            return {"command": "exit 3", "retry_count": 1}
        if roll < 0.14:
            return {"command": "sleep 5", "timeout": 1}
        if roll < 0.30:
            return {"command": "for i in 1 2 3; do echo line $i; done"}
        return {"command": "true"}

    async def request(
        self, method: str, path: str, expect: tuple[int, ...], **kwargs: Any
    ) -> tuple[int, Any]:
        """One request; (status, JSON body or None). An answer not in `expect` is a problem."""
        try:
            async with self.http.request(method, f"{self.base}{path}", **kwargs) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.problem(f"{method} {path}: {exc!r}")
            return 0, None
        body = None
        with contextlib.suppress(ValueError):
            body = json.loads(text)
        if status not in expect:
            self.problem(f"{method} {path}: {status} {text[:200]}")
        return status, body

    async def every(self, seconds: float, action: Callable[[], Awaitable[None]]) -> None:
        """Run `action` every `seconds` (jittered, without overlap) until stopped."""
        while not self.stop.is_set():
            started = time.monotonic()
            await action()
            pause = seconds * self.rng.uniform(0.7, 1.3) - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), max(0.0, pause))

    async def _submit(self, body: Any, path: str) -> list[str]:
        started = time.perf_counter()
        status, answer = await self.request("POST", path, (201,), json=body)
        if status != 201 or not isinstance(answer, dict):
            return []
        self.latencies.append(time.perf_counter() - started)
        ids = answer["ids"] if "ids" in answer else [answer["id"]]
        now = time.monotonic()
        self.acked.update(dict.fromkeys(ids, now))
        self.count("tasks submitted", len(ids))
        return list(ids)

    async def single(self) -> None:
        await self._submit(self.task(), "/api/v1/tasks")

    async def batch(self) -> None:
        await self._submit({"tasks": [self.task() for _ in range(25)]}, "/api/v1/tasks/batch")

    async def cancel(self) -> None:
        ids = await self._submit({"command": "sleep 30"}, "/api/v1/tasks")
        if ids:
            await asyncio.sleep(self.rng.uniform(0.0, 2.0))  # queued or running by then
            status, _ = await self.request("DELETE", f"/api/v1/tasks/{ids[0]}", (200,))
            self.count("cancels", status == 200)

    async def follow(self) -> None:
        ids = await self._submit(
            {"command": "for i in 1 2 3 4 5; do echo f$i; sleep 0.1; done"}, "/api/v1/tasks"
        )
        if not ids:
            return
        path = f"/api/v1/tasks/{ids[0]}/logs?follow=true"
        try:
            async with asyncio.timeout(60):
                async with self.http.get(f"{self.base}{path}") as response:
                    lines = [json.loads(line) async for line in response.content if line.strip()]
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.problem(f"GET {path}: {exc!r}")
            return
        # live chunks, or the stored output when the run ended before we attached; then "end"
        out = "".join(e.get("data", "") for e in lines if e.get("stream") == "stdout")
        end = lines[-1] if lines else {}
        if out != "f1\nf2\nf3\nf4\nf5\n" or end.get("event") != "end":
            self.problem(f"follow of {ids[0]} read {lines[:8]}")
            return
        self.count("log follows")

    async def queries(self) -> None:
        for path in (
            "/api/v1/tasks?limit=50",
            "/api/v1/tasks?status=failed&limit=20",
            "/api/v1/stats",
            "/api/v1/workers",
            "/health",
        ):
            await self.request("GET", path, (200,))
        async with self.http.get(f"{self.base}/metrics") as response:
            await response.read()
            if response.status != 200:
                self.problem(f"GET /metrics: {response.status}")
        if self.acked:
            task_id = self.rng.choice(tuple(self.acked))
            # one acknowledged longer ago than the retention may have been deleted since
            young = not self.retention or time.monotonic() - self.acked[task_id] < self.retention
            await self.request("GET", f"/api/v1/tasks/{task_id}", (200,) if young else (200, 404))
        self.count("query rounds")

    async def events(self) -> None:
        seconds = self.rng.uniform(1.0, 3.0)
        received = 0
        try:
            async with self.http.get(f"{self.base}/api/v1/events") as response:
                if response.status != 200:
                    self.problem(f"GET /api/v1/events: {response.status}")
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(seconds):
                        async for line in response.content:
                            received += line.startswith(b"event:")
        except aiohttp.ClientError as exc:
            self.problem(f"GET /api/v1/events: {exc!r}")
            return
        if not received:
            self.problem("an event stream sent nothing in 1-3 s (stats come every second)")
        self.count("event readers")
        self.count("events read", received)

    async def tokens(self) -> None:
        status, body = await self.request(
            "POST",
            "/api/v1/tokens",
            (201,),
            json={"role": "client", "subject": f"soak-{self.rng.randrange(10**6)}", "ttl": "10m"},
        )
        if status != 201 or not isinstance(body, dict):
            return
        own = {"Authorization": f"Bearer {body['token']}"}
        await self.request("GET", "/api/v1/whoami", (200,), headers=own)
        await self.request("DELETE", f"/api/v1/tokens/{body['id']}", (200,))
        await self.request("GET", "/api/v1/whoami", (401,), headers=own)
        self.count("tokens created and revoked")

    def lanes(self) -> list[Awaitable[None]]:
        """About `rate` tasks/s: a third single submits, the rest in batches of 25."""
        return [
            self.every(3.0 / self.rate, self.single),
            self.every(25 * 1.5 / self.rate, self.batch),
            self.every(5.0, self.cancel),
            self.every(3.0, self.follow),
            self.every(1.0, self.queries),
            self.every(4.0, self.events),
            self.every(10.0, self.tokens),
        ]


# -- sampling ---------------------------------------------------------------------------------
class Sampler:
    def __init__(self, c: cluster.Cluster, load: Load) -> None:
        self.c, self.load = c, load
        pids = c.pids()
        self.dispatcher = psutil.Process(pids["dispatcher"])
        self.workers = [psutil.Process(p) for n, p in pids.items() if n.startswith("worker")]
        self.samples: list[Sample] = []
        self.started = time.monotonic()
        self._last: tuple[float, int] | None = None

    async def sample(self) -> Sample:
        self.c.check_alive()
        status, body = await self.load.request("GET", "/api/v1/stats", (200,))
        if status != 200 or not isinstance(body, dict):
            raise procs.HarnessError(f"GET /api/v1/stats answered {status}")
        now = time.monotonic()
        finished = int(body["throughput"]["finished_total"])
        rate = 0.0
        if self._last is not None:
            rate = (finished - self._last[1]) / max(1e-9, now - self._last[0])
        self._last = (now, finished)
        sizes = self.c.db_bytes()
        stored = int(body["database"]["total_tasks"])
        latencies, self.load.latencies = self.load.latencies, []
        p99 = stats.percentile([x * 1000 for x in latencies], 99)
        sample = Sample(
            t=now - self.started,
            rss_mib=self.dispatcher.memory_info().rss / MIB,
            fds=self.dispatcher.num_fds(),
            db_mib=(sizes["db"] + sizes["wal"]) / MIB,
            wal_mib=sizes["wal"] / MIB,
            db_kib_per_task=(sizes["db"] + sizes["wal"]) / 1024 / max(1, stored),
            worker_rss_mib=max(w.memory_info().rss for w in self.workers) / MIB,
            stored=stored,
            finished=finished,
            per_second=rate,
            queued=int(body["tasks"]["queued"]),
            running=int(body["tasks"]["running"]),
            submit_p99_ms=p99,
        )
        self.samples.append(sample)
        return sample


HEADER = (
    f"{'time':>7} {'RSS MiB':>8} {'fds':>5} {'db MiB':>8} {'WAL MiB':>8} {'KiB/task':>8} "
    f"{'wrk MiB':>8} {'stored':>8} {'finished':>9} {'tasks/s':>8} {'queued':>7} "
    f"{'running':>7} {'p99 ms':>7}"
)


def row(s: Sample) -> str:
    p99 = "-" if s.submit_p99_ms is None else f"{s.submit_p99_ms:.1f}"
    return (
        f"{_clock(s.t):>7} {s.rss_mib:8.1f} {s.fds:5d} {s.db_mib:8.2f} {s.wal_mib:8.2f} "
        f"{s.db_kib_per_task:8.2f} {s.worker_rss_mib:8.1f} {s.stored:8d} {s.finished:9d} "
        f"{s.per_second:8.1f} {s.queued:7d} {s.running:7d} {p99:>7}"
    )


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


# -- judging ----------------------------------------------------------------------------------
def _slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    ts, vs = [p[0] for p in points], [p[1] for p in points]
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    den = sum((t - mt) ** 2 for t in ts)
    if not den:
        return None
    return sum((t - mt) * (v - mv) for t, v in zip(ts, vs, strict=True)) / den * 3600


def judge(samples: list[Sample], rule: Rule, warmup: float) -> Verdict:
    """Whether the series `rule.key` levels off (see the module docstring)."""
    points = [(s.t, float(getattr(s, rule.key))) for s in samples if s.t >= warmup]
    half = points[len(points) // 2 :]
    slope = _slope_per_hour(half)
    if len(points) < 3:
        return Verdict(rule, None, 0.0, slope, False, f"only {len(points)} samples after warm-up")
    start, end = points[0][0], points[-1][0]
    cut1, cut2 = start + (end - start) / 3, start + 2 * (end - start) / 3
    parts = [
        [v for t, v in points if t <= cut1],
        [v for t, v in points if cut1 < t <= cut2],
        [v for t, v in points if t > cut2],
    ]
    if not all(parts):
        return Verdict(rule, None, 0.0, slope, False, "too few samples for thirds")
    first, middle, last = (statistics.median(p) for p in parts)
    allowed = rule.absolute + rule.relative * middle
    grew = last - middle
    ok = grew <= allowed
    note = f"last third {grew:+.2f} {rule.unit} vs middle (allowed {allowed:.2f})"
    return Verdict(rule, (first, middle, last), allowed, slope, ok, note)


# -- the run ----------------------------------------------------------------------------------
async def _drain(load: Load, c: cluster.Cluster) -> dict[str, int]:
    """Wait until nothing is queued or running; the counts by status."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while True:
        c.check_alive()
        status, body = await load.request("GET", "/api/v1/stats", (200,))
        if status == 200 and isinstance(body, dict):
            counts = {k: int(v) for k, v in body["tasks"].items()}
            if counts["queued"] + counts["running"] == 0:
                return counts
        if time.monotonic() > deadline:
            raise procs.HarnessError(f"the queue did not drain in {DRAIN_SECONDS:.0f} s")
        await asyncio.sleep(0.5)


async def _accounted(load: Load) -> dict[str, Any]:
    """Every acknowledged task, accounted for: found in a terminal state, or deleted by
    retention. A task can have been deleted only once the retention has passed since it
    finished, so after it was acknowledged: younger ones must be found (by id, should the
    listing have raced with a deletion); older ones not found are lost if there are more
    of them than the dispatcher deleted."""

    def deletable(task_id: str) -> bool:
        # a few seconds of slack: a task may finish before its submitter hears the 201
        return bool(load.retention) and load.acked[task_id] < time.monotonic() - (
            load.retention - PRUNE_SLACK_SECONDS
        )

    found = await _terminal(load)
    older = 0
    lost: list[str] = []
    for task_id in [t for t in load.acked if t not in found]:
        if deletable(task_id):
            older += 1
            continue
        status, body = await load.request("GET", f"/api/v1/tasks/{task_id}", (200, 404))
        if status == 200 and isinstance(body, dict) and body.get("status") in TERMINAL:
            continue
        if status == 404 and deletable(task_id):
            older += 1
        else:
            lost.append(task_id)
    found_count = len(load.acked) - older - len(lost)
    pruned = await _pruned_total(load) if load.retention else 0
    lost += ["(acknowledged earlier, gone, beyond those deleted)"] * max(0, older - pruned)
    return {"found": found_count, "pruned": pruned, "lost": lost}


async def _pruned_total(load: Load) -> int:
    async with load.http.get(f"{load.base}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("octaskly_tasks_pruned_total "):
            return int(float(line.split()[1]))
    raise procs.HarnessError("octaskly_tasks_pruned_total is not in /metrics")


async def _terminal(load: Load) -> set[str]:
    """The ids the list endpoint has in a terminal state."""
    found: set[str] = set()
    for status in TERMINAL:
        offset = 0
        while True:
            path = f"/api/v1/tasks?status={status}&limit=1000&offset={offset}"
            code, body = await load.request("GET", path, (200,))
            if code != 200 or not isinstance(body, dict):
                raise procs.HarnessError(f"GET {path} answered {code}")
            found.update(t["id"] for t in body["tasks"])
            offset += len(body["tasks"])
            if not body["tasks"] or offset >= body["total"]:
                break
    return found


async def soak(args: argparse.Namespace, c: cluster.Cluster) -> dict[str, Any]:
    duration = args.minutes * 60
    connector = aiohttp.TCPConnector(limit=64)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=connector, headers=api.headers(), timeout=timeout
    ) as http:
        load = Load(
            c.api, http, asyncio.Event(), args.rate, retention=args.task_retention_minutes * 60
        )
        sampler = Sampler(c, load)
        print(HEADER, flush=True)
        print(row(await sampler.sample()), flush=True)
        lanes = [asyncio.ensure_future(lane) for lane in load.lanes()]
        try:
            next_at = sampler.started + args.interval
            end_at = sampler.started + duration
            while True:
                await asyncio.sleep(max(0.0, min(next_at, end_at) - time.monotonic()))
                for lane in lanes:
                    if lane.done():
                        lane.result()  # a lane that crashed is a harness bug: raise it
                        raise procs.HarnessError("a load lane ended early")
                print(row(await sampler.sample()), flush=True)
                if time.monotonic() >= end_at - 0.5:
                    break
                next_at += args.interval
        finally:
            load.stop.set()
            _, pending = await asyncio.wait(lanes, timeout=70)
            for lane in pending:
                lane.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
        counts = await _drain(load, c)
        accounted = await _accounted(load)
    return {"load": load, "samples": sampler.samples, "counts": counts, **accounted}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="length of the load (30)")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between samples (30)")
    p.add_argument("--rate", type=float, default=20.0, help="tasks submitted per second (20)")
    p.add_argument("--out", type=Path, help="write the samples and verdicts here (JSON)")
    p.add_argument(
        "--task-retention-minutes",
        type=float,
        default=2.0,
        help="the dispatcher deletes finished tasks this long after they finished (2); "
        "0 keeps every task, and the size per stored task is judged instead of the total",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0 or args.rate <= 0:
        p.error("--minutes, --interval and --rate must be positive")
    if args.task_retention_minutes < 0:
        p.error("--task-retention-minutes must not be negative")
    if args.minutes * 60 - warmup_seconds(args) < 6 * args.interval:
        p.error(
            f"the run must last at least 6 intervals after the warm-up of "
            f"{warmup_seconds(args):.0f} s (thirds need samples; the warm-up covers the "
            "task retention: shorten --task-retention-minutes or lengthen --minutes)"
        )
    return args


def warmup_seconds(args: argparse.Namespace) -> float:
    """Samples before this are not judged: 10 % of the run, at least one interval, and
    with retention until the window of kept tasks has filled and been pruned once."""
    warmup = float(max(args.interval, WARMUP_SHARE * args.minutes * 60))
    retention = float(args.task_retention_minutes) * 60
    if retention:
        # as the dispatcher: a short retention is enforced more often than every minute
        prune_every = min(dispatching.PRUNE_SECONDS, max(0.2, retention / 4))
        warmup = max(warmup, retention + prune_every + args.interval)
    return warmup


def dispatcher_args(args: argparse.Namespace) -> list[str]:
    return ["--task-retention-hours", f"{args.task_retention_minutes / 60:.6g}"]


def _judged(args: argparse.Namespace) -> list[Rule]:
    skip = "db_kib_per_task" if args.task_retention_minutes else "db_mib"
    return [r for r in RULES if r.key != skip]


def summary(args: argparse.Namespace, result: dict[str, Any], wall: float) -> tuple[str, bool]:
    samples: list[Sample] = result["samples"]
    load: Load = result["load"]
    warmup = warmup_seconds(args)
    verdicts = [judge(samples, rule, warmup) for rule in RULES]
    judged = {r.key for r in _judged(args)}
    lines = [
        "",
        f"== soak: {_clock(wall)} (load {args.minutes:g} min, a sample every "
        f"{args.interval:g} s, warm-up {warmup:.0f} s not judged)",
        f"{'series':<28} {'first':>9} {'middle':>9} {'last':>9} {'slope/h':>9}  verdict",
    ]
    ok = True
    for v in verdicts:
        levels = v.levels or (float("nan"),) * 3
        slope = "-" if v.slope_per_hour is None else f"{v.slope_per_hour:+.1f}"
        if v.rule.key not in judged:
            word = "(not judged)"
        elif v.ok:
            word = "levels off"
        else:
            word, ok = "DOES NOT LEVEL OFF", False
        lines.append(
            f"{v.rule.label + ' (' + v.rule.unit + ')':<28} {levels[0]:9.2f} {levels[1]:9.2f} "
            f"{levels[2]:9.2f} {slope:>9}  {word}: {v.note}"
        )
    if args.task_retention_minutes and not verdicts[2].ok:
        lines.append(
            f"  the database keeps growing although finished tasks are deleted "
            f"{args.task_retention_minutes:g} min after they finished: pages are not reused, "
            "or tasks are not deleted (see octaskly_tasks_pruned_total)"
        )
    counts, missing, pruned = result["counts"], result["lost"], result["pruned"]
    done = {k: v for k, v in sorted(load.counts.items())}
    lines.append(f"load: {done}")
    lines.append(
        f"tasks: acknowledged {len(load.acked)} / found {result['found']} / deleted by "
        f"retention {pruned} / lost {len(missing)}; by status {counts}"
    )
    if missing:
        ok = False
        lines.append(f"  LOST, e.g. {missing[:5]}")
    if load.problems:
        ok = False
        lines.append(f"unexpected answers ({load.counts.get('unexpected', 0)}):")
        lines += [f"  {p}" for p in load.problems]
    lines.append(f"verdict: {'PASS' if ok else 'FAIL'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "config": {k: str(v) for k, v in vars(args).items()},
                    "samples": [dataclasses.asdict(s) for s in samples],
                    "verdicts": [
                        {
                            "series": v.rule.key,
                            "label": v.rule.label,
                            "unit": v.rule.unit,
                            "judged": v.rule.key in judged,
                            "levels": v.levels,
                            "allowed": v.allowed,
                            "slope_per_hour": v.slope_per_hour,
                            "levels_off": v.ok,
                            "note": v.note,
                        }
                        for v in verdicts
                    ],
                    "load": load.counts,
                    "tasks": {
                        "acknowledged": len(load.acked),
                        "found": result["found"],
                        "pruned": pruned,
                        "lost": len(missing),
                        **counts,
                    },
                    "problems": load.problems,
                    "pass": ok,
                },
                indent=1,
            )
        )
        lines.append(f"written to {args.out}")
    return "\n".join(lines), ok


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # so every `finally` runs and the processes end


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    root = Path(tempfile.mkdtemp(prefix="octaskly-soak-"))
    processes = procs.Processes()
    started = time.monotonic()
    try:
        c = cluster.Cluster(processes, root, secret=cluster.secret_key())
        c.start_dispatcher(extra=dispatcher_args(args))
        c.start_workers(WORKERS, MAX_JOBS, transport="tcp")
        print(
            f"soak: dispatcher + {WORKERS} workers x {MAX_JOBS} jobs, ~{args.rate:g} tasks/s "
            f"of mixed load for {args.minutes:g} min; finished tasks kept "
            f"{args.task_retention_minutes:g} min; data in {root}",
            flush=True,
        )
        result = asyncio.run(soak(args, c))
        c.stop()
    except procs.HarnessError as exc:
        print(f"soak: the harness or the cluster broke: {exc}", file=sys.stderr)
        return 1
    finally:
        processes.kill_all()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    text, ok = summary(args, result, time.monotonic() - started)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
