"""A real local cluster: one dispatcher and its workers as separate `octaskly` processes
on loopback, with a fresh SQLite file and config in a temp dir; optionally a standby
dispatcher replicating the first one, in its own subdirectory with its own ports and
database."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import api, procs

DB_NAME = "octaskly.db"
STANDBY_DIR = "standby"


class Cluster:
    """Start with `start_dispatcher()` (then `start_standby()` for a replicated pair), then
    `start_workers()`; `stop()` ends everything."""

    def __init__(self, processes: procs.Processes, workdir: Path, *, secret: str) -> None:
        self.processes = processes
        self.workdir = workdir
        self.db_path = workdir / DB_NAME
        self.port = procs.free_port()
        self.api_port = procs.free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.env = procs.clean_env(OCTASKLY_SECRET_KEY=secret, HOME=str(workdir))
        self.config = workdir / "bench.toml"
        self.config.write_text("# empty: keeps host config files out of the benchmark\n")
        self.dispatcher: subprocess.Popen[bytes] | None = None
        self.standby: subprocess.Popen[bytes] | None = None
        self.standby_api: str | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._log_of: dict[int, Path] = {}

    def _start(
        self, name: str, args: list[str], *, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        cwd = cwd or self.workdir
        log = cwd / f"{name}.log"
        argv = [*procs.OCTASKLY, *args, "--config", str(self.config), "--log-level", "warning"]
        proc = self.processes.start(argv, log=log, env=self.env, cwd=cwd)
        self._log_of[proc.pid] = log
        return proc

    def start_dispatcher(self, *, timeout: float = 120.0, extra: Sequence[str] = ()) -> float:
        """Start the dispatcher (with the `extra` arguments) and wait for /health; return
        the seconds that took."""
        started = time.monotonic()
        self.dispatcher = self._start(
            "dispatcher",
            [
                "dispatcher",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--api-port",
                str(self.api_port),
                "--db-path",
                str(self.db_path),
                "--data-dir",
                str(self.workdir),
                *extra,
            ],
        )
        procs.wait_until(
            lambda: self._healthy(self.api), timeout=timeout, what="the dispatcher's /health"
        )
        # The admin token the dispatcher wrote to its data dir: the load generator's key.
        os.environ[api.TOKEN_ENV] = (self.workdir / "admin.token").read_text().strip()
        return time.monotonic() - started

    def start_standby(self, *, replication: str, timeout: float = 120.0) -> float:
        """Start a standby dispatcher following this one (`--replication` as given; the
        primary needs the same) in the subdirectory `standby/` with its own ports, data dir
        and database; wait for its /health, then until the primary reports it connected
        and in sync. Return the seconds all that took."""
        started = time.monotonic()
        workdir = self.workdir / STANDBY_DIR
        workdir.mkdir()
        port, api_port = procs.free_port(), procs.free_port()
        self.standby_api = f"http://127.0.0.1:{api_port}"
        self.standby = self._start(
            "standby",
            [
                "dispatcher",
                "--role",
                "standby",
                "--primary-addr",
                f"127.0.0.1:{self.port}",
                "--replication",
                replication,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--api-port",
                str(api_port),
                "--db-path",
                str(workdir / DB_NAME),
                "--data-dir",
                str(workdir),
            ],
            cwd=workdir,
        )
        standby_api = self.standby_api
        procs.wait_until(
            lambda: self._healthy(standby_api), timeout=timeout, what="the standby's /health"
        )
        procs.wait_until(
            self._standby_synced, timeout=timeout, what="the standby to connect and sync"
        )
        return time.monotonic() - started

    def _healthy(self, base: str) -> bool:
        self.check_alive()
        with contextlib.suppress(OSError, ValueError):
            return api.get_json(f"{base}/health", timeout=1)[0] == 200
        return False

    def _standby_synced(self) -> bool:
        replication = self.ha_status().get("replication") or {}
        return bool(replication.get("standby")) and replication.get("synced") is True

    def ha_status(self, base: str | None = None, *, timeout: float = 5.0) -> dict[str, Any]:
        """GET /api/v1/ha/status of the primary (or of the dispatcher at `base`)."""
        self.check_alive()
        url = f"{base or self.api}/api/v1/ha/status"
        status, body = api.get_json(url, timeout=timeout)
        if status != 200 or not isinstance(body, dict):
            raise procs.HarnessError(f"GET {url} answered {status}")
        return body

    def start_workers(
        self, count: int, max_jobs: int, *, transport: str = "tcp", timeout: float = 60.0
    ) -> None:
        """Start `count` workers (P2P over `transport`) and wait until all have joined."""
        for i in range(1, count + 1):
            self.workers.append(
                self._start(
                    f"worker-{i}",
                    [
                        "worker",
                        "--name",
                        f"bench-worker-{i}",
                        "--max-jobs",
                        str(max_jobs),
                        "--dispatcher-addr",
                        f"127.0.0.1:{self.port}",
                        "--transport",
                        transport,
                    ],
                )
            )
        procs.wait_until(
            lambda: self.connected_workers() >= count, timeout=timeout, what="workers to join"
        )

    def connected_workers(self) -> int:
        self.check_alive()
        status, body = api.get_json(f"{self.api}/api/v1/stats")
        if status != 200:
            raise procs.HarnessError(f"GET /api/v1/stats answered {status}")
        return int(body["workers"]["total"])

    def check_alive(self) -> None:
        """HarnessError naming the process (with its log) if any has exited."""
        for proc in [self.dispatcher, self.standby, *self.workers]:
            if proc is not None and proc.poll() is not None:
                log = self._log_of[proc.pid]
                raise procs.HarnessError(
                    f"{log.stem} exited with {proc.returncode}; its log ends:\n{procs.tail(log)}"
                )

    def db_bytes(self) -> dict[str, int]:
        """Sizes of the database file and its -wal and -shm files (0 when absent)."""
        sizes = {}
        for suffix in ("", "-wal", "-shm"):
            path = Path(f"{self.db_path}{suffix}")
            sizes[suffix.strip("-") or "db"] = path.stat().st_size if path.exists() else 0
        return sizes

    def pids(self) -> dict[str, int]:
        assert self.dispatcher is not None
        named = {"dispatcher": self.dispatcher.pid}
        if self.standby is not None:
            named["standby"] = self.standby.pid
        named.update({f"worker-{i}": w.pid for i, w in enumerate(self.workers, 1)})
        return named

    def stop(self) -> None:
        for proc in [*self.workers, self.standby, self.dispatcher]:
            if proc is not None:
                self.processes.stop(proc)
        self.workers, self.standby, self.dispatcher = [], None, None


def secret_key() -> str:
    """$OCTASKLY_SECRET_KEY when set (so a token signed with it works), else a fresh one."""
    return os.environ.get("OCTASKLY_SECRET_KEY") or os.urandom(24).hex()
