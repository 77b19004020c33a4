"""The fencing rule (domain.fencing), pure: tables of what was sent and confirmed, and now."""

from __future__ import annotations

import pytest

from octaskly.domain import fencing

F = 3.0
TIMING = fencing.Timing(F)


@pytest.mark.parametrize(
    ("failover", "interval", "fence_after", "membership"),
    [(3.0, 0.75, 2.25, 15.0), (5.0, 1.0, 4.0, 23.0), (1.0, 0.25, 0.75, 7.0), (60, 1.0, 59, 243)],
)
def test_timing_fences_strictly_before_the_failover_timeout(
    failover: float, interval: float, fence_after: float, membership: float
) -> None:
    timing = fencing.Timing(failover)
    assert (timing.state_interval, timing.fence_after, timing.membership) == (
        interval,
        fence_after,
        membership,
    )
    assert timing.fence_after < timing.failover_timeout


def fence_with(workers: list[str], now: float = 100.0) -> fencing.Fence:
    fence = fencing.Fence(TIMING)
    for w in workers:
        fence.joined(w)
    return fence


def state(fence: fencing.Fence, seq: int, at: float, *, lsn: int = 10, synced: bool = True) -> None:
    fence.announce(seq, at, lsn=lsn, synced=synced)


def test_no_witness_means_no_fence() -> None:
    # with no worker the standby never promotes itself: degraded writes are safe
    assert fencing.Fence(TIMING).reason(100.0, standby_ok=False) is None


def test_a_live_standby_is_enough() -> None:
    fence = fence_with(["w1", "w2", "w3"])
    fence.standby_confirmed(99.0)
    assert fence.reason(100.0, standby_ok=True) is None
    # the caller's view alone is not: the standby must have confirmed recently
    assert fence.reason(100.0 + TIMING.fence_after + 0.1, standby_ok=True) is not None
    # and a live standby that is out of sync (sync mode) does not count
    assert fence.reason(100.0, standby_ok=False) is not None


@pytest.mark.parametrize(
    ("confirmed_at", "fenced"),
    [
        ({"w1": 99.5, "w2": 99.5, "w3": 99.5}, False),
        ({"w1": 99.5, "w2": 99.5}, False),  # 2 of 3
        ({"w1": 99.5}, True),  # 1 of 3
        ({"w1": 99.5, "w2": 100.0 - TIMING.fence_after - 0.01}, True),  # w2 heard too long ago
        ({"w1": 99.5, "w2": 100.0 - TIMING.fence_after}, False),  # (the boundary counts)
        ({}, True),
    ],
)
def test_without_the_standby_a_majority_of_witnesses_must_be_live(
    confirmed_at: dict[str, float], fenced: bool
) -> None:
    fence = fence_with(["w1", "w2", "w3"])
    for seq, (worker, at) in enumerate(sorted(confirmed_at.items()), start=1):
        state(fence, seq, at)
        fence.confirmed(worker, seq)
    reason = fence.reason(100.0, standby_ok=False)
    assert (reason is not None) is fenced, reason
    if fenced:
        assert "majority of witnesses" in reason


@pytest.mark.parametrize(("live", "fenced"), [(1, True), (2, False), (3, False)])
def test_half_of_the_witnesses_is_enough_the_standby_needs_more(live: int, fenced: bool) -> None:
    # The standby promotes only when MORE than half lost the primary: with half of them
    # still hearing it, it cannot, so the primary may go on.
    fence = fence_with(["w1", "w2", "w3", "w4"])
    state(fence, 1, 99.0)
    for w in ["w1", "w2", "w3"][:live]:
        fence.confirmed(w, 1)
    reason = fence.reason(100.0, standby_ok=False)
    assert (reason is not None) is fenced, reason
    if fenced:
        assert reason == (
            "cannot see the standby or a majority of witnesses: 1 of 4 workers heard this "
            "primary in the last 2.25s"
        )


def test_a_population_announced_while_workers_joined_fences_only_without_half() -> None:
    # w1 and w3 joined first (announced as a population of two), then w2: losing w3 leaves
    # half of the early set and two of three now, so the primary goes on.
    fence = fence_with(["w1", "w3"])
    state(fence, 1, 98.0)
    fence.joined("w2")
    state(fence, 2, 99.0)
    fence.confirmed("w1", 2)
    fence.confirmed("w2", 2)
    assert fence.reason(100.0, standby_ok=False) is None


def test_a_worker_that_left_counts_for_the_membership_window() -> None:
    fence = fence_with(["w1", "w2", "w3"])
    state(fence, 1, 99.0)
    fence.confirmed("w1", 1)
    fence.confirmed("w2", 1)
    fence.left("w3", 99.5)  # gone: still one of three for `membership` seconds
    fence.left("w2", 99.5)
    # (what w2 heard before it left still counts: it heard the primary at 99)
    assert fence.reason(100.0, standby_ok=False) is None
    now = 99.0 + TIMING.fence_after + 0.1
    state(fence, 2, now - 0.5)
    fence.confirmed("w1", 2)
    assert fence.reason(now, standby_ok=False) is not None  # 1 of 3 live
    # ... and so does every population announced within it (w1-w3 at `now - 0.5`)
    later = now - 0.5 + TIMING.membership + 0.1
    state(fence, 4, later - 0.5)
    fence.confirmed("w1", 4)
    assert fence.reason(later, standby_ok=False) is None  # 1 of 1 (w2, w3 expired)
    later += 1
    state(fence, 3, later - 0.5)
    fence.confirmed("w1", 3)
    assert fence.members(later) == {"w1"}
    assert fence.reason(later, standby_ok=False) is None  # 1 of 1


def test_workers_that_joined_later_do_not_outvote_the_announced_population() -> None:
    # The standby may only know the population announced to w1-w3. Two workers joining
    # the primary afterwards must not make a majority with w3 while w1 and w2 (maybe
    # telling the standby they lost the primary) are silent.
    fence = fence_with(["w1", "w2", "w3"])
    state(fence, 1, 98.0)
    for w in ("w4", "w5"):
        fence.joined(w)
    state(fence, 2, 99.5)
    for w in ("w3", "w4", "w5"):
        fence.confirmed(w, 2)
    reason = fence.reason(100.0, standby_ok=False)
    assert reason is not None and "1 of 3 workers" in reason
    for w in ("w1", "w2"):  # once the old members hear it again, it may go on
        fence.confirmed(w, 2)
    assert fence.reason(100.0, standby_ok=False) is None


def test_a_reconnecting_worker_is_one_witness() -> None:
    fence = fence_with(["w1", "w2"])
    fence.joined("w1")  # (a reconnect replaces its session)
    state(fence, 1, 99.5)
    fence.confirmed("w1", 1)
    fence.confirmed("w2", 1)
    assert fence.members(100.0) == {"w1", "w2"}
    assert fence.reason(100.0, standby_ok=False) is None


def test_unknown_and_older_confirmations_are_ignored() -> None:
    fence = fence_with(["w1"])
    state(fence, 1, 99.0)
    state(fence, 2, 99.6)
    fence.confirmed("w1", 2)
    fence.confirmed("w1", 1)  # late, older: keeps the newer
    fence.confirmed("w1", 77)  # never sent
    assert fence.live(100.0) == {"w1"}
    assert fence.live(99.6 + TIMING.fence_after + 0.01) == frozenset()


@pytest.mark.parametrize(
    ("knowing", "lsn", "covered"),
    [
        ({"w1": (False, 12), "w2": (False, 12)}, 12, True),
        ({"w1": (False, 12), "w2": (False, 11)}, 12, False),  # w2 knows an older lsn only
        ({"w1": (False, 12), "w2": (True, 12)}, 12, False),  # w2 was told "in sync"
        ({"w1": (False, 20), "w2": (False, 20), "w3": (False, 20)}, 13, True),
        ({"w1": (False, 20)}, 13, False),
    ],
)
def test_a_degraded_write_is_covered_when_a_majority_knows_the_standby_lacks_it(
    knowing: dict[str, tuple[bool, int]], lsn: int, covered: bool
) -> None:
    fence = fence_with(["w1", "w2", "w3"])
    for seq, (worker, (synced, at_lsn)) in enumerate(sorted(knowing.items()), start=1):
        state(fence, seq, 99.0, lsn=at_lsn, synced=synced)
        fence.confirmed(worker, seq)
    assert fence.covered(lsn, 100.0) is covered
