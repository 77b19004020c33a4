"""The printed report and the JSON record of a run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from bench import api, procs, targets
from octaskly import __version__

MIB = targets.MIB
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR") or procs.REPO / "bench" / "results")


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=procs.REPO, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "octaskly")),
        "octaskly_version": __version__,
        "load_average_at_start": os.getloadavg(),
    }


def write_json(results: dict[str, Any], stamp: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


# -- formatting -------------------------------------------------------------------------------
def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pair(summary: dict[str, Any] | None) -> str:
    """'p50 / p99' in ms."""
    if not summary or summary.get("p50_ms") is None:
        return "-"
    return f"{summary['p50_ms']:,.1f} / {summary['p99_ms']:,.1f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"


def header(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    dirty = " (octaskly/ has uncommitted changes)" if m["git_dirty"] else ""
    load = ", ".join(f"{x:.2f}" for x in m["load_average_at_start"])
    return [
        f"octaskly bench {results['stamp']}  octaskly {m['octaskly_version']}  "
        f"commit {m['git_commit'][:12]}{dirty}",
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_bytes'] / 2**30:.1f} GiB, "
        f"Python {m['python']}, load average at start {load}",
        api.auth_note(),
        "All processes (cluster, load generator, simulators) share this machine. MiB = 2^20 B.",
    ]


def _row(label: str, value: str, note: str = "", width: int = 50) -> str:
    return f"  {label:<{width}} {value}{'   ' + note if note else ''}"


def limit_section(r: dict[str, Any]) -> list[str]:
    v = r["variants"]

    def rate(x: dict[str, Any]) -> str:
        cpu = x.get("cpu_ms_per_spawn")
        return f"{_n(x['per_second']):>7} /s" + (f"   {cpu:.2f} ms CPU/spawn" if cpu else "")

    lines = [
        "",
        f"== 1. Limit: asyncio spawn+reap of `/bin/sh -c true`, concurrency {r['concurrency']}, "
        f"{r['spawns']:,} spawns (a fresh interpreter per watcher)",
        _row(f"3.11 default watcher ({v['default']['watcher']})", rate(v["default"])),
        _row("asyncio.PidfdChildWatcher", rate(v["pidfd"])),
        _row(
            "pidfd + stdout/stderr pipes + new session",
            rate(v["pidfd_pipes"]),
            "(info: what a worker's spawn also does)",
        ),
    ]
    if r["xargs"]:
        lines.append(_row(f"xargs {r['xargs']['command']}", rate(r["xargs"]), "(reference)"))
    lines.append(_row("limit = the better asyncio watcher", rate({"per_second": r["per_second"]})))
    lines.append(
        "  (CPU/spawn: the spawning process, the shells and the kernel for them, together)"
    )
    return lines


_ISOLATION_LABELS = {
    "before-basic": "basic (process group only)",
    "before-strict": "strict (bwrap --ro-bind / /)",
    "basic-process-group": "basic, containment process-group",
    "basic-auto": "basic, containment auto",
    "basic-pid-namespace": "basic, containment pid-namespace",
    "basic-auto-nobody": "basic, containment auto, task_user nobody",
    "strict": "strict (bwrap allow-list)",
}


def _isolation_row(v: dict[str, Any]) -> str:
    if "unavailable" in v:
        why = v["unavailable"]
        return why if why.startswith("not available") else f"not available: {why}"
    rates = v["per_second_all"]
    spread = f"({_n(min(rates))}-{_n(max(rates))})" if len(rates) > 1 else ""
    cpu = (
        f"{v['parent_cpu_ms_per_task']:6.2f} {v['children_cpu_ms_per_task']:8.2f} "
        f"{v['cpu_ms_per_task']:6.2f}"
    )
    vs = ""
    if "rate_vs_before" in v:
        vs = (
            f"{v['rate_vs_before']:.2f}x / {v['cpu_vs_before']:.2f}x "
            f"({v['cpu_ms_more_than_before']:+.2f} ms)"
        )
    return f"{_n(v['per_second']):>7} {spread:<13} {cpu}   {vs}".rstrip()


def isolation_section(r: dict[str, Any]) -> list[str]:
    v = r["variants"]
    base = r["base_commit"]
    lines = [
        "",
        f"== 1b. Isolation (issue 18): tasks/s and CPU ms per task of `true` through "
        f"octaskly.executing as a worker runs it "
        f"(rlimits, workdir pool, 5 env variables, pidfd watcher), no dispatcher, concurrency "
        f"{r['concurrency']}; {r['tasks_per_run']:,} tasks per run (strict "
        f"{r['strict_tasks_per_run']:,}), a fresh interpreter per run, median of "
        f"{r['repeats']} alternating run(s)",
    ]
    labels = {}
    for key, label in _ISOLATION_LABELS.items():
        auto = v[key].get("containment_asked") == "auto" and v[key].get("level") == "basic"
        chosen = v[key].get("containment") if auto else None
        tree = f"before ({base})" if key.startswith("before-") else "after"
        labels[key] = f"{tree}: {label}" + (f" ({chosen})" if chosen else "")
    width = max(map(len, labels.values()))
    lines.append(
        f"  {'':<{width}} {'tasks/s':>7} {'(range)':<13} {'parent':>6} {'children':>8} "
        f"{'sum':>6}   vs before: rate / CPU"
    )
    lines += [f"  {labels[k]:<{width}} {_isolation_row(v[k])}" for k in labels]
    if r["base"] != "measured":
        lines.append(f"  before: {r['base']}")
    lines.append(
        "  (parent = the measuring process: asyncio, octaskly, cgroup writes; children = every "
        "process of the runs, reaped: shells, unshare, bwrap; vs before = this variant over "
        "before at the same level)"
    )
    return lines


def _cluster_rows(s: dict[str, Any], limit: float | None) -> dict[str, str]:
    db = s["db_bytes"]
    per10k = 10_000 / s["tasks"]
    cpu = s["cpu_seconds"]
    workers = sorted(k for k in s["peak_rss"] if k.startswith("worker"))
    return {
        "throughput, first submit → last completion": f"{_n(s['tasks_per_second'])} tasks/s",
        "ratio to the limit": "-" if not limit else f"{100 * s['tasks_per_second'] / limit:.0f} %",
        "wall time": f"{s['seconds']:.2f} s",
        "submit latency per HTTP request p50 / p99": f"{_pair(s['submit_request'])} ms",
        "queue→start (started_at - created_at) p50 / p99": f"{_pair(s['queue_to_start'])} ms",
        "submit→complete (completed_at - created_at) p50 / p99": (
            f"{_pair(s['submit_to_complete'])} ms"
        ),
        "peak RSS dispatcher": f"{_mib(s['peak_rss']['dispatcher'])} MiB",
        "peak RSS workers": " / ".join(_mib(s["peak_rss"][w]) for w in workers) + " MiB",
        "CPU ms/task: dispatcher / workers / bench / machine": (
            " / ".join(
                f"{1000 * cpu[k] / s['tasks']:.2f}"
                for k in ["dispatcher", *workers, "bench", "machine"]
            )
        ),
        "DB per 10k tasks: db+wal+shm (db alone)": (
            f"{_mib(sum(db.values()) * per10k)} ({_mib(db['db'] * per10k)}) MiB"
        ),
    }


def cluster_section(results: dict[str, Any], tasks: int) -> list[str]:
    scenarios = [k for k in ("batch", "quic", "single") if isinstance(results.get(k), dict)]
    if not scenarios:
        return []
    limit = (results.get("limit") or {}).get("per_second")
    rows = {k: _cluster_rows(results[k], limit) for k in scenarios}
    titles = {
        "batch": "batch, TLS/TCP (500/request)",
        "quic": "batch, QUIC (500/request)",
        "single": "single, TLS/TCP (64 clients)",
    }
    lines = [
        "",
        f"== 2. Local cluster: dispatcher + 2 workers (--max-jobs 4), {tasks:,} x `true` "
        "via the REST API, fresh cluster and database per scenario; batch requests 4 in "
        "flight",
        f"  {'':<56}" + "".join(f"{titles[k]:<36}" for k in scenarios).rstrip(),
    ]
    for label in rows[scenarios[0]]:
        values = "".join(f"{rows[k][label]:<36}" for k in scenarios)
        lines.append(f"  {label:<56}{values}".rstrip())
    lines.append(
        "  (API timestamps have 1 ms resolution. CPU ms/task = CPU seconds / all tasks, so the "
        "process columns add up; workers exclude their shells; machine = all busy CPU time)"
    )
    probe = (results.get("batch") or {}).get("probe")
    if probe:
        lines += [
            f"  latency probe, after the batch run on the same idle cluster: {probe['tasks']} "
            f"single submits at {probe['rate']:.0f}/s (free slots)",
            f"    submit p50/p99 {_pair(probe['submit_request'])} ms, queue→start "
            f"{_pair(probe['queue_to_start'])} ms, submit→complete "
            f"{_pair(probe['submit_to_complete'])} ms",
        ]
    return lines


def _ha_rows(s: dict[str, Any], batch: float | None) -> dict[str, str]:
    lag, pos, cpu, rss = s["lag"], s["positions"], s["cpu_seconds"], s["peak_rss"]
    sec, rec = lag["lag_seconds"], lag["lag_records"]

    def ms(value: float | None) -> str:
        return _n(None if value is None else 1000 * value, 0)

    waited = pos["seconds_to_equal"]
    equal = (
        f"NOT equal after {pos['wait_limit_seconds']:.0f} s"
        if waited is None
        else f"equal after {waited:.2f} s"
    )
    return {
        "throughput, first submit → last completion": f"{_n(s['tasks_per_second'])} tasks/s",
        "share of the plain batch throughput (same run)": (
            "-" if not batch else f"{100 * s['tasks_per_second'] / batch:.0f} %"
        ),
        "submit latency per HTTP request p50 / p99": f"{_pair(s['submit_request'])} ms",
        "submit→complete p50 / p99": f"{_pair(s['submit_to_complete'])} ms",
        "lag_seconds max / p99 / p50": (
            f"{ms(sec['max'])} / {ms(sec['p99'])} / {ms(sec['p50'])} ms"
        ),
        "lag_records max / p99 / p50": (f"{_n(rec['max'])} / {_n(rec['p99'])} / {_n(rec['p50'])}"),
        "samples: all (lagging / not synced / failed)": (
            f"{lag['samples']} ({lag['samples_lagging']} / {lag['samples_not_synced']} / "
            f"{lag['failed_samples']})"
        ),
        "lsn after the load: standby / primary": (
            f"{_n(pos['standby_lsn'])} / {_n(pos['primary_lsn'])}: {equal}"
        ),
        "CPU ms/task: primary / standby": " / ".join(
            f"{1000 * cpu[k] / s['tasks']:.2f}" for k in ("dispatcher", "standby")
        ),
        "peak RSS primary / standby": f"{_mib(rss['dispatcher'])} / {_mib(rss['standby'])} MiB",
        "standby start → connected and synced": f"{s['standby_start_to_synced_seconds']:.2f} s",
    }


def ha_section(results: dict[str, Any], tasks: int) -> list[str]:
    modes = [m for m in ("async", "sync") if isinstance(results["ha"].get(m), dict)]
    if not modes:
        return []
    batch = (results.get("batch") or {}).get("tasks_per_second")
    rows = {m: _ha_rows(results["ha"][m], batch) for m in modes}
    lag = results["ha"][modes[0]]["lag"]
    lines = [
        "",
        f"== 2b. Replication: the batch load ({tasks:,} x `true`) on a primary with a standby "
        "(own ports, data dir, SQLite file), a fresh pair per mode, --replication on both",
        f"  {'':<50}" + "".join(f"{'--replication ' + m:<36}" for m in modes).rstrip(),
    ]
    for label in rows[modes[0]]:
        values = "".join(f"{rows[m][label]:<36}" for m in modes)
        lines.append(f"  {label:<50}{values}".rstrip())
    lines.append(
        f"  (the primary's /api/v1/ha/status every {1000 * lag['interval_seconds']:.0f} ms "
        "during the load: lag_records = committed transactions the standby has not "
        "acknowledged, lag_seconds = age of the oldest of them, 1 ms resolution)"
    )
    return lines


def _per_member(s: dict[str, Any], value: Any) -> str:
    return " / ".join(str(value(v)) for v in s["per_dispatcher"].values())


def _federation_rows(s: dict[str, Any], sqlite: float | None) -> dict[str, str]:
    cpu, rss, n = s["cpu_seconds"], s["peak_rss"], s["tasks"]

    def per_task(key: str) -> str:
        return "-" if cpu.get(key) is None else f"{1000 * cpu[key] / n:.2f}"

    cluster = sum(cpu[k] or 0.0 for k in ("dispatchers", "workers", "postgres"))
    logs = sum(d["log_lines_during_load"] for d in s["per_dispatcher"].values())
    logs += sum(w["log_lines_during_load"] for w in s["workers"].values())
    return {
        "throughput, first submit → last completion": f"{_n(s['tasks_per_second'])} tasks/s",
        "share of SQLite, 1 dispatcher (same run)": (
            "-" if not sqlite else f"{100 * s['tasks_per_second'] / sqlite:.0f} %"
        ),
        "wall time": f"{s['seconds']:.2f} s",
        "submit latency per HTTP request p50 / p99": f"{_pair(s['submit_request'])} ms",
        "submit→complete p50 / p99": f"{_pair(s['submit_to_complete'])} ms",
        "CPU ms/task: dispatchers / workers / PostgreSQL": (
            f"{per_task('dispatchers')} / {per_task('workers')} / {per_task('postgres')}"
        ),
        "CPU ms/task: those together / machine": (
            f"{1000 * cluster / n:.2f} / {per_task('machine')}"
        ),
        "peak RSS: largest dispatcher / all dispatchers": (
            f"{_mib(rss['dispatcher_max'])} / {_mib(rss['dispatchers_sum'])} MiB"
        ),
        "peak RSS largest worker; PostgreSQL (sum of PSS)": (
            f"{_mib(rss['worker_max'])}; {_mib(rss['postgres_pss'])} MiB"
        ),
        "tasks acknowledged by d1 / d2 / d3": _per_member(s, lambda d: f"{d['acknowledged']:,}"),
        "workers connected to d1 / d2 / d3 (after)": _per_member(
            s, lambda d: len(d["workers_after"])
        ),
        "tasks run by the workers of d1 / d2 / d3": _per_member(
            s, lambda d: f"{d['ran_by_its_workers']:,}"
        ),
        "tasks run more than once; taken over": (
            f"{s['ran_more_than_once']}; "
            + _per_member(s, lambda d: "-" if d["taken_over"] is None else d["taken_over"])
        ),
        "log lines during the load: octaskly; PostgreSQL": (
            f"{logs}; {s['postgres_log_problems'] if s['backend'] == 'postgres' else '-'}"
        ),
        "database growth per 10k tasks (size after)": (
            f"{_mib((s['db_bytes'] - s['db_bytes_before']) * 10_000 / n)} "
            f"({_mib(s['db_bytes'])}) MiB"
        ),
    }


def federation_section(r: dict[str, Any]) -> list[str]:
    configs = r["configs"]
    if not configs:
        return []
    sqlite = (configs.get("sqlite-1") or {}).get("tasks_per_second")
    rows = {k: _federation_rows(v, sqlite) for k, v in configs.items()}
    titles = {
        k: (
            "SQLite, 1 dispatcher"
            if v["backend"] == "sqlite"
            else f"PostgreSQL, {v['dispatchers']} dispatcher{'s' * (v['dispatchers'] > 1)}"
        )
        for k, v in configs.items()
    }
    server = r.get("postgres") or {}
    settings = ", ".join(f"{k} {v}" for k, v in (server.get("settings") or {}).items())
    lines = [
        "",
        f"== 2c. Federation: the batch load ({r['tasks']:,} x `true`, 500/request, 4 in flight, "
        "2 workers x 4 jobs, TLS/TCP) on SQLite and on 1, 2, 3 active dispatchers sharing one "
        f"PostgreSQL {server.get('version', '?').split()[0]} database ({settings}); fresh "
        "processes and database each",
        f"  {'':<50}" + "".join(f"{titles[k]:<26}" for k in configs).rstrip(),
    ]
    first = next(iter(rows.values()))
    for name in first:
        values = "".join(f"{rows[k][name]:<26}" for k in configs)
        lines.append(f"  {name:<50}{values}".rstrip())
    lines += [
        "  (the client sends batch i to dispatcher i mod N; each worker is given every address "
        "and picks one by its name. Everything shares this machine's cores, PostgreSQL "
        "included: more dispatchers cannot add capacity here, so the 2- and 3-dispatcher "
        "columns show what coordinating through the database costs, not what spreading "
        "dispatchers over machines gains. Log lines: warnings or worse, during the load. "
        "Database: SQLite file + WAL + SHM; PostgreSQL pg_database_size, without its WAL)",
    ]
    return lines


def startup_section(r: dict[str, Any]) -> list[str]:
    idle, pyz = r["idle"], r["pyz"]
    runs = len(pyz["direct_seconds"])
    return [
        "",
        "== 3. Startup",
        _row("dispatcher idle RSS (1 s after /health, no tasks)", f"{_mib(idle['rss_bytes'])} MiB"),
        _row("dispatcher process start → /health answering",
             f"{idle['start_to_health_seconds']:.2f} s"),
        _row("make pyz (shiv)", f"{pyz['build_seconds']:.1f} s, {_mib(pyz['size_bytes'])} MiB"),
        _row("octaskly.pyz --version, first run (extraction)", f"{pyz['first_run_seconds']:.2f} s"),
        _row(f"./octaskly.pyz --version, median of {runs}", f"{pyz['direct_median_seconds']:.2f} s",
             f"(shebang /usr/bin/env python3 → {pyz['python3_on_path']})"),
        _row(f"{Path(sys.executable).name} octaskly.pyz --version, median of {runs}",
             f"{pyz['via_python_median_seconds']:.2f} s"),
    ]  # fmt: skip


def scale_section(r: dict[str, Any]) -> list[str]:
    o = r["options"]
    lines = [
        "",
        f"== 4. Scale: {o['workers']} simulated workers x max_jobs {o['max_jobs']} (real protocol, "
        f"real TCP, execute nothing) in {o['sim_procs']} process(es); window ≤ {o['window']:,}",
        "  depth = tasks queued in SQLite before the dispatcher starts; the window starts when "
        "every worker holds its first assigns",
        f"  {'depth':>9} {'prefill':>8} {'start':>6} {'window':>7} {'assign/s':>9} "
        f"{'CPU ms/assign':>13} {'disp CPU':>8} {'(loop)':>6} {'sim CPU':>7} {'RSS start':>9} "
        f"{'RSS peak':>8}",
    ]
    for row in r["depths"]:
        lines.append(
            f"  {row['depth']:>9,} {row['prefill_seconds']:>7.1f}s "
            f"{row['dispatcher_start_seconds']:>5.1f}s {row['assignments']:>7,} "
            f"{row['assignments_per_second']:>9,.0f} "
            f"{row['dispatcher_cpu_ms_per_assignment']:>13.3f} "
            f"{100 * row['dispatcher_cpu_utilisation']:>7.0f}% "
            f"{100 * row['dispatcher_main_thread_utilisation']:>5.0f}% "
            f"{100 * row['simulator_cpu_utilisation']:>6.0f}% "
            f"{_mib(row['dispatcher_rss_start']):>9} {_mib(row['dispatcher_rss_peak']):>8}"
        )
    lines += _scale_notes(r)
    return lines


def _scale_notes(r: dict[str, Any]) -> list[str]:
    rows = r["depths"]
    notes = []
    short = [row["depth"] for row in rows if row["assignments"] < 10 * row["held_before_window"]]
    if short:
        notes.append(
            f"  depth {', '.join(f'{d:,}' for d in short)}: short window; "
            f"{rows[0]['held_before_window']} of its tasks were assigned before the clock "
            "started, so its rate and cost per task look better than they are"
        )
    ratio, where = targets.flatness({"scale": r})
    if ratio is not None:
        notes.append(f"  CPU per assignment, {where}: {ratio:.2f}x")
    sim = max(row["simulator_cpu_utilisation"] for row in rows)
    loop = max(row["dispatcher_main_thread_utilisation"] for row in rows)
    notes.append(
        f"  disp CPU = all dispatcher threads (1.0 = one core); (loop) = its event-loop thread "
        f"alone, at most {100 * loop:.0f}%: "
        + (
            "the event loop is the bottleneck"
            if loop > 0.85
            else "not saturated; it waits the rest of the time"
        )
    )
    notes.append(
        f"  simulators used at most {100 * sim:.0f}% of a core, "
        f"{'a likely' if sim > 0.8 else 'not a'} bottleneck. RSS in MiB."
    )
    return notes


def targets_section(results: dict[str, Any]) -> list[str]:
    lines = ["", "== Targets (issue 3)"]
    for t in targets.evaluate(results):
        value = "not measured" if t.value is None else f"{t.value:,.2f} {t.unit}"
        wanted = (
            "(no target)"
            if t.limit is None
            else f"{'≥' if t.higher_is_better else '≤'} {t.limit:,g} {t.unit}"
        )
        lines.append(f"  {t.verdict:<4}  {t.name:<29} {wanted:<15} {value:>17}   [{t.where}]")
    return lines


def render(results: dict[str, Any]) -> str:
    lines = header(results)
    if isinstance(results.get("limit"), dict):
        lines += limit_section(results["limit"])
    if isinstance(results.get("isolation"), dict):
        lines += isolation_section(results["isolation"])
    lines += cluster_section(results, results["config"]["tasks"])
    if isinstance(results.get("ha"), dict):
        lines += ha_section(results, results["config"]["tasks"])
    if isinstance(results.get("federation"), dict):
        lines += federation_section(results["federation"])
    if isinstance(results.get("startup"), dict):
        lines += startup_section(results["startup"])
    if isinstance(results.get("scale"), dict) and results["scale"].get("depths"):
        lines += scale_section(results["scale"])
    lines += targets_section(results)
    for name, error in results.get("errors", {}).items():
        lines.append(f"  ERROR in {name}: {error}")
    return "\n".join(lines)
