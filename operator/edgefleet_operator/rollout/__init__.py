"""Canary rollouts: SLA-gated waves, automatic rollback, promote and abort. Pure.

Lifecycle (`step` is called once per reconcile pass with the previous status.rollout):
1. A revision is the sorted tuple of (model, version, digest) of the service's models; a change of
   any of them starts a rollout. With no stable revision yet (first deployment) every node gets the
   new one at once and it becomes stable when every node confirms its digest (phase Idle).
2. Canary: waves of node counts or percents, or of sites (sites, sitePercent: a Node label).
   Wave k's canary nodes grow from wave k-1's (`waves`: nodes in a hash order, sites with
   canaries first, at least keepStablePerSite of a site's nodes left on stable, at most
   maxNodesPerMinute started a minute), recorded in status.canaryNodes; they run the canary
   (side by side with stable when the wave's trafficWeight is below 100).
3. A wave's analysis window starts when every one of its nodes reports the canary loaded, by digest,
   in a fresh report (not replayed or older: sequence and observedGeneration, see `analysis`). When
   the window has passed and every canary node has reported within it, `analyse` judges it: Passed
   -> next wave (after the last: Promoted); too few requests -> Inconclusive (holds); Failed ->
   failedChecks grows, the window restarts, and at failureLimit the rollout is RolledBack: every
   node back to stable, the service Degraded.
   Where the agents report counters (and the wave has a stable side), the sequential judge
   (`judge`, via `evidence`) decides too, at every pass from the window's start: Fail rolls back at
   once; the wave advances only on Pass with the thresholds (hard guards) passed and the window
   over; Continue holds, and at analysis.progressDeadlineSeconds the rollout pauses (or rolls back,
   onDeadline). Its tallies and evidence live in status.rollout.counters and .evidence.
4. RolledBack and Aborted stop until the spec's revision changes. Re-applying the stable revision
   rolls back at once; a third revision mid-rollout supersedes the current one (back to wave 0).
5. Manual control: spec.rollout.paused or the pause/resume action hold the wave (its window restarts
   on resume); promote finishes now; abort goes back to stable. AllAtOnce is one 100% wave, no analysis.
6. All state lives in status.rollout (`edgefleet_api.rollout_status.RolloutStatus`, times in whole
   seconds): `step` is deterministic, a restarted operator resumes at the same wave, and every
   node's target is a revision that status records.

Modules: `spec` (what the spec asks), `analysis` (observations and the verdict on a wave),
`judge` (the sequential tests on counts), `evidence` (a wave's counter tallies, judged),
`waves` (which nodes a wave takes: nodes or sites, stable kept per site, pace), `actions` (the
manual actions), `decision` (`step` and its phases). The state's types (phases,
revisions, records) are the contract's (`edgefleet_api.rollout_status`).
"""

from edgefleet_operator.rollout.actions import Action, parse_action
from edgefleet_operator.rollout.analysis import (
    AnalysisResult,
    Check,
    NodeObservation,
    ObservationMemo,
    analyse,
    observe,
    revision_windows,
)
from edgefleet_operator.rollout.decision import (
    Decision,
    NodeTarget,
    RolloutEvent,
    step,
)
from edgefleet_operator.rollout.spec import (
    RolloutSpec,
    Strategy,
    describe_wave,
    has_checks,
    parse_spec,
    wave_nodes,
)
from edgefleet_operator.rollout.waves import WavePlan, canary_order, plan_wave

__all__ = [
    "Action",
    "AnalysisResult",
    "Check",
    "Decision",
    "NodeObservation",
    "NodeTarget",
    "ObservationMemo",
    "RolloutEvent",
    "RolloutSpec",
    "Strategy",
    "WavePlan",
    "analyse",
    "canary_order",
    "describe_wave",
    "has_checks",
    "observe",
    "parse_action",
    "parse_spec",
    "plan_wave",
    "revision_windows",
    "step",
    "wave_nodes",
]
