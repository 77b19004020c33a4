"""Simulated workers: asyncio clients that speak the real P2P protocol over real TCP and
execute nothing: an `assign` is answered at once with a completed `result`.

Run as `python -m bench.simworkers --port P --count N` with the cluster secret in
$OCTASKLY_SECRET_KEY. It prints JSON status lines on stdout (`connected` once all joined,
then every 10 ms: assigns, held, results, acks with a CLOCK_MONOTONIC time) and obeys
`release` (answer held and future assigns) and `stop` on stdin. Until `release`, assigns
are held unanswered, so the measurement starts with every worker connected.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import sys
import time
from typing import Any

from octaskly import __version__
from octaskly.domain import models
from octaskly.protocol import auth, messages
from octaskly.transport import tcp

STATUS_SECONDS = 0.01
RESOURCES = models.Resources(cpu_cores=4, memory_mb=8192)


@dataclasses.dataclass
class Counters:
    assigns: int = 0
    held: int = 0
    results: int = 0
    acks: int = 0
    heartbeats: int = 0


def result_frame(task_id: str, attempt: int) -> dict[str, Any]:
    """A completed run in no time, as a worker reports it."""
    return {
        "type": "result",
        "task_id": task_id,
        "attempt": attempt,
        "status": "completed",
        "exit_code": 0,
        "duration_ms": 0,
        "stdout": "",
        "stderr": "",
        "stdout_dropped": 0,
        "stderr_dropped": 0,
        "error": None,
    }


class SimWorker:
    def __init__(self, name: str, key: bytes, max_jobs: int, counters: Counters) -> None:
        self.name = name
        self._key = key
        self.max_jobs = max_jobs
        self.counters = counters
        self.running: dict[str, int] = {}
        self.held: list[tuple[str, int]] = []
        self.conn: tcp.TCPConnection | None = None

    async def connect(self, host: str, port: int) -> float:
        """Connect and pass the handshake like octaskly's worker; the keepalive interval."""
        conn = await tcp.connect(host, port, timeout=10)
        self.conn = conn
        challenge = await self._expect(messages.Challenge)
        nonce = auth.new_nonce()
        hello = messages.Hello(
            protocol=messages.PROTOCOL_VERSION,
            name=self.name,
            instance=secrets.token_hex(16),
            nonce=nonce,
            version=__version__,
            resources=RESOURCES,
            max_jobs=self.max_jobs,
            sandbox_level=models.SandboxLevel.BASIC,
            proof=auth.worker_proof(
                self._key,
                dispatcher_nonce=challenge.nonce,
                worker_nonce=nonce,
                name=self.name,
                binding=conn.binding,
            ),
        )
        await conn.send(messages.to_wire(hello))
        welcome = await self._expect(messages.Welcome)
        expected = auth.dispatcher_proof(
            self._key,
            dispatcher_nonce=challenge.nonce,
            worker_nonce=nonce,
            worker_id=welcome.worker_id,
            binding=conn.binding,
        )
        if not auth.verify(expected, welcome.proof):
            raise ConnectionError("the dispatcher could not prove it has the cluster key")
        return float(welcome.keepalive_interval)

    async def _expect(self, kind: type[Any]) -> Any:
        assert self.conn is not None
        raw = await asyncio.wait_for(self.conn.recv(), 10)
        if raw is None:
            raise ConnectionError("the dispatcher closed the connection in the handshake")
        message = messages.parse_dispatcher_message(raw)
        if not isinstance(message, kind):
            raise ConnectionError(f"expected {kind.__name__}, got {message}")
        return message

    def finish(self, task_id: str, attempt: int) -> None:
        assert self.conn is not None
        self.running.pop(task_id, None)
        self.conn.send_nowait(result_frame(task_id, attempt))
        self.counters.results += 1

    def release(self) -> None:
        held, self.held = self.held, []
        self.counters.held -= len(held)
        for task_id, attempt in held:
            self.finish(task_id, attempt)

    async def serve(self, released: asyncio.Event) -> None:
        """Answer assigns (once released), count acks; returns when the connection ends."""
        assert self.conn is not None
        while (raw := await self.conn.recv()) is not None:
            kind = raw.get("type")
            if kind == "assign":
                task = raw["task"]
                task_id, attempt = task["task_id"], int(task["attempt"])
                self.counters.assigns += 1
                self.running[task_id] = attempt
                if released.is_set():
                    self.finish(task_id, attempt)
                else:
                    self.held.append((task_id, attempt))
                    self.counters.held += 1
            elif kind == "result_ack":
                self.counters.acks += 1
            elif kind == "cancel":
                self.running.pop(raw["task_id"], None)

    async def heartbeat(self, interval: float) -> None:
        assert self.conn is not None
        while True:
            await asyncio.sleep(interval)
            running = [messages.RunRef(task_id=t, attempt=a) for t, a in self.running.items()]
            await self.conn.send(messages.to_wire(messages.Heartbeat(running=running)))
            self.counters.heartbeats += 1


def _emit(event: str, counters: Counters, **extra: Any) -> None:
    line = {"event": event, "t": time.monotonic(), **dataclasses.asdict(counters), **extra}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def _report(counters: Counters) -> None:
    while True:
        await asyncio.sleep(STATUS_SECONDS)
        _emit("status", counters)


async def _commands(workers: list[SimWorker], released: asyncio.Event) -> None:
    """`release` starts answering; `stop` or end of input ends the run."""
    while True:
        line = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if line == "release":
            released.set()
            for w in workers:
                w.release()
        elif line in ("stop", ""):
            return


async def _connect_all(
    args: argparse.Namespace, counters: Counters
) -> tuple[list[SimWorker], float]:
    key = auth.derive_auth_key(os.environ["OCTASKLY_SECRET_KEY"].encode())
    workers = [
        SimWorker(f"{args.prefix}-{i:04d}", key, args.max_jobs, counters) for i in range(args.count)
    ]
    gate = asyncio.Semaphore(32)

    async def one(w: SimWorker) -> float:
        async with gate:
            return await w.connect(args.host, args.port)

    intervals = await asyncio.gather(*(one(w) for w in workers))
    return workers, min(intervals)


async def _main(args: argparse.Namespace) -> None:
    messages.parse_worker_message(result_frame("x", 1))  # the hot-path frame is valid protocol
    counters = Counters()
    released = asyncio.Event()
    workers, interval = await _connect_all(args, counters)
    _emit("connected", counters, workers=len(workers), keepalive_interval=interval)
    side = [asyncio.create_task(_report(counters))]
    side += [asyncio.create_task(w.heartbeat(interval)) for w in workers]
    serving = [asyncio.create_task(w.serve(released)) for w in workers]
    commands = asyncio.create_task(_commands(workers, released))
    done, _ = await asyncio.wait([commands, *serving], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in done if t is not commands]
    for task in [*side, *serving, commands]:
        task.cancel()
    for w in workers:
        if w.conn is not None:
            w.conn.close()
    await asyncio.gather(*side, *serving, return_exceptions=True)
    _emit("final", counters, error=_failure(failed))


def _failure(failed: list[asyncio.Task[None]]) -> str | None:
    if not failed:
        return None
    exc = failed[0].exception() if not failed[0].cancelled() else None
    return f"a simulated worker's connection ended early: {exc!r}"


def main() -> None:
    parser = argparse.ArgumentParser(description="simulated octaskly workers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--max-jobs", type=int, default=4)
    parser.add_argument("--prefix", default="sim")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
