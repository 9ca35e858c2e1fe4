"""The sequential canary judge (pure): exact sequences that pass, fail and continue; the bounds in
closed form; counters across agent restarts; seeded simulations of A/A rollouts checked at every
interval (false rollbacks <= alpha, where a re-checked z-test goes past it) and of clear regressions
(failed within a bound on requests)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from edgefleet_operator.rollout.judge import (
    Counts,
    JudgeSettings,
    Tally,
    Verdict,
    judge,
    judge_metric,
    line_min,
    log_mixture,
    lower_bound,
    metric_verdict,
    rate_bounds,
    tally,
    upper_bound,
    verdict,
)

S = JudgeSettings()
A1 = S.alpha_side


def _lbeta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


# --- known sequences ---------------------------------------------------------------------------


def test_identical_rates_with_plenty_of_traffic_pass() -> None:
    j = judge(Counts(100_000, 1_000, 1_000), Counts(100_000, 1_000, 1_000))
    assert j.verdict is Verdict.PASS
    assert [m.verdict for m in j.metrics] == [Verdict.PASS, Verdict.PASS]
    errors = j.metrics[0]
    assert errors.difference[0] < 0 < errors.difference[1] < 0.01
    assert errors.e_within >= 1 / S.alpha_metric > errors.e_worse


def test_doubled_error_rate_fails_on_the_error_rate_alone() -> None:
    j = judge(Counts(20_000, 400, 200), Counts(20_000, 200, 200))
    assert j.verdict is Verdict.FAIL
    errors, slow = j.metrics
    assert (errors.verdict, slow.verdict) == (Verdict.FAIL, Verdict.CONTINUE)
    assert 0 < errors.difference[0] < 0.01 < errors.difference[1]
    assert errors.e_worse >= 200 > errors.e_within
    assert errors.power > 0.9
    text = j.describe()
    assert text.startswith("Fail: error rate: canary 2.00% (400/20000) vs stable 1.00% (200/20000)")
    assert "99.5% confidence sequence" in text and "fails at 200" in text


def test_tripled_slow_share_fails_on_the_slow_share() -> None:
    j = judge(Counts(20_000, 200, 600), Counts(20_000, 200, 200))
    assert [m.verdict for m in j.metrics] == [Verdict.PASS, Verdict.FAIL]  # errors within +1 point
    assert j.verdict is Verdict.FAIL
    assert j.metrics[1].ratio[0] > 1


def test_the_same_difference_on_few_requests_continues() -> None:
    j = judge(Counts(2_000, 40, 20), Counts(2_000, 20, 20))
    assert j.verdict is Verdict.CONTINUE
    assert [m.verdict for m in j.metrics] == [Verdict.CONTINUE, Verdict.CONTINUE]
    errors = j.metrics[0]
    assert errors.difference[0] < 0 < 0.01 < errors.difference[1]
    assert errors.power < 0.1
    assert 10_000 < errors.requests_needed < 25_000  # ~16k per side for +1 point at 1%, 80% power


@pytest.mark.parametrize(
    ("canary", "stable"),
    [
        (Counts(), Counts()),
        (Counts(), Counts(1_000_000, 500_000, 500_000)),
        (Counts(3, 3, 3), Counts(3, 0, 0)),  # every canary request failed, but only three
        (Counts(30, 30, 30), Counts()),
    ],
)
def test_no_data_or_too_little_never_fails(canary: Counts, stable: Counts) -> None:
    assert judge(canary, stable).verdict is Verdict.CONTINUE
    assert verdict(canary, stable) is Verdict.CONTINUE


def test_a_healthy_canary_passes_without_a_stable_side_only_on_the_absolute_margin() -> None:
    """With no stable requests, p_c < 1 point is still evidence against p_c >= p_s + 1 point; the
    relative slow-share margin needs a stable side."""
    j = judge(Counts(1_000_000, 0, 0), Counts())
    assert [m.verdict for m in j.metrics] == [Verdict.PASS, Verdict.CONTINUE]
    assert j.verdict is Verdict.CONTINUE


def test_settings_are_validated() -> None:
    for bad in ({"alpha": 0}, {"alpha": 1.5}, {"error_increase": 0}, {"slow_ratio": 1}, {"power": 1}):
        with pytest.raises(ValueError):
            JudgeSettings(**bad)
    with pytest.raises(ValueError):
        Counts(10, 11, 0)
    with pytest.raises(ValueError):
        metric_verdict((5, 4), (0, 0), S)


# --- the bounds --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 1_000, 1_000_000])
def test_bounds_with_no_events_or_all_events_have_closed_forms(n: int) -> None:
    """x = 0: M_n(p) = B(a, b + n) / B(a, b) / (1 - p)^n, so U = 1 - (alpha B(a, b + n) / B(a, b))^(1/n);
    x = n: L = (alpha B(a + n, b) / B(a, b))^(1/n)."""
    a, b = S.prior
    upper = 1 - math.exp((math.log(A1) + _lbeta(a, b + n) - _lbeta(a, b)) / n)
    lower = math.exp((math.log(A1) + _lbeta(a + n, b) - _lbeta(a, b)) / n)
    assert rate_bounds(0, n, A1) == (0.0, pytest.approx(upper, rel=1e-9, abs=1e-15))
    assert rate_bounds(n, n, A1) == (pytest.approx(lower, rel=1e-9), 1.0)
    assert upper_bound(0, n, A1) >= upper - 1e-15  # rounded outwards


def test_bounds_are_where_the_mixture_crosses_one_over_alpha() -> None:
    threshold = math.log(1 / A1)
    for x, n in [(1, 10), (10, 1_000), (37, 4_000), (500, 1_000), (999, 1_000)]:
        lo, hi = rate_bounds(x, n, A1)
        assert 0 < lo < x / n < hi < 1
        assert log_mixture(x, n, lo, S.prior) >= threshold > log_mixture(x, n, lo * (1 + 1e-9), S.prior)
        assert log_mixture(x, n, hi, S.prior) >= threshold > log_mixture(x, n, hi * (1 - 1e-9), S.prior)
    assert rate_bounds(0, 0, A1) == (0.0, 1.0)
    assert lower_bound(10, 1_000, A1) < lower_bound(10, 1_000, 0.1)  # lower alpha, wider


def test_the_verdict_is_the_confidence_sequence_leaving_the_null() -> None:
    """FAIL iff the difference's confidence sequence lies above 0; PASS iff it lies below the
    regression to detect (+1 point on errors; x1.5 on the slow share, read off the ratio's)."""
    rng = random.Random(7)
    for _ in range(60):
        n = rng.randint(200, 40_000)
        canary = Counts(n, rng.randint(0, n // 25), rng.randint(0, n // 25))
        stable = Counts(n, rng.randint(0, n // 50), rng.randint(0, n // 50))
        errors, slow = judge(canary, stable).metrics
        assert (errors.difference[0] > 0) == (errors.verdict is Verdict.FAIL), errors.describe()
        assert (slow.ratio[0] > 1) == (slow.verdict is Verdict.FAIL), slow.describe()
        if errors.verdict is not Verdict.FAIL:
            assert (errors.difference[1] < 0.01) == (errors.verdict is Verdict.PASS), errors.describe()
        if slow.verdict is not Verdict.FAIL:
            assert (slow.ratio[1] < 1.5) == (slow.verdict is Verdict.PASS), slow.describe()


def test_the_e_value_is_the_product_of_the_sides_mixtures_at_the_least_favourable_null() -> None:
    """Where the canary's rate is above stable's, e_worse = min over p of M_c(p) M_s(p), and no
    common rate gives less."""
    canary, stable = (400, 20_000), (200, 20_000)
    log_e = line_min(canary, stable, 1.0, 0.0)
    grid = [0.01 + i * 0.01 / 1000 for i in range(1001)]
    assert log_e <= min(log_mixture(*canary, p) + log_mixture(*stable, p) for p in grid) + 1e-9
    assert log_e >= min(log_mixture(*canary, p) + log_mixture(*stable, p) for p in grid) - 1e-3
    assert math.exp(log_e) == pytest.approx(judge_metric("error rate", canary, stable, S).e_worse)


def test_e_values_cross_one_over_alpha_exactly_where_the_verdict_changes() -> None:
    rng = random.Random(11)
    for _ in range(40):
        n = rng.randint(100, 50_000)
        canary = Counts(n, rng.randint(0, n // 20), rng.randint(0, n // 20))
        stable = Counts(n, rng.randint(0, n // 40), rng.randint(0, n // 40))
        for m in judge(canary, stable).metrics:
            assert (m.e_worse >= 1 / m.alpha) == (m.verdict is Verdict.FAIL), m.describe()
            if m.verdict is not Verdict.FAIL:
                assert (m.e_within >= 1 / m.alpha) == (m.verdict is Verdict.PASS), m.describe()


# --- counters across restarts ------------------------------------------------------------------


def test_tally_counts_from_its_first_reading_adding_increments_and_whole_readings_after_a_restart() -> None:
    t = tally(None, "e1", Counts(100, 2, 3))
    assert t == Tally("e1", Counts(100, 2, 3), Counts())
    t = tally(t, "e1", Counts(150, 4, 3))
    assert t.total == Counts(50, 2, 0)
    t = tally(t, "e2", Counts(20, 1, 0))  # restarted: the new counters began at 0
    assert t == Tally("e2", Counts(20, 1, 0), Counts(70, 3, 0))
    t = tally(t, "e2", Counts(20, 1, 0))  # nothing new
    assert t.total == Counts(70, 3, 0)
    t = tally(t, "e2", Counts(5, 0, 1))  # went backwards in one epoch: an unmarked restart
    assert t.total == Counts(75, 3, 1)
    assert t.total + Counts(1, 1, 1) == Counts(76, 4, 2)


# --- simulations -------------------------------------------------------------------------------


Rates = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _cumulative(
    rng: np.random.Generator, runs: int, checks: int, per_check: np.ndarray, rates: Rates
) -> list[np.ndarray]:
    """Cumulative (canary requests, errors, slow, stable requests, errors, slow) per run and check:
    Poisson requests per check, binomial events."""
    err_c, slow_c, err_s, slow_s = (r[:, None] for r in rates)
    nc = rng.poisson(per_check[:, None], (runs, checks))
    ns = rng.poisson(per_check[:, None], (runs, checks))
    out = [nc, rng.binomial(nc, err_c), rng.binomial(nc, slow_c)]
    out += [ns, rng.binomial(ns, err_s), rng.binomial(ns, slow_s)]
    return [np.cumsum(a, axis=1) for a in out]


def _sides(c: list[np.ndarray], r: int, k: int) -> tuple[Counts, Counts]:
    return Counts(*(int(a[r, k]) for a in c[:3])), Counts(*(int(a[r, k]) for a in c[3:]))


def _z_fails(canary: Counts, stable: Counts, z: float) -> bool:
    for x1, x2 in ((canary.errors, stable.errors), (canary.slow, stable.slow)):
        n1, n2 = canary.requests, stable.requests
        p = (x1 + x2) / (n1 + n2) if n1 and n2 else 0.0
        if 0 < p < 1 and (x1 / n1 - x2 / n2) / math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2)) > z:
            return True
    return False


def test_a_a_rollouts_checked_at_every_interval_fail_at_most_alpha() -> None:
    """2000 A/A rollouts (canary identical to stable), 24 checks each at 20, 200 or 2000 requests a
    side per interval, error rates 0.1-5% and slow shares 0.5-5%: the judge fails no more than
    alpha (1%: at most 20); a z-test re-checked at every interval fails more than alpha (the
    simulation can see an invalid test)."""
    rng = np.random.default_rng(17)
    runs, checks = 2_000, 24
    per_check = rng.choice([20, 200, 2_000], size=runs).astype(float)
    err, slow = rng.uniform(0.001, 0.05, runs), rng.uniform(0.005, 0.05, runs)
    c = _cumulative(rng, runs, checks, per_check, (err, slow, err, slow))
    z = 2.576  # one-sided alpha / 2 per metric: a valid test for one look
    judge_fails = z_fails = passes = 0
    for r in range(runs):
        outcome = None
        for k in range(checks):
            canary, stable = _sides(c, r, k)
            v = verdict(canary, stable)
            if v is not Verdict.CONTINUE:
                outcome = v
                break
        judge_fails += outcome is Verdict.FAIL
        passes += outcome is Verdict.PASS
        z_fails += any(_z_fails(*_sides(c, r, k), z) for k in range(checks))
    assert judge_fails <= S.alpha * runs
    assert z_fails > S.alpha * runs
    assert passes > runs // 5  # the judge does decide A/A rollouts with traffic


def test_a_clear_regression_fails_within_a_bound_on_requests() -> None:
    """Error rate 1% -> 3% (or slow share 1% -> 3%), 500 requests a side per interval: every one
    of 300 rollouts fails within 8,000 canary requests, half within 3,500, 80% within 4,500; the
    judge's own estimate of the requests it needs for 80% power at +2 points is about that."""
    rng = np.random.default_rng(3)
    runs, checks = 300, 20
    per_check = np.full(runs, 500.0)
    low, high = np.full(runs, 0.01), np.full(runs, 0.03)
    for rates in ((high, low, low, low), (low, high, low, low)):
        c = _cumulative(rng, runs, checks, per_check, rates)
        needed = []
        for r in range(runs):
            for k in range(checks):
                if verdict(*_sides(c, r, k)) is Verdict.FAIL:
                    needed.append(int(c[0][r, k]))
                    break
        assert len(needed) == runs
        assert max(needed) <= 8_000 and float(np.median(needed)) <= 3_500
        assert np.mean(np.array(needed) <= 4_500) >= 0.8
    settings = JudgeSettings(error_increase=0.02)
    estimate = judge(Counts(10_000, 100, 100), Counts(10_000, 100, 100), settings).metrics[0]
    assert 2_500 < estimate.requests_needed < 4_500


def test_without_the_slow_share_the_error_rate_alone_decides() -> None:
    from edgefleet_operator.rollout.judge import Counts, Verdict, judge

    same = Counts(200_000, 2_000, 0)  # no slow request on either side (no SLO latency)
    both = judge(same, same)
    assert both.verdict is Verdict.CONTINUE and [m.metric for m in both.metrics] == [
        "error rate",
        "slow share",
    ]
    alone = judge(same, same, slow_share=False)
    assert alone.verdict is Verdict.PASS and [m.metric for m in alone.metrics] == ["error rate"]
    worse = judge(Counts(20_000, 1_000, 0), Counts(20_000, 200, 0), slow_share=False)
    assert worse.verdict is Verdict.FAIL


def test_a_slow_share_of_zero_on_both_sides_passes_only_with_an_absolute_floor() -> None:
    from edgefleet_operator.rollout.judge import Counts, JudgeSettings, Verdict, judge

    clean = Counts(20_000, 0, 0)
    ratio_only = judge(clean, clean, JudgeSettings())
    assert ratio_only.metrics[1].verdict is Verdict.CONTINUE  # x1.5 of 0 is 0: never within
    floored = judge(clean, clean, JudgeSettings(slow_increase=0.005))
    assert floored.verdict is Verdict.PASS and "x1.5 +0.5 point(s)" in floored.metrics[1].describe()
    worse = judge(Counts(20_000, 0, 400), clean, JudgeSettings(slow_increase=0.005))
    assert worse.verdict is Verdict.FAIL  # the floor widens what passes, not what fails
