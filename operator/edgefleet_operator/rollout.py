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
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Obj = Mapping[str, Any]
MAX_ANALYSES = 64
"""status.rollout.analysis keeps the newest this many (the CRD's maxItems)."""
MAX_HISTORY = 10
"""status.rollout.history keeps the newest this many (the CRD's maxItems)."""


# --- spec ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class ModelRef:
    """One model of a revision, identified by its artifact's digest."""

    name: str
    version: str
    digest: str


@dataclass(frozen=True, slots=True)
class Revision:
    """The (model, version, digest) of all of a service's models, sorted by model name."""

    refs: tuple[ModelRef, ...]

    @classmethod
    def of(cls, models: Iterable[Obj]) -> Revision:
        refs = tuple(sorted(ModelRef(m["name"], str(m["version"]), m["artifact"]["digest"]) for m in models))
        if not refs:
            raise ValueError("a revision needs at least one model")
        return cls(refs)

    @property
    def label(self) -> str:
        """The versions joined by commas (what status.stableVersion/canaryVersion show)."""
        return ",".join(r.version for r in self.refs)


class Strategy(enum.Enum):
    CANARY = "Canary"
    ALL_AT_ONCE = "AllAtOnce"


@dataclass(frozen=True, slots=True)
class Wave:
    """Share of the service's nodes on the canary (percent or count) and its traffic weight there."""

    percent: int | None = None
    count: int | None = None
    traffic_weight: int = 100
    analysis_s: int | None = None
    """Analysis window; None: the analysis spec's interval."""

    def __post_init__(self) -> None:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a wave needs exactly one of percent or count")
        if self.percent is not None and not 1 <= self.percent <= 100:
            raise ValueError(f"wave percent must be 1..100, got {self.percent}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"wave count must be at least 1, got {self.count}")
        if not 0 <= self.traffic_weight <= 100:
            raise ValueError(f"wave trafficWeight must be 0..100, got {self.traffic_weight}")

    def nodes(self, total: int) -> int:
        """Canary nodes of this wave out of `total`: at least 1 (if any), at most `total`."""
        if total <= 0:
            return 0
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        return min(total, max(1, math.ceil(round(self.percent * total / 100, 9))))

    def describe(self) -> str:
        return f"{self.percent}%" if self.percent is not None else f"{self.count} nodes"


@dataclass(frozen=True, slots=True)
class AnalysisSpec:
    """How a wave is judged. Absolute thresholds default to the service SLA's p95, p99 and error rate
    (not its throughput: a canary's throughput depends on its traffic share)."""

    interval_s: int = 60
    min_samples: int = 100
    failure_limit: int = 1
    max_p95_ms: float | None = None
    max_p99_ms: float | None = None
    max_error_rate: float | None = None
    min_throughput_rps: float | None = None
    """Per canary node, scaled by the wave's traffic weight."""
    max_latency_regression_pct: float | None = None
    max_error_rate_increase: float | None = None
    max_temperature_increase_c: float | None = None

    def __post_init__(self) -> None:
        if self.interval_s < 1 or self.min_samples < 1 or self.failure_limit < 1:
            raise ValueError("intervalSeconds, minSamples and failureLimit must be at least 1")

    @property
    def has_checks(self) -> bool:
        return any(
            v is not None
            for v in (
                self.max_p95_ms,
                self.max_p99_ms,
                self.max_error_rate,
                self.min_throughput_rps,
                self.max_latency_regression_pct,
                self.max_error_rate_increase,
                self.max_temperature_increase_c,
            )
        )


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """What the service's spec asks of the rollout: the target revision and how to reach it."""

    revision: Revision
    models: tuple[Obj, ...]
    """The spec's model entries (their artifact URIs etc. make EdgeNode spec entries)."""
    strategy: Strategy = Strategy.CANARY
    waves: tuple[Wave, ...] = (Wave(percent=100),)
    analysis: AnalysisSpec = AnalysisSpec()
    paused: bool = False

    def __post_init__(self) -> None:
        if not self.waves:
            raise ValueError("a rollout needs at least one wave")


def parse_spec(isvc_spec: Obj) -> RolloutSpec:
    """RolloutSpec from an InferenceService's spec (as the API server returns it, defaults applied).

    No `rollout` at all means AllAtOnce (as KServe and Argo Rollouts do without canary steps);
    Canary without waves is a single 100% wave gated by the analysis.
    """
    models = tuple(isvc_spec["models"])
    ro = isvc_spec.get("rollout")
    if ro is None:
        return RolloutSpec(Revision.of(models), models, Strategy.ALL_AT_ONCE, analysis=AnalysisSpec())
    a = ro.get("analysis") or {}
    sla = isvc_spec.get("sla") or {}
    analysis = AnalysisSpec(
        interval_s=int(a.get("intervalSeconds", 60)),
        min_samples=int(a.get("minSamples", 100)),
        failure_limit=int(a.get("failureLimit", 1)),
        max_p95_ms=_float(a.get("maxP95LatencyMs", sla.get("p95LatencyMs"))),
        max_p99_ms=_float(a.get("maxP99LatencyMs", sla.get("p99LatencyMs"))),
        max_error_rate=_float(a.get("maxErrorRate", sla.get("maxErrorRate"))),
        min_throughput_rps=_float(a.get("minThroughputRps")),
        max_latency_regression_pct=_float(a.get("maxLatencyRegressionPercent")),
        max_error_rate_increase=_float(a.get("maxErrorRateIncrease")),
        max_temperature_increase_c=_float(a.get("maxTemperatureIncreaseC")),
    )
    strategy = Strategy(ro.get("strategy", "Canary"))
    waves = tuple(
        Wave(w.get("percent"), w.get("count"), int(w.get("trafficWeight", 100)), w.get("analysisSeconds"))
        for w in ro.get("waves") or [{"percent": 100}]
    )
    if strategy is Strategy.ALL_AT_ONCE:
        waves = (Wave(percent=100),)
    return RolloutSpec(Revision.of(models), models, strategy, waves, analysis, bool(ro.get("paused", False)))


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


# --- observations -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlaWindow:
    """One model version's SLA window on one node, as its agent reports it."""

    requests: int = 0
    p95_ms: float | None = None
    p99_ms: float | None = None
    error_rate: float = 0.0
    throughput_rps: float = 0.0


@dataclass(frozen=True, slots=True)
class NodeObservation:
    """What one node reports for the service."""

    loaded: frozenset[ModelRef] = frozenset()
    """Models loaded and Ready, with the digest the agent verified."""
    windows: Mapping[ModelRef, SlaWindow] = field(default_factory=dict)
    temperature_c: float | None = None
    node_class: str = ""
    """Device class (label edgefleet.io/device-class): nodes of one class are comparable."""

    def confirms(self, revision: Revision) -> bool:
        return all(r in self.loaded for r in revision.refs)


def observe(service: str, edge_node_status: Obj, node_class: str = "") -> NodeObservation:
    """NodeObservation of `service` (namespace/name) from an EdgeNode's status dict."""
    loaded, windows = set(), {}
    for m in edge_node_status.get("models") or []:
        if m.get("service") != service or not m.get("digest"):
            continue
        ref = ModelRef(str(m.get("model")), str(m.get("version")), m["digest"])
        if m.get("state") == "Ready":
            loaded.add(ref)
        w = m.get("sla") or {}
        if w:
            windows[ref] = SlaWindow(
                int(w.get("requests") or 0),
                _float(w.get("p95LatencyMs")),
                _float(w.get("p99LatencyMs")),
                float(w.get("errorRate") or 0.0),
                float(w.get("throughputRps") or 0.0),
            )
    temp = (edge_node_status.get("gpu") or {}).get("temperatureC")
    return NodeObservation(frozenset(loaded), windows, _float(temp), node_class)


# --- analysis -----------------------------------------------------------------------------------


class Outcome(enum.Enum):
    PASSED = "Passed"
    FAILED = "Failed"
    INCONCLUSIVE = "Inconclusive"


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


def _aggregate(windows: Sequence[SlaWindow]) -> tuple[int, float, float | None, float | None]:
    """(requests, error rate, request-weighted p95, request-weighted p99) of several windows."""
    requests = sum(w.requests for w in windows)
    if requests == 0:
        return 0, 0.0, None, None
    err = sum(w.error_rate * w.requests for w in windows) / requests

    def mean(get: Any) -> float | None:
        pairs = [(get(w), w.requests) for w in windows if get(w) is not None and w.requests]
        n = sum(r for _, r in pairs)
        return sum(v * r for v, r in pairs) / n if n else None

    return requests, err, mean(lambda w: w.p95_ms), mean(lambda w: w.p99_ms)


def revision_windows(revision: Revision, other: Revision | None, obs: NodeObservation) -> list[SlaWindow]:
    """The windows that judge `revision` on one node: those of its models that differ from `other`'s
    (a model both revisions share says nothing about the change); all of them if none differ."""
    changed = [r for r in revision.refs if other is None or r not in other.refs] or list(revision.refs)
    return [obs.windows[r] for r in changed if r in obs.windows]


def analyse(
    spec: AnalysisSpec,
    stable: Revision,
    canary: Revision,
    canary_nodes: Sequence[str],
    observations: Mapping[str, NodeObservation],
    traffic_weight: int = 100,
) -> AnalysisResult:
    """Judge the canary on `canary_nodes` against absolute limits and against the stable revision on
    comparable nodes (same node class as some canary node; side-by-side stable counts too).

    Inconclusive when the canary served fewer than `min_samples` requests. Absolute latency limits
    apply to the worst canary node; regressions compare request-weighted means; error rates are
    totals over requests. A relative check with a baseline under `min_samples` is skipped.
    """
    if not spec.has_checks:
        return AnalysisResult(Outcome.PASSED, (), 0)
    empty = NodeObservation()
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

    def upper(name: str, value: float | None, limit: float | None, note: str = "") -> None:
        if limit is not None and value is not None:
            checks.append(Check(name, value, limit, value <= limit, note))

    upper("p95LatencyMs", worst(lambda w: w.p95_ms), spec.max_p95_ms, "worst canary node")
    upper("p99LatencyMs", worst(lambda w: w.p99_ms), spec.max_p99_ms, "worst canary node")
    upper("errorRate", c_err, spec.max_error_rate)
    if spec.min_throughput_rps is not None:
        rps = sum(w.throughput_rps for w in c_windows) / max(1, len(canary_nodes))
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
            checks.append(Check(name, cv, None, None, no_base))
        else:
            upper(name, cv, sv * (1 + pct / 100), f"stable {sv:.4g} +{pct:g}%")
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


# --- state --------------------------------------------------------------------------------------


class Phase(enum.Enum):
    IDLE = "Idle"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    ABORTED = "Aborted"


ACTIVE = (Phase.PROGRESSING, Phase.PAUSED)
STOPPED = (Phase.ROLLED_BACK, Phase.ABORTED)


class Action(enum.Enum):
    """Manual control (annotation edgefleet.io/rollout-action)."""

    PROMOTE = "promote"
    ABORT = "abort"
    PAUSE = "pause"
    RESUME = "resume"


def parse_action(value: str | None) -> Action | None:
    """The annotation's value as an Action; None for none. Unknown values raise ValueError."""
    if not value:
        return None
    try:
        return Action(value.strip().lower())
    except ValueError:
        raise ValueError(
            f"unknown rollout action {value!r}: use one of {', '.join(a.value for a in Action)}"
        ) from None


@dataclass(frozen=True, slots=True)
class AnalysisRecord:
    wave: int
    time_s: int
    result: Outcome
    message: str


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    from_version: str
    to_version: str
    result: str
    """Promoted, RolledBack, Aborted or Superseded."""
    start_s: int
    finish_s: int
    message: str


@dataclass(frozen=True, slots=True)
class RolloutState:
    """status.rollout as a value. Invariants: canary_nodes are set only in an active phase with both
    revisions known; canary is set in an active phase; 0 <= wave < total_waves when active."""

    phase: Phase = Phase.IDLE
    stable: Revision | None = None
    stable_models: tuple[Obj, ...] = ()
    canary: Revision | None = None
    canary_models: tuple[Obj, ...] = ()
    wave: int = 0
    total_waves: int = 0
    wave_start_s: int | None = None
    """When the current wave's analysis window began; None until all its nodes confirmed."""
    start_s: int | None = None
    failed_checks: int = 0
    canary_nodes: tuple[str, ...] = ()
    analysis: tuple[AnalysisRecord, ...] = ()
    history: tuple[HistoryRecord, ...] = ()
    manually_paused: bool = False
    rollback_reason: str = ""
    step_text: str = ""
    message: str = ""

    def check_invariants(self) -> None:
        if self.phase in ACTIVE:
            assert self.canary is not None, "an active rollout has a canary"
            assert 0 <= self.wave < max(1, self.total_waves), (self.wave, self.total_waves)
        if self.canary_nodes:
            assert self.phase in ACTIVE and self.stable is not None, "canary nodes outside a rollout"
            assert len(set(self.canary_nodes)) == len(self.canary_nodes), "a canary node twice"
        assert self.stable is None or self.stable != self.canary or self.phase not in ACTIVE

    # --- status dict <-> state ---

    @classmethod
    def from_status(cls, d: Obj | None) -> RolloutState:
        """Parse status.rollout (as `to_status` wrote it); an empty or missing dict is Idle."""
        d = d or {}
        stable_models = tuple(d.get("stableModels") or ())
        canary_models = tuple(d.get("canaryModels") or ())
        return cls(
            phase=Phase(d.get("phase", "Idle")),
            stable=Revision.of(stable_models) if stable_models else None,
            stable_models=stable_models,
            canary=Revision.of(canary_models) if canary_models else None,
            canary_models=canary_models,
            wave=int(d.get("currentWave", 0)),
            total_waves=int(d.get("totalWaves", 0)),
            wave_start_s=_parse_time(d.get("waveStartTime")),
            start_s=_parse_time(d.get("startTime")),
            failed_checks=int(d.get("failedChecks", 0)),
            canary_nodes=tuple(d.get("canaryNodes") or ()),
            analysis=tuple(
                AnalysisRecord(
                    int(a["wave"]), _parse_time(a["time"]) or 0, Outcome(a["result"]), a.get("message", "")
                )
                for a in d.get("analysis") or ()
            ),
            history=tuple(
                HistoryRecord(
                    h.get("fromVersion", ""),
                    h["toVersion"],
                    h["result"],
                    _parse_time(h.get("startTime")) or 0,
                    _parse_time(h.get("finishTime")) or 0,
                    h.get("message", ""),
                )
                for h in d.get("history") or ()
            ),
            manually_paused=bool(d.get("manuallyPaused", False)),
            rollback_reason=d.get("rollbackReason", ""),
            step_text=d.get("step", ""),
            message=d.get("message", ""),
        )

    def to_status(self) -> dict[str, Any]:
        """status.rollout (JSON-ready; `from_status(to_status(s)) == s`)."""
        out: dict[str, Any] = {
            "phase": self.phase.value,
            "currentWave": self.wave,
            "totalWaves": self.total_waves,
            "step": self.step_text,
            "failedChecks": self.failed_checks,
            "canaryNodes": list(self.canary_nodes),
            "analysis": [
                {"wave": a.wave, "time": _rfc3339(a.time_s), "result": a.result.value, "message": a.message}
                for a in self.analysis
            ],
            "history": [
                {
                    "fromVersion": h.from_version,
                    "toVersion": h.to_version,
                    "result": h.result,
                    "startTime": _rfc3339(h.start_s),
                    "finishTime": _rfc3339(h.finish_s),
                    "message": h.message,
                }
                for h in self.history
            ],
            "manuallyPaused": self.manually_paused,
            "message": self.message,
        }
        if self.stable is not None:
            out["stableVersion"] = self.stable.label
            out["stableModels"] = [dict(m) for m in self.stable_models]
        if self.canary is not None:
            out["canaryVersion"] = self.canary.label
            out["canaryModels"] = [dict(m) for m in self.canary_models]
        if self.wave_start_s is not None:
            out["waveStartTime"] = _rfc3339(self.wave_start_s)
        if self.start_s is not None:
            out["startTime"] = _rfc3339(self.start_s)
        if self.rollback_reason:
            out["rollbackReason"] = self.rollback_reason
        return out


def _rfc3339(epoch_s: int) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> int | None:
    if not value:
        return None
    return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())


# --- decision -----------------------------------------------------------------------------------


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

    status: dict[str, Any]
    targets: Mapping[str, tuple[NodeTarget, ...]]
    events: tuple[RolloutEvent, ...]
    degraded: tuple[str, str] | None
    """(reason, message) for the service's Degraded condition, while a failed rollout is stopped."""
    models: Mapping[Revision, tuple[Obj, ...]]
    """The model spec entries of each revision in `targets` (the stable one may be gone from spec)."""

    def placed(self, node: str) -> list[tuple[Obj, int]]:
        """(model spec entry, traffic weight) per model version the node must hold; a model that two
        revisions share appears once with their weights added."""
        weights: dict[ModelRef, int] = {}
        entries: dict[ModelRef, Obj] = {}
        for t in self.targets.get(node, ()):
            for m in self.models[t.revision]:
                ref = ModelRef(m["name"], str(m["version"]), m["artifact"]["digest"])
                weights[ref] = weights.get(ref, 0) + t.traffic_weight
                entries.setdefault(ref, m)
        return [(entries[r], weights[r]) for r in sorted(weights)]

    def node_versions(self) -> dict[str, str]:
        """node -> label of the revision serving most of its traffic (for service_status)."""
        return {
            n: max(ts, key=lambda t: t.traffic_weight).revision.label for n, ts in self.targets.items() if ts
        }


def canary_order(service: str, nodes: Iterable[str]) -> list[str]:
    """The order nodes become canaries in: by a hash of (service, node), so canaries of a service
    spread across zones and classes, and different services start on different nodes."""
    return sorted(nodes, key=lambda n: (hashlib.sha256(f"{service}\0{n}".encode()).digest(), n))


@dataclass
class _Ctx:
    spec: RolloutSpec
    service: str
    nodes: tuple[str, ...]
    observations: Mapping[str, NodeObservation]
    now: int
    events: list[RolloutEvent] = field(default_factory=list)

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.events.append(RolloutEvent(reason, message, warning))

    def obs(self, node: str) -> NodeObservation:
        return self.observations.get(node, NodeObservation())


def step(
    spec: RolloutSpec,
    previous: Obj | None,
    nodes: Sequence[str],
    observations: Mapping[str, NodeObservation],
    now: float,
    action: Action | None = None,
    service: str = "",
) -> Decision:
    """One rollout decision. `previous`: the last status.rollout written (None at first); `nodes`: the
    nodes placement chose for the service; `observations`: node -> what it reports (missing: nothing
    loaded); `now`: epoch seconds; `action`: the manual action, which the caller then clears.

    Deterministic in its arguments; `previous` carries all state (a restart loses nothing). Write the
    returned status before the EdgeNode specs built from `targets`: then a crash in between leaves no
    node on a revision that status does not record (the next pass recomputes the same targets).
    """
    ctx = _Ctx(spec, service, tuple(sorted(nodes)), observations, int(now))
    state = RolloutState.from_status(previous)
    state.check_invariants()
    state = _follow_spec(state, ctx)
    state = _apply_action(state, action, ctx)
    state = _apply_pause(state, ctx)
    state = _advance(state, ctx)
    state = _describe(state, ctx)
    state.check_invariants()
    targets = _targets(state, ctx)
    models: dict[Revision, tuple[Obj, ...]] = {}
    if state.stable is not None:
        models[state.stable] = state.stable_models
    if state.canary is not None:
        models[state.canary] = state.canary_models
    assert all(t.revision in models for ts in targets.values() for t in ts), "unrecorded revision"
    degraded = None
    if state.phase is Phase.ROLLED_BACK and state.rollback_reason and spec.revision == state.canary:
        degraded = ("RolloutFailed", state.rollback_reason)
    return Decision(state.to_status(), targets, tuple(ctx.events), degraded, models)


# --- phases of a step ---------------------------------------------------------------------------


def _start(state: RolloutState, ctx: _Ctx) -> RolloutState:
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
        canary=spec.revision,
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
    )


def _finish(state: RolloutState, ctx: _Ctx, result: str, message: str, phase: Phase) -> RolloutState:
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
    )
    if result == "Promoted":
        state = dataclasses.replace(
            state, stable=state.canary, stable_models=state.canary_models, canary=None, canary_models=()
        )
    return state


def _follow_spec(state: RolloutState, ctx: _Ctx) -> RolloutState:
    """React to the spec's revision: first deployment, fast rollback, supersede, new rollout."""
    spec, target = ctx.spec, ctx.spec.revision
    if state.stable is None:  # first deployment: no canary, the revision replaces any earlier try
        if state.canary != target:
            state = dataclasses.replace(
                state, phase=Phase.PROGRESSING, canary=target, canary_models=spec.models, start_s=ctx.now,
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
        return dataclasses.replace(
            state, stable_models=spec.models, canary=None, canary_models=(), rollback_reason=""
        )
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


def _apply_action(state: RolloutState, action: Action | None, ctx: _Ctx) -> RolloutState:
    if action is None:
        return state
    active = state.phase in ACTIVE
    if action is Action.PROMOTE and active:
        assert state.canary is not None
        ctx.event("RolloutPromoted", f"{state.canary.label} promoted manually")
        if state.stable is None:
            return dataclasses.replace(
                state, phase=Phase.IDLE, stable=state.canary, stable_models=state.canary_models,
                canary=None, canary_models=(), canary_nodes=(), wave_start_s=None,
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


def _apply_pause(state: RolloutState, ctx: _Ctx) -> RolloutState:
    if state.stable is None or state.phase not in ACTIVE:
        return state
    paused = ctx.spec.paused or state.manually_paused
    if paused and state.phase is Phase.PROGRESSING:
        ctx.event("RolloutPaused", f"paused at wave {state.wave + 1}/{state.total_waves}")
        return dataclasses.replace(state, phase=Phase.PAUSED, wave_start_s=None)
    if not paused and state.phase is Phase.PAUSED:
        ctx.event("RolloutResumed", f"resumed at wave {state.wave + 1}/{state.total_waves}")
        return dataclasses.replace(state, phase=Phase.PROGRESSING)
    return state


def _advance(state: RolloutState, ctx: _Ctx) -> RolloutState:
    if state.phase is not Phase.PROGRESSING:
        return state
    canary, stable = state.canary, state.stable
    assert canary is not None
    if stable is None:
        return _advance_first(state, ctx)
    spec = ctx.spec
    wave_index = min(state.wave, len(spec.waves) - 1)
    wave = spec.waves[wave_index]
    state = _grow_canaries(dataclasses.replace(state, wave=wave_index), wave, ctx)
    pending = [n for n in state.canary_nodes if not ctx.obs(n).confirms(canary)]
    if pending or not state.canary_nodes:
        why = f"waiting for {len(pending)}/{len(state.canary_nodes)} node(s) to load {canary.label}"
        return dataclasses.replace(state, wave_start_s=None, message=why if ctx.nodes else "no nodes placed")
    if state.wave_start_s is None:
        state = dataclasses.replace(state, wave_start_s=ctx.now)
    if spec.strategy is Strategy.ALL_AT_ONCE:
        return _wave_passed(state, ctx, None)
    window = wave.analysis_s or spec.analysis.interval_s
    assert state.wave_start_s is not None
    left = state.wave_start_s + window - ctx.now
    if left > 0:
        return dataclasses.replace(state, message=f"analysing: {left}s of the window left")
    result = analyse(spec.analysis, stable, canary, state.canary_nodes, ctx.observations, wave.traffic_weight)
    if result.outcome is Outcome.PASSED:
        return _wave_passed(state, ctx, result)
    if result.outcome is Outcome.INCONCLUSIVE:
        return _inconclusive(state, ctx, result)
    return _wave_failed(state, ctx, result)


def _advance_first(state: RolloutState, ctx: _Ctx) -> RolloutState:
    """First deployment: stable once every placed node confirms the revision."""
    assert state.canary is not None
    pending = [n for n in ctx.nodes if not ctx.obs(n).confirms(state.canary)]
    if pending or not ctx.nodes:
        return dataclasses.replace(
            state, message=f"waiting for {len(pending)}/{len(ctx.nodes)} node(s) to load {state.canary.label}"
        )
    ctx.event("Deployed", f"{state.canary.label} deployed on {len(ctx.nodes)} node(s)")
    return dataclasses.replace(
        state, phase=Phase.IDLE, stable=state.canary, stable_models=state.canary_models, canary=None,
        canary_models=(), wave_start_s=None, message=f"{state.canary.label} deployed",
    )  # fmt: skip


def _grow_canaries(state: RolloutState, wave: Wave, ctx: _Ctx) -> RolloutState:
    """Keep this rollout's canaries still placed; add nodes in canary order up to the wave's count.
    A change restarts the window (a new node must confirm before the wave is judged)."""
    placed = set(ctx.nodes)
    kept = [n for n in state.canary_nodes if n in placed]
    want = wave.nodes(len(ctx.nodes))
    if len(kept) < want:
        chosen = set(kept)
        kept += [n for n in canary_order(ctx.service, ctx.nodes) if n not in chosen][: want - len(kept)]
    if tuple(kept) == state.canary_nodes:
        return state
    return dataclasses.replace(state, canary_nodes=tuple(kept), wave_start_s=None)


def _record(state: RolloutState, ctx: _Ctx, outcome: Outcome, message: str) -> RolloutState:
    """Add an analysis record; an Inconclusive one replaces the wave's previous Inconclusive one."""
    records = list(state.analysis)
    if records and records[-1].wave == state.wave and records[-1].result is Outcome.INCONCLUSIVE:
        records.pop()
    records.append(AnalysisRecord(state.wave, ctx.now, outcome, message))
    return dataclasses.replace(state, analysis=tuple(records[-MAX_ANALYSES:]))


def _wave_passed(state: RolloutState, ctx: _Ctx, result: AnalysisResult | None) -> RolloutState:
    canary = state.canary
    assert canary is not None
    if result is not None:
        state = _record(state, ctx, Outcome.PASSED, result.message)
        ctx.event("AnalysisPassed", f"wave {state.wave + 1}/{state.total_waves}: {result.message}")
    if state.wave + 1 >= len(ctx.spec.waves):
        ctx.event("RolloutPromoted", f"{canary.label} promoted: all waves passed")
        return _finish(state, ctx, "Promoted", "all waves passed", Phase.PROMOTED)
    nxt = ctx.spec.waves[state.wave + 1]
    ctx.event("WaveStarted", f"wave {state.wave + 2}/{state.total_waves} ({nxt.describe()})")
    return _grow_canaries(dataclasses.replace(state, wave=state.wave + 1, wave_start_s=None), nxt, ctx)


def _inconclusive(state: RolloutState, ctx: _Ctx, result: AnalysisResult) -> RolloutState:
    message = f"{result.message} (minSamples {ctx.spec.analysis.min_samples}); holding"
    last = state.analysis[-1] if state.analysis else None
    if not (last and last.wave == state.wave and last.result is Outcome.INCONCLUSIVE):
        ctx.event("AnalysisInconclusive", f"wave {state.wave + 1}/{state.total_waves}: {message}")
    return dataclasses.replace(_record(state, ctx, Outcome.INCONCLUSIVE, message), message=message)


def _wave_failed(state: RolloutState, ctx: _Ctx, result: AnalysisResult) -> RolloutState:
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


def _describe(state: RolloutState, ctx: _Ctx) -> RolloutState:
    """step and message for kubectl."""
    if state.phase in ACTIVE and state.stable is None:
        return dataclasses.replace(state, step_text="initial deploy")
    if state.phase in ACTIVE:
        wave = ctx.spec.waves[min(state.wave, len(ctx.spec.waves) - 1)]
        text = f"wave {state.wave + 1}/{state.total_waves} ({wave.describe()})"
        if state.phase is Phase.PAUSED:
            why = "spec.rollout.paused" if ctx.spec.paused else "the pause action"
            return dataclasses.replace(state, step_text=f"paused at {text}", message=f"paused by {why}")
        return dataclasses.replace(state, step_text=text)
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
    return dataclasses.replace(state, step_text=texts[state.phase], message=message)


def _targets(state: RolloutState, ctx: _Ctx) -> dict[str, tuple[NodeTarget, ...]]:
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
