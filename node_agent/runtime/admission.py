"""Admission by predicted wait: whether a request can be served within its time budget.

A request is admitted when the wait predicted for it fits its budget:

    predicted = what is left of the batch running now (at most its service time)
                + rows queued ahead of it (its class and more urgent ones) / drain rate
                + its own service time

The budget is the request's deadline when it has one (the v2 `timeout` parameter), else
the model's latency SLO, else `DEFAULT_BUDGET_S`. A deadline is enforced after admission too
(work that would miss it is dropped before it runs), so admission plans to all of it; an SLO
budget nothing enforces later, so admission plans to `PLAN_SHARE` of it.
A request that does not fit is refused
at once with the time after which the queue will have drained far enough for it to fit
(`Retry-After`), instead of queueing past its budget: a refusal costs the caller a retry
elsewhere or later, a request admitted past its budget costs every request behind it.

A request that cannot fit whatever the load (more rows than the queue may ever hold, or more
than the model can serve within the budget with nothing queued) is `too_large`: retrying it
unchanged cannot succeed, so it carries no Retry-After.

Pure: no clock reads (time is passed in), no I/O, no locking, no tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

DEFAULT_BUDGET_S = 1.0
"""Budget of a request with neither a deadline nor a model SLO. One second: past it an
interactive caller has usually given up, a batch caller loses little by retrying, and a
slow model (the example `classifier/2-slow`, ~70 rows/s on 2 CPU cores) still holds a
few batches in its queue."""


PLAN_SHARE = 0.8
"""Share of an SLO (or default) budget a request without a deadline is admitted to wait and
run in. The rest absorbs what the prediction cannot see: a drain rate that falls after
admission (on a CPU the flood's own requests take cycles from the model: 15-30% measured
with the slow example model), more urgent work that arrives later and goes first, jitter.
Requests with a deadline plan to all of it: work that would miss it is dropped before it
runs, and a fuller queue keeps the model busy (at 2x, planning to 80% of a 150 ms deadline
cost a quarter of the goodput in the benchmark)."""


MIN_RETRY_S = 0.01
"""Least Retry-After in seconds (HTTP answers carry whole seconds, at least one: the API
layer rounds up; in-process callers may come back sooner)."""
UNMEASURED_RETRY_S = 0.1
"""Retry-After before any batch completed: the drain rate is not known yet."""


class Verdict(Enum):
    """What admission decided."""

    ADMIT = "admit"
    LATE = "predicted_wait"
    """It would wait past its budget: refused now (429 and Retry-After)."""
    TOO_LARGE = "too_large"
    """It can never be served within its budget or the queue's hard cap (413)."""


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of `decide`. `retry_after_s` > 0 only for `LATE`; `limit_rows`, the most
    rows a request may have, only for `TOO_LARGE`."""

    verdict: Verdict
    predicted_s: float = 0.0
    retry_after_s: float = 0.0
    limit_rows: int = 0

    @property
    def admitted(self) -> bool:
        return self.verdict is Verdict.ADMIT


ADMIT = Admission(Verdict.ADMIT)


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """What `decide` needs to know: the request, what waits ahead of it, the model's speed."""

    rows: int
    ahead_rows: float
    """Rows queued (or formed into a batch not yet started) at its class or more urgent."""
    budget_s: float
    """Time from now within which it must finish (deadline, SLO, or `DEFAULT_BUDGET_S`);
    math.inf: no admission by time (a policy that asks for none)."""
    deadline: bool
    """The budget is the request's own deadline (enforced after admission), not an SLO."""
    service_s: float
    """Predicted service time of the batch it will run in (0 when unknown)."""
    running_s: float
    """Time left of the batch running now, at most (its predicted service time; 0: none)."""
    rows_per_s: float | None
    """Measured drain rate of the model's queue; None before any batch completed."""
    max_rows: int
    """Hard cap on rows queued for the model (memory), whatever the budget."""
    batch_rows: int
    """Rows of the model's largest batch: a request up to it runs in one batch."""
    unmeasured_rows: int
    """Before any measurement: rows (ahead + its own) admitted at most, unless the queue is empty."""


def decide(r: AdmissionRequest) -> Admission:
    """Admit `r`, or refuse it as late (with Retry-After) or too large (with the limit).

    Guarantees: a request alone in an empty queue is admitted unless it is too large (its own
    service time is compared with the whole budget, the wait behind others with the planned
    share of it); a `LATE` refusal's `retry_after_s` is the time until the queue
    ahead of it will have drained to where it fits, at least `MIN_RETRY_S`;
    the limit of `TOO_LARGE` is at least `batch_rows` (capped by `max_rows`), so a request
    of one batch is never too large unless the queue's cap is below a batch.
    """
    if r.rows > r.max_rows:
        return Admission(Verdict.TOO_LARGE, limit_rows=r.max_rows)
    if math.isinf(r.budget_s):  # no latency objective at all: the queue's cap only
        return ADMIT
    rate = r.rows_per_s
    if rate is None or not rate > 0:
        if r.ahead_rows <= 0 or r.ahead_rows + r.rows <= r.unmeasured_rows:
            return ADMIT
        return Admission(Verdict.LATE, math.inf, retry_after_s=UNMEASURED_RETRY_S)
    own_s = max(r.service_s, r.rows / rate)
    if r.rows > r.batch_rows and own_s > r.budget_s:
        # split into several batches, it would take longer than its budget on an idle model
        limit = max(r.batch_rows, min(r.max_rows, math.floor(r.budget_s * rate)))
        if r.rows > limit:
            return Admission(Verdict.TOO_LARGE, own_s, limit_rows=limit)
    predicted = r.running_s + r.ahead_rows / rate + own_s
    plan_s = r.budget_s if r.deadline else PLAN_SHARE * r.budget_s
    if predicted <= plan_s or r.ahead_rows <= 0:
        return Admission(Verdict.ADMIT, predicted)
    # the queue must first drain the rows past those it may hold ahead of this request
    excess_s = predicted - max(plan_s, r.running_s + own_s)
    return Admission(Verdict.LATE, predicted, retry_after_s=max(MIN_RETRY_S, excess_s))


class DrainRate:
    """A model's drain rate in rows per second, measured from completed batches.

    Decaying sums of rows and of the seconds they took, twice: weights halve every
    `halflife_s` of passed-in time in one, every `fast_halflife_s` in the other; the rate is
    the lower of the two, so a slowdown (a throttled GPU, a CPU the flood's own requests
    compete for) shows within the short half-life and a speed-up over the long one. Each
    sample weighs its seconds (a long batch counts as much as the many short ones that take
    as long). The caller says what a sample is (`Batcher._measure_drain`): under backlog,
    a batch's rows and the wall time since the batch before ended (the worker's idle time
    between batches, waiting for a busy event loop, is in it: what the queue really drains);
    otherwise what a full queue would drain, from the fitted service time of a full batch.
    Invariant: `rows_per_s` is None until a sample was observed, then > 0.
    """

    __slots__ = ("_last_s", "_sums", "halflives_s")

    def __init__(self, halflife_s: float = 2.0, fast_halflife_s: float = 0.25) -> None:
        if not (halflife_s > 0 and fast_halflife_s > 0):
            raise ValueError(f"halflife_s must be > 0, got {halflife_s!r} and {fast_halflife_s!r}")
        self.halflives_s = (halflife_s, fast_halflife_s)
        self._sums = [[0.0, 0.0], [0.0, 0.0]]  # per half-life: [rows, seconds]
        self._last_s: float | None = None

    def observe(self, now_s: float, rows: float, seconds: float) -> None:
        """`rows` drained in `seconds`, up to `now_s`."""
        if not (rows > 0 and seconds > 0):
            return
        last = self._last_s
        elapsed = now_s - last if last is not None and now_s > last else 0.0
        if last is None or now_s > last:
            self._last_s = now_s
        for sums, halflife in zip(self._sums, self.halflives_s, strict=True):
            decay = 0.5 ** (elapsed / halflife) if elapsed else 1.0
            sums[0] = sums[0] * decay + rows
            sums[1] = sums[1] * decay + seconds

    @property
    def rows_per_s(self) -> float | None:
        (rows, seconds), (fast_rows, fast_seconds) = self._sums
        if seconds <= 0:
            return None
        return min(rows / seconds, fast_rows / fast_seconds)
