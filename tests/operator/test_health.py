"""Node health judgement (pure): NotReady vs agent silence, grace periods, flap damping."""

from __future__ import annotations

from edgefleet_operator.fleet_types import Health
from edgefleet_operator.health import HealthTracker, NodeSignals
from edgefleet_operator.settings import FleetSettings

NOW = 1_000_000.0


def signals(ready: bool, since: float, has_work: bool, renew: float | None = None) -> NodeSignals:
    return NodeSignals("n", ready, since, renew, has_work)


def test_a_new_node_that_was_not_ready_yet_gets_work_as_soon_as_it_is_ready() -> None:
    tracker = HealthTracker(FleetSettings())
    # kubelet has not posted Ready yet: no condition reads as "not ready since the epoch"
    assert tracker.judge(signals(False, 0.0, has_work=False), NOW) is Health.NOT_READY
    assert tracker.judge(signals(True, NOW + 1, has_work=False), NOW + 2) is Health.HEALTHY


def test_a_node_that_lost_its_work_is_damped_from_when_it_was_last_seen_down() -> None:
    settings = FleetSettings()
    tracker = HealthTracker(settings)
    down = NOW - settings.not_ready_grace_s
    assert tracker.judge(signals(False, down, has_work=True), NOW) is Health.NOT_READY
    # its work moved away; it stays down a while longer (no work now, still remembered)
    assert tracker.judge(signals(False, down, has_work=False), NOW + 300) is Health.NOT_READY
    back = NOW + 301
    assert tracker.judge(signals(True, back, has_work=False), back + 1) is Health.SUSPECT
    assert tracker.judge(signals(True, back, has_work=False), NOW + 300 + settings.flap_damping_s - 1) is (
        Health.SUSPECT
    )
    assert tracker.judge(signals(True, back, has_work=False), NOW + 300 + settings.flap_damping_s + 1) is (
        Health.HEALTHY
    )


def test_not_ready_within_the_grace_period_is_suspect_and_keeps_its_work() -> None:
    settings = FleetSettings()
    tracker = HealthTracker(settings)
    assert tracker.judge(signals(False, NOW - 1, has_work=True), NOW) is Health.SUSPECT
    assert not tracker.lost_work_at


def test_a_standby_replica_is_live_and_a_stuck_one_is_not() -> None:
    from edgefleet_operator.health import replica_liveness

    # A standby runs no passes: its pass age grows without bound and it is healthy all the same.
    assert replica_liveness(False, pass_age_s=3600, lease_round_age_s=4, resync_s=10, renew_s=5) is None
    # ... as long as its Lease rounds go on.
    assert "lease round" in (replica_liveness(False, 0, 46, 10, 5) or "")
    # A holder must also pass.
    assert "fleet reconcile" in (replica_liveness(True, 61, 4, 10, 5) or "")
    assert replica_liveness(True, 59, 4, 10, 5) is None
    # Without Leases (--standalone) only the passes count.
    assert replica_liveness(True, 59, None, 10, 5) is None
