"""SLA monitor: sliding windows (fake clock), verdicts, violation -> mitigation -> recovery
with hysteresis, and the same loop on a real Engine serving the example models."""

from __future__ import annotations

import asyncio
import math
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from agent_runner import RunningAgent, post_infer

from edgefleet_api.edge_node import ModelCounters
from edgefleet_api.sla import SlaObjectives
from edgefleet_api.types import ModelId, Priority
from node_agent.agent import AgentSettings
from node_agent.control.mitigation import Controls
from node_agent.control.sla_monitor import (
    DEFAULT_LEVELS,
    ERROR_RATE,
    P95,
    P99,
    THROUGHPUT,
    MitigationState,
    Pressure,
    SlaMonitor,
    SlaSettings,
    judge,
    next_mitigation,
    pressure_of,
)
from node_agent.control.sla_windows import WindowStats
from node_agent.errors import InferenceFailed, Overloaded
from node_agent.runtime.batching_policy import StaticPolicy
from node_agent.runtime.engine import Engine
from node_agent.runtime.repository import ModelRepository
from node_agent.runtime.scheduler import ModelScheduler
from node_agent.runtime.stream_pool import PoolSettings, StreamPool
from node_agent.serving.http import HttpSettings
from node_agent.types import ModelConfig, TensorSpec

T = TypeVar("T")


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def config(name: str = "m", version: str = "1", **kw: Any) -> ModelConfig:
    return ModelConfig(
        name=name,
        version=version,
        format="torchscript",
        inputs=(TensorSpec("x", "FP32", (4,)),),
        outputs=(TensorSpec("y", "FP32", (2,)),),
        artifact="model.pt",
        digest="sha256:" + "0" * 64,
        max_batch_size=16,
        **kw,
    )


# --- verdicts and mitigation: pure ------------------------------------------------------


def window(**kw: Any) -> WindowStats:
    return WindowStats(**{"window_s": 10.0, **kw})


def test_judge() -> None:
    spec = SlaObjectives(p95_latency_s=0.05, p99_latency_s=0.1, max_error_rate=0.01, min_throughput_rps=5.0)
    ok = window(completed=100, p95_s=0.04, p99_s=0.09)
    assert judge(ok, spec, min_requests=20).met is True
    assert judge(window(completed=10, p95_s=1.0), spec, min_requests=20).met is None
    assert judge(ok, SlaObjectives(), min_requests=1).met is None  # no objectives
    v = judge(window(completed=100, failed=5, p95_s=0.06, p99_s=0.09), spec, min_requests=20)
    assert v.met is False
    assert {c.objective for c in v.violated} == {P95, ERROR_RATE}
    slow = judge(window(completed=40, p95_s=0.01, p99_s=0.01), spec, min_requests=20)
    assert [c.objective for c in slow.violated] == [THROUGHPUT]  # 4 rps < 5
    margin = judge(ok, spec, min_requests=20, scale=0.8)  # 0.04 <= 0.04, 0.09 > 0.08
    assert [c.objective for c in margin.violated] == [P99]


def test_pressure_separates_load_from_failures() -> None:
    s = SlaSettings(min_control_requests=20)
    spec = SlaObjectives(p95_latency_s=0.05, max_error_rate=0.05)
    assert pressure_of(window(completed=100, p95_s=0.2), spec, s) is Pressure.VIOLATED
    assert pressure_of(window(completed=100, p95_s=0.045), spec, s) is Pressure.BETWEEN
    assert pressure_of(window(completed=100, p95_s=0.01), spec, s) is Pressure.HEALTHY
    assert pressure_of(window(completed=5, p95_s=0.2), spec, s) is Pressure.HEALTHY  # no data
    # errors from a broken model are not a load problem; deadline drops are
    assert pressure_of(window(completed=80, failed=20, p95_s=0.01), spec, s) is Pressure.HEALTHY
    assert pressure_of(window(completed=80, expired=20, p95_s=0.01), spec, s) is Pressure.VIOLATED


def test_next_mitigation_escalates_holds_and_recovers_with_hysteresis() -> None:
    s = SlaSettings(escalate_interval_s=3, recover_after_s=10)
    st = MitigationState()
    V, B, H = Pressure.VIOLATED, Pressure.BETWEEN, Pressure.HEALTHY
    levels = []
    for t, p in enumerate([V, V, V, V, V, V, V, V, V, V]):
        st = next_mitigation(st, p, float(t), s)
        levels.append(st.level)
    assert levels == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]  # one step per 3 s, capped at the top
    # healthy for 9 s, then "between" resets the healthy clock: no recovery yet
    for t in range(10, 19):
        st = next_mitigation(st, H, float(t), s)
    assert st.level == 3 and st.healthy_since_s == 10
    st = next_mitigation(st, B, 19.0, s)
    assert st.level == 3 and st.healthy_since_s is None
    trace = []
    for t in range(20, 60):
        st = next_mitigation(st, H, float(t), s)
        trace.append((t, st.level))
    downs = [t for (t, lv), (_, prev) in zip(trace[1:], trace, strict=False) if lv < prev]
    assert downs == [30, 40, 50]  # healthy since 20: one step down per 10 s
    assert st.level == 0
    # one violated window escalates again at once (the last change was long ago)
    assert next_mitigation(st, V, 61.0, s).level == 1


# --- the clocked monitor, fed through the real policy wrapper ---------------------------


def test_violation_mitigates_then_recovers_with_hysteresis() -> None:
    clock = FakeClock()
    settings = SlaSettings(
        control_window_s=5, min_requests=10, min_control_requests=10, escalate_interval_s=2, recover_after_s=6
    )
    controls = Controls()
    monitor = SlaMonitor(controls, settings, clock)
    cfg = config(sla=SlaObjectives(p95_latency_s=0.05, window_s=20))
    policy = monitor.policy_factory(base=lambda c: StaticPolicy(16, 0.01, 256))(cfg)
    mid = cfg.id
    assert policy.decision() == StaticPolicy(16, 0.01, 256).decision()

    def second(t: int, latency_s: float) -> None:
        clock.t = t + 0.5
        policy.observe(t + 0.5, 20, latency_s / 2, [latency_s] * 20)  # as the batcher does
        monitor.tick()

    levels = []
    for t in range(10):  # 10 s at 100 ms: p95 twice the target
        second(t, 0.1)
        levels.append(monitor.level(mid))
    assert levels == [1, 1, 2, 2, 3, 3, 3, 3, 3, 3]
    d = policy.decision()
    assert (d.batch_size, d.delay_s, d.queue_limit_rows) == (4, 0.0, 64)  # level 3
    assert not controls.admits(mid, Priority.NORMAL) and controls.admits(mid, Priority.HIGH)
    with pytest.raises(Overloaded) as refused:
        controls.check_admission(mid, Priority.LOW)
    assert refused.value.retry_after_s == controls.shed_retry_after_s
    assert controls.refused[(mid, Priority.LOW)] == 1
    report = monitor.report(mid)
    assert report is not None and report.verdict.met is False
    assert [(v.objective, v.at_s) for v in monitor.violations] == [(P95, 0.5)]  # one episode
    assert monitor.violation_counts[(mid, P95)] == 1

    for t in range(10, 40):  # back to 10 ms: healthy with margin
        second(t, 0.01)
        levels.append(monitor.level(mid))
    # the 5 s control window still holds a slow second until t=14; then 6 s per step down
    assert levels[10:15] == [3, 3, 3, 3, 3]
    downs = [t for t in range(11, 40) if levels[t] < levels[t - 1]]
    assert downs == [20, 26, 32]
    assert policy.decision() == StaticPolicy(16, 0.01, 256).decision()
    assert controls.admits(mid, Priority.LOW)
    report = monitor.report(mid)
    assert report is not None and report.verdict.met is True and report.level == 0
    window = monitor.status(mid)
    assert window is not None
    status = window.to_obj()
    assert status["met"] is True and status["windowSeconds"] == 20
    assert status["p95LatencyMs"] == pytest.approx(10.0, rel=0.01)
    assert status["requests"] == 400 and status["throughputRps"] == pytest.approx(20.0)
    assert status["errorRate"] == 0.0
    assert monitor.violation_counts[(mid, P95)] == 1


def test_thermal_limits_and_sla_limits_combine() -> None:
    controls = Controls()
    monitor = SlaMonitor(controls, SlaSettings(), FakeClock())
    cfg = config(sla=SlaObjectives(p95_latency_s=0.05))
    policy = monitor.policy_factory(base=lambda c: StaticPolicy(16, 0.01, 256))(cfg)
    controls.set_model_limits(cfg.id, DEFAULT_LEVELS[1])  # batch x0.75, delay x0.5, queue x0.75
    controls.set_global_limits(DEFAULT_LEVELS[2].__class__(batch_fraction=0.5))
    d = policy.decision()
    assert (d.batch_size, d.delay_s, d.queue_limit_rows) == (8, 0.005, 192)
    monitor.forget(cfg.id)
    assert controls.model_limits(cfg.id).unlimited
    assert policy.decision().batch_size == 8  # the GPU-wide cap stays


@dataclass
class Outcomes:
    """A batcher's outcome counters, as the monitor reads them (`OutcomeCounters`)."""

    failed: int = 0
    expired: int = 0
    refused: int = 0
    displaced: int = 0


def test_counters_are_cumulative_per_version_and_outlive_the_windows() -> None:
    clock = FakeClock()
    monitor = SlaMonitor(Controls(), SlaSettings(), clock)
    cfg = config(sla=SlaObjectives(p95_latency_s=0.05, p99_latency_s=0.1, window_s=10))
    plain = config(version="2")  # no SLA: nothing is slow
    policy = monitor.policy_factory(base=lambda c: StaticPolicy(16, 0.01, 256))(cfg)
    other = monitor.policy_factory(base=lambda c: StaticPolicy(16, 0.01, 256))(plain)
    outcomes = {cfg.id: Outcomes(), plain.id: Outcomes()}
    monitor.attach(outcomes.get)
    assert monitor.counters(cfg.id) is None  # before the first tick

    clock.t = 0.5
    policy.observe(0.5, 10, 0.01, [0.05] * 7 + [0.1, 0.1000001, 0.3])  # 2 past the p99 target
    other.observe(0.5, 4, 0.01, [5.0] * 4)
    outcomes[cfg.id].failed, outcomes[cfg.id].expired = 3, 1
    outcomes[cfg.id].refused, outcomes[cfg.id].displaced = 5, 2  # refusals: not counted
    monitor.tick()
    c = monitor.counters(cfg.id)
    assert c is not None and (c.epoch, c.requests, c.errors, c.slow) == (monitor.epoch, 14, 4, 2)
    assert c.slo_latency_s == 0.1
    assert c.to_obj() == {
        "epoch": monitor.epoch,
        "requests": 14,
        "errors": 4,
        "slow": 2,
        "sloLatencyMs": 100.0,
    }
    p = monitor.counters(plain.id)
    assert p is not None and (p.requests, p.errors, p.slow, p.slo_latency_s) == (4, 0, 0, None)

    # 100 s later the 10 s window is empty; the counters still hold everything
    clock.t = 100.5
    policy.observe(100.5, 2, 0.01, [0.2, 0.01])
    outcomes[cfg.id].expired = 2
    report = monitor.tick()[cfg.id]
    assert report.window.requests == 3  # the window: this second only
    assert report.counters == monitor.counters(cfg.id)
    c = monitor.counters(cfg.id)
    assert c is not None and (c.requests, c.errors, c.slow) == (17, 5, 3)

    # a new SLO latency (p95 only): later requests are counted against it
    monitor.set_spec(cfg.id, SlaObjectives(p95_latency_s=0.01))
    policy.observe(100.6, 2, 0.01, [0.02, 0.005])
    monitor.tick()
    c = monitor.counters(cfg.id)
    assert c is not None and (c.requests, c.slow, c.slo_latency_s) == (19, 4, 0.01)

    # forgotten and tracked again within the same epoch: the counts go on, never back
    monitor.forget(cfg.id)
    monitor.track(cfg)
    monitor.tick()
    again = monitor.counters(cfg.id)
    assert again is not None and (again.requests, again.errors, again.slow) == (19, 5, 4)
    assert again.epoch == c.epoch

    # another start of the agent (a new monitor): a new epoch, counts from 0
    restarted = SlaMonitor(Controls(), SlaSettings(), clock)
    restarted.track(cfg)
    restarted.tick()
    fresh = restarted.counters(cfg.id)
    assert fresh is not None and fresh.epoch != c.epoch and (fresh.requests, fresh.slow) == (0, 0)


# --- on a real engine -------------------------------------------------------------------


def run(main: Callable[[Any], Awaitable[T]], root: Path, sla: SlaMonitor) -> T:
    async def body() -> T:
        repo = ModelRepository(root)
        scheduler = ModelScheduler(2 << 30, lambda cfg: repo.load(cfg, "cpu"))
        pool = StreamPool(PoolSettings(num_workers=1, torch_threads=1)).start()
        gate = sla.controls.gate_for(scheduler, pool.num_workers + 1)
        engine = Engine(repo, gate, pool, policy_factory=sla.policy_factory(workers=1))
        sla.attach(lambda m: engine.batcher(m.name, m.version))
        try:
            return await asyncio.wait_for(main(engine), 60)
        finally:
            await engine.stop()
            await scheduler.close()
            pool.stop()

    return asyncio.run(body())


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def test_real_engine_violation_caps_its_batcher(example_repo: Path) -> None:
    sla = SlaMonitor(settings=SlaSettings(min_requests=20, min_control_requests=20))
    repo = ModelRepository(example_repo)
    fast = repo.config("classifier", "1")
    failing = repo.config("classifier", "2-failing")
    sla.track(fast, SlaObjectives(p95_latency_s=1e-5, window_s=60))  # impossible: 10 us
    sla.track(failing, SlaObjectives(p95_latency_s=10.0, max_error_rate=0.1))

    async def main(engine: Engine) -> None:
        results = await asyncio.gather(
            *[engine.infer("classifier", "1", {"image": images(1, i)}) for i in range(40)]
        )
        assert all(r["logits"].shape == (1, 10) for r in results)
        outcomes = await asyncio.gather(
            *[engine.infer("classifier", "2-failing", {"image": images(1, i)}) for i in range(25)],
            return_exceptions=True,
        )
        assert all(isinstance(o, InferenceFailed) for o in outcomes)
        before = engine.batcher("classifier", "1").policy.decision()
        reports = sla.tick()

        r = reports[fast.id]
        assert r.window.completed == 40 and r.window.failed == 0
        assert r.window.p95_s is not None and r.window.p95_s > 1e-5
        assert r.window.queue_mean_s is not None and r.window.compute_mean_s is not None
        assert r.window.compute_mean_s > 0
        assert r.window.batches >= 1 and r.window.rows == 40
        assert r.verdict.met is False and r.pressure is Pressure.VIOLATED and r.level == 1
        after = engine.batcher("classifier", "1").policy.decision()
        assert after.batch_size == math.floor(before.batch_size * 0.75) < before.batch_size
        assert after.delay_s == pytest.approx(before.delay_s * 0.5)
        assert sla.violation_counts[(fast.id, P95)] == 1
        c = sla.counters(fast.id)  # every request slower than 10 us
        assert c is not None and (c.requests, c.errors, c.slow, c.slo_latency_s) == (40, 0, 40, 1e-5)

        f = reports[failing.id]  # a broken model: reported, not mitigated
        assert f.window.failed == 25 and f.window.completed == 0
        assert f.window.error_rate == 1.0
        assert f.verdict.met is False and f.level == 0
        assert [c.objective for c in f.verdict.violated] == [ERROR_RATE]
        assert f.counters is not None and f.counters.epoch == sla.epoch
        assert (f.counters.requests, f.counters.errors, f.counters.slow) == (25, 25, 0)
        assert (status := sla.status(failing.id)) is not None and status.to_obj() == {
            "throughputRps": 0.0,
            "requests": 25,
            "windowSeconds": 60,
            "errorRate": 1.0,
            "met": False,
        }

    run(main, example_repo, sla)


def test_no_objectives_no_verdict_but_measured(example_repo: Path) -> None:
    sla = SlaMonitor()

    async def main(engine: Engine) -> None:
        x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
        for _ in range(30):
            await engine.infer("mlp", "1", {"features": x})
        report = sla.tick()[ModelId("mlp", "1")]
        assert report.window.completed == 30 and report.verdict.met is None
        window = sla.status(ModelId("mlp", "1"))
        assert window is not None
        status = window.to_obj()
        assert "met" not in status and status["requests"] == 30
        assert status["p50LatencyMs"] > 0
        assert sla.models() == [ModelId("mlp", "1")]

    run(main, example_repo, sla)


def _counted(agent: RunningAgent, model_id: ModelId, requests: int) -> ModelCounters:
    """The agent's counters of `model_id` once a tick has read `requests` requests (10 s)."""
    assert agent.agent.sla is not None
    deadline = time.monotonic() + 10
    while True:
        with suppress(KeyError):
            c = agent.agent.sla.counters(model_id)
            if c is not None and c.requests >= requests:
                return c
        assert time.monotonic() < deadline, f"{model_id}: counters never reached {requests} requests"
        time.sleep(0.05)


def test_a_real_agent_counts_what_it_answered_and_a_restart_starts_a_new_epoch(
    example_repo: Path, tmp_path: Path
) -> None:
    """Over HTTP, through a real agent: answered requests, errors (500, 504) and slow ones
    (past the version's SLO latency) are counted exactly; client errors (400) are not; a new
    agent on the same repository reports a new epoch and counts from 0."""
    root = tmp_path / "models"
    shutil.copytree(example_repo, root)
    # classifier/1 and 2-failing: no SLO (nothing is slow); 2-slow: p99 (it wins over p95) 1 us.
    # (A loose SLO would make the batching policy wait for fuller batches: seconds here.)
    with (root / "classifier" / "2-slow" / "model.yaml").open("a") as f:
        f.write("p95_latency_s: 0.5\np99_latency_s: 0.000001\n")
    # no mitigation: the slow version misses its (impossible) SLO by design
    settings = AgentSettings(
        model_repository=root,
        http=HttpSettings(host="127.0.0.1", port=0),
        thermal_source="off",
        sla=SlaSettings(min_control_requests=10_000),
    )
    fast, slow, failing = (ModelId("classifier", v) for v in ("1", "2-slow", "2-failing"))
    x = images(1, 0)
    agent = RunningAgent(settings)
    try:
        codes = [post_infer(agent.url, "classifier/versions/1", x) for _ in range(6)]
        codes += [post_infer(agent.url, "classifier/versions/1", x, timeout=1) for _ in range(2)]  # 1 us
        codes += [
            post_infer(agent.url, "classifier/versions/1", images(2, 0)[:, :2]) for _ in range(3)
        ]  # bad shape
        codes += [post_infer(agent.url, "classifier/versions/2-slow", x) for _ in range(5)]
        codes += [post_infer(agent.url, "classifier/versions/2-failing", x) for _ in range(4)]
        assert codes == [200] * 6 + [504] * 2 + [400] * 3 + [200] * 5 + [500] * 4
        c = _counted(agent, fast, 8)
        assert (c.requests, c.errors, c.slow, c.slo_latency_s) == (8, 2, 0, None)
        s = _counted(agent, slow, 5)
        assert (s.requests, s.errors, s.slow, s.slo_latency_s) == (5, 0, 5, 1e-6)
        f = _counted(agent, failing, 4)
        assert (f.requests, f.errors, f.slow) == (4, 4, 0)
        epoch = c.epoch
        assert s.epoch == f.epoch == epoch
        metrics = urllib.request.urlopen(f"http://{agent.url}/metrics", timeout=10).read().decode()
        assert 'edgefleet_slow_requests_total{model="classifier",version="2-slow"} 5.0' in metrics
        assert 'edgefleet_slow_requests_total{model="classifier",version="1"} 0.0' in metrics
    finally:
        agent.close()

    again = RunningAgent(settings)
    try:
        assert post_infer(again.url, "classifier/versions/1", x) == 200
        c = _counted(again, fast, 1)
        assert c.epoch != epoch and (c.requests, c.errors, c.slow) == (1, 0, 0)
    finally:
        again.close()


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        SlaSettings(control_window_s=0.5)
    with pytest.raises(ValueError):
        SlaSettings(healthy_fraction=1.5)
    with pytest.raises(ValueError):
        SlaObjectives(p95_latency_s=0)
    with pytest.raises(KeyError, match="not tracked"):
        SlaMonitor().level(ModelId("x", "1"))
