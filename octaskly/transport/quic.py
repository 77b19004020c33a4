"""Framed messages over QUIC (aioquic): one bidirectional stream per connection.

The worker opens the connection and its first stream; the frames on that stream are
exactly those TCP carries, so nothing above the transport knows which one is in use.
QUIC brings its own TLS 1.3 (the same certificate as the TCP listener); a datagram that
fails authentication is dropped by QUIC, and a connection that goes silent for the idle
timeout ends. aioquic reports handshake failures as a bare ConnectionError and logs the
reason on its "quic" logger: we log what we can and say which transport failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any, cast

from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.asyncio.server import serve as quic_serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionError
from aioquic.quic.packet import QuicErrorCode
from cryptography.hazmat.primitives import serialization

from octaskly import errors
from octaskly.protocol import framing
from octaskly.transport import base, tls

log = logging.getLogger(__name__)
IDLE_TIMEOUT = 30.0
# A QUIC stream exists for the peer only once data arrives on it, and the dispatcher
# speaks first: the worker opens its stream with these bytes, which the transport eats.
PREAMBLE = b"octaskly-p2p\n"
CLOSE_GRACE = 1.0
"""How long close() waits for the peer to acknowledge what was sent (a last `reject`)."""
REORDER_LIMIT = 1024 * 1024
"""Out-of-order bytes past which a stream's flow-control window stops growing."""


def _harden(quic: QuicConnection) -> None:
    """Bound what a peer can make aioquic buffer.

    aioquic (1.7) doubles a stream's flow-control window whenever the highest offset seen
    passes half of it, counting data that arrived out of order, and keeps every gap's bytes
    in the stream's reorder buffer: a peer that sends only the last byte of each window
    made one dispatcher allocate 2.3 GB in 8 s, before any handshake. The window now grows
    only while the stream's out-of-order bytes stay under REORDER_LIMIT (in-order data,
    which is handed to the reader at once, grows it as before). And the protocol uses one
    bidirectional stream, id 0, opened by the worker: a frame for any other stream (aioquic
    would accept 128 and raise that limit too) ends the connection.
    """
    get_or_create = quic._get_or_create_stream
    write_stream_limits = quic._write_stream_limits

    def only_stream_zero(frame_type: int, stream_id: int) -> Any:
        if stream_id != 0:
            raise QuicConnectionError(
                error_code=QuicErrorCode.STREAM_LIMIT_ERROR,
                frame_type=frame_type,
                reason_phrase="octaskly uses one stream per connection",
            )
        return get_or_create(frame_type, stream_id)

    def bounded_stream_limits(builder: Any, space: Any, stream: Any) -> None:
        receiver = stream.receiver
        if receiver.highest_offset - receiver.starting_offset() > REORDER_LIMIT:
            return  # (raised again once the gap is filled)
        write_stream_limits(builder, space, stream)

    quic._get_or_create_stream = only_stream_zero  # type: ignore[method-assign]
    quic._write_stream_limits = bounded_stream_limits  # type: ignore[method-assign]


def _format_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0]).removeprefix("::ffff:")
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


class QUICConnection:
    kind = "quic"

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        protocol: QuicConnectionProtocol,
        *,
        binding: bytes,
        peer: str,
        preamble: bytes = b"",
        budget: framing.ByteBudget | None = None,
    ) -> None:
        """With a `budget` (accepted connections), frames are held to the handshake limits
        until `trust()`."""
        self._preamble = preamble
        self._reader = reader
        self._writer = writer
        self._protocol = protocol
        self._frames = (
            framing.FrameReader(reader.read)
            if budget is None
            else framing.FrameReader(
                reader.read, max_frame=framing.HANDSHAKE_MAX_FRAME_BYTES, budget=budget
            )
        )
        self._peer = peer
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._stream_id = writer.get_extra_info("stream_id")
        self._on_close: list[asyncio.Future[Any]] = []
        self.binding = binding

    @property
    def peer(self) -> str:
        return self._peer

    def _check_open(self) -> None:
        if self._closed or self._writer.is_closing() or self._protocol._closed.is_set():
            raise ConnectionError("connection closed")

    async def send(self, message: dict[str, Any]) -> None:
        self.send_nowait(message)

    async def send_many(self, messages: list[dict[str, Any]]) -> None:
        self._check_open()
        self._writer.write(b"".join(framing.encode(m) for m in messages))

    def send_nowait(self, message: dict[str, Any]) -> None:
        self._check_open()
        self._writer.write(framing.encode(message))

    async def recv(self) -> dict[str, Any] | None:
        if self._preamble:
            try:
                got = await self._reader.readexactly(len(self._preamble))
            except asyncio.IncompleteReadError:
                return None
            if got != self._preamble:
                raise errors.ProtocolError("the QUIC stream does not start with the preamble")
            self._preamble = b""
        return await self._frames.next()

    def trust(self) -> None:
        self._frames.trust()

    def close(self) -> None:
        """End the stream, then the connection once the peer has acknowledged everything
        sent (at most CLOSE_GRACE later): closing QUIC at once would drop unsent data."""
        if self._closed:
            return
        self._closed = True
        self._frames.release()
        with contextlib.suppress(Exception):  # the stream may already be reset
            self._writer.close()
        self._closing = asyncio.ensure_future(self._close_when_delivered())

    async def _close_when_delivered(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_GRACE
        while not self._protocol._closed.is_set() and loop.time() < deadline:
            stream = self._protocol._quic._streams.get(self._stream_id)
            if stream is None or stream.sender.is_finished:
                break
            await asyncio.sleep(0.01)
        self._protocol.close()  # sends CONNECTION_CLOSE; the peer's readers see the end

    def add_close_step(self, step: asyncio.Future[Any]) -> None:
        self._on_close.append(step)

    async def wait_closed(self) -> None:
        if self._closing is not None:
            await self._closing
        with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self._protocol.wait_closed(), CLOSE_GRACE)
        for step in self._on_close:
            with contextlib.suppress(Exception):
                await step


class _ServerProtocol(QuicConnectionProtocol):
    """One worker's QUIC connection: its first stream becomes a QUICConnection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handler: base.ConnectionHandler | None = None
        self.binding = b""
        self._addr: Any = None
        self._started = False
        self.tasks: set[asyncio.Task[None]] | None = None
        self.budget: framing.ByteBudget | None = None
        kwargs["stream_handler"] = self._on_stream
        super().__init__(*args, **kwargs)
        _harden(self._quic)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self._addr is None:
            self._addr = addr
        super().datagram_received(data, addr)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated) and event.error_code:
            log.debug("QUIC connection from %s ended: %s", _format_addr(self._addr), event)
        super().quic_event_received(event)

    def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._started or self.handler is None:
            log.warning("QUIC peer %s opened a second stream: closing", _format_addr(self._addr))
            self.close()
            return
        self._started = True
        assert self.tasks is not None
        conn = QUICConnection(
            reader,
            writer,
            self,
            binding=self.binding,
            peer=_format_addr(self._addr),
            preamble=PREAMBLE,
            budget=self.budget,
        )
        task = asyncio.get_running_loop().create_task(self._serve(conn, self.handler))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: QUICConnection, handler: base.ConnectionHandler) -> None:
        try:
            await handler(conn)
        finally:
            conn.close()
            await conn.wait_closed()


class QUICServer:
    def __init__(self, server: QuicServer, port: int, tasks: set[asyncio.Task[None]]) -> None:
        self._server = server
        self._port = port
        self._tasks = tasks

    @property
    def port(self) -> int:
        return self._port

    def close(self) -> None:
        self._server.close()

    async def wait_closed(self) -> None:
        """Until every connection's handler has returned."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def serve(
    host: str,
    port: int,
    handler: base.ConnectionHandler,
    *,
    identity: tls.Identity,
    budget: framing.ByteBudget | None = None,
) -> QUICServer:
    """Listen for QUIC on UDP host:port (the TCP listener's port number). Connections share
    `budget` (a new one if None) until the handler trusts them."""
    budget = budget or framing.ByteBudget(framing.HANDSHAKE_BUDGET_BYTES)
    config = QuicConfiguration(is_client=False, alpn_protocols=[tls.ALPN])
    config.idle_timeout = IDLE_TIMEOUT
    config.load_cert_chain(identity.cert_path, identity.key_path)

    tasks: set[asyncio.Task[None]] = set()

    def create_protocol(*args: Any, **kwargs: Any) -> _ServerProtocol:
        protocol = _ServerProtocol(*args, **kwargs)
        protocol.handler, protocol.binding, protocol.tasks = handler, identity.binding, tasks
        protocol.budget = budget
        return protocol

    server = await quic_serve(host, port, configuration=config, create_protocol=create_protocol)
    transport = cast(asyncio.DatagramTransport, server._transport)
    bound = transport.get_extra_info("sockname")[1]
    return QUICServer(server, int(bound), tasks)


def _peer_binding(protocol: QuicConnectionProtocol) -> bytes:
    cert = getattr(getattr(protocol._quic, "tls", None), "_peer_certificate", None)
    if cert is None:
        raise ConnectionError("the dispatcher presented no TLS certificate over QUIC")
    return tls.binding_of(cert.public_bytes(serialization.Encoding.DER))


async def connect(host: str, port: int, *, timeout: float) -> QUICConnection:
    """A QUIC connection to a dispatcher with one open stream."""
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[tls.ALPN],
        server_name=tls.SERVER_NAME,
        verify_mode=ssl.CERT_NONE,  # the handshake proofs bind to the certificate instead
    )
    config.idle_timeout = IDLE_TIMEOUT
    stack = contextlib.AsyncExitStack()
    try:
        protocol = await asyncio.wait_for(
            stack.enter_async_context(quic_connect(host, port, configuration=config)), timeout
        )
        _harden(protocol._quic)  # (a hostile server could do the same to a worker)
        reader, writer = await protocol.create_stream()
        writer.write(PREAMBLE)
        binding = _peer_binding(protocol)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(stack.aclose(), 2)
        if isinstance(exc, asyncio.TimeoutError):
            raise TimeoutError(
                f"no QUIC answer from {host}:{port} within {timeout:g}s (UDP blocked, or "
                "QUIC disabled on the dispatcher?)"
            ) from None
        if isinstance(exc, ConnectionError) and not str(exc):
            raise ConnectionError(f"QUIC handshake with {host}:{port} failed") from None
        raise
    conn = QUICConnection(reader, writer, protocol, binding=binding, peer=f"{host}:{port}")
    conn.add_close_step(asyncio.ensure_future(_close_later(conn, stack)))
    return conn


async def _close_later(conn: QUICConnection, stack: contextlib.AsyncExitStack) -> None:
    """Leave aioquic's connect() context once the connection has ended."""
    await conn._protocol.wait_closed()
    await stack.aclose()
