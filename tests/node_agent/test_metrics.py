"""Prometheus metrics: the scrape after real activity through a real Engine on the example
models carries every name with the components' own numbers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet_api.sla import SlaObjectives
from edgefleet_api.types import ModelId, Priority
from node_agent.control.mitigation import Controls, Limits
from node_agent.control.sla_monitor import SlaMonitor, SlaSettings
from node_agent.control.thermal import ThermalMonitor
from node_agent.control.thermal_sources import SimulatedSource
from node_agent.errors import DeadlineExceeded, InferenceFailed, Overloaded
from node_agent.metrics.agent import METRICS, ApiMetrics, engine_batchers, register_agent_metrics
from node_agent.runtime.engine import Engine
from node_agent.runtime.repository import ModelRepository
from node_agent.runtime.scheduler import ModelScheduler
from node_agent.runtime.stream_pool import PoolSettings, StreamPool

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def scrape(registry: CollectorRegistry) -> tuple[Samples, dict[str, str]]:
    """(sample name, sorted labels) -> value, and family name -> type."""
    text = generate_latest(registry).decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def test_scrape_after_real_activity(example_repo: Path) -> None:
    async def main() -> dict[str, Any]:
        repo = ModelRepository(example_repo)
        scheduler = ModelScheduler(2 << 30, lambda cfg: repo.load(cfg, "cpu"))
        pool = StreamPool(PoolSettings(num_workers=1, torch_threads=1)).start()
        controls = Controls()
        gate = controls.gate_for(scheduler, pool.num_workers + 1)
        sla = SlaMonitor(controls, SlaSettings(min_requests=10, min_control_requests=10))
        engine = Engine(repo, gate, pool, policy_factory=sla.policy_factory(workers=1, max_queue_rows=16))
        sla.attach(lambda m: engine.batcher(m.name, m.version))
        clock = FakeClock()
        thermal = ThermalMonitor(SimulatedSource(gate.meter(), clock=clock), controls, clock=clock)
        registry = CollectorRegistry()
        register_agent_metrics(
            registry,
            batchers=engine_batchers(engine, sla.models),
            pool=pool,
            scheduler=scheduler,
            sla=sla,
            thermal=thermal,
        )
        api = ApiMetrics(registry)
        clf = repo.config("classifier", "1")
        sla.track(clf, SlaObjectives(p95_latency_s=1e-5))  # impossible: a violation and mitigation
        try:
            # classifier/1: 12 sequential requests, then a burst past its 16-row queue bound
            for i in range(12):
                await engine.infer("classifier", "1", {"image": images(1, i)})
            burst = await asyncio.gather(
                *[engine.infer("classifier", "1", {"image": images(1, i)}) for i in range(40)],
                return_exceptions=True,
            )
            refused = sum(isinstance(o, Overloaded) for o in burst)
            assert refused > 0 and all(isinstance(o, dict | Overloaded) for o in burst)
            with pytest.raises(DeadlineExceeded):
                await engine.infer("classifier", "1", {"image": images(1, 0)}, timeout_s=1e-9)
            x = np.ones((3, 32), np.float32)
            for _ in range(5):
                await engine.infer("mlp", "1", {"features": x})
            failing = await asyncio.gather(
                *[engine.infer("classifier", "2-failing", {"image": images(1, i)}) for i in range(5)],
                return_exceptions=True,
            )
            assert all(isinstance(o, InferenceFailed) for o in failing)
            # memory pressure: a budget that holds classifier/2 or what is resident now, but
            # not both, forces an eviction
            need = repo.config("classifier", "2").memory_estimate_bytes
            assert need is not None
            scheduler.set_budget(max(scheduler.used_bytes, need))
            await engine.infer("classifier", "2", {"image": images(2, 0)})
            # priority shedding, as the request path asks before Engine.infer
            controls.set_model_limits(ModelId("mlp", "1"), Limits(lowest_admitted=Priority.NORMAL))
            with pytest.raises(Overloaded):
                controls.check_admission(ModelId("mlp", "1"), Priority.LOW)
            sla.tick()
            clock.t = 5.0
            thermal.step()
            api.observe("POST", "/v2/models/{model}/infer", 200, 0.012)
            api.observe("POST", "/v2/models/{model}/infer", 503, 0.001)
            samples, types = scrape(registry)
            return {
                "samples": samples,
                "types": types,
                "refused": refused,
                "batchers": {m: engine.batcher(m.name, m.version) for m in sla.models()},
                "stats": scheduler.stats,
                "resident": scheduler.resident(),
                "used": scheduler.used_bytes,
                "budget": scheduler.budget_bytes,
                "thermal": thermal.status,
                "pool": (pool.completed, pool.refused),
                "text": generate_latest(registry).decode(),
            }
        finally:
            await engine.stop()
            await scheduler.close()
            pool.stop()

    got = asyncio.run(main())
    s: Samples = got["samples"]
    clf = {"model": "classifier", "version": "1"}
    b = got["batchers"][ModelId("classifier", "1")]

    # requests and admission, from the batcher's own counters
    assert get(s, "edgefleet_requests_total", **clf) == b.submitted == 12 + 40 - got["refused"]
    assert get(s, "edgefleet_admissions_refused_total", **clf, reason="queue_full") == got["refused"]
    assert get(s, "edgefleet_admissions_refused_total", **clf, reason="displaced") == b.displaced
    assert get(s, "edgefleet_deadline_drops_total", **clf) == 1
    assert get(s, "edgefleet_request_failures_total", model="classifier", version="2-failing") == 5
    assert get(s, "edgefleet_admissions_refused_total", model="mlp", version="1", reason="priority_shed") == 1
    assert get(s, "edgefleet_queue_depth_rows", **clf) == 0
    assert get(s, "edgefleet_batches_staged_total", **clf) == b.staged

    # latency histograms split into queue and compute, and batch sizes
    n = get(s, "edgefleet_request_duration_seconds_count", **clf)
    assert n == b.completed == b.submitted
    assert get(s, "edgefleet_request_queue_seconds_count", **clf) == n
    assert get(s, "edgefleet_request_compute_seconds_count", **clf) == n
    assert get(s, "edgefleet_request_duration_seconds_bucket", **clf, le="+Inf") == n
    total = get(s, "edgefleet_request_duration_seconds_sum", **clf)
    parts = get(s, "edgefleet_request_queue_seconds_sum", **clf) + get(
        s, "edgefleet_request_compute_seconds_sum", **clf
    )
    assert total > 0 and parts == pytest.approx(total, rel=1e-6)
    assert get(s, "edgefleet_batch_rows_count", **clf) == b.batches
    assert get(s, "edgefleet_batch_rows_sum", **clf) == b.rows_run == n
    assert get(s, "edgefleet_batch_rows_bucket", **clf, le="16.0") == b.batches  # max batch 16
    le = [
        get(s, "edgefleet_request_duration_seconds_bucket", **clf, le=k)
        for k in ("0.001", "0.01", "0.1", "1.0", "+Inf")
    ]
    assert le == sorted(le)  # cumulative

    # the scheduler
    st = got["stats"]
    assert get(s, "edgefleet_model_loads_total") == st.loads == 4
    assert get(s, "edgefleet_model_evictions_total") == st.evictions >= 1
    assert get(s, "edgefleet_model_load_seconds_count") == st.loads
    assert (
        get(s, "edgefleet_model_load_seconds_sum") == pytest.approx(st.load_seconds) and st.load_seconds > 0
    )
    assert get(s, "edgefleet_model_cache_lookups_total", result="miss") == st.misses
    assert get(s, "edgefleet_model_cache_lookups_total", result="hit") == st.hits > 0
    assert get(s, "edgefleet_resident_models") == len(got["resident"])
    for r in got["resident"]:
        assert (
            get(s, "edgefleet_resident_model_bytes", model=r.model_id.name, version=r.model_id.version)
            == r.size_bytes
            > 0
        )
    assert get(s, "edgefleet_model_memory_used_bytes") == got["used"]
    assert get(s, "edgefleet_model_memory_budget_bytes") == got["budget"]
    assert get(s, "edgefleet_pool_jobs_total") == got["pool"][0] > 0
    assert get(s, "edgefleet_pool_workers", lane="regular") == 1
    assert get(s, "edgefleet_pool_workers", lane="urgent") == 1

    # SLA
    assert get(s, "edgefleet_sla_violations_total", **clf, objective="p95_latency") == 1
    assert get(s, "edgefleet_sla_mitigation_level", **clf) == 1
    assert get(s, "edgefleet_sla_window_met", **clf) == 0
    assert ("edgefleet_sla_window_met", (("model", "mlp"), ("version", "1"))) not in s  # no SLA
    assert get(s, "edgefleet_sla_window_latency_seconds", **clf, quantile="0.95") > 1e-5
    assert get(s, "edgefleet_sla_window_error_ratio", model="classifier", version="2-failing") == 1.0
    # slow requests: every completed one is past an SLO latency of 10 us; none without an SLO
    assert get(s, "edgefleet_slow_requests_total", **clf) == n > 0
    assert get(s, "edgefleet_slow_requests_total", model="mlp", version="1") == 0

    # thermal (simulated: no GPU memory reading)
    th = got["thermal"]
    assert get(s, "edgefleet_gpu_temperature_celsius") == th.reading.temperature_c > 25.0
    assert get(s, "edgefleet_gpu_soft_limit_celsius") == 75.0
    assert get(s, "edgefleet_gpu_throttled") == 0
    assert get(s, "edgefleet_gpu_power_watts") == th.reading.power_w
    assert get(s, "edgefleet_thermal_mitigation_level") == 0
    assert get(s, "edgefleet_concurrency_limit") == 2
    assert get(s, "edgefleet_concurrency_in_use") == 0
    assert not any(name.startswith("edgefleet_gpu_memory") for name, _ in s)

    # HTTP
    assert (
        get(s, "edgefleet_http_requests_total", method="POST", route="/v2/models/{model}/infer", code="503")
        == 1
    )
    assert (
        get(
            s,
            "edgefleet_http_request_duration_seconds_count",
            method="POST",
            route="/v2/models/{model}/infer",
        )
        == 2
    )

    # every family exported is declared in METRICS, with its declared type
    types: dict[str, str] = got["types"]
    for family, kind in types.items():
        if family.endswith("_created"):  # prometheus_client's own series for its Counter/Histogram
            continue
        spec = METRICS.get(family) or METRICS.get(family + "_total")
        assert spec is not None, family
        assert spec.kind == kind, family
    assert "edgefleet_requests_total" not in generate_latest(REGISTRY).decode()  # no global


def test_declared_names_follow_the_conventions() -> None:
    units = (
        "_seconds",
        "_bytes",
        "_celsius",
        "_watts",
        "_hertz",
        "_ratio",
        "_rows",
        "_per_second",
        "_total",
        "_level",
        "_limit",
        "_use",
        "_met",
        "_throttled",
        "_reason",
        "_models",
        "_jobs",
        "_workers",
        "_leases",
    )
    for name, spec in METRICS.items():
        assert name.startswith("edgefleet_") and name == spec.name
        assert (spec.kind == "counter") == name.endswith("_total"), name
        assert name.endswith(units), name
        assert "ms" not in name.split("_") and "milliseconds" not in name


def test_collector_describes_its_names_and_tolerates_missing_parts() -> None:
    registry = CollectorRegistry()
    register_agent_metrics(registry)
    assert generate_latest(registry) == b""  # nothing to report, nothing invented
    with pytest.raises(ValueError, match="Duplicated"):
        register_agent_metrics(registry)  # describe() names clash on one registry
    ApiMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        ApiMetrics(registry)
