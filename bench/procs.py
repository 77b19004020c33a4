"""Processes the harness starts: free ports, clean environments, peak-RSS sampling, and
cleanup that ends every process it started together with all of its descendants."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar

import psutil

from octaskly import testing

OCTASKLY = (sys.executable, "-m", "octaskly")
REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class HarnessError(Exception):
    """The harness or the cluster under test broke (exit 1), unlike a missed target."""


free_port = testing.free_port


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without octaskly settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCTASKLY_") and k != "RUST_LOG"}
    env.update(extra)
    return env


def wait_until(predicate: Callable[[], T | None], *, timeout: float, what: str) -> T:
    """Poll `predicate` every 20 ms until it returns a truthy value; HarnessError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
    return text or "(empty log)"


class Processes:
    """Every process the harness started; `kill_all()` ends each with its descendants."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        log: Path,
        env: dict[str, str],
        cwd: Path,
        stdin: int | IO[bytes] = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv`; stderr (and stdout unless given) go to `log`."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=stdin,
                stdout=out if stdout is None else stdout,
                stderr=out,
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; descendants are killed either way."""
        family = _descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout)
        _kill(family + _descendants(proc.pid))
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)
        return code

    def kill_all(self) -> None:
        """SIGKILL every process still registered and everything it started."""
        for proc in list(self._procs):
            family = _descendants(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            _kill(family)
            self._procs.remove(proc)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def _kill(processes: list[psutil.Process]) -> None:
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(processes, timeout=5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included, children not)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def machine_busy_seconds() -> float:
    """CPU seconds all processors of the machine spent busy (not idle, iowait or steal)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))


def main_thread_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process's main thread (its event loop here)."""
    for thread in psutil.Process(pid).threads():
        if thread.id == pid:
            return float(thread.user_time + thread.system_time)
    return 0.0


class RssSampler:
    """Samples the resident set size of named processes every `interval` s in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        for name, proc in self._procs.items():
            with contextlib.suppress(psutil.Error):
                self.peak[name] = max(self.peak[name], proc.memory_info().rss)

    def current(self, name: str) -> int:
        return int(self._procs[name].memory_info().rss)
