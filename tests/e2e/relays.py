"""Byte-level relays between a worker and a dispatcher, run on their own event loop in a
thread: they record everything that crosses (to prove nothing is in clear text) and can
flip one byte (to prove tampering is caught). They see exactly what an attacker on the
path would see."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any


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


class PartitionRelay(TCPRelay):
    """A TCP relay that can be cut like a network link: while cut, bytes vanish in both
    directions and connections hang (no FIN, no RST), as with a pulled cable."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.is_cut = False

    def cut(self) -> None:
        with self._lock:
            self.is_cut = True

    def heal(self) -> None:
        """Forward again; connections that lost bytes while cut are closed (as TCP would
        after its retransmissions failed), so both ends reconnect."""
        asyncio.run_coroutine_threadsafe(self._heal(), self._loop).result(10)

    async def _heal(self) -> None:
        with self._lock:
            self.is_cut = False
        for w in list(self._conns):
            w.close()
        self._conns.clear()

    def _tamper(self, data: bytes, direction: str) -> bytes:
        with self._lock:
            return b"" if self.is_cut else data

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:  # a new connection into the void: accepted, then nothing
            self._conns.add(writer)
            with contextlib.suppress(ConnectionError, OSError):
                while await reader.read(65536):
                    pass
            return
        await super()._serve(reader, writer)
