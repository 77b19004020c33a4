"""The P2P port as the services see it: one listener for TLS-over-TCP and QUIC on the same
port number, and one way to dial it (`auto` tries QUIC, then TCP)."""

from __future__ import annotations

import logging
from typing import Literal

from octaskly.protocol import framing
from octaskly.transport import base, quic, tcp, tls

log = logging.getLogger(__name__)

Transport = Literal["auto", "quic", "tcp"]
AUTO_QUIC_TIMEOUT = 3.0
"""How long `auto` waits for a QUIC answer before it tries TCP."""


class Listener:
    def __init__(self, tcp_server: tcp.TCPServer, quic_server: quic.QUICServer | None) -> None:
        self.tcp = tcp_server
        self.quic = quic_server

    @property
    def port(self) -> int:
        return self.tcp.port

    def close(self) -> None:
        self.tcp.close()
        if self.quic is not None:
            self.quic.close()

    async def wait_closed(self) -> None:
        await self.tcp.wait_closed()
        if self.quic is not None:
            await self.quic.wait_closed()


async def listen(
    host: str,
    port: int,
    handler: base.ConnectionHandler,
    *,
    identity: tls.Identity,
    quic_enabled: bool = True,
) -> Listener:
    """TLS on TCP host:port and, unless disabled, QUIC on UDP host:port.

    Connections are held to the handshake limits (framing.HANDSHAKE_*) until the handler
    calls `trust()`. With port 0 the TCP listener picks a port and QUIC takes the same
    number (retried a few times if that UDP port happens to be taken). Raises OSError if a
    port is taken.
    """
    attempts = 5 if port == 0 else 1
    # what unauthenticated peers may make the dispatcher hold, over both transports
    budget = framing.ByteBudget(framing.HANDSHAKE_BUDGET_BYTES)
    for attempt in range(attempts):
        tcp_server = await tcp.serve(host, port, handler, identity=identity, budget=budget)
        if not quic_enabled:
            return Listener(tcp_server, None)
        try:
            quic_server = await quic.serve(
                host, tcp_server.port, handler, identity=identity, budget=budget
            )
        except OSError:
            tcp_server.close()
            await tcp_server.wait_closed()
            if attempt + 1 == attempts:
                raise
            continue
        return Listener(tcp_server, quic_server)
    raise AssertionError("unreachable")


async def dial(host: str, port: int, *, transport: Transport, timeout: float) -> base.Connection:
    """A connection to the dispatcher at host:port over the chosen transport.

    `auto` tries QUIC for up to AUTO_QUIC_TIMEOUT seconds and falls back to TCP.
    """
    if transport == "tcp":
        return await tcp.connect(host, port, timeout=timeout)
    if transport == "quic":
        return await quic.connect(host, port, timeout=timeout)
    try:
        return await quic.connect(host, port, timeout=min(timeout, AUTO_QUIC_TIMEOUT))
    except (ConnectionError, TimeoutError, OSError) as exc:
        log.info("QUIC to %s:%d failed (%s); trying TCP", host, port, exc)
    return await tcp.connect(host, port, timeout=timeout)
