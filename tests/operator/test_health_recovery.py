"""The recovery rule (`HealthTracker.begin_pass`): after a span the operator could not observe, no
agent is judged silent while the fleet is still coming back (a reconnect storm through a restarted
API server), and a dead agent is still judged within a bound."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edgefleet_operator.fleet_types import Health
from edgefleet_operator.health import HealthTracker, NodeSignals
from edgefleet_operator.settings import FleetSettings

NOW = 1_000_000.0
RENEW_S = 15.0
SETTINGS = FleetSettings(agent_grace_s=45.0, agent_backoff_max_s=30.0, reconnect_wait_max_s=900.0)


def run_fleet(
    agents: int,
    comes_back: Callable[[int], float | None],
    until_s: float,
    outage: tuple[float, float] = (NOW, NOW + 120),
    recovery: bool = True,
    passes_in_outage: bool = False,
) -> dict[int, float]:
    """Passes every 5 s over `agents` agents renewing every RENEW_S, with the API server down in
    `outage` (the operator's passes there fail, or, `passes_in_outage`, run from its cache with the
    watches failing: `lost_sight` either way); agent i renews again first at `comes_back(i)` (None:
    never, it died in the outage). Returns, per agent judged AgentSilent, the first time it was."""
    tracker = HealthTracker(SETTINGS)
    silent: dict[int, float] = {}
    t = NOW - 60
    while t <= until_s:
        if outage[0] <= t < outage[1]:
            tracker.lost_sight()
            if not passes_in_outage:
                t += 5
                continue
        renewals = [last_renewal(i, t, outage, comes_back(i)) for i in range(agents)]
        if recovery:
            tracker.begin_pass(t, renewals)
        for i, renew in enumerate(renewals):
            verdict = tracker.judge(NodeSignals(f"n{i}", True, 0.0, renew, True), t)
            if verdict is Health.AGENT_SILENT:
                silent.setdefault(i, t)
        t += 5
    return silent


def last_renewal(i: int, t: float, outage: tuple[float, float], back: float | None) -> float:
    """Agent i renews every RENEW_S (phase by i) until the outage, then from `back` on."""
    phase = (i * 0.37) % RENEW_S
    if t < outage[0] or back is None or t < back:
        until = min(t, outage[0])
        return until - ((until - NOW - phase) % RENEW_S)
    return t - ((t - back) % RENEW_S)


def storm(per_s: float, start: float = NOW + 120) -> Callable[[int], float]:
    """Agents let back in one after another, `per_s` per second, from `start`."""
    return lambda i: start + i / per_s


@pytest.mark.parametrize("passes_in_outage", [False, True])
def test_a_reconnect_storm_longer_than_the_allowance_moves_nothing(passes_in_outage: bool) -> None:
    """100 agents let back in over 200 s (longer than the backoff allowance + grace, 75 s): none is
    judged silent, whether the operator's passes failed in the outage or ran blind from its cache
    (one outage seen as many spans); without the recovery rule most are (the test bites)."""
    assert run_fleet(100, storm(0.5), until_s=NOW + 600, passes_in_outage=passes_in_outage) == {}
    without = run_fleet(100, storm(0.5), until_s=NOW + 600, recovery=False, passes_in_outage=passes_in_outage)
    assert len(without) > 50


def test_an_agent_that_died_in_the_outage_is_judged_within_a_bound() -> None:
    """Agent 0 never comes back: it is judged silent after the storm's last return, the stall
    window (backoff max + grace), the allowance and a grace; nobody else is."""
    back = storm(0.5)
    silent = run_fleet(100, lambda i: None if i == 0 else back(i), until_s=NOW + 900)
    assert set(silent) == {0}
    last_return = back(99)
    stall = SETTINGS.agent_backoff_max_s + SETTINGS.agent_grace_s
    bound = last_return + stall + SETTINGS.agent_backoff_max_s + SETTINGS.agent_grace_s + 2 * 5
    assert last_return + SETTINGS.agent_grace_s < silent[0] <= bound


def test_a_stalled_return_ends_the_wait() -> None:
    """Half the fleet (a site cut off in the outage) never comes back: once no agent has come back
    for the stall window the wait ends, and the missing half is judged silent, well before the
    wait's cap."""
    silent = run_fleet(40, lambda i: NOW + 125 + i if i < 20 else None, until_s=NOW + 700)
    assert set(silent) == set(range(20, 40))
    assert max(silent.values()) < NOW + 125 + 20 + 3 * 75 + 10


def test_the_wait_is_capped() -> None:
    """Agents trickling back one a minute (each within the stall window) hold judgement at most
    `reconnect_wait_max_s`; then those still missing are judged."""
    settings_cap = SETTINGS.reconnect_wait_max_s
    silent = run_fleet(40, storm(1 / 60), until_s=NOW + 120 + settings_cap + 200)
    assert silent, "the cap ended the wait"
    first = min(silent.values())
    assert NOW + 120 + settings_cap < first <= NOW + 120 + settings_cap + 30 + 45 + 10


def test_when_only_the_operator_was_blind_the_wait_ends_on_the_next_renewals() -> None:
    """The agents kept renewing while the operator could not see (its own link was down): the wait
    ends as soon as each has renewed once more; an agent that died meanwhile holds it only for the
    stall window, then is judged as without the wait."""
    tracker = HealthTracker(SETTINGS)
    assert tracker.begin_pass(NOW, [NOW - 1, NOW - 2]) is not None  # a fresh replica waits too
    assert tracker.begin_pass(NOW + RENEW_S, [NOW + RENEW_S - 1, NOW + RENEW_S - 2]) is None
    tracker.lost_sight()
    t = NOW + 100
    assert tracker.begin_pass(t, [t - 1, t - 2]) is not None
    assert tracker.begin_pass(t + RENEW_S, [t + RENEW_S - 1, t + RENEW_S - 2]) is None

    tracker.lost_sight()
    t = NOW + 200
    dead_since = t - 20  # died within the span
    assert tracker.begin_pass(t, [t - 1, dead_since]) is not None
    assert tracker.begin_pass(t + 5, [t + 4, dead_since]) is not None  # agent 0 back at t + 4
    stall_end = t + 5 + SETTINGS.agent_backoff_max_s + SETTINGS.agent_grace_s
    for p in range(int(t + 10), int(stall_end), 5):  # passes every 5 s; agent 0 renews
        assert tracker.begin_pass(p, [p - 1, dead_since]) is not None
    assert tracker.begin_pass(stall_end, [stall_end - 1, dead_since]) is None
    dead = NodeSignals("n1", True, 0.0, dead_since, True)
    # the wait covered up to its last pass (stall_end - 5); then the allowance, then the grace
    verdict_at = int(stall_end - 5 + SETTINGS.agent_backoff_max_s + SETTINGS.agent_grace_s)
    verdicts = {p: tracker.judge(dead, p) for p in range(int(stall_end) + 5, verdict_at + 1, 5)}
    assert verdicts[verdict_at - 5] is Health.SUSPECT
    assert verdicts[verdict_at] is Health.AGENT_SILENT


def not_ready_after(tracker: HealthTracker, transition: float, renew: float, t: float) -> Health:
    return tracker.judge(NodeSignals("n", False, transition, renew, True), t)


def test_nodes_marked_not_ready_in_an_outages_wake_keep_their_work_while_their_agents_renew() -> None:
    """The outage rule: after the API server came back, the node lifecycle controller marks Nodes
    NotReady whose kubelets have not posted again yet; a node whose agent renews after that mark is
    up: Suspect (keeps its work), past the NotReady grace. Its agent silent, or the mark long after
    the outage, or no outage at all: NotReady as ever."""
    settings = SETTINGS
    tracker = HealthTracker(settings)
    tracker.begin_pass(NOW, [NOW - 1])
    for t in range(5, 60, 5):  # a fleet observed for a while: no outage yet
        tracker.begin_pass(NOW + t, [NOW + t - 1])
    marked = NOW + 60  # NotReady without any outage: moves after the grace, agent or not
    late = marked + settings.not_ready_grace_s + 1
    assert not_ready_after(tracker, marked, late - 1, late) is Health.NOT_READY

    tracker = HealthTracker(settings)
    tracker.begin_pass(NOW, [NOW - 1])
    tracker.begin_pass(NOW + 15, [NOW + 14])
    tracker.lost_sight()  # the API server down 120 s
    back = NOW + 140
    tracker.begin_pass(back, [back - 1])  # every agent back at once: no recovery left
    tracker.begin_pass(back + 5, [back + 4])
    marked = back + 20  # the controller-manager's mark, its grace after it came back
    for t in range(int(marked), int(marked) + 120, 5):
        tracker.begin_pass(t, [t - 1])
        assert not_ready_after(tracker, marked, t - 1, t) is Health.SUSPECT, t - marked
    # its agent falls silent: the node is judged NotReady again (it is down)
    t = marked + 120
    assert not_ready_after(tracker, marked, t - 25, t) is Health.NOT_READY
    # a mark well after the outage (past the backoff allowance + the controller's grace): its own
    mark_late = back + 5 + settings.agent_backoff_max_s + 61
    t = mark_late + settings.not_ready_grace_s + 5
    assert not_ready_after(tracker, mark_late, t - 1, t) is Health.NOT_READY


def test_a_replicas_start_is_no_outage_for_not_ready_nodes() -> None:
    tracker = HealthTracker(SETTINGS)
    tracker.begin_pass(NOW, [NOW - 1])
    t = NOW + 10 + SETTINGS.not_ready_grace_s
    assert not_ready_after(tracker, NOW + 5, t - 1, t) is Health.NOT_READY
