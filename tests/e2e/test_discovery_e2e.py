"""A worker given no dispatcher address finds the dispatcher on the LAN (mDNS / DNS-SD):
dispatcher and worker in two network namespaces joined by a veth pair, as on two hosts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.e2e import procs
from tests.e2e.procs import OCTASKLY, SECRET, clean_env, free_port, wait_for
from tests.integration.test_discovery import DISCOVER, REPO, NetnsPair, netns_pair


def _in_ns(ns: str, args: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *OCTASKLY, *args]


def _start(ns: str, args: Sequence[str], *, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            _in_ns(ns, args),
            cwd=cwd,
            env=clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _run(
    ns: str, args: Sequence[str], *, cwd: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _in_ns(ns, args), cwd=cwd, env=clean_env(), text=True, capture_output=True, timeout=timeout
    )


def _logs(tmp_path: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(tmp_path.glob("*.log"))
    )


def _discover_from(ns: str, *, cwd: Path, timeout: float) -> list[tuple[str, int]]:
    """What `discover()` returns inside namespace `ns`."""
    env = clean_env(PYTHONPATH=str(REPO))
    result = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", DISCOVER, str(timeout)],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout + 15,
    )
    assert result.returncode == 0, result.stderr
    return [(host, port) for host, port in json.loads(result.stdout)["found"]]


def _worker_total(pair: NetnsPair, api: str, cwd: Path) -> int:
    args = ["workers", "--api-url", api, "--data-dir", str(cwd / "d"), "--json"]
    result = _run(pair.d, args, cwd=cwd, timeout=15)
    return int(json.loads(result.stdout)["total"]) if result.returncode == 0 else 0


def test_worker_without_dispatcher_addr_discovers_the_dispatcher(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    port, api_port = free_port(), free_port()
    with netns_pair() as pair, procs.processes() as ps:
        api = f"http://{pair.d_addr}:{api_port}"
        dispatcher = [
            "dispatcher",
            *("--bind", pair.d_addr, "--port", str(port), "--api-port", str(api_port)),
            *("--data-dir", str(tmp_path / "d"), "--secret-key-file", str(secret)),
        ]
        ps.append(_start(pair.d, dispatcher, cwd=tmp_path, log=tmp_path / "dispatcher.log"))
        # the advertisement, seen from the worker's namespace (probing takes ~2 s)
        found = _discover_from(pair.w, cwd=tmp_path, timeout=8.0)
        assert found == [(pair.d_addr, port)], f"dispatcher not advertised\n{_logs(tmp_path)}"
        worker = ["worker", "--name", "w1", "--secret-key-file", str(secret)]
        worker += ["--data-dir", str(tmp_path / "w")]  # and no --dispatcher-addr
        ps.append(_start(pair.w, worker, cwd=tmp_path, log=tmp_path / "worker.log"))
        try:
            wait_for(lambda: _worker_total(pair, api, tmp_path) == 1, timeout=20, what="worker")
        except AssertionError:
            raise AssertionError(f"worker did not join via discovery\n{_logs(tmp_path)}") from None
        submit = ["submit", "--api-url", api, "--data-dir", str(tmp_path / "d")]
        submit += ["--wait", "--", "echo", "found-it"]
        done = _run(pair.d, submit, cwd=tmp_path, timeout=30)
        assert (done.returncode, done.stdout) == (0, "found-it\n"), done.stderr
        assert (
            f"found dispatcher(s) on the LAN: {pair.d_addr}:{port}"
            in (tmp_path / "worker.log").read_text()
        )
        assert procs.stop(ps[1]) == 0 and procs.stop(ps[0]) == 0, _logs(tmp_path)
