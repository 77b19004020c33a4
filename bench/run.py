"""`make bench` / `python -m bench.run`: measure octaskly against issue 3's targets.

Scenarios (in this order): `limit` (asyncio spawn rate, no octaskly), `isolation` (what
issue 18's isolation costs per task: `true` through octaskly.executing, no dispatcher,
before (commit b045d78, a temporary git worktree) and after in the same run), `batch` and
`single` (a real dispatcher + 2 workers on TLS over TCP, N `true` tasks through the REST
API), `quic` (batch again with the workers on QUIC), `ha` (batch again on a primary
replicating to a standby, async then sync, sampling the replication lag), `federation`
(batch again on one dispatcher on SQLite, then on 1, 2 and 3 dispatchers sharing one
throwaway PostgreSQL; --federation-tasks each, default --tasks), `startup`
(idle RSS, pyz cold start), `scale` (200 simulated workers, 1k..1M queued tasks).
Exit status: 0 when every selected scenario ran (missed targets included), 1 when the
harness or the cluster broke (a crash, lost tasks), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from bench import (
    cluster,
    federation,
    ha,
    isolation,
    limit,
    procs,
    report,
    scale,
    startup,
    targets,
    throughput,
)

SCENARIOS = (
    "limit",
    "isolation",
    "batch",
    "quic",
    "single",
    "ha",
    "federation",
    "startup",
    "scale",
)
DEPTHS = "1000,10000,100000,1000000"
QUICK_DEPTHS = "1000,10000,100000"
SIM_WORKERS = 200


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers")
    return values


def _scenarios(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}")
    return [s for s in SCENARIOS if s in chosen]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=10_000, help="tasks per cluster scenario")
    p.add_argument(
        "--scenarios",
        type=_scenarios,
        default=list(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--scale-depths",
        type=_ints,
        default=None,
        help=f"queued tasks per scale run (default {DEPTHS}; --quick: {QUICK_DEPTHS})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="skip the 1M depth, 2,000 spawns for the limit, 10,000-task scale windows, "
        "1,000 isolation tasks in one run",
    )
    p.add_argument("--spawns", type=int, default=None, help="spawns per limit run (default 5000)")
    p.add_argument(
        "--scale-window",
        type=int,
        default=None,
        help="assignments measured per depth (default 20000)",
    )
    p.add_argument(
        "--sim-procs",
        type=int,
        default=1,
        help="processes the 200 simulated workers are split over (default 1)",
    )
    p.add_argument(
        "--federation-tasks",
        type=int,
        default=None,
        help="tasks per federation configuration (default --tasks; --quick: a quarter of it)",
    )
    p.add_argument(
        "--isolation-tasks",
        type=int,
        default=None,
        help="`true` tasks per isolation variant, over its repetitions (default 3000; "
        "--quick: 1000; strict variants a quarter)",
    )
    p.add_argument(
        "--isolation-repeats",
        type=int,
        default=None,
        help="alternating runs of every isolation variant, medians reported (default 3; "
        "--quick: 1)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, databases)")
    args = p.parse_args(argv)
    given = {
        "--tasks": args.tasks,
        "--federation-tasks": args.federation_tasks,
        "--sim-procs": args.sim_procs,
        "--isolation-tasks": args.isolation_tasks,
        "--isolation-repeats": args.isolation_repeats,
    }
    bad = [name for name, value in given.items() if value is not None and value < 1]
    if bad:
        p.error(f"{', '.join(bad)} must be positive")
    args.scale_depths = args.scale_depths or _ints(QUICK_DEPTHS if args.quick else DEPTHS)
    args.spawns = args.spawns or (2000 if args.quick else 5000)
    args.scale_window = args.scale_window or (10_000 if args.quick else 20_000)
    args.federation_tasks = args.federation_tasks or (
        max(1, args.tasks // 4) if args.quick else args.tasks
    )
    args.isolation_repeats = args.isolation_repeats or (1 if args.quick else 3)
    args.isolation_tasks = args.isolation_tasks or (1000 if args.quick else 3000)
    return args


def _runners(
    args: argparse.Namespace, processes: procs.Processes, root: Path, secret: str
) -> dict[str, Callable[[], Any]]:
    concurrency = throughput.WORKERS * throughput.MAX_JOBS
    return {
        "limit": lambda: limit.measure(args.spawns, concurrency),
        "isolation": lambda: isolation.measure(
            args.isolation_tasks, concurrency, args.isolation_repeats
        ),
        "batch": lambda: throughput.run("batch", args.tasks, processes, root, secret),
        "quic": lambda: throughput.run(
            "batch", args.tasks, processes, root, secret, transport="quic"
        ),
        "single": lambda: throughput.run("single", args.tasks, processes, root, secret),
        "ha": lambda: ha.run(args.tasks, processes, root, secret),
        "federation": lambda: federation.run(args.federation_tasks, processes, root, secret),
        "startup": lambda: startup.run(processes, root, secret),
        "scale": lambda: scale.run(
            args.scale_depths,
            processes,
            root,
            secret,
            workers=SIM_WORKERS,
            max_jobs=throughput.MAX_JOBS,
            window=args.scale_window,
            sim_procs=args.sim_procs,
        ),
    }


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _run_all(args: argparse.Namespace, results: dict[str, Any], root: Path) -> int:
    """Run the selected scenarios; every process started is gone when this returns."""
    processes = procs.Processes()
    runners = _runners(args, processes, root, cluster.secret_key())
    status = 0
    try:
        for name in args.scenarios:
            _log(f"{name} ...")
            started = time.monotonic()
            try:
                results[name] = runners[name]()
            except procs.HarnessError as exc:
                results["errors"][name], status = str(exc), 1
            except Exception:
                results["errors"][name], status = traceback.format_exc(), 1
            finally:
                processes.kill_all()
            results["durations"][name] = time.monotonic() - started
            outcome = "FAILED" if name in results["errors"] else "done"
            _log(f"{name} {outcome} after {results['durations'][name]:.0f} s")
    except (KeyboardInterrupt, SystemExit):
        results["errors"]["interrupted"], status = "the run was interrupted", 1
    finally:
        processes.kill_all()
    return status


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # so every `finally` runs and the processes end


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    now = datetime.datetime.now(datetime.UTC)
    results: dict[str, Any] = {
        "stamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": report.machine(),
        "config": {k: v for k, v in vars(args).items() if k != "keep"},
        "errors": {},
        "durations": {},
    }
    root = Path(tempfile.mkdtemp(prefix="octaskly-bench-"))
    try:
        status = _run_all(args, results, root)
    finally:
        if args.keep:
            _log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    results["targets"] = [
        {**dataclasses.asdict(t), "verdict": t.verdict} for t in targets.evaluate(results)
    ]
    path = report.write_json(results, now.strftime("%Y%m%dT%H%M%SZ"))
    print(report.render(results))
    shown = path.relative_to(procs.REPO) if path.is_relative_to(procs.REPO) else path
    print(f"\nresults written to {shown}; exit status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
