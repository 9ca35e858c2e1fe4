"""Service levels, both ways: the objectives a user sets (`SlaObjectives`: InferenceService
spec.sla, passed on in every EdgeNode spec entry) and what agents measure against them
(`SlaWindow`: EdgeNode status.models[].sla, aggregated by the operator into the service's
status.sla). Seconds here; milliseconds only on the wire, converted in `from_obj`/`to_obj`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgefleet_api import wire
from edgefleet_api.wire import Obj, mapping


@dataclass(frozen=True, slots=True)
class SlaObjectives:
    """Service-level objectives; None: not an objective. Judged over windows of `window_s`."""

    p95_latency_s: float | None = None
    p99_latency_s: float | None = None
    max_error_rate: float | None = None
    """Failed (and expired) requests over all requests, 0 to 1."""
    min_throughput_rps: float | None = None
    """Completed requests per second over the window."""
    window_s: int = 60
    """Reporting window (the InferenceService's `sla.windowSeconds`, default 60)."""

    def __post_init__(self) -> None:
        for name in ("p95_latency_s", "p99_latency_s", "min_throughput_rps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"sla: {name} must be > 0, got {value!r}")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise ValueError(f"sla: max_error_rate must be in [0, 1], got {self.max_error_rate!r}")
        if not self.window_s >= 1:
            raise ValueError(f"sla: window_s must be >= 1, got {self.window_s!r}")

    @property
    def has_objectives(self) -> bool:
        return any(
            v is not None
            for v in (self.p95_latency_s, self.p99_latency_s, self.max_error_rate, self.min_throughput_rps)
        )

    @classmethod
    def from_obj(cls, obj: Obj) -> SlaObjectives:
        obj = mapping(obj, "sla")
        return cls(
            p95_latency_s=wire.ms_to_s(obj.get("p95LatencyMs")),
            p99_latency_s=wire.ms_to_s(obj.get("p99LatencyMs")),
            max_error_rate=wire.optional_float(obj.get("maxErrorRate")),
            min_throughput_rps=wire.optional_float(obj.get("minThroughputRps")),
            window_s=int(obj.get("windowSeconds", 60)),
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        optional = (
            ("p95LatencyMs", wire.s_to_ms(self.p95_latency_s)),
            ("p99LatencyMs", wire.s_to_ms(self.p99_latency_s)),
            ("minThroughputRps", self.min_throughput_rps),
            ("maxErrorRate", self.max_error_rate),
        )
        out.update((k, v) for k, v in optional if v is not None)
        out["windowSeconds"] = self.window_s
        return out


@dataclass(frozen=True, slots=True)
class SlaWindow:
    """A service level measured over a window: latency percentiles (seconds), throughput, error
    rate, request count and window length; `met`: the window met the SLA (None: too few
    requests to judge, or nothing to judge against). None elsewhere: not measured."""

    p50_latency_s: float | None = None
    p95_latency_s: float | None = None
    p99_latency_s: float | None = None
    throughput_rps: float | None = None
    error_rate: float | None = None
    requests: int | None = None
    window_s: int | None = None
    met: bool | None = None

    @classmethod
    def from_obj(cls, obj: Obj) -> SlaWindow:
        obj = mapping(obj, "sla")
        met = obj.get("met")
        return cls(
            p50_latency_s=wire.ms_to_s(obj.get("p50LatencyMs")),
            p95_latency_s=wire.ms_to_s(obj.get("p95LatencyMs")),
            p99_latency_s=wire.ms_to_s(obj.get("p99LatencyMs")),
            throughput_rps=wire.optional_float(obj.get("throughputRps")),
            error_rate=wire.optional_float(obj.get("errorRate")),
            requests=wire.optional_int(obj.get("requests")),
            window_s=wire.optional_int(obj.get("windowSeconds")),
            met=met if isinstance(met, bool) else None,
        )

    def to_obj(self) -> dict[str, Any]:
        """The window in the CRD's shape, each number rounded once (`wire`'s digits); what is not
        measured (or not finite) is left out."""
        fields = (
            ("p50LatencyMs", _ms(self.p50_latency_s)),
            ("p95LatencyMs", _ms(self.p95_latency_s)),
            ("p99LatencyMs", _ms(self.p99_latency_s)),
            ("throughputRps", wire.rounded(self.throughput_rps, wire.RATE_DIGITS)),
            ("errorRate", wire.rounded(self.error_rate, wire.FRACTION_DIGITS)),
            ("requests", _count(self.requests)),
            ("windowSeconds", _count(self.window_s)),
            ("met", self.met),
        )
        return {k: v for k, v in fields if v is not None}

    @property
    def empty(self) -> bool:
        return self == EMPTY_WINDOW


EMPTY_WINDOW = SlaWindow()
NO_OBJECTIVES = SlaObjectives()


def _ms(seconds: float | None) -> float | None:
    return wire.s_to_ms(seconds) if seconds is not None and wire.rounded(seconds, 9) is not None else None


def _count(value: int | None) -> int | None:
    return None if value is None or value < 0 else int(value)
