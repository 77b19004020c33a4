"""The `federation` scenario: the batch load (N `true` tasks in batches of 500, 4 requests
in flight, 2 workers x 4 jobs on TLS/TCP) on four configurations in one run, each on fresh
processes and a fresh database:

- `sqlite-1`: one dispatcher on SQLite (synchronous=FULL), the reference;
- `pg-1`, `pg-2`, `pg-3`: one, two and three dispatchers, all active, sharing one database
  of a throwaway durable PostgreSQL (tests/pg.py: fsync on, synchronous_commit on).

Every worker is given every dispatcher's address (it picks one by its name: the names are
chosen so that worker 1 lands on d1 and worker 2 on d2, d3 gets none; where each one is
connected is read before and after the load and recorded); the client sends its batches
round-robin to the dispatchers' APIs. Measured: throughput, submit latency, CPU per task
of the dispatchers, the workers and the PostgreSQL server processes (the postmaster, its
live children, and the children it reaped during the load), peak RSS (PostgreSQL: the sum
of its processes' PSS, so shared buffers count once), how the work spread over the
dispatchers, and what the logs said.

All of it runs on the same machine (2 cores here), so more dispatchers cannot add
capacity: what the 2- and 3-dispatcher rows show is what coordinating through the
database costs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import re
import subprocess
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench import api, load, procs, stats, throughput
from tests import pg

CONFIGS: tuple[tuple[str, int], ...] = (
    ("sqlite", 1),
    ("postgres", 1),
    ("postgres", 2),
    ("postgres", 3),
)
DB_NAME = "octaskly.db"
PSS_INTERVAL = 0.25
LOG_LINES_KEPT = 5
PG_LOG_NOISE = re.compile(r"\b(ERROR|FATAL|PANIC|WARNING|deadlock|could not serialize)\b")


def label(backend: str, dispatchers: int) -> str:
    return f"{'sqlite' if backend == 'sqlite' else 'pg'}-{dispatchers}"


def worker_names(count: int, spread: int = 6) -> list[str]:
    """Names for `count` workers such that worker i starts at address i-1 of any list of
    up to `spread` dispatchers whose length divides `spread` (the worker picks
    crc32(name) % len(list)): 6 covers lists of 1, 2 and 3."""
    names = []
    for i in range(count):
        suffix = 0
        while zlib.crc32(f"bench-w{i + 1}-{suffix}".encode()) % spread != i % spread:
            suffix += 1
        names.append(f"bench-w{i + 1}-{suffix}")
    return names


class Member:
    """One dispatcher of the configuration: its name, ports, data dir and process."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.port = procs.free_port()
        self.api_port = procs.free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.log = workdir / "dispatcher.log"
        self.proc: subprocess.Popen[bytes] | None = None


class Federation:
    """`dispatchers` dispatchers on SQLite (one only) or on the PostgreSQL `db_url`, and
    workers given all their addresses. `stop()` ends everything."""

    def __init__(
        self,
        processes: procs.Processes,
        workdir: Path,
        *,
        secret: str,
        dispatchers: int,
        db_url: str | None,
    ) -> None:
        if db_url is None and dispatchers != 1:
            raise ValueError("SQLite has one dispatcher per database")
        self.processes = processes
        self.workdir = workdir
        self.db_url = db_url
        self.secret = secret
        self.config = workdir / "bench.toml"
        self.config.write_text("# empty: keeps host config files out of the benchmark\n")
        self.members: list[Member] = []
        for i in range(1, dispatchers + 1):
            (workdir / f"d{i}").mkdir()
            self.members.append(Member(f"d{i}", workdir / f"d{i}"))
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.submitted: list[load.Submission] = []  # one per dispatcher, once submitted
        self._logs: dict[int, Path] = {}

    def _env(self, home: Path, **extra: str) -> dict[str, str]:
        return procs.clean_env(OCTASKLY_SECRET_KEY=self.secret, HOME=str(home), **extra)

    def _start(
        self, argv: list[str], *, log: Path, cwd: Path, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        full = [*procs.OCTASKLY, *argv, "--config", str(self.config), "--log-level", "warning"]
        proc = self.processes.start(full, log=log, env=env, cwd=cwd)
        self._logs[proc.pid] = log
        return proc

    def start_dispatchers(self, *, timeout: float = 120.0) -> float:
        """Start every dispatcher, wait for each one's /health; the seconds that took."""
        started = time.monotonic()
        for m in self.members:
            args = [
                "dispatcher", "--bind", "127.0.0.1", "--port", str(m.port),
                "--api-port", str(m.api_port), "--data-dir", str(m.workdir),
                "--node-name", m.name,
            ]  # fmt: skip
            if self.db_url is None:
                args += ["--db-path", str(m.workdir / DB_NAME)]
                env = self._env(m.workdir)
            else:  # in the environment, not on the command line: it holds the password
                env = self._env(m.workdir, OCTASKLY_DB_URL=self.db_url)
            m.proc = self._start(args, log=m.log, cwd=m.workdir, env=env)
        for m in self.members:
            procs.wait_until(
                functools.partial(self._healthy, m), timeout=timeout, what=f"{m.name}'s /health"
            )
        # Every dispatcher signs with the same secret: the first one's admin token is
        # good on all of them.
        os.environ[api.TOKEN_ENV] = (self.members[0].workdir / "admin.token").read_text().strip()
        return time.monotonic() - started

    def _healthy(self, m: Member) -> bool:
        self.check_alive()
        with contextlib.suppress(OSError, ValueError):
            return api.get_json(f"{m.api}/health", timeout=1)[0] == 200
        return False

    def start_workers(self, names: list[str], max_jobs: int, *, timeout: float = 60.0) -> None:
        addrs = ",".join(f"127.0.0.1:{m.port}" for m in self.members)
        for name in names:
            self.workers[name] = self._start(
                [
                    "worker", "--name", name, "--max-jobs", str(max_jobs),
                    "--dispatcher-addr", addrs, "--transport", "tcp",
                ],
                log=self.workdir / f"{name}.log",
                cwd=self.workdir,
                env=self._env(self.workdir),
            )  # fmt: skip
        procs.wait_until(
            lambda: sum(len(w) for w in self.placement().values()) >= len(names),
            timeout=timeout,
            what="workers to join",
        )

    def placement(self) -> dict[str, list[str]]:
        """The names of the workers connected to each dispatcher, as each one says (its
        own sessions: no wait for the others to publish theirs)."""
        self.check_alive()
        placed = {}
        for m in self.members:
            status, body = api.get_json(f"{m.api}/api/v1/workers")
            if status != 200:
                raise procs.HarnessError(f"GET {m.api}/api/v1/workers answered {status}")
            placed[m.name] = sorted(
                w["name"] for w in body["workers"] if w.get("dispatcher", m.name) == m.name
            )
        return placed

    def federation_stats(self) -> dict[str, Any]:
        """Each dispatcher's /api/v1/stats "federation" part (None on SQLite)."""
        found = {}
        for m in self.members:
            status, body = api.get_json(f"{m.api}/api/v1/stats")
            if status != 200:
                raise procs.HarnessError(f"GET {m.api}/api/v1/stats answered {status}")
            found[m.name] = body.get("federation")
        return found

    def check_alive(self) -> None:
        """HarnessError naming the process (with its log) if any has exited."""
        for proc in [*(m.proc for m in self.members), *self.workers.values()]:
            if proc is not None and proc.poll() is not None:
                log = self._logs[proc.pid]
                raise procs.HarnessError(
                    f"{log.parent.name}/{log.stem} exited with {proc.returncode}; its log "
                    f"ends:\n{procs.tail(log)}"
                )

    def pids(self) -> dict[str, int]:
        named = {m.name: m.proc.pid for m in self.members if m.proc is not None}
        named.update({name: p.pid for name, p in self.workers.items()})
        return named

    def logs(self) -> dict[str, Path]:
        named = {m.name: m.log for m in self.members}
        named.update({name: self.workdir / f"{name}.log" for name in self.workers})
        return named

    def db_bytes(self) -> int:
        """SQLite: the database file with its -wal and -shm (PostgreSQL: see pg_size)."""
        path = self.members[0].workdir / DB_NAME
        return sum(
            p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()
        )

    def stop(self) -> None:
        for proc in [*self.workers.values(), *(m.proc for m in self.members)]:
            if proc is not None:
                self.processes.stop(proc)
        self.workers = {}
        for m in self.members:
            m.proc = None


# -- the PostgreSQL server's processes ---------------------------------------------------------
def postmaster_pid(server: pg.Cluster) -> int | None:
    """The running postmaster's pid, from postmaster.pid in its data dir."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((server.data / "postmaster.pid").read_text().split()[0])
    return None


def postgres_cpu_seconds(pid: int) -> float:
    """CPU seconds of the postmaster, its live children, and the children it has reaped
    (backends that ended): a difference of two readings is the server's CPU between them."""
    postmaster = psutil.Process(pid)
    times = postmaster.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in postmaster.children():
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            total += t.user + t.system
    return float(total)


class PssSampler:
    """Peak of the summed PSS of the postmaster and its children, every PSS_INTERVAL s (a
    process's PSS counts shared memory, such as shared buffers, once across the group)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pss-sampler", daemon=True)

    def __enter__(self) -> PssSampler:
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(PSS_INTERVAL):
            self.sample()

    def sample(self) -> None:
        if self.pid is None:
            return
        total = 0
        with contextlib.suppress(psutil.Error):
            postmaster = psutil.Process(self.pid)
            for p in [postmaster, *postmaster.children()]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_full_info().pss
        self.peak = max(self.peak, total)


def _pg_log_offset(server: pg.Cluster | None) -> int:
    if server is None:
        return 0
    with contextlib.suppress(OSError):
        return server.log.stat().st_size
    return 0


def _pg_log_since(server: pg.Cluster | None, offset: int) -> list[str]:
    """Lines of the server's log written since `offset` that report a problem."""
    if server is None:
        return []
    try:
        with server.log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if PG_LOG_NOISE.search(line)]


# -- the load -----------------------------------------------------------------------------------
async def submit_spread(
    http: aiohttp.ClientSession, bases: list[str], n: int, *, size: int, in_flight: int
) -> list[load.Submission]:
    """`n` tasks in batches of `size`, `in_flight` requests at a time, batch i going to
    dispatcher i mod len(bases); one Submission per dispatcher."""
    subs = [load.Submission() for _ in bases]
    batches = iter(enumerate(min(size, n - start) for start in range(0, n, size)))

    async def lane() -> None:
        for i, count in batches:  # one iterator shared by all lanes
            k = i % len(bases)
            url = f"{bases[k]}/api/v1/tasks/batch"
            payload = await load.post(http, url, {"tasks": [load.TASK] * count}, subs[k])
            subs[k].ids.extend(payload["ids"])

    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return subs


def merged(subs: list[load.Submission]) -> load.Submission:
    return load.Submission(
        first_sent=min(s.first_sent for s in subs if s.first_sent),
        latencies=[x for s in subs for x in s.latencies],
        ids=[i for s in subs for i in s.ids],
    )


async def push(n: int, f: Federation) -> tuple[dict[str, Any], list[load.Submission], list[Any]]:
    """Submit, wait for all to end (polling the first dispatcher: the counts are the
    shared database's), read the records back."""
    first = f.members[0].api
    async with load.session(throughput.SINGLE_CLIENTS) as http:
        watcher = asyncio.create_task(
            load.wait_terminal(http, first, n, check_alive=f.check_alive, timeout=120 + n / 50)
        )
        try:
            subs = await submit_spread(
                http,
                [m.api for m in f.members],
                n,
                size=throughput.BATCH_SIZE,
                in_flight=throughput.BATCHES_IN_FLIGHT,
            )
            f.submitted = subs  # (for _diagnose, should the wait fail)
            counts = await watcher
        finally:
            watcher.cancel()
        records = await load.fetch_records(http, first, n)
    sub = merged(subs)
    load.check_records(sub, records)
    return {**load.latencies(sub, records), "counts": counts}, subs, records


def _log_sizes(f: Federation) -> dict[str, int]:
    sizes = {}
    for name, path in f.logs().items():
        try:
            sizes[name] = path.stat().st_size
        except OSError:
            sizes[name] = 0
    return sizes


def _log_lines(path: Path, start: int = 0, end: int | None = None) -> list[str]:
    """What a process logged between two sizes of its log (at --log-level warning, so
    every line is a warning or worse)."""
    try:
        with path.open("rb") as log:
            log.seek(start)
            data = log.read() if end is None else log.read(max(0, end - start))
    except OSError:
        return []
    return [line for line in data.decode(errors="replace").splitlines() if line.strip()]


def _pg_size(server: pg.Cluster, url: str) -> int:
    name = url.rsplit("/", 1)[-1]
    return int(server.psql(f"SELECT pg_database_size('{name}')").strip())


def run_config(
    backend: str,
    dispatchers: int,
    n: int,
    processes: procs.Processes,
    root: Path,
    secret: str,
    server: pg.Cluster | None,
) -> dict[str, Any]:
    """The batch load on one configuration, on fresh processes and a fresh database."""
    name = label(backend, dispatchers)
    workdir = root / f"federation-{name}"
    workdir.mkdir()
    url = None
    if backend == "postgres":
        assert server is not None
        url = server.create_database()
        server.psql("CHECKPOINT")  # the previous configuration's dirty pages: not ours
    f = Federation(processes, workdir, secret=secret, dispatchers=dispatchers, db_url=url)
    pg_server = server if url else None
    pm = postmaster_pid(pg_server) if pg_server else None
    try:
        started = f.start_dispatchers()
        names = worker_names(throughput.WORKERS)
        f.start_workers(names, throughput.MAX_JOBS)
        placed_before = f.placement()
        ids = _worker_ids(f)
        logs_before, pg_log_offset = _log_sizes(f), _pg_log_offset(pg_server)
        db_before = _pg_size(server, url) if server and url else f.db_bytes()
        pids = f.pids()
        with procs.RssSampler(pids) as rss, PssSampler(pm) as pss:
            cpu_before = throughput.cpu_snapshot(pids)
            pg_before = postgres_cpu_seconds(pm) if pm else 0.0
            try:
                result, subs, records = asyncio.run(push(n, f))
            except procs.HarnessError as exc:
                raise procs.HarnessError(f"{name}: {exc}\n{_diagnose(f)}") from None
            cpu_after = throughput.cpu_snapshot(pids)
            pg_after = postgres_cpu_seconds(pm) if pm else 0.0
            pss.sample()
        logs_after = _log_sizes(f)
        placed_after, fed = f.placement(), f.federation_stats()
        pg_lines = _pg_log_since(pg_server, pg_log_offset)
        cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_before}
        ran = collections.Counter(str(r["worker_id"]) for r in records)
        db = _pg_size(server, url) if server and url else f.db_bytes()
        paths = f.logs()
        f.stop()  # then read the logs whole: what the processes said as they stopped too
        logs = {k: _log_lines(path) for k, path in paths.items()}
        during = {k: _log_lines(path, logs_before[k], logs_after[k]) for k, path in paths.items()}
        per_dispatcher = {}
        for m, sub in zip(f.members, subs, strict=True):
            mine = placed_after[m.name]
            per_dispatcher[m.name] = {
                "p2p_address": f"127.0.0.1:{m.port}",
                "acknowledged": len(sub.ids),
                "submit_request": stats.latency_ms(sub.latencies),
                "workers_before": placed_before[m.name],
                "workers_after": mine,
                "ran_by_its_workers": sum(ran[ids.get(w, w)] for w in mine),
                "cpu_seconds": cpu[m.name],
                "peak_rss": rss.peak[m.name],
                "taken_over": (fed[m.name] or {}).get("taken_over"),
                "log_lines_during_load": len(during[m.name]),
                "log_lines": len(logs[m.name]),
                "log_first": logs[m.name][:LOG_LINES_KEPT],
            }
        workers = {
            w: {
                "dispatcher": next((d for d, ws in placed_after.items() if w in ws), None),
                "ran": ran[ids.get(w, w)],
                "cpu_seconds": cpu[w],
                "peak_rss": rss.peak[w],
                "log_lines_during_load": len(during[w]),
                "log_lines": len(logs[w]),
                "log_first": logs[w][:LOG_LINES_KEPT],
            }
            for w in names
        }
        result.update(
            backend=backend,
            dispatchers=dispatchers,
            dispatcher_start_seconds=started,
            per_dispatcher=per_dispatcher,
            workers=workers,
            placement_changed=placed_before != placed_after,
            cpu_seconds={
                "dispatchers": sum(cpu[m.name] for m in f.members),
                "workers": sum(cpu[w] for w in names),
                "postgres": (pg_after - pg_before) if pm else None,
                "bench": cpu["bench"],
                "machine": cpu["machine"],
            },
            peak_rss={
                "dispatcher_max": max(rss.peak[m.name] for m in f.members),
                "dispatchers_sum": sum(rss.peak[m.name] for m in f.members),
                "worker_max": max(rss.peak[w] for w in names),
                "postgres_pss": pss.peak if pm else None,
            },
            ran_more_than_once=sum(1 for r in records if (r.get("attempts") or 1) > 1),
            db_bytes=db,  # PostgreSQL: pg_database_size (its WAL is the server's, apart)
            db_bytes_before=db_before,  # with the schema, before the load
            postgres_log_problems=len(pg_lines),
            postgres_log_first=pg_lines[:LOG_LINES_KEPT],
        )
        return result
    finally:
        f.stop()
        if server is not None and url is not None:
            server.drop_database(url)


def _diagnose(f: Federation) -> str:
    """Best effort, after a failed load: where the workers are, and what each dispatcher
    says about its queue, its runs and the federation."""
    lines = []
    with contextlib.suppress(procs.HarnessError, OSError, ValueError):
        lines.append(f"workers by dispatcher: {f.placement()}")
    for m in f.members:
        try:
            status, body = api.get_json(f"{m.api}/api/v1/stats")
        except (OSError, ValueError) as exc:
            lines.append(f"{m.name} (127.0.0.1:{m.port}): GET /api/v1/stats failed: {exc}")
            continue
        if status != 200:
            lines.append(f"{m.name}: GET /api/v1/stats answered {status}")
            continue
        fed = body.get("federation") or {}
        members = [
            {k: d.get(k) for k in ("id", "workers", "running", "renewed_seconds_ago")}
            for d in fed.get("dispatchers", [])
        ]
        lines.append(
            f"{m.name} (127.0.0.1:{m.port}): tasks {body.get('tasks')}, queue "
            f"{body.get('queue')}, federation {members}, taken over {fed.get('taken_over')}"
        )
    acked_by = {i: m.name for m, s in zip(f.members, f.submitted, strict=False) for i in s.ids}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        url = f"{f.members[0].api}/api/v1/tasks?status=queued&limit=1000"
        status, body = api.get_json(url)
        queued = body["tasks"] if status == 200 else []
        by = collections.Counter(acked_by.get(t["id"], "?") for t in queued)
        first = queued[0] if queued else {}
        lines.append(
            f"queued tasks by the dispatcher that acknowledged them: {dict(by)}; e.g. "
            + str({k: first.get(k) for k in ("id", "attempts", "worker_id", "created_at")})
        )
    for name, path in f.logs().items():
        tail = _log_lines(path)[-3:]
        if tail:
            lines.append(f"{name} log ends: " + " | ".join(tail))
    return "\n".join(lines)


def _worker_ids(f: Federation) -> dict[str, str]:
    """Worker name -> the id the task records carry (worker_id)."""
    ids = {}
    for m in f.members:
        status, body = api.get_json(f"{m.api}/api/v1/workers")
        if status == 200:
            ids.update({w["name"]: str(w["id"]) for w in body["workers"]})
    return ids


def _stop_server(server: pg.Cluster) -> None:
    """pg_ctl stop (and remove the cluster's directory); SIGKILL the postmaster if it
    outlived that (say pg_ctl start timed out after the server did start)."""
    pid = postmaster_pid(server)
    server.stop()
    if pid is None:
        return
    with contextlib.suppress(psutil.Error):
        postmaster = psutil.Process(pid)
        if "postgres" in postmaster.name():
            family = [postmaster, *postmaster.children(recursive=True)]
            for p in family:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(family, timeout=5)


def run(n: int, processes: procs.Processes, root: Path, secret: str) -> dict[str, Any]:
    """Every configuration, one after the other, sharing one PostgreSQL server (a fresh
    database each), which is stopped and removed however this ends."""
    try:
        server = pg.Cluster(durable=True)
    except RuntimeError as exc:  # PostgreSQL is not installed (it says how to install it)
        raise procs.HarnessError(str(exc)) from None
    out: dict[str, Any] = {"tasks": n, "configs": {}}
    try:
        for backend, count in CONFIGS:
            if backend == "postgres" and "postgres" not in out:
                try:
                    server.start()
                except subprocess.CalledProcessError as exc:
                    raise procs.HarnessError(
                        f"could not start PostgreSQL: {' '.join(exc.cmd)} failed: "
                        f"{str(exc.stderr).strip()[-1000:]}"
                    ) from None
                out["postgres"] = {
                    "dir": str(server.dir),  # removed when the scenario ends
                    "version": server.psql("SHOW server_version").strip(),
                    "settings": {
                        key: server.psql(f"SHOW {key}").strip()
                        for key in ("fsync", "synchronous_commit", "shared_buffers")
                    },
                }
            out["configs"][label(backend, count)] = run_config(
                backend, count, n, processes, root, secret, server
            )
            processes.kill_all()
    finally:
        _stop_server(server)
    return out
