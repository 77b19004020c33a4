"""Framed messages over TLS 1.3 on asyncio TCP streams."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

from octaskly.protocol import framing
from octaskly.transport import base, tls

log = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT = 1.0
"""How long closing waits for the peer's TLS close_notify before it drops the connection
(asyncio's default, 30 s, kept the session of a frozen or cut-off peer - and the runs it
held - alive that long after its heartbeats had stopped)."""


def _format_peer(info: Any) -> str:
    if isinstance(info, tuple) and len(info) >= 2:
        host = str(info[0])
        return f"[{host}]:{info[1]}" if ":" in host else f"{host}:{info[1]}"
    return str(info)


class TCPConnection:
    kind = "tcp"

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        binding: bytes,
        budget: framing.ByteBudget | None = None,
    ) -> None:
        """With a `budget` (accepted connections), frames are held to the handshake limits
        until `trust()`."""
        self._reader = reader
        self._writer = writer
        self.binding = binding
        self._frames = (
            framing.FrameReader(reader.read)
            if budget is None
            else framing.FrameReader(
                reader.read, max_frame=framing.HANDSHAKE_MAX_FRAME_BYTES, budget=budget
            )
        )
        self._peer = _format_peer(writer.get_extra_info("peername"))

    @property
    def peer(self) -> str:
        return self._peer

    async def send(self, message: dict[str, Any]) -> None:
        if self._writer.is_closing():
            raise ConnectionError("connection closed")
        self._writer.write(framing.encode(message))
        await self._writer.drain()

    async def send_many(self, messages: list[dict[str, Any]]) -> None:
        if self._writer.is_closing():
            raise ConnectionError("connection closed")
        self._writer.write(b"".join(framing.encode(m) for m in messages))
        await self._writer.drain()

    def send_nowait(self, message: dict[str, Any]) -> None:
        if self._writer.is_closing():
            raise ConnectionError("connection closed")
        self._writer.write(framing.encode(message))

    async def recv(self) -> dict[str, Any] | None:
        try:
            return await self._frames.next()
        except ssl.SSLError as exc:  # a tampered, replayed or truncated record
            raise ConnectionError(f"TLS: {exc.reason or exc}") from None

    def trust(self) -> None:
        self._frames.trust()

    def close(self) -> None:
        self._frames.release()
        self._writer.close()

    async def wait_closed(self) -> None:
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class TCPServer:
    def __init__(self, server: asyncio.Server) -> None:
        self._server = server

    @property
    def port(self) -> int:
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else 0

    def close(self) -> None:
        self._server.close()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()


async def serve(
    host: str,
    port: int,
    handler: base.ConnectionHandler,
    *,
    identity: tls.Identity,
    budget: framing.ByteBudget | None = None,
) -> TCPServer:
    """Listen with TLS on host:port; run `handler` for each connection, closing it after.
    Connections share `budget` (a new one if None) until the handler trusts them."""
    context = tls.server_context(identity)
    budget = budget or framing.ByteBudget(framing.HANDSHAKE_BUDGET_BYTES)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = TCPConnection(reader, writer, binding=identity.binding, budget=budget)
        try:
            await handler(conn)
        finally:
            conn.close()
            await conn.wait_closed()

    server = await asyncio.start_server(
        on_connect,
        host,
        port,
        reuse_address=True,
        ssl=context,
        ssl_handshake_timeout=10,
        ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    return TCPServer(server)


async def connect(host: str, port: int, *, timeout: float) -> TCPConnection:
    """A TLS connection to a dispatcher; its binding is the certificate it showed."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            host,
            port,
            family=socket.AF_UNSPEC,
            ssl=tls.client_context(),
            server_hostname=tls.SERVER_NAME,
            ssl_handshake_timeout=timeout,
            ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
        ),
        timeout,
    )
    ssl_object = writer.get_extra_info("ssl_object")
    cert = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not cert:
        writer.close()
        raise ConnectionError("the dispatcher presented no TLS certificate")
    return TCPConnection(reader, writer, binding=tls.binding_of(cert))
