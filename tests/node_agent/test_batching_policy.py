"""The pure batching policy: fake time, exact service-time models."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet_api.sla import SlaObjectives
from node_agent.runtime.batching_policy import (
    AdaptivePolicy,
    AdaptiveSettings,
    ArrivalRate,
    BatchingDecision,
    ServiceModel,
    SloTarget,
    StaticPolicy,
    batch_window_s,
    policy_for,
    slo_targets,
)
from node_agent.types import ModelConfig, TensorSpec


def linear(fixed_s: float, per_row_s: float) -> Callable[[int], float]:
    return lambda b: fixed_s + per_row_s * b


def feed(policy: AdaptivePolicy | ServiceModel, t0: float, seconds: float, sizes: list[int],
         service: Callable[[int], float], latency_s: float = 0.0) -> float:  # fmt: skip
    """Back-to-back batches cycling through `sizes` for `seconds` of fake time; returns end.

    Every request is reported with `latency_s` (0: all within any SLO)."""
    t, i = t0, 0
    while t < t0 + seconds:
        b = sizes[i % len(sizes)]
        s = service(b)
        t += s
        if isinstance(policy, ServiceModel):
            policy.observe(t, b, s)
        else:
            policy.observe(t, b, s, [latency_s] * b)
        i += 1
    return t


def adaptive(slo_s: float = 0.1, max_batch: int = 64, **kw: object) -> AdaptivePolicy:
    return AdaptivePolicy(
        AdaptiveSettings(max_batch_size=max_batch, targets=(SloTarget(slo_s, 0.99),), **kw)  # type: ignore[arg-type]
    )


# --- service model ----------------------------------------------------------------


def test_service_model_fits_a_linear_cost_exactly() -> None:
    m = ServiceModel()
    assert not m.known and m.predict(8) == 0.0
    feed(m, 0.0, 2.0, [1, 4, 16, 32], linear(0.002, 0.0005))
    assert m.fixed_s == pytest.approx(0.002, rel=1e-6)
    assert m.per_row_s == pytest.approx(0.0005, rel=1e-6)
    assert m.largest_batch_within(0.010, 64) == 16
    assert m.largest_batch_within(0.001, 64) == 0
    assert m.largest_batch_within(1.0, 64) == 64


def test_service_model_without_spread_uses_a_cautious_prior() -> None:
    m = ServiceModel()
    feed(m, 0.0, 1.0, [8], linear(0.008, 0.0))  # always 8 rows, 8 ms
    assert m.predict(8) == pytest.approx(0.008)
    # a tenth fixed, the rest per row: 16 rows are predicted to take ~1.9x as long
    assert m.fixed_s == pytest.approx(0.0008) and m.per_row_s == pytest.approx(0.0009)


def test_service_model_forgets_at_once_after_a_shock() -> None:
    m = ServiceModel()
    t = feed(m, 0.0, 3.0, [1, 8, 32], linear(0.001, 0.0002))
    m.observe(t + 0.1, 32, 0.1)  # 10x slower: the model throttled
    t = feed(m, t + 0.1, 0.05, [4, 16], linear(0.01, 0.002))
    assert m.predict(32) == pytest.approx(0.01 + 0.002 * 32, rel=0.25)


def test_service_model_tracks_a_gradual_change_within_seconds() -> None:
    m = ServiceModel(halflife_s=1.0)
    t = feed(m, 0.0, 5.0, [2, 8, 16], linear(0.002, 0.001))
    feed(m, t, 4.0, [2, 8, 16], linear(0.003, 0.0015))  # 1.5x: no single batch surprises
    assert m.predict(16) == pytest.approx(0.003 + 0.0015 * 16, rel=0.1)


# --- adaptive plan ----------------------------------------------------------------


def test_plan_is_the_largest_batch_that_fits_the_slo() -> None:
    p = adaptive(slo_s=0.05)
    d0 = p.decision()  # nothing known yet: max batch, textbook delay
    assert (d0.batch_size, d0.delay_s) == (64, pytest.approx(0.015))
    s = linear(0.002, 0.001)
    feed(p, 0.0, 2.0, [1, 8, 32], s)
    d = p.decision()
    # the delay is the textbook 0.3 x SLO scaled by the fixed share of the batch's time
    assert d.delay_s == pytest.approx(0.3 * 0.05 * 0.002 / s(d.batch_size))
    # delay + 2 s(B) <= SLO, and one more row would not fit
    assert d.delay_s + 2 * s(d.batch_size) <= 0.05 < d.delay_s + 2 * s(d.batch_size + 1)
    assert d.batch_size == 22
    # queue bound: what can be served within the SLO behind a running batch
    assert d.queue_limit_rows == math.floor(0.05 / s(22) - 1) * 22
    p.check_invariants()


def test_batches_stop_growing_at_the_throughput_knee() -> None:
    p = adaptive(slo_s=0.1)
    s = linear(0.002, 0.001)
    feed(p, 0.0, 2.0, [1, 8, 32], s)
    d = p.decision()
    # 38 rows reach 95% of the asymptotic 1000 rows/s: 38 / s(38) = 950; the SLO would allow 47
    assert d.batch_size == 38 and 38 / s(38) == pytest.approx(950)
    assert d.delay_s + 2 * s(47) <= 0.1
    per_row_only = adaptive(slo_s=0.1)
    feed(per_row_only, 0.0, 2.0, [1, 4, 16], linear(0.0, 0.002))
    assert per_row_only.decision().batch_size == 1  # batching buys nothing: no added latency


def test_waiting_pays_only_where_batching_amortises_a_fixed_cost() -> None:
    overhead = adaptive(slo_s=0.1)  # per-call overhead dominates (a GPU, a tiny model)
    feed(overhead, 0.0, 2.0, [1, 16, 64], linear(0.004, 0.00001))
    per_row = adaptive(slo_s=0.1)  # every row costs the same (a CNN on one CPU core)
    feed(per_row, 0.0, 2.0, [1, 4, 16], linear(0.00002, 0.002))
    # 0.3 x SLO scaled by the fixed share (~0.86) would be ~26 ms: the window is capped at one
    # full batch's service time (and `max_window_s`), whatever the SLO
    assert overhead.decision().delay_s == pytest.approx(0.004 + 0.00001 * 64)
    assert per_row.decision().delay_s < 0.001


def test_plan_shrinks_when_the_model_slows_and_grows_when_it_recovers() -> None:
    p = adaptive(slo_s=0.1)
    t = feed(p, 0.0, 2.0, [4, 16, 32], linear(0.002, 0.0005))
    fast = p.decision().batch_size
    t = feed(p, t, 2.0, [4, 16, 32], linear(0.006, 0.0025))  # thermal throttle: 5x per row
    slow = p.decision().batch_size
    d = p.decision()
    throttled = linear(0.006, 0.0025)
    assert d.delay_s + 2 * throttled(slow) <= 0.1 < d.delay_s + 2 * throttled(slow + 1)
    feed(p, t, 2.0, [4, 8, slow], linear(0.002, 0.0005))
    recovered = p.decision().batch_size
    assert fast == 64 and recovered == 64 and slow < fast // 3
    d, s = p.decision(), linear(0.002, 0.0005)
    assert d.delay_s + 2 * s(d.batch_size) <= 0.1
    p.check_invariants()


def test_infeasible_slo_does_not_wait_and_batches_while_one_batch_fits() -> None:
    p = adaptive(slo_s=0.02)
    feed(p, 0.0, 1.0, [1, 16, 64], linear(0.012, 0.00001))  # per-call overhead dominates
    d = p.decision()
    # two 12 ms batches miss 20 ms: a whole batch alone still fits, so keep batching
    assert d.batch_size == 64 and d.delay_s == 0.0 and d.queue_limit_rows == 64
    per_row = adaptive(slo_s=0.02)
    feed(per_row, 0.0, 1.0, [1, 4], linear(0.004, 0.008))
    d = per_row.decision()  # one row: 12 ms; 2 rows 20 ms fit the budget alone, 3 do not
    assert d.batch_size == 2 and d.delay_s == 0.0
    hopeless = adaptive(slo_s=0.02)
    feed(hopeless, 0.0, 1.0, [1, 4], linear(0.03, 0.001))
    assert hopeless.decision().batch_size == 1  # nothing fits: single rows, no waiting


def test_aimd_cuts_the_budget_on_misses_and_restores_it_additively() -> None:
    p = adaptive(slo_s=0.1, adapt_interval_s=0.5)
    t = feed(p, 0.0, 4.0, [8, 16], linear(0.002, 0.0005), latency_s=0.2)  # all miss the SLO
    assert p.fraction == 0.5  # 0.85 per interval, floored at 0.5
    low = p.decision()
    assert low.batch_size < 64  # planned against half the SLO
    t = feed(p, t, 1.0, [8, 16], linear(0.002, 0.0005), latency_s=0.01)
    assert round(p.fraction, 9) in (0.55, 0.6)  # +0.05 per good interval (1-2 in 1 s)
    feed(p, t, 10.0, [8, 16], linear(0.002, 0.0005), latency_s=0.01)
    assert p.fraction == 1.0
    assert p.decision().batch_size > low.batch_size


def test_a_few_misses_within_the_quantile_are_tolerated() -> None:
    p = adaptive(slo_s=0.1, adapt_interval_s=0.5)
    t = 0.0
    for i in range(400):  # 0.5% of requests over the p99 target: within it
        t += 0.005
        p.observe(t, 1, 0.005, [0.5 if i % 200 == 0 else 0.01])
    assert p.fraction == 1.0


def test_p95_and_p99_targets_are_each_checked() -> None:
    p = AdaptivePolicy(AdaptiveSettings(
        max_batch_size=16, targets=(SloTarget(0.2, 0.99), SloTarget(0.1, 0.95))
    ))  # fmt: skip
    t = 0.0
    for i in range(200):  # 10% over the p95 target, none over the p99 target
        t += 0.005
        p.observe(t, 1, 0.005, [0.15 if i % 10 == 0 else 0.01])
    assert p.fraction < 1.0
    d = p.decision()  # plans on the tighter target
    assert d.delay_s + 2 * p.predict_service_s(d.batch_size) <= 0.1 * p.fraction


def test_retry_after_grows_with_the_queue() -> None:
    p = adaptive(slo_s=0.1)
    feed(p, 0.0, 1.0, [4, 16], linear(0.002, 0.001))
    assert 0 < p.retry_after_s(1) < p.retry_after_s(500)


@settings(max_examples=80, deadline=None)
@given(
    fixed=st.floats(0.0, 0.05),
    per_row=st.floats(1e-5, 0.01),
    slo=st.floats(0.005, 2.0),
    max_batch=st.integers(1, 256),
    workers=st.integers(1, 4),
)
def test_plan_invariants_hold_for_any_model(
    fixed: float, per_row: float, slo: float, max_batch: int, workers: int
) -> None:
    p = adaptive(slo_s=slo, max_batch=max_batch, workers=workers)
    sizes = sorted({1, max(1, max_batch // 2), max_batch})
    cost, t = linear(fixed, per_row), 0.0
    for i in range(90):  # 30 rounds of the sizes, ~1.5 s of fake time or more
        b = sizes[i % len(sizes)]
        t += max(cost(b), 0.05)
        p.observe(t, b, cost(b), [0.0] * b)
    p.check_invariants()
    d = p.decision()
    s = p.service.predict
    assert d.delay_s <= 0.3 * slo
    if 2 * s(1) <= slo * (1 - 0.3):  # feasible: the plan fits the SLO, as large as it can
        assert d.delay_s + 2 * s(d.batch_size) <= slo * (1 + 1e-9)
        knee = p.service.per_row_s <= 0 or d.batch_size / s(d.batch_size) >= 0.95 * (
            1 / p.service.per_row_s
        ) * (1 - 1e-9)
        assert d.batch_size == max_batch or knee or d.delay_s + 2 * s(d.batch_size + 1) > slo * (1 - 1e-9)
        if d.batch_size > 1:  # and no larger than the knee
            assert (d.batch_size - 1) / s(d.batch_size - 1) < 0.95 / p.service.per_row_s
    else:  # infeasible: no waiting; one batch alone within the SLO (or a single row)
        assert d.delay_s == 0
        assert d.batch_size == 1 or s(d.batch_size) <= slo * (1 + 1e-9)


# --- static policy and selection --------------------------------------------------


def _config(**kw: object) -> ModelConfig:
    return ModelConfig(
        name="m", version="1", format="torchscript",
        inputs=(TensorSpec("x", "FP32", (4,)),), outputs=(TensorSpec("y", "FP32", (2,)),),
        artifact="model.pt", digest="sha256:" + "0" * 64, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_policy_for_follows_the_model_sla() -> None:
    static = policy_for(_config(max_batch_size=12, max_queue_delay_s=0.004))
    assert isinstance(static, StaticPolicy)
    d = static.decision()
    assert (d.batch_size, d.delay_s) == (12, 0.004)
    static.observe(1.0, 12, 0.01, [0.01])
    assert static.decision() == d and static.predict_service_s(12) == pytest.approx(0.01)

    adaptive_ = policy_for(_config(sla=SlaObjectives(p95_latency_s=0.05, p99_latency_s=0.08)), workers=2)
    assert isinstance(adaptive_, AdaptivePolicy)
    assert slo_targets(_config(sla=SlaObjectives(p95_latency_s=0.05))) == (SloTarget(0.05, 0.95),)
    assert adaptive_.decision().delay_s == pytest.approx(0.3 * 0.05)  # nothing known yet


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        StaticPolicy(0, 0.0, 10)
    with pytest.raises(ValueError, match="queue_limit_rows"):
        StaticPolicy(8, 0.0, 4)
    with pytest.raises(ValueError, match="SloTarget"):
        AdaptiveSettings(max_batch_size=8, targets=())
    with pytest.raises(ValueError, match="quantile"):
        SloTarget(0.1, 1.5)
    with pytest.raises(ValueError, match="halflife"):
        ServiceModel(0)


# --- batch window vs arrivals ---------------------------------------------------------


def test_a_loose_slo_does_not_make_partial_batches_wait_seconds() -> None:
    p = adaptive(slo_s=30.0)  # "anything under 30 s is fine": 0.3 x SLO would be 9 s
    assert p.decision().delay_s <= 0.02  # nothing known yet: the absolute cap
    feed(p, 0.0, 2.0, [1, 16, 64], linear(0.002, 0.00001))  # a GPU: per-call cost dominates
    d = p.decision()
    assert d.batch_size == 64
    assert d.delay_s == pytest.approx(0.002 + 0.00001 * 64)  # one full batch's service time
    assert d.delay_s <= p.settings.max_window_s
    p.check_invariants()


def test_a_lone_sequential_client_is_served_without_a_window() -> None:
    p = adaptive(slo_s=30.0)
    feed(p, 0.0, 2.0, [1, 16, 64], linear(0.002, 0.00001))
    d = p.decision()
    t = 10.0
    for _ in range(20):  # one request in flight at a time: each arrives after the last answer
        p.observe_arrival(t, 1)
        w = p.window_s(t, d, 1)
        assert w == 0.0  # not even one more row is expected within the window: go now
        t += w + 0.002 + 0.001  # its service, then the client's turn-around
    assert p.window_s(t + 5.0, d, 1) == 0.0  # after a silence too


def test_the_window_waits_for_rows_that_are_coming_but_no_longer_than_they_need() -> None:
    p = adaptive(slo_s=30.0)
    feed(p, 0.0, 2.0, [1, 16, 64], linear(0.002, 0.00001))
    d = p.decision()
    t = 10.0
    for _ in range(50):  # 40 000 rows/s arriving: a batch of 64 fills in 1.6 ms
        t += 0.000025
        p.observe_arrival(t, 1)
    w = p.window_s(t, d, 1)
    assert 0.0 < w <= d.delay_s
    assert w == pytest.approx(63 / 40000, rel=0.05)
    assert p.window_s(t, d, 64) == 0.0  # full: nothing to wait for
    slower = adaptive(slo_s=30.0)
    feed(slower, 0.0, 2.0, [1, 16, 64], linear(0.002, 0.00001))
    for k in range(50):  # 2 000 rows/s: 63 rows take 31 ms, more than the cap
        slower.observe_arrival(10.0 + k * 0.0005, 1)
    assert slower.window_s(10.0 + 49 * 0.0005, d, 1) == d.delay_s


def test_batch_window_is_bounded_by_the_delay_and_the_arrivals() -> None:
    assert batch_window_s(9.0, 63, None) == 0.0  # nothing measured: no row expected
    assert batch_window_s(0.01, 63, 1000.0) == 0.01  # 63 ms to fill: the delay caps it
    assert batch_window_s(0.01, 4, 1000.0) == pytest.approx(0.004)  # 4 rows come in 4 ms
    assert batch_window_s(0.01, 63, 50.0) == 0.0  # 0.5 rows expected in 10 ms: go now
    assert batch_window_s(0.01, 0, 1000.0) == 0.0
    assert batch_window_s(0.0, 10, 1000.0) == 0.0
    assert batch_window_s(0.01, 10, 0.0) == 0.0


def test_arrival_rate_counts_rows_over_gaps_and_falls_in_silence() -> None:
    r = ArrivalRate(alpha=0.5)
    assert r.rows_per_s(0.0) is None
    r.observe(0.0, 4)
    assert r.rows_per_s(0.0) is None  # one arrival: no gap yet
    for k in range(1, 20):
        r.observe(k * 0.01, 2)
    assert r.rows_per_s(0.19) == pytest.approx(200.0)
    quiet = r.rows_per_s(1.19)  # a second of silence
    assert quiet is not None and quiet < 10.0
    with pytest.raises(ValueError):
        ArrivalRate(alpha=0.0)


def test_static_policy_windows_last_its_configured_delay() -> None:
    p = StaticPolicy(8, 0.2, 64)
    for k in range(10):
        p.observe_arrival(k * 1.0, 1)
    assert p.window_s(10.0, BatchingDecision(8, 0.2, 64), 1) == 0.2
