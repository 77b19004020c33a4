"""Byte-level relays between a worker and a dispatcher, run on their own event loop in a
thread: they record everything that crosses (to prove nothing is in clear text) and can
flip one byte (to prove tampering is caught). They see exactly what an attacker on the
path would see."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Collection, Iterator
from typing import Any

import psutil


class Relay:
    """Base: a loop in a thread, a capture buffer and a one-shot byte flip."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.captured = bytearray()
        self.flipped = 0
        self._flip_next = False
        self._flip_direction = "to_dispatcher"
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def flip_next(self, direction: str = "to_dispatcher") -> None:
        """Flip one byte in the middle of the next chunk going that way."""
        with self._lock:
            self._flip_direction, self._flip_next = direction, True

    def _tamper(self, data: bytes, direction: str) -> bytes:
        with self._lock:
            self.captured += data
            if not (self._flip_next and direction == self._flip_direction and len(data) > 8):
                return data
            self._flip_next = False
            self.flipped += 1
        middle = len(data) // 2
        return data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1 :]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("relay did not start")

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        await self._stop()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


class TCPRelay(Relay):
    async def _start(self) -> None:
        self._conns: set[asyncio.StreamWriter] = set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._conns |= {writer, up_w}

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, direction: str) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await r.read(65536):
                    w.write(self._tamper(data, direction))
                    await w.drain()
            w.close()

        await asyncio.gather(pump(reader, up_w, "to_dispatcher"), pump(up_r, writer, "to_worker"))

    async def _stop(self) -> None:
        self._server.close()
        for w in self._conns:
            w.close()


class UDPRelay(Relay):
    """One worker's datagrams to the dispatcher's UDP port and back."""

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        relay = self
        self._client: Any = None

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                relay._client = addr
                relay._back.sendto(relay._tamper(data, "to_dispatcher"))

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if relay._client is not None:
                    relay._front.sendto(relay._tamper(data, "to_worker"), relay._client)

        self._front, _ = await loop.create_datagram_endpoint(Front, local_addr=("127.0.0.1", 0))
        self._back, _ = await loop.create_datagram_endpoint(
            Back, remote_addr=("127.0.0.1", self.target_port)
        )
        self.port = self._front.get_extra_info("sockname")[1]

    async def _stop(self) -> None:
        self._front.close()
        self._back.close()


class UDPBlackHole(Relay):
    """A UDP port that swallows every datagram: what a firewall dropping UDP looks like."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.received = 0

    async def _start(self) -> None:
        hole = self

        class Swallow(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                hole.received += 1

        self._sock, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Swallow, local_addr=("127.0.0.1", self.target_port)
        )
        self.port = self.target_port

    async def _stop(self) -> None:
        self._sock.close()


@contextlib.contextmanager
def running(relay: Relay) -> Iterator[Relay]:
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


DIRECTIONS = ("to_dispatcher", "to_worker")
"""The ways bytes cross a relay: towards its target (the dispatcher behind it), and back
towards whoever connected to it."""


@dataclasses.dataclass(eq=False)
class _Link:
    """One connection through a PartitionRelay (its client side, then its target side)."""

    client_port: int
    writers: list[asyncio.StreamWriter]
    cut: bool = False
    """The current cut applies to it."""
    hit: bool = False
    """A cut applied to it since the last heal (heal closes it)."""


class PartitionRelay(TCPRelay):
    """A TCP relay that can be cut like a network link: while cut, bytes vanish and
    connections hang (no FIN, no RST), as with a pulled cable. A cut can go one way only
    (`direction`: "to_dispatcher", towards the relay's target, or "to_worker", back to the
    peer that connected; "both" by default), and can spare every connection but those of
    some client processes (`clients`: their pids)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.dropped = dict.fromkeys(DIRECTIONS, 0)
        """Bytes that vanished, by direction."""
        self.links_cut = 0
        """Connections a cut applied to (open at the cut, or opened during it)."""
        self._ways: frozenset[str] = frozenset()
        self._clients: frozenset[int] | None = None
        self._links: set[_Link] = set()

    @property
    def is_cut(self) -> bool:
        return bool(self._ways)

    def cut(self, direction: str = "both", *, clients: Collection[int] | None = None) -> None:
        """From now on bytes going `direction` vanish (on the connections of the processes
        `clients` only, when given), and so does a close going that way."""
        ways = frozenset(DIRECTIONS) if direction == "both" else frozenset({direction})
        if not ways <= frozenset(DIRECTIONS):
            raise ValueError(f"direction must be one of {DIRECTIONS} or 'both': {direction!r}")
        pids = None if clients is None else frozenset(clients)
        asyncio.run_coroutine_threadsafe(self._cut(ways, pids), self._loop).result(10)

    def upstream_ports(self) -> set[int]:
        """The local ports of this relay's open connections to its target (what the
        target sees as their peers' ports)."""

        async def ports() -> set[int]:
            ups = [link.writers[1] for link in self._links if len(link.writers) > 1]
            return {w.get_extra_info("sockname")[1] for w in ups if not w.is_closing()}

        return asyncio.run_coroutine_threadsafe(ports(), self._loop).result(10)

    def heal(self) -> None:
        """Forward again; connections that lost bytes while cut are closed (as TCP would
        after its retransmissions failed), so both ends reconnect."""
        asyncio.run_coroutine_threadsafe(self._heal(), self._loop).result(10)

    async def _cut(self, ways: frozenset[str], clients: frozenset[int] | None) -> None:
        ports = await self._ports_of(clients)
        self._ways, self._clients = ways, clients
        for link in self._links:
            self._apply(link, ports)

    async def _heal(self) -> None:
        self._ways, self._clients = frozenset(), None
        for link in [link for link in self._links if link.hit]:
            self._links.discard(link)
            for w in link.writers:
                w.close()
        for link in self._links:
            link.cut = False

    def _apply(self, link: _Link, ports: set[int] | None) -> None:
        link.cut = ports is None or link.client_port in ports
        if link.cut:
            link.hit = True
            self.links_cut += 1

    async def _ports_of(self, clients: frozenset[int] | None) -> set[int] | None:
        """The local ports of the connections `clients` have to this relay (None: all)."""
        if clients is None:
            return None
        return await asyncio.to_thread(_client_ports, self.port, clients)

    def _blocked(self, link: _Link, direction: str) -> bool:
        return link.cut and direction in self._ways

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer.get_extra_info("peername")[1], [writer])
        self._links.add(link)
        self._conns.add(writer)
        try:
            if self._ways:
                self._apply(link, await self._ports_of(self._clients))
            if self._blocked(link, "to_dispatcher"):
                # a new connection into the void: accepted, then nothing reaches the target
                with contextlib.suppress(ConnectionError, OSError):
                    while data := await reader.read(65536):
                        self.dropped["to_dispatcher"] += len(data)
                return
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.close()
                return
            link.writers.append(up_w)
            self._conns.add(up_w)
            await asyncio.gather(
                self._pump(link, reader, up_w, "to_dispatcher"),
                self._pump(link, up_r, writer, "to_worker"),
            )
        finally:
            self._links.discard(link)

    async def _pump(
        self,
        link: _Link,
        r: asyncio.StreamReader,
        w: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await r.read(65536):
                if self._blocked(link, direction):
                    self.dropped[direction] += len(data)
                    continue
                w.write(data)
                await w.drain()
        if not self._blocked(link, direction):  # a close crosses only a working link
            w.close()


def _client_ports(relay_port: int, pids: Collection[int]) -> set[int]:
    """The local ports of the TCP connections processes `pids` have to `relay_port`."""
    ports = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == relay_port:
                    ports.add(conn.laddr.port)
    return ports
