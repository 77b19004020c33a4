"""An in-process cluster on real sockets for integration tests: a dispatcher (real SQLite
file, real P2P listener: TLS over TCP and QUIC on one port, real aiohttp API on a free
port) and workers that run real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from octaskly.api import app as api_app
from octaskly.domain import models
from octaskly.services import dispatcher as dispatching
from octaskly.services import worker as working
from octaskly.store import base as store_base
from octaskly.store import postgres, sqlite
from octaskly.transport import p2p as p2p_transport
from octaskly.transport import tls
from tests import pg

SECRET = b"integration-test-secret-key"


@dataclasses.dataclass
class Cluster:
    tmp: Path
    dispatcher: dispatching.Dispatcher
    p2p: p2p_transport.Listener
    runner: web.AppRunner
    base_url: str
    http: aiohttp.ClientSession
    workers: dict[str, tuple[working.Worker, asyncio.Task[None]]] = dataclasses.field(
        default_factory=dict
    )

    async def add_worker(
        self,
        name: str,
        *,
        max_jobs: int = 2,
        cpu: float = 4,
        mem: int = 4096,
        gpu: bool = False,
        labels: dict[str, str] | None = None,
        secret: bytes = SECRET,
        wait: bool = True,
        transport: p2p_transport.Transport = "auto",
        sandbox_level: models.SandboxLevel = models.SandboxLevel.BASIC,
        workdir_root: Path | None = None,
    ) -> working.Worker:
        options = working.Options(
            name=name,
            dispatcher_addrs=(("127.0.0.1", self.p2p.port),),
            secret_key=secret,
            resources=models.Resources(cpu_cores=cpu, memory_mb=mem, gpu=gpu, labels=labels or {}),
            max_jobs=max_jobs,
            sandbox_level=sandbox_level,
            workdir_root=workdir_root or self.tmp,
            connect_timeout=5.0,
            reconnect_max_delay=0.5,
            transport=transport,
        )
        worker = working.Worker(options=options)
        task = asyncio.create_task(worker.run(), name=f"worker-{name}")
        self.workers[name] = (worker, task)
        if wait:
            await until(lambda: name in self.dispatcher.peers.sessions, what=f"{name} joins")
        return worker

    async def stop_worker(self, name: str) -> None:
        _worker, task = self.workers.pop(name)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def api(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.base_url + path, **kwargs) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def submit(self, **spec: Any) -> str:
        status, body = await self.api("POST", "/api/v1/tasks", json=spec)
        assert status == 201, body
        return str(body["id"])

    async def task(self, task_id: str) -> dict[str, Any]:
        status, body = await self.api("GET", f"/api/v1/tasks/{task_id}")
        assert status == 200, body
        return dict(body)

    async def wait_status(
        self, task_id: str, *statuses: str, timeout: float = 30
    ) -> dict[str, Any]:
        """Await a task's state change through the dispatcher's watchers (no polling sleeps)."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.dispatcher.watchers.event(task_id)
            record = await self.task(task_id)
            if record["status"] in statuses:
                return record
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"task {task_id} is {record['status']}, wanted {statuses}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], *, timeout: float = 30, what: str = "condition"
) -> None:
    """Poll a condition with a deadline (for state that has no event to await)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_cluster(
    tmp: Path, *, require_auth: bool = False, **option_overrides: Any
) -> AsyncIterator[Cluster]:
    """Auth is off unless asked for: the API's own tests check it; the rest act as admin."""
    options = dispatching.Options(
        secret_key=SECRET,
        audit_path=tmp / "logs" / "audit.log",
        **{"keepalive_interval": 0.2, "connection_timeout": 2.0, **option_overrides},
    )
    store: store_base.Store = (
        postgres.PostgresStore(pg.database_for(str(tmp)), owner="test")
        if pg.STORE == "postgresql"
        else sqlite.SQLiteStore(tmp / "octaskly.db")
    )
    dispatcher = dispatching.Dispatcher(options=options, store=store)
    await dispatcher.start()
    identity = tls.load_or_create(tmp / "tls")
    p2p = await p2p_transport.listen("127.0.0.1", 0, dispatcher.peers.handle, identity=identity)
    runner = web.AppRunner(api_app.build(dispatcher, require_auth=require_auth), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    http = aiohttp.ClientSession()
    cluster = Cluster(tmp, dispatcher, p2p, runner, f"http://127.0.0.1:{port}", http)
    try:
        yield cluster
    finally:
        for name in list(cluster.workers):
            await cluster.stop_worker(name)
        await http.close()
        p2p.close()
        await runner.cleanup()
        # A handler draining an unread request body (aiohttp's lingering close, e.g. after a
        # 413 refused from the Content-Length alone) outlives cleanup() once its client is
        # gone, for up to 10 s: end it with the server.
        for task in asyncio.all_tasks():
            if task.get_coro().__qualname__ == "RequestHandler.start":  # type: ignore[union-attr]
                task.cancel()
        await dispatcher.stop()
        await p2p.wait_closed()
