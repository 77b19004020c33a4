"""The dispatcher's side of the P2P protocol, driven by a hand-rolled worker over a real
socket: admission, leases (stale results), re-attachment, heartbeats and garbage."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import struct
from pathlib import Path
from typing import Any

import pytest

from octaskly.domain import models
from octaskly.protocol import auth, framing, messages
from octaskly.services import worker as working
from octaskly.transport import tcp, tls
from tests.cluster import SECRET, Cluster, running_cluster, until


class RawWorker:
    """Speaks the protocol by hand so a test controls every frame."""

    def __init__(
        self, cluster: Cluster, name: str, *, instance: str | None = None, secret: bytes = SECRET
    ) -> None:
        self.cluster, self.name = cluster, name
        self.instance = instance or secrets.token_hex(16)
        self.key = auth.derive_auth_key(secret)
        self.conn: tcp.TCPConnection | None = None

    async def connect(
        self,
        *,
        running: list[tuple[str, int]] = (),  # type: ignore[assignment]
        finished: list[tuple[str, int]] = (),  # type: ignore[assignment]
        max_jobs: int = 1,
    ) -> dict[str, Any]:
        self.conn = await tcp.connect("127.0.0.1", self.cluster.p2p.port, timeout=5)
        challenge = await self.recv()
        nonce = auth.new_nonce()
        await self.send(
            {
                "type": "hello",
                "protocol": messages.PROTOCOL_VERSION,
                "name": self.name,
                "instance": self.instance,
                "nonce": nonce,
                "version": "test",
                "max_jobs": max_jobs,
                "sandbox_level": "none",
                "resources": {"cpu_cores": 1, "memory_mb": 1024},
                "proof": auth.worker_proof(
                    self.key,
                    dispatcher_nonce=challenge["nonce"],
                    worker_nonce=nonce,
                    name=self.name,
                    binding=self.conn.binding,
                ),
                "running": [{"task_id": t, "attempt": a} for t, a in running],
                "finished": [{"task_id": t, "attempt": a} for t, a in finished],
            }
        )
        return await self.recv()

    async def send(self, message: dict[str, Any]) -> None:
        assert self.conn is not None
        await self.conn.send(message)

    async def recv(self) -> dict[str, Any]:
        assert self.conn is not None
        message = await asyncio.wait_for(self.conn.recv(), 10)
        assert message is not None, "dispatcher closed the connection"
        return message

    async def recv_type(self, kind: str) -> dict[str, Any]:
        while True:
            message = await self.recv()
            if message["type"] == kind:
                return message

    async def result(self, task_id: str, attempt: int, stdout: str) -> dict[str, Any]:
        await self.send(
            {
                "type": "result",
                "task_id": task_id,
                "attempt": attempt,
                "status": "completed",
                "exit_code": 0,
                "duration_ms": 5,
                "stdout": base64.b64encode(stdout.encode()).decode(),  # protocol 5: bytes
            }
        )
        return await self.recv_type("result_ack")

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            await self.conn.wait_closed()
            self.conn = None


@pytest.fixture
async def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with running_cluster(tmp_path, whitelist=frozenset({"a", "b", "w1", "ok"})) as c:
        yield c


async def _gone(cluster: Cluster, name: str) -> None:
    await until(lambda: name not in cluster.dispatcher.peers.sessions, what=f"{name} gone")


async def test_stale_result_never_overwrites_the_newer_run(cluster: Cluster) -> None:
    task_id = await cluster.submit(command="work")
    a = RawWorker(cluster, "a")
    assert (await a.connect())["type"] == "welcome"
    assign = await a.recv_type("assign")
    assert assign["task"]["attempt"] == 1
    await a.close()  # a's connection drops: the task is re-queued
    await _gone(cluster, "a")
    b = RawWorker(cluster, "b")
    await b.connect()
    assert (await b.recv_type("assign"))["task"]["attempt"] == 2
    a2 = RawWorker(cluster, "a")  # a comes back (a new process) with its old result
    await a2.connect()
    await a2.result(task_id, 1, "stale output")
    record = await cluster.wait_status(task_id, "running")
    assert record["worker_id"] == "b" and record["attempts"] == 2
    await b.result(task_id, 2, "fresh output")
    record = await cluster.wait_status(task_id, "completed")
    assert record["stdout"] == "fresh output" and record["attempts"] == 2
    for w in (a2, b):
        await w.close()


async def test_result_of_requeued_but_not_restarted_run_is_kept(cluster: Cluster) -> None:
    task_id = await cluster.submit(command="work")
    a = RawWorker(cluster, "a")
    await a.connect()
    await a.recv_type("assign")
    await a.close()
    await _gone(cluster, "a")
    await cluster.wait_status(task_id, "queued")
    again = RawWorker(cluster, "a", instance=a.instance)
    welcome = await again.connect(finished=[(task_id, 1)])
    assert welcome["abort"] == []
    await again.result(task_id, 1, "done while away")
    record = await cluster.wait_status(task_id, "completed")
    assert record["attempts"] == 1 and record["stdout"] == "done while away"
    await again.close()


async def test_reconnecting_worker_reattaches_its_running_task(cluster: Cluster) -> None:
    task_id = await cluster.submit(command="work")
    a = RawWorker(cluster, "a")
    await a.connect()
    await a.recv_type("assign")
    await a.close()
    await _gone(cluster, "a")
    again = RawWorker(cluster, "a", instance=a.instance)
    welcome = await again.connect(running=[(task_id, 1)])
    assert welcome["abort"] == []
    record = await cluster.wait_status(task_id, "running")
    assert record["worker_id"] == "a" and record["attempts"] == 1
    await again.result(task_id, 1, "ok")
    await cluster.wait_status(task_id, "completed")
    await again.close()


async def test_cancel_while_worker_away_is_applied_when_it_returns(cluster: Cluster) -> None:
    task_id = await cluster.submit(command="work")
    a = RawWorker(cluster, "a")
    await a.connect()
    await a.recv_type("assign")
    await a.close()
    await _gone(cluster, "a")
    status, _ = await cluster.api("DELETE", f"/api/v1/tasks/{task_id}")
    assert status == 200
    again = RawWorker(cluster, "a", instance=a.instance)
    welcome = await again.connect(running=[(task_id, 1)])
    assert welcome["abort"] == [{"task_id": task_id, "attempt": 1}]
    assert (await cluster.task(task_id))["status"] == "cancelled"
    await again.close()


async def test_cancel_of_a_running_task_reaches_the_worker(cluster: Cluster) -> None:
    task_id = await cluster.submit(command="work")
    a = RawWorker(cluster, "a")
    await a.connect()
    await a.recv_type("assign")
    await cluster.wait_status(task_id, "running")
    await cluster.api("DELETE", f"/api/v1/tasks/{task_id}")
    assert await a.recv_type("cancel") == {"type": "cancel", "task_id": task_id, "attempt": 1}
    await a.close()


async def test_silent_worker_is_dropped_and_its_task_requeued(cluster: Cluster) -> None:
    task_id = await cluster.submit(command="work")
    a = RawWorker(cluster, "a")
    await a.connect()
    await a.recv_type("assign")
    await cluster.wait_status(task_id, "running")
    # no heartbeats from here on: after connection_timeout (2 s here) the session ends
    record = await cluster.wait_status(task_id, "queued", timeout=15)
    assert record["attempts"] == 1
    assert "a" not in cluster.dispatcher.peers.sessions
    await a.close()


async def test_heartbeats_keep_a_worker(cluster: Cluster) -> None:
    a = RawWorker(cluster, "a")
    await a.connect()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0  # longer than connection_timeout
    while loop.time() < deadline:
        await a.send({"type": "heartbeat", "running": []})
        await asyncio.sleep(0.2)  # the worker's heartbeat interval, not a wait for state
    assert "a" in cluster.dispatcher.peers.sessions
    await a.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x05hello",
        struct.pack(">I", 1 << 31),
        framing.encode({"type": "assign"}),
        framing.encode(
            {
                "type": "result",
                "task_id": "x",
                "attempt": -1,
                "status": "completed",
                "duration_ms": 0,
            }
        ),
    ],
)
async def test_garbage_from_a_worker_drops_only_that_worker(
    cluster: Cluster, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    await cluster.add_worker("w1")
    a = RawWorker(cluster, "a")
    await a.connect()
    assert a.conn is not None
    with caplog.at_level(logging.WARNING):
        a.conn._writer.write(garbage)  # raw bytes: a broken or hostile peer
        await _gone(cluster, "a")
    assert any("a" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    task_id = await cluster.submit(command="echo still fine")
    assert (await cluster.wait_status(task_id, "completed"))["stdout"] == "still fine\n"
    await a.close()


@pytest.mark.parametrize(
    "first_frame",
    [
        framing.encode({"type": "heartbeat", "running": []}),
        b"GET / HTTP/1.1\r\n\r\n",
        framing.encode({"type": "hello", "protocol": messages.PROTOCOL_VERSION}),
    ],
)
async def test_handshake_violations_are_refused(cluster: Cluster, first_frame: bytes) -> None:
    conn = await tcp.connect("127.0.0.1", cluster.p2p.port, timeout=5)
    assert (await conn.recv() or {})["type"] == "challenge"
    conn._writer.write(first_frame)
    assert await asyncio.wait_for(conn.recv(), 10) is None  # closed by the dispatcher
    assert cluster.dispatcher.peers.sessions == {}
    conn.close()
    await conn.wait_closed()


async def test_wrong_key_whitelist_and_duplicate_names(cluster: Cluster) -> None:
    wrong_key = RawWorker(cluster, "ok", secret=b"wrong-secret-wrong")
    stranger = RawWorker(cluster, "stranger")
    first, twin = RawWorker(cluster, "ok"), RawWorker(cluster, "ok")
    try:
        refused = await wrong_key.connect()
        assert refused["type"] == "reject" and "secret key" in refused["reason"]
        refused = await stranger.connect()
        assert refused["type"] == "reject" and "whitelist" in refused["reason"]
        assert (await first.connect())["type"] == "welcome"
        refused = await twin.connect()
        assert refused["type"] == "reject" and "already connected" in refused["reason"]
        assert cluster.dispatcher.peers.sessions["ok"].hello.instance == first.instance
    finally:
        for w in (wrong_key, stranger, first, twin):
            await w.close()


async def test_worker_refuses_a_dispatcher_without_the_key(tmp_path: Path) -> None:
    """A fake dispatcher that does not know the key cannot take a worker over."""

    async def impostor(conn: Any) -> None:
        await conn.send(
            {"type": "challenge", "protocol": messages.PROTOCOL_VERSION, "nonce": auth.new_nonce()}
        )
        await conn.recv()
        await conn.send(
            {
                "type": "welcome",
                "worker_id": "w",
                "proof": "ab" * 32,
                "keepalive_interval": 1.0,
                "abort": [],
            }
        )
        await conn.recv()

    server = await tcp.serve(
        "127.0.0.1", 0, impostor, identity=tls.load_or_create(tmp_path / "tls")
    )
    options = working.Options(
        name="w",
        dispatcher_addrs=(("127.0.0.1", server.port),),
        secret_key=SECRET,
        resources=models.Resources(cpu_cores=1, memory_mb=512),
        max_jobs=1,
        workdir_root=tmp_path,
    )
    try:
        with pytest.raises(working.FatalWorkerError, match="could not prove"):
            await asyncio.wait_for(working.Worker(options=options).run(), 10)
    finally:
        server.close()
        await server.wait_closed()
