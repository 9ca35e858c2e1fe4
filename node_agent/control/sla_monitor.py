"""SLA monitor: per model version, sliding windows of latency, throughput and errors;
mitigation when the SLA is missed, recovery (with hysteresis) when it is met again.

Data in (through hooks the engine already has; nothing is added to the batcher):
- every finished batch, from `LimitedPolicy.observe` (see `node_agent.control.mitigation`): its
  end time, rows, service time and the latencies of the requests it completed. Queue time
  of a request = its latency - the batch's service time; compute time = service time;
- failures, deadline drops and refusals, read as counter deltas from the model's batcher
  on every `tick` (`OutcomeCounters`: `failed`, `expired`, `refused`, `displaced`).

Windows (`node_agent.control.sla_windows.ModelStats`): rings of time slots holding bounded-memory
sketches, merged on read. Two per model: the reporting window (`SlaObjectives.window_s`, 60 s by
default) that EdgeNode.status carries and the operator reads, and a short control window
(`SlaSettings.control_window_s`, 1 s slots) that drives mitigation.

Verdicts (`judge`, pure): a window "met" its SLA when every objective given holds:
p95/p99 latency <= target, error rate <= max, throughput >= min; None when the window holds
fewer than `min_requests` requests or the model has no objectives. Requests = completed +
failed + expired; errors = failed (the model raised) + expired (deadline drops: the request
was late). Refusals (admission control, shedding) are reported, not counted as requests:
shedding is the mitigation and must not look like the failure it prevents.

Mitigation (`next_mitigation`, pure): a control window that violates a latency objective, or
the error objective with deadline drops making up at least half of its errors, raises the
model's level by one (at most every `escalate_interval_s`, so each step's effect is seen
first); a control window healthy with margin (every objective within `healthy_fraction` of
its target, or too little traffic to tell) for `recover_after_s` lowers it by one. Between
the two, the level holds. Each level is a `Limits` (smaller batches, shorter delay, tighter
queue bound, then shedding the low and then the normal priority class) set on `Controls`.
Failing models (errors that are not deadline drops) and missed throughput are reported, not
mitigated: smaller batches do not fix a broken model, nor raise a demand-limited throughput.

Counters (`counters`): per model version, cumulative counts since the monitor (the agent)
started, as EdgeNode.status `models[].counters` carries them (`edgefleet_api.edge_node.
ModelCounters`, whose docstring is the contract): requests (completed + failed + expired),
errors (failed + expired), slow (completed requests slower than the SLO latency: the p99
objective, else the p95 one; `slo_latency_s`). Counted where the windows are: completed and
slow when batches are folded in (off the hot path: a batch's worker only appends it), failed
and expired from the batchers' counters at each tick. Refusals are not counted (see above).
`epoch` (random, one per monitor, so one per agent start) tells a restarted agent's counts,
begun again at 0, from the same agent's. The counts of a tick's report are read at that tick.

Clocks: monotonic (`time.monotonic`, the batcher's clock); tests pass a fake one.
"""

from __future__ import annotations

import enum
import logging
import math
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from edgefleet_api.edge_node import ModelCounters
from edgefleet_api.sla import SlaObjectives, SlaWindow
from edgefleet_api.types import ModelId, Priority
from node_agent.control.mitigation import NO_LIMITS, Controls, LimitedPolicy, Limits
from node_agent.control.periodic import Periodic
from node_agent.control.sketch import DEFAULT_MAPPING, LogMapping
from node_agent.control.sla_windows import (
    BATCH_ROWS_BUCKETS,
    LATENCY_BUCKETS_S,
    ModelStats,
    Totals,
    WindowStats,
)
from node_agent.runtime.batching_policy import policy_for
from node_agent.types import ModelConfig

if TYPE_CHECKING:
    from node_agent.runtime.batching_policy import BatchingPolicy

log = logging.getLogger(__name__)

P95, P99, ERROR_RATE, THROUGHPUT = "p95_latency", "p99_latency", "error_rate", "throughput"
"""Objective names (labels of violations and metrics)."""

DEFAULT_LEVELS: tuple[Limits, ...] = (
    Limits(),
    Limits(batch_fraction=0.75, delay_fraction=0.5, queue_fraction=0.75),
    Limits(batch_fraction=0.5, delay_fraction=0.25, queue_fraction=0.5,
           lowest_admitted=Priority.NORMAL),
    Limits(batch_fraction=0.25, delay_fraction=0.0, queue_fraction=0.25,
           lowest_admitted=Priority.HIGH),
)  # fmt: skip
"""Mitigation levels: 0 none; 1 shorter delay, smaller batches, tighter queue; 2 halved, low
priority shed; 3 quartered, no queue delay, only high and critical admitted."""


# --- the SLA and what is measured against it ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """One objective judged: ok None when it could not be judged (no data)."""

    objective: str
    measured: float | None
    target: float
    ok: bool | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """A window judged against an SLA. met: None when too few requests or no objectives."""

    met: bool | None
    checks: tuple[Check, ...] = ()

    @property
    def violated(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.ok is False)


def judge(stats: WindowStats, spec: SlaObjectives, *, min_requests: int, scale: float = 1.0) -> Verdict:
    """Judge a window against `spec` (pure). `scale` < 1 tightens latency and error targets
    (the "healthy with margin" test of recovery); throughput is judged as given."""
    if not spec.has_objectives or stats.requests < min_requests:
        return Verdict(None)
    checks: list[Check] = []

    def upper(objective: str, measured: float | None, target: float) -> None:
        checks.append(Check(objective, measured, target, None if measured is None else measured <= target))

    if spec.p95_latency_s is not None:
        upper(P95, stats.p95_s, spec.p95_latency_s * scale)
    if spec.p99_latency_s is not None:
        upper(P99, stats.p99_s, spec.p99_latency_s * scale)
    if spec.max_error_rate is not None:
        upper(ERROR_RATE, stats.error_rate, spec.max_error_rate * scale)
    if spec.min_throughput_rps is not None:
        tp = stats.throughput_rps
        checks.append(Check(THROUGHPUT, tp, spec.min_throughput_rps, tp >= spec.min_throughput_rps))
    judged = [c.ok for c in checks if c.ok is not None]
    return Verdict(all(judged) if judged else None, tuple(checks))


def objectives_of(spec: SlaObjectives) -> tuple[str, ...]:
    """The names of the objectives `spec` sets (the `objective` label of violation counts)."""
    given = (
        (P95, spec.p95_latency_s),
        (P99, spec.p99_latency_s),
        (ERROR_RATE, spec.max_error_rate),
        (THROUGHPUT, spec.min_throughput_rps),
    )
    return tuple(name for name, value in given if value is not None)


def slo_latency_s(spec: SlaObjectives) -> float | None:
    """The latency past which a request counts as slow: the p99 objective, else the p95 one
    (None: neither is set)."""
    return spec.p99_latency_s if spec.p99_latency_s is not None else spec.p95_latency_s


def new_epoch() -> str:
    """A fresh epoch: the wall clock in nanoseconds (hex) and 32 random bits, so two starts
    differ even on a node whose clock went back."""
    return f"{time.time_ns():x}-{secrets.token_hex(4)}"


def counters_of(totals: Totals, epoch: str) -> ModelCounters:
    """EdgeNode.status `models[].counters` from a model version's lifetime totals (pure)."""
    return ModelCounters(epoch, totals.requests, totals.errors, totals.slow, totals.slow_threshold_s)


# --- mitigation: pure decision -----------------------------------------------------------


class Pressure(enum.Enum):
    """What the control window says about load-related objectives."""

    VIOLATED = "violated"
    BETWEEN = "between"
    """Within the SLA but not with margin: hold the level."""
    HEALTHY = "healthy"
    """Within `healthy_fraction` of every target, or too little traffic to tell."""


def pressure_of(control: WindowStats, spec: SlaObjectives, settings: SlaSettings) -> Pressure:
    """Pressure from the control window (pure): latency objectives, and the error objective
    when deadline drops are at least half of the errors (a load symptom, unlike failures)."""
    strict = judge(control, spec, min_requests=settings.min_control_requests)
    for c in strict.violated:
        if c.objective in (P95, P99):
            return Pressure.VIOLATED
        if c.objective == ERROR_RATE and control.expired * 2 >= control.errors:
            return Pressure.VIOLATED
    margin = judge(control, spec, min_requests=settings.min_control_requests, scale=settings.healthy_fraction)
    for c in margin.violated:
        if c.objective in (P95, P99) or (c.objective == ERROR_RATE and control.expired * 2 >= control.errors):
            return Pressure.BETWEEN
    return Pressure.HEALTHY


@dataclass(frozen=True, slots=True)
class MitigationState:
    """A model's mitigation level and the times its hysteresis needs."""

    level: int = 0
    changed_at_s: float = -math.inf
    healthy_since_s: float | None = None


def next_mitigation(
    state: MitigationState, pressure: Pressure, now_s: float, settings: SlaSettings
) -> MitigationState:
    """The next mitigation state (pure): one level up under pressure (at most every
    `escalate_interval_s`), one down after `recover_after_s` of health since the last change
    and since health began; otherwise hold. 0 <= level <= len(settings.levels) - 1."""
    top = len(settings.levels) - 1
    if pressure is Pressure.VIOLATED:
        if state.level < top and now_s - state.changed_at_s >= settings.escalate_interval_s:
            return MitigationState(state.level + 1, now_s, None)
        return replace(state, healthy_since_s=None)
    if pressure is Pressure.BETWEEN:
        return replace(state, healthy_since_s=None) if state.healthy_since_s is not None else state
    since = state.healthy_since_s if state.healthy_since_s is not None else now_s
    wait = settings.recover_after_s
    if state.level > 0 and now_s - since >= wait and now_s - state.changed_at_s >= wait:
        return MitigationState(state.level - 1, now_s, now_s)
    return state if state.healthy_since_s == since else replace(state, healthy_since_s=since)


@dataclass(frozen=True, slots=True)
class SlaSettings:
    """SLA monitor knobs; validated once."""

    interval_s: float = 1.0
    """How often `run()` ticks: the slot width of the control window."""
    control_window_s: float = 10.0
    """Window that drives mitigation: short, so a step's effect shows within seconds, long
    enough to hold a p99's worth of requests at tens of requests per second."""
    min_requests: int = 20
    """Requests a reporting window needs for a verdict (fewer: met is None)."""
    min_control_requests: int = 20
    """Requests the control window needs before it may raise a mitigation level."""
    healthy_fraction: float = 0.8
    """Recovery needs every mitigated objective within this share of its target."""
    escalate_interval_s: float = 3.0
    """Least time between two escalations: a level's effect reaches the control window first."""
    recover_after_s: float = 15.0
    """Healthy time (and time since the last change) before easing one level."""
    report_slots: int = 60
    """Slots of the reporting window: memory per model is bounded by this, whatever window_s."""
    levels: tuple[Limits, ...] = DEFAULT_LEVELS
    """Limits per mitigation level; levels[0] should be no limits."""
    mapping: LogMapping = DEFAULT_MAPPING
    """Latency sketch mapping (relative error 1 %, 10 us to 10,000 s)."""
    latency_buckets_s: tuple[float, ...] = LATENCY_BUCKETS_S
    batch_rows_buckets: tuple[float, ...] = BATCH_ROWS_BUCKETS
    max_violations_kept: int = 256
    """Recent violations kept for reports (the counters keep counting)."""

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and self.control_window_s >= self.interval_s):
            raise ValueError("need interval_s > 0 and control_window_s >= interval_s")
        if self.min_requests < 1 or self.min_control_requests < 1:
            raise ValueError("min_requests and min_control_requests must be >= 1")
        if not 0 < self.healthy_fraction <= 1:
            raise ValueError(f"healthy_fraction must be in (0, 1], got {self.healthy_fraction!r}")
        if self.escalate_interval_s < 0 or self.recover_after_s < 0:
            raise ValueError("escalate_interval_s and recover_after_s must be >= 0")
        if self.report_slots < 1 or self.max_violations_kept < 1:
            raise ValueError("report_slots and max_violations_kept must be >= 1")
        if not self.levels:
            raise ValueError("levels must hold at least level 0")


class OutcomeCounters(Protocol):
    """Counters of a model's batcher the monitor reads (monotone, requests)."""

    @property
    def failed(self) -> int: ...

    @property
    def expired(self) -> int: ...

    @property
    def refused(self) -> int: ...

    @property
    def displaced(self) -> int: ...


# --- the clocked monitor -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Violation:
    """An objective that started being missed in the control window."""

    model_id: ModelId
    objective: str
    measured: float | None
    target: float
    at_s: float
    level: int
    """Mitigation level after this tick's decision."""


@dataclass(frozen=True, slots=True)
class ModelReport:
    """A model version's SLA state after a tick."""

    model_id: ModelId
    spec: SlaObjectives
    window: WindowStats
    verdict: Verdict
    """The reporting window judged: `verdict.met` is what EdgeNode.status carries."""
    control: WindowStats
    pressure: Pressure
    level: int
    limits: Limits
    counters: ModelCounters | None = None
    """Cumulative counts read at this tick (`SlaMonitor.counters`)."""

    def sla_window(self) -> SlaWindow:
        """The reporting window as EdgeNode.status `models[].sla` carries it."""
        w = self.window
        return SlaWindow(
            p50_latency_s=w.p50_s,
            p95_latency_s=w.p95_s,
            p99_latency_s=w.p99_s,
            throughput_rps=w.throughput_rps,
            error_rate=w.error_rate,
            requests=w.requests,
            window_s=round(self.spec.window_s),
            met=self.verdict.met,
        )


@dataclass(slots=True)
class _Tracked:
    spec: SlaObjectives
    stats: ModelStats
    state: MitigationState = field(default_factory=MitigationState)
    seen: tuple[int, int, int] = (0, 0, 0)
    """Counter values (failed, expired, refused + displaced) at the last tick."""
    violating: set[str] = field(default_factory=set)
    report: ModelReport | None = None


CountersSource = Callable[[ModelId], OutcomeCounters | None]
ConfigLookup = Callable[[str, str], ModelConfig]
"""(name, version) -> the model version's current config (the engine's config source)."""


class SlaMonitor:
    """Measures every tracked model version, judges its windows, mitigates; see the module
    docstring. Use on one event loop; `start()`/`stop()` the ticking task explicitly, or
    call `tick()` yourself (tests, with a fake clock).

    Wiring: `Engine(..., policy_factory=monitor.policy_factory(workers=pool.num_workers))`
    tracks each model version when its batcher is made; `attach(lambda m:
    engine.batcher(m.name, m.version))` lets ticks read the batchers' failure counters.
    """

    def __init__(
        self,
        controls: Controls | None = None,
        settings: SlaSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        epoch: str | None = None,
    ) -> None:
        self.controls = controls if controls is not None else Controls()
        self.settings = settings or SlaSettings()
        self._clock = clock
        self.epoch = epoch or new_epoch()
        """Reported with every model's counters; differs between two monitors (agent starts)."""
        self._models: dict[ModelId, _Tracked] = {}
        self._retired: dict[ModelId, tuple[Totals, tuple[int, int, int]]] = {}
        """Lifetime counts of forgotten model versions and their batchers' counters as last
        read: tracked again, they go on from there."""
        self._counters: CountersSource | None = None
        self._configs: ConfigLookup | None = None
        self.violations: deque[Violation] = deque(maxlen=self.settings.max_violations_kept)
        """The most recent violations (oldest first)."""
        self.violation_counts: Counter[tuple[ModelId, str]] = Counter()
        """(model, objective) -> violation episodes since start."""
        self._periodic = Periodic("sla-monitor", lambda: self.settings.interval_s, self.tick)

    # --- wiring -------------------------------------------------------------

    def policy_factory(
        self,
        *,
        workers: int = 1,
        max_queue_rows: int = 4096,
        base: Callable[[ModelConfig], BatchingPolicy] | None = None,
    ) -> Callable[[ModelConfig], LimitedPolicy]:
        """An engine `policy_factory`: `base(config)` (default: `policy_for` with these
        workers and queue cap, as the engine would) wrapped in a `LimitedPolicy` that obeys
        the controls and records into this monitor."""

        def factory(config: ModelConfig) -> LimitedPolicy:
            if base is not None:
                inner = base(config)
            else:
                inner = policy_for(config, workers=workers, max_queue_rows=max_queue_rows)
            stats = self.track(config)
            return self.controls.wrap(config.id, inner, stats)

        return factory

    def attach(self, counters: CountersSource, configs: ConfigLookup | None = None) -> None:
        """Where ticks read each model's outcome counters (usually its batcher) and, when
        given, its current config: an SLA changed there (e.g. the InferenceService's, through
        EdgeNode.spec) replaces the tracked one on the next tick."""
        self._counters = counters
        self._configs = configs

    def track(self, config: ModelConfig, spec: SlaObjectives | None = None) -> ModelStats:
        """Start measuring a model version (idempotent); its SLA from its config unless
        `spec` is given."""
        tracked = self._models.get(config.id)
        if tracked is None:
            spec = spec if spec is not None else config.sla
            # Buckets end at the SLO latencies as first tracked (a later SLO change keeps them:
            # Prometheus series keep their `le`; the base grid stays within 25% of any other).
            slos = (spec.p95_latency_s, spec.p99_latency_s)
            stats = ModelStats(config.id, spec.window_s, self.settings, self._clock(), objectives_s=slos)
            stats.set_slow_threshold(slo_latency_s(spec))
            tracked = _Tracked(spec, stats)
            retired = self._retired.pop(config.id, None)
            if retired is not None:  # go on from its counts, and from its batcher's counters
                stats.add_totals(retired[0])
                tracked.seen = retired[1]
            self._models[config.id] = tracked
        elif spec is not None:
            self.set_spec(config.id, spec)
        return tracked.stats

    def set_spec(self, model_id: ModelId, spec: SlaObjectives) -> None:
        """Replace a tracked model's SLA (e.g. from the InferenceService via EdgeNode.spec);
        a new window length starts an empty reporting window."""
        tracked = self._tracked(model_id)
        tracked.spec = spec
        tracked.stats.set_window(spec.window_s)
        tracked.stats.set_slow_threshold(slo_latency_s(spec))

    def forget(self, model_id: ModelId) -> None:
        """Stop tracking a model version and lift its limits. Its lifetime counts are kept (a
        few integers), so if it is tracked again its counters go on from them within the epoch."""
        tracked = self._models.pop(model_id, None)
        if tracked is not None:
            self._retired[model_id] = (tracked.stats.totals(), tracked.seen)
            self.controls.set_model_limits(model_id, NO_LIMITS)

    # --- reading ------------------------------------------------------------

    def models(self) -> list[ModelId]:
        return sorted(self._models, key=lambda m: (m.name, m.version))

    def stats(self, model_id: ModelId) -> ModelStats:
        return self._tracked(model_id).stats

    def spec(self, model_id: ModelId) -> SlaObjectives:
        return self._tracked(model_id).spec

    def report(self, model_id: ModelId) -> ModelReport | None:
        """The report of the last tick (None before the first)."""
        return self._tracked(model_id).report

    def level(self, model_id: ModelId) -> int:
        return self._tracked(model_id).state.level

    def status(self, model_id: ModelId) -> SlaWindow | None:
        """EdgeNode.status `models[].sla` for the model, from the last tick."""
        report = self._tracked(model_id).report
        return None if report is None else report.sla_window()

    def counters(self, model_id: ModelId) -> ModelCounters | None:
        """EdgeNode.status `models[].counters` for the model, from the last tick (None before
        the first)."""
        report = self._tracked(model_id).report
        return None if report is None else report.counters

    def _tracked(self, model_id: ModelId) -> _Tracked:
        try:
            return self._models[model_id]
        except KeyError:
            raise KeyError(f"{model_id} is not tracked by the SLA monitor") from None

    # --- ticking ------------------------------------------------------------

    def tick(self, now_s: float | None = None) -> dict[ModelId, ModelReport]:
        """Read counters, judge every model's windows, apply mitigation; the new reports."""
        now = self._clock() if now_s is None else now_s
        out: dict[ModelId, ModelReport] = {}
        for model_id, tracked in list(self._models.items()):
            self._refresh_spec(model_id, tracked)
            self._read_counters(model_id, tracked, now)
            out[model_id] = self._evaluate(model_id, tracked, now)
        return out

    def _refresh_spec(self, model_id: ModelId, tracked: _Tracked) -> None:
        if self._configs is None:
            return
        try:
            spec = self._configs(model_id.name, model_id.version).sla
        except Exception as e:  # withdrawn or broken: keep measuring against the last SLA
            log.debug("SLA %s: no current config: %s", model_id, e)
            return
        if spec != tracked.spec:
            log.info("SLA %s: objectives changed to %s", model_id, spec)
            self.set_spec(model_id, spec)

    def _read_counters(self, model_id: ModelId, tracked: _Tracked, now_s: float) -> None:
        if self._counters is None:
            return
        try:
            c = self._counters(model_id)
        except Exception as e:  # e.g. the model left the repository: no counters this tick
            log.debug("SLA %s: no outcome counters: %s", model_id, e)
            return
        if c is None:
            return
        current = (c.failed, c.expired, c.refused + c.displaced)
        deltas = [max(0, a - b) for a, b in zip(current, tracked.seen, strict=True)]
        tracked.seen = current
        tracked.stats.record_outcomes(now_s, *deltas)

    def _evaluate(self, model_id: ModelId, tracked: _Tracked, now_s: float) -> ModelReport:
        s = self.settings
        stats = tracked.stats
        spec = tracked.spec
        window = stats.window(now_s)
        control = stats.window(now_s, control=True)
        verdict = judge(window, spec, min_requests=s.min_requests)
        pressure = pressure_of(control, spec, s)
        before = tracked.state.level
        tracked.state = next_mitigation(tracked.state, pressure, now_s, s)
        level = tracked.state.level
        limits = s.levels[level]
        if level != before:
            log.warning(
                "SLA %s: mitigation level %d -> %d (%s; p95 %s, p99 %s over %d requests)",
                model_id,
                before,
                level,
                pressure.value,
                _ms(control.p95_s),
                _ms(control.p99_s),
                control.requests,
            )
            self.controls.set_model_limits(model_id, limits)
        self._record_violations(model_id, tracked, control, now_s, level)
        counters = counters_of(stats.totals(), self.epoch)
        report = ModelReport(model_id, spec, window, verdict, control, pressure, level, limits, counters)
        tracked.report = report
        return report

    def _record_violations(
        self, model_id: ModelId, tracked: _Tracked, control: WindowStats, now_s: float, level: int
    ) -> None:
        verdict = judge(control, tracked.spec, min_requests=self.settings.min_control_requests)
        now_violating = set()
        for c in verdict.violated:
            now_violating.add(c.objective)
            if c.objective not in tracked.violating:
                self.violations.append(Violation(model_id, c.objective, c.measured, c.target, now_s, level))
                self.violation_counts[(model_id, c.objective)] += 1
        if verdict.met is not None:  # no verdict: keep the episode open
            tracked.violating = now_violating

    async def run(self) -> None:
        """Tick every `interval_s` until cancelled."""
        await self._periodic.run()

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}ms"
