"""Shard ownership: the pure decisions (who should own what, whether a hold is valid), the backoff,
and the Lease I/O of two replicas against the real API server with hand-driven clocks."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest

from edgefleet_operator.fleet_loop import backoff_delay
from edgefleet_operator.ownership import (
    FLEET_SHARD,
    Hold,
    LeaseView,
    Step,
    assignment,
    desired_owner,
    failover_bound_s,
    live_members,
    shard_step,
)
from edgefleet_operator.settings import OwnershipSettings


def lease(holder: str, seen_s: float = 0.0, duration_s: float = 15.0, version: str = "1") -> LeaseView:
    return LeaseView("l", holder, duration_s, version, seen_s)


# --- who should own what -------------------------------------------------------------------------


def test_the_desired_owner_is_the_same_whatever_order_members_are_listed_in() -> None:
    members = ["op-a/1", "op-b/1", "op-c/1"]
    owner = desired_owner(FLEET_SHARD, members)
    assert owner in members
    assert desired_owner(FLEET_SHARD, list(reversed(members))) == owner
    assert desired_owner(FLEET_SHARD, []) is None


def test_sites_spread_over_replicas_and_a_departure_moves_only_its_own() -> None:
    sites = [f"site-{i}" for i in range(600)]
    members = ["op-a", "op-b", "op-c"]
    before = assignment(sites, members)
    counts = Counter(before.values())
    assert set(counts) == set(members) and min(counts.values()) > 150, counts  # about 1/3 each
    after = assignment(sites, ["op-a", "op-c"])
    moved = [s for s in sites if before[s] != after[s]]
    assert moved and all(before[s] == "op-b" for s in moved), "only op-b's sites move"
    assert len(moved) == counts["op-b"]


def test_live_members_are_the_unexpired_ones_and_always_me() -> None:
    members = [lease("a", seen_s=0), lease("b", seen_s=10), lease("", seen_s=10)]
    assert live_members(members, "me", now_s=14) == ("a", "b", "me")
    assert live_members(members, "me", now_s=15) == ("b", "me"), "a not renewed for its duration"


# --- the step per shard --------------------------------------------------------------------------


def owner_and_other(shard: str = FLEET_SHARD) -> tuple[str, str]:
    a, b = "op-a", "op-b"
    return (a, b) if desired_owner(shard, [a, b]) == a else (b, a)


def test_only_the_desired_owner_acquires_a_free_shard() -> None:
    owner, other = owner_and_other()
    members = [owner, other]
    assert shard_step(FLEET_SHARD, owner, None, members, 0) is Step.ACQUIRE
    assert shard_step(FLEET_SHARD, other, None, members, 0) is Step.STANDBY
    released = lease("", seen_s=0)
    assert shard_step(FLEET_SHARD, owner, released, members, 1) is Step.ACQUIRE


def test_a_held_shard_is_not_taken_before_it_expires_by_the_observers_clock() -> None:
    owner, other = owner_and_other()
    held_by_other = lease(other, seen_s=100, duration_s=15)
    assert shard_step(FLEET_SHARD, owner, held_by_other, [owner, other], 114.9) is Step.STANDBY
    assert shard_step(FLEET_SHARD, owner, held_by_other, [owner, other], 115) is Step.ACQUIRE
    # Even the desired owner never takes an unexpired hold; a non-owner never takes an expired one.
    assert shard_step(FLEET_SHARD, other, lease(owner, seen_s=0), [owner, other], 100) is Step.STANDBY


def test_the_holder_renews_while_desired_and_releases_when_not() -> None:
    owner, other = owner_and_other()
    assert shard_step(FLEET_SHARD, owner, lease(owner, seen_s=10), [owner, other], 12) is Step.RENEW
    # `other` holds (it was alone), then `owner` joins: `other` hands over.
    assert shard_step(FLEET_SHARD, other, lease(other, seen_s=10), [owner, other], 12) is Step.RELEASE
    assert shard_step(FLEET_SHARD, other, lease(other, seen_s=10), [other], 12) is Step.RENEW
    # An own hold that lapsed is taken anew (conditionally: whoever took it meanwhile wins).
    assert shard_step(FLEET_SHARD, owner, lease(owner, seen_s=0), [owner, other], 20) is Step.ACQUIRE


def test_a_hold_is_valid_until_its_send_time_plus_duration_less_the_margin() -> None:
    hold = Hold(FLEET_SHARD, sent_s=100, duration_s=15)
    assert hold.valid(margin_s=3, now_s=111.9)
    assert not hold.valid(margin_s=3, now_s=112)
    # Another replica that saw the renew (at or after 100) takes over at 115 at the earliest.
    assert hold.valid_until(3) < 100 + 15


def test_the_failover_bound_and_settings_that_cannot_hold_it_are_refused() -> None:
    assert failover_bound_s(15, 5) == 25
    with pytest.raises(ValueError, match="renew interval"):
        OwnershipSettings(lease_duration_s=5, renew_interval_s=4, margin_s=2)
    with pytest.raises(ValueError, match="duration"):
        OwnershipSettings(lease_duration_s=0.5, renew_interval_s=0.1, margin_s=0)


# --- backoff -------------------------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_with_full_jitter() -> None:
    top = [backoff_delay(n, 1.0, 30.0, rand=0.999999) for n in range(1, 9)]
    assert [round(t) for t in top] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff_delay(3, 1.0, 30.0, rand=0.0) == 0.0
    assert backoff_delay(3, 1.0, 30.0, rand=0.5) == 2.0
    assert backoff_delay(10_000, 1.0, 30.0, rand=0.5) == 15.0, "no overflow after many failures"
    with pytest.raises(ValueError):
        backoff_delay(0, 1.0, 30.0, rand=0.5)


# --- the Lease I/O against the API server, two replicas, clocks driven by hand --------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.cluster
def test_two_replicas_never_both_hold_and_the_survivor_takes_over(kube: Any, namespace: str) -> None:
    from kubernetes import client

    from edgefleet_operator.shard_leases import ShardLeases, shard_lease_name

    settings = OwnershipSettings(lease_duration_s=15, renew_interval_s=5, margin_s=3)
    shard = f"t-{uuid.uuid4().hex[:6]}"
    clock = Clock()
    api = client.CoordinationV1Api(kube)
    a, b = (
        ShardLeases(api, namespace, ident, [shard], settings, clock=clock) for ident in ("op-a/1", "op-b/1")
    )
    a.round()  # a alone: it is the desired owner of everything
    assert a.holds(shard) and not b.holds(shard)
    b.round()  # b joins; the shard's desired owner may now be b, but a's hold is unexpired
    assert not b.holds(shard)
    for _ in range(6):  # rounds interleaved: at most one holder at any time, and one in the end
        clock.t += 2.5
        a.round()
        assert not (a.holds(shard) and b.holds(shard))
        b.round()
        assert not (a.holds(shard) and b.holds(shard))
    holder, standby = (a, b) if a.holds(shard) else (b, a)
    assert holder.holds(shard), "the desired owner holds it after the handover"
    assert desired_owner(shard, ["op-a/1", "op-b/1"]) == holder.identity
    lease_obj = api.read_namespaced_lease(shard_lease_name(shard), namespace)
    assert lease_obj.spec.holder_identity == holder.identity

    # The holder dies (no more rounds): its hold lapses by its own clock before the other may take it.
    died = clock.t
    while not standby.holds(shard):
        clock.t += 1
        standby.round()
        assert clock.t - died <= failover_bound_s(15, 5), "taken over within the bound"
        if standby.holds(shard):
            assert not holder.holds(shard), "the dead holder's hold had lapsed (margin) before"
    assert clock.t - died >= 15, "not before the lease duration"
    assert api.read_namespaced_lease(shard_lease_name(shard), namespace).spec.holder_identity == (
        standby.identity
    )

    # The old holder comes back: the shard is held (just renewed) by the other, so it stands by.
    clock.t += 1
    holder.round()
    assert not holder.holds(shard) and standby.holds(shard)
    standby.release_all()
    assert not standby.holds(shard)
    holder.round()
    assert holder.holds(shard), "a released shard is taken at the next round, not after a duration"


class ListBarrier:
    """A CoordinationV1Api whose Lease lists wait for each other: both replicas decide from the same
    (empty) view, so both try to create the shard Lease at once."""

    def __init__(self, api: Any, barrier: Any) -> None:
        self.api, self.barrier = api, barrier
        self.api_client = api.api_client

    def list_namespaced_lease(self, *args: Any, **kwargs: Any) -> Any:
        out = self.api.list_namespaced_lease(*args, **kwargs)
        self.barrier.wait(10)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)


@pytest.mark.cluster
def test_replicas_that_decide_at_once_from_the_same_view_never_both_hold(kube: Any, namespace: str) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from kubernetes import client

    from edgefleet_operator.shard_leases import ShardLeases

    settings = OwnershipSettings(lease_duration_s=15, renew_interval_s=5, margin_s=3)
    api = client.CoordinationV1Api(kube)
    shard, barrier = f"race-{uuid.uuid4().hex[:4]}", threading.Barrier(2)
    replicas = [
        ShardLeases(ListBarrier(api, barrier), namespace, f"op-{i}", [shard], settings) for i in range(2)
    ]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda r: r.round(), replicas))
    holders = [r.identity for r in replicas if r.holds(shard)]
    assert len(holders) == 1, holders  # each saw itself alone and the shard free: both tried to create it
    for _ in range(3):  # then from the same view each time: still one at most
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda r: r.round(), replicas))
        holders = [r.identity for r in replicas if r.holds(shard)]
        assert len(holders) <= 1, holders
