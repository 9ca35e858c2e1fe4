"""Where temperatures come from: NVML on NVIDIA GPUs, sysfs thermal zones on Jetson-class
boards, and a simulated GPU whose heat follows the load (tests and demos).

`select_source("auto")` picks NVML when it initialises, else a sysfs zone whose type names
the GPU (GPU-therm, gpu-thermal, ...), else the simulation; "nvml", "sysfs" and "simulated"
force one (and fail loudly when it cannot work).

Every source's `read()` returns a `ThermalReading`; fields a source cannot measure are None.
`blocking` sources (NVML: a driver call, a few ms) are read off the event loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

SYSFS_THERMAL = Path("/sys/class/thermal")


@dataclass(frozen=True, slots=True)
class ThermalReading:
    """One sample of a GPU's thermal state. Units in the names; None: not measured."""

    source: str
    """'nvml', 'sysfs' or 'simulated'."""
    temperature_c: float | None
    throttled: bool = False
    """The hardware (or driver) is slowing the clocks now, for heat or power."""
    throttle_reasons: tuple[str, ...] = ()
    slowdown_c: float | None = None
    """Temperature at which the hardware starts slowing down, when the source knows it."""
    power_w: float | None = None
    sm_clock_hz: float | None = None
    max_sm_clock_hz: float | None = None
    utilization: float | None = None
    """Busy share, 0 to 1."""
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    name: str | None = None
    """GPU product name or thermal zone type."""


class ThermalSource(Protocol):
    name: str
    blocking: bool
    """True when `read()` may block for more than a few microseconds (run it in a thread)."""

    def read(self) -> ThermalReading: ...

    def close(self) -> None: ...


# --- NVML ---------------------------------------------------------------------------------

THROTTLE_REASON_BITS: tuple[tuple[int, str, bool], ...] = (
    (0x0001, "gpu_idle", False),
    (0x0002, "applications_clocks", False),
    (0x0004, "sw_power_cap", True),
    (0x0008, "hw_slowdown", True),
    (0x0010, "sync_boost", False),
    (0x0020, "sw_thermal_slowdown", True),
    (0x0040, "hw_thermal_slowdown", True),
    (0x0080, "hw_power_brake_slowdown", True),
    (0x0100, "display_clocks", False),
)
"""NVML clocks-event (throttle) reason bits: (mask, name, counts as throttling). Idle,
application clocks, sync boost and display settings lower clocks without any pressure."""


def decode_throttle_reasons(mask: int) -> tuple[tuple[str, ...], bool]:
    """(names of the reasons set in `mask`, whether any of them is real throttling)."""
    names = tuple(name for bit, name, _ in THROTTLE_REASON_BITS if mask & bit)
    throttled = any(mask & bit for bit, _, real in THROTTLE_REASON_BITS if real)
    return names, throttled


class NvmlSource:
    """An NVIDIA GPU through NVML (nvidia-ml-py). Raises at construction when NVML cannot
    initialise (no driver, no GPU) or `index` does not exist."""

    name = "nvml"
    blocking = True

    def __init__(self, index: int = 0) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            pynvml.nvmlShutdown()
            raise
        self.index = index
        raw = self._try(pynvml.nvmlDeviceGetName, self._handle)
        self.gpu_name = raw.decode() if isinstance(raw, bytes) else raw
        self.slowdown_c = self._try(
            pynvml.nvmlDeviceGetTemperatureThreshold,
            self._handle,
            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
        )
        max_mhz = self._try(pynvml.nvmlDeviceGetMaxClockInfo, self._handle, pynvml.NVML_CLOCK_SM)
        self.max_sm_clock_hz = None if max_mhz is None else float(max_mhz) * 1e6
        reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        self._reasons = reasons or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        self._closed = False

    def _try(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), or None when NVML says the device does not support it."""
        try:
            return fn(*args)
        except self._nvml.NVMLError as e:
            log.debug("nvml: %s unavailable: %s", getattr(fn, "__name__", fn), e)
            return None

    def read(self) -> ThermalReading:
        nvml, h = self._nvml, self._handle
        temp = self._try(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU)
        mask = self._try(self._reasons, h)
        names, throttled = decode_throttle_reasons(int(mask)) if mask is not None else ((), False)
        power_mw = self._try(nvml.nvmlDeviceGetPowerUsage, h)
        clock_mhz = self._try(nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_SM)
        util = self._try(nvml.nvmlDeviceGetUtilizationRates, h)
        memory = self._try(nvml.nvmlDeviceGetMemoryInfo, h)
        return ThermalReading(
            source=self.name,
            temperature_c=None if temp is None else float(temp),
            throttled=throttled,
            throttle_reasons=names,
            slowdown_c=None if self.slowdown_c is None else float(self.slowdown_c),
            power_w=None if power_mw is None else power_mw / 1000.0,
            sm_clock_hz=None if clock_mhz is None else float(clock_mhz) * 1e6,
            max_sm_clock_hz=self.max_sm_clock_hz,
            utilization=None if util is None else util.gpu / 100.0,
            memory_total_bytes=None if memory is None else int(memory.total),
            memory_used_bytes=None if memory is None else int(memory.used),
            name=self.gpu_name,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._try(self._nvml.nvmlShutdown)


# --- sysfs thermal zones ------------------------------------------------------------------


def find_gpu_zone(root: Path = SYSFS_THERMAL, match: tuple[str, ...] = ("gpu",)) -> Path | None:
    """The first thermal zone under `root` whose `type` contains one of `match` (any case)."""
    try:
        zones = sorted(root.glob("thermal_zone*"), key=lambda p: _zone_number(p.name))
    except OSError:
        return None
    for zone in zones:
        try:
            kind = (zone / "type").read_text().strip().lower()
        except OSError:
            continue
        if any(m in kind for m in match) and (zone / "temp").exists():
            return zone
    return None


def _zone_number(name: str) -> int:
    digits = name.removeprefix("thermal_zone")
    return int(digits) if digits.isdigit() else 1 << 30


class SysfsSource:
    """A Linux thermal zone (`/sys/class/thermal/thermal_zoneN`): `temp` in millidegrees.

    The lowest `passive` trip point, when the zone has one, is where the kernel's thermal
    governor starts throttling: it is reported as `slowdown_c`, and a reading at or above it
    as throttled (reason 'passive_trip'). Raises `FileNotFoundError` when no zone matches.
    """

    name = "sysfs"
    blocking = False

    def __init__(self, zone: Path | None = None, root: Path = SYSFS_THERMAL) -> None:
        if zone is None:
            zone = find_gpu_zone(root)
            if zone is None:
                raise FileNotFoundError(f"no GPU thermal zone under {root}")
        if not (zone / "temp").is_file():
            raise FileNotFoundError(f"{zone / 'temp'} does not exist")
        self.zone = zone
        try:
            self.zone_type = (zone / "type").read_text().strip()
        except OSError:
            self.zone_type = zone.name
        self.slowdown_c = self._passive_trip_c()

    def _passive_trip_c(self) -> float | None:
        trips = []
        for type_file in self.zone.glob("trip_point_*_type"):
            try:
                if type_file.read_text().strip() != "passive":
                    continue
                temp_file = type_file.with_name(type_file.name.replace("_type", "_temp"))
                trips.append(int(temp_file.read_text().strip()) / 1000.0)
            except (OSError, ValueError):
                continue
        return min(trips) if trips else None

    def read(self) -> ThermalReading:
        try:
            temp: float | None = int((self.zone / "temp").read_text().strip()) / 1000.0
        except (OSError, ValueError) as e:  # some zones return EINVAL/EAGAIN while asleep
            log.debug("sysfs: %s unreadable: %s", self.zone, e)
            temp = None
        hot = temp is not None and self.slowdown_c is not None and temp >= self.slowdown_c
        return ThermalReading(
            source=self.name,
            temperature_c=temp,
            throttled=hot,
            throttle_reasons=("passive_trip",) if hot else (),
            slowdown_c=self.slowdown_c,
            name=self.zone_type,
        )

    def close(self) -> None:
        pass


# --- simulation ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThermalModel:
    """A first-order thermal model: dT/dt = (P(load) * R - (T - T_ambient)) / tau.

    Defaults: a 300 W board at 0.2 K/W settles 60 K above ambient at full load (85 C at
    25 C ambient, past its 83 C slowdown), 6 K at idle; tau 30 s.
    """

    ambient_c: float = 25.0
    idle_w: float = 30.0
    max_w: float = 300.0
    r_k_per_w: float = 0.2
    """Thermal resistance, junction to ambient."""
    tau_s: float = 30.0
    """Time constant: 63 % of a step's effect after tau_s."""
    slowdown_c: float = 83.0
    """The simulated hardware slows its clocks at this temperature..."""
    slowdown_release_c: float = 78.0
    """...until it cools below this one."""
    slowdown_clock_factor: float = 0.6
    """Clock (hence dynamic power) while slowed down."""
    clock_hz: float = 1.5e9

    def __post_init__(self) -> None:
        if not (self.tau_s > 0 and self.r_k_per_w > 0 and 0 <= self.idle_w <= self.max_w):
            raise ValueError("need tau_s > 0, r_k_per_w > 0, 0 <= idle_w <= max_w")
        if not self.slowdown_release_c < self.slowdown_c:
            raise ValueError("slowdown_release_c must be below slowdown_c")
        if not 0 < self.slowdown_clock_factor <= 1:
            raise ValueError("slowdown_clock_factor must be in (0, 1]")

    def power_w(self, load: float, clock_factor: float = 1.0) -> float:
        return self.idle_w + (self.max_w - self.idle_w) * load * clock_factor

    def advance(self, temp_c: float, power_w: float, ambient_c: float, dt_s: float) -> float:
        """Temperature after `dt_s` at constant power (the ODE's exact solution)."""
        steady = ambient_c + power_w * self.r_k_per_w
        return steady + (temp_c - steady) * math.exp(-dt_s / self.tau_s)


class SimulatedSource:
    """A GPU whose heat follows `load()` (0 to 1, e.g. `ConcurrencyGate.meter()`).

    Each `read()` advances the model from the previous read to now (the passed-in clock),
    taking the load returned now as the mean over that interval, which is what a meter
    returns. `ambient_c` may be changed between reads (heat ramps in tests and demos).
    Hardware slowdown is simulated with hysteresis (reason 'simulated').
    """

    name = "simulated"
    blocking = False

    def __init__(
        self,
        load: Callable[[], float],
        model: ThermalModel | None = None,
        clock: Callable[[], float] = time.monotonic,
        start_c: float | None = None,
    ) -> None:
        self.model = model or ThermalModel()
        self.ambient_c = self.model.ambient_c
        self._load = load
        self._clock = clock
        self._last_s = clock()
        self.temperature_c = self.model.ambient_c if start_c is None else start_c
        self.slowed = False
        self.power_w = self.model.power_w(0.0)
        self.load = 0.0

    def read(self) -> ThermalReading:
        m = self.model
        now = self._clock()
        dt = max(0.0, now - self._last_s)
        self._last_s = now
        self.load = min(1.0, max(0.0, float(self._load())))
        factor = m.slowdown_clock_factor if self.slowed else 1.0
        self.power_w = m.power_w(self.load, factor)
        if dt > 0:
            self.temperature_c = m.advance(self.temperature_c, self.power_w, self.ambient_c, dt)
        if self.slowed and self.temperature_c < m.slowdown_release_c:
            self.slowed = False
        elif not self.slowed and self.temperature_c >= m.slowdown_c:
            self.slowed = True
        clock = m.clock_hz * (m.slowdown_clock_factor if self.slowed else 1.0)
        return ThermalReading(
            source=self.name,
            temperature_c=self.temperature_c,
            throttled=self.slowed,
            throttle_reasons=("simulated",) if self.slowed else (),
            slowdown_c=m.slowdown_c,
            power_w=self.power_w,
            sm_clock_hz=clock,
            max_sm_clock_hz=m.clock_hz,
            utilization=self.load,
            name="simulated-gpu",
        )

    def close(self) -> None:
        pass


# --- choosing -----------------------------------------------------------------------------

SOURCE_KINDS = ("auto", "nvml", "sysfs", "simulated")


def detect_source(gpu_index: int = 0, sysfs_root: Path = SYSFS_THERMAL) -> ThermalSource | None:
    """A real sensor: NVML if it initialises, else a sysfs GPU zone, else None."""
    try:
        return NvmlSource(gpu_index)
    except Exception as e:  # no driver, no library, no device: all mean "not NVML"
        log.info("thermal: NVML unavailable (%s); trying sysfs", e)
    zone = find_gpu_zone(sysfs_root)
    if zone is not None:
        return SysfsSource(zone)
    log.info("thermal: no GPU thermal zone under %s", sysfs_root)
    return None


def select_source(
    kind: str = "auto",
    *,
    gpu_index: int = 0,
    sysfs_root: Path = SYSFS_THERMAL,
    load: Callable[[], float] | None = None,
    model: ThermalModel | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ThermalSource:
    """The thermal source `kind` names; "auto": a real sensor (`detect_source`), else the
    simulation (heated by `load`, idle without one)."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown thermal source {kind!r}; expected one of {', '.join(SOURCE_KINDS)}")
    if kind == "nvml":
        return NvmlSource(gpu_index)
    if kind == "sysfs":
        return SysfsSource(root=sysfs_root)
    if kind == "auto":
        found = detect_source(gpu_index, sysfs_root)
        if found is not None:
            return found
        log.info("thermal: using the simulated source")
    return SimulatedSource(load or (lambda: 0.0), model, clock)
