"""Issue 3's targets (and the standby's replication lag), checked against a results dict.
The harness reports; it never fails a run for a missed target. A row without a limit is
informational: its value is shown, never judged."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

MIB = 1024 * 1024
FLAT_RATIO = 1.5  # the harness's reading of "flat": the largest depth costs <= 1.5x per task
ONE_MILLION = 1_000_000


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    where: str
    value: float | None
    limit: float | None  # None: informational
    higher_is_better: bool
    unit: str

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        if self.limit is None:
            return "info"
        ok = self.value >= self.limit if self.higher_is_better else self.value <= self.limit
        return "PASS" if ok else "FAIL"


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _scale_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return list(_get(results, "scale", "depths") or [])


def flatness(results: dict[str, Any]) -> tuple[float | None, str]:
    """CPU per assignment at the largest depth over that at the smallest depth whose window
    is long (at least 10x the assignments held before it started)."""
    rows = [r for r in _scale_rows(results) if r["assignments"] >= 10 * r["held_before_window"]]
    if len(rows) < 2:
        return None, "needs two depths with windows >= 10x the held assignments"
    low, high = rows[0], rows[-1]
    ratio = high["dispatcher_cpu_ms_per_assignment"] / low["dispatcher_cpu_ms_per_assignment"]
    return ratio, f"{high['depth']:,} vs {low['depth']:,} queued"


def _rss_at_million(results: dict[str, Any]) -> float | None:
    for row in _scale_rows(results):
        if row["depth"] >= ONE_MILLION:
            return float(row["dispatcher_rss_peak"]) / MIB
    return None


def _ratio(results: dict[str, Any]) -> float | None:
    rate, limit = _get(results, "batch", "tasks_per_second"), _get(results, "limit", "per_second")
    return None if rate is None or not limit else 100 * rate / limit


def _quic_share(results: dict[str, Any]) -> float | None:
    tcp, quic = (
        _get(results, "batch", "tasks_per_second"),
        _get(results, "quic", "tasks_per_second"),
    )
    return None if not tcp or quic is None else 100 * quic / tcp


def _ha_share(results: dict[str, Any], mode: str) -> float | None:
    """Throughput of the batch load with a standby replicating in `mode`, as a share of
    the plain batch scenario's of the same run."""
    batch = _get(results, "batch", "tasks_per_second")
    replicated = _get(results, "ha", mode, "tasks_per_second")
    return None if not batch or replicated is None else 100 * replicated / batch


def _federation_share(results: dict[str, Any], config: str) -> float | None:
    """Throughput of a PostgreSQL configuration of the federation scenario as a share of
    the SQLite one's of the same scenario."""
    sqlite = _get(results, "federation", "configs", "sqlite-1", "tasks_per_second")
    other = _get(results, "federation", "configs", config, "tasks_per_second")
    return None if not sqlite or other is None else 100 * other / sqlite


def _isolation_cost(results: dict[str, Any], variant: str) -> float | None:
    """CPU per task (measuring process + its children) of an isolation variant over that of
    the same level before issue 18's isolation, same run."""
    ratio = _get(results, "isolation", "variants", variant, "cpu_vs_before")
    return None if ratio is None else float(ratio)


def _min_rate(results: dict[str, Any]) -> float | None:
    rates = [r["assignments_per_second"] for r in _scale_rows(results)]
    return min(rates) if rates else None


def _scaled(value: Any, factor: float) -> float | None:
    return None if value is None else float(value) * factor


Getter = Callable[[dict[str, Any]], float | None]
# The queue→start target holds "when the cluster has free slots": the latency probe. In the
# batch scenario every slot is busy and a task waits its turn (seconds): reported, not judged.
PROBE = "latency probe (free slots)"
# The standby's lag: the largest lag_seconds (age of the oldest commit the standby has not
# acknowledged) of the primary's /api/v1/ha/status, read every 50 ms during the batch load.
# The throughput shares with a standby are informational (no limit).

# (name, where, value, limit, higher is better, unit)
TABLE: tuple[tuple[str, str, Getter, float | None, bool, str], ...] = (
    ("batch throughput", "batch", lambda r: _get(r, "batch", "tasks_per_second"), 1000, True,
     "tasks/s"),
    ("batch throughput / limit", "batch", lambda r: _ratio(r), 60, True, "%"),
    ("QUIC throughput / TLS-TCP", "quic vs batch", lambda r: _quic_share(r), 85, True, "%"),
    ("single throughput", "single", lambda r: _get(r, "single", "tasks_per_second"), 500, True,
     "tasks/s"),
    ("async replication lag (max)", "ha, async, 50 ms samples",
     lambda r: _scaled(_get(r, "ha", "async", "lag", "lag_seconds", "max"), 1000), 1000, False,
     "ms"),
    ("ha async throughput / batch", "ha vs batch", lambda r: _ha_share(r, "async"), None, True,
     "%"),
    ("ha sync throughput / batch", "ha vs batch", lambda r: _ha_share(r, "sync"), None, True,
     "%"),
    ("PG 1 dispatcher / SQLite", "federation", lambda r: _federation_share(r, "pg-1"), None,
     True, "%"),
    ("PG 2 dispatchers / SQLite", "federation", lambda r: _federation_share(r, "pg-2"), None,
     True, "%"),
    ("PG 3 dispatchers / SQLite", "federation", lambda r: _federation_share(r, "pg-3"), None,
     True, "%"),
    ("isolation CPU basic / before", "isolation, containment auto",
     lambda r: _isolation_cost(r, "basic-auto"), None, False, "x"),
    ("isolation CPU strict / before", "isolation", lambda r: _isolation_cost(r, "strict"), None,
     False, "x"),
    ("queue→start p50", PROBE, lambda r: _get(r, "batch", "probe", "queue_to_start", "p50_ms"),
     5, False, "ms"),
    ("queue→start p99", PROBE, lambda r: _get(r, "batch", "probe", "queue_to_start", "p99_ms"),
     50, False, "ms"),
    ("scale assignments/s", "slowest depth", lambda r: _min_rate(r), 5000, True, "/s"),
    ("dispatcher RSS at 1M queued", "scale, peak", lambda r: _rss_at_million(r), 300, False,
     "MiB"),
    ("dispatcher idle RSS", "startup",
     lambda r: _scaled(_get(r, "startup", "idle", "rss_bytes"), 1 / MIB), 80, False, "MiB"),
    ("octaskly.pyz --version cold", "startup, median of 5",
     lambda r: _get(r, "startup", "pyz", "direct_median_seconds"), 1.0, False, "s"),
)  # fmt: skip


def evaluate(results: dict[str, Any]) -> list[Target]:
    """Every target with its measured value (None when its scenario did not run)."""
    found = [Target(n, w, value(results), lim, hi, u) for n, w, value, lim, hi, u in TABLE]
    flat, flat_where = flatness(results)
    after = next(i for i, t in enumerate(found) if t.name == "scale assignments/s") + 1
    found.insert(
        after, Target("scale per-task cost flat", flat_where, flat, FLAT_RATIO, False, "x")
    )
    return found
