"""Bounded-memory histograms: a relative-error quantile sketch and fixed Prometheus buckets.

`LogHistogram` is a DDSketch (Masson, Rim, Lee, VLDB 2019) with a dense, range-bounded
store. A value x in [min_value, max_value] lands in bucket i = ceil(log_gamma(x)), with
gamma = (1 + alpha) / (1 - alpha); bucket i covers (gamma^(i-1), gamma^i] and stands for
2 gamma^i / (gamma + 1), which is within relative error `alpha` of every value in it.

Guarantee: for 0 <= q <= 1, `quantile(q)` is within relative error `alpha` of the exact
value of rank floor(q (n - 1)) (0-based) in the sorted input, i.e. of
`numpy.quantile(x, q, method="lower")`, for inputs within [min_value, max_value].
Values below `min_value` (zero included) are counted in a zero bucket and reported as the
smallest value seen; values above `max_value` are counted in the top bucket and reported
as at most the largest value seen, so quantiles that fall there lose the guarantee.
The exact count, sum, min and max are kept besides the buckets.

Memory: at most ceil(log_gamma(max_value / min_value)) + 1 counters, whatever the number of
values (1,037 x 8 bytes for the defaults: alpha 1 %, 10 us to 10,000 s); the store only
spans the buckets seen so far, typically a few dozen for one second of latencies.
Sketches with the same `LogMapping` merge exactly (bucket counts add).

`BucketCounts` counts values into fixed upper bounds (Prometheus `le` semantics: a value
equal to a bound counts in that bucket), for histograms exported as they are.

Pure: no clock, no locks, no I/O. Not thread-safe; callers serialise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class LogMapping:
    """How values map to buckets; sketches merge only when their mappings are equal."""

    alpha: float = 0.01
    """Relative accuracy of quantiles (0.01: within 1 % of the exact value)."""
    min_value: float = 1e-5
    """Smallest value resolved (10 us for latencies in seconds); below it: the zero bucket."""
    max_value: float = 1e4
    """Largest value resolved; above it values share the top bucket."""

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if not 0 < self.min_value < self.max_value:
            raise ValueError(f"need 0 < min_value < max_value, got {self.min_value!r}, {self.max_value!r}")

    @property
    def gamma(self) -> float:
        return (1 + self.alpha) / (1 - self.alpha)

    @property
    def min_index(self) -> int:
        return self.index(self.min_value)

    @property
    def max_index(self) -> int:
        return self.index(self.max_value)

    @property
    def max_buckets(self) -> int:
        """The most counters a store of this mapping can ever hold."""
        return self.max_index - self.min_index + 1

    def index(self, value: float) -> int:
        """Bucket of a value in [min_value, max_value]."""
        return math.ceil(math.log(value) * (1.0 / math.log(self.gamma)))

    def indices(self, values: np.ndarray) -> np.ndarray:
        """Buckets of values already clipped to [min_value, max_value] (vectorised)."""
        idx = np.ceil(np.log(values) * (1.0 / math.log(self.gamma))).astype(np.int64)
        # log rounding can put min_value or max_value one bucket out of range
        return np.clip(idx, self.min_index, self.max_index)

    def value(self, index: int) -> float:
        """The value bucket `index` stands for (relative error <= alpha for its members)."""
        gamma = self.gamma
        return 2.0 * gamma**index / (gamma + 1.0)


DEFAULT_MAPPING = LogMapping()


class LogHistogram:
    """A DDSketch with a dense store bounded by its mapping's range; see the module docstring.

    Invariants (`check_invariants`): count == zero_count + sum(bucket counts); every bucket
    count >= 0; the store spans indices within [mapping.min_index, mapping.max_index].
    """

    __slots__ = ("_counts", "_offset", "count", "mapping", "max", "min", "sum", "zero_count")

    def __init__(self, mapping: LogMapping = DEFAULT_MAPPING) -> None:
        self.mapping = mapping
        self._counts = np.zeros(0, dtype=np.int64)
        self._offset = 0  # bucket index of _counts[0]
        self.zero_count = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    # --- adding -------------------------------------------------------------

    def add(self, value: float) -> None:
        """Count one value (NaN is refused: it has no rank)."""
        if value != value:
            raise ValueError("cannot add NaN to a LogHistogram")
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        m = self.mapping
        if value < m.min_value:
            self.zero_count += 1
            return
        i = m.index(min(value, m.max_value))
        i = min(max(i, m.min_index), m.max_index)
        self._extend(i, i)
        self._counts[i - self._offset] += 1

    def add_many(self, values: np.ndarray | Sequence[float]) -> None:
        """Count many values at once (vectorised; the same result as `add` for each)."""
        xs = np.asarray(values, dtype=np.float64).ravel()
        if xs.size == 0:
            return
        if np.isnan(xs).any():
            raise ValueError("cannot add NaN to a LogHistogram")
        m = self.mapping
        self.count += int(xs.size)
        self.sum += float(xs.sum())
        self.min = min(self.min, float(xs.min()))
        self.max = max(self.max, float(xs.max()))
        small = xs < m.min_value
        nsmall = int(small.sum())
        if nsmall:
            self.zero_count += nsmall
            xs = xs[~small]
            if xs.size == 0:
                return
        idx = m.indices(np.minimum(xs, m.max_value))
        lo, hi = int(idx.min()), int(idx.max())
        self._extend(lo, hi)
        counts = np.bincount(idx - lo, minlength=hi - lo + 1)
        start = lo - self._offset
        self._counts[start : start + counts.size] += counts

    def merge(self, other: LogHistogram) -> None:
        """Add `other`'s counts into this sketch (exact: as if its values had been added)."""
        if other.mapping != self.mapping:
            raise ValueError("cannot merge LogHistograms with different mappings")
        if other.count == 0:
            return
        self.count += other.count
        self.sum += other.sum
        self.zero_count += other.zero_count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        n = other._counts.size
        if n:
            lo = other._offset
            self._extend(lo, lo + n - 1)
            start = lo - self._offset
            self._counts[start : start + n] += other._counts

    @classmethod
    def merged(cls, sketches: Iterable[LogHistogram], mapping: LogMapping = DEFAULT_MAPPING) -> LogHistogram:
        """A new sketch holding the union of `sketches` (which are left as they are)."""
        out = cls(mapping)
        for s in sketches:
            out.merge(s)
        return out

    def clear(self) -> None:
        """Forget every value; the store's memory is released."""
        self._counts = np.zeros(0, dtype=np.int64)
        self._offset = 0
        self.zero_count = self.count = 0
        self.sum = 0.0
        self.min, self.max = math.inf, -math.inf

    # --- reading ------------------------------------------------------------

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 <= q <= 1) within relative error alpha; None when empty."""
        if not 0 <= q <= 1:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        if self.count == 0:
            return None
        return self._at_rank(q * (self.count - 1), None)

    def quantiles(self, qs: Sequence[float]) -> list[float] | None:
        """Several quantiles with one pass over the store; None when empty."""
        if any(not 0 <= q <= 1 for q in qs):
            raise ValueError(f"every q must be in [0, 1], got {list(qs)!r}")
        if self.count == 0:
            return None
        cum = np.cumsum(self._counts)
        return [self._at_rank(q * (self.count - 1), cum) for q in qs]

    def _at_rank(self, rank: float, cum: np.ndarray | None) -> float:
        k = math.floor(rank)  # the 0-based rank whose value we estimate
        if k < self.zero_count:
            return self.min
        if cum is None:
            cum = np.cumsum(self._counts)
        j = int(np.searchsorted(cum, k - self.zero_count, side="right"))
        assert j < cum.size, (k, self.count, self.zero_count)
        value = self.mapping.value(self._offset + j)
        return min(max(value, self.min), self.max)

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    @property
    def nbytes(self) -> int:
        """Bytes held by the bucket store (bounded by mapping.max_buckets x 8)."""
        return int(self._counts.nbytes)

    @property
    def buckets(self) -> int:
        """Counters the store spans now."""
        return int(self._counts.size)

    def copy(self) -> LogHistogram:
        out = LogHistogram(self.mapping)
        out.merge(self)
        return out

    def check_invariants(self) -> None:
        m = self.mapping
        assert self.count == self.zero_count + int(self._counts.sum()), "count mismatch"
        assert (self._counts >= 0).all(), "negative bucket count"
        if self._counts.size:
            assert m.min_index <= self._offset, (self._offset, m.min_index)
            assert self._offset + self._counts.size - 1 <= m.max_index
        assert self._counts.size <= m.max_buckets

    # --- store --------------------------------------------------------------

    def _extend(self, lo: int, hi: int) -> None:
        """Grow the store to span [lo, hi], with slack, never past the mapping's range."""
        n = self._counts.size
        if n and self._offset <= lo and hi < self._offset + n:
            return
        m = self.mapping
        if n:
            lo, hi = min(lo, self._offset), max(hi, self._offset + n - 1)
        slack = max(8, (hi - lo + 1) // 4)
        new_lo = max(m.min_index, lo - slack)
        new_hi = min(m.max_index, hi + slack)
        grown = np.zeros(new_hi - new_lo + 1, dtype=np.int64)
        if n:
            start = self._offset - new_lo
            grown[start : start + n] = self._counts
        self._counts = grown
        self._offset = new_lo


class BucketCounts:
    """Counts of values per fixed upper bound (`le`), plus +Inf, sum and count.

    Invariant: sum(counts) == count; bounds strictly increasing and finite.
    """

    __slots__ = ("_bounds", "bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        b = [float(x) for x in bounds]
        if not b or any(not math.isfinite(x) for x in b):
            raise ValueError("bounds must be a non-empty sequence of finite numbers")
        if any(b[i] >= b[i + 1] for i in range(len(b) - 1)):
            raise ValueError(f"bounds must be strictly increasing, got {b!r}")
        self.bounds: tuple[float, ...] = tuple(b)
        self._bounds = np.asarray(b, dtype=np.float64)
        self.counts = np.zeros(len(b) + 1, dtype=np.int64)  # last: above every bound
        self.count = 0
        self.sum = 0.0

    def add_many(self, values: np.ndarray | Sequence[float]) -> None:
        xs = np.asarray(values, dtype=np.float64).ravel()
        if xs.size == 0:
            return
        idx = np.searchsorted(self._bounds, xs, side="left")
        self.counts += np.bincount(idx, minlength=self.counts.size)
        self.count += int(xs.size)
        self.sum += float(xs.sum())

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, values <= it) for every bound, then (inf, count)."""
        cum = np.cumsum(self.counts)
        return [*zip(self.bounds, (int(c) for c in cum[:-1]), strict=True), (math.inf, int(cum[-1]))]

    def check_invariants(self) -> None:
        assert int(self.counts.sum()) == self.count, (self.counts, self.count)
