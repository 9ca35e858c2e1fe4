"""The sequential canary judge: anytime-valid tests on counts (error rate, slow share). Pure.

A wave is judged on two count streams per side (canary and stable): errors out of requests, and
slow requests (slower than the service's SLO latency) out of requests. Each check is a function of
the cumulative totals only, so the caller may check as often as it likes, at any times it likes
(even chosen by looking at the data), and counter increments between two checks are all that matter.

Method. For one side, the requests are Bernoulli(p) trials; Robbins' beta-binomial mixture
    M_n(p) = B(a + x, b + n - x) / B(a, b) / (p^x (1 - p)^(n - x))      (x events in n requests)
is a nonnegative martingale with mean 1 at the true p (a Beta(a, b) mixture of likelihood ratios),
so by Ville's inequality P(ever M_n(p) >= 1/a1) <= a1, and {p : M_n(p) < 1/a1} is a confidence
sequence: it holds the true rate at every n at once with probability >= 1 - a1. Each side gets one
at a1 = alpha_metric / 2; together (union bound) the rectangle [L_c, U_c] x [L_s, U_s] holds
(p_canary, p_stable) at every check with probability >= 1 - alpha_metric, whatever the interleaving
of canary and stable requests. From it:
- FAIL when the rectangle lies inside "canary worse" (L_c > U_s): the false-rollback rate, the chance
  of ever failing a canary that is no worse than stable, is <= alpha_metric;
- PASS when it lies inside "canary better than the regression to detect" (U_c < L_s + increase for
  the error rate, U_c < ratio x L_s for the slow share): the chance of ever passing a canary that
  regressed by at least that much is <= alpha_metric;
- CONTINUE otherwise. Zero traffic gives [0, 1] on both sides: CONTINUE, never FAIL for lack of data.
The equivalent e-value (`MetricEvidence.e_worse`) is min over the null of max(M_c, M_s) / 2; FAIL is
exactly e_worse >= 1 / alpha_metric. The two metrics share alpha: alpha / 2 each, so the overall
false-rollback rate (either metric failing an identical canary) stays <= alpha.

Assumptions: requests are independent; each side's rates are stationary within a wave (a canary
and a stable side serving the same traffic mix on comparable nodes). Varying rates or correlated
failures (an outage hitting a burst of requests) are outside the guarantee; so are counts the agent
lost. The union bound makes the test conservative: the benchmark (bench.canary_judge) measures it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

ALPHA = 0.01
"""Default false-rollback rate (both metrics together)."""
ERROR_INCREASE = 0.01
"""Default regression to detect on the error rate: +1 point, absolute."""
SLOW_RATIO = 1.5
"""Default regression to detect on the slow share: x1.5, relative."""
POWER = 0.8
PRIOR = (0.5, 0.5)
"""The mixture's Beta(a, b) prior (Jeffreys): puts weight near 0, where error rates live."""
_ITERATIONS = 56


class Verdict(StrEnum):
    PASS = "Pass"
    FAIL = "Fail"
    CONTINUE = "Continue"


@dataclass(frozen=True, slots=True)
class Counts:
    """Requests of one model version, and how many of them failed or were slow."""

    requests: int = 0
    errors: int = 0
    slow: int = 0

    def __post_init__(self) -> None:
        if min(self.requests, self.errors, self.slow) < 0:
            raise ValueError(f"negative counts: {self}")
        if self.errors > self.requests or self.slow > self.requests:
            raise ValueError(f"more errors or slow requests than requests: {self}")

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.requests + other.requests, self.errors + other.errors, self.slow + other.slow)

    def covers(self, other: Counts) -> bool:
        """Every counter at least `other`'s (a later reading of the same counters)."""
        return self.requests >= other.requests and self.errors >= other.errors and self.slow >= other.slow


@dataclass(frozen=True, slots=True)
class Tally:
    """Counts accumulated across an agent's restarts. An agent's counters are cumulative within an
    epoch (one agent start); `last` is the last reading, `total` everything counted since the tally
    began."""

    epoch: str
    last: Counts
    total: Counts


def tally(previous: Tally | None, epoch: str, reading: Counts) -> Tally:
    """Fold a cumulative reading into `previous`. Same epoch: adds the increase since the last
    reading. New epoch (the agent restarted): the new counters started from 0, so the whole reading
    is new. A counter that went backwards within one epoch is taken as an unmarked restart (the
    same). The first reading starts the tally at that reading (counted before the tally began is
    counted: the caller starts a tally when the wave starts, from the reading then, or from
    nothing). Requests counted after the last reading of an epoch that ended are lost, unseen."""
    if previous is None:
        return Tally(epoch, reading, reading)
    if epoch == previous.epoch and reading.covers(previous.last):
        increase = Counts(
            reading.requests - previous.last.requests,
            reading.errors - previous.last.errors,
            reading.slow - previous.last.slow,
        )
        return Tally(epoch, reading, previous.total + increase)
    return Tally(epoch, reading, previous.total + reading)


@dataclass(frozen=True, slots=True)
class JudgeSettings:
    """What the user states (spec.rollout.analysis)."""

    alpha: float = ALPHA
    """False-rollback rate, both metrics together (each metric gets alpha / 2)."""
    error_increase: float = ERROR_INCREASE
    """Error-rate regression to detect, absolute (0.01: +1 point). PASS needs evidence of less."""
    slow_ratio: float = SLOW_RATIO
    """Slow-share regression to detect, relative (1.5: x1.5). PASS needs evidence of less."""
    power: float = POWER
    """Wanted power at the regression: the report says how many requests that needs."""
    prior: tuple[float, float] = PRIOR

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.error_increase < 1:
            raise ValueError(f"error_increase must be in (0, 1), got {self.error_increase}")
        if not self.slow_ratio > 1:
            raise ValueError(f"slow_ratio must be > 1, got {self.slow_ratio}")
        if not 0 < self.power < 1:
            raise ValueError(f"power must be in (0, 1), got {self.power}")
        if min(self.prior) <= 0:
            raise ValueError(f"prior parameters must be > 0, got {self.prior}")

    @property
    def alpha_metric(self) -> float:
        return self.alpha / 2

    @property
    def alpha_side(self) -> float:
        """Each side's confidence sequence: alpha_metric / 2 (union bound over the two sides)."""
        return self.alpha / 4


# --- one side: the beta-binomial mixture confidence sequence ---------------------------------


def log_mixture(events: float, requests: float, p: float, prior: tuple[float, float] = PRIOR) -> float:
    """log M_n(p), the mixture martingale of one side at rate p (events, requests may be real:
    expected counts)."""
    a, b = prior
    misses = requests - events
    c = _lbeta(a + events, b + misses) - _lbeta(a, b)
    if events > 0:
        c -= math.inf if p <= 0 else events * math.log(p)
    if misses > 0:
        c -= math.inf if p >= 1 else misses * math.log1p(-p)
    return c


def _lbeta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def rate_bounds(
    events: float, requests: float, alpha: float, prior: tuple[float, float] = PRIOR
) -> tuple[float, float]:
    """The confidence sequence {p : M_n(p) < 1/alpha} for one side's rate: (lower, upper), each
    rounded outwards (the returned interval contains the exact one). No requests: (0, 1)."""
    return lower_bound(events, requests, alpha, prior), upper_bound(events, requests, alpha, prior)


def lower_bound(events: float, requests: float, alpha: float, prior: tuple[float, float] = PRIOR) -> float:
    """`rate_bounds`' lower end alone."""
    if requests <= 0 or events <= 0:
        return 0.0
    threshold = math.log(1 / alpha)
    return _bisect(lambda p: log_mixture(events, requests, p, prior) >= threshold, 0.0, events / requests)


def upper_bound(events: float, requests: float, alpha: float, prior: tuple[float, float] = PRIOR) -> float:
    """`rate_bounds`' upper end alone."""
    if requests <= 0 or events >= requests:
        return 1.0
    threshold = math.log(1 / alpha)
    miss = 1.0 - events / requests
    return 1.0 - _bisect(lambda q: log_mixture(events, requests, 1.0 - q, prior) >= threshold, 0.0, miss)


def _bisect(outside: Callable[[float], bool], out: float, inside: float) -> float:
    """The boundary between `out` (outside the set) and `inside`, as its last outside point."""
    for _ in range(_ITERATIONS):
        mid = (out + inside) / 2
        if outside(mid):
            out = mid
        else:
            inside = mid
    return out


# --- one metric: canary against stable -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricEvidence:
    """The evidence on one metric at one check, in numbers (for status) and words (`describe`)."""

    metric: str
    """"error rate" or "slow share"."""
    verdict: Verdict
    canary: tuple[int, int]
    """(events, requests) on the canary."""
    stable: tuple[int, int]
    canary_bounds: tuple[float, float]
    stable_bounds: tuple[float, float]
    difference: tuple[float, float]
    """Confidence sequence for canary rate - stable rate (level 1 - alpha_metric)."""
    ratio: tuple[float, float]
    """Confidence sequence for canary rate / stable rate (inf where the stable bound is 0)."""
    e_worse: float
    """E-value against "the canary is no worse": FAIL at >= 1 / alpha_metric."""
    e_within: float
    """E-value against "the canary regressed by the regression to detect": PASS at >= 1 / alpha_metric."""
    alpha: float
    """alpha_metric."""
    regression: str
    """The regression to detect, in words ("+1 point", "x1.5")."""
    power: float
    """Approximate chance that a canary with exactly the regression would have failed by now."""
    requests_needed: int
    """Approximate canary requests for the wanted power (at the current canary:stable ratio)."""

    def describe(self) -> str:
        (xc, nc), (xs, ns) = self.canary, self.stable
        lo, hi = self.difference
        level = f"{100 * (1 - self.alpha):.4g}%"
        return (
            f"{self.metric}: canary {_pct(xc, nc)} ({xc}/{nc}) vs stable {_pct(xs, ns)} ({xs}/{ns});"
            f" difference in [{100 * lo:+.2f}, {100 * hi:+.2f}] points ({level} confidence sequence);"
            f" e-value {self.e_worse:.3g} that it is worse (fails at {1 / self.alpha:.3g}),"
            f" {self.e_within:.3g} that it is within {self.regression} (passes at {1 / self.alpha:.3g});"
            f" power {self.power:.0%} to detect {self.regression},"
            f" about {self.requests_needed} canary requests for the wanted power: {self.verdict.value}"
        )


def _pct(x: int, n: int) -> str:
    return f"{100 * x / n:.2f}%" if n else "-"


def judge_metric(
    metric: str,
    canary: tuple[int, int],
    stable: tuple[int, int],
    settings: JudgeSettings,
    *,
    increase: float = 0.0,
    ratio: float = 1.0,
) -> MetricEvidence:
    """One metric's verdict. The regression to detect is p_c >= ratio * p_s + increase (give one of
    the two); FAIL needs evidence that p_c > p_s, PASS evidence that p_c < ratio * p_s + increase."""
    (xc, nc), (xs, ns) = canary, stable
    verdict = metric_verdict(canary, stable, settings, increase=increase, ratio=ratio)
    a1, prior = settings.alpha_side, settings.prior
    lc, uc = rate_bounds(xc, nc, a1, prior)
    ls, us = rate_bounds(xs, ns, a1, prior)
    e_worse = _min_max_e(xc, nc, xs, ns, prior, 1.0, 0.0, worse=True)
    e_within = _min_max_e(xc, nc, xs, ns, prior, ratio, increase, worse=False)
    power, needed = _power(xc, nc, xs, ns, settings, ratio, increase)
    return MetricEvidence(
        metric=metric,
        verdict=verdict,
        canary=canary,
        stable=stable,
        canary_bounds=(lc, uc),
        stable_bounds=(ls, us),
        difference=(lc - us, uc - ls),
        ratio=(lc / us if us > 0 else math.inf, uc / ls if ls > 0 else math.inf),
        e_worse=e_worse,
        e_within=e_within,
        alpha=settings.alpha_metric,
        regression=f"x{ratio:g}" if increase == 0 else f"+{100 * increase:g} point(s)",
        power=power,
        requests_needed=needed,
    )


def metric_verdict(
    canary: tuple[int, int],
    stable: tuple[int, int],
    settings: JudgeSettings,
    *,
    increase: float = 0.0,
    ratio: float = 1.0,
) -> Verdict:
    """`judge_metric`'s verdict alone, with the fewest bound computations: FAIL iff L_c > U_s, PASS
    iff U_c < ratio * L_s + increase (each bound of the confidence sequence at alpha_side)."""
    (xc, nc), (xs, ns) = canary, stable
    if not (0 <= xc <= nc and 0 <= xs <= ns):
        raise ValueError(f"events must be within 0..requests: canary {canary}, stable {stable}")
    if nc == 0:
        return Verdict.CONTINUE
    a1, prior = settings.alpha_side, settings.prior
    threshold = math.log(1 / a1)
    if ns > 0 and xc / nc > xs / ns:  # L_c > U_s  <=>  U_s lies below the canary's sequence
        us = upper_bound(xs, ns, a1, prior)
        if us < xc / nc and log_mixture(xc, nc, us, prior) >= threshold:
            return Verdict.FAIL
    limit = ratio * lower_bound(xs, ns, a1, prior) + increase
    if limit >= 1:
        passed = limit > 1 or xc < nc  # U_c <= 1, and < 1 unless every request counted
    else:  # U_c < limit  <=>  the limit lies above the canary's sequence
        passed = xc / nc < limit and log_mixture(xc, nc, limit, prior) >= threshold
    if passed:
        return Verdict.PASS
    return Verdict.CONTINUE


def _min_max_e(
    xc: int, nc: int, xs: int, ns: int, prior: tuple[float, float], ratio: float, increase: float,
    *, worse: bool,
) -> float:  # fmt: skip
    """min over the null of max(M_c(p_c), M_s(p_s)) / 2: the null is p_c <= p_s (`worse`: evidence
    against it says the canary is worse) or p_c >= ratio * p_s + increase. The min lies at the
    maximum-likelihood point when that is in the null, else on the boundary p_c = g(p_s), where
    M_c(g(.)) and M_s(.) move in opposite directions between the two rates' estimates."""
    mc = xc / nc if nc else 0.0
    ms = xs / ns if ns else 0.0
    g_ratio, g_increase = (1.0, 0.0) if worse else (ratio, increase)

    def g(q: float) -> float:
        return min(1.0, g_ratio * q + g_increase)

    def lc(q: float) -> float:
        return log_mixture(xc, nc, g(q), prior)

    def ls(q: float) -> float:
        return log_mixture(xs, ns, q, prior)

    inside = mc <= g(ms) if worse else mc >= g(ms)
    if inside:
        return math.exp(max(log_mixture(xc, nc, mc, prior), ls(ms))) / 2
    # p_s between where g(p_s) = mc and ms: M_c(g(p_s)) falls (worse) or rises, M_s the other way.
    q_c = max(0.0, min(1.0, (mc - g_increase) / g_ratio))
    lo, hi = (ms, q_c) if worse else (q_c, ms)
    for _ in range(_ITERATIONS):
        mid = (lo + hi) / 2
        if (lc(mid) > ls(mid)) == worse:
            lo = mid
        else:
            hi = mid
    q = (lo + hi) / 2
    return math.exp(min(700.0, max(lc(q), ls(q)))) / 2


# --- power and the requests it needs ---------------------------------------------------------


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _power(
    xc: int, nc: int, xs: int, ns: int, settings: JudgeSettings, ratio: float, increase: float
) -> tuple[float, int]:
    """(power now, canary requests for the wanted power), by a normal approximation around the
    FAIL boundary at expected counts: with stable at its posterior-mean rate p and the canary at
    ratio * p + increase, FAIL needs the observed difference to clear (p_c - L_c) + (U_s - p)."""
    a, b = settings.prior
    p = (xs + a) / (ns + a + b)
    q = min(1.0, ratio * p + increase)
    share = nc / (nc + ns) if nc + ns else 0.5
    share = min(max(share, 0.01), 0.99)

    def power_at(n_canary: float) -> float:
        if n_canary <= 0:
            return 0.0
        n_stable = n_canary * (1 - share) / share
        lc, _ = rate_bounds(q * n_canary, n_canary, settings.alpha_side, settings.prior)
        _, us = rate_bounds(p * n_stable, n_stable, settings.alpha_side, settings.prior)
        margin = (q - p) - ((q - lc) + (us - p))
        sd = math.sqrt(q * (1 - q) / n_canary + p * (1 - p) / n_stable)
        return _phi(margin / sd) if sd > 0 else float(margin > 0)

    now = power_at(nc)
    lo, hi = 0, max(nc, 16)
    while power_at(hi) < settings.power:
        lo, hi = hi, hi * 2
        if hi > 10**12:
            return now, hi
    while hi - lo > max(1, hi // 1000):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if power_at(mid) >= settings.power else (mid, hi)
    return now, hi


# --- the wave: both metrics ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Judgement:
    """The verdict on a wave at one check: FAIL when either metric fails, PASS when both pass."""

    verdict: Verdict
    metrics: tuple[MetricEvidence, ...]

    def describe(self) -> str:
        return f"{self.verdict.value}: " + "; ".join(m.describe() for m in self.metrics)


def judge(canary: Counts, stable: Counts, settings: JudgeSettings | None = None) -> Judgement:
    """Judge a wave on cumulative counts (summed over its canary nodes, and over comparable stable
    nodes; see `tally` for counters across agent restarts). The chance that any check ever FAILs
    a canary identical to stable is <= settings.alpha (alpha / 2 per metric); the chance that any
    check ever PASSes a canary regressed by the stated amount on a metric is <= alpha / 2."""
    s = settings or JudgeSettings()
    errors = judge_metric(
        "error rate", (canary.errors, canary.requests), (stable.errors, stable.requests), s,
        increase=s.error_increase,
    )  # fmt: skip
    slow = judge_metric(
        "slow share", (canary.slow, canary.requests), (stable.slow, stable.requests), s,
        ratio=s.slow_ratio,
    )  # fmt: skip
    return Judgement(_combine(errors.verdict, slow.verdict), (errors, slow))


def verdict(canary: Counts, stable: Counts, settings: JudgeSettings | None = None) -> Verdict:
    """`judge`'s verdict alone (no e-values, no power): cheap enough to call at every check of
    a simulation."""
    s = settings or JudgeSettings()
    errors = metric_verdict(
        (canary.errors, canary.requests), (stable.errors, stable.requests), s, increase=s.error_increase
    )
    if errors is Verdict.FAIL:
        return errors
    slow = metric_verdict(
        (canary.slow, canary.requests), (stable.slow, stable.requests), s, ratio=s.slow_ratio
    )
    return _combine(errors, slow)


def _combine(*verdicts: Verdict) -> Verdict:
    if Verdict.FAIL in verdicts:
        return Verdict.FAIL
    if all(v is Verdict.PASS for v in verdicts):
        return Verdict.PASS
    return Verdict.CONTINUE
