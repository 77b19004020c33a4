"""Startup costs: the dispatcher's idle memory, and `octaskly.pyz --version` after the
zipapp was extracted once (each run a new process, as a user's shell starts it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import cluster, procs, stats

IDLE_SECONDS = 1.0
RUNS = 5


def idle_rss(processes: procs.Processes, root: Path, secret: str) -> dict[str, Any]:
    """RSS of a fresh dispatcher (no workers, no tasks) 1 s after /health answered."""
    workdir = root / "idle"
    workdir.mkdir()
    c = cluster.Cluster(processes, workdir, secret=secret)
    try:
        seconds = c.start_dispatcher()
        time.sleep(IDLE_SECONDS)
        c.check_alive()
        assert c.dispatcher is not None
        with procs.RssSampler({"dispatcher": c.dispatcher.pid}) as rss:
            idle = rss.current("dispatcher")
        return {"rss_bytes": idle, "start_to_health_seconds": seconds}
    finally:
        c.stop()


def _timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or "octaskly" not in done.stdout:
        raise procs.HarnessError(f"{' '.join(argv)} failed: {done.stdout}{done.stderr}")
    return seconds


def _build(processes: procs.Processes, pyz: Path, log: Path) -> float:
    """`make pyz PYZ=...`; a hung build is killed with everything it started."""
    started = time.perf_counter()
    make = processes.start(
        ["make", "pyz", f"PYZ={pyz}"], log=log, env=dict(os.environ), cwd=procs.REPO
    )
    try:
        code = make.wait(600)
    except subprocess.TimeoutExpired:
        raise procs.HarnessError("make pyz took over 600 s") from None
    finally:
        processes.stop(make)
    if code != 0 or not pyz.exists():
        raise procs.HarnessError(f"make pyz failed; its output ends:\n{procs.tail(log)}")
    return time.perf_counter() - started


def pyz_startup(processes: procs.Processes, root: Path) -> dict[str, Any]:
    """Build the pyz, run `--version` once (extraction), then time RUNS more runs of it
    directly (shebang `/usr/bin/env python3`) and through this interpreter."""
    workdir = root / "pyz"
    workdir.mkdir()
    pyz = workdir / "octaskly.pyz"
    build = _build(processes, pyz, workdir / "make-pyz.log")
    env = procs.clean_env(SHIV_ROOT=str(workdir / "shiv"))
    first = _timed([str(pyz), "--version"], env, workdir)
    direct = [_timed([str(pyz), "--version"], env, workdir) for _ in range(RUNS)]
    via_python = [
        _timed([sys.executable, str(pyz), "--version"], env, workdir) for _ in range(RUNS)
    ]
    return {
        "build_seconds": build,
        "size_bytes": pyz.stat().st_size,
        "first_run_seconds": first,
        "direct_seconds": direct,
        "direct_median_seconds": stats.median(direct),
        "via_python_seconds": via_python,
        "via_python_median_seconds": stats.median(via_python),
        "python3_on_path": _python3(),
    }


def _python3() -> str:
    """Which `python3` the pyz's shebang finds (a pyenv shim adds its own start cost)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / "python3"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return "(none)"


def run(processes: procs.Processes, root: Path, secret: str) -> dict[str, Any]:
    return {"idle": idle_rss(processes, root, secret), "pyz": pyz_startup(processes, root)}
