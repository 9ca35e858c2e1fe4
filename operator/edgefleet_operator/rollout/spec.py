"""What a service's spec asks of a rollout: its revision (models by digest), strategy, waves and
analysis (`RolloutSpec`, from `parse_spec`). Values only; pure.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Obj = Mapping[str, Any]
"""A JSON object as the API server returns it (a spec or status dict)."""


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
        max_p95_ms=float_or_none(a.get("maxP95LatencyMs", sla.get("p95LatencyMs"))),
        max_p99_ms=float_or_none(a.get("maxP99LatencyMs", sla.get("p99LatencyMs"))),
        max_error_rate=float_or_none(a.get("maxErrorRate", sla.get("maxErrorRate"))),
        min_throughput_rps=float_or_none(a.get("minThroughputRps")),
        max_latency_regression_pct=float_or_none(a.get("maxLatencyRegressionPercent")),
        max_error_rate_increase=float_or_none(a.get("maxErrorRateIncrease")),
        max_temperature_increase_c=float_or_none(a.get("maxTemperatureIncreaseC")),
    )
    strategy = Strategy(ro.get("strategy", "Canary"))
    waves = tuple(
        Wave(w.get("percent"), w.get("count"), int(w.get("trafficWeight", 100)), w.get("analysisSeconds"))
        for w in ro.get("waves") or [{"percent": 100}]
    )
    if strategy is Strategy.ALL_AT_ONCE:
        waves = (Wave(percent=100),)
    return RolloutSpec(Revision.of(models), models, strategy, waves, analysis, bool(ro.get("paused", False)))


def float_or_none(v: Any) -> float | None:
    """`float(v)`, or None for None (optional numbers of a spec or status)."""
    return None if v is None else float(v)
