"""A real local cluster: one dispatcher and its workers as separate `octaskly` processes
on loopback, with a fresh SQLite file and config in a temp dir."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

from bench import api, procs

DB_NAME = "octaskly.db"


class Cluster:
    """Start with `start_dispatcher()` then `start_workers()`; `stop()` ends everything."""

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
        self.workers: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        self.logs.append(log)
        argv = [*procs.OCTASKLY, *args, "--config", str(self.config), "--log-level", "warning"]
        return self.processes.start(argv, log=log, env=self.env, cwd=self.workdir)

    def start_dispatcher(self, *, timeout: float = 120.0) -> float:
        """Start the dispatcher and wait for /health; return the seconds that took."""
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
            ],
        )
        procs.wait_until(self._healthy, timeout=timeout, what="the dispatcher's /health")
        # The admin token the dispatcher wrote to its data dir: the load generator's key.
        os.environ[api.TOKEN_ENV] = (self.workdir / "admin.token").read_text().strip()
        return time.monotonic() - started

    def _healthy(self) -> bool:
        self.check_alive()
        with contextlib.suppress(OSError, ValueError):
            return api.get_json(f"{self.api}/health", timeout=1)[0] == 200
        return False

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
        for proc, log in zip([self.dispatcher, *self.workers], self.logs, strict=False):
            if proc is not None and proc.poll() is not None:
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
        named.update({f"worker-{i}": w.pid for i, w in enumerate(self.workers, 1)})
        return named

    def stop(self) -> None:
        for proc in [*self.workers, self.dispatcher]:
            if proc is not None:
                self.processes.stop(proc)
        self.workers, self.dispatcher = [], None


def secret_key() -> str:
    """$OCTASKLY_SECRET_KEY when set (so a token signed with it works), else a fresh one."""
    return os.environ.get("OCTASKLY_SECRET_KEY") or os.urandom(24).hex()
