"""Thermal monitor: above a soft limit, lower concurrency and batch size before the
hardware throttles; report throttling; recover with hysteresis.

Policy (`thermal_step`, pure): the temperature, smoothed into a trend, is projected
`lookahead_s` ahead; level k (1..top) is wanted once the projection reaches
soft_limit + (k - 1) * step_c, and is entered at once (heat does not wait). Level k is
left (one level at a time) only when the measured temperature is below
soft_limit + (k - 1) * step_c - hysteresis_c and both the level and the end of any
hardware throttling are at least `hold_s` old. Hardware throttling the policy did not foresee (a power cap,
a hot room) raises the level by one per `escalate_interval_s` while it lasts.

Each level is a `ThermalLevel`: the share of the concurrency gate's slots in use at once
and of every model's planned batch size; the monitor applies it through `Controls`
(`set_concurrency_fraction`, `set_global_limits`).

The soft limit: `ThermalSettings.soft_limit_c` when given; else `soft_margin_c` below the
hardware slowdown temperature the source reports (NVML's slowdown threshold, a sysfs
passive trip point, the simulation's); else `default_soft_limit_c`.

Sources (NVML, sysfs, simulated) live in `node_agent.control.thermal_sources`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node_agent.control.mitigation import Controls, Limits
from node_agent.control.periodic import Periodic
from node_agent.control.thermal_sources import ThermalReading, ThermalSource

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ThermalLevel:
    """What one mitigation level allows, as shares of the unmitigated figures."""

    concurrency_fraction: float = 1.0
    batch_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not (0 < self.concurrency_fraction <= 1 and 0 < self.batch_fraction <= 1):
            raise ValueError("concurrency_fraction and batch_fraction must be in (0, 1]")


DEFAULT_THERMAL_LEVELS: tuple[ThermalLevel, ...] = (
    ThermalLevel(1.0, 1.0),
    ThermalLevel(0.75, 0.75),
    ThermalLevel(0.5, 0.5),
    ThermalLevel(0.25, 0.25),
)


@dataclass(frozen=True, slots=True)
class ThermalSettings:
    """Thermal policy knobs; temperatures in degrees Celsius."""

    soft_limit_c: float | None = None
    """Where mitigation starts; None: `soft_margin_c` below the hardware slowdown."""
    soft_margin_c: float = 8.0
    """Below the slowdown threshold: room for a few seconds of a full-load rise (about
    2 K/s on a small board) while lowered concurrency takes effect."""
    default_soft_limit_c: float = 75.0
    """When neither is known (a sysfs zone without passive trips)."""
    step_c: float = 3.0
    """Each further `step_c` above the soft limit is one more level."""
    hysteresis_c: float = 3.0
    """A level is left only this far below where it was entered."""
    hold_s: float = 10.0
    """Least time at a level before easing it: lets the die and heatsink settle."""
    escalate_interval_s: float = 2.0
    """Least time between escalations caused by reported hardware throttling."""
    lookahead_s: float = 5.0
    """How far ahead the temperature trend is projected when deciding to escalate."""
    trend_smoothing: float = 0.5
    """Weight of the newest slope in the trend (exponential smoothing, 0 to 1)."""
    interval_s: float = 1.0
    """How often `run()` samples the source."""
    levels: tuple[ThermalLevel, ...] = DEFAULT_THERMAL_LEVELS
    """levels[0] is unmitigated."""

    def __post_init__(self) -> None:
        if not (self.step_c > 0 and self.hysteresis_c >= 0 and self.soft_margin_c >= 0):
            raise ValueError("need step_c > 0, hysteresis_c >= 0, soft_margin_c >= 0")
        if not (self.hold_s >= 0 and self.escalate_interval_s >= 0 and self.lookahead_s >= 0):
            raise ValueError("hold_s, escalate_interval_s and lookahead_s must be >= 0")
        if not (0 < self.trend_smoothing <= 1 and self.interval_s > 0):
            raise ValueError("need 0 < trend_smoothing <= 1 and interval_s > 0")
        if not self.levels:
            raise ValueError("levels must hold at least level 0")

    def soft_limit_for(self, reading: ThermalReading) -> float:
        if self.soft_limit_c is not None:
            return self.soft_limit_c
        if reading.slowdown_c is not None:
            return reading.slowdown_c - self.soft_margin_c
        return self.default_soft_limit_c


@dataclass(frozen=True, slots=True)
class ThermalState:
    """The policy's memory between samples."""

    level: int = 0
    changed_at_s: float = -math.inf
    last_temp_c: float | None = None
    last_at_s: float | None = None
    trend_c_per_s: float = 0.0
    throttled_at_s: float = -math.inf
    """When the hardware was last seen throttling."""


def thermal_step(
    state: ThermalState,
    temp_c: float,
    hw_throttled: bool,
    now_s: float,
    soft_limit_c: float,
    settings: ThermalSettings,
) -> ThermalState:
    """The next thermal state (pure; see the module docstring).
    Invariant: 0 <= level <= len(settings.levels) - 1; level changes by at most one step
    down per call."""
    s = settings
    trend = state.trend_c_per_s
    if state.last_temp_c is not None and state.last_at_s is not None and now_s > state.last_at_s:
        slope = (temp_c - state.last_temp_c) / (now_s - state.last_at_s)
        trend = s.trend_smoothing * slope + (1.0 - s.trend_smoothing) * trend
    projected = temp_c + max(0.0, trend) * s.lookahead_s
    top = len(s.levels) - 1
    want = 0
    if projected >= soft_limit_c:
        want = min(top, 1 + math.floor((projected - soft_limit_c) / s.step_c))
    level, changed = state.level, state.changed_at_s
    throttled_at = now_s if hw_throttled else state.throttled_at_s
    if hw_throttled and level < top and now_s - changed >= s.escalate_interval_s:
        want = max(want, level + 1)
    if want > level:
        level, changed = want, now_s
    elif level > 0 and want < level and now_s - max(changed, throttled_at) >= s.hold_s:
        exit_c = soft_limit_c + (level - 1) * s.step_c - s.hysteresis_c
        if temp_c < exit_c:
            level, changed = level - 1, now_s
    return ThermalState(level, changed, temp_c, now_s, trend, throttled_at)


@dataclass(frozen=True, slots=True)
class ThermalStatus:
    """The monitor's view after a sample."""

    reading: ThermalReading
    soft_limit_c: float
    level: int
    concurrency_limit: int | None
    """Slots the concurrency gate allows now (None without a gate)."""
    batch_fraction: float

    @property
    def mitigating(self) -> bool:
        return self.level > 0

    def to_status(self) -> dict[str, Any]:
        """The thermal part of EdgeNode.status `gpu` (camelCase; fields measured only)."""
        r = self.reading
        out: dict[str, Any] = {"softLimitC": round(self.soft_limit_c, 2), "throttled": r.throttled}
        if r.temperature_c is not None:
            out["temperatureC"] = round(r.temperature_c, 2)
        if r.throttle_reasons:
            out["throttleReasons"] = list(r.throttle_reasons)
        if r.power_w is not None:
            out["powerW"] = round(r.power_w, 2)
        if r.utilization is not None:
            out["utilization"] = round(r.utilization, 4)
        if r.memory_total_bytes is not None:
            out["memoryTotalBytes"] = r.memory_total_bytes
        if r.memory_used_bytes is not None:
            out["memoryUsedBytes"] = r.memory_used_bytes
            if r.memory_total_bytes is not None:
                out["memoryFreeBytes"] = max(0, r.memory_total_bytes - r.memory_used_bytes)
        if r.name:
            out["name"] = r.name
        return out


class ThermalMonitor:
    """Samples a `ThermalSource`, runs `thermal_step`, applies the level through `Controls`.

    Use on one event loop: `start()`/`stop()` the sampling task, or call `step()` yourself
    (tests, with a fake clock). Counters: `throttle_episodes` (hardware throttling began),
    `level_changes`.
    """

    def __init__(
        self,
        source: ThermalSource,
        controls: Controls,
        settings: ThermalSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.controls = controls
        self.settings = settings or ThermalSettings()
        self._clock = clock
        self.state = ThermalState()
        self.status: ThermalStatus | None = None
        self.throttle_episodes = 0
        self.level_changes = 0
        self._was_throttled = False
        self._periodic = Periodic("thermal-monitor", lambda: self.settings.interval_s, self.tick)

    def step(self, now_s: float | None = None) -> ThermalStatus:
        """Read the source (blocking), decide, apply; the new status."""
        return self.apply(self.source.read(), now_s)

    def apply(self, reading: ThermalReading, now_s: float | None = None) -> ThermalStatus:
        """Decide and apply on a reading taken elsewhere (e.g. in a thread)."""
        now = self._clock() if now_s is None else now_s
        s = self.settings
        soft = s.soft_limit_for(reading)
        before = self.state.level
        if reading.temperature_c is not None:
            self.state = thermal_step(self.state, reading.temperature_c, reading.throttled, now, soft, s)
        else:
            log.debug("thermal: %s gave no temperature; holding level %d", reading.source, before)
        if reading.throttled and not self._was_throttled:
            self.throttle_episodes += 1
            log.warning(
                "thermal: GPU throttling (%s) at %s C",
                ", ".join(reading.throttle_reasons) or "unknown",
                reading.temperature_c,
            )
        self._was_throttled = reading.throttled
        level = s.levels[self.state.level]
        if self.state.level != before:
            self.level_changes += 1
            log.warning(
                "thermal: level %d -> %d at %.1f C (soft limit %.1f C)",
                before,
                self.state.level,
                reading.temperature_c or math.nan,
                soft,
            )
        self.controls.set_global_limits(Limits(batch_fraction=level.batch_fraction))
        limit = self.controls.set_concurrency_fraction(level.concurrency_fraction)
        self.status = ThermalStatus(reading, soft, self.state.level, limit, level.batch_fraction)
        return self.status

    async def tick(self) -> ThermalStatus:
        """One sample; a blocking source is read in a worker thread."""
        if self.source.blocking:
            reading = await asyncio.to_thread(self.source.read)
        else:
            reading = self.source.read()
        return self.apply(reading)

    async def run(self) -> None:
        """Sample every `interval_s` until cancelled."""
        await self._periodic.run()

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        """Stop sampling and close the source."""
        await self._periodic.stop()
        self.source.close()
