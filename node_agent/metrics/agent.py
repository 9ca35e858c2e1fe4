"""Every Prometheus metric of the node agent, declared once (`METRICS`), on a passed-in
`CollectorRegistry` (never the global one).

Naming: `edgefleet_` prefix, base units in the name (`_seconds`, `_bytes`, `_celsius`,
`_watts`, `_hertz`, `_ratio`, `_rows`), counters end in `_total`; model metrics are labelled
`model` and `version`.

Most values are read at scrape time, not pushed from hot paths: `AgentCollector` (a custom
collector) reads the components' own counters and state when Prometheus scrapes:
- batchers (`BatcherView`: submitted, failed, expired, refused, displaced, staged, queued rows),
- the stream pool (`PoolView`), the scheduler (`SchedulerView`: stats, budget, residents),
- the SLA monitor: lifetime histograms of request queue, compute and total time and of batch
  rows (folded from the batches `LimitedPolicy` hands it, off the hot path), window verdicts,
  levels and violation counts; the mitigation `Controls` (priority shedding, the gate);
- the thermal monitor's last reading (temperature, throttle state and reasons, power, clocks,
  GPU memory under NVML) and level.
Any component may be left out; its metrics are then absent.

`ApiMetrics` holds the two metrics the HTTP layer observes per request itself (counts by
route and status code, duration).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from edgefleet_api.types import ModelId
from node_agent.control.sla_monitor import objectives_of
from node_agent.control.sla_windows import LATENCY_BUCKETS_S
from node_agent.errors import AgentError

if TYPE_CHECKING:
    from node_agent.control.mitigation import Controls
    from node_agent.control.sketch import BucketCounts
    from node_agent.control.sla_monitor import SlaMonitor
    from node_agent.control.thermal import ThermalMonitor
    from node_agent.runtime.scheduler import ResidentModel, SchedulerStats


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: str
    """counter, gauge, histogram or summary."""
    help: str
    labels: tuple[str, ...] = ()


_M = ("model", "version")

METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        # requests, per model version (batchers; histograms via the SLA monitor)
        MetricSpec(
            "edgefleet_request_queue_seconds",
            "histogram",
            "Time a completed request waited before its batch started.",
            _M,
        ),
        MetricSpec(
            "edgefleet_request_compute_seconds",
            "histogram",
            "Service time of the batch a completed request ran in.",
            _M,
        ),
        MetricSpec(
            "edgefleet_request_duration_seconds",
            "histogram",
            "Time from admission to result of a completed request (queue + compute).",
            _M,
        ),
        MetricSpec("edgefleet_batch_rows", "histogram", "Rows per batch that ran.", _M),
        MetricSpec("edgefleet_requests_total", "counter", "Requests admitted to a model's queue.", _M),
        MetricSpec(
            "edgefleet_request_failures_total",
            "counter",
            "Requests whose batch raised (the model failed).",
            _M,
        ),
        MetricSpec(
            "edgefleet_deadline_drops_total",
            "counter",
            "Requests dropped because their deadline passed (or would) before they ran.",
            _M,
        ),
        MetricSpec(
            "edgefleet_admissions_refused_total",
            "counter",
            "Requests refused by admission control: predicted_wait (would wait past its deadline "
            "or SLO), too_large (can never fit), queue_full (the queue's hard cap), displaced (by "
            "a more urgent request or shed from a shrunk queue), priority_shed (class shed by SLA "
            "mitigation).",
            (*_M, "reason"),
        ),
        MetricSpec(
            "edgefleet_abandoned_rows_total",
            "counter",
            "Queued rows dropped, never run, because their caller went away (disconnected).",
            _M,
        ),
        MetricSpec("edgefleet_queue_depth_rows", "gauge", "Rows queued for a model now.", _M),
        MetricSpec(
            "edgefleet_batches_staged_total",
            "counter",
            "Batches the event loop formed while a worker ran the one before (staging).",
            _M,
        ),
        # stream pool
        MetricSpec(
            "edgefleet_pool_workers",
            "gauge",
            "Stream pool worker threads (CUDA streams), by lane: regular, or urgent (only critical "
            "and high-priority batches).",
            ("lane",),
        ),
        MetricSpec("edgefleet_pool_queued_jobs", "gauge", "Batches waiting for a pool worker."),
        MetricSpec("edgefleet_pool_jobs_total", "counter", "Batches the pool ran."),
        MetricSpec(
            "edgefleet_pool_admissions_refused_total",
            "counter",
            "Batches the pool refused or displaced (its queue was full).",
            ("reason",),
        ),
        MetricSpec(
            "edgefleet_pool_deadline_drops_total",
            "counter",
            "Jobs dropped by the pool because their deadline passed while queued.",
        ),
        # model scheduler
        MetricSpec("edgefleet_model_loads_total", "counter", "Model loads that succeeded."),
        MetricSpec(
            "edgefleet_model_load_failures_total",
            "counter",
            "Model loads that failed (insufficient memory included).",
        ),
        MetricSpec(
            "edgefleet_model_evictions_total",
            "counter",
            "Models unloaded to make room or to meet a smaller budget.",
        ),
        MetricSpec("edgefleet_model_unloads_total", "counter", "Models unloaded on request."),
        MetricSpec("edgefleet_model_load_seconds", "summary", "Time to load a model (successful loads)."),
        MetricSpec(
            "edgefleet_model_cache_lookups_total",
            "counter",
            "Lease requests that found the model resident (hit) or not (miss).",
            ("result",),
        ),
        MetricSpec("edgefleet_resident_models", "gauge", "Models loaded now."),
        MetricSpec(
            "edgefleet_resident_model_bytes", "gauge", "Device memory a resident model measured at load.", _M
        ),
        MetricSpec(
            "edgefleet_model_leases", "gauge", "Leases held on a resident model (batches in flight).", _M
        ),
        MetricSpec(
            "edgefleet_model_memory_used_bytes",
            "gauge",
            "Memory used by resident models and loads in progress.",
        ),
        MetricSpec("edgefleet_model_memory_budget_bytes", "gauge", "Memory budget for models."),
        # GPU and thermal
        MetricSpec("edgefleet_gpu_memory_total_bytes", "gauge", "Device memory, total."),
        MetricSpec("edgefleet_gpu_memory_used_bytes", "gauge", "Device memory in use (all processes)."),
        MetricSpec("edgefleet_gpu_temperature_celsius", "gauge", "GPU temperature."),
        MetricSpec(
            "edgefleet_gpu_soft_limit_celsius",
            "gauge",
            "Temperature above which the agent lowers concurrency and batch size.",
        ),
        MetricSpec("edgefleet_gpu_throttled", "gauge", "1 while the hardware throttles clocks, else 0."),
        MetricSpec(
            "edgefleet_gpu_throttle_reason", "gauge", "1 for each throttle reason active now.", ("reason",)
        ),
        MetricSpec("edgefleet_gpu_throttle_episodes_total", "counter", "Times hardware throttling began."),
        MetricSpec("edgefleet_gpu_power_watts", "gauge", "GPU power draw."),
        MetricSpec("edgefleet_gpu_sm_clock_hertz", "gauge", "GPU SM clock."),
        MetricSpec("edgefleet_gpu_utilization_ratio", "gauge", "GPU busy share, 0 to 1."),
        MetricSpec(
            "edgefleet_thermal_mitigation_level",
            "gauge",
            "Thermal mitigation level (0: none; higher: lower concurrency and batch size).",
        ),
        MetricSpec("edgefleet_concurrency_limit", "gauge", "Batches allowed to hold a model at once."),
        MetricSpec("edgefleet_concurrency_in_use", "gauge", "Batches holding a model now."),
        # SLA
        MetricSpec(
            "edgefleet_sla_violations_total",
            "counter",
            "Times an SLA objective started being missed (control window).",
            (*_M, "objective"),
        ),
        MetricSpec(
            "edgefleet_slow_requests_total",
            "counter",
            "Completed requests slower than the SLO latency (the p99 objective, else the p95 one; "
            "EdgeNode status models[].counters.slow). Absent before the monitor's first tick.",
            _M,
        ),
        MetricSpec(
            "edgefleet_sla_mitigation_level",
            "gauge",
            "SLA mitigation level (0: none; higher: smaller batches, then shedding).",
            _M,
        ),
        MetricSpec(
            "edgefleet_sla_window_met",
            "gauge",
            "1 if the last SLA window met the SLA, 0 if not; absent with too few requests.",
            _M,
        ),
        MetricSpec(
            "edgefleet_sla_window_latency_seconds",
            "gauge",
            "Latency percentile over the SLA window.",
            (*_M, "quantile"),
        ),
        MetricSpec(
            "edgefleet_sla_window_throughput_requests_per_second",
            "gauge",
            "Completed requests per second over the SLA window.",
            _M,
        ),
        MetricSpec(
            "edgefleet_sla_window_error_ratio",
            "gauge",
            "Failed and expired over all requests in the SLA window.",
            _M,
        ),
        # HTTP API (observed per request by the API layer through ApiMetrics)
        MetricSpec(
            "edgefleet_http_requests_total", "counter", "HTTP requests served.", ("method", "route", "code")
        ),
        MetricSpec(
            "edgefleet_http_request_duration_seconds",
            "histogram",
            "HTTP request handling time.",
            ("method", "route"),
        ),
        # gRPC API (observed per RPC through GrpcMetrics)
        MetricSpec(
            "edgefleet_grpc_requests_total", "counter", "gRPC calls served, by status code.", ("rpc", "code")
        ),
        MetricSpec(
            "edgefleet_grpc_request_duration_seconds", "histogram", "gRPC call handling time.", ("rpc",)
        ),
    )
}
"""Every metric the agent exports, by name."""
OBSERVED_PREFIXES = ("edgefleet_http_", "edgefleet_grpc_")
"""Metrics the API layers observe per request themselves (`ApiMetrics`, `GrpcMetrics`), not the
collector."""


# --- what the collector reads ------------------------------------------------------------


class BatcherView(Protocol):
    """Counters of `node_agent.runtime.batcher.Batcher` (requests, monotone)."""

    submitted: int
    failed: int
    expired: int
    refused: int
    refused_late: int
    refused_too_large: int
    displaced: int
    abandoned_rows: int
    staged: int

    def queued_rows(self) -> float: ...


class PoolView(Protocol):
    """The part of `StreamPool` read at scrape time."""

    completed: int
    expired: int
    refused: int
    displaced: int

    @property
    def num_workers(self) -> int: ...

    @property
    def urgent_workers(self) -> int: ...

    def queued(self) -> int: ...


class SchedulerView(Protocol):
    """The part of `ModelScheduler` read at scrape time."""

    @property
    def stats(self) -> SchedulerStats: ...

    @property
    def budget_bytes(self) -> int: ...

    @property
    def used_bytes(self) -> int: ...

    def resident(self) -> list[ResidentModel]: ...


BatcherSource = Callable[[], Iterable[tuple[ModelId, BatcherView]]]
Family = Any
"""A prometheus_client MetricFamily (Counter/Gauge/Histogram/SummaryMetricFamily): each
has its own `add_metric` signature, which the `Metric` base does not declare."""
GpuMemorySource = Callable[[], tuple[int, int] | None]
"""() -> (total bytes, used bytes), or None when unknown."""


def engine_batchers(engine: object, models: Callable[[], Iterable[ModelId]]) -> BatcherSource:
    """Batchers of `engine` (its public `batcher(name, version)`) for the model versions
    `models()` names, e.g. `SlaMonitor.models`: those the engine made batchers for."""
    get = engine.batcher  # type: ignore[attr-defined]

    def batchers() -> Iterator[tuple[ModelId, BatcherView]]:
        for m in models():
            try:
                batcher = get(m.name, m.version)
            except AgentError:  # gone from the repository, or the engine is stopping
                continue
            yield m, batcher

    return batchers


def torch_gpu_memory(device: str) -> GpuMemorySource:
    """Device memory from `torch.cuda.mem_get_info` (for when NVML is not the thermal source)."""

    def read() -> tuple[int, int] | None:
        if not device.startswith("cuda"):
            return None
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(total), int(total - free)

    return read


# --- the collector -----------------------------------------------------------------------


class AgentCollector(Collector):
    """Builds every agent metric from the components' state at scrape time (see the module
    docstring). Register it with `register_agent_metrics`."""

    def __init__(
        self,
        *,
        batchers: BatcherSource | None = None,
        pool: PoolView | None = None,
        scheduler: SchedulerView | None = None,
        sla: SlaMonitor | None = None,
        thermal: ThermalMonitor | None = None,
        controls: Controls | None = None,
        gpu_memory: GpuMemorySource | None = None,
    ) -> None:
        self.batchers = batchers
        self.pool = pool
        self.scheduler = scheduler
        self.sla = sla
        self.thermal = thermal
        self.controls = controls
        self.gpu_memory = gpu_memory

    def describe(self) -> Iterable[Metric]:
        """Empty families of every collected metric (lets the registry check names)."""
        return [family(spec) for spec in METRICS.values() if not spec.name.startswith(OBSERVED_PREFIXES)]

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Family] = {}

        def fam(name: str) -> Family:
            got = families.get(name)
            if got is None:
                got = families[name] = family(METRICS[name])
            return got

        self._batchers(fam)
        self._pool(fam)
        self._scheduler(fam)
        self._sla(fam)
        self._thermal(fam)
        return list(families.values())

    # --- per component ------------------------------------------------------

    def _batchers(self, fam: Callable[[str], Family]) -> None:
        shed: dict[ModelId, int] = {}
        if self.controls is not None:
            for (model_id, _priority), n in self.controls.refused.items():
                shed[model_id] = shed.get(model_id, 0) + n
        if self.batchers is None:
            return
        for model_id, b in self.batchers():
            lv = [model_id.name, model_id.version]
            fam("edgefleet_requests_total").add_metric(lv, b.submitted)
            fam("edgefleet_request_failures_total").add_metric(lv, b.failed)
            fam("edgefleet_deadline_drops_total").add_metric(lv, b.expired)
            refused = fam("edgefleet_admissions_refused_total")
            refused.add_metric([*lv, "predicted_wait"], b.refused_late)
            refused.add_metric([*lv, "too_large"], b.refused_too_large)
            refused.add_metric([*lv, "queue_full"], b.refused)
            refused.add_metric([*lv, "displaced"], b.displaced)
            refused.add_metric([*lv, "priority_shed"], shed.get(model_id, 0))
            fam("edgefleet_abandoned_rows_total").add_metric(lv, b.abandoned_rows)
            fam("edgefleet_queue_depth_rows").add_metric(lv, b.queued_rows())
            fam("edgefleet_batches_staged_total").add_metric(lv, b.staged)

    def _pool(self, fam: Callable[[str], Family]) -> None:
        p = self.pool
        if p is None:
            return
        workers = fam("edgefleet_pool_workers")
        workers.add_metric(["regular"], p.num_workers)
        workers.add_metric(["urgent"], p.urgent_workers)
        fam("edgefleet_pool_queued_jobs").add_metric([], p.queued())
        fam("edgefleet_pool_jobs_total").add_metric([], p.completed)
        refused = fam("edgefleet_pool_admissions_refused_total")
        refused.add_metric(["queue_full"], p.refused)
        refused.add_metric(["displaced"], p.displaced)
        fam("edgefleet_pool_deadline_drops_total").add_metric([], p.expired)

    def _scheduler(self, fam: Callable[[str], Family]) -> None:
        s = self.scheduler
        if s is None:
            return
        st = s.stats
        fam("edgefleet_model_loads_total").add_metric([], st.loads)
        fam("edgefleet_model_load_failures_total").add_metric([], st.load_failures)
        fam("edgefleet_model_evictions_total").add_metric([], st.evictions)
        fam("edgefleet_model_unloads_total").add_metric([], st.unloads)
        fam("edgefleet_model_load_seconds").add_metric([], st.loads, st.load_seconds)
        lookups = fam("edgefleet_model_cache_lookups_total")
        lookups.add_metric(["hit"], st.hits)
        lookups.add_metric(["miss"], st.misses)
        resident = s.resident()
        fam("edgefleet_resident_models").add_metric([], len(resident))
        for r in resident:
            lv = [r.model_id.name, r.model_id.version]
            fam("edgefleet_resident_model_bytes").add_metric(lv, r.size_bytes)
            fam("edgefleet_model_leases").add_metric(lv, r.in_flight)
        fam("edgefleet_model_memory_used_bytes").add_metric([], s.used_bytes)
        fam("edgefleet_model_memory_budget_bytes").add_metric([], s.budget_bytes)

    def _sla(self, fam: Callable[[str], Family]) -> None:
        sla = self.sla
        if sla is None:
            return
        for model_id in sla.models():
            lv = [model_id.name, model_id.version]
            hists = sla.stats(model_id).histograms()
            for name, key in (
                ("edgefleet_request_queue_seconds", "queue"),
                ("edgefleet_request_compute_seconds", "compute"),
                ("edgefleet_request_duration_seconds", "latency"),
                ("edgefleet_batch_rows", "batch_rows"),
            ):
                _add_histogram(fam(name), lv, hists[key])
            fam("edgefleet_sla_mitigation_level").add_metric(lv, sla.level(model_id))
            report = sla.report(model_id)
            if report is None:
                continue
            if report.counters is not None:
                fam("edgefleet_slow_requests_total").add_metric(lv, report.counters.slow)
            w = report.window
            if report.verdict.met is not None:
                fam("edgefleet_sla_window_met").add_metric(lv, 1.0 if report.verdict.met else 0.0)
            for q, value in (("0.5", w.p50_s), ("0.95", w.p95_s), ("0.99", w.p99_s)):
                if value is not None:
                    fam("edgefleet_sla_window_latency_seconds").add_metric([*lv, q], value)
            fam("edgefleet_sla_window_throughput_requests_per_second").add_metric(lv, w.throughput_rps)
            if w.error_rate is not None:
                fam("edgefleet_sla_window_error_ratio").add_metric(lv, w.error_rate)
        # Every objective of every tracked model, from 0 (a series that appears only at its first
        # violation makes rate() and alerts blind to it until then), then any others counted.
        counts = dict(sla.violation_counts)
        for model_id in sla.models():
            for objective in objectives_of(sla.spec(model_id)):
                counts.setdefault((model_id, objective), 0)
        violations = fam("edgefleet_sla_violations_total")
        for (model_id, objective), n in sorted(counts.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            violations.add_metric([model_id.name, model_id.version, objective], n)

    def _thermal(self, fam: Callable[[str], Family]) -> None:
        memory: tuple[int, int] | None = None
        t = self.thermal
        if t is not None and t.status is not None:
            st = t.status
            r = st.reading
            if r.temperature_c is not None:
                fam("edgefleet_gpu_temperature_celsius").add_metric([], r.temperature_c)
            fam("edgefleet_gpu_soft_limit_celsius").add_metric([], st.soft_limit_c)
            fam("edgefleet_gpu_throttled").add_metric([], 1.0 if r.throttled else 0.0)
            for reason in r.throttle_reasons:
                fam("edgefleet_gpu_throttle_reason").add_metric([reason], 1.0)
            for name, value in (
                ("edgefleet_gpu_power_watts", r.power_w),
                ("edgefleet_gpu_sm_clock_hertz", r.sm_clock_hz),
                ("edgefleet_gpu_utilization_ratio", r.utilization),
            ):
                if value is not None:
                    fam(name).add_metric([], value)
            fam("edgefleet_thermal_mitigation_level").add_metric([], st.level)
            if r.memory_total_bytes is not None and r.memory_used_bytes is not None:
                memory = (r.memory_total_bytes, r.memory_used_bytes)
        if t is not None:
            fam("edgefleet_gpu_throttle_episodes_total").add_metric([], t.throttle_episodes)
        if memory is None and self.gpu_memory is not None:
            memory = self.gpu_memory()
        if memory is not None:
            fam("edgefleet_gpu_memory_total_bytes").add_metric([], memory[0])
            fam("edgefleet_gpu_memory_used_bytes").add_metric([], memory[1])
        gate = self.controls.gate if self.controls is not None else None
        if gate is not None:
            fam("edgefleet_concurrency_limit").add_metric([], gate.limit)
            fam("edgefleet_concurrency_in_use").add_metric([], gate.in_use)


def family(spec: MetricSpec) -> Family:
    labels = list(spec.labels)
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=labels)
    if spec.kind == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=labels)
    if spec.kind == "histogram":
        return HistogramMetricFamily(spec.name, spec.help, labels=labels)
    if spec.kind == "summary":
        return SummaryMetricFamily(spec.name, spec.help, labels=labels)
    raise AssertionError(f"unknown metric kind {spec.kind!r}")


def _add_histogram(family: Family, labels: list[str], counts: BucketCounts) -> None:
    buckets = [(floatToGoString(le), float(n)) for le, n in counts.cumulative()]
    family.add_metric(labels, buckets, counts.sum)


def register_agent_metrics(
    registry: CollectorRegistry,
    *,
    batchers: BatcherSource | None = None,
    pool: PoolView | None = None,
    scheduler: SchedulerView | None = None,
    sla: SlaMonitor | None = None,
    thermal: ThermalMonitor | None = None,
    controls: Controls | None = None,
    gpu_memory: GpuMemorySource | None = None,
) -> AgentCollector:
    """Register the agent's scrape-time collector on `registry`; returns it (its component
    attributes may be set later, e.g. once the engine exists)."""
    collector = AgentCollector(
        batchers=batchers,
        pool=pool,
        scheduler=scheduler,
        sla=sla,
        thermal=thermal,
        controls=controls if controls is not None else (sla.controls if sla is not None else None),
        gpu_memory=gpu_memory,
    )
    registry.register(collector)
    return collector


class ApiMetrics:
    """The per-request metrics the HTTP layer observes: `observe(method, route, code, s)`.
    `route` is the route template (e.g. /v2/models/{model}/infer), never the raw path, so
    the label set stays bounded."""

    def __init__(self, registry: CollectorRegistry, buckets_s: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.requests, self.duration = _per_request("edgefleet_http", registry, buckets_s)

    def observe(self, method: str, route: str, code: int, duration_s: float) -> None:
        self.requests.labels(method, route, str(code)).inc()
        self.duration.labels(method, route).observe(duration_s)


class GrpcMetrics:
    """The per-call metrics of the gRPC API: `observe(rpc, code, s)`, `rpc` one of the service's
    method names (bounded), `code` a gRPC status code name (OK, INVALID_ARGUMENT, ...)."""

    def __init__(self, registry: CollectorRegistry, buckets_s: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.requests, self.duration = _per_request("edgefleet_grpc", registry, buckets_s)

    def observe(self, rpc: str, code: str, duration_s: float) -> None:
        self.requests.labels(rpc, code).inc()
        self.duration.labels(rpc).observe(duration_s)


def _per_request(
    prefix: str, registry: CollectorRegistry, buckets_s: tuple[float, ...]
) -> tuple[Counter, Histogram]:
    """`<prefix>_requests_total` and `<prefix>_request_duration_seconds`, as `METRICS` declares
    them, on `registry`."""
    spec = METRICS[f"{prefix}_requests_total"]
    requests = Counter(spec.name, spec.help, spec.labels, registry=registry)
    spec = METRICS[f"{prefix}_request_duration_seconds"]
    duration = Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=(*buckets_s, math.inf))
    return requests, duration
