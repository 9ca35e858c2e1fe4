"""InferenceService as typed values: the spec a user writes (models, batching, SLA, placement,
rollout strategy), which the operator reads, and the status only the operator writes (conditions,
nodes per version, the aggregated service level, the rollout: `rollout_status`). Conventions of
`from_obj`/`to_obj`: see `model_spec`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet_api import names, wire
from edgefleet_api.conditions import Condition, conditions_from_obj
from edgefleet_api.model_spec import Batching, ModelSpec
from edgefleet_api.rollout_status import RolloutStatus
from edgefleet_api.sla import EMPTY_WINDOW, SlaObjectives, SlaWindow
from edgefleet_api.wire import Obj, mapping, required

NO_SCHEDULE, PREFER_NO_SCHEDULE, NO_EXECUTE = "NoSchedule", "PreferNoSchedule", "NoExecute"
EFFECTS = (NO_SCHEDULE, PREFER_NO_SCHEDULE, NO_EXECUTE)
DEFAULT_TOPOLOGY_KEY = "topology.kubernetes.io/zone"
CANARY, ALL_AT_ONCE = "Canary", "AllAtOnce"
STRATEGIES = (CANARY, ALL_AT_ONCE)


def service_key(obj: Obj) -> str:
    """namespace/name of an InferenceService object: the service's name in EdgeNode specs."""
    return f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"


# --- placement --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Taint:
    """A Node's taint (core/v1), which tolerations match: NoSchedule and NoExecute must be
    tolerated; PreferNoSchedule is a penalty."""

    key: str
    effect: str = NO_SCHEDULE
    value: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("a taint needs a key")
        if self.effect not in EFFECTS:
            raise ValueError(f"taint effect {self.effect!r} is not one of {', '.join(EFFECTS)}")


@dataclass(frozen=True, slots=True)
class Toleration:
    """A Pod-style toleration, matched with Kubernetes' semantics (`ToleratesTaint`)."""

    key: str = ""
    """Taint key; empty (with operator Exists) tolerates every taint."""
    operator: str = "Equal"
    """Equal: key and value must match. Exists: key must match (any value)."""
    value: str = ""
    effect: str = ""
    """Effect tolerated; empty tolerates all effects."""

    def __post_init__(self) -> None:
        if self.operator not in ("Equal", "Exists"):
            raise ValueError(f"toleration operator {self.operator!r} is not Equal or Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists must have an empty value")
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration with an empty key must use operator Exists")
        if self.effect and self.effect not in EFFECTS:
            raise ValueError(f"toleration effect {self.effect!r} is not one of {EFFECTS}")

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if self.key and self.key != taint.key:
            return False
        return self.operator == "Exists" or self.value == taint.value

    @classmethod
    def from_obj(cls, obj: Obj) -> Toleration:
        obj = mapping(obj, "toleration")
        return cls(
            str(obj.get("key", "")), str(obj.get("operator", "Equal")), str(obj.get("value", "")),
            str(obj.get("effect", "")),
        )  # fmt: skip

    def to_obj(self) -> dict[str, Any]:
        out = {"key": self.key, "operator": self.operator, "value": self.value, "effect": self.effect}
        return {k: v for k, v in out.items() if v or k == "operator"}


@dataclass(frozen=True, slots=True)
class Spread:
    """Spread a service's nodes across the domains named by a node label (zones, sites).

    Like a topology spread constraint with whenUnsatisfiable DoNotSchedule: a new node may be
    added to a domain only if afterwards that domain holds at most `max_skew` more of the
    service's nodes than the least-loaded eligible domain. Nodes without the label are not
    eligible for the service.
    """

    topology_key: str = DEFAULT_TOPOLOGY_KEY
    max_skew: int = 1

    def __post_init__(self) -> None:
        if not self.topology_key:
            raise ValueError("spread needs a topology key")
        if self.max_skew < 1:
            raise ValueError(f"max_skew must be at least 1, got {self.max_skew}")

    @classmethod
    def from_obj(cls, obj: Obj) -> Spread:
        obj = mapping(obj, "spread")
        return cls(str(obj.get("topologyKey", DEFAULT_TOPOLOGY_KEY)), int(obj.get("maxSkew", 1)))

    def to_obj(self) -> dict[str, Any]:
        return {"topologyKey": self.topology_key, "maxSkew": self.max_skew}


@dataclass(frozen=True, slots=True)
class PlacementSpec:
    """Where the service runs: `replicas` nodes, or a `node_fraction` of the eligible ones, or
    (neither) every eligible node."""

    replicas: int | None = None
    node_fraction: float | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    spread: Spread | None = None

    @classmethod
    def from_obj(cls, obj: Obj) -> PlacementSpec:
        obj = mapping(obj, "placement")
        spread = obj.get("spread")
        return cls(
            replicas=wire.optional_int(obj.get("replicas")),
            node_fraction=wire.optional_float(obj.get("nodeFraction")),
            node_selector={str(k): str(v) for k, v in (obj.get("nodeSelector") or {}).items()},
            tolerations=tuple(Toleration.from_obj(t) for t in obj.get("tolerations") or ()),
            spread=Spread.from_obj(spread) if spread is not None else None,
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.replicas is not None:
            out["replicas"] = self.replicas
        if self.node_fraction is not None:
            out["nodeFraction"] = self.node_fraction
        if self.node_selector:
            out["nodeSelector"] = dict(self.node_selector)
        if self.tolerations:
            out["tolerations"] = [t.to_obj() for t in self.tolerations]
        if self.spread is not None:
            out["spread"] = self.spread.to_obj()
        return out


# --- rollout strategy -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaveSpec:
    """One canary wave: which nodes run the new version (exactly one of: `percent` or `count` of
    the service's nodes; `sites` sites or `site_percent` percent of its sites, every node of a
    chosen site but the ones kept on stable), the new version's traffic weight there, its
    analysis window (None: the analysis interval) and its bake time (None: the analysis's
    bakeSeconds)."""

    percent: int | None = None
    count: int | None = None
    traffic_weight: int = 100
    analysis_s: int | None = None
    bake_s: int | None = None
    sites: int | None = None
    site_percent: int | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.percent, self.count, self.sites, self.site_percent) if v is not None]
        if len(given) != 1:
            raise ValueError("a wave needs exactly one of percent, count, sites or sitePercent")
        if self.percent is not None and not 1 <= self.percent <= 100:
            raise ValueError(f"wave percent must be 1..100, got {self.percent}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"wave count must be at least 1, got {self.count}")
        if self.sites is not None and self.sites < 1:
            raise ValueError(f"wave sites must be at least 1, got {self.sites}")
        if self.site_percent is not None and not 1 <= self.site_percent <= 100:
            raise ValueError(f"wave sitePercent must be 1..100, got {self.site_percent}")
        if not 0 <= self.traffic_weight <= 100:
            raise ValueError(f"wave trafficWeight must be 0..100, got {self.traffic_weight}")
        if self.bake_s is not None and self.bake_s < 0:
            raise ValueError(f"wave bakeSeconds must be at least 0, got {self.bake_s}")

    @property
    def by_site(self) -> bool:
        """Whether the wave picks whole sites (sites or sitePercent) rather than nodes."""
        return self.sites is not None or self.site_percent is not None

    @classmethod
    def from_obj(cls, obj: Obj) -> WaveSpec:
        obj = mapping(obj, "wave")
        return cls(
            wire.optional_int(obj.get("percent")),
            wire.optional_int(obj.get("count")),
            int(obj.get("trafficWeight", 100)),
            wire.optional_int(obj.get("analysisSeconds")),
            wire.optional_int(obj.get("bakeSeconds")),
            wire.optional_int(obj.get("sites")),
            wire.optional_int(obj.get("sitePercent")),
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trafficWeight": self.traffic_weight}
        for key, value in (
            ("percent", self.percent),
            ("count", self.count),
            ("sites", self.sites),
            ("sitePercent", self.site_percent),
            ("analysisSeconds", self.analysis_s),
            ("bakeSeconds", self.bake_s),
        ):
            if value is not None:
                out[key] = value
        return out


def _number(obj: Mapping[str, Any], key: str, default: float) -> float:
    """obj[key] as a number (default when absent), or a ValueError naming the field."""
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"analysis.{key} must be a number, got {value!r}")
    return float(value)


JUDGES = ("Sequential", "Thresholds")
"""How waves are judged (analysis.judge)."""
ON_DEADLINE = ("Pause", "Rollback")
"""What a wave without a verdict by analysis.progressDeadlineSeconds does."""


@dataclass(frozen=True, slots=True)
class AnalysisSpec:
    """How each wave is judged, as the user wrote it (None: not given; the rollout decides the
    defaults, e.g. the SLA's latency and error objectives)."""

    interval_s: int = 60
    min_samples: int = 100
    failure_limit: int = 1
    max_p95_latency_s: float | None = None
    max_p99_latency_s: float | None = None
    max_error_rate: float | None = None
    min_throughput_rps: float | None = None
    """Per canary node, scaled by the wave's traffic weight."""
    max_latency_regression_pct: float | None = None
    max_error_rate_increase: float | None = None
    max_temperature_increase_c: float | None = None
    false_rollback_rate: float = 0.01
    """The sequential judge's alpha: the chance of ever rolling back a canary no worse than stable."""
    error_rate_increase: float = 0.01
    """Error-rate regression the judge detects, absolute (0.01: +1 point)."""
    slow_share_ratio: float = 1.5
    """Slow-share regression the judge detects, relative (1.5: x1.5)..."""
    slow_share_increase: float = 0.005
    """...plus this, absolute: a slow share near 0 on both sides can pass (x1.5 of 0 is 0)."""
    power: float = 0.8
    """Wanted power at that regression (reported: the canary requests it needs)."""
    progress_deadline_s: int = 600
    """A wave without a verdict this long after its window began pauses or rolls back."""
    on_deadline: str = "Pause"
    """Pause or Rollback."""
    judge: str = "Sequential"
    """Sequential: the sequential judge decides each wave where the agents report counters (with
    the thresholds as hard guards); Thresholds: the thresholds alone (as before issue 17)."""
    bake_s: int = 0
    """Each wave holds at least this long after its window began, even when it passes earlier."""
    max_failed_node_percent: float | None = None
    """Roll back a wave when more than this share of its canary nodes report the canary Failed
    or (at the window's end) sent no report within the window. None: never for that alone."""

    def __post_init__(self) -> None:
        if self.interval_s < 1 or self.min_samples < 1 or self.failure_limit < 1:
            raise ValueError("intervalSeconds, minSamples and failureLimit must be at least 1")
        if not 0 < self.false_rollback_rate < 1:
            raise ValueError(f"falseRollbackRate must be in (0, 1), got {self.false_rollback_rate}")
        if not 0 < self.error_rate_increase < 1:
            raise ValueError(f"errorRateIncrease must be in (0, 1), got {self.error_rate_increase}")
        if not self.slow_share_ratio > 1:
            raise ValueError(f"slowShareRatio must be above 1, got {self.slow_share_ratio}")
        if not 0 < self.power < 1:
            raise ValueError(f"power must be in (0, 1), got {self.power}")
        if not 0 <= self.slow_share_increase < 1:
            raise ValueError(f"slowShareIncrease must be in [0, 1), got {self.slow_share_increase}")
        if self.progress_deadline_s < 1:
            raise ValueError(f"progressDeadlineSeconds must be at least 1, got {self.progress_deadline_s}")
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {JUDGES}, got {self.judge!r}")
        if self.on_deadline not in ON_DEADLINE:
            raise ValueError(f"onDeadline must be one of {ON_DEADLINE}, got {self.on_deadline!r}")
        if self.bake_s < 0:
            raise ValueError(f"bakeSeconds must be at least 0, got {self.bake_s}")
        pct = self.max_failed_node_percent
        if pct is not None and not 0 <= pct <= 100:
            raise ValueError(f"maxFailedNodePercent must be in [0, 100], got {pct}")

    @classmethod
    def from_obj(cls, obj: Obj) -> AnalysisSpec:
        obj = mapping(obj, "analysis")
        number = wire.optional_float
        return cls(
            interval_s=int(obj.get("intervalSeconds", 60)),
            min_samples=int(obj.get("minSamples", 100)),
            failure_limit=int(obj.get("failureLimit", 1)),
            max_p95_latency_s=wire.ms_to_s(obj.get("maxP95LatencyMs")),
            max_p99_latency_s=wire.ms_to_s(obj.get("maxP99LatencyMs")),
            max_error_rate=number(obj.get("maxErrorRate")),
            min_throughput_rps=number(obj.get("minThroughputRps")),
            max_latency_regression_pct=number(obj.get("maxLatencyRegressionPercent")),
            max_error_rate_increase=number(obj.get("maxErrorRateIncrease")),
            max_temperature_increase_c=number(obj.get("maxTemperatureIncreaseC")),
            false_rollback_rate=_number(obj, "falseRollbackRate", 0.01),
            error_rate_increase=_number(obj, "errorRateIncrease", 0.01),
            slow_share_ratio=_number(obj, "slowShareRatio", 1.5),
            slow_share_increase=_number(obj, "slowShareIncrease", 0.005),
            power=_number(obj, "power", 0.8),
            progress_deadline_s=int(_number(obj, "progressDeadlineSeconds", 600)),
            on_deadline=str(obj.get("onDeadline", "Pause")),
            judge=str(obj.get("judge", "Sequential")),
            bake_s=int(_number(obj, "bakeSeconds", 0)),
            max_failed_node_percent=number(obj.get("maxFailedNodePercent")),
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "intervalSeconds": self.interval_s,
            "minSamples": self.min_samples,
            "failureLimit": self.failure_limit,
            "falseRollbackRate": self.false_rollback_rate,
            "errorRateIncrease": self.error_rate_increase,
            "slowShareRatio": self.slow_share_ratio,
            "slowShareIncrease": self.slow_share_increase,
            "power": self.power,
            "progressDeadlineSeconds": self.progress_deadline_s,
            "onDeadline": self.on_deadline,
            "judge": self.judge,
            "bakeSeconds": self.bake_s,
        }
        optional = (
            ("maxP95LatencyMs", wire.s_to_ms(self.max_p95_latency_s)),
            ("maxP99LatencyMs", wire.s_to_ms(self.max_p99_latency_s)),
            ("maxErrorRate", self.max_error_rate),
            ("minThroughputRps", self.min_throughput_rps),
            ("maxLatencyRegressionPercent", self.max_latency_regression_pct),
            ("maxErrorRateIncrease", self.max_error_rate_increase),
            ("maxTemperatureIncreaseC", self.max_temperature_increase_c),
            ("maxFailedNodePercent", self.max_failed_node_percent),
        )
        out.update((k, v) for k, v in optional if v is not None)
        return out


@dataclass(frozen=True, slots=True)
class RolloutStrategy:
    """spec.rollout: how a new revision reaches the fleet. `waves` None: none given."""

    strategy: str = CANARY
    waves: tuple[WaveSpec, ...] | None = None
    analysis: AnalysisSpec | None = None
    paused: bool = False
    site_label: str = names.LABEL_SITE
    """The Node label whose value names a node's site (site waves, stable kept per site)."""
    keep_stable_per_site: int = 1
    """While a wave that replaces stable (trafficWeight 100) is judged, at least this many of each
    site's nodes stay on stable, in sites with more nodes than that (a wave of every node aside)."""
    max_nodes_per_minute: int | None = None
    """At most this many nodes start the new version in any 60 s (None: no limit)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"rollout strategy {self.strategy!r} is not one of {STRATEGIES}")
        if not self.site_label:
            raise ValueError("rollout siteLabel must not be empty")
        if self.keep_stable_per_site < 0:
            raise ValueError(f"keepStablePerSite must be at least 0, got {self.keep_stable_per_site}")
        if self.max_nodes_per_minute is not None and self.max_nodes_per_minute < 1:
            raise ValueError(f"maxNodesPerMinute must be at least 1, got {self.max_nodes_per_minute}")

    @classmethod
    def from_obj(cls, obj: Obj) -> RolloutStrategy:
        obj = mapping(obj, "rollout")
        waves, analysis = obj.get("waves"), obj.get("analysis")
        return cls(
            strategy=str(obj.get("strategy", CANARY)),
            waves=tuple(WaveSpec.from_obj(w) for w in waves) if waves is not None else None,
            analysis=AnalysisSpec.from_obj(analysis) if analysis is not None else None,
            paused=bool(obj.get("paused", False)),
            site_label=str(obj.get("siteLabel", names.LABEL_SITE)),
            keep_stable_per_site=int(obj.get("keepStablePerSite", 1)),
            max_nodes_per_minute=wire.optional_int(obj.get("maxNodesPerMinute")),
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "strategy": self.strategy,
            "paused": self.paused,
            "siteLabel": self.site_label,
            "keepStablePerSite": self.keep_stable_per_site,
        }
        if self.waves is not None:
            out["waves"] = [w.to_obj() for w in self.waves]
        if self.analysis is not None:
            out["analysis"] = self.analysis.to_obj()
        if self.max_nodes_per_minute is not None:
            out["maxNodesPerMinute"] = self.max_nodes_per_minute
        return out


# --- the spec ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InferenceServiceSpec:
    """spec of an InferenceService. `models` is never empty; names are unique."""

    models: tuple[ModelSpec, ...]
    batching: Batching | None = None
    sla: SlaObjectives | None = None
    placement: PlacementSpec | None = None
    rollout: RolloutStrategy | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("spec.models needs at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("spec.models lists a model name twice")

    @classmethod
    def from_obj(cls, obj: Obj) -> InferenceServiceSpec:
        obj = mapping(obj, "spec")
        parts = {key: obj.get(key) for key in ("batching", "sla", "placement", "rollout")}
        return cls(
            models=tuple(ModelSpec.from_obj(m) for m in required(obj, "models", "spec.")),
            batching=Batching.from_obj(parts["batching"]) if parts["batching"] is not None else None,
            sla=SlaObjectives.from_obj(parts["sla"]) if parts["sla"] is not None else None,
            placement=PlacementSpec.from_obj(parts["placement"]) if parts["placement"] is not None else None,
            rollout=RolloutStrategy.from_obj(parts["rollout"]) if parts["rollout"] is not None else None,
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {"models": [m.to_obj() for m in self.models]}
        for key, part in (
            ("batching", self.batching),
            ("sla", self.sla),
            ("placement", self.placement),
            ("rollout", self.rollout),
        ):
            if part is not None:
                out[key] = part.to_obj()
        return out


# --- the status -------------------------------------------------------------------------------

MAX_NODES_IN_STATUS = 100
"""status.nodes lists the first this many nodes (the CRD's maxItems)."""


@dataclass(frozen=True, slots=True)
class VersionCount:
    """Nodes that should serve a version, and those that report it ready."""

    version: str
    desired_nodes: int
    ready_nodes: int

    @classmethod
    def from_obj(cls, obj: Obj) -> VersionCount:
        obj = mapping(obj, "status.versions[]")
        return cls(str(obj["version"]), int(obj.get("desiredNodes", 0)), int(obj.get("readyNodes", 0)))

    def to_obj(self) -> dict[str, Any]:
        return {"version": self.version, "desiredNodes": self.desired_nodes, "readyNodes": self.ready_nodes}


@dataclass(frozen=True, slots=True)
class NodeSummary:
    """One node's view of the service."""

    node: str
    version: str
    ready: bool
    throttled: bool = False
    p95_latency_s: float | None = None
    temperature_c: float | None = None

    @classmethod
    def from_obj(cls, obj: Obj) -> NodeSummary:
        obj = mapping(obj, "status.nodes[]")
        return cls(
            node=str(obj["node"]),
            version=str(obj.get("version", "")),
            ready=bool(obj.get("ready", False)),
            throttled=bool(obj.get("throttled", False)),
            p95_latency_s=wire.ms_to_s(obj.get("p95LatencyMs")),
            temperature_c=wire.optional_float(obj.get("temperatureC")),
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node": self.node,
            "version": self.version,
            "ready": self.ready,
            "throttled": self.throttled,
        }
        p95 = wire.s_to_ms(self.p95_latency_s)
        if p95 is not None:
            out["p95LatencyMs"] = p95
        temperature = wire.rounded(self.temperature_c, wire.CELSIUS_DIGITS)
        if temperature is not None:
            out["temperatureC"] = temperature
        return out


@dataclass(frozen=True, slots=True)
class InferenceServiceStatus:
    """status of an InferenceService: conditions (Ready, Progressing, Degraded), node counts per
    version, the service level aggregated over its nodes, per-node summaries (the first
    MAX_NODES_IN_STATUS), the rollout, and where to send requests."""

    observed_generation: int = 0
    conditions: tuple[Condition, ...] = ()
    serving_version: str = ""
    desired_nodes: int = 0
    ready_nodes: int = 0
    versions: tuple[VersionCount, ...] = ()
    sla: SlaWindow = EMPTY_WINDOW
    nodes: tuple[NodeSummary, ...] = ()
    rollout: RolloutStatus | None = None
    url: str = ""
    endpoints: tuple[str, ...] = ()
    message: str = ""

    @property
    def nodes_summary(self) -> str:
        """readyNodes/desiredNodes (a printer column)."""
        return f"{self.ready_nodes}/{self.desired_nodes}"

    @classmethod
    def from_obj(cls, obj: Obj | None) -> InferenceServiceStatus:
        obj = mapping(obj if obj is not None else {}, "status")
        rollout = obj.get("rollout")
        return cls(
            observed_generation=int(obj.get("observedGeneration") or 0),
            conditions=conditions_from_obj(obj.get("conditions")),
            serving_version=str(obj.get("servingVersion") or ""),
            desired_nodes=int(obj.get("desiredNodes") or 0),
            ready_nodes=int(obj.get("readyNodes") or 0),
            versions=tuple(VersionCount.from_obj(v) for v in obj.get("versions") or ()),
            sla=SlaWindow.from_obj(obj.get("sla") or {}),
            nodes=tuple(NodeSummary.from_obj(n) for n in obj.get("nodes") or ()),
            rollout=RolloutStatus.from_obj(rollout) if rollout is not None else None,
            url=str(obj.get("url") or ""),
            endpoints=tuple(str(e) for e in obj.get("endpoints") or ()),
            message=str(obj.get("message") or ""),
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "observedGeneration": self.observed_generation,
            "conditions": [c.to_obj() for c in self.conditions],
            "servingVersion": self.serving_version,
            "desiredNodes": self.desired_nodes,
            "readyNodes": self.ready_nodes,
            "nodesSummary": self.nodes_summary,
            "versions": [v.to_obj() for v in self.versions],
            "sla": self.sla.to_obj(),
            "nodes": [n.to_obj() for n in self.nodes[:MAX_NODES_IN_STATUS]],
            "url": self.url,
            "endpoints": list(self.endpoints),
            "message": self.message,
        }
        if self.rollout is not None:
            out["rollout"] = self.rollout.to_obj()
        return out
