"""What the isolation of issue 18 costs per task: `true` through octaskly.executing.

No dispatcher, no protocol: each variant runs N `true` tasks the way a worker does
(`executing.ExecRequest` with `worker.rlimits`, a `Workdirs` pool, a small task env,
concurrency 8, the pidfd child watcher) in a fresh interpreter that prints one JSON line.
"before" is the tree at BASE (a temporary `git worktree`, removed afterwards), "after"
this one; both run in the same bench run, alternating, so the machine's load hits both.
The measuring script (MEASURE) is passed with `-c` and uses only what both trees have.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import procs

#: The commit before issue 18's isolation (a51f5d2, e593bd5).
BASE = "b045d78"
NOBODY = (65534, 65534)
WARMUP = 50
STRICT_SHARE = 4  # a bwrap run costs several times a shell: strict variants run tasks / 4

# (key, tree, level, containment, task_user): containment None passes none (the base has
# no such parameter); "auto" is what a worker uses by default.
VARIANTS: tuple[tuple[str, str, str, str | None, tuple[int, int] | None], ...] = (
    ("before-basic", "before", "basic", None, None),
    ("before-strict", "before", "strict", None, None),
    ("basic-process-group", "after", "basic", "process-group", None),
    ("basic-auto", "after", "basic", "auto", None),
    ("basic-pid-namespace", "after", "basic", "pid-namespace", None),
    ("basic-auto-nobody", "after", "basic", "auto", NOBODY),
    ("strict", "after", "strict", "auto", None),
)

MEASURE = r"""
import asyncio
import dataclasses
import inspect
import json
import os
import resource
import sys
import time
from pathlib import Path

import octaskly
from octaskly import executing
from octaskly.domain import models
from octaskly.protocol import messages
from octaskly.services import worker

cfg = json.loads(sys.argv[1])
level = models.SandboxLevel(cfg["level"])
task_user = tuple(cfg["task_user"]) if cfg["task_user"] else None
root = Path(cfg["workdir_root"])
out = {"octaskly": os.path.dirname(octaskly.__file__)}


def done(**fields):
    print(json.dumps({**out, **fields}))
    sys.exit(0)


problem = executing.unavailable(level, root)
if problem:
    done(unavailable=f"{level.value}: {problem}")
env = {"JOB": "42", "INPUT": "/data/in.csv", "MODE": "fast", "RETRIES": "3", "LABEL": "bench"}
assignment = messages.TaskAssignment(
    task_id="t", attempt=1, command="true", env=env, timeout=60, sandbox_level=level
)
fields = {f.name for f in dataclasses.fields(executing.ExecRequest)}
request = {
    "attempt": 1, "command": "true", "env": env, "timeout": 60.0, "workdir_root": root,
    "rlimits": worker.rlimits(assignment, level), "sandbox_level": level,
}
if task_user is not None:
    if "task_user" not in fields:
        done(unavailable="this tree has no task_user")
    request["task_user"] = task_user
kwargs = {}
if cfg["containment"] is not None:
    if "contain" not in inspect.signature(executing.Execution).parameters:
        done(unavailable="this tree has no containment")
    try:
        contain = executing.detect_containment(cfg["containment"], task_user=task_user)
    except executing.ContainmentUnavailable as exc:
        done(unavailable=f"{cfg['containment']}: {exc}")
    kwargs["contain"] = contain
    out["containment"] = contain.kind.value
    out["containment_description"] = contain.describe()
pool = {"keep": cfg["concurrency"]}
if task_user is not None and "owners" in inspect.signature(executing.Workdirs).parameters:
    pool["owners"] = (task_user[0],)
workdirs = executing.Workdirs(root, **pool)
base_env = {
    k: v for k, v in os.environ.items() if not k.upper().startswith(executing.PRIVATE_ENV_PREFIX)
}


async def run(count, first):
    numbers = iter(range(first, first + count))

    async def slot():
        for i in numbers:  # one iterator shared by all slots
            req = executing.ExecRequest(task_id=f"t{i}", **request)
            execution = executing.Execution(
                req, base_env=base_env, workdirs=workdirs, **kwargs
            )
            result = await execution.run()
            if result.status != "completed":
                raise RuntimeError(f"task {i}: {result.status}: {result.error}: {result.stderr}")

    await asyncio.gather(*(slot() for _ in range(cfg["concurrency"])))


def cpu():
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


async def main():
    await run(cfg["warmup"], 0)
    (own0, kids0), started = cpu(), time.perf_counter()
    await run(cfg["tasks"], cfg["warmup"])
    seconds, (own1, kids1) = time.perf_counter() - started, cpu()
    n = cfg["tasks"]
    return {
        "tasks": n, "seconds": seconds, "per_second": n / seconds,
        "parent_cpu_ms_per_task": 1000 * (own1 - own0) / n,
        "children_cpu_ms_per_task": 1000 * (kids1 - kids0) / n,
    }


executing.install_fast_child_watcher()
try:
    measured = asyncio.run(main())
finally:
    workdirs.close()
    if "contain" in kwargs:
        kwargs["contain"].close()
done(**measured)
"""


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=procs.REPO, capture_output=True, text=True, timeout=120, check=False
    )


@contextlib.contextmanager
def _base_tree(root: Path) -> Iterator[tuple[Path | None, str | None]]:
    """Yield (a worktree of BASE, None) or (None, why there is none); always removed."""
    if shutil.which("git") is None:
        yield None, "not available (no git)"
        return
    if _git("rev-parse", "--verify", "--quiet", f"{BASE}^{{commit}}").returncode != 0:
        yield None, "not available (no git history)"
        return
    tree = root / "before"
    added = _git("worktree", "add", "--detach", str(tree), BASE)
    if added.returncode != 0:
        yield None, f"not available (git worktree add failed: {added.stderr.strip()[-300:]})"
        return
    try:
        yield tree, None
    finally:
        if _git("worktree", "remove", "--force", str(tree)).returncode != 0:
            shutil.rmtree(tree, ignore_errors=True)
            _git("worktree", "prune")


def _measure_one(
    tree: Path, workdir_root: Path, level: str, contain: str | None,
    task_user: tuple[int, int] | None, tasks: int, concurrency: int,
) -> dict[str, Any]:  # fmt: skip
    config = {
        "level": level,
        "containment": contain,
        "task_user": task_user,
        "tasks": tasks,
        "warmup": min(WARMUP, tasks),
        "concurrency": concurrency,
        "workdir_root": str(workdir_root),
    }
    # cwd and PYTHONPATH: the tree's octaskly comes first (before the venv's editable one)
    env = procs.clean_env(PYTHONPATH=str(tree))
    argv = [sys.executable, "-c", MEASURE, json.dumps(config)]
    timeout = 120 + tasks / 20
    what = f"isolation benchmark ({tree}: {level}, containment {contain}, task_user {task_user})"
    try:
        done = subprocess.run(
            argv, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise procs.HarnessError(f"{what} took over {timeout:.0f} s") from None
    if done.returncode != 0:
        raise procs.HarnessError(f"{what} failed: {done.stderr[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["octaskly"]).resolve() != (tree / "octaskly").resolve():
        raise procs.HarnessError(f"measured {result['octaskly']}, not the tree at {tree}")
    return result


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    if "unavailable" in runs[0]:
        return {"unavailable": runs[0]["unavailable"]}
    summary: dict[str, Any] = {k: v for k, v in runs[0].items() if isinstance(v, str)}
    for r in runs:
        r["cpu_ms_per_task"] = r["parent_cpu_ms_per_task"] + r["children_cpu_ms_per_task"]
    for key in ("per_second", "parent_cpu_ms_per_task", "children_cpu_ms_per_task"):
        values = [r[key] for r in runs]
        summary[key] = statistics.median(values)
        summary[f"{key}_all"] = values
    summary["cpu_ms_per_task"] = statistics.median(r["cpu_ms_per_task"] for r in runs)
    summary["tasks"] = runs[0]["tasks"]
    return summary


def _ratios(variants: dict[str, dict[str, Any]]) -> None:
    """Add, to each "after" variant, its rate and CPU as multiples of "before" at its level."""
    for v in variants.values():
        before = variants.get(f"before-{v['level']}") or {}
        if v["tree"] == "after" and "per_second" in v and "per_second" in before:
            v["rate_vs_before"] = v["per_second"] / before["per_second"]
            v["cpu_vs_before"] = v["cpu_ms_per_task"] / before["cpu_ms_per_task"]
            v["cpu_ms_more_than_before"] = v["cpu_ms_per_task"] - before["cpu_ms_per_task"]


def _skipped(base: Path | None, why: str | None) -> dict[str, str]:
    """The variants that cannot run here, and why."""
    skipped: dict[str, str] = {}
    for key, tree, _, _, user in VARIANTS:
        if tree == "before" and base is None:
            skipped[key] = why or "not available"
        elif user is not None and os.geteuid() != 0:
            skipped[key] = "task_user applies to a root worker; this is not root"
    return skipped


def measure(tasks: int, concurrency: int, repeats: int) -> dict[str, Any]:
    """`tasks` per variant (strict: a quarter) in `repeats` alternating runs; medians."""
    per_run = max(1, tasks // repeats)
    work = Path(tempfile.mkdtemp(prefix="octaskly-bench-isolation-"))
    os.chmod(work, 0o711)  # (a sandbox user or task_user must reach its workdir)
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key, *_ in VARIANTS}
    try:
        with _base_tree(work) as (base, why):
            skipped = _skipped(base, why)
            for _ in range(repeats):
                for key, tree, level, contain, user in VARIANTS:
                    if key in skipped or (runs[key] and "unavailable" in runs[key][0]):
                        continue
                    count = per_run if level == "basic" else max(1, per_run // STRICT_SHARE)
                    where = procs.REPO if tree == "after" else base
                    assert where is not None
                    runs[key].append(
                        _measure_one(where, work / key, level, contain, user, count, concurrency)
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    variants: dict[str, dict[str, Any]] = {
        key: {"unavailable": skipped[key]} if key in skipped else _median_of(runs[key])
        for key in runs
    }
    for key, tree, level, contain, user in VARIANTS:
        variants[key].update(tree=tree, level=level, containment_asked=contain, task_user=user)
    _ratios(variants)
    return {
        "base_commit": BASE,
        "base": why or "measured",
        "tasks_per_run": per_run,
        "strict_tasks_per_run": max(1, per_run // STRICT_SHARE),
        "concurrency": concurrency,
        "repeats": repeats,
        "variants": variants,
    }
