"""High availability: the dispatcher's role, its term, failover, switchover and fencing.

Two dispatchers share one history of writes. The primary serves and streams its commits
to the standby (`replication`); each holds a `term` that grows by one with every
promotion and is stored with the data. Rules:

- The standby promotes itself (auto failover) when it has heard nothing from the primary
  for `failover_timeout` AND most of the workers that witness for it lost the primary
  too AND it is not stale (in sync mode: the primary had not dropped it from sync). A cut
  of only the primary⇄standby link leaves the workers reaching the primary: no promotion.
  With no witness at all it does not promote by itself (`octaskly ha promote` does).
- A higher term wins: a primary that hears of a higher term (from a worker's hello or
  witness report, or from its peer) steps down and follows the newer primary; workers
  never work for a lower term than one they have seen.
- A restarted primary first asks its last known peer: if that one is primary of a higher
  term, it rejoins as its standby (its own unreplicated writes, if any, are kept aside in
  a `.replaced-…` copy of its database, never merged).
- Switchover hands over with no loss: writes stop, the standby catches up to the last
  transaction, is promoted to the next term, and the old primary follows it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from octaskly import errors, files
from octaskly.domain import fencing
from octaskly.protocol import auth, messages
from octaskly.services import fencer, replication
from octaskly.store import backup, sqlite
from octaskly.transport import base as transport
from octaskly.transport import p2p

if TYPE_CHECKING:
    from octaskly.services.dispatcher import Dispatcher

log = logging.getLogger(__name__)

PEERS_FILE = "ha-peer.json"
WITNESS_FRESH = fencing.WITNESS_FRESH
"""A witness report older than this (seconds) no longer counts."""
MONITOR_INTERVAL = 0.25


@dataclasses.dataclass(frozen=True)
class Options:
    role: str = "primary"
    primary_addr: str | None = None
    replication: str = "async"
    failover_timeout: float = 5.0
    auto_failover: bool = True
    connect_timeout: float = 5.0
    name: str = ""
    """This dispatcher's name among its peers (default: HOST:PORT)."""
    state_dir: Path | None = None
    """Where the last known peer is remembered (the data dir); None: nowhere."""
    advertise_host: str | None = None
    """The address peers reach this dispatcher at, when it listens on one address."""


@dataclasses.dataclass
class WitnessReport:
    report: messages.Witness
    received: float


class HA:
    def __init__(self, dispatcher: Dispatcher, options: Options) -> None:
        self.d = dispatcher
        self.options = options
        self.role = options.role
        self.source: replication.Source | None = None
        self.follower: replication.Follower | None = None
        self._follower_task: asyncio.Task[None] | None = None
        self.witnesses: dict[str, WitnessReport] = {}
        self.witness_conns: set[transport.Connection] = set()
        self.known_term = 0
        self.known_primary: str | None = None
        self.p2p_port = 0
        self.advertised: str | None = None
        self.switching = False
        self._switch_done: asyncio.Future[int] | None = None
        self._changing = asyncio.Lock()
        self._blocked_reason: str | None = None
        self.name = options.name or socket.gethostname()
        self.events: list[dict[str, Any]] = []
        self.applied: collections.deque[Any] = collections.deque()
        """Changes applied as a standby (bounded): the buffer's start after a promotion."""
        self.applied_bytes = 0
        self.fencer = fencer.Fencer(self)
        self.has_peer = self.load_peer() is not None
        """A standby is (or was) known: the primary may be replaced, so it fences."""

    # -- facts -----------------------------------------------------------------------------
    @property
    def store(self) -> sqlite.SQLiteStore:
        store = self.d.store
        assert isinstance(store, sqlite.SQLiteStore), "high availability needs the SQLite store"
        return store

    @property
    def auth_keys(self) -> list[bytes]:
        """The P2P keys of every accepted cluster key, the current one first."""
        return self.d.keys.derived("p2p-auth", auth.derive_auth_key)

    @property
    def enabled(self) -> bool:
        return isinstance(self.d.store, sqlite.SQLiteStore)

    @property
    def term(self) -> int:
        own = self.store.position.term if self.enabled else 1
        return max(own, self.known_term)

    @property
    def primary_address(self) -> str | None:
        if self.role == "primary":
            return self.advertised
        return self.follower.address if self.follower is not None else self.known_primary

    def peers(self) -> list[str]:
        """The other dispatchers workers should know of (P2P HOST:PORT)."""
        out = []
        if self.source is not None and self.source.link is not None:
            out.append(self.source.link.address)
        peer = self.load_peer()
        if peer and peer not in out:
            out.append(peer)
        return out

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Take up the configured role (a primary first asks its last known peer)."""
        if not self.enabled:
            await self.d.start_primary()
            return
        if self.role == "standby":
            assert self.options.primary_addr, "role standby needs primary_addr"
            self._follow(self.options.primary_addr)
        else:
            peer = self.load_peer()
            newer = await self._probe(peer) if peer else None
            if newer is not None:
                term, address = newer
                log.warning(
                    "peer %s is primary of term %d (this database is at term %d): "
                    "rejoining as its standby",
                    address,
                    term,
                    self.store.position.term,
                )
                self.role = "standby"
                self.known_term = term
                self._event("rejoined", f"peer {address} is primary of term {term}")
                self._follow(address)
            else:
                await self._become_primary()
        self.d.spawn(self._monitor_forever(), "ha-monitor")

    async def stop(self) -> None:
        await self._stop_follower()
        if self.source is not None:
            self.source.close()
            self.source = None
        for conn in list(self.witness_conns):
            conn.close()

    async def _probe(self, address: str) -> tuple[int, str] | None:
        """(term, address) if the peer at `address` is primary of a higher term."""
        follower = replication.Follower(self, address)
        host, port = address.rsplit(":", 1)
        try:
            conn = await p2p.dial(host, int(port), transport="tcp", timeout=2.0)
        except (ConnectionError, OSError, TimeoutError) as exc:
            log.warning(
                "last known peer %s is unreachable (%s): starting as primary of term %d; if it "
                "was promoted meanwhile, workers will tell and this dispatcher steps down",
                address,
                exc or type(exc).__name__,
                self.store.position.term,
            )
            return None
        try:
            reply = await follower.handshake(conn)
        except (ConnectionError, OSError, TimeoutError, errors.ProtocolError) as exc:
            log.warning("last known peer %s: %s", address, exc or type(exc).__name__)
            return None
        finally:
            conn.close()
            await conn.wait_closed()
        if isinstance(reply, messages.ReplicaWelcome) and reply.term > self.store.position.term:
            return reply.term, address
        return None

    async def _become_primary(self, *, promoted: bool = False) -> None:
        self.source = replication.Source(
            self,
            sync=self.options.replication == "sync",
            sync_timeout=self.options.failover_timeout,
        )
        if promoted:
            # capture from the first write of the new term (start_primary writes), with
            # what we applied as a standby in front: the old primary may rejoin from its
            # position without a snapshot
            await self.source.start_capture()
            self.source.seed(self.applied)
            self.source.had_standby = True  # until one is back: degraded
        self.applied, self.applied_bytes = collections.deque(), 0
        # The role changes only once the runs found running are back in the queue (with
        # their grace): a worker admitted earlier would see its runs neither running here
        # nor re-queued, be told to abort them, and its finished results rejected.
        await self.d.start_primary()
        self.role = "primary"

    def _follow(self, address: str) -> None:
        self.follower = replication.Follower(self, address)
        self._follower_task = asyncio.get_running_loop().create_task(
            self.follower.run(), name="octaskly-replication-follow"
        )
        self.remember_peer(address)

    async def _stop_follower(self) -> None:
        task, self._follower_task = self._follower_task, None
        self.follower = None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- peers file ------------------------------------------------------------------------
    def load_peer(self) -> str | None:
        if self.options.state_dir is None:
            return None
        path = self.options.state_dir / PEERS_FILE
        try:
            peer = json.loads(path.read_text()).get("peer")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            return None
        return peer if isinstance(peer, str) and ":" in peer else None

    def remember_peer(self, address: str) -> None:
        self.has_peer = True
        if self.options.state_dir is None or self.load_peer() == address:
            return
        path = self.options.state_dir / PEERS_FILE
        with contextlib.suppress(OSError):
            files.write_private(path, json.dumps({"peer": address}).encode() + b"\n")

    # -- terms -----------------------------------------------------------------------------
    def observe_term(self, term: int, primary: str | None) -> None:
        """Someone reports `term` with its primary at `primary`: a higher term wins."""
        if term <= self.term:
            return
        if primary is not None and primary == self.advertised:
            primary = None  # never follow ourselves
        self.known_term = term
        if primary:
            self.known_primary = primary
        if self.switching:
            return  # the switchover in progress settles the roles
        if self.role == "primary":
            log.warning(
                "term %d (primary %s) is newer than this primary's %d: stepping down",
                term,
                primary or "unknown",
                self.store.position.term,
            )
            asyncio.get_running_loop().create_task(
                self.demote(term, primary, f"saw term {term}"), name="octaskly-step-down"
            )
        elif primary and self.follower is not None and self.follower.address != primary:
            log.info("the primary of term %d is %s: following it", term, primary)
            asyncio.get_running_loop().create_task(self._retarget(primary))

    async def _retarget(self, address: str) -> None:
        async with self._changing:
            if self.role != "standby":
                return
            await self._stop_follower()
            self._follow(address)

    async def on_redirect(
        self, follower: replication.Follower, redirect: messages.Redirect
    ) -> None:
        """The dispatcher we follow says it is not the primary."""
        if redirect.primary and redirect.primary != follower.address and redirect.term >= self.term:
            self.observe_term(redirect.term, redirect.primary)
            await self._retarget(redirect.primary)
        else:
            follower.state = f"waiting: {redirect.reason}"
            raise ConnectionError(f"{follower.address} is not the primary: {redirect.reason}")

    # -- witnesses -------------------------------------------------------------------------
    def on_witness(self, name: str, report: messages.Witness) -> None:
        self.witnesses[name] = WitnessReport(report, time.monotonic())
        if report.term > self.term:
            self.observe_term(report.term, report.primary)

    def witnesses_lost(self) -> tuple[int, int]:
        """(fresh witnesses that lost the primary, the population they are counted in).

        A witness lost the primary when it has not heard it for `failover_timeout` but did
        within the fencing membership window (so the primary counts it); the population is
        the largest the primary announced to a fresh witness, or the fresh ones if more.
        The primary fences before such a majority can form (domain.fencing).
        """
        fresh = self._fresh_reports()
        timing = self.fencer.timing
        lost = sum(1 for r in fresh if timing.failover_timeout <= r.silent_for <= timing.membership)
        population = max([len(fresh), *(r.population for r in fresh)])
        return lost, population

    def _fresh_reports(self) -> list[messages.Witness]:
        """The witness reports younger than WITNESS_FRESH."""
        now = time.monotonic()
        return [w.report for w in self.witnesses.values() if now - w.received <= WITNESS_FRESH]

    def witness_view(self) -> tuple[int, int, int]:
        """(fresh witnesses, how many still reach the primary, how many say we are stale)"""
        fresh = self._fresh_reports()
        timeout = self.options.failover_timeout
        reach = sum(1 for r in fresh if r.reachable and r.silent_for < timeout)
        lsn = self.store.position.lsn
        stale = sum(1 for r in fresh if r.standby_synced is False and r.primary_lsn > lsn)
        return len(fresh), reach, stale

    def state_message(self) -> messages.State:
        source = self.source
        return messages.State(
            term=self.term,
            role="primary" if self.role == "primary" else "standby",
            lsn=self.store.position.lsn if self.enabled else 0,
            standby_synced=None if source is None or not source.had_standby else source.synced,
            dispatchers=self.peers() if self.enabled else [],
        )

    # -- failover --------------------------------------------------------------------------
    async def _monitor_forever(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            if self.role != "standby" or self.follower is None or self.switching:
                continue
            reason = self.failover_blocker()
            if reason is None:
                try:
                    await self.promote("the primary is unreachable (auto failover)")
                except errors.OctasklyError as exc:
                    log.error("auto failover failed: %s", exc)
            elif reason != self._blocked_reason and not reason.startswith("the primary answered"):
                log.warning("not promoting: %s", reason)
            self._blocked_reason = reason

    def failover_blocker(self) -> str | None:
        """Why the standby must not promote itself now (None: it should)."""
        follower = self.follower
        assert follower is not None
        silent = time.monotonic() - follower.last_contact
        timeout = self.options.failover_timeout
        if silent < timeout:
            return f"the primary answered {silent:.1f}s ago"
        if not self.options.auto_failover:
            return "auto failover is off (promote with `octaskly ha promote`)"
        fresh, reach, stale = self.witness_view()
        if fresh == 0:
            return (
                "no worker witnesses whether the primary is down (a cut link alone looks the "
                "same); promote by hand with `octaskly ha promote` if it is"
            )
        lost, population = self.witnesses_lost()
        if lost * 2 <= population:
            return (
                f"only {lost} of the primary's {population} witnesses lost it for "
                f"{timeout:g}s (more than half must; {reach} still reach it): the primary "
                "may still be serving"
            )
        if self.stale_reason():
            return self.stale_reason()
        if stale:
            return "workers report the primary dropped this standby from sync: it may lack writes"
        return None

    def _blocked_now(self) -> str | None:
        """Why a standby whose primary is silent does not promote (None otherwise)."""
        if self.follower is None or self.role != "standby":
            return None
        reason = self.failover_blocker()
        return None if reason is None or reason.startswith("the primary answered") else reason

    def stale_reason(self) -> str | None:
        follower = self.follower
        if follower is None:
            return None
        if follower.state in ("connecting", "snapshot") or follower.primary_term == 0:
            return "this standby never completed its first synchronisation"
        if follower.sync and not follower.synced:
            return (
                "this standby was not in sync when the primary was lost (it may lack "
                "acknowledged writes); promote with --force to accept that"
            )
        return None

    async def promote(self, reason: str, *, force: bool = False, term: int | None = None) -> int:
        """Become the primary of a new term; returns the term."""
        async with self._changing:
            if self.role == "primary":
                raise errors.ConflictError("this dispatcher is the primary already")
            if not force and term is None and (stale := self.stale_reason()):
                raise errors.ConflictError(f"refusing to promote: {stale}")
            await self._stop_follower()
            new_term = term if term is not None else self.term + 1
            await self.store.begin_term(new_term)
            self.known_term = new_term
            await self._become_primary(promoted=True)
            self.known_primary = self.advertised
            self._event("promoted", reason, term=new_term)
            log.warning("promoted to primary of term %d: %s", new_term, reason)
            self.d.audit.record(
                "ha_promoted",
                action="promote",
                actor=self.name,
                severity="warning",
                details={"term": new_term, "reason": reason, "lsn": self.store.position.lsn},
            )
            self._announce()
            return new_term

    def _announce(self) -> None:
        """Tell the witnessing workers at once: they move their work here."""
        state = messages.to_wire(self.state_message())
        for conn in list(self.witness_conns):
            with contextlib.suppress(ConnectionError, OSError):
                conn.send_nowait(state)

    async def demote(self, term: int, primary: str | None, reason: str) -> None:
        """Step down to standby of `primary` (the primary of `term`)."""
        async with self._changing:
            if self.role != "primary":
                return
            self.role = "standby"
            self.known_term = max(self.known_term, term)
            self.known_primary = primary
            await self.d.stop_primary(messages.Redirect(term=term, primary=primary, reason=reason))
            if self.source is not None:
                self.source.close()
                self.source = None
            self._event("demoted", reason, term=term)
            self.d.audit.record(
                "ha_demoted",
                action="demote",
                actor=self.name,
                severity="warning",
                details={"term": term, "primary": primary, "reason": reason},
            )
            if primary:
                self._follow(primary)

    # -- switchover ------------------------------------------------------------------------
    async def switchover(self, timeout: float = 30.0) -> dict[str, Any]:
        """Hand the primary role to the connected standby with no acknowledged write lost."""
        if self.role != "primary" or self.source is None:
            raise errors.ConflictError("switchover: this dispatcher is not the primary")
        link = self.source.link
        if link is None:
            raise errors.ConflictError("switchover: no standby is connected")
        if self.switching:
            raise errors.ConflictError("switchover: one is in progress already")
        self.switching = True
        started = time.monotonic()
        new_term = self.term + 1
        # (the current term: the new one exists only once the standby has taken it)
        redirect = messages.Redirect(
            term=self.term, primary=link.address, reason="switching over to the standby"
        )
        try:
            await self.d.stop_primary(redirect)  # no more writes from workers or the scheduler
            lsn = self.store.position.lsn
            deadline = started + timeout
            while link.acked < lsn:
                if self.source.link is not link:
                    raise errors.TemporaryError("switchover: the standby disconnected", delay=1)
                if time.monotonic() > deadline:
                    raise errors.TemporaryError(
                        f"switchover: the standby did not catch up within {timeout:g}s", delay=1
                    )
                await asyncio.sleep(0.01)
            self._switch_done = asyncio.get_running_loop().create_future()
            await link.conn.send(messages.to_wire(messages.Switchover(term=new_term, lsn=lsn)))
            await asyncio.wait_for(self._switch_done, max(1.0, deadline - time.monotonic()))
        except BaseException as exc:
            log.error("switchover to %s failed: %s; staying primary", link.address, exc)
            self.switching = False
            if self.role == "primary":
                await self.d.start_primary()
            if isinstance(exc, TimeoutError):
                raise errors.TemporaryError(
                    "switchover: the standby did not confirm", delay=1
                ) from None
            raise
        async with self._changing:
            self.role = "standby"
            self.known_term, self.known_primary = new_term, link.address
            if self.source is not None:
                self.source.close()
                self.source = None
            self.switching = False
            self._event("switched over", f"to {link.address}", term=new_term)
            self.d.audit.record(
                "ha_switchover",
                action="switchover",
                actor=self.name,
                details={"term": new_term, "to": link.address, "lsn": lsn},
            )
            self._follow(link.address)
        took = time.monotonic() - started
        log.warning("switched over to %s (term %d) in %.2fs", link.address, new_term, took)
        return {"term": new_term, "primary": link.address, "lsn": lsn, "seconds": round(took, 3)}

    def on_switchover_done(self, term: int) -> None:
        if self._switch_done is not None and not self._switch_done.done():
            self._switch_done.set_result(term)

    async def on_switchover(
        self,
        follower: replication.Follower,
        conn: transport.Connection,
        message: messages.Switchover,
    ) -> None:
        """The primary hands over to us: promote once we have everything it has."""
        if self.store.position.lsn != message.lsn:
            raise errors.ProtocolError(
                f"switchover at transaction {message.lsn}, but this standby has "
                f"{self.store.position.lsn}"
            )
        await self.promote(f"switchover from {follower.address}", term=message.term)
        await conn.send(messages.to_wire(messages.SwitchoverDone(term=message.term)))

    # -- replication plumbing --------------------------------------------------------------
    async def accept_replica(
        self, conn: transport.Connection, hello: messages.ReplicaHello, nonce: str, key: bytes
    ) -> None:
        """A standby connected (after its proof was checked)."""
        if self.role != "primary" or self.source is None or self.switching:
            await conn.send(
                messages.to_wire(
                    messages.Redirect(
                        term=self.term,
                        primary=None if self.role == "primary" else self.primary_address,
                        reason=f"{self.name} is not the primary",
                    )
                )
            )
            return
        if hello.position.term > self.term:
            await conn.send(
                messages.to_wire(
                    messages.Reject(
                        reason=f"your database is at term {hello.position.term}, newer than this "
                        f"primary's {self.term}: refusing to overwrite it"
                    )
                )
            )
            log.error("standby %s has term %d > %d", hello.name, hello.position.term, self.term)
            return
        await self.source.serve(conn, hello, nonce, key)

    async def install_snapshot(self, partial: Path) -> None:
        """Replace this standby's database by a snapshot received from the primary."""
        backup.check(partial)
        old = self.store
        db = old.path
        await old.close()
        had_tasks = False
        with contextlib.suppress(Exception):
            had_tasks = backup.check(db).tasks > 0
        if had_tasks:
            aside = db.with_name(f"{db.name}.replaced-{time.strftime('%Y%m%d%H%M%S')}")
            os.replace(db, aside)
            log.warning("kept the database replaced by the primary's snapshot as %s", aside)
        for suffix in ("", *backup.SIDE_FILES):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{db}{suffix}").unlink()
        os.replace(partial, db)
        self.applied, self.applied_bytes = collections.deque(), 0  # no longer contiguous
        store = sqlite.SQLiteStore(db, synchronous=old.synchronous)
        await store.open()
        await self.d.replace_store(store)
        log.info("installed the primary's snapshot at transaction %d", store.position.lsn)

    def on_applied(self, batch: list[Any]) -> None:
        self.applied.extend(batch)
        self.applied_bytes += sum(c.size() for c in batch)
        while self.applied_bytes > replication.BUFFER_BYTES and len(self.applied) > 1:
            self.applied_bytes -= self.applied.popleft().size()
        if any(c.tokens for c in batch):
            self.d.reload_tokens_soon()

    # -- status ----------------------------------------------------------------------------
    def event(self, what: str, reason: str, **details: Any) -> None:
        """Record a role event (kept for `ha status`)."""
        self._event(what, reason, **details)

    def _event(self, what: str, reason: str, **details: Any) -> None:
        self.events.append({"at": time.time(), "event": what, "reason": reason, **details})
        del self.events[:-20]

    def degraded(self) -> str | None:
        if not self.enabled:
            return None
        if self.role == "primary":
            fenced = self.fencer.check()
            if fenced is not None:
                return fenced
            source = self.source
            if source is not None and source.had_standby and not source.synced:
                return source.degraded or "the standby is not in sync"
            return None
        follower = self.follower
        if follower is not None and not follower.connected:
            return f"standby: cannot reach the primary {follower.address}"
        return None

    def status(self) -> dict[str, Any]:
        if not self.enabled:
            return {"role": self.role, "term": 1, "replication": None}
        position = self.store.position
        fresh, reach, _ = self.witness_view()
        if self.role == "primary" and self.source is not None:
            replication_status = self.source.status()
        elif self.follower is not None:
            replication_status = self.follower.status()
        else:
            replication_status = None
        return {
            "node": self.name,
            "role": self.role,
            "term": self.term,
            "lsn": position.lsn,
            "db_id": position.db_id,
            "primary": self.primary_address,
            "switching": self.switching,
            "fenced": self.fencer.status(),
            "degraded": self.degraded(),
            "replication": replication_status,
            "failover": {
                "auto": self.options.auto_failover,
                "timeout_seconds": self.options.failover_timeout,
                "witnesses": fresh,
                "witnesses_reaching_primary": reach,
                "blocked": self._blocked_now(),
            },
            "events": list(self.events),
        }
