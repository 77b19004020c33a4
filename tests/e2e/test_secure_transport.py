"""The P2P port as users run it: real dispatcher and worker processes, TLS over TCP and QUIC
over UDP on one port, admission by the cluster key and the whitelist, and what an
attacker on the path sees (recorded by relays) or achieves (a flipped byte, a
man-in-the-middle with its own certificate)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from octaskly.transport import base, tcp, tls
from tests.e2e import procs, relays
from tests.e2e.procs import SECRET

MARK = "octaskly-cleartext-marker"
NAME = "worker-with-a-recognisable-name"


class Cluster:
    """A dispatcher process and the workers started against it."""

    def __init__(self, tmp: Path, running: list[subprocess.Popen[bytes]]) -> None:
        self.tmp, self.running = tmp, running
        self.port, self.api_port = procs.free_port(), procs.free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.data = tmp / "dispatcher"
        self.secret_file = tmp / "secret"
        self.secret_file.write_text(SECRET + "\n")
        self.secret_file.chmod(0o600)
        self.log = tmp / "dispatcher.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        self.proc = procs.start(
            [
                "dispatcher",
                *("--bind", "127.0.0.1", "--port", str(self.port)),
                *("--api-port", str(self.api_port), "--data-dir", str(self.data)),
                *("--secret-key-file", str(self.secret_file), "--log-level", "info"),
                *extra,
            ],
            cwd=self.tmp,
            log=self.log,
        )
        self.running.append(self.proc)
        procs.wait_healthy(self.api, self.proc, data_dir=self.data)

    def worker(
        self, name: str, *, transport: str, port: int | None = None, secret_file: Path | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp / f"worker-{name}.log"
        proc = procs.start(
            [
                "worker",
                *("--name", name, "--transport", transport, "--max-jobs", "2"),
                *("--dispatcher-addr", f"127.0.0.1:{port or self.port}"),
                *("--secret-key-file", str(secret_file or self.secret_file)),
                *("--data-dir", str(self.tmp / f"w-{name}"), "--log-level", "info"),
            ],
            cwd=self.tmp,
            log=log,
        )
        self.running.append(proc)
        return proc, log

    def workers(self) -> list[str]:
        return [w["id"] for w in procs.http("GET", f"{self.api}/api/v1/workers")[1]["workers"]]

    def wait_joined(self, name: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
        def joined() -> bool:
            assert proc.poll() is None, f"worker {name} exited with {proc.returncode}"
            return name in self.workers()

        procs.wait_for(joined, timeout=timeout, what=f"worker {name} to join")

    def submit(self, command: str) -> str:
        status, body = procs.http("POST", f"{self.api}/api/v1/tasks", {"command": command})
        assert status == 201, body
        return str(body["id"])

    def wait_done(self, task_id: str, timeout: float = 30) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            record = procs.http("GET", f"{self.api}/api/v1/tasks/{task_id}")[1]
            return record if record["status"] not in ("queued", "running") else None

        result: dict[str, Any] = procs.wait_for(done, timeout=timeout, what=f"task {task_id}")
        return result

    def audit(self) -> list[dict[str, Any]]:
        path = self.data / "logs" / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with procs.processes() as running:
        yield Cluster(tmp_path, running)


def run_marked_tasks(cluster: Cluster, count: int = 3) -> None:
    ids = [cluster.submit(f"echo {MARK}-$(({i} * 7))") for i in range(count)]
    for i, task_id in enumerate(ids):
        record = cluster.wait_done(task_id)
        assert (record["status"], record["stdout"]) == ("completed", f"{MARK}-{i * 7}\n")


@pytest.mark.parametrize("transport", ["quic", "tcp"])
def test_worker_completes_tasks_over_each_transport(cluster: Cluster, transport: str) -> None:
    cluster.start()
    proc, log = cluster.worker("w1", transport=transport)
    cluster.wait_joined("w1", proc)
    run_marked_tasks(cluster)
    assert f"over {transport}" in log.read_text()
    joined = [e for e in cluster.audit() if e["event_type"] == "worker_joined"]
    assert joined[-1]["actor"] == "w1" and joined[-1]["details"]["transport"] == transport
    assert joined[-1]["source_ip"] == "127.0.0.1"


def test_tls_identity_is_created_private_once_and_reused(cluster: Cluster) -> None:
    cluster.start()
    tls_dir = cluster.data / "tls"
    key, cert = tls_dir / tls.KEY_FILE, tls_dir / tls.CERT_FILE
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and SECRET.encode() not in key.read_bytes()
    first = cert.read_bytes()
    assert cluster.proc is not None
    procs.stop(cluster.proc)
    cluster.start()
    assert cert.read_bytes() == first, "a restart must keep the dispatcher's identity"
    procs.stop(cluster.proc)
    # A damaged identity is a clear startup error, not a silent new identity.
    key.write_text("not a key")
    done = procs.run(
        [
            "dispatcher",
            *("--port", str(cluster.port), "--api-port", str(cluster.api_port)),
            *("--data-dir", str(cluster.data), "--secret-key-file", str(cluster.secret_file)),
        ],
        cwd=cluster.tmp,
    )
    assert done.returncode == 2
    assert "TLS identity" in done.stderr and "remove both" in done.stderr


def test_quic_with_udp_blocked_fails_clearly_and_auto_falls_back(cluster: Cluster) -> None:
    cluster.start("--quic-enabled", "false")
    with relays.running(relays.UDPBlackHole(cluster.port)) as hole:
        proc, log = cluster.worker("q", transport="quic")
        procs.wait_for(
            lambda: "no QUIC answer" in log.read_text(), timeout=40, what="the QUIC failure"
        )
        assert "UDP blocked" in log.read_text()
        assert "q" not in cluster.workers() and proc.poll() is None  # it keeps retrying
        assert isinstance(hole, relays.UDPBlackHole) and hole.received > 0
        auto, auto_log = cluster.worker("a", transport="auto")
        cluster.wait_joined("a", auto, timeout=30)
        # (the dispatcher lists it as soon as it sent the welcome; the worker logs the
        # session once the welcome arrived: a moment later under load)
        procs.wait_for(lambda: "over tcp" in auto_log.read_text(), timeout=10, what="its log")
        assert "trying TCP" in auto_log.read_text()
        run_marked_tasks(cluster, 1)


@pytest.mark.parametrize("transport", ["tcp", "quic"])
def test_nothing_crosses_the_wire_in_clear_text(cluster: Cluster, transport: str) -> None:
    cluster.start()
    relay: relays.Relay = (
        relays.TCPRelay(cluster.port) if transport == "tcp" else relays.UDPRelay(cluster.port)
    )
    with relays.running(relay):
        # Long markers only: a short string turns up in random ciphertext by chance.
        proc, _ = cluster.worker(NAME, transport=transport, port=relay.port)
        cluster.wait_joined(NAME, proc)
        run_marked_tasks(cluster)
    captured = bytes(relay.captured)
    assert len(captured) > 2000, "the relay saw the traffic"
    for clear in (MARK, "echo " + MARK, '"stdout"', '"assign"', NAME, SECRET):
        assert clear.encode() not in captured, f"{clear!r} crossed the wire in clear text"


def flip_one_byte_each_way(cluster: Cluster, relay: relays.Relay, transport: str) -> Path:
    """Run a task while one byte going each way is flipped; its record must be exact."""
    proc, log = cluster.worker("w1", transport=transport, port=relay.port)
    cluster.wait_joined("w1", proc)
    for flips, direction in enumerate(("to_dispatcher", "to_worker"), 1):
        relay.flip_next(direction)  # the task's own frames are the next ones that way
        task_id = cluster.submit(f"sleep 0.3; echo {MARK}")
        record = cluster.wait_done(task_id, timeout=60)
        assert (record["status"], record["stdout"]) == ("completed", f"{MARK}\n")
        assert record["command"] == f"sleep 0.3; echo {MARK}"
        procs.wait_for(lambda n=flips: relay.flipped == n, what=f"flip {direction}")
    return log


def test_a_flipped_byte_drops_the_tls_connection_and_corrupts_nothing(cluster: Cluster) -> None:
    cluster.start()
    with relays.running(relays.TCPRelay(cluster.port)) as relay:
        log = flip_one_byte_each_way(cluster, relay, "tcp")
    text = cluster.log.read_text() + log.read_text()
    assert "TLS" in text, "the tampered record was detected by TLS"
    assert "left: " in cluster.log.read_text(), "the tampered connection was dropped"


def test_a_flipped_quic_datagram_is_discarded_and_corrupts_nothing(cluster: Cluster) -> None:
    """QUIC authenticates every datagram: a tampered one is dropped and sent again."""
    cluster.start()
    with relays.running(relays.UDPRelay(cluster.port)) as relay:
        flip_one_byte_each_way(cluster, relay, "quic")


def test_wrong_key_and_whitelist_are_refused_audited_and_the_worker_exits(
    cluster: Cluster,
) -> None:
    cluster.start("--whitelist", "good")
    wrong = cluster.tmp / "wrong-secret"
    wrong.write_text("this-is-not-the-cluster-key\n")
    wrong.chmod(0o600)
    intruder, intruder_log = cluster.worker("good", transport="tcp", secret_file=wrong)
    stranger, stranger_log = cluster.worker("stranger", transport="quic")
    assert intruder.wait(30) == 1 and stranger.wait(30) == 1
    assert "authentication failed" in intruder_log.read_text()
    assert "not in the dispatcher's whitelist" in stranger_log.read_text()
    good, _ = cluster.worker("good", transport="auto")
    cluster.wait_joined("good", good)
    rejected = [e for e in cluster.audit() if e["event_type"] == "worker_rejected"]
    reasons = {e["actor"]: e["details"]["reason"] for e in rejected}
    assert "authentication failed" in reasons["good"]
    assert "whitelist" in reasons["stranger"]
    assert all(e["severity"] == "warning" and e["source_ip"] == "127.0.0.1" for e in rejected)
    everything = (cluster.data / "logs" / "audit.log").read_text() + cluster.log.read_text()
    assert SECRET not in everything and "this-is-not-the-cluster-key" not in everything


def test_a_man_in_the_middle_with_its_own_certificate_is_refused(cluster: Cluster) -> None:
    """The attacker terminates TLS with its own certificate and relays every frame: the
    proofs are bound to the certificate each side saw, so both sides refuse."""
    cluster.start()
    seen: list[dict[str, Any]] = []
    identity = tls.load_or_create(cluster.tmp / "attacker-tls")

    async def forward(a: base.Connection, b: base.Connection) -> None:
        while (message := await a.recv()) is not None:
            seen.append(message)
            await b.send(message)

    async def handler(conn: base.Connection) -> None:
        upstream = await tcp.connect("127.0.0.1", cluster.port, timeout=5)
        try:
            await asyncio.wait(
                [
                    asyncio.ensure_future(forward(conn, upstream)),
                    asyncio.ensure_future(forward(upstream, conn)),
                ],
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            upstream.close()

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(tcp.serve("127.0.0.1", 0, handler, identity=identity))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        proc, log = cluster.worker("w1", transport="tcp", port=server.port)
        assert proc.wait(30) == 1
        assert "authentication failed" in log.read_text()
    finally:

        async def shutdown() -> None:
            server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert [m["type"] for m in seen][:3] == ["challenge", "hello", "reject"]
    assert not any(m["type"] == "assign" for m in seen)
    assert "w1" not in cluster.workers()
    rejected = [e for e in cluster.audit() if e["event_type"] == "worker_rejected"]
    assert rejected and "authentication failed" in rejected[-1]["details"]["reason"]


def test_secret_stays_out_of_worker_argv_and_environment_of_tasks(cluster: Cluster) -> None:
    cluster.start()
    proc, _ = cluster.worker("w1", transport="auto")
    cluster.wait_joined("w1", proc)
    record = cluster.wait_done(cluster.submit("env; cat /proc/$PPID/cmdline || true"))
    assert SECRET not in record["stdout"]
    with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:
        assert SECRET.encode() not in fh.read()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(20) == 0
