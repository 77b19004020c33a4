"""High availability in one process, on real sockets and SQLite files: term fencing, and
hostile frames on the replication link from either side. (Failover, switchover and
rejoining with real processes and kill -9 are in tests/e2e/test_ha.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from octaskly import testing
from octaskly.cli.client import Client
from octaskly.domain import models
from octaskly.protocol import auth, messages
from octaskly.services import dispatcher as dispatching
from octaskly.services import ha
from octaskly.services import worker as working
from octaskly.store import sqlite
from octaskly.transport import base as transport
from octaskly.transport import p2p, tls
from tests.cluster import SECRET, running_cluster, until

KEY = auth.derive_auth_key(SECRET)


async def test_a_primary_that_hears_of_a_newer_term_steps_down(tmp_path: Path) -> None:
    """A worker that has worked for term 5 reaches a primary of term 1 (an old primary
    back from the dead): the primary steps down to follow term 5's primary, answers 503,
    and the worker is not admitted."""
    async with running_cluster(tmp_path) as cluster:
        options = working.Options(
            name="veteran",
            dispatcher_addrs=(("127.0.0.1", cluster.p2p.port),),
            secret_key=SECRET,
            resources=models.Resources(cpu_cores=1, memory_mb=512),
            max_jobs=1,
            workdir_root=tmp_path,
            connect_timeout=2.0,
            reconnect_max_delay=0.5,
            transport="tcp",
        )
        worker = working.Worker(options=options)
        worker.term, worker.primary = 5, f"127.0.0.1:{testing.free_port()}"
        job = asyncio.create_task(worker.run())
        try:
            await until(lambda: bool(cluster.dispatcher.ha.events), what="the step down")
            assert cluster.dispatcher.role == "standby"
            assert "veteran" not in cluster.dispatcher.peers.sessions
            status, body = await cluster.api("POST", "/api/v1/tasks", json={"command": "true"})
            assert status == 503 and "standby" in body["error"]
            status, ready = await cluster.api("GET", "/ready")
            assert status == 503 and ready["role"] == "standby" and ready["term"] == 5
            # the dashboard still loads there, and tells its user what the API says
            async with cluster.http.get(f"{cluster.base_url}/ui/") as resp:
                assert resp.status == 200 and resp.headers["X-Octaskly-Role"] == "standby"
            status, body = await cluster.api("GET", "/api/v1/whoami")
            assert status == 503 and "the primary is at P2P" in body["error"]
            ha_status = cluster.dispatcher.ha.status()
            assert ha_status["events"][-1]["event"] == "demoted"
            assert ha_status["primary"] == worker.primary
            assert "ha_demoted" in (tmp_path / "logs" / "audit.log").read_text()
        finally:
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job


async def _handshake_as_standby(port: int, *, db_id: str = "0" * 32, lsn: int = 0) -> Any:
    conn = await p2p.dial("127.0.0.1", port, transport="tcp", timeout=5)
    challenge = messages.parse_dispatcher_message(await conn.recv())
    nonce = auth.new_nonce()
    hello = messages.ReplicaHello(
        protocol=messages.PROTOCOL_VERSION,
        name="prober",
        nonce=nonce,
        proof=auth.worker_proof(
            KEY,
            dispatcher_nonce=challenge.nonce,
            worker_nonce=nonce,
            name="prober",
            binding=conn.binding,
        ),
        version="test",
        position=messages.PositionModel(db_id=db_id, term=1, lsn=lsn),
        port=1,
    )
    await conn.send(messages.to_wire(hello))
    return conn


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "replica_ack", "lsn": 10**12},  # acknowledges what was never sent
        {"type": "replica_ack", "lsn": -1},
        {"type": "changes", "changes": [], "lsn": 0, "synced": True},  # a primary's frame
        {"type": "witness", "reachable": True, "silent_for": 0},
        {"type": "nonsense"},
    ],
)
async def test_a_standby_sending_a_bad_frame_is_dropped_and_the_primary_goes_on(
    tmp_path: Path, frame: dict[str, Any]
) -> None:
    async with running_cluster(tmp_path) as cluster:
        await cluster.submit(command="true")
        conn = await _handshake_as_standby(cluster.p2p.port)
        try:
            welcome = messages.parse_dispatcher_message(await conn.recv())
            assert isinstance(welcome, messages.ReplicaWelcome) and welcome.mode == "snapshot"
            while True:  # the snapshot, then the stream
                message = messages.parse_dispatcher_message(await conn.recv())
                if isinstance(message, messages.Snapshot) and message.done:
                    break
            source = cluster.dispatcher.ha.source
            assert source is not None
            await until(lambda: source.link is not None, what="the link")
            await conn.send(frame)
            with contextlib.suppress(ConnectionError):
                while await asyncio.wait_for(conn.recv(), 5) is not None:
                    pass
        finally:
            conn.close()
        await until(lambda: source.link is None, what="the bad standby dropped")
        assert source.status()["state"] == "no standby"
        assert await cluster.submit(command="true")  # the primary still serves


async def test_a_standby_without_the_key_is_refused(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as cluster:
        conn = await p2p.dial("127.0.0.1", cluster.p2p.port, transport="tcp", timeout=5)
        try:
            challenge = messages.parse_dispatcher_message(await conn.recv())
            assert isinstance(challenge, messages.Challenge)
            wrong = auth.derive_auth_key(b"some other cluster")
            nonce = auth.new_nonce()
            await conn.send(
                messages.to_wire(
                    messages.ReplicaHello(
                        protocol=messages.PROTOCOL_VERSION,
                        name="intruder",
                        nonce=nonce,
                        proof=auth.worker_proof(
                            wrong,
                            dispatcher_nonce=challenge.nonce,
                            worker_nonce=nonce,
                            name="intruder",
                            binding=conn.binding,
                        ),
                        version="x",
                        position=messages.PositionModel(db_id="x", term=1, lsn=0),
                        port=1,
                    )
                )
            )
            reply = messages.parse_dispatcher_message(await conn.recv())
            assert isinstance(reply, messages.Reject) and "authentication failed" in reply.reason
        finally:
            conn.close()
        assert cluster.dispatcher.ha.source is not None
        assert cluster.dispatcher.ha.source.link is None


# -- a hostile primary ---------------------------------------------------------------------------
class FakePrimary:
    """Answers a standby's handshake correctly, then sends `frames`."""

    def __init__(self, frames: list[dict[str, Any]], *, mode: str = "stream") -> None:
        self.frames = frames
        self.mode = mode
        self.connections = 0

    async def handle(self, conn: transport.Connection) -> None:
        self.connections += 1
        nonce = auth.new_nonce()
        await conn.send(
            messages.to_wire(messages.Challenge(protocol=messages.PROTOCOL_VERSION, nonce=nonce))
        )
        hello = messages.parse_worker_message(await conn.recv())
        assert isinstance(hello, messages.ReplicaHello)
        await conn.send(
            messages.to_wire(
                messages.ReplicaWelcome(
                    proof=auth.dispatcher_proof(
                        KEY,
                        dispatcher_nonce=nonce,
                        worker_nonce=hello.nonce,
                        worker_id=hello.name,
                        binding=conn.binding,
                    ),
                    term=1,
                    history=[(1, 0)],
                    mode=self.mode,  # type: ignore[arg-type]
                    sync=False,
                )
            )
        )
        with contextlib.suppress(ConnectionError):
            await conn.send_many(self.frames)
            while await conn.recv() is not None:
                pass


@contextlib.asynccontextmanager
async def standby_of(tmp_path: Path, fake: FakePrimary) -> AsyncIterator[dispatching.Dispatcher]:
    listener = await p2p.listen(
        "127.0.0.1", 0, fake.handle, identity=tls.load_or_create(tmp_path / "fake-tls")
    )
    options = dispatching.Options(
        secret_key=SECRET,
        ha=ha.Options(
            role="standby",
            primary_addr=f"127.0.0.1:{listener.port}",
            connect_timeout=2.0,
            name="victim",
        ),
    )
    store = sqlite.SQLiteStore(tmp_path / "standby" / "octaskly.db")
    dispatcher = dispatching.Dispatcher(options=options, store=store)
    dispatcher.ha.p2p_port = testing.free_port()
    await dispatcher.start()
    try:
        yield dispatcher
    finally:
        await dispatcher.stop()
        listener.close()
        await listener.wait_closed()


def _change(lsn: int, tasks: list[list[Any]] | None = None) -> dict[str, Any]:
    return {"lsn": lsn, "term": 1, "at": 0.0, "tasks": tasks or [], "tokens": []}


@pytest.mark.parametrize(
    ("frames", "mode"),
    [
        ([{"type": "changes", "changes": [_change(5)], "lsn": 5, "synced": True}], "stream"),
        (
            [{"type": "changes", "changes": [_change(1, [[1, 2, 3]])], "lsn": 1, "synced": True}],
            "stream",
        ),
        ([{"type": "changes", "changes": [{"lsn": "one"}], "lsn": 1, "synced": True}], "stream"),
        (
            [
                {
                    "type": "changes",
                    "changes": [{**_change(1), "deleted": [{"id": 1}]}],
                    "lsn": 1,
                    "synced": True,
                }
            ],
            "stream",
        ),
        ([{"type": "snapshot", "data": "%%% not base64 %%%", "done": True}], "snapshot"),
        ([{"type": "snapshot", "data": "bm90IGEgZGF0YWJhc2U=", "done": True}], "snapshot"),
        ([{"type": "assign", "task": {}}], "stream"),
    ],
    ids=[
        "gap",
        "row-width",
        "bad-change",
        "bad-deleted",
        "bad-base64",
        "not-a-database",
        "worker-frame",
    ],
)
async def test_a_hostile_primary_cannot_corrupt_the_standby(
    tmp_path: Path, frames: list[dict[str, Any]], mode: str
) -> None:
    fake = FakePrimary(frames, mode=mode)
    async with standby_of(tmp_path, fake) as standby:
        store = standby.store
        assert isinstance(store, sqlite.SQLiteStore)
        before = store.position
        await until(lambda: fake.connections >= 2, what="the standby to drop and retry")
        assert standby.role == "standby"
        current = standby.store
        assert isinstance(current, sqlite.SQLiteStore)
        assert current.position == before  # nothing applied, nothing replaced
        assert await current.count_by_status() == dict.fromkeys(models.TaskStatus, 0)
        assert not list((tmp_path / "standby").glob("*.replaced-*"))


# -- clients ------------------------------------------------------------------------------------
class _Node(http.server.BaseHTTPRequestHandler):
    role = "primary"
    term = 1
    status = 200

    def do_GET(self) -> None:
        body = json.dumps({"from": self.server.server_port}).encode()  # type: ignore[attr-defined]
        node = self.server.node  # type: ignore[attr-defined]
        self.send_response(node["status"])
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Octaskly-Role", node["role"])
        self.send_header("X-Octaskly-Term", str(node["term"]))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def fake_nodes(count: int) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    servers = []
    for _ in range(count):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Node)
        server.node = {"role": "primary", "term": 1, "status": 200}  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        yield [(s.server_port, s.node) for s in servers]  # type: ignore[attr-defined]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def test_the_client_follows_the_primary_and_refuses_a_lower_term() -> None:
    with fake_nodes(2) as [(port_a, a), (port_b, b)]:
        client = Client(f"http://127.0.0.1:{port_a},http://127.0.0.1:{port_b}", failover_wait=3)
        b.update(role="standby", status=503)
        assert client.call("GET", "/api/v1/stats")["from"] == port_a
        # failover: b is primary of term 2; a, deposed, still answers as primary of term 1
        b.update(role="primary", status=200, term=2)
        a.update(role="standby", status=503)
        assert client.call("GET", "/api/v1/stats")["from"] == port_b
        a.update(role="primary", status=200)  # a split brain: a lower term is not believed
        assert client.call("GET", "/api/v1/stats")["from"] == port_b
        client._current = 0  # even when asked first
        assert client.call("GET", "/api/v1/stats")["from"] == port_b
        assert client.term == 2


async def test_a_witness_target_without_the_key_cannot_claim_a_newer_term(tmp_path: Path) -> None:
    """A fake dispatcher (no cluster key) answers a worker's witness session as 'primary
    of term 9': the worker checks the proof and does not believe it."""
    hellos: list[messages.Hello] = []

    async def impostor(conn: transport.Connection) -> None:
        await conn.send(
            messages.to_wire(
                messages.Challenge(protocol=messages.PROTOCOL_VERSION, nonce=auth.new_nonce())
            )
        )
        hello = messages.parse_worker_message(await conn.recv())
        assert isinstance(hello, messages.Hello)
        hellos.append(hello)
        forged = messages.Welcome(
            worker_id=hello.name, proof="ab" * 32, keepalive_interval=1.0, term=9, role="primary"
        )
        await conn.send(messages.to_wire(forged))
        with contextlib.suppress(ConnectionError):
            while await conn.recv() is not None:
                pass

    fake = await p2p.listen(
        "127.0.0.1", 0, impostor, identity=tls.load_or_create(tmp_path / "fake-tls")
    )
    async with running_cluster(tmp_path) as cluster:
        options = working.Options(
            name="careful",
            dispatcher_addrs=(("127.0.0.1", cluster.p2p.port), ("127.0.0.1", fake.port)),
            secret_key=SECRET,
            resources=models.Resources(cpu_cores=1, memory_mb=512),
            max_jobs=1,
            workdir_root=tmp_path,
            connect_timeout=2.0,
            reconnect_max_delay=0.3,
            transport="tcp",
        )
        worker = working.Worker(options=options)
        job = asyncio.create_task(worker.run())
        try:
            await until(lambda: "careful" in cluster.dispatcher.peers.sessions, what="join")
            await until(
                lambda: sum(h.purpose == "witness" for h in hellos) >= 2,
                what="two witness sessions with the impostor",
            )
            assert worker.term == 1 and worker.primary == f"127.0.0.1:{cluster.p2p.port}"
            assert "careful" in cluster.dispatcher.peers.sessions
        finally:
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
    fake.close()
    await fake.wait_closed()
