"""LogHistogram (DDSketch) accuracy against numpy, merging, bounded memory; BucketCounts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_agent.control.sketch import BucketCounts, LogHistogram, LogMapping

QS = (0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)


def assert_within(sketch: LogHistogram, values: np.ndarray, qs: tuple[float, ...] = QS) -> None:
    """Every estimate within alpha (relative) of numpy's exact 'lower' quantile."""
    alpha = sketch.mapping.alpha
    got = sketch.quantiles(qs)
    assert got is not None
    for q, est in zip(qs, got, strict=True):
        exact = float(np.quantile(values, q, method="lower"))
        assert abs(est - exact) <= alpha * abs(exact) * (1 + 1e-9), (q, est, exact)
        assert sketch.quantile(q) == est


def latency_like(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "lognormal": rng.lognormal(mean=math.log(0.02), sigma=0.8, size=n),
        "exponential": rng.exponential(0.005, size=n) + 1e-4,
        "uniform": rng.uniform(0.001, 0.1, size=n),
        "bimodal": np.concatenate(
            [rng.normal(0.01, 0.001, n // 2).clip(1e-4), rng.normal(0.5, 0.05, n - n // 2).clip(1e-4)]
        ),
        "heavy_tail": (rng.pareto(1.5, size=n) + 1) * 0.002,
    }


@pytest.mark.parametrize("alpha", [0.01, 0.02, 0.05])
def test_quantiles_are_within_alpha_of_numpy(alpha: float) -> None:
    rng = np.random.default_rng(7)
    for name, values in latency_like(rng, 20_000).items():
        sketch = LogHistogram(LogMapping(alpha=alpha))
        sketch.add_many(values)
        sketch.check_invariants()
        assert sketch.count == values.size, name
        assert sketch.sum == pytest.approx(values.sum(), rel=1e-9)
        assert sketch.min == values.min() and sketch.max == values.max()
        assert_within(sketch, values)


def test_default_accuracy_against_numpy_default_percentile() -> None:
    """Against numpy's default (linear interpolation) the tail quantiles of a few thousand
    latencies are still within ~1 % + the gap between neighbouring samples."""
    rng = np.random.default_rng(3)
    values = rng.lognormal(math.log(0.03), 0.5, size=5000)
    sketch = LogHistogram()
    sketch.add_many(values)
    for p in (50, 95, 99):
        exact = float(np.percentile(values, p))
        est = sketch.quantile(p / 100)
        assert est is not None
        assert abs(est - exact) / exact < 0.02, (p, est, exact)


def test_add_one_by_one_equals_add_many() -> None:
    rng = np.random.default_rng(11)
    values = rng.lognormal(math.log(0.01), 1.5, size=3000)
    a, b = LogHistogram(), LogHistogram()
    for v in values:
        a.add(float(v))
    b.add_many(values)
    assert a.count == b.count
    assert a.quantiles(QS) == b.quantiles(QS)
    assert a.zero_count == b.zero_count


def test_merge_is_exact() -> None:
    """Merging per-second sketches gives the sketch of all values (what windows rely on)."""
    rng = np.random.default_rng(5)
    parts = [rng.lognormal(math.log(0.005 * (i + 1)), 0.3, size=500) for i in range(10)]
    whole = LogHistogram()
    whole.add_many(np.concatenate(parts))
    pieces = []
    for p in parts:
        s = LogHistogram()
        s.add_many(p)
        pieces.append(s)
    merged = LogHistogram.merged(pieces)
    merged.check_invariants()
    assert merged.count == whole.count
    assert merged.quantiles(QS) == whole.quantiles(QS)
    assert merged.sum == pytest.approx(whole.sum)
    assert [p.count for p in pieces] == [500] * 10  # inputs untouched
    assert_within(merged, np.concatenate(parts))


def test_merge_refuses_other_mapping() -> None:
    a, b = LogHistogram(LogMapping(alpha=0.01)), LogHistogram(LogMapping(alpha=0.02))
    b.add(1.0)
    with pytest.raises(ValueError, match="different mappings"):
        a.merge(b)


def test_memory_is_bounded_by_the_mapping_range_not_the_count() -> None:
    m = LogMapping(alpha=0.01, min_value=1e-5, max_value=1e4)
    rng = np.random.default_rng(1)
    sketch = LogHistogram(m)
    # a million values over the whole range and beyond both ends
    for _ in range(10):
        sketch.add_many(10 ** rng.uniform(-7, 6, size=100_000))
    sketch.check_invariants()
    assert sketch.count == 1_000_000
    assert sketch.buckets <= m.max_buckets
    assert sketch.nbytes <= m.max_buckets * 8
    assert m.max_buckets < 1100  # ~1,037 counters: 8.3 KB at most
    before = sketch.nbytes
    sketch.add_many(10 ** rng.uniform(-7, 6, size=100_000))
    assert sketch.nbytes == before  # more values, no more memory


def test_narrow_distribution_uses_few_buckets() -> None:
    """One second of latencies around 20 ms spans a few dozen buckets, not the full range."""
    rng = np.random.default_rng(2)
    sketch = LogHistogram()
    sketch.add_many(rng.normal(0.02, 0.002, size=10_000).clip(0.01))
    assert sketch.buckets < 100
    assert sketch.nbytes < 1000


def test_values_outside_the_range() -> None:
    m = LogMapping(alpha=0.01, min_value=1e-3, max_value=10.0)
    sketch = LogHistogram(m)
    sketch.add_many([0.0, 0.0, 0.0005, 0.5, 1.0, 50.0, 100.0])
    sketch.check_invariants()
    assert sketch.zero_count == 3
    assert sketch.quantile(0.0) == 0.0  # the smallest seen
    top = sketch.quantile(1.0)
    assert top is not None and top <= 100.0  # reported at most the largest seen
    mid = sketch.quantile(0.5)
    assert mid is not None and abs(mid - 0.5) <= 0.01 * 0.5


def test_empty_and_misuse() -> None:
    sketch = LogHistogram()
    assert sketch.quantile(0.5) is None
    assert sketch.quantiles([0.5]) is None
    assert sketch.mean is None
    with pytest.raises(ValueError):
        sketch.quantile(1.5)
    with pytest.raises(ValueError, match="NaN"):
        sketch.add(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        sketch.add_many([1.0, float("nan")])
    with pytest.raises(ValueError):
        LogMapping(alpha=0.0)
    with pytest.raises(ValueError):
        LogMapping(min_value=1.0, max_value=0.5)


def test_clear_releases_everything() -> None:
    sketch = LogHistogram()
    sketch.add_many(np.linspace(0.001, 1.0, 1000))
    sketch.clear()
    assert sketch.count == 0 and sketch.nbytes == 0 and sketch.quantile(0.5) is None
    sketch.add(0.25)
    assert sketch.quantile(0.5) == pytest.approx(0.25, rel=0.01)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(min_value=1e-5, max_value=1e4, allow_nan=False), min_size=1, max_size=300),
    st.sampled_from([0.005, 0.01, 0.03]),
)
def test_guarantee_holds_for_any_input(values: list[float], alpha: float) -> None:
    sketch = LogHistogram(LogMapping(alpha=alpha))
    half = len(values) // 2
    sketch.add_many(values[:half])
    for v in values[half:]:
        sketch.add(v)
    sketch.check_invariants()
    assert_within(sketch, np.asarray(values))


def test_bucket_counts_match_numpy_with_le_semantics() -> None:
    bounds = (0.001, 0.01, 0.1, 1.0)
    values = np.array([0.0005, 0.001, 0.002, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0])
    counts = BucketCounts(bounds)
    counts.add_many(values[:4])
    counts.add_many(values[4:])
    counts.check_invariants()
    cum = counts.cumulative()
    assert cum == [(0.001, 2), (0.01, 4), (0.1, 6), (1.0, 8), (math.inf, 10)]
    for le, n in cum:
        assert n == int((values <= le).sum())
    assert counts.sum == pytest.approx(values.sum())
    with pytest.raises(ValueError):
        BucketCounts([1.0, 1.0])
    with pytest.raises(ValueError):
        BucketCounts([])
