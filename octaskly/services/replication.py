"""Streaming replication between a primary dispatcher and its standby.

`Source` runs on the primary: it keeps the changes the store captured (row images of each
committed transaction, see store.changes) in a bounded buffer, serves one standby at a
time (a snapshot first when the standby cannot continue from its position), and, with
`replication = "sync"`, holds acknowledgements until the standby has a write on disk.
A standby that is gone or silent for `sync_timeout` is dropped from sync: the primary
keeps serving and reports itself degraded until a standby has caught up again.

`Follower` runs on the standby: it dials the primary, installs a snapshot when told to,
applies changes in order (many per commit when they queue up) and acknowledges the last
transaction it has on disk.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from octaskly import __version__, errors
from octaskly.protocol import auth, messages
from octaskly.store import changes
from octaskly.transport import base as transport
from octaskly.transport import p2p

if TYPE_CHECKING:
    from octaskly.services.ha import HA

log = logging.getLogger(__name__)

BUFFER_BYTES = 64 * 1024 * 1024
"""Changes kept for a standby that lags or reconnects; beyond this it gets a snapshot."""
SNAPSHOT_CHUNK = 1024 * 1024
FRAME_BYTES = 4 * 1024 * 1024
"""Changes sent per frame at most (a single larger change goes alone)."""
STATE_INTERVAL = 0.5
"""Seconds between the primary's state messages on an idle replication stream."""


@dataclasses.dataclass(eq=False)
class Link:
    """The primary's view of its connected standby."""

    name: str
    address: str
    conn: transport.Connection
    next_lsn: int
    acked: int = 0
    acked_at: float = 0.0
    connected_at: float = dataclasses.field(default_factory=time.time)
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class Source:
    """The primary's half: capture, buffer, serve the standby, and sync waits."""

    def __init__(self, ha: HA, *, sync: bool, sync_timeout: float) -> None:
        self.ha = ha
        self.sync = sync
        self.sync_timeout = sync_timeout
        self.buffer: collections.deque[changes.Change] = collections.deque()
        self.buffer_bytes = 0
        self.capture_from: int | None = None
        self.link: Link | None = None
        self.synced = False
        """Whether the standby holds every acknowledged write (sync mode: may promote)."""
        self.degraded: str | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.had_standby = False
        self.sent_lsn = ha.store.position.lsn if ha.enabled else 0
        """The newest transaction a standby may hold: sent to one, or made before this
        primary started (a standby of an earlier run may hold those)."""

    # -- capture ---------------------------------------------------------------------------
    async def start_capture(self) -> None:
        """Capture every commit from now on (idempotent)."""
        if self.capture_from is not None:
            return
        self.capture_from = await self.ha.store.capture_changes(self.on_change) + 1

    def seed(self, applied: collections.deque[changes.Change]) -> None:
        """Start the buffer with the changes this node applied as a standby (a promoted
        standby): its old primary can then rejoin from its position without a snapshot."""
        if applied and self.capture_from == self.ha.store.position.lsn + 1:
            if applied[-1].lsn == self.ha.store.position.lsn and not self.buffer:
                self.buffer.extend(applied)
                self.buffer_bytes = sum(c.size() for c in applied)
                self.capture_from = applied[0].lsn

    def stop_capture(self) -> None:
        self.ha.store.stop_capture()
        self.capture_from = None
        self.buffer.clear()
        self.buffer_bytes = 0

    def on_change(self, change: changes.Change) -> None:
        self.buffer.append(change)
        self.buffer_bytes += change.size()
        while self.buffer_bytes > BUFFER_BYTES and len(self.buffer) > 1:
            dropped = self.buffer.popleft()
            self.buffer_bytes -= dropped.size()
        link = self.link
        if link is not None:
            link.wake.set()
            if self.buffer[0].lsn > link.next_lsn:
                log.warning("standby %s fell out of the replication buffer", link.name)
                link.conn.close()  # it reconnects and takes a snapshot

    def covers(self, next_lsn: int) -> bool:
        """Whether a standby needing `next_lsn` onwards can be served from the buffer."""
        if self.capture_from is None:
            return False
        last = self.ha.store.position.lsn
        if next_lsn == last + 1:
            return next_lsn >= self.capture_from
        return bool(self.buffer) and self.buffer[0].lsn <= next_lsn <= self.buffer[-1].lsn

    def pending(self, next_lsn: int) -> list[changes.Change]:
        if not self.buffer or next_lsn > self.buffer[-1].lsn:
            return []
        start = next_lsn - self.buffer[0].lsn
        if start < 0:
            raise ConnectionError("the standby needs changes no longer buffered")
        out: list[changes.Change] = []
        size = 0
        for i in range(start, len(self.buffer)):
            change = self.buffer[i]
            size += change.size()
            if out and size > FRAME_BYTES:
                break
            out.append(change)
        return out

    # -- sync ------------------------------------------------------------------------------
    async def wait(self, lsn: int) -> None:
        """In sync mode, return once the standby has `lsn` on disk, or once it is dropped
        from sync (gone, or silent for sync_timeout)."""
        if not self.sync or not self.synced or self.link is None or self.link.acked >= lsn:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((lsn, future))
        try:
            await asyncio.wait_for(asyncio.shield(future), self.sync_timeout)
        except TimeoutError:
            self._drop_sync(f"the standby did not acknowledge within {self.sync_timeout:g}s")

    def _release(self, acked: int | None) -> None:
        keep = []
        for lsn, future in self._waiters:
            if acked is None or lsn <= acked:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((lsn, future))
        self._waiters = keep

    def _drop_sync(self, reason: str) -> None:
        if self.synced:
            log.warning("replication degraded: %s; acknowledging writes without it", reason)
        self.synced = False
        self.degraded = reason
        self._release(None)

    # -- serving the standby ---------------------------------------------------------------
    async def serve(
        self, conn: transport.Connection, hello: messages.ReplicaHello, nonce: str, key: bytes
    ) -> None:
        ha = self.ha
        store = ha.store
        await self.start_capture()
        history = await store.history()
        current = store.position
        p = hello.position
        fits = p.db_id == current.db_id and changes.on_history(history, p.term, p.lsn, current.lsn)
        stream = fits and self.covers(p.lsn + 1)
        host = hello.host or conn.peer.rsplit(":", 1)[0]
        address = f"{host}:{hello.port}" if hello.port else None
        await conn.send(
            messages.to_wire(
                messages.ReplicaWelcome(
                    proof=auth.dispatcher_proof(
                        key,  # the one the standby proved: it may not have a newer one yet
                        dispatcher_nonce=nonce,
                        worker_nonce=hello.nonce,
                        worker_id=hello.name,
                        binding=conn.binding,
                    ),
                    term=current.term,
                    history=history,
                    mode="stream" if stream else "snapshot",
                    sync=self.sync,
                    advertise=address,
                )
            )
        )
        if self.link is not None:
            log.info("a new standby connection replaces the one from %s", self.link.address)
            self.link.conn.close()
        if stream:
            next_lsn = p.lsn + 1
        else:
            why = (
                "a different database"
                if p.db_id != current.db_id
                else "diverged from this history"
                if not fits
                else "behind the replication buffer"
            )
            log.info(
                "standby %s (%s) gets a snapshot: its database is %s", hello.name, address, why
            )
            next_lsn = await self._send_snapshot(conn) + 1
            self.sent_lsn = max(self.sent_lsn, next_lsn - 1)
        link = Link(hello.name, address or conn.peer, conn, next_lsn, acked=next_lsn - 1)
        self.link = link
        self.had_standby = True
        if address:
            ha.remember_peer(address)
        log.info("standby %s (%s) replicating from transaction %d", hello.name, address, next_lsn)
        sender = asyncio.create_task(self._send_forever(link), name="octaskly-replication-send")
        try:
            await self._receive(link)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            if self.link is link:
                self.link = None
                self._drop_sync(f"the standby {hello.name} disconnected")
                log.warning("standby %s (%s) disconnected", hello.name, address)

    async def _send_snapshot(self, conn: transport.Connection) -> int:
        store = self.ha.store
        tmp = store.path.with_name(f".{store.path.name}.snapshot-{os.getpid()}-{id(conn)}")
        try:
            position = await store.snapshot(tmp)
            size = tmp.stat().st_size
            with tmp.open("rb") as fh:
                while True:
                    chunk = await asyncio.to_thread(fh.read, SNAPSHOT_CHUNK)
                    done = fh.tell() >= size
                    await conn.send(
                        messages.to_wire(
                            messages.Snapshot(
                                data=base64.b64encode(chunk).decode(),
                                done=done,
                                position=messages.PositionModel(
                                    db_id=position.db_id, term=position.term, lsn=position.lsn
                                )
                                if done
                                else None,
                            )
                        )
                    )
                    if done:
                        break
            log.info("sent a snapshot of %d bytes at transaction %d", size, position.lsn)
            return position.lsn
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    async def _send_forever(self, link: Link) -> None:
        while True:
            link.wake.clear()
            batch = self.pending(link.next_lsn)
            if batch:
                link.next_lsn = batch[-1].lsn + 1
                self.sent_lsn = max(self.sent_lsn, batch[-1].lsn)
                await link.conn.send(
                    messages.to_wire(
                        messages.Changes(
                            changes=[c.to_wire() for c in batch],
                            lsn=self.ha.store.position.lsn,
                            synced=self.synced,
                            sent=time.monotonic(),
                        )
                    )
                )
                continue
            await link.conn.send(messages.to_wire(self.state()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.wake.wait(), STATE_INTERVAL)

    def state(self) -> messages.ReplicaState:
        p = self.ha.store.position
        return messages.ReplicaState(
            term=p.term, lsn=p.lsn, synced=self.synced, at=time.time(), sent=time.monotonic()
        )

    async def _receive(self, link: Link) -> None:
        # the standby acknowledges at least every STATE_INTERVAL; silence means a cut link
        silence = max(4 * STATE_INTERVAL, self.sync_timeout)
        while True:
            try:
                raw = await asyncio.wait_for(link.conn.recv(), silence)
            except TimeoutError:
                log.warning("standby %s silent for %gs: dropping it", link.name, silence)
                return
            if raw is None:
                return
            message = messages.parse_worker_message(raw)
            if isinstance(message, messages.ReplicaAck):
                self._on_ack(link, message.lsn)
                self.ha.fencer.standby_confirmed(message.sent)
            elif isinstance(message, messages.SwitchoverDone):
                self.ha.on_switchover_done(message.term)
            else:
                raise errors.ProtocolError(f"unexpected {message.type} from the standby")

    def _on_ack(self, link: Link, lsn: int) -> None:
        if lsn < link.acked or lsn >= link.next_lsn:
            raise errors.ProtocolError(
                f"acknowledged transaction {lsn} is outside {link.acked}..{link.next_lsn - 1}"
            )
        link.acked, link.acked_at = lsn, time.time()
        self._release(lsn)
        if not self.synced and lsn >= self.ha.store.position.lsn:
            self.synced = True
            self.degraded = None
            log.info(
                "standby %s caught up at transaction %d: replication is in sync", link.name, lsn
            )

    # -- status ----------------------------------------------------------------------------
    def lag(self) -> tuple[int, float]:
        """Transactions the standby has not acknowledged, and the age of the oldest."""
        link = self.link
        last = self.ha.store.position.lsn
        if link is None:
            return 0, 0.0
        behind = max(0, last - link.acked)
        if not behind:
            return 0, 0.0
        oldest = next((c for c in self.buffer if c.lsn > link.acked), None)
        return behind, max(0.0, time.time() - oldest.committed_at) if oldest else 0.0

    def status(self) -> dict[str, Any]:
        link = self.link
        records, seconds = self.lag()
        return {
            "mode": "sync" if self.sync else "async",
            "state": "streaming" if link is not None else "no standby",
            "synced": self.synced,
            "degraded": self.degraded if self.had_standby or self.sync else None,
            "standby": None
            if link is None
            else {"name": link.name, "address": link.address, "acknowledged_lsn": link.acked},
            "lag_records": records,
            "lag_seconds": round(seconds, 3),
        }

    def close(self) -> None:
        if self.link is not None:
            self.link.conn.close()
        self._release(None)
        self.stop_capture()


class Follower:
    """The standby's half: follow the primary at `address`."""

    def __init__(self, ha: HA, address: str) -> None:
        self.ha = ha
        self.address = address
        self.connected = False
        self.last_contact = time.monotonic()
        self.primary_term = 0
        self.primary_lsn = 0
        self.primary_at = 0.0
        self.synced = False
        self.sync = False
        self.applied_at = 0.0
        self.state = "connecting"
        self.last_sent = 0.0
        """`sent` of the primary's newest frame received: echoed in every ack."""

    def _ack(self) -> messages.ReplicaAck:
        return messages.ReplicaAck(lsn=self.ha.store.position.lsn, sent=self.last_sent)

    async def run(self) -> None:
        delay = 0.2
        host, port = self.address.rsplit(":", 1)
        while self.ha.follower is self:
            try:
                await self.session(host, int(port))
                delay = 0.2
            except (ConnectionError, OSError, TimeoutError, errors.ProtocolError) as exc:
                if self.connected or self.state != "unreachable":
                    log.warning("primary %s: %s", self.address, exc or type(exc).__name__)
                self.state = "unreachable"
            except errors.StorageError as exc:
                log.error("replication from %s stopped: %s", self.address, exc)
                self.state = f"failed: {exc}"
            except Exception:  # a bug must not end replication silently: log, retry
                log.exception("replication from %s failed", self.address)
                self.state = "failed"
            finally:
                self.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def handshake(
        self, conn: transport.Connection
    ) -> messages.ReplicaWelcome | messages.Redirect:
        ha = self.ha
        timeout = ha.options.connect_timeout
        raw = await asyncio.wait_for(conn.recv(), timeout)
        if raw is None:
            raise ConnectionError("the primary closed the connection")
        challenge = messages.parse_dispatcher_message(raw)
        if not isinstance(challenge, messages.Challenge):
            raise errors.ProtocolError(f"expected challenge, got {challenge.type}")
        nonce = auth.new_nonce()
        p = ha.store.position
        await conn.send(
            messages.to_wire(
                messages.ReplicaHello(
                    protocol=messages.PROTOCOL_VERSION,
                    name=ha.name,
                    nonce=nonce,
                    proof=auth.worker_proof(
                        ha.auth_keys[0],
                        dispatcher_nonce=challenge.nonce,
                        worker_nonce=nonce,
                        name=ha.name,
                        binding=conn.binding,
                    ),
                    version=__version__,
                    position=messages.PositionModel(db_id=p.db_id, term=p.term, lsn=p.lsn),
                    port=ha.p2p_port,
                    host=ha.options.advertise_host,
                )
            )
        )
        raw = await asyncio.wait_for(conn.recv(), timeout)
        if raw is None:
            raise ConnectionError("the primary closed the connection during the handshake")
        reply = messages.parse_dispatcher_message(raw)
        if isinstance(reply, messages.Reject):
            raise ConnectionError(f"refused by {self.address}: {reply.reason}")
        if isinstance(reply, messages.Redirect):
            return reply
        if not isinstance(reply, messages.ReplicaWelcome):
            raise errors.ProtocolError(f"expected replica_welcome, got {reply.type}")
        proved = auth.first_key(
            ha.auth_keys,
            lambda key: auth.dispatcher_proof(
                key,
                dispatcher_nonce=challenge.nonce,
                worker_nonce=nonce,
                worker_id=ha.name,
                binding=conn.binding,
            ),
            reply.proof,
        )
        if proved is None:
            raise ConnectionError(f"{self.address} could not prove it has the cluster key")
        return reply

    async def session(self, host: str, port: int) -> None:
        ha = self.ha
        self.last_sent = 0.0  # (another primary's clock: never echo one to the next)
        conn = await p2p.dial(host, port, transport="tcp", timeout=ha.options.connect_timeout)
        try:
            reply = await self.handshake(conn)
            if isinstance(reply, messages.Redirect):
                await ha.on_redirect(self, reply)
                return
            if reply.term < ha.term:
                raise ConnectionError(
                    f"{self.address} is primary of term {reply.term}, older than {ha.term}"
                )
            await self.follow(conn, reply)
        finally:
            conn.close()
            await conn.wait_closed()

    async def follow(self, conn: transport.Connection, welcome: messages.ReplicaWelcome) -> None:
        """Replicate over an established session until it ends."""
        ha = self.ha
        self.connected, self.last_contact = True, time.monotonic()
        self.primary_term, self.sync = welcome.term, welcome.sync
        ha.observe_term(welcome.term, self.address)
        if welcome.advertise:
            ha.advertised = welcome.advertise
        self.state = "snapshot" if welcome.mode == "snapshot" else "streaming"
        log.info(
            "following primary %s (term %d, %s replication)%s",
            self.address,
            welcome.term,
            "sync" if welcome.sync else "async",
            ": receiving a snapshot" if welcome.mode == "snapshot" else "",
        )
        if welcome.mode == "snapshot":
            await self._receive_snapshot(conn)
        await ha.store.set_history(welcome.history)
        self.state = "streaming"
        await conn.send(messages.to_wire(messages.ReplicaAck(lsn=ha.store.position.lsn)))
        await self._apply_forever(conn)

    async def _receive_snapshot(self, conn: transport.Connection) -> None:
        store = self.ha.store
        partial = store.path.with_name(f"{store.path.name}.snapshot-partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                while True:
                    raw = await asyncio.wait_for(conn.recv(), self.ha.options.connect_timeout * 6)
                    if raw is None:
                        raise ConnectionError("the primary closed the connection mid-snapshot")
                    self.last_contact = time.monotonic()
                    message = messages.parse_dispatcher_message(raw)
                    if not isinstance(message, messages.Snapshot):
                        raise errors.ProtocolError(f"expected snapshot, got {message.type}")
                    try:
                        data = base64.b64decode(message.data, validate=True)
                    except ValueError:
                        raise errors.ProtocolError("snapshot data is not base64") from None
                    await asyncio.to_thread(fh.write, data)
                    if message.done:
                        await asyncio.to_thread(fh.flush)
                        await asyncio.to_thread(os.fsync, fh.fileno())
                        break
            await self.ha.install_snapshot(partial)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()

    async def _apply_forever(self, conn: transport.Connection) -> None:
        ha = self.ha
        task_width, token_width = ha.store.change_widths
        # the primary speaks at least every STATE_INTERVAL: silence means a cut link
        silence = max(4 * STATE_INTERVAL, ha.options.failover_timeout)
        while True:
            try:
                raw = await asyncio.wait_for(conn.recv(), silence)
            except TimeoutError:
                raise ConnectionError(f"the primary has been silent for {silence:g}s") from None
            if raw is None:
                raise ConnectionError("the primary closed the replication stream")
            self.last_contact = time.monotonic()
            message = messages.parse_dispatcher_message(raw)
            if isinstance(message, messages.Changes):
                batch = [
                    changes.Change.from_wire(c, task_width=task_width, token_width=token_width)
                    for c in message.changes
                ]
                self.primary_lsn, self.synced = message.lsn, message.synced
                self.last_sent = max(self.last_sent, message.sent)
                await self._apply(batch)
                await conn.send(messages.to_wire(self._ack()))
            elif isinstance(message, messages.ReplicaState):
                self.primary_lsn, self.synced = message.lsn, message.synced
                self.primary_at = message.at
                self.last_sent = max(self.last_sent, message.sent)
                ha.observe_term(message.term, self.address)
                # our sign of life for the primary, and proof we hear it
                await conn.send(messages.to_wire(self._ack()))
            elif isinstance(message, messages.Switchover):
                await ha.on_switchover(self, conn, message)
                return
            else:
                raise errors.ProtocolError(f"unexpected {message.type} on the replication stream")

    async def _apply(self, batch: list[changes.Change]) -> None:
        store = self.ha.store
        expected = store.position.lsn + 1
        writes: list[Awaitable[bool]] = []
        for change in batch:
            if change.lsn < expected:
                continue  # had it already
            if change.lsn != expected:
                raise errors.ProtocolError(
                    f"replication gap: expected transaction {expected}, got {change.lsn}"
                )
            writes.append(store.apply_change(change))
            expected += 1
        if writes:
            # queued together, applied in order, committed together (group commit)
            await asyncio.gather(*writes)
            self.applied_at = batch[-1].committed_at
            self.ha.on_applied(batch)

    def lag(self) -> tuple[int, float]:
        """Transactions the primary has that this standby has not applied, and how long
        the oldest of them has waited (estimated from the primary's clock)."""
        behind = max(0, self.primary_lsn - self.ha.store.position.lsn)
        if not behind:
            return 0, 0.0
        # as PostgreSQL's now() - pg_last_xact_replay_timestamp(): the age of the newest
        # transaction applied, while there are newer ones
        return behind, max(0.0, time.time() - self.applied_at) if self.applied_at else 0.0

    def status(self) -> dict[str, Any]:
        records, seconds = self.lag()
        return {
            "mode": "sync" if self.sync else "async",
            "state": self.state if self.connected else "disconnected",
            "primary": self.address,
            "synced": self.synced,
            "lag_records": records,
            "lag_seconds": round(seconds, 3),
            "seconds_since_primary": round(time.monotonic() - self.last_contact, 3),
        }
