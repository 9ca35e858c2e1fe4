"""Load controls: where the SLA and thermal monitors put their limits, and what applies them.

Two writers, one reader per mechanism:
- the SLA monitor sets `Limits` per model version, the thermal monitor sets `Limits` for the
  whole GPU and the concurrency; a model's effective limits are the stricter of its own and
  the GPU's, field by field (`Limits.stricter`);
- `LimitedPolicy` wraps a model's `BatchingPolicy` (the engine's `policy_factory` hook): it
  caps the inner policy's batch size, queue delay and queue bound by the effective limits,
  and hands every finished batch (rows, service time, request latencies) to a `BatchSink`
  (the SLA monitor's recorder), so the monitors see real traffic without a hook in the
  batcher. A shrunk queue bound makes the batcher shed its least urgent queued work (it
  does so past 1.5x the bound) and lets urgent arrivals displace less urgent ones;
- `ConcurrencyGate` wraps the scheduler as the engine's `LeaseSource`: at most `limit`
  batches hold a model lease at once (acquired and not yet done), across all models; waiters
  are served most urgent class first, in arrival order within a class. It integrates its
  occupancy over time, which is the load signal the thermal model heats with;
- `Controls.check_admission` refuses the request classes a model is shedding
  (`Limits.lowest_admitted`); the request path calls it before `Engine.infer`.

Threads: limits and the gate are changed on the event loop thread; `LimitedPolicy.decision`
and `observe` run on pool workers too and only read immutable values.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from edgefleet_api.types import ModelId, Priority
from node_agent.errors import Overloaded
from node_agent.runtime.batching_policy import BatchingDecision

if TYPE_CHECKING:
    from node_agent.runtime.batch_tensors import RunsBatches
    from node_agent.runtime.batch_ticket import Lease
    from node_agent.runtime.batching_policy import BatchingPolicy
    from node_agent.types import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on what a batching policy decides, as fractions of its own plan, and the
    least urgent request class still admitted. `Limits()` changes nothing."""

    batch_fraction: float = 1.0
    """Rows per batch at most this share of the planned batch size (at least 1 row)."""
    delay_fraction: float = 1.0
    """Queue delay at most this share of the planned delay (0: never wait for more rows)."""
    queue_fraction: float = 1.0
    """Queue bound at most this share of the planned bound (never below one batch)."""
    lowest_admitted: Priority = Priority.LOW
    """Requests of a less urgent class than this are refused (LOW: all are admitted)."""

    def __post_init__(self) -> None:
        if not 0 < self.batch_fraction <= 1:
            raise ValueError(f"batch_fraction must be in (0, 1], got {self.batch_fraction!r}")
        if not 0 <= self.delay_fraction <= 1:
            raise ValueError(f"delay_fraction must be in [0, 1], got {self.delay_fraction!r}")
        if not 0 < self.queue_fraction <= 1:
            raise ValueError(f"queue_fraction must be in (0, 1], got {self.queue_fraction!r}")
        if self.lowest_admitted < Priority.HIGH:
            raise ValueError("lowest_admitted must admit at least CRITICAL and HIGH requests")

    @property
    def unlimited(self) -> bool:
        return self == NO_LIMITS

    def stricter(self, other: Limits) -> Limits:
        """Field by field, the stricter of the two."""
        if other.unlimited:
            return self
        if self.unlimited:
            return other
        return Limits(
            min(self.batch_fraction, other.batch_fraction),
            min(self.delay_fraction, other.delay_fraction),
            min(self.queue_fraction, other.queue_fraction),
            min(self.lowest_admitted, other.lowest_admitted),
        )

    def admits(self, priority: Priority) -> bool:
        return priority <= self.lowest_admitted

    def apply(self, decision: BatchingDecision) -> BatchingDecision:
        """`decision` capped by these limits; keeps 1 <= batch_size <= queue_limit_rows."""
        if self.unlimited:
            return decision
        batch = max(1, math.floor(decision.batch_size * self.batch_fraction + 1e-9))
        queue = max(batch, math.floor(decision.queue_limit_rows * self.queue_fraction + 1e-9))
        return BatchingDecision(batch, decision.delay_s * self.delay_fraction, queue)


NO_LIMITS = Limits()


class BatchSink(Protocol):
    """Receives every finished batch of one model (called on a pool worker thread)."""

    def record_batch(
        self, now_s: float, rows: int, service_s: float, latencies_s: Sequence[float]
    ) -> None: ...


class Controls:
    """The limits in force: per model version (SLA monitor) and GPU-wide (thermal monitor).

    `version` increases on every change, so readers can cache effective limits.
    """

    def __init__(self, *, shed_retry_after_s: float = 1.0) -> None:
        """`shed_retry_after_s`: Retry-After for requests refused because their class is
        shed; about one SLA evaluation interval, after which the level may have eased."""
        if not shed_retry_after_s > 0:
            raise ValueError(f"shed_retry_after_s must be > 0, got {shed_retry_after_s!r}")
        self.shed_retry_after_s = shed_retry_after_s
        self._model: dict[ModelId, Limits] = {}
        self._global = NO_LIMITS
        self._effective: dict[ModelId, Limits] = {}
        self.version = 0
        self.gate: ConcurrencyGate | None = None
        self.refused: Counter[tuple[ModelId, Priority]] = Counter()
        """(model, request class) -> requests refused by `check_admission`."""

    # --- writers ------------------------------------------------------------

    def set_model_limits(self, model_id: ModelId, limits: Limits) -> None:
        if self._model.get(model_id, NO_LIMITS) == limits:
            return
        if limits.unlimited:
            self._model.pop(model_id, None)
        else:
            self._model[model_id] = limits
        self._changed()

    def set_global_limits(self, limits: Limits) -> None:
        if self._global == limits:
            return
        self._global = limits
        self._changed()

    def set_concurrency_fraction(self, fraction: float) -> int | None:
        """Let `fraction` of the gate's maximum concurrency run (at least 1); the new limit,
        or None without a gate."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        gate = self.gate
        if gate is None:
            return None
        n = max(1, round(gate.max_concurrency * fraction))
        gate.set_limit(n)
        return n

    def _changed(self) -> None:
        self._effective = {}
        self.version += 1

    # --- readers ------------------------------------------------------------

    def model_limits(self, model_id: ModelId) -> Limits:
        """What the SLA monitor set for this model (its own, without the GPU's)."""
        return self._model.get(model_id, NO_LIMITS)

    @property
    def global_limits(self) -> Limits:
        return self._global

    def limits(self, model_id: ModelId) -> Limits:
        """The effective limits of a model: the stricter of its own and the GPU's."""
        got = self._effective.get(model_id)
        if got is None:
            got = self._model.get(model_id, NO_LIMITS).stricter(self._global)
            self._effective[model_id] = got
        return got

    def admits(self, model_id: ModelId, priority: Priority) -> bool:
        return self.limits(model_id).admits(priority)

    def check_admission(self, model_id: ModelId, priority: Priority) -> None:
        """Raise `Overloaded` when `priority` is shed for this model (counted in `refused`)."""
        limits = self.limits(model_id)
        if limits.admits(priority):
            return
        self.refused[(model_id, priority)] += 1
        raise Overloaded(
            f"{model_id}: {priority.name.lower()} priority requests are shed while the "
            f"model is mitigating (admitting {limits.lowest_admitted.name.lower()} and above)",
            retry_after_s=self.shed_retry_after_s,
        )

    # --- wiring -------------------------------------------------------------

    def gate_for(self, source: LeaseSource, max_concurrency: int) -> ConcurrencyGate:
        """Wrap `source` (the scheduler) in the concurrency gate these controls drive."""
        if self.gate is not None:
            raise RuntimeError("these Controls already drive a ConcurrencyGate")
        self.gate = ConcurrencyGate(source, max_concurrency)
        return self.gate

    def wrap(self, model_id: ModelId, inner: BatchingPolicy, sink: BatchSink | None = None) -> LimitedPolicy:
        return LimitedPolicy(inner, self, model_id, sink)


class LimitedPolicy:
    """A `BatchingPolicy` whose decisions are the inner policy's, capped by the controls'
    limits for `model_id`; observations go to the inner policy, then to `sink`.

    `decision()` is cached on (inner decision, controls version): a few hundred ns per call.
    `retry_after_s`, `predict_service_s`, `latency_budget_s` and `max_queue_rows` are the
    inner policy's.
    """

    __slots__ = ("_cache", "_controls", "inner", "model_id", "sink")

    def __init__(
        self,
        inner: BatchingPolicy,
        controls: Controls,
        model_id: ModelId,
        sink: BatchSink | None = None,
    ) -> None:
        self.inner = inner
        self.model_id = model_id
        self.sink = sink
        self._controls = controls
        self._cache: tuple[BatchingDecision | None, int, BatchingDecision | None] = (None, -1, None)

    def decision(self) -> BatchingDecision:
        d = self.inner.decision()
        version = self._controls.version
        cache = self._cache
        if cache[0] is d and cache[1] == version:
            out = cache[2]
            assert out is not None
            return out
        out = self._controls.limits(self.model_id).apply(d)
        self._cache = (d, version, out)  # one assignment: readers see a consistent triple
        return out

    def observe(self, now_s: float, rows: int, service_s: float, latencies_s: Sequence[float]) -> None:
        self.inner.observe(now_s, rows, service_s, latencies_s)
        if self.sink is not None:
            self.sink.record_batch(now_s, rows, service_s, latencies_s)

    def observe_arrival(self, now_s: float, rows: int) -> None:
        self.inner.observe_arrival(now_s, rows)

    def window_s(self, now_s: float, decision: BatchingDecision, queued_rows: float) -> float:
        return self.inner.window_s(now_s, decision, queued_rows)

    def predict_service_s(self, rows: int) -> float:
        return self.inner.predict_service_s(rows)

    def retry_after_s(self, queued_rows: float) -> float:
        return self.inner.retry_after_s(queued_rows)

    @property
    def latency_budget_s(self) -> float | None:
        return self.inner.latency_budget_s

    @property
    def max_queue_rows(self) -> int:
        return self.inner.max_queue_rows


class LeaseSource(Protocol):
    """The part of `ModelScheduler` the engine (and the gate) use."""

    async def acquire(self, config: ModelConfig) -> Lease: ...


class _GatedLease:
    """A scheduler lease that also holds one of the gate's slots until `release()`."""

    __slots__ = ("_gate", "_inner_may_continue", "_released", "inner")

    def __init__(self, gate: ConcurrencyGate, inner: Lease) -> None:
        self._gate = gate
        self.inner = inner
        self._released = False
        # looked up once (asked per batch); a lease without it serves one batch
        self._inner_may_continue: Callable[[], bool] | None = getattr(inner, "may_continue", None)

    @property
    def backend(self) -> RunsBatches:
        return self.inner.backend

    def release(self) -> None:
        """Idempotent; any thread (the slot is given back on the gate's loop)."""
        if self._released:
            return
        self._released = True
        self.inner.release()
        self._gate._release_from_any_thread()

    def may_continue(self) -> bool:
        """Whether the holder may run more batches on this slot (any thread): nobody waits for a
        slot, the gate's limit has not been lowered below what is in use (a thermal or SLA
        mitigation takes effect at the next batch), and the scheduler's lease may continue."""
        g, inner = self._gate, self._inner_may_continue
        return not self._released and not g._waiting and g._in_use <= g._limit and bool(inner and inner())


class ConcurrencyGate:
    """A `LeaseSource` letting at most `limit` leases be out at once (see the module docstring).

    Invariants (`check_invariants`): 0 <= in_use; 1 <= limit <= max_concurrency; in_use
    exceeds limit only after `set_limit` lowered it (no new slot is granted until below);
    a waiter is granted only when in_use < limit. Use on one event loop; `release()` of its
    leases may come from any thread.
    """

    def __init__(
        self,
        source: LeaseSource,
        max_concurrency: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
        self._source = source
        self.max_concurrency = max_concurrency
        self._limit = max_concurrency
        self._clock = clock
        self._in_use = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiting = 0
        self._seq = 0
        self._busy_s = 0.0
        self._mark_s = clock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.granted = 0
        """Slots granted since start."""
        self.waited = 0
        """Grants that had to wait for a slot."""
        self.peak_in_use = 0
        """Most slots in use at once since start."""

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return self._waiting

    def set_limit(self, limit: int) -> None:
        """Allow `limit` slots (1..max_concurrency); raising it wakes waiters at once,
        lowering it lets the leases out finish and grants nothing until below it."""
        if not isinstance(limit, int) or not 1 <= limit <= self.max_concurrency:
            raise ValueError(f"limit must be an integer in [1, {self.max_concurrency}], got {limit!r}")
        if limit != self._limit:
            log.info("concurrency limit %d -> %d", self._limit, limit)
            self._limit = limit
            self._grant()

    async def acquire(self, config: ModelConfig) -> _GatedLease:
        """A slot (waiting, most urgent class first, if none is free), then the source's lease."""
        if self._loop is None:
            self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        if self._in_use < self._limit and not self._waiting:
            self._take()
        else:
            await self._wait(config.priority)
        try:
            lease = await self._source.acquire(config)
        except BaseException:
            self._give_back()
            raise
        return _GatedLease(self, lease)

    async def acquire_urgent(self, config: ModelConfig) -> Lease:
        """The source's lease, without a slot: for a batcher's urgent ticket, which runs on
        the stream pool's urgent lane (one per model at a time), not in a regular worker
        whose share the slots ration. Lowering the limit (a mitigation) does not hold urgent
        work back; shedding classes (`Controls.check_admission`) still applies to it."""
        return await self._source.acquire(config)

    def busy_slot_seconds(self) -> float:
        """Integral of slots in use over time since creation (monotone; gate's clock)."""
        return self._busy_s + self._in_use * (self._clock() - self._mark_s)

    def meter(self) -> Callable[[], float]:
        """A load signal: each call returns the mean share of `max_concurrency` in use since
        the previous call (since the meter was made, for the first), in [0, 1]."""
        last = [self._clock(), self.busy_slot_seconds()]

        def utilization() -> float:
            now, busy = self._clock(), self.busy_slot_seconds()
            dt, db = now - last[0], busy - last[1]
            if dt <= 0:
                return min(1.0, self._in_use / self.max_concurrency)
            last[0], last[1] = now, busy
            return min(1.0, max(0.0, db / (dt * self.max_concurrency)))

        return utilization

    def check_invariants(self) -> None:
        assert self._in_use >= 0, self._in_use
        assert 1 <= self._limit <= self.max_concurrency, self._limit
        live = sum(1 for _, _, f in self._waiters if not f.done())
        assert live == self._waiting, (live, self._waiting)
        if self._waiting:
            assert self._in_use >= self._limit, "a waiter is left while a slot is free"

    # --- internals ----------------------------------------------------------

    def _account(self) -> None:
        now = self._clock()
        self._busy_s += self._in_use * (now - self._mark_s)
        self._mark_s = now

    def _take(self) -> None:
        self._account()
        self._in_use += 1
        self.granted += 1
        if self._in_use > self.peak_in_use:
            self.peak_in_use = self._in_use

    async def _wait(self, priority: Priority) -> None:
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._seq += 1
        heapq.heappush(self._waiters, (int(priority), self._seq, future))
        self._waiting += 1
        self._grant()  # a slot may be free (only queued behind others that left)
        try:
            await future
        except asyncio.CancelledError:
            if future.cancelled():
                self._waiting -= 1
            else:  # granted, then cancelled before resuming: give the slot back
                self._give_back()
            raise

    def _grant(self) -> None:
        waiters = self._waiters
        while waiters and self._in_use < self._limit:
            _, _, future = heapq.heappop(waiters)
            if future.done():  # cancelled; already uncounted
                continue
            self._waiting -= 1
            self._take()
            self.waited += 1
            future.set_result(None)

    def _give_back(self) -> None:
        self._account()
        self._in_use -= 1
        assert self._in_use >= 0, "a gate slot was given back twice"
        self._grant()

    def _release_from_any_thread(self) -> None:
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            self._give_back()
            return
        try:
            loop.call_soon_threadsafe(self._give_back)
        except RuntimeError:  # loop closed: nobody waits for the slot any more
            log.debug("concurrency gate: loop closed before a lease was released")
