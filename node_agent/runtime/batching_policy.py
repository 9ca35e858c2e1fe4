"""Batching policy: observations in, (batch size, queue delay, queue bound) out.

Pure: no I/O, no clock reads (callers pass monotonic time in), no tensors.

`AdaptivePolicy` plans against the model's latency SLO (p99 and/or p95):
- a `ServiceModel` fits batch service time as s(b) = fixed + per_row * b, by least
  squares over recent batches with exponentially decaying weights (half-life ~1 s),
  so a model that slows down (thermal throttle) or speeds up is tracked within a
  few seconds;
- the latency budget is `fraction x SLO`; `fraction` is adjusted AIMD-style from
  measured request latencies (multiplicative decrease when more than the allowed
  share of requests missed the SLO in the last interval, additive increase when not);
- the queue delay is at most 0.3 x budget (the textbook's "max wait ~ 0.3 x SLO") and at
  most `max_window_s` and one batch's service time (see the last point),
  scaled by the share of fixed cost in a batch: waiting for more rows pays only by
  amortising that fixed cost (a CNN on CPU, whose cost is per row, gets ~0 delay; a
  model dominated by per-call overhead gets the full 0.3);
- the batch size is the largest b with delay + 2 s(b) <= budget (a request may wait for
  one running batch, then run in its own), but no larger than the throughput knee:
  rows/s b / s(b) approaches 1 / per_row as b grows, and past the smallest b reaching 95%
  of that, bigger batches add latency (to every request, and to urgent ones waiting for
  a running batch) for under 5% more throughput. When not even b = 1 fits the budget:
  no delay; if no small batch was seen lately, the batch is halved (s(1) is then only an
  extrapolation), else batches go up to the knee while one batch alone fits the budget
  (at least one row);
- the queue bound admits only rows that can be served within the budget (admission
  control instead of timeouts under overload);
- the window a partial batch waits never exceeds what arrivals can fill: the delay is
  capped independently of the SLO (`max_window_s`, and one full batch's service time),
  and each window, as it opens, at the time the measured arrival rate (`ArrivalRate`)
  needs to fill the batch, and to nothing when not even one more row is expected within
  it (`batch_window_s`): a lone client with one request in flight is served at once
  however loose its SLO (with `p99: 30 s` it used to wait 0.3 x 30 s = 9 s per request).

`StaticPolicy` keeps a fixed (batch size, delay, bound) and only fits the service model
(used for deadline prediction and Retry-After); its windows last its delay (the model's
`max_queue_delay_s`, as Triton's `max_queue_delay_microseconds`), whatever the arrivals.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from node_agent.types import ModelConfig


@dataclass(frozen=True, slots=True)
class BatchingDecision:
    """What the batcher does next. 1 <= batch_size; batch_size <= queue_limit_rows."""

    batch_size: int
    """Rows per batch at most."""
    delay_s: float
    """How long a partial batch may wait for more rows, from when its window opened."""
    queue_limit_rows: int
    """Queued rows past which arrivals are refused (or displace less urgent work)."""


@dataclass(frozen=True, slots=True)
class SloTarget:
    """A latency objective: `quantile` of request latencies within `latency_s`."""

    latency_s: float
    quantile: float

    def __post_init__(self) -> None:
        if not self.latency_s > 0:
            raise ValueError(f"latency_s must be > 0, got {self.latency_s!r}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile!r}")


def slo_targets(config: ModelConfig) -> tuple[SloTarget, ...]:
    """The model's latency objectives from its SLA (empty when it has none)."""
    out = []
    if config.sla.p99_latency_s is not None:
        out.append(SloTarget(config.sla.p99_latency_s, 0.99))
    if config.sla.p95_latency_s is not None:
        out.append(SloTarget(config.sla.p95_latency_s, 0.95))
    return tuple(out)


class ServiceModel:
    """Batch service time s(b) = fixed_s + per_row_s * b, fitted with decaying weights.

    Weighted least squares: an observation weighs its own duration (seconds of
    evidence, so a few long batches after a slowdown count as much as the many short
    ones before it), and weights halve every `halflife_s` of (passed-in) time. One
    batch off the prediction by 4x or more, or two in a row off by 2x, mean the model
    changed speed: older evidence is then mostly forgotten at once. With too little spread in
    observed batch sizes to fit a slope, a tenth of the mean time is taken as fixed and
    the rest as per-row cost: a cautious prior (larger batches are predicted nearly
    proportionally slower, so an unexplored batch size is never assumed free) under
    which the planner still moves the batch size, and the next batches supply the
    spread that replaces the prior by a fit. Invariant: fixed_s >= 0, per_row_s >= 0.
    """

    __slots__ = ("_last_s", "_recent_rows", "_s0", "_surprises", "_sx", "_sxx", "_sxy", "_sy",
                 "fixed_s", "halflife_s", "per_row_s")  # fmt: skip

    SURPRISE_RATIO = 2.0
    SHOCK_RATIO = 4.0
    FORGET = 0.05
    PRIOR_FIXED_SHARE = 0.1

    def __init__(self, halflife_s: float = 1.0) -> None:
        if not halflife_s > 0:
            raise ValueError(f"halflife_s must be > 0, got {halflife_s!r}")
        self.halflife_s = halflife_s
        self._s0 = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._last_s: float | None = None
        self._surprises = 0
        self._recent_rows: collections.deque[int] = collections.deque(maxlen=16)
        self.fixed_s = 0.0
        self.per_row_s = 0.0

    @property
    def known(self) -> bool:
        return self._s0 > 0

    def observe(self, now_s: float, rows: int, service_s: float) -> None:
        assert rows >= 1 and service_s >= 0, (rows, service_s)
        # (attributes read and written once each: this runs for every batch, on the loop)
        last = self._last_s
        decay = 1.0
        if last is None:
            self._last_s = now_s
        elif now_s > last:
            decay = 0.5 ** ((now_s - last) / self.halflife_s)
            self._last_s = now_s
        s0 = self._s0
        if s0 > 0:  # (`known`)
            predicted = self.fixed_s + self.per_row_s * rows
            r, shock = self.SURPRISE_RATIO, self.SHOCK_RATIO
            off = service_s > r * predicted or service_s * r < predicted
            self._surprises = self._surprises + 1 if off else 0
            shocked = service_s > shock * predicted or service_s * shock < predicted
            if self._surprises >= 2 or shocked:
                decay *= self.FORGET
                self._surprises = 0
        self._recent_rows.append(rows)
        w = service_s if service_s > 1e-6 else 1e-6
        b = float(rows)
        wb = w * b
        if decay != 1.0:
            self._s0 = s0 = s0 * decay + w
            self._sx = sx = self._sx * decay + wb
            self._sy = sy = self._sy * decay + w * service_s
            self._sxx = sxx = self._sxx * decay + wb * b
            self._sxy = sxy = self._sxy * decay + wb * service_s
        else:
            self._s0 = s0 = s0 + w
            self._sx = sx = self._sx + wb
            self._sy = sy = self._sy + w * service_s
            self._sxx = sxx = self._sxx + wb * b
            self._sxy = sxy = self._sxy + wb * service_s
        self._fit_sums(s0, sx, sy, sxx, sxy)

    def _fit_sums(self, s0: float, sx: float, sy: float, sxx: float, sxy: float) -> None:
        mean_b = sx / s0
        mean_t = sy / s0
        var_b = sxx / s0 - mean_b * mean_b
        if var_b >= 0.25:
            slope = (sxy / s0 - mean_b * mean_t) / var_b
            fixed = mean_t - slope * mean_b
            if slope < 0:
                slope, fixed = 0.0, mean_t
            elif fixed < 0:
                slope, fixed = sy / sx, 0.0
        else:
            fixed = self.PRIOR_FIXED_SHARE * mean_t
            slope = (1.0 - self.PRIOR_FIXED_SHARE) * mean_t / mean_b
        self.fixed_s, self.per_row_s = fixed, slope

    @property
    def smallest_recent_rows(self) -> int:
        """The smallest batch among the last 16 observed (0 before any)."""
        return min(self._recent_rows, default=0)

    def predict(self, rows: int) -> float:
        """Predicted service time of a batch of `rows` (0.0 before any observation)."""
        return self.fixed_s + self.per_row_s * rows

    def largest_batch_within(self, time_s: float, max_rows: int) -> int:
        """The largest b in [1, max_rows] with s(b) <= time_s; 0 when not even b = 1 fits."""
        if self.predict(1) > time_s:
            return 0
        if self.per_row_s <= 0:
            return max_rows
        fit = (time_s - self.fixed_s) / self.per_row_s
        return max(1, min(max_rows, math.floor(fit * (1 + 1e-9))))  # (0.035-0.002)/0.001 = 32.99..


class ArrivalRate:
    """Rows/s arriving, from recent inter-arrival gaps: sum(rows) / sum(gaps), both sums
    decayed by (1 - alpha) per arrival, the silence since the last arrival counted as a
    gap in progress (so the rate falls while nothing arrives). None before two arrivals.

    Written by one thread (`observe`), read by any: the state is one tuple, replaced whole.
    """

    __slots__ = ("_state", "alpha")

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self._state: tuple[float | None, float, float] = (None, 0.0, 0.0)  # last arrival, rows, gaps

    def observe(self, now_s: float, rows: int) -> None:
        last, r, g = self._state
        if last is None:
            self._state = (now_s, 0.0, 0.0)
            return
        keep = 1.0 - self.alpha
        self._state = (max(last, now_s), r * keep + rows, g * keep + max(0.0, now_s - last))

    def rows_per_s(self, now_s: float) -> float | None:
        last, r, g = self._state
        if last is None or r <= 0:
            return None
        span = g + max(0.0, now_s - last)
        return math.inf if span <= 0 else r / span


def batch_window_s(delay_s: float, missing_rows: float, rows_per_s: float | None) -> float:
    """How long a batch window that opens now lasts: at most `delay_s` (the policy's), at
    most the time arrivals at `rows_per_s` take to bring the `missing_rows` a full batch
    lacks, and 0 when fewer than one row is expected within it (waiting would only delay
    what is queued). Unknown rate (None, fewer than two arrivals seen): nothing is expected,
    0. Result in [0, delay_s]."""
    if missing_rows <= 0 or delay_s <= 0 or rows_per_s is None or rows_per_s <= 0:
        return 0.0
    window = min(delay_s, missing_rows / rows_per_s)
    return window if rows_per_s * window >= 1.0 else 0.0


class BatchingPolicy(Protocol):
    """What the batcher needs from a policy. Not thread-safe: callers serialise `observe`;
    `decision()` returns an immutable value, safe to read from any thread."""

    def decision(self) -> BatchingDecision: ...

    def observe(self, now_s: float, rows: int, service_s: float, latencies_s: Sequence[float]) -> None:
        """One finished batch: its rows, its service time, its finished requests' latencies."""

    def observe_arrival(self, now_s: float, rows: int) -> None:
        """A request of `rows` was queued at `now_s` (from the thread that queues)."""

    def window_s(self, now_s: float, decision: BatchingDecision, queued_rows: float) -> float:
        """How long the batch window opening now lasts, in [0, decision.delay_s], with
        `queued_rows` already waiting for that batch (any thread)."""
        ...

    def predict_service_s(self, rows: int) -> float: ...

    def retry_after_s(self, queued_rows: float) -> float: ...

    @property
    def latency_budget_s(self) -> float | None:
        """The latency a request without a deadline should be served within (admission by
        predicted wait, `admission`): the SLO as the policy currently plans for it; None
        without an SLO."""
        ...

    @property
    def max_queue_rows(self) -> int:
        """Hard cap on queued rows (memory), whatever the SLO would allow."""
        ...


class _ServiceMixin:
    service: ServiceModel
    workers: int

    def decision(self) -> BatchingDecision:
        raise NotImplementedError

    def predict_service_s(self, rows: int) -> float:
        return self.service.predict(rows)

    def retry_after_s(self, queued_rows: float) -> float:
        """Time for `queued_rows` to drain at the planned batch size (for Retry-After)."""
        b = self.decision().batch_size
        per_batch = self.service.predict(b)
        return max(0.001, math.ceil(queued_rows / b) * per_batch / self.workers)


class StaticPolicy(_ServiceMixin):
    """A fixed decision; the service model is still fitted (deadlines, Retry-After)."""

    def __init__(
        self,
        batch_size: int,
        delay_s: float,
        queue_limit_rows: int,
        *,
        workers: int = 1,
        halflife_s: float = 1.0,
        slo_s: float | None = None,
    ) -> None:
        """`slo_s`: the latency budget of requests without a deadline (None: the admission
        default; math.inf: no admission by time, the queue's bound only)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not delay_s >= 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s!r}")
        if queue_limit_rows < batch_size:
            raise ValueError(f"queue_limit_rows ({queue_limit_rows}) must be >= batch_size ({batch_size})")
        if slo_s is not None and not slo_s > 0:
            raise ValueError(f"slo_s must be > 0, got {slo_s!r}")
        self._decision = BatchingDecision(batch_size, delay_s, queue_limit_rows)
        self.service = ServiceModel(halflife_s)
        self.workers = workers
        self._slo_s = slo_s

    uses_latencies = False
    """`observe` ignores its `latencies_s`: a batcher need not list them (a policy without
    this attribute is given them)."""
    uses_arrivals = False
    """`observe_arrival` does nothing: a batcher need not call it, per request."""

    def decision(self) -> BatchingDecision:
        return self._decision

    @property
    def latency_budget_s(self) -> float | None:
        return self._slo_s

    @property
    def max_queue_rows(self) -> int:
        return self._decision.queue_limit_rows

    def observe(self, now_s: float, rows: int, service_s: float, latencies_s: Sequence[float]) -> None:
        self.service.observe(now_s, rows, service_s)

    def observe_arrival(self, now_s: float, rows: int) -> None:
        pass

    def window_s(self, now_s: float, decision: BatchingDecision, queued_rows: float) -> float:
        """The configured delay, whatever the arrivals (Triton's max_queue_delay)."""
        return decision.delay_s


@dataclass(frozen=True, slots=True)
class AdaptiveSettings:
    """Knobs of `AdaptivePolicy`; the defaults follow the seeds and Clipper."""

    max_batch_size: int
    """Hard ceiling on rows per batch (the model's max_batch_size)."""
    targets: tuple[SloTarget, ...]
    """Latency objectives (at least one)."""
    workers: int = 1
    """Batches of this model that may run at once (stream-pool workers)."""
    max_queue_rows: int = 4096
    """Hard cap on queued rows (memory), whatever the SLO would allow."""
    delay_fraction: float = 0.3
    """Most of the latency budget a partial batch may wait ("max wait ~ 0.3 x SLO")."""
    service_halflife_s: float = 1.0
    """Half-life of service-time observations: reacts to a slowdown within ~2-3 s."""
    adapt_interval_s: float = 0.5
    """How often the budget fraction is re-evaluated from measured latencies."""
    decrease: float = 0.85
    """Multiplicative decrease of the budget fraction after an interval that missed the SLO."""
    increase: float = 0.05
    """Additive increase of the budget fraction after an interval that met it."""
    throughput_knee: float = 0.95
    """Batches stop growing once they reach this share of the model's asymptotic rows/s."""
    max_window_s: float = 0.02
    """Most a partial batch may wait, whatever the SLO: a loose SLO (30 s) must not make
    requests wait seconds for rows that are not coming (Triton waits 100 us to a few ms)."""
    window_per_service: float = 1.0
    """And at most this many times the planned batch's predicted service time."""
    arrival_alpha: float = 0.2
    """Weight of the newest inter-arrival gap in the arrival rate (`ArrivalRate`)."""
    min_fraction: float = 0.5
    """Floor of the budget fraction. The plan already assumes the worst case (a full
    running batch ahead); the fraction only absorbs service-time jitter, and a deep cut
    would trade throughput (hence more queueing) for nothing after a transient backlog."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        if not self.targets:
            raise ValueError("AdaptiveSettings needs at least one SloTarget")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers!r}")
        if self.max_queue_rows < self.max_batch_size:
            raise ValueError("max_queue_rows must be >= max_batch_size")
        if not 0 < self.throughput_knee < 1:
            raise ValueError(f"throughput_knee must be in (0, 1), got {self.throughput_knee!r}")
        if not 0 <= self.delay_fraction < 0.5:
            raise ValueError(f"delay_fraction must be in [0, 0.5), got {self.delay_fraction!r}")
        if not (self.max_window_s >= 0 and self.window_per_service >= 0):
            raise ValueError("need max_window_s >= 0 and window_per_service >= 0")
        if not 0 < self.arrival_alpha <= 1:
            raise ValueError(f"arrival_alpha must be in (0, 1], got {self.arrival_alpha!r}")
        if not (0 < self.decrease < 1 and self.increase > 0 and 0 < self.min_fraction <= 1):
            raise ValueError("need 0 < decrease < 1, increase > 0, 0 < min_fraction <= 1")


class AdaptivePolicy(_ServiceMixin):
    """SLO-driven batch size, delay and queue bound (see the module docstring).

    Invariants: min_fraction <= fraction <= 1; 1 <= batch_size <= max_batch_size;
    batch_size <= queue_limit_rows <= max_queue_rows.
    """

    def __init__(self, settings: AdaptiveSettings) -> None:
        self.settings = settings
        self.service = ServiceModel(settings.service_halflife_s)
        self.workers = settings.workers
        self.fraction = 1.0
        self._slo_s = min(t.latency_s for t in settings.targets)
        self._window_start_s: float | None = None
        self._window_n = 0
        self._window_over = [0] * len(settings.targets)
        self.arrivals = ArrivalRate(settings.arrival_alpha)
        self._decision = self._plan()

    def decision(self) -> BatchingDecision:
        return self._decision

    @property
    def latency_budget_s(self) -> float | None:
        """The planned budget, `fraction` x SLO: it shrinks while requests miss the SLO."""
        return self.fraction * self._slo_s

    @property
    def max_queue_rows(self) -> int:
        return self.settings.max_queue_rows

    def observe(self, now_s: float, rows: int, service_s: float, latencies_s: Sequence[float]) -> None:
        self.service.observe(now_s, rows, service_s)
        self._count(latencies_s)
        if self._window_start_s is None:
            self._window_start_s = now_s
        elif now_s - self._window_start_s >= self.settings.adapt_interval_s:
            self._adapt()
            self._window_start_s = now_s
        self._decision = self._plan()

    def observe_arrival(self, now_s: float, rows: int) -> None:
        self.arrivals.observe(now_s, rows)

    def window_s(self, now_s: float, decision: BatchingDecision, queued_rows: float) -> float:
        """`batch_window_s` at the measured arrival rate."""
        missing = decision.batch_size - queued_rows
        return batch_window_s(decision.delay_s, missing, self.arrivals.rows_per_s(now_s))

    def _count(self, latencies_s: Sequence[float]) -> None:
        self._window_n += len(latencies_s)
        for i, target in enumerate(self.settings.targets):
            limit = target.latency_s
            self._window_over[i] += sum(1 for x in latencies_s if x > limit)

    def _adapt(self) -> None:
        s = self.settings
        n = self._window_n
        violated = any(
            over >= 2 and over > (1.0 - t.quantile) * n
            for t, over in zip(s.targets, self._window_over, strict=True)
        )
        if violated:
            self.fraction = max(s.min_fraction, self.fraction * s.decrease)
        elif n:
            self.fraction = min(1.0, self.fraction + s.increase)
        self._window_n = 0
        self._window_over = [0] * len(s.targets)

    def _plan(self) -> BatchingDecision:
        s = self.settings
        svc = self.service
        budget = self.fraction * self._slo_s
        max_delay = min(s.delay_fraction * budget, s.max_window_s)
        if not svc.known:
            b = s.max_batch_size
            return BatchingDecision(b, max_delay, min(s.max_queue_rows, 2 * b * s.workers))
        cap = min(s.max_batch_size, self._knee())
        b = svc.largest_batch_within((budget - max_delay) / 2, cap)
        if b == 0 and svc.smallest_recent_rows > 2:
            # The fit says even one row misses the budget, but it has seen only larger
            # batches: s(1) is an extrapolation (noise makes large intercepts). Look before
            # concluding: halve the batch, and the next fits have small sizes to go on.
            b = max(1, min(self._decision.batch_size, svc.smallest_recent_rows) // 2)
            delay = 0.0
        elif b == 0:
            # Not even one row behind a running batch meets the budget. Do not wait, and
            # batch (up to the knee) as far as one batch alone still fits the budget: a
            # model dominated by per-call overhead keeps its full batches, any other runs
            # single rows. (Growing past the budget on the fit's word would trust its
            # intercept most exactly when noise makes it least trustworthy.)
            b, delay = max(1, svc.largest_batch_within(budget, cap)), 0.0
        else:
            # Waiting buys throughput only through the fixed cost it amortises. A larger
            # batch lowers that share and so the delay, which leaves room for a larger
            # batch: iterate to the fixed point (b only grows, the delay only shrinks).
            delay = max_delay
            for _ in range(8):
                delay = min(delay, max_delay * self._waiting_benefit(b))
                grown = svc.largest_batch_within((budget - delay) / 2, cap)
                if grown == b:
                    break
                b = grown
            delay = min(delay, s.window_per_service * svc.predict(b))
        per_batch = max(svc.predict(b), 1e-6)
        batches_ahead = math.floor((budget / per_batch - 1.0) * s.workers)
        limit = min(s.max_queue_rows, max(b, batches_ahead * b))
        return BatchingDecision(b, delay, limit)

    def _knee(self) -> int:
        """Smallest b with b / s(b) >= knee x 1 / per_row, i.e. b >= k/(1-k) x fixed/per_row."""
        svc, k = self.service, self.settings.throughput_knee
        if svc.per_row_s <= 0:
            return self.settings.max_batch_size
        return max(1, math.ceil(k / (1 - k) * svc.fixed_s / svc.per_row_s - 1e-9))

    def _waiting_benefit(self, b: int) -> float:
        """Share of a b-row batch's time that is fixed cost, in [0, 1]: 1 when batching
        is free (per-call overhead, GPUs), 0 when every row costs the same alone."""
        total = self.service.predict(b)
        return self.service.fixed_s / total if total > 0 else 1.0

    def check_invariants(self) -> None:
        s, d = self.settings, self._decision
        assert s.min_fraction <= self.fraction <= 1.0, self.fraction
        assert 1 <= d.batch_size <= s.max_batch_size, d
        assert d.batch_size <= d.queue_limit_rows <= s.max_queue_rows, d
        assert d.delay_s >= 0, d


def policy_for(
    config: ModelConfig, *, workers: int = 1, max_queue_rows: int = 4096
) -> StaticPolicy | AdaptivePolicy:
    """The policy a model's config asks for: adaptive with an SLA, static without."""
    max_batch = max(1, config.max_batch_size)
    targets = slo_targets(config)
    if targets:
        return AdaptivePolicy(
            AdaptiveSettings(
                max_batch_size=max_batch,
                targets=targets,
                workers=workers,
                max_queue_rows=max(max_queue_rows, max_batch),
            )
        )
    return StaticPolicy(
        max_batch,
        config.max_queue_delay_s,
        max(max_queue_rows, max_batch),
        workers=workers,
    )
