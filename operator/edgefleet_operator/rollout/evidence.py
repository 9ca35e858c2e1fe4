"""The sequential judge's view of a wave: the agents' cumulative counters, folded per (node, model
version) into tallies that live in status.rollout.counters, summed per side and judged
(`judge.judge`). Pure.

Sides. The canary side is the canary revision's changed models (`analysis.changed_refs`) on the
canary nodes; the stable side is the stable revision's changed models on comparable nodes (the
same node class as some canary node), and canary nodes that also hold stable (side by side).
A wave without any such node (every comparable node runs the canary alone) has no stable side:
the thresholds alone judge it.
Only readings written within the wave's window (`NodeObservation.fresh`) are folded; the first one
of a (node, version) is its baseline, so a tally counts what was served after the window began.
A reading from a new agent epoch (a restart) adds its whole count (`judge.tally`); one whose SLO
latency changed within the epoch is a new baseline (slow requests are counted against another
threshold from then on; the interval since the last reading is lost). A (node,
version) without a reading keeps its tally as it was; one no longer on its side is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgefleet_api.inference_service import AnalysisSpec
from edgefleet_api.model_spec import ModelRef
from edgefleet_api.rollout_status import MAX_TALLIES, CounterTally, Evidence, MetricRecord, Revision
from edgefleet_operator.rollout.analysis import NodeObservation, changed_refs
from edgefleet_operator.rollout.judge import Counts, Judgement, JudgeSettings, Tally, judge, tally

E_CAP = 1e15
"""E-values in status are capped here (beyond it the verdict is long settled)."""


def settings_of(spec: AnalysisSpec) -> JudgeSettings:
    return JudgeSettings(
        alpha=spec.false_rollback_rate,
        error_increase=spec.error_rate_increase,
        slow_ratio=spec.slow_share_ratio,
        slow_increase=spec.slow_share_increase,
        power=spec.power,
    )


def epoch_key(epoch: str, slo_latency_s: float | None) -> str:
    """A tally's epoch: the agent's, and the SLO latency its slow requests are counted against
    (a change of either starts the counters' differences afresh)."""
    return f"{epoch}@{'-' if slo_latency_s is None else f'{slo_latency_s * 1000:g}'}"


def model_key(ref: ModelRef) -> str:
    return f"{ref.name}/{ref.version}"


@dataclass(frozen=True, slots=True)
class WaveCounts:
    """A wave's tallies and the two sides' totals."""

    tallies: tuple[CounterTally, ...]
    canary: Counts
    stable: Counts
    canary_reporting: bool
    """Some canary node reports counters for the canary."""
    comparable: bool
    """Some node can serve as stable's side (a wave where every comparable node runs only the
    canary has none)."""
    slo: bool = True
    """Some reading of the wave's models counts slow requests against an SLO latency (without
    one, no request is slow and the slow share is not judged)."""

    @property
    def judged(self) -> bool:
        """Whether the sequential judge decides the wave: agents that report no counters, or a wave
        with no stable side to compare with, leave it to the thresholds alone."""
        return self.canary_reporting and self.comparable


def fold(
    previous: Sequence[CounterTally],
    stable: Revision,
    canary: Revision,
    canary_nodes: Sequence[str],
    nodes: Sequence[str],
    observations: Mapping[str, NodeObservation],
    since_s: float | None,
) -> WaveCounts:
    """Fold the fresh readings in `observations` into the `previous` tallies of the wave (see the
    module docstring). At most MAX_TALLIES tallies: canary pairs first, then stable ones by node."""
    canary_refs = changed_refs(canary, stable)
    stable_refs = changed_refs(stable, canary)
    canary_set = set(canary_nodes)
    classes = {observations[n].node_class for n in canary_nodes if n in observations}
    wanted: list[tuple[str, ModelRef, bool]] = [(n, r, True) for n in canary_nodes for r in canary_refs]
    for n in sorted(nodes):
        obs = observations.get(n)
        side_by_side = obs is not None and any(r in obs.loaded for r in stable_refs)
        if (n in canary_set and side_by_side) or (
            n not in canary_set and obs is not None and obs.node_class in classes
        ):
            wanted += [(n, r, False) for r in stable_refs]
    comparable = any(not c for _, _, c in wanted)
    wanted = wanted[:MAX_TALLIES]
    before = {(t.node, t.model): t for t in previous}
    tallies: list[CounterTally] = []
    sums = {True: Counts(), False: Counts()}
    reporting = False
    for node, ref, is_canary in wanted:
        key = model_key(ref)
        old = before.get((node, key))
        state = Tally(old.epoch, Counts(*old.last), Counts(*old.total)) if old is not None else None
        obs = observations.get(node)
        reading = obs.counters.get(ref) if obs is not None and obs.fresh(since_s) else None
        if reading is not None and max(reading.errors, reading.slow) <= reading.requests:
            # (an inconsistent reading, more errors than requests, is not folded)
            epoch = epoch_key(reading.epoch, reading.slo_latency_s)
            counts = Counts(reading.requests, reading.errors, reading.slow)
            if state is not None and state.epoch != epoch and state.epoch.rsplit("@", 1)[0] == reading.epoch:
                # The SLO latency changed within the agent's epoch: `slow` now counts against
                # another threshold, so this reading is a new baseline (nothing added).
                state = Tally(epoch, counts, state.total)
            else:
                state = tally(state, epoch, counts)
        if state is None:
            continue
        reporting = reporting or is_canary
        tallies.append(CounterTally(node, key, state.epoch, _triple(state.last), _triple(state.total)))
        sums[is_canary] = sums[is_canary] + state.total
    slo = any(
        c.slo_latency_s is not None
        for n, r, _ in wanted
        if n in observations and (c := observations[n].counters.get(r)) is not None
    )
    return WaveCounts(tuple(tallies), sums[True], sums[False], reporting, comparable, slo)


def _triple(c: Counts) -> tuple[int, int, int]:
    return c.requests, c.errors, c.slow


def assess(counts: WaveCounts, spec: AnalysisSpec) -> tuple[Judgement, Evidence]:
    """The judge's verdict on the wave's totals, and the evidence as status.rollout.evidence."""
    j = judge(counts.canary, counts.stable, settings_of(spec), slow_share=counts.slo)
    metrics = tuple(
        MetricRecord(m.metric, m.verdict.value, _cap(m.e_worse), _cap(m.e_within), m.describe())
        for m in j.metrics
    )
    return j, Evidence(j.verdict.value, counts.canary.requests, counts.stable.requests, metrics)


def _cap(e: float) -> float:
    return float(f"{min(e, E_CAP):.4g}")


def summary(evidence: Evidence) -> str:
    """One line: the verdict, samples each side, each metric's e-values."""
    parts = ", ".join(
        f"{m.name} {m.verdict} (e {m.e_worse:.3g} worse, {m.e_within:.3g} within)" for m in evidence.metrics
    )
    return (
        f"judge {evidence.verdict}: {evidence.canary_requests} canary requests,"
        f" {evidence.stable_requests} stable; {parts}"
    )
