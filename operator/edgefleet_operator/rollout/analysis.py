"""How a canary wave is judged: what nodes report (`observe` -> `NodeObservation`) and the verdict
on a wave's window (`analyse` -> `AnalysisResult`: Passed, Failed or Inconclusive, with its
checks). Pure.

Fresh reports only. A report (an EdgeNode status) counts for a model version only when it
describes the node after it was told to run that version: its observedGeneration is at least the
spec generation that set the version there (`observe`'s `set_at`; the reader's ledger has already
dropped reports whose sequence went backwards, see `edgefleet_operator.report_ledger`). A wave is
judged only on reports written within its window (heartbeat at or after the window's start,
`fresh`): the decision holds while a canary node has none, and stable nodes without one are no
baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgefleet_api import wire
from edgefleet_api.edge_node import EdgeNodeStatus, ModelCounters, ModelState
from edgefleet_api.inference_service import AnalysisSpec
from edgefleet_api.model_spec import ModelRef
from edgefleet_api.rollout_status import Outcome, Revision
from edgefleet_api.sla import SlaWindow
from edgefleet_operator.rollout.spec import has_checks


@dataclass(frozen=True, slots=True)
class NodeObservation:
    """What one node reports for the service."""

    loaded: frozenset[ModelRef] = frozenset()
    """Models loaded and Ready, with the digest the agent verified."""
    windows: Mapping[ModelRef, SlaWindow] = field(default_factory=dict)
    temperature_c: float | None = None
    node_class: str = ""
    """Device class (label edgefleet.io/device-class): nodes of one class are comparable."""
    heartbeat_s: float | None = None
    """When the report was written (epoch seconds; -inf: unknown). None: not given by the caller
    (`observe` always gives it), taken as fresh."""
    counters: Mapping[ModelRef, ModelCounters] = field(default_factory=dict)
    """The agent's cumulative counters per model version (what the sequential judge reads)."""
    failed: frozenset[ModelRef] = frozenset()
    """Models the node reports Failed (a load that did not succeed), in a fresh report."""

    def confirms(self, revision: Revision) -> bool:
        return all(r in self.loaded for r in revision.refs)

    def fresh(self, since_s: float | None) -> bool:
        """Written at or after `since_s` (None: no bound)."""
        return since_s is None or self.heartbeat_s is None or self.heartbeat_s >= since_s


def observe(
    service: str,
    status: EdgeNodeStatus,
    node_class: str = "",
    set_at: Mapping[tuple[str, ModelRef], int] | None = None,
    alive_s: float | None = None,
) -> NodeObservation:
    """NodeObservation of `service` (namespace/name) from an EdgeNode's status. `set_at`: spec
    entry (service, model ref) -> the spec generation that set it (see `report_ledger`); a model
    whose entry was set at a generation newer than the status's observedGeneration is left out
    (the report is older than the node's orders for it). `alive_s`: when the agent last renewed its
    Lease: an agent writes its status only when something in it changed, so a status older than a
    renewal still describes the node then (the report counts as written at the later of the two)."""
    loaded, failed, windows, counters = set(), set(), {}, {}
    for m in status.models:
        if m.service != service or not m.digest:
            continue
        ref = ModelRef(m.model, m.version, m.digest)
        if set_at is not None and status.observed_generation < set_at.get((service, ref), 0):
            continue
        if m.state is ModelState.READY:
            loaded.add(ref)
        elif m.state is ModelState.FAILED:
            failed.add(ref)
        if m.sla is not None:
            windows[ref] = m.sla
        if m.counters is not None:
            counters[ref] = m.counters
    temperature = status.gpu.temperature_c if status.gpu is not None else None
    written = wire.parse_time(status.heartbeat_time)
    heartbeat = written if written is not None else float("-inf")
    if alive_s is not None and written is not None:
        heartbeat = max(heartbeat, alive_s)
    return NodeObservation(
        frozenset(loaded), windows, temperature, node_class, heartbeat, counters, frozenset(failed)
    )


class ObservationMemo:
    """`observe` remembered per (service, node) from pass to pass: a node is observed again only
    when its status object (a pass's typed view, kept while the EdgeNode's resourceVersion holds),
    its class, its entries' generations or its agent's Lease renewal changed. At 1,000 nodes a
    pass observed every node of every service; now it observes the few whose agents wrote or
    renewed since. `end_pass` forgets what the pass did not ask for (gone services and nodes)."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._used: dict[tuple[str, str], tuple[Any, ...]] = {}

    def observe(
        self,
        service: str,
        node: str,
        status: EdgeNodeStatus,
        node_class: str = "",
        set_at: Mapping[tuple[str, ModelRef], int] | None = None,
        alive_s: float | None = None,
    ) -> NodeObservation:
        """`observe(service, status, node_class, set_at, alive_s)` for `node`, as it would return."""
        key = (service, node)
        kept = self._used.get(key) or self._kept.get(key)
        if (
            kept is not None
            and kept[0] is status
            and kept[1] == node_class
            and kept[2] == alive_s
            and kept[3] == set_at
        ):
            self._used[key] = kept
            result: NodeObservation = kept[4]
            return result
        got = observe(service, status, node_class, set_at, alive_s)
        self._used[key] = (status, node_class, alive_s, None if set_at is None else dict(set_at), got)
        return got

    def end_pass(self) -> None:
        """What this pass observed is what the next one may reuse."""
        self._kept, self._used = self._used, {}


@dataclass(frozen=True, slots=True)
class Check:
    """One check's value against its limit; `passed` is None when it could not run (no baseline)."""

    name: str
    value: float | None
    limit: float | None
    passed: bool | None
    note: str = ""

    def describe(self) -> str:
        if self.passed is None:
            return f"{self.name} skipped ({self.note})"
        op = ">" if not self.passed else "ok, limit"
        base = f" ({self.note})" if self.note else ""
        return f"{self.name} {_num(self.value)} {op} {_num(self.limit)}{base}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


@dataclass(frozen=True, slots=True)
class AnalysisResult:
    outcome: Outcome
    checks: tuple[Check, ...]
    requests: int

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.passed is False)

    @property
    def message(self) -> str:
        if self.outcome is Outcome.INCONCLUSIVE:
            return f"inconclusive: {self.requests} requests on the canary, fewer than needed"
        if not self.checks:
            return "no checks configured"
        return "; ".join(c.describe() for c in self.checks)


def _requests(w: SlaWindow) -> int:
    return w.requests or 0


def _aggregate(windows: Sequence[SlaWindow]) -> tuple[int, float, float | None, float | None]:
    """(requests, error rate, request-weighted p95, request-weighted p99) of several windows."""
    requests = sum(_requests(w) for w in windows)
    if requests == 0:
        return 0, 0.0, None, None
    err = sum((w.error_rate or 0.0) * _requests(w) for w in windows) / requests

    def mean(get: Any) -> float | None:
        pairs = [(get(w), _requests(w)) for w in windows if get(w) is not None and w.requests]
        n = sum(r for _, r in pairs)
        return sum(v * r for v, r in pairs) / n if n else None

    return requests, err, mean(lambda w: w.p95_latency_s), mean(lambda w: w.p99_latency_s)


def changed_refs(revision: Revision, other: Revision | None) -> list[ModelRef]:
    """The models that judge `revision`: those that differ from `other`'s (a model both revisions
    share says nothing about the change); all of them if none differ."""
    return [r for r in revision.refs if other is None or r not in other.refs] or list(revision.refs)


def revision_windows(revision: Revision, other: Revision | None, obs: NodeObservation) -> list[SlaWindow]:
    """The windows that judge `revision` on one node (see `changed_refs`)."""
    return [obs.windows[r] for r in changed_refs(revision, other) if r in obs.windows]


def analyse(
    spec: AnalysisSpec,
    stable: Revision,
    canary: Revision,
    canary_nodes: Sequence[str],
    observations: Mapping[str, NodeObservation],
    traffic_weight: int = 100,
    fresh_since_s: float | None = None,
) -> AnalysisResult:
    """Judge the canary on `canary_nodes` against absolute limits and against the stable revision on
    comparable nodes (same node class as some canary node; side-by-side stable counts too). Only
    reports written at or after `fresh_since_s` count (a canary node without one counts as having
    served nothing; the caller holds the wave instead, see `decision`).

    Inconclusive when the canary served fewer than `min_samples` requests. Absolute latency limits
    apply to the worst canary node; regressions compare request-weighted means; error rates are
    totals over requests. A relative check with a baseline under `min_samples` is skipped.
    """
    if not has_checks(spec):
        return AnalysisResult(Outcome.PASSED, (), 0)
    empty = NodeObservation()
    observations = {n: o for n, o in observations.items() if o.fresh(fresh_since_s)}
    cobs = {n: observations.get(n, empty) for n in canary_nodes}
    per_node = {n: revision_windows(canary, stable, o) for n, o in cobs.items()}
    c_windows = [w for ws in per_node.values() for w in ws]
    c_req, c_err, c_p95, c_p99 = _aggregate(c_windows)
    if c_req < spec.min_samples:
        return AnalysisResult(Outcome.INCONCLUSIVE, (), c_req)
    classes = {o.node_class for o in cobs.values()}
    comparable = {n: o for n, o in observations.items() if o.node_class in classes}
    s_windows = [w for o in comparable.values() for w in revision_windows(stable, canary, o)]
    s_req, s_err, s_p95, s_p99 = _aggregate(s_windows)
    baseline = s_req >= spec.min_samples
    no_base = f"stable served {s_req} < {spec.min_samples} requests on comparable nodes"
    checks: list[Check] = []

    def worst(get: Any) -> float | None:
        values = [get(w) for w in c_windows if get(w) is not None and w.requests]
        return max(values) if values else None

    def upper(name: str, value: float | None, limit: float | None, note: str = "", ms: bool = False) -> None:
        """A check that `value` <= `limit`; `ms`: latencies, shown in milliseconds."""
        if limit is not None and value is not None:
            shown = (wire.s_to_ms(value), wire.s_to_ms(limit)) if ms else (value, limit)
            checks.append(Check(name, *shown, value <= limit, note))

    upper(
        "p95LatencyMs", worst(lambda w: w.p95_latency_s), spec.max_p95_latency_s, "worst canary node", ms=True
    )
    upper(
        "p99LatencyMs", worst(lambda w: w.p99_latency_s), spec.max_p99_latency_s, "worst canary node", ms=True
    )
    upper("errorRate", c_err, spec.max_error_rate)
    if spec.min_throughput_rps is not None:
        rps = sum(w.throughput_rps or 0.0 for w in c_windows) / max(1, len(canary_nodes))
        limit = spec.min_throughput_rps * traffic_weight / 100
        checks.append(Check("throughputRps", rps, limit, rps >= limit, "per canary node"))
    relative = (
        ("p95Regression", c_p95, s_p95, spec.max_latency_regression_pct),
        ("p99Regression", c_p99, s_p99, spec.max_latency_regression_pct),
    )
    for name, cv, sv, pct in relative:
        if pct is None or cv is None:
            continue
        if not baseline or sv is None:
            checks.append(Check(name, wire.s_to_ms(cv), None, None, no_base))
        else:
            upper(name, cv, sv * (1 + pct / 100), f"stable {wire.s_to_ms(sv):.4g} +{pct:g}%", ms=True)
    if spec.max_error_rate_increase is not None:
        if baseline:
            limit = s_err + spec.max_error_rate_increase
            upper("errorRateIncrease", c_err, limit, f"stable {s_err:.4g}")
        else:
            checks.append(Check("errorRateIncrease", c_err, None, None, no_base))
    if spec.max_temperature_increase_c is not None:
        c_temps = [o.temperature_c for o in cobs.values() if o.temperature_c is not None]
        s_temps = [
            o.temperature_c for n, o in comparable.items() if n not in cobs and o.temperature_c is not None
        ]
        if c_temps and s_temps:
            s_mean = sum(s_temps) / len(s_temps)
            upper(
                "temperatureC",
                sum(c_temps) / len(c_temps),
                s_mean + spec.max_temperature_increase_c,
                f"stable nodes {s_mean:.3g}C",
            )
        else:
            checks.append(Check("temperatureC", None, None, None, "no temperatures to compare"))
    failed = any(c.passed is False for c in checks)
    return AnalysisResult(Outcome.FAILED if failed else Outcome.PASSED, tuple(checks), c_req)
