"""Progress for the client commands: a rich progress bar or live view on a terminal,
plain lines otherwise (logs, pipes, CI) — and `octaskly top`."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

TERMINAL_STATES = {"completed", "failed", "timed_out", "cancelled"}


def is_terminal(stream: TextIO = sys.stderr) -> bool:
    return stream.isatty()


def wait_all(
    fetch: Callable[[str], dict[str, Any]],
    ids: list[str],
    *,
    interval: float = 0.5,
    stream: TextIO = sys.stderr,
) -> dict[str, str]:
    """Poll the tasks until all have ended; show progress; return id -> final status."""
    done: dict[str, str] = {}
    pending = list(ids)
    if is_terminal(stream):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        console = Console(file=stream)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as bar:
            job = bar.add_task("tasks", total=len(ids))
            while pending:
                pending = _poll(fetch, pending, done)
                failed = sum(1 for s in done.values() if s != "completed")
                bar.update(
                    job,
                    completed=len(done),
                    description=f"tasks ({failed} not completed)" if failed else "tasks",
                )
                if pending:
                    time.sleep(interval)
        return done
    last = -1.0
    while pending:
        pending = _poll(fetch, pending, done)
        now = time.monotonic()
        if not pending or now - last >= 5:
            failed = sum(1 for s in done.values() if s != "completed")
            print(f"{len(done)}/{len(ids)} finished ({failed} not completed)", file=stream)
            last = now
        if pending:
            time.sleep(interval)
    return done


def _poll(
    fetch: Callable[[str], dict[str, Any]], pending: list[str], done: dict[str, str]
) -> list[str]:
    still = []
    for task_id in pending[:200]:  # bounded per round: progress stays live on big batches
        status = fetch(task_id)["status"]
        if status in TERMINAL_STATES:
            done[task_id] = status
        else:
            still.append(task_id)
    return still + pending[200:]


# -- top ---------------------------------------------------------------------------------
def frame(stats: dict[str, Any], workers: list[dict[str, Any]]) -> Any:
    """One view of the cluster: tasks by status and every worker with a load bar."""
    from rich.console import Group
    from rich.table import Table

    tasks = stats["tasks"]
    queue = Table(title="tasks", show_edge=False)
    for name in ("queued", "running", "completed", "failed", "timed_out", "cancelled"):
        queue.add_column(name, justify="right")
    queue.add_row(*(str(tasks.get(n, 0)) for n in ("queued", "running", "completed", "failed",
                                                    "timed_out", "cancelled")))  # fmt: skip
    table = Table(title=f"workers ({len(workers)})", show_edge=False)
    for name in ("name", "state", "jobs", "load", "cpus", "memory MB", "address"):
        table.add_column(name)
    for w in workers:
        jobs, cap = int(w["current_jobs"]), max(1, int(w["max_jobs"]))
        filled = round(10 * jobs / cap)
        table.add_row(
            str(w["id"]),
            str(w["state"]),
            f"{jobs}/{cap}",
            "█" * filled + "·" * (10 - filled),
            f"{w['resources']['cpu_cores']:g}",
            str(w["resources"]["memory_mb"]),
            str(w["address"]),
        )
    system = stats.get("system", {})
    ha = stats.get("ha") or {}
    header = (
        f"octaskly top — uptime {system.get('uptime_seconds', 0)} s, "
        f"dispatcher RSS {system.get('memory_usage_mb', 0)} MB, role {ha.get('role', '?')} "
        f"(term {ha.get('term', '?')})"
    )
    return Group(header, queue, table)


def top(
    fetch: Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]],
    *,
    interval: float,
    iterations: int | None,
    stream: TextIO = sys.stdout,
) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console(file=stream)
    if not stream.isatty():  # a pipe: print frames one after the other
        count = 0
        while iterations is None or count < iterations:
            console.print(frame(*fetch()))
            count += 1
            if iterations is None or count < iterations:
                time.sleep(interval)
        return
    with Live(frame(*fetch()), console=console, refresh_per_second=4, screen=False) as live:
        count = 1
        while iterations is None or count < iterations:
            time.sleep(interval)
            live.update(frame(*fetch()))
            count += 1
