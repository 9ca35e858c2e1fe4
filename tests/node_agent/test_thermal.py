"""Thermal policy, sources (simulated, sysfs on a fake tree, NVML on a GPU) and the monitor
closing the loop on a real engine: heat follows the measured load, mitigation lowers the
load before the simulated hardware throttles, and lifts it once cool."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from node_agent.control.mitigation import Controls
from node_agent.control.thermal import (
    ThermalLevel,
    ThermalMonitor,
    ThermalSettings,
    ThermalState,
    ThermalStatus,
    thermal_step,
)
from node_agent.control.thermal_sources import (
    NvmlSource,
    SimulatedSource,
    SysfsSource,
    ThermalModel,
    ThermalReading,
    decode_throttle_reasons,
    find_gpu_zone,
    select_source,
)
from node_agent.runtime.batching_policy import StaticPolicy
from node_agent.runtime.engine import Engine
from node_agent.runtime.repository import ModelRepository
from node_agent.runtime.scheduler import ModelScheduler
from node_agent.runtime.stream_pool import PoolSettings, StreamPool


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- policy (pure) ----------------------------------------------------------------------


def run_policy(
    temps: Sequence[float],
    settings: ThermalSettings,
    soft: float = 75.0,
    throttled: set[int] | None = None,
    dt: float = 1.0,
) -> list[int]:
    state = ThermalState()
    levels = []
    for i, temp in enumerate(temps):
        state = thermal_step(state, temp, i in (throttled or set()), i * dt, soft, settings)
        levels.append(state.level)
    return levels


def test_levels_follow_the_temperature_with_hysteresis_and_hold() -> None:
    s = ThermalSettings(step_c=3, hysteresis_c=3, hold_s=5, lookahead_s=0)
    up = [70, 74, 75, 77, 78, 81, 84, 90]
    assert run_policy(up, s) == [0, 0, 1, 1, 2, 3, 3, 3]
    # cooling: level 3 (entered at 81) is left below 78, level 2 below 75, level 1 below 72,
    # one level at a time, each after holding 5 s
    temps = [81.0] + [77.0] * 6 + [74.0] * 6 + [71.0] * 6 + [73.0]
    levels = run_policy(temps, s)
    assert levels == [3] * 5 + [2] * 5 + [1] * 5 + [0] * 5  # 73 C at the end: no return
    # without the hold, the same cooling steps down as soon as each exit point is passed
    quick = run_policy(temps, ThermalSettings(step_c=3, hysteresis_c=3, hold_s=0, lookahead_s=0))
    assert quick == [3] + [2] * 6 + [1] * 6 + [0] * 7
    # no flapping: hovering just under the entry point of level 1 keeps it
    assert run_policy([76, 74, 73, 74, 73, 74, 73, 74, 73, 74], s) == [1] * 10


def test_trend_lookahead_acts_before_the_soft_limit() -> None:
    s = ThermalSettings(lookahead_s=5, trend_smoothing=1.0)
    ramp = [60.0 + 2.0 * i for i in range(8)]  # +2 K/s: 60, 62, ..., 74
    levels = run_policy(ramp, s)
    first = levels.index(1)
    assert ramp[first] < 75.0  # projected 10 K ahead: mitigation before the limit
    assert ramp[first] + 2.0 * 5 >= 75.0
    flat = run_policy([70.0] * 8, s)
    assert flat == [0] * 8


def test_hardware_throttling_escalates_one_step_at_a_time() -> None:
    s = ThermalSettings(escalate_interval_s=2, lookahead_s=0, hold_s=5)
    # cool by the soft limit, yet the hardware throttles (power cap): +1 per 2 s, to the top
    levels = run_policy([60.0] * 20, s, throttled=set(range(8)))
    assert levels[:8] == [1, 1, 2, 2, 3, 3, 3, 3]
    # eased only 5 s after the throttling ended (t=7), then one level per 5 s
    assert levels[8:] == [3, 3, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1]


def test_soft_limit_comes_from_the_source_threshold() -> None:
    s = ThermalSettings(soft_margin_c=8)
    assert s.soft_limit_for(ThermalReading("nvml", 50.0, slowdown_c=90.0)) == 82.0
    assert s.soft_limit_for(ThermalReading("sysfs", 50.0)) == s.default_soft_limit_c
    assert ThermalSettings(soft_limit_c=70).soft_limit_for(ThermalReading("x", 1.0, slowdown_c=90)) == 70


# --- simulated source -------------------------------------------------------------------


def test_simulated_source_follows_the_first_order_model() -> None:
    clock = FakeClock()
    load = [1.0]
    model = ThermalModel(ambient_c=25, idle_w=30, max_w=300, r_k_per_w=0.2, tau_s=30)
    src = SimulatedSource(lambda: load[0], model, clock)
    clock.t = 30.0  # one time constant at full load: 63 % of the way to 85 C
    r = src.read()
    assert r.power_w == 300.0 and r.utilization == 1.0
    assert r.temperature_c == pytest.approx(85 - 60 * math.exp(-1))
    readings = []
    for _ in range(40):  # full load would settle at 85 C: the hardware slows down at 83 C
        clock.t += 5.0
        readings.append(src.read())
    slowed = [r for r in readings if r.throttled]
    assert slowed and slowed[0].temperature_c is not None and slowed[0].temperature_c >= 83.0
    assert slowed[0].throttle_reasons == ("simulated",)
    assert slowed[0].sm_clock_hz == pytest.approx(model.clock_hz * model.slowdown_clock_factor)
    after = readings[readings.index(slowed[0]) + 1]
    assert after.power_w == pytest.approx(30 + 270 * 0.6)  # slowed clocks draw less power
    assert max(r.temperature_c or 0 for r in readings) < 85.0  # slowed clocks cap the heat
    episodes = sum(1 for a, b in itertools.pairwise(readings) if b.throttled and not a.throttled)
    assert episodes >= 2  # it cools below 78 C, speeds up, heats again: throttle cycling
    load[0] = 0.0
    for _ in range(30):
        clock.t += 10.0
        r = src.read()
    assert not r.throttled
    assert r.temperature_c == pytest.approx(25 + 30 * 0.2, abs=0.1)  # idle: 6 K over ambient


# --- sysfs on a fake tree ---------------------------------------------------------------


def fake_sysfs(root: Path) -> Path:
    zones = {
        "thermal_zone0": ("CPU-therm", 45000, []),
        "thermal_zone1": ("GPU-therm", 61500, [("passive", 85000), ("critical", 97000)]),
        "thermal_zone2": ("PMIC-Die", 100000, []),
    }
    for name, (kind, temp, trips) in zones.items():
        z = root / name
        z.mkdir(parents=True)
        (z / "type").write_text(kind + "\n")
        (z / "temp").write_text(f"{temp}\n")
        for i, (trip_type, trip_temp) in enumerate(trips):
            (z / f"trip_point_{i}_type").write_text(trip_type + "\n")
            (z / f"trip_point_{i}_temp").write_text(f"{trip_temp}\n")
    return root / "thermal_zone1"


def test_sysfs_source_reads_the_gpu_zone(tmp_path: Path) -> None:
    gpu_zone = fake_sysfs(tmp_path)
    assert find_gpu_zone(tmp_path) == gpu_zone
    src = SysfsSource(root=tmp_path)
    r = src.read()
    assert (r.source, r.temperature_c, r.slowdown_c, r.name) == ("sysfs", 61.5, 85.0, "GPU-therm")
    assert not r.throttled and r.throttle_reasons == ()
    (gpu_zone / "temp").write_text("86250\n")  # past the passive trip: the kernel throttles
    r = src.read()
    assert r.temperature_c == 86.25 and r.throttled and r.throttle_reasons == ("passive_trip",)
    (gpu_zone / "temp").write_text("garbage\n")
    assert src.read().temperature_c is None
    assert select_source("sysfs", sysfs_root=tmp_path).read().name == "GPU-therm"


def test_sysfs_zone_drives_the_monitor(tmp_path: Path) -> None:
    gpu_zone = fake_sysfs(tmp_path)
    controls = Controls()
    clock = FakeClock()
    monitor = ThermalMonitor(
        SysfsSource(root=tmp_path), controls, ThermalSettings(lookahead_s=0, hold_s=0), clock
    )
    status = monitor.step()
    assert status.soft_limit_c == 77.0 and status.level == 0  # 85 C passive trip - 8
    (gpu_zone / "temp").write_text("80500\n")
    clock.t = 1.0
    status = monitor.step()
    assert status.level == 2 and controls.global_limits.batch_fraction == 0.5
    assert status.to_status() == {
        "softLimitC": 77.0,
        "throttled": False,
        "temperatureC": 80.5,
        "name": "GPU-therm",
    }
    (gpu_zone / "temp").write_text("60000\n")
    for t in range(2, 6):
        clock.t = float(t)
        status = monitor.step()
    assert status.level == 0 and controls.global_limits.unlimited


def test_source_selection(tmp_path: Path) -> None:
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        SysfsSource(root=empty)
    with pytest.raises(ValueError, match="unknown thermal source"):
        select_source("magic")
    assert isinstance(select_source("simulated"), SimulatedSource)
    try:
        NvmlSource().close()
        nvml = True
    except Exception:
        nvml = False
    fake_sysfs(tmp_path / "sys")
    auto = select_source("auto", sysfs_root=tmp_path / "sys")
    assert isinstance(auto, NvmlSource if nvml else SysfsSource)
    auto.close()
    fallback = select_source("auto", sysfs_root=empty)
    assert isinstance(fallback, NvmlSource if nvml else SimulatedSource)
    fallback.close()


# --- NVML -------------------------------------------------------------------------------


def test_throttle_reason_bits_decode() -> None:
    assert decode_throttle_reasons(0) == ((), False)
    assert decode_throttle_reasons(0x1) == (("gpu_idle",), False)  # idle is not throttling
    names, throttled = decode_throttle_reasons(0x1 | 0x20 | 0x40)
    assert names == ("gpu_idle", "sw_thermal_slowdown", "hw_thermal_slowdown") and throttled
    assert decode_throttle_reasons(0x4) == (("sw_power_cap",), True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="NVML needs an NVIDIA GPU and driver")
def test_nvml_reads_a_real_gpu() -> None:
    src = NvmlSource(0)
    try:
        r = src.read()
    finally:
        src.close()
    assert r.source == "nvml" and r.name
    assert r.temperature_c is not None and 0 < r.temperature_c < 120
    assert r.memory_total_bytes is not None and r.memory_total_bytes > 2**30
    assert r.memory_used_bytes is not None and 0 <= r.memory_used_bytes <= r.memory_total_bytes
    if r.slowdown_c is not None:
        assert r.temperature_c < r.slowdown_c + 20


# --- the closed loop on a real engine ---------------------------------------------------


def heat_ramp(
    example_repo: Path,
    settings: ThermalSettings,
    ticks: int = 75,
) -> tuple[list[tuple[float, float, int, bool]], ThermalMonitor, Controls]:
    """Real requests saturate a real engine; the simulated GPU heats with the gate's
    measured occupancy; ambient ramps 25 -> 34 -> 10 C. One tick = 2 simulated seconds.
    Returns per tick (temperature, utilisation, concurrency limit, hardware throttled)."""

    async def main() -> tuple[list[tuple[float, float, int, bool]], ThermalMonitor, Controls]:
        repo = ModelRepository(example_repo)
        scheduler = ModelScheduler(2 << 30, lambda cfg: repo.load(cfg, "cpu"))
        pool = StreamPool(PoolSettings(num_workers=3, torch_threads=1)).start()
        controls = Controls()
        gate = controls.gate_for(scheduler, 4)
        # batches of 2 images: short next to a tick even on a busy machine, long next to
        # the event loop's share of a batch, so held leases track the compute
        engine = Engine(repo, gate, pool, policy_factory=lambda c: StaticPolicy(2, 0.001, 256, workers=3))
        clock = FakeClock()
        source = SimulatedSource(gate.meter(), ThermalModel(), clock)
        monitor = ThermalMonitor(source, controls, settings, clock)
        x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
        running = True

        async def client() -> None:
            while running:
                out = await engine.infer("classifier", "1", {"image": x})
                assert out["logits"].shape == (1, 10)

        clients = [asyncio.create_task(client()) for _ in range(96)]
        trace = []
        try:
            await asyncio.sleep(0.05)
            for i in range(ticks):
                # a tick lasts 20 ms and at least 6 batches, so that batches admitted under
                # an older limit drain within a tick even on a busy machine
                done = engine.batcher("classifier", "1").batches
                await asyncio.sleep(0.02)
                for _ in range(50):
                    if engine.batcher("classifier", "1").batches - done >= 6:
                        break
                    await asyncio.sleep(0.005)
                clock.t += 2.0
                source.ambient_c = 25.0 if i < 25 else (34.0 if i < 50 else 10.0)
                st = monitor.step()
                assert st.reading.temperature_c is not None and st.reading.utilization is not None
                trace.append(
                    (st.reading.temperature_c, st.reading.utilization, gate.limit, st.reading.throttled)
                )
        finally:
            running = False
            await asyncio.gather(*clients)
            await engine.stop()
            await scheduler.close()
            pool.stop()
        return trace, monitor, controls

    return asyncio.run(main())


def test_heat_ramp_lowers_concurrency_before_throttling_and_restores_it(example_repo: Path) -> None:
    slowdown = ThermalModel().slowdown_c  # 83 C; soft limit 75 C
    trace, monitor, controls = heat_ramp(example_repo, ThermalSettings(hold_s=6.0))
    temps = [t for t, _, _, _ in trace]
    limits = [lim for _, _, lim, _ in trace]
    first = next(i for i, lim in enumerate(limits) if lim < 4)
    assert temps[first] < slowdown  # concurrency went down before the hardware limit...
    assert max(temps) < slowdown  # ...and the hardware never had to throttle
    assert not any(th for _, _, _, th in trace) and monitor.throttle_episodes == 0
    assert min(limits) < 3  # the hotter ambient needed a deeper cut
    # the real load followed the cuts: utilisation measured over an interval, by the
    # concurrency limit in force during it (set at the previous tick), once batches
    # admitted under an earlier, higher limit have drained (the limit held a tick already)
    by_limit: dict[int, list[float]] = {}
    for (_, _, before, _), (_, _, limit, _), (_, u, _, _) in zip(trace, trace[1:], trace[2:], strict=False):
        if before == limit:
            by_limit.setdefault(limit, []).append(u)
    median = {limit: float(np.median(us)) for limit, us in by_limit.items()}
    assert median[4] > 0.85
    assert median[2] < 0.6  # a batch may outlast a 20 ms tick on a busy machine: medians
    assert median[2] < median[3] < median[4]
    # cooled: everything is back
    assert limits[-1] == 4 and monitor.state.level == 0
    assert controls.global_limits.unlimited
    assert monitor.status is not None and monitor.status.concurrency_limit == 4


def test_without_mitigation_the_same_ramp_throttles(example_repo: Path) -> None:
    """The counterfactual: the same load and ambient, levels that change nothing."""
    trace, monitor, _ = heat_ramp(example_repo, ThermalSettings(levels=(ThermalLevel(),)), ticks=40)
    assert max(t for t, _, _, _ in trace) >= ThermalModel().slowdown_c
    assert monitor.throttle_episodes >= 1


def test_monitor_task_runs_and_reports() -> None:
    async def main() -> ThermalStatus | None:
        controls = Controls()
        monitor = ThermalMonitor(SimulatedSource(lambda: 0.5), controls, ThermalSettings(interval_s=0.01))
        monitor.start()
        with pytest.raises(RuntimeError):
            monitor.start()
        await asyncio.sleep(0.05)
        await monitor.stop()
        return monitor.status

    status = asyncio.run(main())
    assert status is not None and status.level == 0
    doc = status.to_status()
    assert doc["softLimitC"] == 75.0 and doc["throttled"] is False
    assert doc["utilization"] == 0.5 and doc["powerW"] == pytest.approx(165.0)
    assert doc["name"] == "simulated-gpu"
