"""The limit: how fast asyncio alone spawns and reaps `/bin/sh -c true` here.

Each child watcher is measured in a fresh interpreter (`python -m bench.limit --watcher
...` prints one JSON line), so one watcher's threads or handlers cannot slow another.
`xargs -P` is the non-Python reference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import time
import warnings
from typing import Any

from bench import procs

SHELL = "/bin/sh"
WARMUP = 50
# (name, watcher, pipes): "pipes" also captures stdout/stderr in a new session, as a
# worker does; it is information, not the limit.
VARIANTS = (
    ("default", "default", False),
    ("pidfd", "pidfd", False),
    ("pidfd_pipes", "pidfd", True),
)


def _install(watcher: str) -> str:
    """Install the requested child watcher on the running loop; return its class name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # child watchers, 3.12+
        policy = asyncio.get_event_loop_policy()
        if watcher == "pidfd":
            chosen = asyncio.PidfdChildWatcher()
            chosen.attach_loop(asyncio.get_running_loop())
            policy.set_child_watcher(chosen)
        return type(policy.get_child_watcher()).__name__


async def _spawn(count: int, concurrency: int, pipes: bool) -> None:
    numbers = iter(range(count))
    out = subprocess.PIPE if pipes else subprocess.DEVNULL

    async def slot() -> None:
        for _ in numbers:  # one iterator shared by all slots
            proc = await asyncio.create_subprocess_exec(
                SHELL,
                "-c",
                "true",
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=pipes,
            )
            await (proc.communicate() if pipes else proc.wait())
            if proc.returncode != 0:
                raise RuntimeError(f"{SHELL} -c true exited {proc.returncode}")

    await asyncio.gather(*(slot() for _ in range(concurrency)))


def _cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has reaped (the shells)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


async def _measure(watcher: str, count: int, concurrency: int, pipes: bool) -> dict[str, Any]:
    name = _install(watcher)
    await _spawn(WARMUP, concurrency, pipes)
    started, cpu = time.perf_counter(), _cpu_seconds()
    await _spawn(count, concurrency, pipes)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    return {
        "watcher": name,
        "pipes": pipes,
        "spawns": count,
        "seconds": seconds,
        "per_second": count / seconds,
        "cpu_ms_per_spawn": 1000 * cpu / count,
    }


def _run_child(watcher: str, count: int, concurrency: int, pipes: bool) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "bench.limit",
        "--watcher",
        watcher,
        "--count",
        str(count),
        "--concurrency",
        str(concurrency),
    ] + (["--pipes"] if pipes else [])
    timeout = 60 + count / 100
    try:
        done = subprocess.run(
            argv, cwd=procs.REPO, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise procs.HarnessError(f"spawn benchmark ({watcher}) took over {timeout:.0f} s") from None
    if done.returncode != 0:
        raise procs.HarnessError(f"spawn benchmark ({watcher}) failed: {done.stderr[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _children_cpu() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def _xargs(count: int, concurrency: int) -> dict[str, Any] | None:
    xargs = shutil.which("xargs")
    if xargs is None:
        return None
    lines = "".join(f"{i}\n" for i in range(count)).encode()
    argv = [xargs, f"-P{concurrency}", "-n1", "sh", "-c", "true"]
    started, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(
        argv, input=lines, check=True, timeout=60 + count / 100, stdout=subprocess.DEVNULL
    )
    seconds, cpu = time.perf_counter() - started, _children_cpu() - cpu
    return {
        "cpu_ms_per_spawn": 1000 * cpu / count,
        "command": " ".join(argv[1:]),
        "spawns": count,
        "seconds": seconds,
        "per_second": count / seconds,
    }


def measure(count: int, concurrency: int) -> dict[str, Any]:
    """Spawn rates of each variant and xargs; `per_second` is the best plain watcher."""
    variants = {
        key: _run_child(watcher, count, concurrency, pipes) for key, watcher, pipes in VARIANTS
    }
    best = max(variants["default"]["per_second"], variants["pidfd"]["per_second"])
    return {
        "concurrency": concurrency,
        "spawns": count,
        "variants": variants,
        "xargs": _xargs(count, concurrency),
        "per_second": best,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="asyncio spawn+reap rate of /bin/sh -c true")
    parser.add_argument("--watcher", choices=["default", "pidfd"], required=True)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pipes", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(_measure(args.watcher, args.count, args.concurrency, args.pipes))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
