"""Measurement windows of one model version: what the SLA monitor judges.

A ring of time slots per window, each slot holding `LogHistogram`s (bounded memory, relative
error 1 %; `node_agent.control.sketch`) of total, queue and compute time per request and the counts
of what ended in it; a window is the merge of its slots on read. `ModelStats` keeps two:
- the reporting window (`window_s`, 60 s by default; at most `report_slots` slots, so it
  slides by one slot and its memory is bounded whatever its length), which EdgeNode.status
  carries and the operator reads;
- the control window (`control_window_s` of `interval_s` slots) that drives mitigation.
When the reporting window has `interval_s` slots too (windows up to report_slots x
interval_s), both are read from one shared ring.
Lifetime `BucketCounts` histograms (Prometheus buckets) are kept beside them, and lifetime
counts (`Totals`: completed, failed, expired, and completed requests slower than
`slow_threshold_s`), what EdgeNode.status `models[].counters` carries.

Input: finished batches (`record_batch`, from `LimitedPolicy.observe` on a pool worker: end
time, rows, service time, the latencies of the requests it completed; queue time = latency
- service time, compute time = service time) and counter deltas of requests that ended
without a result (`record_outcomes`: failed, expired, refused).

No clock reads: times are passed in (monotonic seconds).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Protocol

import numpy as np

from edgefleet_api.types import ModelId
from node_agent.control.sketch import BucketCounts, LogHistogram, LogMapping

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02,
    0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0,
    1.5, 2.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Upper bounds of the lifetime latency histograms (seconds), exported to Prometheus: steps of
at most 25% from 2 ms to 2.5 s, where edge SLOs lie, so `histogram_quantile` over nodes is within
a step of the truth; each model adds its own SLO latencies (`latency_bounds`)."""


def latency_bounds(base: Sequence[float], objectives: Sequence[float | None]) -> tuple[float, ...]:
    """`base` with the SLO latencies in `objectives` added (None and non-positive ones left out):
    a bucket ends exactly at each objective, so the share of requests within it is exact."""
    return tuple(sorted({*base, *(o for o in objectives if o is not None and o > 0)}))


BATCH_ROWS_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Upper bounds of the lifetime batch-size histogram (rows)."""


@dataclass(frozen=True, slots=True)
class WindowStats:
    """What one window measured. Latencies in seconds; None: no request to measure."""

    window_s: float
    """Span covered: the window, or less while the model has been tracked for less."""
    completed: int = 0
    """Requests with a result (a request split into several batches counts once per part)."""
    failed: int = 0
    expired: int = 0
    refused: int = 0
    """Refused or displaced by admission control (not counted as requests)."""
    batches: int = 0
    rows: int = 0
    p50_s: float | None = None
    p95_s: float | None = None
    p99_s: float | None = None
    queue_mean_s: float | None = None
    queue_p95_s: float | None = None
    compute_mean_s: float | None = None
    compute_p95_s: float | None = None

    @property
    def requests(self) -> int:
        return self.completed + self.failed + self.expired

    @property
    def errors(self) -> int:
        return self.failed + self.expired

    @property
    def error_rate(self) -> float | None:
        n = self.requests
        return self.errors / n if n else None

    @property
    def throughput_rps(self) -> float:
        return self.completed / self.window_s if self.window_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Totals:
    """Lifetime counts of a model version since it was first tracked (monotone)."""

    completed: int = 0
    failed: int = 0
    expired: int = 0
    slow: int = 0
    """Completed requests slower than the threshold in force when they were folded in."""
    slow_threshold_s: float | None = None
    """The threshold now (None: none, nothing counts as slow)."""

    @property
    def requests(self) -> int:
        return self.completed + self.failed + self.expired

    @property
    def errors(self) -> int:
        return self.failed + self.expired


class WindowSettings(Protocol):
    """What `ModelStats` reads from the SLA monitor's settings (`SlaSettings`)."""

    @property
    def interval_s(self) -> float: ...

    @property
    def control_window_s(self) -> float: ...

    @property
    def report_slots(self) -> int: ...

    @property
    def mapping(self) -> LogMapping: ...

    @property
    def latency_buckets_s(self) -> tuple[float, ...]: ...

    @property
    def batch_rows_buckets(self) -> tuple[float, ...]: ...


# --- rings of slots -------------------------------------------------

_NO_KEY = -(2**62)


class _Slot:
    """One time slot of a ring: sketches and counts of what ended in it."""

    __slots__ = (
        "batches",
        "completed",
        "compute",
        "expired",
        "failed",
        "key",
        "latency",
        "queue",
        "refused",
        "rows",
    )

    def __init__(self, mapping: LogMapping) -> None:
        self.key = _NO_KEY
        self.latency = LogHistogram(mapping)
        self.queue = LogHistogram(mapping)
        self.compute = LogHistogram(mapping)
        self.completed = self.failed = self.expired = self.refused = self.batches = self.rows = 0

    def reset(self, key: int) -> None:
        self.key = key
        self.latency.clear()
        self.queue.clear()
        self.compute.clear()
        self.completed = self.failed = self.expired = self.refused = self.batches = self.rows = 0


class _Ring:
    """`nslots` slots of `width_s`; slot key = floor(t / width_s). Bounded memory: a slot is
    reused (reset) when time moves past it; data older than the ring is dropped."""

    __slots__ = ("mapping", "nslots", "slots", "width_s")

    def __init__(self, width_s: float, nslots: int, mapping: LogMapping) -> None:
        self.width_s = width_s
        self.nslots = nslots
        self.mapping = mapping
        self.slots = [_Slot(mapping) for _ in range(nslots)]

    def key(self, t: float) -> int:
        return math.floor(t / self.width_s)

    def grown(self, nslots: int) -> _Ring:
        """A longer ring of the same width holding this one's slots (which it takes over)."""
        assert nslots >= self.nslots, (nslots, self.nslots)
        out = _Ring(self.width_s, nslots, self.mapping)
        for slot in self.slots:
            if slot.key != _NO_KEY:
                out.slots[slot.key % nslots] = slot
        return out

    def slot(self, key: int) -> _Slot | None:
        """The slot for `key` to write into; None when `key` is older than the ring holds."""
        s = self.slots[key % self.nslots]
        if s.key == key:
            return s
        if s.key > key:
            return None
        s.reset(key)
        return s

    def window(self, now_s: float, span_s: float) -> list[_Slot]:
        """Slots of the last `span_s` (whole slots, the current one included)."""
        now_key = self.key(now_s)
        n = min(self.nslots, max(1, math.ceil(span_s / self.width_s - 1e-9)))
        return [s for s in self.slots if now_key - n < s.key <= now_key]


class ModelStats:
    """One model version's measurements: recent windows and lifetime histograms.

    `record_batch` may be called from any thread (a pool worker): it only appends under a
    lock; `ingest` (any thread) folds what was appended into the rings and histograms, and
    runs inline once `max_pending` batches are waiting, so memory stays bounded even when
    nobody reads. Readers (`window`, histograms) ingest first. The SLA monitor's tick (1 s)
    ingests, so the inline fold (a few ms for 8,192 batches, on the worker that recorded the
    last one, inside the batcher's lock) only happens past 8,192 batches a second per model.
    """

    def __init__(
        self,
        model_id: ModelId,
        window_s: float,
        settings: WindowSettings,
        now_s: float,
        max_pending: int = 8192,
        objectives_s: Sequence[float | None] = (),
    ) -> None:
        self.model_id = model_id
        self.settings = settings
        self.started_s = now_s
        self.max_pending = max_pending
        self._pending: list[tuple[float, int, float, Sequence[float]]] = []
        self._pending_lock = threading.Lock()
        self._lock = threading.Lock()
        bounds = latency_bounds(settings.latency_buckets_s, objectives_s)
        self.latency_hist = BucketCounts(bounds)
        self.queue_hist = BucketCounts(bounds)
        self.compute_hist = BucketCounts(bounds)
        self.batch_rows_hist = BucketCounts(settings.batch_rows_buckets)
        self.window_s = window_s
        self.slow_threshold_s: float | None = None
        """Latency past which a completed request counts as slow (None: none is)."""
        self._completed = self._failed = self._expired = self._slow = 0
        control_slots = math.ceil(settings.control_window_s / settings.interval_s - 1e-9)
        self._control = _Ring(settings.interval_s, control_slots, settings.mapping)
        self._report = self._control
        self._rings: tuple[_Ring, ...] = (self._control,)
        self.set_window(window_s)

    def set_window(self, window_s: float) -> None:
        """Change the reporting window's length. With 1-slot-wide (interval) slots the one
        shared ring grows and keeps its data; a different slot width starts empty."""
        if not window_s >= 1:
            raise ValueError(f"window_s must be >= 1, got {window_s!r}")
        with self._lock:
            s = self.settings
            width = max(s.interval_s, window_s / s.report_slots)
            nslots = math.ceil(window_s / width - 1e-9)
            self.window_s = window_s
            control = self._control
            if width == control.width_s:
                if nslots > control.nslots:
                    control = self._control = control.grown(nslots)
                self._report = control
            elif self._report is control or (self._report.width_s, self._report.nslots) != (width, nslots):
                self._report = _Ring(width, nslots, s.mapping)
            self._rings = tuple({id(r): r for r in (self._control, self._report)}.values())

    # --- writers ------------------------------------------------------------

    def record_batch(self, now_s: float, rows: int, service_s: float, latencies_s: Sequence[float]) -> None:
        """One finished batch (the `BatchSink` protocol). Any thread; O(1) amortised."""
        with self._pending_lock:
            self._pending.append((now_s, rows, service_s, latencies_s))
            full = len(self._pending) >= self.max_pending
        if full:
            self.ingest()

    def record_outcomes(self, now_s: float, failed: int, expired: int, refused: int) -> None:
        """Requests that ended without a result since the last call (counter deltas)."""
        if not (failed or expired or refused):
            return
        with self._lock:
            self._failed += failed
            self._expired += expired
            for ring in self._rings:
                slot = ring.slot(ring.key(now_s))
                if slot is not None:
                    slot.failed += failed
                    slot.expired += expired
                    slot.refused += refused

    def ingest(self) -> None:
        """Fold the batches recorded since the last call into windows and histograms."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        meta = np.array([b[:3] for b in pending], dtype=np.float64)  # time, rows, service
        times, rows, service = meta[:, 0], meta[:, 1].astype(np.int64), meta[:, 2]
        sizes = np.array([len(b[3]) for b in pending], dtype=np.int64)
        total = int(sizes.sum())
        latency = np.fromiter(chain.from_iterable(b[3] for b in pending), np.float64, total)
        compute = np.repeat(service, sizes)
        queue = np.maximum(latency - compute, 0.0)
        request_times = np.repeat(times, sizes)
        with self._lock:
            self._completed += total
            threshold = self.slow_threshold_s
            if threshold is not None:
                self._slow += int(np.count_nonzero(latency > threshold))
            self.latency_hist.add_many(latency)
            self.queue_hist.add_many(queue)
            self.compute_hist.add_many(compute)
            self.batch_rows_hist.add_many(rows)
            for ring in self._rings:
                self._fold(ring, times, rows, request_times, latency, queue, compute)

    @staticmethod
    def _fold(
        ring: _Ring,
        times: np.ndarray,
        rows: np.ndarray,
        request_times: np.ndarray,
        latency: np.ndarray,
        queue: np.ndarray,
        compute: np.ndarray,
    ) -> None:
        batch_keys = np.floor(times / ring.width_s).astype(np.int64)
        request_keys = np.floor(request_times / ring.width_s).astype(np.int64)
        for key in np.unique(batch_keys).tolist():
            slot = ring.slot(key)
            if slot is None:
                continue  # older than the ring: only the lifetime histograms keep it
            in_batch = batch_keys == key
            slot.batches += int(in_batch.sum())
            slot.rows += int(rows[in_batch].sum())
            sel = request_keys == key
            n = int(sel.sum())
            if n:
                slot.completed += n
                slot.latency.add_many(latency[sel])
                slot.queue.add_many(queue[sel])
                slot.compute.add_many(compute[sel])

    # --- readers ------------------------------------------------------------

    def window(self, now_s: float, span_s: float | None = None, *, control: bool = False) -> WindowStats:
        """Stats of the last `span_s` seconds (default: the reporting window; `control`:
        the control window) ending at `now_s`."""
        self.ingest()
        with self._lock:
            if control:
                ring, span = self._control, self.settings.control_window_s
            else:
                ring, span = self._report, self.window_s
            if span_s is not None:
                span = span_s
            slots = ring.window(now_s, span)
            mapping = self.settings.mapping
            latency = LogHistogram.merged((s.latency for s in slots), mapping)
            queue = LogHistogram.merged((s.queue for s in slots), mapping)
            compute = LogHistogram.merged((s.compute for s in slots), mapping)

            def total(field: str) -> int:
                return sum(getattr(s, field) for s in slots)

            counts = {f: total(f) for f in ("completed", "failed", "expired", "refused", "batches", "rows")}
        covered = min(span, max(ring.width_s, now_s - self.started_s))
        q: list[float | None] = [None, None, None]
        if latency.count:
            q = list(latency.quantiles((0.5, 0.95, 0.99)) or q)
        return WindowStats(
            covered,
            **counts,
            p50_s=q[0],
            p95_s=q[1],
            p99_s=q[2],
            queue_mean_s=queue.mean,
            queue_p95_s=queue.quantile(0.95),
            compute_mean_s=compute.mean,
            compute_p95_s=compute.quantile(0.95),
        )

    def set_slow_threshold(self, threshold_s: float | None) -> None:
        """Count completed requests slower than `threshold_s` from now on (None: none). Batches
        recorded before and not yet folded in are counted against the new threshold."""
        if threshold_s is not None and not threshold_s > 0:
            raise ValueError(f"slow threshold must be > 0, got {threshold_s!r}")
        with self._lock:
            self.slow_threshold_s = threshold_s

    def add_totals(self, totals: Totals) -> None:
        """Add earlier lifetime counts (of this version's previous tracking) to this one's."""
        with self._lock:
            self._completed += totals.completed
            self._failed += totals.failed
            self._expired += totals.expired
            self._slow += totals.slow

    def totals(self) -> Totals:
        """Lifetime counts (after folding in what was recorded)."""
        self.ingest()
        with self._lock:
            return Totals(self._completed, self._failed, self._expired, self._slow, self.slow_threshold_s)

    def histograms(self) -> dict[str, BucketCounts]:
        """Lifetime histograms (copies): latency, queue, compute (seconds), batch_rows."""
        self.ingest()
        with self._lock:
            out = {}
            named = {
                "latency": self.latency_hist,
                "queue": self.queue_hist,
                "compute": self.compute_hist,
                "batch_rows": self.batch_rows_hist,
            }
            for name, h in named.items():
                c = BucketCounts(h.bounds)
                c.counts, c.count, c.sum = h.counts.copy(), h.count, h.sum
                out[name] = c
            return out

    def memory_bytes(self) -> int:
        """Bytes held by the window sketches (bounded: slots x 3 x mapping.max_buckets x 8)."""
        with self._lock:
            return sum(
                s.latency.nbytes + s.queue.nbytes + s.compute.nbytes
                for ring in self._rings
                for s in ring.slots
            )
