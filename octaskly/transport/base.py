"""The interface every P2P transport implements."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class Connection(Protocol):
    """One established, framed, bidirectional, encrypted connection."""

    kind: str
    """"tcp" or "quic", for logs."""

    binding: bytes
    """The channel binding: SHA-256 of the dispatcher's certificate as this side saw it."""

    @property
    def peer(self) -> str:
        """The remote address as HOST:PORT, for logs and audit."""

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message; raises ConnectionError if the connection is gone."""

    async def send_many(self, messages: list[dict[str, Any]]) -> None:
        """Send several messages in order, written together."""

    def send_nowait(self, message: dict[str, Any]) -> None:
        """Queue one message behind those already sent, without waiting for buffer space."""

    async def recv(self) -> dict[str, Any] | None:
        """The next message, or None when the peer closed cleanly.

        Raises ProtocolError on a malformed frame, ConnectionError on a broken link.
        """

    def trust(self) -> None:
        """The peer has proven it holds the cluster key: lift the limits on what it may send
        during the handshake (a smaller frame, a byte budget shared with the others)."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


ConnectionHandler = Callable[[Connection], Awaitable[None]]


class Server(Protocol):
    @property
    def port(self) -> int: ...

    def trust(self) -> None:
        """The peer has proven it holds the cluster key: lift the limits on what it may send
        during the handshake (a smaller frame, a byte budget shared with the others)."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...
