"""Node health as placement needs it: a pure judgement over the Node's Ready condition,
the agent's Lease, and how long each has been so.

Two failures are told apart: a NotReady Node (kubelet or link gone) and an agent
that stopped renewing its Lease while its Node is still Ready (the agent crashed
or hung). Either keeps its work for a grace period (Suspect) and loses it after
(NotReady / AgentSilent). A node that lost its work must then stay healthy for a
damping period before it gets new work, so a flapping node does not make models
bounce.

Times are wall-clock seconds (epoch): they come from the API server's
timestamps, which are the only clock the operator and the agents share.

The operator replica's own health (`replica_liveness`) is judged here too: a standby replica (one
that holds no shard) is healthy and ready; it reports what it holds, and nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from edgefleet_operator.fleet_types import Health
from edgefleet_operator.settings import FleetSettings


@dataclass(frozen=True, slots=True)
class NodeSignals:
    """What the API server says about one fleet node."""

    name: str
    ready: bool
    """The Node's Ready condition is True (False or Unknown -> not ready)."""
    ready_transition_s: float
    """When the Ready condition last changed (epoch seconds)."""
    lease_renew_s: float | None
    """When the agent last renewed its Lease; None when the node has no agent (yet)."""
    has_work: bool
    """The node's EdgeNode spec holds models (an agent is expected)."""
    work_since_s: float | None = None
    """When the node got its first work; bounds how long an agent may take to start."""


NODE_MONITOR_GRACE_MAX_S = 60.0
"""The node lifecycle controller's grace before it marks a silent Node NotReady (40 s by default, 50 s
since Kubernetes 1.32), with slack: how long after an outage its NotReady marks are the outage's."""


@dataclass(slots=True)
class Recovery:
    """The fleet's agents coming back after a span the operator could not observe."""

    since_s: float
    """When observation last resumed: an agent that renewed since is back."""
    expected_after_s: float
    """Agents heard from since this (a grace before the first span) are expected back; older ones
    were silent already."""
    rising_s: float
    """When the count of agents back last grew (or the recovery began)."""
    began_s: float
    """When the recovery began (its wait is capped from there)."""
    back: int = 0
    expected: int = 0


@dataclass
class HealthTracker:
    """Remembers, per node, when it last lost its work, for flap damping; and when the operator could
    not observe the fleet, so that its blindness is not taken for the agents' silence.

    After an operator restart it is empty, which errs towards treating recovered nodes as healthy
    (their Ready transition time still damps NotReady flaps).

    Lease silence, the rule: an agent is judged on the silence the operator observed, from its last
    renewal to now, less (1) every unobserved span that ends after that renewal, each lengthened by
    `agent_backoff_max_s` (agents come back from an outage at their own jittered backoff, after the
    operator's first pass), and (2) the last long gap between two passes. So after an unobserved span
    an agent not heard from since keeps what it had accrued before the span and accrues nothing
    until `agent_backoff_max_s` after observation resumed; then the full grace counts as usual. An
    agent already silent before the span stays silent; a dead one is judged at most the backoff
    allowance later. An unobserved span is one in which the operator could not read the API server
    (`lost_sight`: a pass failed to reach it, or this replica held no shard) from its last judgement
    to its next one; a replica's first judgement counts the agent grace before it as one (it may
    start, or take over, right after an outage).

    Recovery, the rule for reconnect storms: after an unobserved span, the operator waits while the
    agents are still coming back (`begin_pass`). A restarted API server may take minutes to let
    thousands of agents back in, longer than any fixed allowance; until it has, their silence is the
    API server's, not theirs. The span is extended to now while, of the agents heard from within a
    grace before it, some have not renewed since observation resumed and one came back within the
    last `agent_backoff_max_s + agent_grace_s` (the storm is still draining), for at most
    `reconnect_wait_max_s`. When every expected agent is back, or none came back for that long, or
    the wait is spent, the recovery ends and the rule above runs from there: the allowance, then the
    grace. A dead agent is thus judged at most the storm's length (bounded) later than without it."""

    settings: FleetSettings
    agent_start_allowance_s: float = 120.0
    """How long a node with work may go without a Lease before its agent counts as silent
    (pulling an image on an edge link is slow)."""
    lost_work_at: dict[str, float] = field(default_factory=dict)
    unobserved: list[tuple[float, float]] = field(default_factory=list)
    """Spans (start, end) the operator could not observe, oldest first, disjoint; those that can no
    longer change any verdict are dropped (`_prune`)."""
    gap: tuple[float, float] | None = None
    """The last span between two judgements longer than half the agent grace, with no failure
    reported in it: a pass stalled (a call retried after a timeout) or the replica was starved.
    Only the last one is discounted, without the backoff allowance, so that passes slower than
    that still judge a dead agent, one pass late."""
    last_pass_s: float | None = None
    blind: bool = False
    """Set by `lost_sight` since the last judgement."""
    recovery: Recovery | None = None
    """The fleet coming back after the last unobserved span, while it is (`begin_pass`)."""
    last_outage: tuple[float, float] | None = None
    """The last outage: an unobserved span and the recovery after it (start, end), kept whole after
    `_prune` drops it; a replica's start is none. For the outage rule (`_outage_not_ready`)."""

    def lost_sight(self) -> None:
        """The operator could not observe the fleet (a pass failed to reach the API server, or this
        replica held no shard): the span from its last judgement to its next one is unobserved."""
        self.blind = True

    def begin_pass(self, now_s: float, renewals: Iterable[float | None]) -> Recovery | None:
        """Called once per pass before its `judge` calls, with the Lease renewal times of the nodes
        it judges: notes an unobserved span that has just ended and, while the agents are still
        coming back from it, extends it to now (the recovery rule). Returns the recovery in force,
        None when there is none."""
        closed = self._observe(now_s)
        grace = self.settings.agent_grace_s
        r = self.recovery
        if closed is not None and r is not None:  # blind again while the fleet was coming back: one
            # outage seen in pieces (passes run from the cache while its watches fail)
            r.since_s, r.back, r.rising_s = closed[1], 0, now_s
        elif closed is not None:
            r = self.recovery = Recovery(closed[1], closed[0] - grace, now_s, began_s=now_s)
        if r is None:
            return None
        expected = back = 0
        for t in renewals:
            if t is not None and t >= r.expected_after_s:
                expected += 1
                back += t >= r.since_s
        if back > r.back:
            r.back, r.rising_s = back, now_s
        r.expected = expected
        stalled = now_s - r.rising_s >= self.settings.agent_backoff_max_s + grace
        if back >= expected or stalled or now_s - r.began_s >= self.settings.reconnect_wait_max_s:
            self.recovery = None
            return None
        self._unobservable(r.since_s, now_s)
        return r

    def judge(self, s: NodeSignals, now_s: float) -> Health:
        self._observe(now_s)
        health = self._raw(s, now_s)
        if health in (Health.NOT_READY, Health.AGENT_SILENT):
            # Damping is for nodes that lose work: a node that holds none (a new Node that has not
            # reported Ready yet) loses nothing, and is placeable as soon as it is ready.
            if s.has_work or s.name in self.lost_work_at:
                self.lost_work_at[s.name] = now_s
            return health
        lost = self.lost_work_at.get(s.name)
        if lost is not None:
            if now_s - lost < self.settings.flap_damping_s:
                return Health.SUSPECT
            del self.lost_work_at[s.name]
        return health

    def _raw(self, s: NodeSignals, now_s: float) -> Health:
        cfg = self.settings
        if not s.ready:
            down_s = now_s - s.ready_transition_s
            if down_s < cfg.not_ready_grace_s or self._outage_not_ready(s, now_s):
                return Health.SUSPECT
            return Health.NOT_READY
        if s.lease_renew_s is None:
            if not s.has_work or s.work_since_s is None:
                return Health.HEALTHY
            waited = now_s - s.work_since_s
            return Health.AGENT_SILENT if waited >= self.agent_start_allowance_s else Health.HEALTHY
        silent_s = self.observed_silence(s.lease_renew_s, now_s)
        if silent_s >= cfg.agent_grace_s:
            return Health.AGENT_SILENT
        if silent_s >= cfg.agent_grace_s / 2:
            return Health.SUSPECT
        return Health.HEALTHY

    def _outage_not_ready(self, s: NodeSignals, now_s: float) -> bool:
        """Whether a NotReady node is the last outage's doing, not its own (the outage rule): its
        Ready condition changed after the last outage (an unobserved span, and the agents' recovery
        from it) began and at most the backoff allowance + NODE_MONITOR_GRACE_MAX_S after it ended
        (the node lifecycle controller marks every Node whose kubelet has not posted since the API
        server came back, and a large fleet's kubelets re-post over minutes), while its agent renewed
        its Lease after that change and is not silent: the node is up and reaches the API server.
        It keeps its work (Suspect) until its kubelet posts again or its agent falls silent. A
        replica's start is no outage here: it does not stop kubelets posting."""
        outage = self.last_outage
        renew = s.lease_renew_s
        window = self.settings.agent_backoff_max_s + NODE_MONITOR_GRACE_MAX_S
        return (
            outage is not None
            and outage[0] <= s.ready_transition_s <= outage[1] + window
            and renew is not None
            and renew > s.ready_transition_s
            and self.observed_silence(renew, now_s) < self.settings.agent_grace_s / 2
        )

    def observed_silence(self, renew_s: float, now_s: float) -> float:
        """Seconds of an agent's silence since its renewal at `renew_s` that the operator observed
        (the rule in the class docstring)."""
        return self._observed(renew_s, now_s, self.unobserved)

    def _observed(self, from_s: float, now_s: float, spans: list[tuple[float, float]]) -> float:
        allowance = self.settings.agent_backoff_max_s
        cover = [(a, b + allowance) for a, b in spans if b > from_s]
        if self.gap is not None and self.gap[1] > from_s:
            cover.append(self.gap)
        covered, reach = 0.0, from_s
        for a, b in sorted(cover):  # the length of their union within [from_s, now_s]
            a, b = max(a, reach), min(b, now_s)
            if b > a:
                covered += b - a
                reach = b
        return max(0.0, now_s - from_s - covered)

    def _observe(self, now_s: float) -> tuple[float, float] | None:
        """Notes the span since the last judgement; returns it when it was unobserved."""
        last, closed = self.last_pass_s, None
        if last is None:  # a fresh replica (start, failover) saw nothing before: an API server
            # outage may have just ended, with the agents still in their backoff
            closed = (now_s - self.settings.agent_grace_s, now_s)
        elif self.blind and now_s > last:
            closed = (last, now_s)
            if self.last_outage is None or self.last_outage[1] < last:  # a new outage (not a start)
                self.last_outage = closed
        elif now_s - last > self.settings.agent_grace_s / 2:
            self.gap = (last, now_s)
        if closed is not None:
            self._unobservable(*closed)
        if last is None or now_s > last:
            self.blind = False
        self.last_pass_s = now_s if last is None else max(last, now_s)
        self._prune(now_s)
        return closed

    def _unobservable(self, start_s: float, end_s: float) -> None:
        if self.last_outage is not None and self.last_outage[1] >= start_s:  # the outage goes on
            self.last_outage = (self.last_outage[0], max(self.last_outage[1], end_s))
        if self.unobserved and self.unobserved[-1][1] >= start_s:
            a, b = self.unobserved[-1]
            self.unobserved[-1] = (min(a, start_s), max(b, end_s))
        else:
            self.unobserved.append((start_s, end_s))

    def _prune(self, now_s: float) -> None:
        """Drop the spans that change no verdict: those after whose end (plus the allowance) the
        observed time until now is a full grace already. Any agent silent since before such a span
        is silent with or without it."""
        allowance = self.settings.agent_backoff_max_s
        for i in range(len(self.unobserved) - 1, -1, -1):
            end = self.unobserved[i][1] + allowance
            if (
                end < now_s
                and self._observed(end, now_s, self.unobserved[i + 1 :]) >= self.settings.agent_grace_s
            ):
                del self.unobserved[: i + 1]
                return

    def forget(self, names: set[str]) -> None:
        """Drop memory of nodes that left the fleet."""
        for name in names & self.lost_work_at.keys():
            del self.lost_work_at[name]


def replica_liveness(
    holds: bool, pass_age_s: float, lease_round_age_s: float | None, resync_s: float, renew_s: float
) -> str | None:
    """Why this operator replica is stuck (its liveness probe fails, the kubelet restarts it), or
    None when it is live.

    A replica that holds the fleet (`holds`) must have finished a pass within three resync intervals
    (+30 s of slack for a slow API server). A standby replica runs no passes and is healthy all the
    same, ready to take over: it must only have finished a round of its Leases (`lease_round_age_s`;
    None: it runs without Leases and holds everything) within three renew intervals (+30 s)."""
    if lease_round_age_s is not None and lease_round_age_s > 3 * renew_s + 30:
        return f"no lease round for {lease_round_age_s:.0f}s"
    if holds and pass_age_s > 3 * resync_s + 30:
        return f"no successful fleet reconcile for {pass_age_s:.0f}s"
    return None
