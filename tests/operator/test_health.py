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


def test_lease_silence_while_the_operator_could_not_read_is_not_the_agents() -> None:
    """The API server was out for 60 s (no pass between NOW and NOW + 60): every Lease is 60 s
    old when the operator reads again, before any agent came back; none is silent for that. An
    agent that stays silent after is judged from there, and one that was silent before the
    outage keeps what it had accrued."""
    settings = FleetSettings()  # agent grace 30 s
    tracker = HealthTracker(settings)
    assert tracker.judge(signals(True, 0.0, has_work=True, renew=NOW - 1), NOW) is Health.HEALTHY
    back = NOW + 60
    assert tracker.judge(signals(True, 0.0, has_work=True, renew=NOW - 1), back) is Health.HEALTHY
    assert tracker.unobserved == (NOW, back)
    assert tracker.judge(signals(True, 0.0, has_work=True, renew=NOW - 1), back + 13) is Health.HEALTHY
    assert tracker.judge(signals(True, 0.0, has_work=True, renew=NOW - 1), back + 16) is Health.SUSPECT
    assert tracker.judge(signals(True, 0.0, has_work=True, renew=NOW - 1), back + 30) is Health.AGENT_SILENT
    # silent for 20 s before the outage: 10 s more after it
    tracker = HealthTracker(settings)
    tracker.judge(signals(True, 0.0, has_work=True, renew=NOW - 20), NOW)
    assert tracker.judge(signals(True, 0.0, has_work=True, renew=NOW - 20), back) is Health.SUSPECT
    assert tracker.judge(signals(True, 0.0, has_work=True, renew=NOW - 20), back + 10) is Health.AGENT_SILENT


def test_passes_at_the_resync_pace_leave_lease_silence_counted() -> None:
    settings = FleetSettings()  # agent grace 30 s; passes every 10 s
    tracker = HealthTracker(settings)
    for t in range(0, 31, 10):
        health = tracker.judge(signals(True, 0.0, has_work=True, renew=NOW), NOW + t)
    assert health is Health.AGENT_SILENT
    assert tracker.unobserved == (NOW - settings.agent_grace_s, NOW), "only the span before its start"


def test_a_replica_that_starts_right_after_an_outage_does_not_judge_every_agent_silent() -> None:
    """A replica's first pass cannot tell a dead agent from one still in its backoff after an API
    server outage: Lease silence within the agent grace before its start is not counted; an agent
    silent longer than that, or still silent a grace later, is judged as usual."""
    settings = FleetSettings()  # agent grace 30 s
    tracker = HealthTracker(settings)
    assert tracker.judge(signals(True, 0.0, has_work=True, renew=NOW - 40), NOW) is Health.HEALTHY
    assert tracker.judge(signals(True, 0.0, has_work=True, renew=NOW - 40), NOW + 20) is Health.AGENT_SILENT
    tracker = HealthTracker(settings)
    assert tracker.judge(signals(True, 0.0, has_work=True, renew=NOW - 70), NOW) is Health.AGENT_SILENT


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
