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


@dataclass
class HealthTracker:
    """Remembers, per node, when it last lost its work, for flap damping.

    The only state kept between reconciles; after an operator restart it is empty, which
    errs towards treating recovered nodes as healthy (their Ready transition time still
    damps NotReady flaps).
    """

    settings: FleetSettings
    agent_start_allowance_s: float = 120.0
    """How long a node with work may go without a Lease before its agent counts as silent
    (pulling an image on an edge link is slow)."""
    lost_work_at: dict[str, float] = field(default_factory=dict)
    unobserved: tuple[float, float] | None = None
    """The last span between two passes (judgements at two `now_s`) longer than half the agent
    grace: the operator could not read the API server then (passes run every resync, failed
    ones retried within seconds). A Lease's silence within it is not counted against its agent:
    an API server outage stops every renewal, and agents come back at their own jittered
    backoff, after the operator's first pass; counting it would take the work off every node
    at once. An agent that really died is judged one such span later at most. A replica's first
    judgement counts the agent grace before it as unobserved too (it may start, or take over,
    right after an outage)."""
    last_pass_s: float | None = None

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
            return Health.NOT_READY if down_s >= cfg.not_ready_grace_s else Health.SUSPECT
        if s.lease_renew_s is None:
            if not s.has_work or s.work_since_s is None:
                return Health.HEALTHY
            waited = now_s - s.work_since_s
            return Health.AGENT_SILENT if waited >= self.agent_start_allowance_s else Health.HEALTHY
        silent_s = now_s - s.lease_renew_s - self._unobserved_within(s.lease_renew_s, now_s)
        if silent_s >= cfg.agent_grace_s:
            return Health.AGENT_SILENT
        if silent_s >= cfg.agent_grace_s / 2:
            return Health.SUSPECT
        return Health.HEALTHY

    def _observe(self, now_s: float) -> None:
        last = self.last_pass_s
        if last is None:  # a fresh replica (start, failover) saw nothing before: an API server
            # outage may have just ended, with the agents still in their backoff
            self.unobserved = (now_s - self.settings.agent_grace_s, now_s)
        elif now_s - last > self.settings.agent_grace_s / 2:
            self.unobserved = (last, now_s)
        self.last_pass_s = now_s if last is None else max(last, now_s)

    def _unobserved_within(self, start_s: float, end_s: float) -> float:
        if self.unobserved is None:
            return 0.0
        a, b = self.unobserved
        return max(0.0, min(end_s, b) - max(start_s, a))

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
