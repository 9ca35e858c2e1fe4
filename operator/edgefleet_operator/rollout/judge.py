"""The sequential canary judge: anytime-valid tests on counts (error rate, slow share). Pure.

A wave is judged on two count streams per side (canary and stable): errors out of requests, and
slow requests (slower than the service's SLO latency) out of requests. Each check is a function of
the cumulative totals only, so the caller may check as often as it likes, at any times it likes
(even chosen by looking at the data), and counter increments between two checks are all that matter.

Method. For one side, the requests are Bernoulli(p) trials; Robbins' beta-binomial mixture
    M_n(p) = B(a + x, b + n - x) / B(a, b) / (p^x (1 - p)^(n - x))      (x events in n requests)
is a nonnegative martingale with mean 1 at the true p (a Beta(a, b) mixture of likelihood ratios).
The product M_c(p_c) M_s(p_s) of the two sides' is one too, at the true pair of rates, whatever
the interleaving of canary and stable requests (each request multiplies in its own side's factor,
of mean 1 given the past). So for a null hypothesis H (a set of rate pairs), the e-process
    E = min over (p_c, p_s) in H of M_c(p_c) M_s(p_s)
(a mixture likelihood ratio against the null's best fit) is, when H holds, at most a test
martingale, and by Ville's inequality P(E ever >= 1 / a) <= a, however often one looks. With
a = alpha_metric:
- FAIL when E against "no worse" (p_c <= p_s) reaches 1 / a: the chance of ever rolling back a
  canary no worse than stable is <= a;
- PASS when E against "regressed" (p_c >= p_s + increase for the error rate, p_c >= ratio x p_s for
  the slow share) reaches 1 / a: the chance of ever passing a canary that regressed by at least the
  regression to detect is <= a;
- CONTINUE otherwise. Zero traffic gives E = 1 on both: CONTINUE, never FAIL for lack of data.
The confidence sequence for p_c - p_s (and for p_c / p_s) is the set of differences (ratios) that
no such test rejects: FAIL is exactly its lower end above 0. The minimum over a null is on its
boundary line (the sum of logs is convex), found by bisection. The two metrics share alpha: alpha / 2
each, so the overall false-rollback rate (either metric failing an identical canary) stays <= alpha.

Assumptions: requests are independent; each side's rates are stationary within a wave (a canary
and a stable side serving the same traffic mix on comparable nodes). Varying rates or correlated
failures (an outage hitting a burst of requests) are outside the guarantee; so are counts the agent
lost. The bound holds for every stopping rule, so at a fixed number of looks it is conservative;
the benchmark (bench.canary_judge) measures by how much, and against thresholds.
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
ITERATIONS = 56
"""Bisection steps: 2^-56 of the bracket, below a double's resolution of a rate."""


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
    """Fold a cumulative reading of one agent's counters (one node, one model version) into
    `previous`. No previous: the reading is the baseline, the tally counts from it on (a wave
    judges what both sides served since it began). Same epoch: adds the increase since the last
    reading. New epoch (the agent restarted): its counters started from 0, so the whole reading is
    new. A counter that went backwards within one epoch is taken as an unmarked restart (the same).
    Requests counted after the last reading of an epoch that ended are lost, unseen: that loses
    samples, it does not bias them."""
    if previous is None:
        return Tally(epoch, reading, Counts())
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
    slow_increase: float = 0.0
    """Added to the slow-share regression to detect (absolute): x slow_ratio + slow_increase. A
    share that is 0 on both sides can pass only with some (x1.5 of 0 is 0)."""
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
        if not 0 <= self.slow_increase < 1:
            raise ValueError(f"slow_increase must be in [0, 1), got {self.slow_increase}")
        if not 0 < self.power < 1:
            raise ValueError(f"power must be in (0, 1), got {self.power}")
        if min(self.prior) <= 0:
            raise ValueError(f"prior parameters must be > 0, got {self.prior}")

    @property
    def alpha_metric(self) -> float:
        return self.alpha / 2

    @property
    def alpha_side(self) -> float:
        """One side's own confidence sequence (`rate_bounds`, informative): alpha_metric / 2, so
        that the two sides' hold together with probability >= 1 - alpha_metric."""
        return self.alpha / 4


# --- one side: the beta-binomial mixture confidence sequence ---------------------------------


def log_mixture(events: float, requests: float, p: float, prior: tuple[float, float] = PRIOR) -> float:
    """log M_n(p), the mixture martingale of one side at rate p (events, requests may be real:
    expected counts)."""
    a, b = prior
    misses = requests - events
    c = _lbeta(a + events, b + misses) - _lbeta(a, b)
    if events > 0:
        if p <= 0:
            return math.inf
        c -= events * math.log(p)
    if misses > 0:
        if p >= 1:
            return math.inf
        c -= misses * math.log1p(-p)
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
    for _ in range(ITERATIONS):
        mid = (out + inside) / 2
        if outside(mid):
            out = mid
        else:
            inside = mid
    return out


# --- one metric: canary against stable -------------------------------------------------------


def _dlog_mixture(events: float, requests: float, p: float) -> float:
    """d/dp log M_n(p)."""
    d = 0.0
    if events > 0:
        d -= math.inf if p <= 0 else events / p
    if requests > events:
        d += math.inf if p >= 1 else (requests - events) / (1 - p)
    return d


def line_min(
    canary: tuple[float, float],
    stable: tuple[float, float],
    ratio: float,
    increase: float,
    prior: tuple[float, float] = PRIOR,
    iterations: int = ITERATIONS,
) -> float:
    """min over p_s of log M_c(ratio p_s + increase) + log M_s(p_s), on the part of the line
    p_c = ratio p_s + increase inside [0, 1]^2 (+inf where there is none). The sum is convex along
    the line: bisection on its derivative."""
    (xc, nc), (xs, ns) = canary, stable
    lo, hi = max(0.0, -increase / ratio), min(1.0, (1.0 - increase) / ratio)
    if lo > hi:
        return math.inf

    def h(q: float) -> float:
        return log_mixture(xc, nc, min(1.0, max(0.0, ratio * q + increase)), prior) + log_mixture(
            xs, ns, q, prior
        )

    a, b = lo, hi
    for _ in range(iterations):
        mid = (a + b) / 2
        slope = ratio * _dlog_mixture(xc, nc, ratio * mid + increase) + _dlog_mixture(xs, ns, mid)
        a, b = (a, mid) if slope > 0 else (mid, b)
    return min(h((a + b) / 2), h(lo), h(hi))


def _rates(canary: tuple[int, int], stable: tuple[int, int]) -> tuple[float, float]:
    """Maximum-likelihood rates, 0 where a side has no requests (the sums below don't depend on a
    side without requests, so any rate is as likely)."""
    (xc, nc), (xs, ns) = canary, stable
    return (xc / nc if nc else 0.0), (xs / ns if ns else 0.0)


def log_e_worse(
    canary: tuple[int, int], stable: tuple[int, int], prior: tuple[float, float] = PRIOR
) -> float:
    """log of the e-value against "the canary is no worse" (p_c <= p_s): min over that null of
    log M_c(p_c) + log M_s(p_s)."""
    mc, ms = _rates(canary, stable)
    if canary[1] == 0 or stable[1] == 0 or mc <= ms:
        return log_mixture(*canary, mc, prior) + log_mixture(*stable, ms, prior)
    return line_min(canary, stable, 1.0, 0.0, prior)


def log_e_within(
    canary: tuple[int, int],
    stable: tuple[int, int],
    ratio: float,
    increase: float,
    prior: tuple[float, float] = PRIOR,
) -> float:
    """log of the e-value against "the canary regressed" (p_c >= ratio p_s + increase)."""
    mc, ms = _rates(canary, stable)
    if canary[1] == 0 or mc >= ratio * ms + increase:
        return log_mixture(*canary, mc, prior) + log_mixture(*stable, ms, prior)
    return line_min(canary, stable, ratio, increase, prior)


def metric_verdict(
    canary: tuple[int, int],
    stable: tuple[int, int],
    settings: JudgeSettings,
    *,
    increase: float = 0.0,
    ratio: float = 1.0,
) -> Verdict:
    """One metric's verdict alone: FAIL when the e-value against "no worse" reaches
    1 / alpha_metric, PASS when the one against "regressed by the regression to detect" does."""
    (xc, nc), (xs, ns) = canary, stable
    if not (0 <= xc <= nc and 0 <= xs <= ns):
        raise ValueError(f"events must be within 0..requests: canary {canary}, stable {stable}")
    threshold = math.log(1 / settings.alpha_metric)
    if log_e_worse(canary, stable, settings.prior) >= threshold:
        return Verdict.FAIL
    if log_e_within(canary, stable, ratio, increase, settings.prior) >= threshold:
        return Verdict.PASS
    return Verdict.CONTINUE


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
    """The canary's rate, its own confidence sequence (at alpha_side: with stable's, both hold at
    once with probability >= 1 - alpha_metric)."""
    stable_bounds: tuple[float, float]
    difference: tuple[float, float]
    """Confidence sequence for canary rate - stable rate (level 1 - alpha_metric)."""
    ratio: tuple[float, float]
    """Confidence sequence for canary rate / stable rate (level 1 - alpha_metric; inf: unbounded)."""
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
        rlo, rhi = self.ratio
        level = f"{100 * (1 - self.alpha):.4g}%"
        fails = f"{1 / self.alpha:.3g}"
        return (
            f"{self.metric}: canary {_pct(xc, nc)} ({xc}/{nc}) vs stable {_pct(xs, ns)} ({xs}/{ns});"
            f" {level} confidence sequence: difference [{100 * lo:+.2f}, {100 * hi:+.2f}] points,"
            f" ratio [{rlo:.3g}, {rhi:.3g}]; e-value {_e(self.e_worse)} that the canary is worse"
            f" (fails at {fails}), {_e(self.e_within)} that it is better than {self.regression}"
            f" (passes at {fails}); power {self.power:.0%} to detect {self.regression},"
            f" about {self.requests_needed} canary requests for the wanted power: {self.verdict.value}"
        )


def _pct(x: int, n: int) -> str:
    return f"{100 * x / n:.2f}%" if n else "-"


def _e(v: float) -> str:
    return f"{v:.3g}" if v < 1e15 else "over 1e15"


def judge_metric(
    metric: str,
    canary: tuple[int, int],
    stable: tuple[int, int],
    settings: JudgeSettings,
    *,
    increase: float = 0.0,
    ratio: float = 1.0,
) -> MetricEvidence:
    """One metric's verdict and its evidence. The regression to detect is p_c >= ratio * p_s +
    increase (give one of the two); FAIL needs evidence that p_c > p_s, PASS evidence that
    p_c < ratio * p_s + increase."""
    verdict = metric_verdict(canary, stable, settings, increase=increase, ratio=ratio)
    prior = settings.prior
    power, needed = _power(canary, stable, settings, ratio, increase)
    return MetricEvidence(
        metric=metric,
        verdict=verdict,
        canary=canary,
        stable=stable,
        canary_bounds=rate_bounds(*canary, settings.alpha_side, prior),
        stable_bounds=rate_bounds(*stable, settings.alpha_side, prior),
        difference=_difference_bounds(canary, stable, settings),
        ratio=_ratio_bounds(canary, stable, settings),
        e_worse=math.exp(min(700.0, log_e_worse(canary, stable, prior))),
        e_within=math.exp(min(700.0, log_e_within(canary, stable, ratio, increase, prior))),
        alpha=settings.alpha_metric,
        regression=_regression(ratio, increase),
        power=power,
        requests_needed=needed,
    )


def _regression(ratio: float, increase: float) -> str:
    if increase == 0:
        return f"x{ratio:g}"
    if ratio == 1:
        return f"+{100 * increase:g} point(s)"
    return f"x{ratio:g} +{100 * increase:g} point(s)"


def _difference_bounds(
    canary: tuple[int, int], stable: tuple[int, int], settings: JudgeSettings
) -> tuple[float, float]:
    """{d : min over p_c - p_s = d of log M_c + log M_s < log(1/alpha_metric)}: an interval, the
    minimum being convex in d."""
    threshold = math.log(1 / settings.alpha_metric)
    mc, ms = _rates(canary, stable)

    def outside(d: float) -> bool:
        return line_min(canary, stable, 1.0, d, settings.prior) >= threshold

    inside = mc - ms
    lower = -1.0 if not outside(-1.0) else _bisect(outside, -1.0, inside)
    upper = 1.0 if not outside(1.0) else _bisect(outside, 1.0, inside)
    return lower, upper


def _ratio_bounds(
    canary: tuple[int, int], stable: tuple[int, int], settings: JudgeSettings
) -> tuple[float, float]:
    """The same for p_c / p_s (rays from the origin through a convex set: an interval), searched
    in log r within [1e-6, 1e6] (0 and inf beyond)."""
    threshold = math.log(1 / settings.alpha_metric)
    (xc, nc), (xs, ns) = canary, stable

    def outside(t: float) -> bool:
        return line_min(canary, stable, math.exp(t), 0.0, settings.prior) >= threshold

    inside = math.log((xc + 0.5) / (nc + 1)) - math.log((xs + 0.5) / (ns + 1))
    edge = math.log(1e6)
    if outside(inside):
        return 0.0, math.inf
    lower = 0.0 if not outside(-edge) else math.exp(_bisect(outside, -edge, inside))
    upper = math.inf if not outside(edge) else math.exp(_bisect(outside, edge, inside))
    return lower, upper


# --- power and the requests it needs ---------------------------------------------------------


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


_SEARCH = 30
"""Bisection steps of the power search (an approximation, no guarantee rides on it)."""


def _power(
    canary: tuple[int, int], stable: tuple[int, int], settings: JudgeSettings, ratio: float, increase: float
) -> tuple[float, int]:
    """(power now, canary requests for the wanted power), by a normal approximation around the
    FAIL boundary: with stable at its posterior-mean rate p and the canary at ratio * p + increase,
    the smallest observed difference d* that FAILs at these sample sizes (expected counts); power
    = Phi((true difference - d*) / its standard deviation)."""
    (_, nc), (xs, ns) = canary, stable
    a, b = settings.prior
    p = (xs + a) / (ns + a + b)
    q = min(1.0, ratio * p + increase)
    share = nc / (nc + ns) if nc + ns else 0.5
    share = min(max(share, 0.01), 0.99)
    threshold = math.log(1 / settings.alpha_metric)

    def power_at(n_canary: float) -> float:
        if n_canary <= 0:
            return 0.0
        n_stable = n_canary * (1 - share) / share
        side_s = (p * n_stable, n_stable)

        def outside(d: float) -> bool:
            side_c = (min(1.0, p + d) * n_canary, n_canary)
            return line_min(side_c, side_s, 1.0, 0.0, settings.prior, _SEARCH) >= threshold

        if not outside(1.0 - p):
            return 0.0
        lo, hi = 0.0, 1.0 - p
        for _ in range(_SEARCH):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if outside(mid) else (mid, hi)
        sd = math.sqrt(q * (1 - q) / n_canary + p * (1 - p) / n_stable)
        return _phi((q - p - hi) / sd) if sd > 0 else float(q - p > hi)

    now = power_at(nc)
    lo, hi = 0, max(nc, 16)
    while power_at(hi) < settings.power:
        lo, hi = hi, hi * 2
        if hi > 10**12:
            return now, hi
    while hi - lo > max(1, hi // 100):
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


def judge(
    canary: Counts, stable: Counts, settings: JudgeSettings | None = None, *, slow_share: bool = True
) -> Judgement:
    """Judge a wave on cumulative counts (summed over its canary nodes, and over comparable stable
    nodes; see `tally` for counters across agent restarts). The chance that any check ever FAILs
    a canary identical to stable is <= settings.alpha (alpha / 2 per metric); the chance that any
    check ever PASSes a canary regressed by the stated amount on a metric is <= alpha / 2.
    `slow_share` False: the error rate alone (a service without an SLO latency counts no slow
    requests, and a relative regression of a share that is 0 on both sides can never pass)."""
    s = settings or JudgeSettings()
    errors = judge_metric(
        "error rate", (canary.errors, canary.requests), (stable.errors, stable.requests), s,
        increase=s.error_increase,
    )  # fmt: skip
    if not slow_share:
        return Judgement(errors.verdict, (errors,))
    slow = judge_metric(
        "slow share", (canary.slow, canary.requests), (stable.slow, stable.requests), s,
        ratio=s.slow_ratio, increase=s.slow_increase,
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
        (canary.slow, canary.requests),
        (stable.slow, stable.requests),
        s,
        ratio=s.slow_ratio,
        increase=s.slow_increase,
    )
    return _combine(errors, slow)


def _combine(*verdicts: Verdict) -> Verdict:
    if Verdict.FAIL in verdicts:
        return Verdict.FAIL
    if all(v is Verdict.PASS for v in verdicts):
        return Verdict.PASS
    return Verdict.CONTINUE
