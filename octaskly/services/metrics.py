"""Prometheus metrics of one dispatcher (`GET /metrics`, prometheus-client).

Counters and histograms are updated where things happen (submit, assignment, result,
API request, database commit); gauges that mirror state (tasks by status, queue depth by
priority, workers by state, replication) are refreshed from the dispatcher on each
scrape. One registry per dispatcher (tests run several in one process). Names follow
Prometheus conventions: `octaskly_…_total` for counters, base units (`_seconds`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from octaskly.domain import models

if TYPE_CHECKING:
    from octaskly.services.dispatcher import Dispatcher

CONTENT_TYPE = CONTENT_TYPE_LATEST
# task runs last from milliseconds to hours
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 3600)
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.submitted = Counter(
            "octaskly_tasks_submitted_total", "Tasks acknowledged (201)", registry=r
        )
        self.finished = Counter(
            "octaskly_tasks_finished_total",
            "Task runs that ended, by outcome (a retried run counts once per run)",
            ["status"],
            registry=r,
        )
        self.pruned = Counter(
            "octaskly_tasks_pruned_total",
            "Finished tasks deleted after their retention (task_retention_hours)",
            registry=r,
        )
        self.assignments = Counter(
            "octaskly_scheduler_assignments_total", "Tasks assigned to workers", registry=r
        )
        self.duration = Histogram(
            "octaskly_task_duration_seconds",
            "How long task runs took on their workers, by outcome",
            ["status"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "octaskly_task_queue_wait_seconds",
            "Time from submit to assignment of a task's first run",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.api = Histogram(
            "octaskly_api_request_duration_seconds",
            "REST API requests, by route, method and status",
            ["route", "method", "status"],
            buckets=API_BUCKETS,
            registry=r,
        )
        self.commit = Histogram(
            "octaskly_db_commit_duration_seconds",
            "Database transactions (group commits, fsync included)",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.tasks = Gauge(
            "octaskly_tasks", "Tasks in the database, by status", ["status"], registry=r
        )
        self.queue = Gauge(
            "octaskly_queue_depth", "Queued tasks, by priority", ["priority"], registry=r
        )
        self.running = Gauge("octaskly_tasks_running", "Runs in progress on workers", registry=r)
        self.workers = Gauge(
            "octaskly_workers", "Connected workers, by state", ["state"], registry=r
        )
        self.role = Gauge(
            "octaskly_ha_role", "1 for this dispatcher's role (primary or standby)", ["role"],
            registry=r,
        )  # fmt: skip
        self.term = Gauge(
            "octaskly_ha_term", "The leadership term this dispatcher knows", registry=r
        )
        self.lag_seconds = Gauge(
            "octaskly_replication_lag_seconds",
            "Age of the oldest transaction the standby has not acknowledged (or applied)",
            registry=r,
        )
        self.lag_records = Gauge(
            "octaskly_replication_lag_transactions",
            "Transactions the standby has not acknowledged (or applied)",
            registry=r,
        )
        self.degraded = Gauge(
            "octaskly_replication_degraded",
            "1 while replication is impaired (no standby in sync, or the primary unreachable)",
            registry=r,
        )
        self.fenced = Gauge(
            "octaskly_ha_fenced",
            "1 while this primary acknowledges no writes: it sees neither its standby nor a "
            "majority of its witnesses",
            registry=r,
        )

    async def refresh(self, d: Dispatcher) -> None:
        """Bring the state gauges up to date (each scrape)."""
        ha = d.ha
        self.role.labels("primary").set(1 if ha.role == "primary" else 0)
        self.role.labels("standby").set(1 if ha.role != "primary" else 0)
        self.term.set(ha.term)
        summary = d.ha_summary()
        self.lag_seconds.set(float(summary.get("lag_seconds") or 0))
        self.lag_records.set(float(summary.get("lag_records") or 0))
        self.degraded.set(1 if summary.get("degraded") else 0)
        self.fenced.set(1 if ha.role == "primary" and ha.fencer.check() is not None else 0)
        if ha.role != "primary":
            return  # a standby's database is the primary's; its queue is not served here
        counts = await d.store.count_by_status()
        for status in models.TaskStatus:
            self.tasks.labels(status.value).set(counts.get(status, 0))
        depth = await d.store.queued_by_priority()
        for priority in models.Priority:
            self.queue.labels(priority.name.lower()).set(depth.get(priority, 0))
        self.running.set(len(d.runs))
        states = {state.value: 0 for state in models.WorkerState if state.value != "offline"}
        for view in d.peers.views():
            states[view["state"]] = states.get(view["state"], 0) + 1
        for state, count in states.items():
            self.workers.labels(state).set(count)

    def finished_total(self) -> int:
        """Task runs ended since this process started, whatever their outcome."""
        return int(
            sum(
                sample.value
                for metric in self.finished.collect()
                for sample in metric.samples
                if sample.name.endswith("_total")
            )
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
