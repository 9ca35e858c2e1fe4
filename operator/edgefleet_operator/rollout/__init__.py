"""Canary rollouts: SLA-gated waves, automatic rollback, promote and abort. Pure.

Lifecycle (`step` is called once per reconcile pass with the previous status.rollout):
1. A revision is the sorted tuple of (model, version, digest) of the service's models; a change of
   any of them starts a rollout. With no stable revision yet (first deployment) every node gets the
   new one at once and it becomes stable when every node confirms its digest (phase Idle).
2. Canary: waves of node counts or percents. Wave k's canary nodes are a growing prefix of a stable
   order (a hash of service and node, so canaries spread), recorded in status.canaryNodes; they run
   the canary (side by side with stable when the wave's trafficWeight is below 100).
3. A wave's analysis window starts when every one of its nodes reports the canary loaded, by digest.
   When the window has passed, `analyse` judges it: Passed -> next wave (after the last: Promoted);
   too few requests -> Inconclusive (holds); Failed -> failedChecks grows, the window restarts, and
   at failureLimit the rollout is RolledBack: every node back to stable, the service Degraded.
4. RolledBack and Aborted stop until the spec's revision changes. Re-applying the stable revision
   rolls back at once; a third revision mid-rollout supersedes the current one (back to wave 0).
5. Manual control: spec.rollout.paused or the pause/resume action hold the wave (its window restarts
   on resume); promote finishes now; abort goes back to stable. AllAtOnce is one 100% wave, no analysis.
6. All state lives in the status dict (times in whole seconds): `step` is deterministic, a restarted
   operator resumes at the same wave, and every node's target is a revision that status records.

Modules: `spec` (what the spec asks), `analysis` (observations and the verdict on a wave),
`state` (status.rollout as a value), `decision` (`step` and its phases).
"""

from edgefleet_operator.rollout.analysis import (
    AnalysisResult,
    Check,
    NodeObservation,
    Outcome,
    SlaWindow,
    analyse,
    observe,
    revision_windows,
)
from edgefleet_operator.rollout.decision import (
    Decision,
    NodeTarget,
    RolloutEvent,
    canary_order,
    step,
)
from edgefleet_operator.rollout.spec import (
    AnalysisSpec,
    ModelRef,
    Revision,
    RolloutSpec,
    Strategy,
    Wave,
    parse_spec,
)
from edgefleet_operator.rollout.state import (
    ACTIVE,
    MAX_ANALYSES,
    MAX_HISTORY,
    STOPPED,
    Action,
    AnalysisRecord,
    HistoryRecord,
    Phase,
    RolloutState,
    parse_action,
    parse_time,
)

__all__ = [
    "ACTIVE",
    "MAX_ANALYSES",
    "MAX_HISTORY",
    "STOPPED",
    "Action",
    "AnalysisRecord",
    "AnalysisResult",
    "AnalysisSpec",
    "Check",
    "Decision",
    "HistoryRecord",
    "ModelRef",
    "NodeObservation",
    "NodeTarget",
    "Outcome",
    "Phase",
    "Revision",
    "RolloutEvent",
    "RolloutSpec",
    "RolloutState",
    "SlaWindow",
    "Strategy",
    "Wave",
    "analyse",
    "canary_order",
    "observe",
    "parse_action",
    "parse_spec",
    "parse_time",
    "revision_windows",
    "step",
]
