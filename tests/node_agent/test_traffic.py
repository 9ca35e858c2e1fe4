"""The traffic split, pure: model name -> version by weight, deterministic."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_agent.link.traffic import TrafficSplit

# --- traffic split --------------------------------------------------------------------------


def test_split_is_deterministic_and_exactly_proportioned_over_a_cycle() -> None:
    split = TrafficSplit({"classifier": {"1": 90, "2": 10}}, seed=0)
    seq = [split.choose("classifier") for _ in range(100)]
    assert seq.count("2") == 10 and seq.count("1") == 90
    assert seq == [TrafficSplit({"classifier": {"1": 90, "2": 10}}).pick("classifier", n) for n in range(100)]
    positions = [i for i, v in enumerate(seq) if v == "2"]
    gaps = {b - a for a, b in itertools.pairwise(positions)}
    assert max(gaps) <= 13  # spread out, never a burst of canary requests
    seeded = TrafficSplit({"classifier": {"1": 90, "2": 10}}, seed=7)
    assert [seeded.choose("classifier") for _ in range(100)] != seq  # the seed shifts the sequence
    assert TrafficSplit({"classifier": {"1": 90, "2": 10}}, seed=7).pick("classifier", 93) == split.pick(
        "classifier", 100
    )


@settings(max_examples=60, deadline=None)
@given(
    weights=st.dictionaries(st.sampled_from(["1", "2", "3", "2-rc1", "10"]), st.integers(0, 100), min_size=1),
    seed=st.integers(0, 2**32),
    start=st.integers(0, 10**9),
    n=st.integers(1, 2000),
)
def test_split_shares_stay_within_a_few_requests_of_the_weights(
    weights: dict[str, int], seed: int, start: int, n: int
) -> None:
    split = TrafficSplit({"m": weights}, seed=seed)
    total = sum(weights.values())
    counts: dict[str | None, int] = {}
    for i in range(start, start + n):
        v = split.pick("m", i)
        counts[v] = counts.get(v, 0) + 1
    if total == 0:
        assert counts == {None: n}
        return
    for version, weight in weights.items():
        assert abs(counts.get(version, 0) - n * weight / total) <= 3 + math.log2(n) / 4, (version, counts)
        if weight == 0:
            assert version not in counts


def test_split_without_weights_and_bad_weights() -> None:
    split = TrafficSplit({"m": {"1": 0, "2": 0}})
    assert split.choose("m") is None and split.choose("unknown") is None
    with pytest.raises(ValueError):
        split.set_weights({"m": {"1": -1}})
    split.set_weights({"m": {"2": 5}})
    assert split.choose("m") == "2" and split.weights == {"m": {"2": 5}}
