"""Fencing: when a primary must stop acknowledging writes, so no promotion can lose one.

Pure: a function of what the primary sent, what its standby and workers confirmed having
received, and ``now`` (monotonic seconds, given by the caller).

With ``F`` = ``failover_timeout``:

- The primary tells its workers its state every :attr:`Timing.state_interval` (a numbered
  ``State``: its lsn, whether the standby holds every acknowledged write, and how many
  workers it counts), and each worker confirms each one at once. A worker is a **live
  witness** at ``s`` when it confirmed a ``State`` sent at or after ``s - fence_after``,
  ``fence_after = F - state_interval``: so it heard the primary after that moment.
- The standby promotes itself only when, besides its own ``F`` seconds without the
  primary, **more than half of the primary's witnesses** (the largest count the primary
  announced to any of them, or the witnesses it hears, if more) report that they have not
  heard the primary for ``F`` seconds — having heard it within :attr:`Timing.membership`
  (so they were among those the primary counts).
- The primary acknowledges a write only while its standby is confirmed (it confirmed a
  frame sent at or after ``now - fence_after``; in sync mode, and in sync) or while at
  least half of its witnesses are live — of its current ones and of every set it announced
  within :attr:`Timing.membership`. That half and the standby's "more than half" share a
  worker, which cannot have
  heard the primary after ``s - fence_after`` and not heard it for ``F`` seconds before
  ``p``; so a promotion at ``p`` comes at least ``F - fence_after = state_interval`` after
  the primary's last acknowledgement without its standby: the primary fences strictly
  first.
- A write acknowledged without the standby is also **known to be missing from it** by at
  least half of the witnesses first (they confirmed a ``State`` saying "standby not in sync"
  with an lsn at least the write's): a standby that later hears such a witness refuses to
  promote itself, so even a partition after the acknowledgement loses nothing.
- With no witnesses at all the standby never promotes itself, so the primary never fences.
"""

from __future__ import annotations

import collections
import dataclasses

WITNESS_FRESH = 3.0
"""A witness report older than this (seconds) no longer counts (at the standby)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Timing:
    failover_timeout: float

    @property
    def state_interval(self) -> float:
        """Seconds between the primary's ``State`` messages to its workers."""
        return min(1.0, self.failover_timeout / 4)

    @property
    def fence_after(self) -> float:
        """Seconds without confirmation after which a witness or the standby is not live."""
        return self.failover_timeout - self.state_interval

    @property
    def membership(self) -> float:
        """Seconds a worker stays counted after the primary last heard it (and for which a
        witness that heard the primary counts as one of its workers at the standby)."""
        return 4 * self.failover_timeout + WITNESS_FRESH


@dataclasses.dataclass(frozen=True, slots=True)
class Sent:
    """One ``State`` the primary sent to its workers."""

    seq: int
    at: float
    lsn: int
    synced: bool | None
    members: frozenset[str]


class Fence:
    """The primary's record of its witnesses; :meth:`reason` decides. Feed it every
    ``State`` sent (:meth:`announce`), every confirmation (:meth:`confirmed`), sessions
    opening and closing (:meth:`joined`, :meth:`left`) and the standby's confirmations."""

    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self._sent: collections.deque[Sent] = collections.deque()
        self._by_seq: dict[int, Sent] = {}
        self._confirmed: dict[str, Sent] = {}
        self._connected: set[str] = set()
        self._left: dict[str, float] = {}
        self.standby_at: float | None = None
        """When the newest frame the standby confirmed was sent (None: never)."""

    # -- what happened --------------------------------------------------------------------
    def joined(self, worker: str, *, heard_at: float | None = None) -> None:
        """A work session of ``worker`` opened (a reconnect replaces the previous one);
        ``heard_at``: it answered a challenge sent then, so it heard the primary after it."""
        self._connected.add(worker)
        self._left.pop(worker, None)
        previous = self._confirmed.get(worker)
        if heard_at is not None and (previous is None or previous.at < heard_at):
            # (no State: it tells nothing of the standby, so it covers no write)
            self._confirmed[worker] = Sent(
                previous.seq if previous else 0, heard_at, -1, None, frozenset()
            )

    def left(self, worker: str, now: float) -> None:
        """The work session of ``worker`` ended; it stays counted for ``membership``."""
        if worker in self._connected:
            self._connected.discard(worker)
            self._left[worker] = now

    def members(self, now: float) -> frozenset[str]:
        """The workers counted now: connected, or left within :attr:`Timing.membership`."""
        self._expire(now)
        return frozenset(self._connected) | frozenset(self._left)

    def announce(self, seq: int, now: float, *, lsn: int, synced: bool | None) -> Sent:
        """A ``State`` numbered ``seq`` goes out now; returns its record (``members`` is
        the count it announces)."""
        sent = Sent(seq, now, lsn, synced, self.members(now))
        self._sent.append(sent)
        self._by_seq[seq] = sent
        return sent

    def confirmed(self, worker: str, seq: int) -> None:
        """``worker`` received ``State`` ``seq`` (unknown or older numbers are ignored)."""
        sent = self._by_seq.get(seq)
        previous = self._confirmed.get(worker)
        if sent is not None and (previous is None or sent.seq > previous.seq):
            self._confirmed[worker] = sent

    def standby_confirmed(self, sent_at: float) -> None:
        """The standby received a frame the primary sent at ``sent_at``."""
        if self.standby_at is None or sent_at > self.standby_at:
            self.standby_at = sent_at

    # -- decisions --------------------------------------------------------------------------
    def standby_live(self, now: float) -> bool:
        return self.standby_at is not None and self.standby_at >= now - self.timing.fence_after

    def live(self, now: float) -> frozenset[str]:
        """The witnesses that heard the primary within ``fence_after``."""
        cutoff = now - self.timing.fence_after
        return frozenset(w for w, sent in self._confirmed.items() if sent.at >= cutoff)

    def reason(self, now: float, *, standby_ok: bool) -> str | None:
        """Why the primary must not acknowledge a write now (None: it may).

        ``standby_ok``: the caller's view that the standby holds what it acknowledges (a
        link, in sync in sync mode); it counts only while the standby is live here too.
        """
        if standby_ok and self.standby_live(now):
            return None
        populations = self._populations(now)
        if not populations:
            return None  # no witness: the standby never promotes itself
        live = self.live(now)
        for population in populations:
            seen = len(live & population)
            if 2 * seen < len(population):  # (half is enough: the standby needs more)
                return (
                    f"cannot see the standby or a majority of witnesses: {seen} of "
                    f"{len(population)} workers heard this primary in the last "
                    f"{self.timing.fence_after:g}s"
                )
        return None

    def covered(self, lsn: int, now: float) -> bool:
        """Whether at least half of the witnesses know the standby lacks writes up to
        ``lsn`` (they confirmed a ``State`` with ``synced`` False and an lsn >= ``lsn``)."""
        knowing = frozenset(
            w for w, sent in self._confirmed.items() if sent.synced is False and sent.lsn >= lsn
        )
        return all(2 * len(knowing & p) >= len(p) for p in self._populations(now))

    # -- bookkeeping --------------------------------------------------------------------------
    def _populations(self, now: float) -> list[frozenset[str]]:
        """The current witnesses and every set announced within ``membership`` (non-empty)."""
        self._expire(now)
        found = {self.members(now)} | {s.members for s in self._sent}
        return [p for p in found if p]

    def _expire(self, now: float) -> None:
        cutoff = now - self.timing.membership
        for worker in [w for w, at in self._left.items() if at < cutoff]:
            del self._left[worker]
            sent = self._confirmed.get(worker)
            if sent is not None and sent.at < cutoff:
                del self._confirmed[worker]
        while self._sent and self._sent[0].at < cutoff:
            old = self._sent.popleft()
            self._by_seq.pop(old.seq, None)
