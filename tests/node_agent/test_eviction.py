"""Eviction policies: exact eviction orders on scripted sequences, the never-evict rules,
shortfalls as None, and property tests over random event sequences."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet_api.types import ModelId, Priority
from node_agent.runtime.eviction import (
    CostAwarePolicy,
    CostAwareSettings,
    EvictionPolicy,
    LRUPolicy,
    WeightedLRUPolicy,
    default_policy,
    seed_weight,
)

N = Priority.NORMAL


def mid(name: str) -> ModelId:
    return ModelId(name, "1")


A, B, C, D = mid("a"), mid("b"), mid("c"), mid("d")


def load(
    p: EvictionPolicy,
    m: ModelId,
    size: int = 100,
    load_s: float = 1.0,
    priority: Priority = N,
    now: float = 0.0,
    accesses: int = 1,
) -> None:
    """Access `m` `accesses` times (the first is the miss), then load it."""
    for _ in range(accesses):
        p.record_access(m, now)
    p.record_load(m, size, load_s, priority, now)


def fixed_half_life(accesses: float) -> CostAwareSettings:
    """Settings whose half-life is exactly `accesses`, whatever the model count."""
    return CostAwareSettings(half_life_per_model=1e-9, half_life_per_resident=1e-9, min_half_life=accesses)


# -- shared interface ------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [LRUPolicy, WeightedLRUPolicy, CostAwarePolicy])
def test_misuse_raises_and_shortfall_is_none(factory: type[EvictionPolicy]) -> None:
    p = factory()
    load(p, A, 100)
    with pytest.raises(ValueError, match="already resident"):
        p.record_load(A, 100, 1.0, N, 0.0)
    with pytest.raises(ValueError, match="not resident"):
        p.record_unload(B)
    with pytest.raises(ValueError, match="unload it"):
        p.forget(A)
    with pytest.raises(ValueError, match="negative"):
        p.record_load(B, -1, 1.0, N, 0.0)
    assert p.choose_victims(0, 1.0) == []
    assert p.choose_victims(-5, 1.0) == []
    assert p.choose_victims(101, 1.0) is None
    assert p.choose_victims(1, 1.0, protected={A}) is None
    assert p.choose_victims(100, 1.0) == [A]
    assert p.resident() == {A: 100}  # choosing changes nothing
    p.record_unload(A)
    assert p.resident() == {} and p.choose_victims(1, 1.0) is None
    p.forget(A)
    p.check_invariants()


@pytest.mark.parametrize("factory", [LRUPolicy, WeightedLRUPolicy, CostAwarePolicy])
def test_protected_models_are_never_chosen(factory: type[EvictionPolicy]) -> None:
    p = factory()
    for i, m in enumerate((A, B, C, D)):
        load(p, m, 100, now=float(i))
    victims = p.choose_victims(200, 10.0, protected={A, B})
    assert victims is not None and sorted(victims, key=str) == [C, D]
    assert p.choose_victims(201, 10.0, protected={A, B}) is None
    assert p.choose_victims(400, 10.0) is not None
    assert p.choose_victims(1, 10.0, protected={A, B, C, D}) is None


@pytest.mark.parametrize("factory", [LRUPolicy, WeightedLRUPolicy, CostAwarePolicy])
def test_victims_a_later_larger_victim_makes_unneeded_are_dropped(
    factory: type[EvictionPolicy],
) -> None:
    # In every policy's order a and b (small, cold) go before c (big, loaded last).
    p = factory()
    load(p, A, 1, now=0.0)
    load(p, B, 1, now=1.0)
    load(p, C, 100, load_s=100.0, now=2.0)  # same reload seconds per byte as a and b
    p.record_access(C, 3.0)
    assert p.choose_victims(2, 4.0) == [A, B]
    assert p.choose_victims(50, 4.0) == [C]  # a and b would not be needed
    assert p.choose_victims(101, 4.0) == [A, C]  # b is spared
    assert p.choose_victims(102, 4.0) == [A, B, C]
    assert p.choose_victims(103, 4.0) is None


# -- LRU -------------------------------------------------------------------------------------


def test_lru_exact_order() -> None:
    p = LRUPolicy()
    for i, m in enumerate((A, B, C)):
        load(p, m, 100, now=float(i))
    p.record_access(A, 3.0)
    p.record_access(D, 3.5)  # not resident: ignored
    assert p.choose_victims(1, 4.0) == [B]
    assert p.choose_victims(250, 4.0) == [B, C, A]
    p.record_access(B, 5.0)
    assert p.choose_victims(300, 6.0) == [C, A, B]
    p.record_unload(C)
    load(p, C, 100, now=7.0)
    assert p.choose_victims(300, 8.0) == [A, B, C]
    p.check_invariants()


# -- the seeds' weighted LRU -----------------------------------------------------------------


def test_weighted_lru_scores_and_order() -> None:
    p = WeightedLRUPolicy()
    load(p, A, 100, now=0.0, accesses=3)  # uses 3, last used 0
    load(p, B, 100, now=5.0)  # uses 1, last used 5
    load(p, C, 100, now=8.0, priority=Priority.CRITICAL)  # uses 1, weight 4
    assert seed_weight(Priority.CRITICAL) == 4 and seed_weight(Priority.LOW) == 1
    assert p.score(A, 20.0) == pytest.approx(20 / (2 * 4))
    assert p.score(B, 20.0) == pytest.approx(15 / (2 * 2))
    assert p.score(C, 20.0) == pytest.approx(12 / (4 * 2))
    assert p.choose_victims(300, 20.0) == [B, A, C]
    # A use refreshes idle time and the count; the count survives an eviction.
    p.record_access(B, 19.0)
    assert p.choose_victims(1, 20.0) == [A]
    p.record_unload(B)
    load(p, B, 100, now=30.0)
    assert p.score(B, 40.0) == pytest.approx(10 / (2 * 4))  # 3 uses in all


# -- ours: cost-aware, decayed frequency -----------------------------------------------------


def test_cost_aware_evicts_the_least_frequently_used() -> None:
    p = CostAwarePolicy()
    load(p, A, accesses=3)
    load(p, B, accesses=1)
    load(p, C, accesses=2)
    assert p.choose_victims(300, 0.0) == [B, C, A]
    for _ in range(5):
        p.record_access(B, 0.0)
    assert p.choose_victims(300, 0.0) == [C, A, B]
    p.check_invariants()


def test_cost_aware_weighs_size_and_reload_cost() -> None:
    p = CostAwarePolicy()
    load(p, A, size=100, load_s=1.0)
    load(p, B, size=400, load_s=1.0)  # same reload time, 4x the bytes: cheaper to keep out
    load(p, C, size=100, load_s=0.1)  # same bytes, 10x faster to reload
    load(p, D, size=100, load_s=1.0, accesses=8)  # used 8x as often

    def log_freq_ratio(x: ModelId, y: ModelId) -> float:
        return math.log2(p.frequency(x) / p.frequency(y))

    assert p.key(A) - p.key(B) == pytest.approx(log_freq_ratio(A, B) + 2.0, abs=1e-9)
    assert p.key(A) - p.key(C) == pytest.approx(log_freq_ratio(A, C) + math.log2(10), abs=1e-9)
    assert p.choose_victims(1, 0.0) == [C]
    assert p.choose_victims(400, 0.0) == [B]
    assert p.choose_victims(700, 0.0) == [C, B, A, D]


def test_cost_aware_priority_weights() -> None:
    p = CostAwarePolicy()
    load(p, A, accesses=3)  # NORMAL, 3 uses
    load(p, B, accesses=1, priority=Priority.CRITICAL)  # weight 4: as if 4 uses
    load(p, C, accesses=3, priority=Priority.LOW)  # weight 1/2: as if 1.5 uses
    load(p, D, accesses=1, priority=Priority.HIGH)  # weight 2: as if 2 uses
    assert p.choose_victims(400, 0.0) == [C, D, A, B]


def test_cost_aware_frequencies_decay_by_accesses() -> None:
    p = CostAwarePolicy(fixed_half_life(10))
    load(p, A, accesses=8)
    # 8 accesses, each 0.1 half-lives apart: sum of 2^(-0.1 k), k = 0..7.
    assert p.frequency(A) == pytest.approx(sum(2 ** (-0.1 * k) for k in range(8)))
    load(p, B, accesses=2)
    assert p.choose_victims(1, 0.0) == [B]
    for _ in range(100):  # 10 half-lives of accesses to another model
        p.record_access(C, 0.0)
    assert p.frequency(A) == pytest.approx(sum(2 ** (-0.1 * k) for k in range(8)) * 2 ** (-10.2), rel=1e-9)
    assert p.frequency(B) == pytest.approx((1 + 2**-0.1) * 2**-10, rel=1e-9)
    p.record_access(B, 0.0)  # one fresh use now outweighs A's old eight
    assert p.choose_victims(1, 0.0) == [A]
    p.check_invariants()


def test_cost_aware_half_life_scales_with_models() -> None:
    s = CostAwareSettings()
    p = CostAwarePolicy(s)
    assert p.half_life == s.min_half_life
    for i in range(100):
        p.record_access(mid(f"m{i}"), 0.0)
    assert p.half_life == pytest.approx(s.half_life_per_model * 100)
    for i in range(40):
        p.record_load(mid(f"m{i}"), 1, 1.0, N, 0.0)
    assert p.half_life == pytest.approx(max(200, s.half_life_per_resident * 40))


def test_cost_aware_reload_and_smoothed_load_time() -> None:
    p = CostAwarePolicy()
    load(p, A, load_s=1.0)
    load(p, B, load_s=1.0)
    key_b = p.key(B)
    p.record_unload(A)
    load(p, A, load_s=3.0)  # smoothed reload cost: 0.5 * 3 + 0.5 * 1 = 2 s
    assert key_b == p.key(B)
    expected = math.log2(p.frequency(A) / p.frequency(B)) + 1.0  # 2 s vs 1 s per 100 bytes
    assert p.key(A) - p.key(B) == pytest.approx(expected, abs=1e-9)
    victims = p.choose_victims(200, 0.0)
    assert victims is not None and sorted(victims, key=str) == [A, B]  # one entry per model
    assert len(victims) == 2
    p.check_invariants()


def test_cost_aware_forgets_the_least_used_history_beyond_its_bound() -> None:
    p = CostAwarePolicy(CostAwareSettings(max_history=4))
    load(p, A, accesses=5)
    for i in range(20):
        p.record_access(mid(f"cold{i}"), 0.0)
    assert p.frequency(mid("cold0")) == 0.0  # the oldest, least used were forgotten
    assert p.frequency(mid("cold19")) > 0
    assert p.frequency(A) > 0  # resident models are never forgotten
    p.check_invariants()


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        CostAwareSettings(min_half_life=0)
    with pytest.raises(ValueError):
        CostAwareSettings(load_seconds_smoothing=0)
    with pytest.raises(ValueError):
        CostAwareSettings(max_history=0)
    assert isinstance(default_policy(), CostAwarePolicy)


# -- properties over random event sequences --------------------------------------------------

MODELS = [mid(f"m{i}") for i in range(8)]

events = st.lists(
    st.one_of(
        st.tuples(st.just("access"), st.sampled_from(MODELS)),
        st.tuples(
            st.just("load"),
            st.sampled_from(MODELS),
            st.integers(0, 50),
            st.floats(0.0, 5.0),
            st.sampled_from(list(Priority)),
        ),
        st.tuples(st.just("unload"), st.sampled_from(MODELS)),
        st.tuples(
            st.just("choose"), st.integers(-5, 200), st.frozensets(st.sampled_from(MODELS), max_size=4)
        ),
    ),
    max_size=60,
)


class Reference:
    """What an LRU and the seed's weighted LRU must do, written the obvious way."""

    def __init__(self) -> None:
        self.last: dict[ModelId, float] = {}
        self.uses: dict[ModelId, int] = {}
        self.weight: dict[ModelId, int] = {}


@pytest.mark.parametrize("factory", [LRUPolicy, WeightedLRUPolicy, CostAwarePolicy])
@settings(max_examples=150, deadline=None)
@given(script=events)
def test_policy_properties(factory: type[EvictionPolicy], script: list[tuple]) -> None:
    p = factory()
    sizes: dict[ModelId, int] = {}
    recency: list[ModelId] = []  # resident, least recently used first
    ref = Reference()
    now = 0.0
    for event in script:
        now += 1.0
        kind = event[0]
        if kind == "access":
            m = event[1]
            p.record_access(m, now)
            ref.last[m] = now
            ref.uses[m] = ref.uses.get(m, 0) + 1
            if m in recency:
                recency.remove(m)
                recency.append(m)
        elif kind == "load" and event[1] not in sizes:
            _, m, size, load_s, prio = event
            p.record_access(m, now)
            ref.last[m] = now
            ref.uses[m] = ref.uses.get(m, 0) + 1
            p.record_load(m, size, load_s, prio, now)
            sizes[m] = size
            recency.append(m)
            ref.weight[m] = seed_weight(prio)
        elif kind == "unload" and event[1] in sizes:
            p.record_unload(event[1])
            del sizes[event[1]]
            recency.remove(event[1])
        elif kind == "choose":
            _, need, protected = event
            victims = p.choose_victims(need, now, protected)
            evictable = sum(s for m, s in sizes.items() if m not in protected)
            if need <= 0:
                assert victims == []
            elif evictable < need:
                assert victims is None
            else:
                assert victims is not None and victims
                assert len(set(victims)) == len(victims)
                assert all(v in sizes and v not in protected for v in victims)
                freed = sum(sizes[v] for v in victims)
                assert freed >= need
                assert all(freed - sizes[v] < need for v in victims), "an unneeded victim"
                candidates = [m for m in sizes if m not in protected]
                first = _first_choice(p, candidates, recency, ref, now)
                if first is not None and sizes[first] >= need:
                    assert victims == [first]
        assert p.resident() == sizes
        p.check_invariants()


def _first_choice(
    p: EvictionPolicy, candidates: list[ModelId], recency: list[ModelId], ref: Reference, now: float
) -> ModelId | None:
    """The model each policy must evict first, by brute force (None: ties make it open)."""
    if isinstance(p, LRUPolicy):
        return next(m for m in recency if m in candidates)
    if isinstance(p, WeightedLRUPolicy):
        scores = {m: (now - ref.last[m]) / (ref.weight[m] * (ref.uses[m] + 1)) for m in candidates}
        best = max(scores.values())
        tied = [m for m in candidates if scores[m] == best]
        return tied[0] if len(tied) == 1 else None
    assert isinstance(p, CostAwarePolicy)
    keys = {m: p.key(m) for m in candidates}
    best = min(keys.values())
    tied = [m for m in candidates if keys[m] == best]
    return tied[0] if len(tied) == 1 else None
