"""What a service's spec asks of a rollout: its revision (models by digest), strategy, waves and
the thresholds each wave is judged by (`RolloutSpec`, from `parse_spec`). Values only; pure.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

from edgefleet_api import names
from edgefleet_api.inference_service import AnalysisSpec, InferenceServiceSpec, WaveSpec
from edgefleet_api.model_spec import ModelSpec
from edgefleet_api.rollout_status import Revision
from edgefleet_api.sla import NO_OBJECTIVES

ALL_NODES = WaveSpec(percent=100)
"""The one wave of AllAtOnce (and of a Canary that names none)."""
DEFAULT_ANALYSIS = AnalysisSpec()


class Strategy(enum.Enum):
    CANARY = "Canary"
    ALL_AT_ONCE = "AllAtOnce"


def wave_nodes(wave: WaveSpec, total: int) -> int:
    """Canary nodes (or, for a site wave, sites) of `wave` out of `total`: at least 1 (if any),
    at most `total`."""
    if total <= 0:
        return 0
    count = wave.count if wave.count is not None else wave.sites
    if count is not None:
        return min(count, total)
    percent = wave.percent if wave.percent is not None else wave.site_percent
    assert percent is not None
    return min(total, max(1, math.ceil(round(percent * total / 100, 9))))


def describe_wave(wave: WaveSpec) -> str:
    if wave.percent is not None:
        return f"{wave.percent}%"
    if wave.count is not None:
        return f"{wave.count} node{'s' if wave.count != 1 else ''}"
    if wave.sites is not None:
        return f"{wave.sites} site{'s' if wave.sites != 1 else ''}"
    return f"{wave.site_percent}% of sites"


def has_checks(analysis: AnalysisSpec) -> bool:
    """Whether a wave is judged at all (some threshold is set)."""
    return any(
        v is not None
        for v in (
            analysis.max_p95_latency_s,
            analysis.max_p99_latency_s,
            analysis.max_error_rate,
            analysis.min_throughput_rps,
            analysis.max_latency_regression_pct,
            analysis.max_error_rate_increase,
            analysis.max_temperature_increase_c,
        )
    )


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """What the service's spec asks of the rollout: the target revision and how to reach it.
    `analysis` holds the thresholds in effect (the SLA's where the spec gives none)."""

    revision: Revision
    models: tuple[ModelSpec, ...]
    """The spec's model entries (their artifact URIs etc. make EdgeNode spec entries)."""
    strategy: Strategy = Strategy.CANARY
    waves: tuple[WaveSpec, ...] = (ALL_NODES,)
    analysis: AnalysisSpec = DEFAULT_ANALYSIS
    paused: bool = False
    site_label: str = names.LABEL_SITE
    keep_stable_per_site: int = 1
    max_nodes_per_minute: int | None = None

    def __post_init__(self) -> None:
        if not self.waves:
            raise ValueError("a rollout needs at least one wave")


def parse_spec(spec: InferenceServiceSpec) -> RolloutSpec:
    """RolloutSpec from an InferenceService's spec.

    No `rollout` at all means AllAtOnce (as KServe and Argo Rollouts do without canary steps);
    Canary without waves is a single 100% wave gated by the analysis. Absolute thresholds default
    to the service SLA's p95, p99 and error rate (not its throughput: a canary's throughput
    depends on its traffic share).
    """
    revision = Revision.of(spec.models)
    ro = spec.rollout
    if ro is None:
        return RolloutSpec(revision, spec.models, Strategy.ALL_AT_ONCE)
    given = ro.analysis or DEFAULT_ANALYSIS
    sla = spec.sla or NO_OBJECTIVES
    analysis = dataclasses.replace(
        given,
        max_p95_latency_s=_first(given.max_p95_latency_s, sla.p95_latency_s),
        max_p99_latency_s=_first(given.max_p99_latency_s, sla.p99_latency_s),
        max_error_rate=_first(given.max_error_rate, sla.max_error_rate),
    )
    strategy = Strategy(ro.strategy)
    waves = ro.waves or (ALL_NODES,)
    if strategy is Strategy.ALL_AT_ONCE:
        waves = (ALL_NODES,)
    return RolloutSpec(
        revision, spec.models, strategy, waves, analysis, ro.paused,
        ro.site_label, ro.keep_stable_per_site, ro.max_nodes_per_minute,
    )  # fmt: skip


def _first(value: float | None, default: float | None) -> float | None:
    return value if value is not None else default
