"""One rollout decision: `step` (called once per reconcile pass with the previous status.rollout)
-> `Decision` (the new status, every node's target revisions with traffic weights, events, the
Degraded condition). Pure and deterministic; time is passed in.

`step` is a list of named phases, each a function of the state and the pass's context: follow the
spec's revision, apply the manual action, apply the pause, advance the wave, describe; then the
node targets. See the package docstring for the lifecycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edgefleet_api.inference_service import WaveSpec
from edgefleet_api.model_spec import ModelRef, ModelSpec
from edgefleet_api.rollout_status import (
    ACTIVE,
    MAX_ANALYSES,
    MAX_HISTORY,
    STOPPED,
    AnalysisRecord,
    HistoryRecord,
    Outcome,
    Phase,
    Revision,
    RolloutStatus,
)
from edgefleet_operator.rollout.actions import Action
from edgefleet_operator.rollout.analysis import AnalysisResult, NodeObservation, analyse
from edgefleet_operator.rollout.evidence import assess, fold, summary
from edgefleet_operator.rollout.spec import RolloutSpec, Strategy, describe_wave
from edgefleet_operator.rollout.waves import WavePlan, plan_wave

SPEC_SETTLE_S = 1.0
"""A new revision is followed once the spec has held it this long (seconds), while another
revision runs: a burst of edits (a script, a flapping GitOps sync) reaches the nodes as its last
revision only, never as the ones in between. A first deployment does not wait."""


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    """A Kubernetes Event to emit on the InferenceService."""

    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True, slots=True)
class NodeTarget:
    revision: Revision
    traffic_weight: int


@dataclass(frozen=True, slots=True)
class Decision:
    """What one `step` decided. `targets` has every node given to `step`; every revision in it is the
    status's stable or canary revision."""

    status: RolloutStatus
    targets: Mapping[str, tuple[NodeTarget, ...]]
    events: tuple[RolloutEvent, ...]
    degraded: tuple[str, str] | None
    """(reason, message) for the service's Degraded condition, while a failed rollout is stopped."""
    models: Mapping[Revision, tuple[ModelSpec, ...]]
    """The model spec entries of each revision in `targets` (the stable one may be gone from spec)."""
    prefetch: Mapping[str, Revision] = field(default_factory=dict)
    """node -> the canary revision its agent should fetch ahead (not load): the nodes the rollout
    takes next (the current wave's still paced ones, the next wave's; after the last wave, every
    node, which promotion moves)."""

    def prefetched(self, node: str) -> tuple[ModelSpec, ...]:
        """The model spec entries `node` should fetch ahead."""
        revision = self.prefetch.get(node)
        return self.models[revision] if revision is not None else ()

    def placed(self, node: str) -> list[tuple[ModelSpec, int]]:
        """(model spec entry, traffic weight) per model version the node must hold; a model that two
        revisions share appears once with their weights added."""
        weights: dict[ModelRef, int] = {}
        entries: dict[ModelRef, ModelSpec] = {}
        for t in self.targets.get(node, ()):
            for m in self.models[t.revision]:
                ref = m.ref
                weights[ref] = weights.get(ref, 0) + t.traffic_weight
                entries.setdefault(ref, m)
        return [(entries[r], weights[r]) for r in sorted(weights)]

    def node_versions(self) -> dict[str, str]:
        """node -> label of the revision serving most of its traffic (for service_status)."""
        return {
            n: max(ts, key=lambda t: t.traffic_weight).revision.label for n, ts in self.targets.items() if ts
        }


@dataclass
class _Ctx:
    spec: RolloutSpec
    service: str
    nodes: tuple[str, ...]
    observations: Mapping[str, NodeObservation]
    now: int
    sites: Mapping[str, str] = field(default_factory=dict)
    events: list[RolloutEvent] = field(default_factory=list)

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.events.append(RolloutEvent(reason, message, warning))

    def obs(self, node: str) -> NodeObservation:
        return self.observations.get(node, NodeObservation())


def step(
    spec: RolloutSpec,
    previous: RolloutStatus | None,
    nodes: Sequence[str],
    observations: Mapping[str, NodeObservation],
    now: float,
    action: Action | None = None,
    service: str = "",
    spec_age_s: float | None = None,
    sites: Mapping[str, str] | None = None,
) -> Decision:
    """One rollout decision. `previous`: the last status.rollout written (None at first); `nodes`: the
        nodes placement chose for the service; `observations`: node -> what it reports (missing: nothing
        loaded); `now`: epoch seconds; `action`: the manual action, which the caller then clears;
        `spec_age_s`: how long the spec has been as it is (None: long enough); `sites`: node -> its
    site (the spec's siteLabel; unlabelled nodes absent). While a new revision is
        younger than `SPEC_SETTLE_S` and another one runs, the rollout holds where it is.

        Deterministic in its arguments; `previous` carries all state (a restart loses nothing). Write the
        returned status before the EdgeNode specs built from `targets`: then a crash in between leaves no
        node on a revision that status does not record (the next pass recomputes the same targets).
    """
    ctx = _Ctx(spec, service, tuple(sorted(nodes)), observations, int(now), dict(sites or {}))
    state = previous if previous is not None else RolloutStatus()
    state.check_invariants()
    settling = _settling(state, ctx, spec_age_s)
    if not settling:
        state = _follow_spec(state, ctx)
    state = _apply_action(state, action, ctx)
    state = _apply_pause(state, ctx)
    if not settling:
        state = _advance(state, ctx)
    state = _describe(state, ctx)
    if settling:
        state = dataclasses.replace(
            state,
            message=f"{spec.revision.label} waits for the spec to settle ({SPEC_SETTLE_S:g}s unchanged)",
        )
    state.check_invariants()
    targets = _targets(state, ctx)
    models: dict[Revision, tuple[ModelSpec, ...]] = {}
    stable, canary = state.stable, state.canary
    if stable is not None:
        models[stable] = state.stable_models
    if canary is not None:
        models[canary] = state.canary_models
    assert all(t.revision in models for ts in targets.values() for t in ts), "unrecorded revision"
    degraded = None
    if state.phase is Phase.ROLLED_BACK and state.rollback_reason and spec.revision == canary:
        degraded = ("RolloutFailed", state.rollback_reason)
    return Decision(state, targets, tuple(ctx.events), degraded, models, _prefetch(state, ctx))


# --- phases of a step ---------------------------------------------------------------------------


def _settling(state: RolloutStatus, ctx: _Ctx, spec_age_s: float | None) -> bool:
    """The spec names a revision that is neither running nor stable, and has not held it long."""
    if spec_age_s is None or spec_age_s >= SPEC_SETTLE_S:
        return False
    if state.stable is None and state.canary is None:
        return False  # a first deployment does not wait
    return ctx.spec.revision not in (state.stable, state.canary)


def _start(state: RolloutStatus, ctx: _Ctx) -> RolloutStatus:
    """A new rollout from stable to the spec's revision, at wave 0."""
    spec = ctx.spec
    ctx.event(
        "RolloutStarted",
        f"rolling out {spec.revision.label} over {len(spec.waves)} wave(s) ({spec.strategy.value}); "
        f"stable {state.stable.label if state.stable else '-'}",
    )
    return dataclasses.replace(
        state,
        phase=Phase.PROGRESSING,
        canary_models=spec.models,
        wave=0,
        total_waves=len(spec.waves),
        wave_start_s=None,
        start_s=ctx.now,
        failed_checks=0,
        canary_nodes=(),
        analysis=(),
        manually_paused=False,
        rollback_reason="",
        counters=(),
        evidence=None,
        pause_reason="",
    )


def _finish(state: RolloutStatus, ctx: _Ctx, result: str, message: str, phase: Phase) -> RolloutStatus:
    """End the active rollout with a history entry; every node goes to stable (or the promoted one)."""
    assert state.canary is not None
    entry = HistoryRecord(
        state.stable.label if state.stable else "",
        state.canary.label,
        result,
        state.start_s if state.start_s is not None else ctx.now,
        ctx.now,
        message,
    )
    state = dataclasses.replace(
        state,
        phase=phase,
        history=(entry, *state.history)[:MAX_HISTORY],
        canary_nodes=(),
        wave_start_s=None,
        manually_paused=False,
        counters=(),
        evidence=None,
        pause_reason="",
        node_starts=(),
    )
    if result == "Promoted":
        state = dataclasses.replace(state, stable_models=state.canary_models, canary_models=())
    return state


def _follow_spec(state: RolloutStatus, ctx: _Ctx) -> RolloutStatus:
    """React to the spec's revision: first deployment, fast rollback, supersede, new rollout."""
    spec, target = ctx.spec, ctx.spec.revision
    if state.stable is None:  # first deployment: no canary, the revision replaces any earlier try
        if state.canary != target:
            state = dataclasses.replace(
                state, phase=Phase.PROGRESSING, canary_models=spec.models, start_s=ctx.now,
                wave=0, total_waves=1, canary_nodes=(), wave_start_s=None,
            )  # fmt: skip
        return dataclasses.replace(state, canary_models=spec.models)
    if target == state.stable:
        if state.phase in ACTIVE:
            assert state.canary is not None
            ctx.event(
                "RolledBack",
                f"stable version {target.label} re-applied: {state.canary.label} rolled back",
                warning=True,
            )
            state = _finish(state, ctx, "RolledBack", "stable version re-applied", Phase.ROLLED_BACK)
        # Steady (or just rolled back): the spec's entries are fresher than the recorded ones.
        return dataclasses.replace(state, stable_models=spec.models, canary_models=(), rollback_reason="")
    if state.canary == target:
        # The strategy may have been edited mid-rollout: stay within its waves.
        return dataclasses.replace(
            state,
            canary_models=spec.models,
            total_waves=len(spec.waves),
            wave=min(state.wave, len(spec.waves) - 1),
        )
    if state.phase in ACTIVE:
        assert state.canary is not None
        ctx.event("RolloutSuperseded", f"{state.canary.label} superseded by {target.label}")
        state = _finish(state, ctx, "Superseded", f"superseded by {target.label}", Phase.PROGRESSING)
    return _start(state, ctx)


def _apply_action(state: RolloutStatus, action: Action | None, ctx: _Ctx) -> RolloutStatus:
    if action is None:
        return state
    active = state.phase in ACTIVE
    if action is Action.PROMOTE and active:
        assert state.canary is not None
        ctx.event("RolloutPromoted", f"{state.canary.label} promoted manually")
        if state.stable is None:
            return dataclasses.replace(
                state, phase=Phase.IDLE, stable_models=state.canary_models,
                canary_models=(), canary_nodes=(), wave_start_s=None,
            )  # fmt: skip
        return _finish(state, ctx, "Promoted", "promoted manually", Phase.PROMOTED)
    if action is Action.ABORT and active and state.stable is not None:
        assert state.canary is not None
        ctx.event("RolloutAborted", f"{state.canary.label} aborted; back to {state.stable.label}", True)
        return _finish(state, ctx, "Aborted", "aborted manually", Phase.ABORTED)
    if action in (Action.PAUSE, Action.RESUME) and active and state.stable is not None:
        return dataclasses.replace(state, manually_paused=action is Action.PAUSE)
    ctx.event(
        "RolloutActionIgnored",
        f"{action.value} ignored: no canary rollout in progress (phase {state.phase.value})",
        warning=True,
    )
    return state


def _apply_pause(state: RolloutStatus, ctx: _Ctx) -> RolloutStatus:
    if state.stable is None or state.phase not in ACTIVE:
        return state
    paused = ctx.spec.paused or state.manually_paused
    if paused and state.phase is Phase.PROGRESSING:
        ctx.event("RolloutPaused", f"paused at wave {state.wave + 1}/{state.total_waves}")
        return dataclasses.replace(state, phase=Phase.PAUSED, wave_start_s=None)
    if not paused and state.phase is Phase.PAUSED:
        ctx.event("RolloutResumed", f"resumed at wave {state.wave + 1}/{state.total_waves}")
        return dataclasses.replace(state, phase=Phase.PROGRESSING, pause_reason="")
    return state


def _advance(state: RolloutStatus, ctx: _Ctx) -> RolloutStatus:
    if state.phase is not Phase.PROGRESSING:
        return state
    canary, stable = state.canary, state.stable
    assert canary is not None
    if stable is None:
        return _advance_first(state, ctx)
    spec = ctx.spec
    wave_index = min(state.wave, len(spec.waves) - 1)
    wave = spec.waves[wave_index]
    state, plan = _grow_canaries(dataclasses.replace(state, wave=wave_index), wave, ctx)
    broken = _failed_share(state, ctx, ())
    if broken is not None:
        return broken
    pending = [n for n in state.canary_nodes if not ctx.obs(n).confirms(canary)]
    if pending or not state.canary_nodes or plan.next_start_s is not None:
        why = f"waiting for {len(pending)}/{len(state.canary_nodes)} node(s) to load {canary.label}"
        if plan.next_start_s is not None:
            why += (
                f"; pacing: {len(state.canary_nodes)}/{plan.wanted} canary node(s) started"
                f" (maxNodesPerMinute {spec.max_nodes_per_minute}), more in {plan.next_start_s - ctx.now}s"
            )
        return dataclasses.replace(state, wave_start_s=None, message=why if ctx.nodes else "no nodes placed")
    if state.wave_start_s is None:  # a new window: the judge starts from fresh baselines
        state = dataclasses.replace(state, wave_start_s=ctx.now, counters=(), evidence=None)
    if spec.strategy is Strategy.ALL_AT_ONCE:
        return _baking(state, ctx, wave) or _wave_passed(state, ctx, None)
    state = _judge(state, ctx)
    if state.evidence is not None and state.evidence.verdict == "Fail":
        return _judged_failed(state, ctx)
    window = wave.analysis_s or spec.analysis.interval_s
    assert state.wave_start_s is not None
    left = state.wave_start_s + window - ctx.now
    if left > 0:
        note = f"; {summary(state.evidence)}" if state.evidence is not None else ""
        return dataclasses.replace(state, message=f"analysing: {left}s of the window left{note}")
    since = state.wave_start_s
    silent = [n for n in state.canary_nodes if not ctx.obs(n).fresh(since)]
    broken = _failed_share(state, ctx, silent)
    if broken is not None:
        return broken
    if silent:  # judged on reports written within the window only: hold for them
        why = (
            f"waiting for {len(silent)}/{len(state.canary_nodes)} canary node(s) to report within the window"
        )
        if state.evidence is not None:  # a judged wave: silence is lack of data, up to the deadline
            return _hold_for_evidence(state, ctx, why)
        return dataclasses.replace(state, message=why)
    result = analyse(
        spec.analysis, stable, canary, state.canary_nodes, ctx.observations, wave.traffic_weight, since
    )
    if result.outcome is Outcome.FAILED:  # the absolute limits stay hard guards
        return _wave_failed(state, ctx, result)
    if state.evidence is None:  # no counters reported: the thresholds alone judge the wave
        if result.outcome is Outcome.PASSED:
            return _baking(state, ctx, wave) or _wave_passed(state, ctx, result)
        return _inconclusive(state, ctx, result)
    if state.evidence.verdict == "Pass" and result.outcome is Outcome.PASSED:
        return _baking(state, ctx, wave) or _wave_passed(state, ctx, result)
    extra = result.message if result.outcome is Outcome.INCONCLUSIVE else ""
    return _hold_for_evidence(state, ctx, extra)


def _baking(state: RolloutStatus, ctx: _Ctx, wave: WaveSpec) -> RolloutStatus | None:
    """A wave that passed holds until its bake time (the wave's bakeSeconds, else the analysis's)
    has gone by since its window began: the state holding it, or None when baked."""
    bake = wave.bake_s if wave.bake_s is not None else ctx.spec.analysis.bake_s
    assert state.wave_start_s is not None
    elapsed = ctx.now - state.wave_start_s
    if elapsed >= bake:
        return None
    return dataclasses.replace(state, message=f"baking: {elapsed} s of {bake}")


def _failed_share(state: RolloutStatus, ctx: _Ctx, silent: Sequence[str]) -> RolloutStatus | None:
    """Roll back when more than analysis.maxFailedNodePercent of the wave's canary nodes report a
    canary model Failed or are `silent` (no report within the window): the rolled-back state, or
    None (the limit unset or not exceeded)."""
    limit = ctx.spec.analysis.max_failed_node_percent
    canary, stable = state.canary, state.stable
    assert canary is not None and stable is not None
    if limit is None or not state.canary_nodes:
        return None
    refs = set(canary.refs)
    whys: list[str] = []
    for n in state.canary_nodes:
        failed = sorted(r for r in ctx.obs(n).failed if r in refs)
        if failed:
            whys.append(f"{n}: " + ", ".join(f"{r.name}:{r.version} Failed" for r in failed))
        elif n in silent:
            whys.append(f"{n}: no report within the window")
    total = len(state.canary_nodes)
    if len(whys) * 100 <= limit * total:
        return None
    detail = f"{len(whys)}/{total} canary node(s) failed, more than {limit:g}% ({'; '.join(whys)})"
    state = _record(state, ctx, Outcome.FAILED, detail)
    reason = f"{canary.label} rolled back to {stable.label} at wave {state.wave + 1}: {detail}"
    ctx.event("RolledBack", reason[:1000], warning=True)
    state = _finish(state, ctx, "RolledBack", detail[:1000], Phase.ROLLED_BACK)
    return dataclasses.replace(state, rollback_reason=reason[:1000], failed_checks=state.failed_checks + 1)


def _judge(state: RolloutStatus, ctx: _Ctx) -> RolloutStatus:
    """Fold the fresh counter readings into the wave's tallies and judge them; an Event when the
    verdict changes. No canary counters at all (agents without them), no stable side (a 100% wave
    without side-by-side stable), or analysis.judge Thresholds: no evidence, the thresholds alone
    judge the wave."""
    assert state.canary is not None and state.stable is not None
    counts = fold(
        state.counters, state.stable, state.canary, state.canary_nodes, ctx.nodes, ctx.observations,
        state.wave_start_s,
    )  # fmt: skip
    if not counts.judged or ctx.spec.analysis.judge != "Sequential":
        return dataclasses.replace(state, counters=counts.tallies, evidence=None)
    judgement, evidence = assess(counts, ctx.spec.analysis)
    before = state.evidence.verdict if state.evidence is not None else None
    if evidence.verdict != before and (before is not None or evidence.verdict != "Continue"):
        ctx.event(
            "JudgeVerdict",
            f"wave {state.wave + 1}/{state.total_waves}: {judgement.describe()}"[:1000],
            warning=evidence.verdict == "Fail",
        )
    return dataclasses.replace(state, counters=counts.tallies, evidence=evidence)


def _judged_failed(state: RolloutStatus, ctx: _Ctx) -> RolloutStatus:
    """The judge found the canary worse than stable: roll back at once (its false-rollback rate is
    the spec's falseRollbackRate however often it looks, so failureLimit does not apply)."""
    canary, stable, evidence = state.canary, state.stable, state.evidence
    assert canary is not None and stable is not None and evidence is not None
    detail = "; ".join(m.message for m in evidence.metrics if m.verdict == "Fail")
    state = _record(state, ctx, Outcome.FAILED, f"{summary(evidence)}: {detail}")
    reason = f"{canary.label} rolled back to {stable.label} at wave {state.wave + 1}: {detail}"
    ctx.event("RolledBack", reason[:1000], warning=True)
    state = _finish(state, ctx, "RolledBack", detail, Phase.ROLLED_BACK)
    return dataclasses.replace(state, rollback_reason=reason, failed_checks=state.failed_checks + 1)


def _hold_for_evidence(state: RolloutStatus, ctx: _Ctx, waiting: str = "") -> RolloutStatus:
    """No verdict yet (or thresholds inconclusive, or a canary node silent: `waiting` says which):
    hold, up to analysis.progressDeadlineSeconds from the window's start; then pause (the default)
    or roll back. Never fail for lack of data."""
    canary, stable, evidence = state.canary, state.stable, state.evidence
    assert canary is not None and stable is not None and evidence is not None
    assert state.wave_start_s is not None
    analysis = ctx.spec.analysis
    elapsed = ctx.now - state.wave_start_s
    if elapsed < analysis.progress_deadline_s:
        extra = f"; {waiting}" if waiting else ""
        left = analysis.progress_deadline_s - elapsed
        return dataclasses.replace(
            state, message=f"holding: {summary(evidence)}{extra} ({left}s to the progress deadline)"
        )
    why = (
        f"no evidence after {elapsed} s: {evidence.canary_requests} canary requests,"
        f" {evidence.stable_requests} stable" + (f" ({waiting})" if waiting else "")
    )
    state = _record(state, ctx, Outcome.INCONCLUSIVE, f"{why}; {summary(evidence)}")
    if analysis.on_deadline == "Rollback":
        reason = f"{canary.label} rolled back to {stable.label} at wave {state.wave + 1}: {why}"
        ctx.event("RolledBack", reason, warning=True)
        state = _finish(state, ctx, "RolledBack", why, Phase.ROLLED_BACK)
        return dataclasses.replace(state, rollback_reason=reason)
    ctx.event("RolloutPaused", f"paused at wave {state.wave + 1}/{state.total_waves}: {why}", warning=True)
    return dataclasses.replace(
        state, phase=Phase.PAUSED, manually_paused=True, pause_reason=why, wave_start_s=None, message=why
    )


def _advance_first(state: RolloutStatus, ctx: _Ctx) -> RolloutStatus:
    """First deployment: stable once every placed node confirms the revision."""
    assert state.canary is not None
    pending = [n for n in ctx.nodes if not ctx.obs(n).confirms(state.canary)]
    if pending or not ctx.nodes:
        return dataclasses.replace(
            state, message=f"waiting for {len(pending)}/{len(ctx.nodes)} node(s) to load {state.canary.label}"
        )
    ctx.event("Deployed", f"{state.canary.label} deployed on {len(ctx.nodes)} node(s)")
    return dataclasses.replace(
        state, phase=Phase.IDLE, stable_models=state.canary_models, canary_models=(),
        wave_start_s=None, message=f"{state.canary.label} deployed",
    )  # fmt: skip


def _grow_canaries(state: RolloutStatus, wave: WaveSpec, ctx: _Ctx) -> tuple[RolloutStatus, WavePlan]:
    """Keep this rollout's canaries still placed; add nodes (or sites' nodes) up to the wave's
    count, keeping stable in each site and the pace (`waves.plan_wave`). A change restarts the
    window (a new node must confirm before the wave is judged)."""
    spec = ctx.spec
    plan = plan_wave(
        wave, ctx.service, ctx.nodes, ctx.sites, state.canary_nodes, spec.keep_stable_per_site,
        spec.max_nodes_per_minute, state.node_starts, ctx.now,
    )  # fmt: skip
    if plan.canaries == state.canary_nodes:
        return dataclasses.replace(state, node_starts=plan.node_starts), plan
    added = set(plan.canaries) - set(state.canary_nodes)
    if added and plan.held_back and plan.next_start_s is None:  # once, as the wave's growth completes
        ctx.event(
            "StableKeptPerSite",
            f"wave {state.wave + 1}/{state.total_waves}: {plan.held_back} node(s) of its count left on "
            f"stable to keep {spec.keep_stable_per_site} per site (keepStablePerSite)",
        )
    return dataclasses.replace(
        state, canary_nodes=plan.canaries, wave_start_s=None, node_starts=plan.node_starts
    ), plan


def _record(state: RolloutStatus, ctx: _Ctx, outcome: Outcome, message: str) -> RolloutStatus:
    """Add an analysis record; an Inconclusive one replaces the wave's previous Inconclusive one."""
    records = list(state.analysis)
    if records and records[-1].wave == state.wave and records[-1].result is Outcome.INCONCLUSIVE:
        records.pop()
    records.append(AnalysisRecord(state.wave, ctx.now, outcome, message))
    return dataclasses.replace(state, analysis=tuple(records[-MAX_ANALYSES:]))


def _wave_passed(state: RolloutStatus, ctx: _Ctx, result: AnalysisResult | None) -> RolloutStatus:
    canary = state.canary
    assert canary is not None
    if result is not None:
        message = result.message
        if state.evidence is not None:
            message = f"{summary(state.evidence)}; thresholds: {message}"
        state = _record(state, ctx, Outcome.PASSED, message)
        ctx.event("AnalysisPassed", f"wave {state.wave + 1}/{state.total_waves}: {message}")
    if state.wave + 1 >= len(ctx.spec.waves):
        ctx.event("RolloutPromoted", f"{canary.label} promoted: all waves passed")
        return _finish(state, ctx, "Promoted", "all waves passed", Phase.PROMOTED)
    nxt = ctx.spec.waves[state.wave + 1]
    ctx.event("WaveStarted", f"wave {state.wave + 2}/{state.total_waves} ({describe_wave(nxt)})")
    state = dataclasses.replace(state, wave=state.wave + 1, wave_start_s=None, counters=(), evidence=None)
    return _grow_canaries(state, nxt, ctx)[0]


def _inconclusive(state: RolloutStatus, ctx: _Ctx, result: AnalysisResult) -> RolloutStatus:
    message = f"{result.message} (minSamples {ctx.spec.analysis.min_samples}); holding"
    last = state.analysis[-1] if state.analysis else None
    if not (last and last.wave == state.wave and last.result is Outcome.INCONCLUSIVE):
        ctx.event("AnalysisInconclusive", f"wave {state.wave + 1}/{state.total_waves}: {message}")
    return dataclasses.replace(_record(state, ctx, Outcome.INCONCLUSIVE, message), message=message)


def _wave_failed(state: RolloutStatus, ctx: _Ctx, result: AnalysisResult) -> RolloutStatus:
    canary, stable = state.canary, state.stable
    assert canary is not None and stable is not None
    failed = result.failed
    detail = "; ".join(c.describe() for c in failed)
    state = _record(state, ctx, Outcome.FAILED, result.message)
    total = state.failed_checks + len(failed)
    limit = ctx.spec.analysis.failure_limit
    ctx.event("AnalysisFailed", f"wave {state.wave + 1}/{state.total_waves}: {detail}", warning=True)
    state = dataclasses.replace(state, failed_checks=total, wave_start_s=ctx.now)
    if total < limit:
        return state
    reason = f"{canary.label} rolled back to {stable.label} at wave {state.wave + 1}: {detail}"
    ctx.event("RolledBack", reason, warning=True)
    state = _finish(state, ctx, "RolledBack", detail, Phase.ROLLED_BACK)
    return dataclasses.replace(state, rollback_reason=reason)


def _describe(state: RolloutStatus, ctx: _Ctx) -> RolloutStatus:
    """step and message for kubectl."""
    if state.phase in ACTIVE and state.stable is None:
        return dataclasses.replace(state, step="initial deploy")
    if state.phase in ACTIVE:
        wave = ctx.spec.waves[min(state.wave, len(ctx.spec.waves) - 1)]
        text = f"wave {state.wave + 1}/{state.total_waves} ({describe_wave(wave)})"
        if state.phase is Phase.PAUSED:
            if state.pause_reason:
                message = f"paused: {state.pause_reason} (resume with the resume action)"
                return dataclasses.replace(state, step=f"paused at {text}", message=message)
            why = "spec.rollout.paused" if ctx.spec.paused else "the pause action"
            return dataclasses.replace(state, step=f"paused at {text}", message=f"paused by {why}")
        return dataclasses.replace(state, step=text)
    texts = {
        Phase.IDLE: "stable",
        Phase.PROMOTED: "promoted",
        Phase.ROLLED_BACK: "rolled back",
        Phase.ABORTED: "aborted",
    }
    message = state.message
    if state.phase in STOPPED and state.canary is not None:
        message = f"stopped until the spec changes: {state.history[0].message if state.history else ''}"
    elif state.phase is not Phase.IDLE and state.stable is not None:
        message = f"{state.stable.label} on every node"
    return dataclasses.replace(state, step=texts[state.phase], message=message)


def _prefetch(state: RolloutStatus, ctx: _Ctx) -> dict[str, Revision]:
    """The nodes to pre-stage the canary on (`Decision.prefetch`): while a canary rollout
    progresses, the current wave's nodes not started yet (pace) and the next wave's; in the last
    wave, every node that is not a canary."""
    canary = state.canary
    if state.phase is not Phase.PROGRESSING or state.stable is None or canary is None:
        return {}
    spec, current = ctx.spec, set(state.canary_nodes)
    wave = min(state.wave, len(spec.waves) - 1)
    if wave + 1 >= len(spec.waves):
        return dict.fromkeys(sorted(set(ctx.nodes) - current), canary)
    upcoming: set[str] = set()
    for w in spec.waves[wave : wave + 2]:
        plan = plan_wave(w, ctx.service, ctx.nodes, ctx.sites, state.canary_nodes, spec.keep_stable_per_site)
        upcoming |= set(plan.canaries) - current
    return dict.fromkeys(sorted(upcoming), canary)


def _targets(state: RolloutStatus, ctx: _Ctx) -> dict[str, tuple[NodeTarget, ...]]:
    """node -> the revisions it must hold, with traffic weights adding up to 100."""
    if state.stable is None:
        assert state.canary is not None
        return {n: (NodeTarget(state.canary, 100),) for n in ctx.nodes}
    stable_only = (NodeTarget(state.stable, 100),)
    if state.phase not in ACTIVE:
        return {n: stable_only for n in ctx.nodes}
    assert state.canary is not None
    weight = ctx.spec.waves[min(state.wave, len(ctx.spec.waves) - 1)].traffic_weight
    if weight >= 100:
        on_canary: tuple[NodeTarget, ...] = (NodeTarget(state.canary, 100),)
    else:
        on_canary = (NodeTarget(state.stable, 100 - weight), NodeTarget(state.canary, weight))
    canaries = set(state.canary_nodes)
    return {n: on_canary if n in canaries else stable_only for n in ctx.nodes}
