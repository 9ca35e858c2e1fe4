"""Node health judgement (pure): NotReady vs agent silence, grace periods, flap damping."""

from __future__ import annotations

from edgefleet_operator.fleet_types import Health
from edgefleet_operator.health import HealthTracker, NodeSignals
from edgefleet_operator.settings import FleetSettings

NOW = 1_000_000.0


def signals(ready: bool, since: float, has_work: bool, renew: float | None = None) -> NodeSignals:
    return NodeSignals("n", ready, since, renew, has_work)


def test_a_new_node_that_was_not_ready_yet_gets_work_as_soon_as_it_is_ready() -> None:
    tracker = HealthTracker(FleetSettings(agent_grace_s=30.0))
    # kubelet has not posted Ready yet: no condition reads as "not ready since the epoch"
    assert tracker.judge(signals(False, 0.0, has_work=False), NOW) is Health.NOT_READY
    assert tracker.judge(signals(True, NOW + 1, has_work=False), NOW + 2) is Health.HEALTHY


def test_a_node_that_lost_its_work_is_damped_from_when_it_was_last_seen_down() -> None:
    settings = FleetSettings(agent_grace_s=30.0)
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


def healthy_agent(renew: float) -> NodeSignals:
    return signals(True, 0.0, has_work=True, renew=renew)


def running(settings: FleetSettings) -> HealthTracker:
    """A tracker that has judged every 5 s for a while, the last time at NOW (what its first
    judgement left unobserved is gone)."""
    tracker = HealthTracker(settings)
    for t in range(-200, 1, 5):
        tracker.judge(NodeSignals("other", True, 0.0, NOW + t, True), NOW + t)
    assert tracker.unobserved == [] and tracker.gap is None
    return tracker


def test_a_long_gap_between_passes_is_not_the_agents_silence() -> None:
    """No pass between NOW and NOW + 60, and no failure reported (a stalled call that its retry
    hid): every Lease is 60 s old at the next read; none is silent for that. Only the last such
    gap is discounted, with no backoff allowance: an agent that stays silent after is judged from
    there, and one that was silent before keeps what it had accrued."""
    settings = FleetSettings(agent_grace_s=30.0)  # agent grace 30 s
    tracker = HealthTracker(settings)
    tracker.judge(healthy_agent(NOW - 100), NOW - 100)  # not the replica's first judgement
    assert tracker.judge(healthy_agent(NOW - 1), NOW) is Health.HEALTHY
    back = NOW + 60
    assert tracker.judge(healthy_agent(NOW - 1), back) is Health.HEALTHY
    assert tracker.gap == (NOW, back)
    assert tracker.judge(healthy_agent(NOW - 1), back + 13) is Health.HEALTHY
    assert tracker.judge(healthy_agent(NOW - 1), back + 16) is Health.SUSPECT
    assert tracker.judge(healthy_agent(NOW - 1), back + 30) is Health.AGENT_SILENT
    # silent for 20 s before the gap: 10 s more after it
    tracker = running(settings)
    assert tracker.judge(healthy_agent(NOW - 20), back) is Health.SUSPECT
    assert tracker.judge(healthy_agent(NOW - 20), back + 10) is Health.AGENT_SILENT


def test_passes_slower_than_half_the_grace_still_judge_a_dead_agent() -> None:
    """Every gap between passes is long (20 s, no failure): only the last is discounted, so a dead
    agent's silence accrues one pass late."""
    settings = FleetSettings(agent_grace_s=30.0)  # agent grace 30 s
    tracker = running(settings)
    verdicts = [tracker.judge(healthy_agent(NOW), NOW + t) for t in range(20, 81, 20)]
    assert verdicts == [Health.HEALTHY, Health.SUSPECT, Health.AGENT_SILENT, Health.AGENT_SILENT]


def test_passes_at_the_resync_pace_leave_lease_silence_counted() -> None:
    settings = FleetSettings(agent_grace_s=30.0)  # agent grace 30 s; passes every 10 s
    tracker = HealthTracker(settings)
    tracker.judge(healthy_agent(NOW - 10), NOW - 10)
    for t in range(0, 31, 10):
        health = tracker.judge(healthy_agent(NOW), NOW + t)
    assert health is Health.AGENT_SILENT
    assert tracker.unobserved == [(NOW - 10 - settings.agent_grace_s, NOW - 10)], (
        "only the span before its start"
    )
    assert tracker.gap is None


def test_a_span_the_operator_could_not_read_gives_every_agent_the_backoff_allowance_then_its_grace() -> None:
    """The rule: a span in which the operator could not read the API server (`lost_sight`: its
    passes failed, or it held no shard), from its last judgement to the one after, is not the
    agents' silence, and neither are the next `agent_backoff_max_s` (agents retry at their own
    backoff after the API server is back). An agent not heard from since keeps what it accrued
    before the span; after the allowance its grace runs as usual. An agent that renews after
    observation resumed is judged from that renewal alone."""
    settings = FleetSettings(agent_grace_s=10.0, agent_backoff_max_s=16.0)  # the fault test's
    tracker = running(settings)  # its last pass before: NOW
    for _ in range(3):  # passes fail, then the hold lapses (standby): both call lost_sight
        tracker.lost_sight()
    back = NOW + 4  # short: no long gap, yet unobserved
    late, renewed = healthy_agent(NOW - 1), NodeSignals("back", True, 0.0, back + 15, True)
    verdicts = {0: (tracker.judge(late, back), Health.HEALTHY)}
    assert tracker.unobserved == [(NOW, back)] and tracker.gap is None
    for t in range(1, 26):  # passes every second from `back` on
        verdicts[t] = (tracker.judge(late, back + t), tracker.judge(renewed, back + t))
    # the late agent, still in its backoff: 16 s after `back` only the 1 s before the span counts
    assert tracker.observed_silence(NOW - 1, back + 16) == 1.0
    assert verdicts[16][0] is Health.HEALTHY
    assert verdicts[19][0] is Health.HEALTHY and verdicts[20][0] is Health.SUSPECT
    assert verdicts[24][0] is Health.SUSPECT and verdicts[25][0] is Health.AGENT_SILENT
    # the one that renewed 15 s after `back`, then went silent: judged from that renewal
    assert verdicts[24][1] is Health.SUSPECT and verdicts[25][1] is Health.AGENT_SILENT


def test_an_agent_silent_before_the_span_stays_silent_after_it() -> None:
    settings = FleetSettings(agent_grace_s=30.0)  # agent grace 30 s
    tracker = running(settings)
    assert tracker.judge(healthy_agent(NOW - 31), NOW) is Health.AGENT_SILENT
    tracker.lost_sight()
    assert tracker.judge(healthy_agent(NOW - 31), NOW + 60) is Health.AGENT_SILENT


def test_every_unobserved_span_counts_not_only_the_last() -> None:
    """An API server restart: one pass gets through, then the server fails again for a while. The
    first span is not forgotten when the second starts: the agent that has not renewed since before
    the first is judged on what was observed (1 s before + 1 s between)."""
    settings = FleetSettings(agent_grace_s=10.0, agent_backoff_max_s=16.0)
    tracker = running(settings)
    tracker.lost_sight()
    tracker.judge(healthy_agent(NOW - 1), NOW + 14)  # one pass through
    tracker.judge(healthy_agent(NOW - 1), NOW + 15)
    tracker.lost_sight()
    assert tracker.judge(healthy_agent(NOW - 1), NOW + 25) is Health.HEALTHY
    assert tracker.unobserved == [(NOW, NOW + 14), (NOW + 15, NOW + 25)]
    assert tracker.observed_silence(NOW - 1, NOW + 25) == 1.0
    assert tracker.observed_silence(NOW - 1, NOW + 25 + 16 + 5) == 6.0


def test_spans_that_change_no_verdict_are_dropped() -> None:
    settings = FleetSettings(agent_grace_s=10.0, agent_backoff_max_s=16.0)
    tracker = running(settings)
    tracker.lost_sight()
    tracker.judge(healthy_agent(NOW + 3), NOW + 4)
    assert tracker.unobserved == [(NOW, NOW + 4)]
    for t in range(5, 30):  # observed again, pass after pass, for 16 s + a full grace
        tracker.judge(healthy_agent(NOW + t), NOW + t)
    assert tracker.unobserved == [(NOW, NOW + 4)]
    tracker.judge(healthy_agent(NOW + 30), NOW + 30.5)
    assert tracker.unobserved == []
    assert tracker.judge(healthy_agent(NOW - 1), NOW + 31) is Health.AGENT_SILENT


def test_a_replica_that_starts_right_after_an_outage_does_not_judge_every_agent_silent() -> None:
    """A replica's first pass cannot tell a dead agent from one still in its backoff after an API
    server outage: Lease silence within the agent grace before its start is not counted, nor any
    within the backoff allowance after; an agent silent longer than the grace before the start, or
    still silent a grace after the allowance, is judged as usual."""
    settings = FleetSettings(agent_grace_s=30.0)  # agent grace 30 s, backoff allowance 30 s
    tracker = HealthTracker(settings)
    assert tracker.judge(healthy_agent(NOW - 40), NOW) is Health.HEALTHY
    assert tracker.judge(healthy_agent(NOW - 40), NOW + 30) is Health.HEALTHY
    assert tracker.judge(healthy_agent(NOW - 40), NOW + 35) is Health.SUSPECT
    assert tracker.judge(healthy_agent(NOW - 40), NOW + 50) is Health.AGENT_SILENT
    tracker = HealthTracker(settings)
    assert tracker.judge(healthy_agent(NOW - 70), NOW) is Health.AGENT_SILENT


def test_not_ready_within_the_grace_period_is_suspect_and_keeps_its_work() -> None:
    settings = FleetSettings(agent_grace_s=30.0)
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
