"""The `ha` scenario: the batch load (N `true` tasks, 2 workers x 4 jobs, TLS/TCP) on a
primary that replicates to a standby, once with `--replication async` and once with
`--replication sync`, each on a fresh pair. While the load runs, a thread reads the
primary's /api/v1/ha/status every 50 ms: how many committed transactions the standby has
not acknowledged yet (lag_records) and the age of the oldest of them (lag_seconds)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

from bench import cluster, procs, stats, throughput

MODES = ("async", "sync")
SAMPLE_SECONDS = 0.05
CATCH_UP_SECONDS = 30.0


@dataclasses.dataclass
class Sample:
    at: float  # seconds since sampling started
    lag_records: int
    lag_seconds: float
    synced: bool
    standby: bool  # the primary has a standby link


class LagSampler:
    """Reads the primary's /api/v1/ha/status every `interval` s in a thread."""

    def __init__(self, c: cluster.Cluster, interval: float = SAMPLE_SECONDS) -> None:
        self._cluster = c
        self._interval = interval
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lag-sampler", daemon=True)
        self._started = 0.0

    def __enter__(self) -> LagSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            self.sample()
            # every 50 ms from the previous start; right away after an answer slower than that
            due = max(due + self._interval, time.monotonic())
            self._stop.wait(max(0.0, due - time.monotonic()))

    def sample(self) -> None:
        try:
            body = self._cluster.ha_status(timeout=5)
        except (procs.HarnessError, OSError, ValueError) as exc:  # counted and reported
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return
        rep = body.get("replication") or {}
        self.samples.append(
            Sample(
                at=time.monotonic() - self._started,
                lag_records=int(rep.get("lag_records") or 0),
                lag_seconds=float(rep.get("lag_seconds") or 0.0),
                synced=bool(rep.get("synced")),
                standby=bool(rep.get("standby")),
            )
        )

    def summary(self) -> dict[str, Any]:
        seconds = [s.lag_seconds for s in self.samples]
        records = [s.lag_records for s in self.samples]
        return {
            "interval_seconds": self._interval,
            "samples": len(self.samples),
            "failed_samples": len(self.errors),
            "first_error": self.errors[0] if self.errors else None,
            "samples_without_standby": sum(not s.standby for s in self.samples),
            "samples_not_synced": sum(not s.synced for s in self.samples),
            "samples_lagging": sum(r > 0 for r in records),
            "lag_seconds": {
                "max": max(seconds, default=None),
                "p99": stats.percentile(seconds, 99),
                "p50": stats.percentile(seconds, 50),
            },
            "lag_records": {
                "max": max(records, default=None),
                "p99": stats.percentile(records, 99),
                "p50": stats.percentile(records, 50),
            },
        }


def _positions(c: cluster.Cluster) -> dict[str, Any]:
    """After the load: poll both nodes until the standby's lsn equals the primary's (or
    CATCH_UP_SECONDS pass); both lsns, whether they matched, and how long that took."""
    assert c.standby_api is not None
    started = time.monotonic()
    while True:
        primary = c.ha_status()
        standby = c.ha_status(c.standby_api)
        waited = time.monotonic() - started
        equal = primary.get("lsn") == standby.get("lsn")
        if equal or waited > CATCH_UP_SECONDS:
            break
        time.sleep(SAMPLE_SECONDS)
    return {
        "primary_lsn": primary.get("lsn"),
        "standby_lsn": standby.get("lsn"),
        "primary_term": primary.get("term"),
        "standby_term": standby.get("term"),
        "standby_role": standby.get("role"),
        "lsn_equal": equal,
        "seconds_to_equal": waited if equal else None,
        "wait_limit_seconds": CATCH_UP_SECONDS,
    }


def run_mode(
    mode: str, n: int, processes: procs.Processes, root: Path, secret: str
) -> dict[str, Any]:
    """The batch load on a fresh primary + standby replicating in `mode`."""
    workdir = root / f"ha-{mode}"
    workdir.mkdir()
    c = cluster.Cluster(processes, workdir, secret=secret)
    try:
        started = c.start_dispatcher(extra=["--replication", mode])
        standby_started = c.start_standby(replication=mode)
        c.start_workers(throughput.WORKERS, throughput.MAX_JOBS)
        with procs.RssSampler(c.pids()) as rss:
            cpu_before = throughput.cpu_snapshot(c.pids())
            with LagSampler(c) as lag:
                result = asyncio.run(throughput.push("batch", n, c))
            cpu_after = throughput.cpu_snapshot(c.pids())
        summary = lag.summary()
        if not summary["samples"]:
            raise procs.HarnessError(
                f"no /api/v1/ha/status sample succeeded during the load: {summary['first_error']}"
            )
        if summary["samples_without_standby"]:
            raise procs.HarnessError(
                f"the standby's link was gone in {summary['samples_without_standby']} of "
                f"{summary['samples']} samples during the {mode} load: its lag is not measured"
            )
        result.update(
            mode=mode,
            dispatcher_start_seconds=started,
            standby_start_to_synced_seconds=standby_started,
            peak_rss=rss.peak,
            cpu_seconds={k: cpu_after[k] - cpu_before[k] for k in cpu_before},
            lag=summary,
            positions=_positions(c),
        )
        return result
    finally:
        c.stop()


def run(n: int, processes: procs.Processes, root: Path, secret: str) -> dict[str, Any]:
    """Both modes, each on its own fresh pair: {"async": {...}, "sync": {...}}."""
    return {mode: run_mode(mode, n, processes, root, secret) for mode in MODES}
