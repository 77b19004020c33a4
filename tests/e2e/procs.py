"""Helpers for end-to-end tests: octaskly processes on free ports, polled with deadlines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import site
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from octaskly import testing
from tests import pg

OCTASKLY = [sys.executable, "-m", "octaskly"]
SECRET = "e2e-test-secret-key-0123456789"


free_port = testing.free_port


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCTASKLY_") and k != "RUST_LOG"}
    env["HOME"] = extra.pop("HOME", env.get("HOME", "/root"))
    env.update(extra)
    return env


def with_store(
    args: Sequence[str], cwd: Path, env: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """With OCTASKLY_TEST_STORE=postgresql a dispatcher gets a PostgreSQL database instead
    of its SQLite file: the one that stands for its --db-path, else its --data-dir (so a
    restart with the same arguments finds its data)."""
    args = list(args)
    if pg.STORE != "postgresql" or not args or args[0] != "dispatcher":
        return args, env
    if "OCTASKLY_DB_URL" in env:
        return args, env
    if "--db-path" in args:
        at = args.index("--db-path")
        key = args[at + 1]
        del args[at : at + 2]
        if "--data-dir" not in args:  # where its SQLite file was: TLS, token, audit log
            args += ["--data-dir", str((cwd / key).parent)]
    elif "--data-dir" in args:
        key = args[args.index("--data-dir") + 1]
    else:
        key = str(cwd)
    url = pg.database_for(str((cwd / key).resolve()))
    return args, {**env, "OCTASKLY_DB_URL": url}


def start(
    args: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    task_user: str | None = "root",
    uid: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start `octaskly ARGS`; `uid` runs it as that user (with the system's Python 3.11 and
    this venv's packages: the venv's interpreter lives under root's home)."""
    args, env = with_store(args, cwd, env or clean_env())
    if args and args[0] in ("worker", "dev") and task_user is not None:
        # These tests run as root, and their tasks write marks into pytest's tmp dirs (in
        # root's 0700 tree): let none/basic tasks keep the worker's user. The default (a
        # root worker runs them as nobody) is what tests/e2e/test_isolation.py checks.
        env = {"OCTASKLY_TASK_USER": task_user, **env}
    command, switch = [*OCTASKLY, *args], {}
    if uid is not None:
        command = ["/usr/bin/python3", "-m", "octaskly", *args]
        env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO), *site.getsitepackages()])}
        switch = {"user": uid, "group": uid, "extra_groups": []}
    with open(log or cwd / f"{args[0]}-{time.monotonic_ns()}.log", "wb") as out:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **switch,
        )


REPO = Path(__file__).resolve().parents[2]


def run(
    args: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OCTASKLY, *args],
        cwd=cwd,
        env=env or clean_env(),
        text=True,
        capture_output=True,
        timeout=timeout,
        input=input_text,
    )


# API base URL -> the admin token its dispatcher wrote (registered by wait_healthy).
TOKENS: dict[str, str] = {}
TOKEN_FILE = "admin.token"


def _base(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def http(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    extra_headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """A JSON request; with the admin token of that dispatcher unless `token` is given
    ("" sends none)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(extra_headers or {})}
    token = TOKENS.get(_base(url)) if token is None else token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_healthy(
    api: str,
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = 30,
    *,
    data_dir: Path | None = None,
) -> None:
    """Until /health answers; with `data_dir`, also register the dispatcher's admin token
    (which it writes there before it serves) for `http` and `client_env`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        with contextlib.suppress(OSError, ValueError):
            if http("GET", f"{api}/health")[0] == 200:
                if data_dir is not None:
                    TOKENS[_base(api)] = (data_dir / TOKEN_FILE).read_text().strip()
                return
        time.sleep(0.05)
    raise AssertionError(f"{api} never became healthy")


def client_env(api: str, **extra: str) -> dict[str, str]:
    """The environment of a client command talking to `api` with its admin token."""
    token = TOKENS.get(_base(api))
    return clean_env(OCTASKLY_API_URL=api, **({"OCTASKLY_TOKEN": token} if token else {}), **extra)


def wait_for(predicate: Any, *, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Collects processes and makes sure none outlives the test."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)
