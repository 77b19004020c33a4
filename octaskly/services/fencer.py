"""The primary's fence: it stops acknowledging writes before its standby may promote.

The rule and why it holds are in :mod:`octaskly.domain.fencing`; this is its I/O: the
numbered ``State`` messages to the workers and their confirmations, the standby's echoes,
the gate every acknowledgement passes (:meth:`Fencer.acknowledge`), and how the fence is
reported (status, ``/health``, metrics).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from octaskly import errors
from octaskly.domain import fencing
from octaskly.protocol import messages

if TYPE_CHECKING:
    from octaskly.services.ha import HA

log = logging.getLogger(__name__)


class FencedError(errors.TemporaryError):
    """This primary may have been replaced: it acknowledges no write (API 503)."""


class Fencer:
    def __init__(self, ha: HA) -> None:
        self.ha = ha
        self.timing = fencing.Timing(ha.options.failover_timeout)
        self.fence = fencing.Fence(self.timing)
        self._seq = 0
        self._heard = asyncio.Event()
        self.since: float | None = None
        """Wall-clock time the fence went up (None: not fenced)."""
        self.reason: str | None = None
        self.broadcast: Callable[[], None] | None = None
        """Sends a fresh State to every worker now (set by peering)."""

    # -- the workers' side ---------------------------------------------------------------------
    def announce(self) -> messages.State:
        """The State to send every worker now, numbered for their confirmations."""
        self._seq += 1
        state = self.ha.state_message()
        sent = self.fence.announce(
            self._seq, time.monotonic(), lsn=state.lsn, synced=state.standby_synced
        )
        return state.model_copy(update={"seq": self._seq, "population": len(sent.members)})

    def joined(self, worker: str, *, heard_at: float) -> None:
        """A worker's session opened; its handshake proves it heard us after `heard_at`."""
        self.fence.joined(worker, heard_at=heard_at)
        self._recheck()

    def left(self, worker: str) -> None:
        self.fence.left(worker, time.monotonic())

    def confirmed(self, worker: str, seq: int) -> None:
        self.fence.confirmed(worker, seq)
        self._heard.set()
        self._recheck()

    def standby_confirmed(self, sent: float) -> None:
        if 0 < sent <= time.monotonic():
            self.fence.standby_confirmed(sent)
            self._heard.set()
            self._recheck()

    def _recheck(self) -> None:
        """A fence comes down as soon as what lifts it arrives (the scheduler waits)."""
        if self.since is not None:
            self.check()

    # -- decisions -----------------------------------------------------------------------------
    def applies(self) -> bool:
        """Fencing matters on a primary that has (or had) a standby that could promote."""
        ha = self.ha
        source = ha.source
        return (
            ha.enabled
            and ha.role == "primary"
            and source is not None
            and (source.had_standby or ha.has_peer)
        )

    def check(self) -> str | None:
        """Why this primary must not acknowledge a write now (None: it may); keeps
        :attr:`since`/:attr:`reason` and wakes the scheduler when the fence comes down."""
        reason = None
        if self.applies():
            reason = self.fence.reason(time.monotonic(), standby_ok=self._standby_ok())
        if reason is None:
            if self.since is not None:
                log.warning("fence lifted: %s", self._lifted())
                self.since, self.reason = None, None
                self.ha.d.wake()
            return None
        if self.since is None:
            self.since = time.time()
            log.error("fenced: %s; acknowledging no writes, assigning no tasks", reason)
            self.ha.event("fenced", reason)
        self.reason = reason
        return self.describe()

    def describe(self) -> str | None:
        """ "fenced since T: reason", or None when not fenced."""
        if self.since is None:
            return None
        return f"fenced since {_rfc3339(self.since)}: {self.reason}"

    def refusal(self) -> str | None:
        """What a write is answered with while fenced (None: not fenced), naming where the
        primary may now be."""
        fenced = self.check()
        if fenced is None:
            return None
        where = self.ha.load_peer()
        hint = f"; the primary may now be the standby at P2P {where}: use its API" if where else ""
        return f"this dispatcher is {fenced}{hint}"

    def refuse(self) -> None:
        """Raise FencedError if fenced (before a write)."""
        message = self.refusal()
        if message is not None:
            raise FencedError(message, delay=1)

    async def acknowledge(self, lsn: int) -> None:
        """Return once a write at `lsn` may be acknowledged; FencedError if it may not.

        A write the standby holds (or, async, is streaming) passes; without one, more than
        half of the witnesses must be live and know the standby lacks it (one round of
        States for the first write past what a standby was sent; the later ones are known
        with it).
        """
        if not self.applies():
            return
        now = time.monotonic()
        if self._standby_ok() and self.fence.standby_live(now):
            return
        self.refuse()
        # Known missing from every standby that could promote: it holds at most what was
        # ever sent to one, and a witness that knows "not in sync at lsn >= L" makes a
        # standby lacking L refuse to promote itself.
        need = min(lsn, self._standby_lsn() + 1)
        if self.fence.covered(need, now):
            return
        deadline = now + self.timing.fence_after
        if self.broadcast is not None:
            self.broadcast()
        while not self.fence.covered(need, time.monotonic()):
            self.refuse()
            left = deadline - time.monotonic()
            if left <= 0:
                self.reason = (
                    "could not tell a majority of witnesses that the standby lacks writes "
                    f"within {self.timing.fence_after:g}s"
                )
                raise FencedError(
                    f"not acknowledged: {self.reason}; retry (the write may be set aside)",
                    delay=1,
                )
            self._heard.clear()
            try:
                await asyncio.wait_for(self._heard.wait(), left)
            except TimeoutError:
                continue

    def status(self) -> dict[str, Any] | None:
        if self.since is None:
            return None
        return {
            "since": _rfc3339(self.since),
            "reason": self.reason,
            "fence_after_seconds": self.timing.fence_after,
        }

    # -- internals -----------------------------------------------------------------------------
    def _standby_ok(self) -> bool:
        source = self.ha.source
        return source is not None and source.link is not None and (not source.sync or source.synced)

    def _standby_lsn(self) -> int:
        source = self.ha.source
        return source.sent_lsn if source is not None else 0

    def _lifted(self) -> str:
        now = time.monotonic()
        if self._standby_ok() and self.fence.standby_live(now):
            return "the standby is back"
        return f"{len(self.fence.live(now))} witnesses hear this primary again"


def _rfc3339(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat().replace("+00:00", "Z")
