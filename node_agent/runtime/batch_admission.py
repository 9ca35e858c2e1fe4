"""A batcher's admission control (loop thread): the drain rate it measures from completed
batches, and the decision (`admission.decide`) it takes for each request from what is
queued at that moment.

Reads the queue without its lock (an estimate: only the loop adds to it, workers only take
from it), so a refusal never waits for a worker. A request without a deadline whose rows
and all queued ones fit under `fast_rows` is admitted without building a decision: the
common case costs a comparison.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NoReturn

from edgefleet_api.types import Priority
from node_agent.errors import RequestTooLarge, TooManyRequests
from node_agent.runtime.admission import (
    DEFAULT_BUDGET_S,
    MIN_RETRY_S,
    PLAN_SHARE,
    UNMEASURED_RETRY_S,
    Admission,
    AdmissionRequest,
    DrainRate,
    Verdict,
    decide,
)
from node_agent.runtime.stream_pool import URGENT

if TYPE_CHECKING:
    from node_agent.runtime.batch_queue import BatchQueue
    from node_agent.runtime.batching_policy import BatchingPolicy

MEASURE_EVERY_S = 0.005
"""Completed batches feed the drain rate in lots of this long (the first at once)."""
UNMEASURED_ROWS = 256
"""Before any batch completed (no drain rate yet), a queue holding rows admits arrivals up to
this many rows (or the policy's bound, if lower; a batch per worker at least): a burst at
startup is served, and even the slow example model (~70 rows/s) is handed seconds of work,
not the minute its 4,096-row hard cap holds."""


class BatchAdmission:
    """Admission for one batcher's queue; see the module docstring. Loop thread only."""

    __slots__ = ("_last_end_s", "_lot_rows", "_lot_s", "_lot_start_s", "drain_rate", "fast_rows",
                 "max_batch", "name", "policy", "queue", "refused_late", "refused_too_large",
                 "urgent_lane", "workers")  # fmt: skip

    def __init__(
        self, name: str, policy: BatchingPolicy, queue: BatchQueue, *, workers: int, max_batch: int
    ) -> None:
        self.name = name
        self.policy = policy
        self.queue = queue
        self.workers = workers
        self.max_batch = max_batch
        self.urgent_lane = queue.urgent_lane
        self.drain_rate = DrainRate()
        self._last_end_s: float | None = None
        """When the last batch that ran ended, if a full batch was queued then."""
        self._lot_rows, self._lot_s, self._lot_start_s = 0.0, 0.0, -MEASURE_EVERY_S
        """Batches measured and not yet fed to `drain_rate` (`measure`)."""
        self.fast_rows = float(self.unmeasured_rows())
        """A request without a deadline, of a batch or fewer rows, is admitted without
        `decide` while its rows and all queued ones are at most this: a bound on where
        `admission.decide` admits anyway, recomputed as batches complete (`_fast_path`)."""
        self.refused_late = 0
        """Refused: predicted to wait past its deadline or the model's latency budget."""
        self.refused_too_large = 0
        """Refused: more rows than the model can ever serve within its budget or queue cap."""

    def check(
        self,
        rows: int,
        priority: Priority,
        deadline_s: float | None,
        now_s: float,
        batch_size: int,
        running: bool,
    ) -> None:
        """Raise `TooManyRequests` (429) or `RequestTooLarge` (413) unless the request may
        queue; `running`: a batch of this model is out."""
        if deadline_s is None and rows <= self.max_batch and self.queue.pieces.cost + rows <= self.fast_rows:
            return
        admission = self.decide(rows, priority, deadline_s, now_s, batch_size, running)
        if not admission.admitted:
            self._refuse(admission, rows, deadline_s)

    def decide(
        self,
        rows: int,
        priority: Priority,
        deadline_s: float | None,
        now_s: float,
        batch_size: int,
        running: bool,
    ) -> Admission:
        """Whether a request of `rows` would be served in time (`admission.decide`)."""
        q = self.queue
        policy = self.policy
        budget = deadline_s - now_s if deadline_s is not None else self.budget_s()
        ahead = q.pieces.cost_up_to(priority)
        staged = q.staged
        if staged is not None and (priority > URGENT or not self.urgent_lane):
            ahead += staged.batch.live_rows
        return decide(
            AdmissionRequest(
                rows=rows,
                ahead_rows=ahead,
                budget_s=budget,
                deadline=deadline_s is not None,
                # (its batch: under backlog a full one, not its own rows alone)
                service_s=policy.predict_service_s(min(batch_size, rows + math.ceil(ahead))),
                running_s=policy.predict_service_s(batch_size) if running else 0.0,
                rows_per_s=self.drain_rate.rows_per_s,
                max_rows=policy.max_queue_rows,
                batch_rows=self.max_batch,
                unmeasured_rows=self.unmeasured_rows(),
            )
        )

    def budget_s(self) -> float:
        """The budget of a request without a deadline: the SLO the policy plans for, else
        `admission.DEFAULT_BUDGET_S`."""
        slo = self.policy.latency_budget_s
        return DEFAULT_BUDGET_S if slo is None else slo

    def unmeasured_rows(self) -> int:
        bound = self.policy.decision().queue_limit_rows
        return max(min(UNMEASURED_ROWS, bound), self.max_batch * self.workers)

    def _refuse(self, admission: Admission, rows: int, deadline_s: float | None) -> NoReturn:
        within = "the request's timeout" if deadline_s is not None else "the model's latency objective"
        if admission.verdict is Verdict.TOO_LARGE:
            self.refused_too_large += 1
            raise RequestTooLarge(
                f"{self.name}: a request may have at most {admission.limit_rows} rows (got {rows}): "
                f"more cannot be served within {within} or the queue's cap; split it"
            )
        self.refused_late += 1
        raise TooManyRequests(
            f"{self.name}: too busy: predicted wait {admission.predicted_s:.3g} s is past {within}",
            retry_after_s=admission.retry_after_s,
        )

    def drain_s(self, rows: float) -> float:
        """Seconds for the queue to run `rows` rows at the measured rate (for Retry-After)."""
        rate = self.drain_rate.rows_per_s
        return UNMEASURED_RETRY_S if rate is None else max(MIN_RETRY_S, rows / rate)

    def measure(self, end_s: float, rows: int, service_s: float) -> None:
        """Feed the drain rate a batch that ran (`admission.DrainRate`). Under backlog (a
        full batch was queued when the batch before ended, so the workers had no reason to
        wait): its rows over the wall time since that end. Otherwise the rows a full queue
        would have drained in its service time, at the fitted time of a full batch (a light
        load's small batches say little of what the model drains when it has to). Fed in
        `MEASURE_EVERY_S` lots: a tiny model's batch costs less than the update."""
        policy = self.policy
        size = policy.decision().batch_size
        last = self._last_end_s
        if last is not None and end_s > last:
            drained, seconds = float(rows), end_s - last
        else:
            full_s = policy.predict_service_s(size)
            per_s = size * self.workers / full_s if full_s > 0 else rows / max(service_s, 1e-9)
            drained, seconds = per_s * service_s, service_s
        self._last_end_s = end_s if self.queue.queued_rows() >= size else None
        self._lot_rows += drained
        self._lot_s += seconds
        if end_s - self._lot_start_s < MEASURE_EVERY_S:
            return
        self.drain_rate.observe(end_s, self._lot_rows, self._lot_s)
        self._lot_rows, self._lot_s, self._lot_start_s = 0.0, 0.0, end_s
        self._fast_path()

    def _fast_path(self) -> None:
        """Recompute `fast_rows`: with rate r, budget B (SLO or default) and a batch of b rows
        taking s(b), a request of n <= b rows behind q queued rows (plus a staged batch of at
        most b) waits at most s(b) (the running batch) + (q + b)/r + s(b) + n/r, which is
        within PLAN_SHARE x B while q + n <= (PLAN_SHARE x B - 2 s(b)) r - b."""
        rate = self.drain_rate.rows_per_s
        if rate is None:
            return
        b = self.policy.decision().batch_size
        self.fast_rows = (PLAN_SHARE * self.budget_s() - 2 * self.policy.predict_service_s(b)) * rate - b

    def shed_bound(self) -> float:
        """Queued rows past which deadline-free work would wait past its budget: the policy's
        bound, or what drains within the budget at the measured rate, if less."""
        bound = float(self.policy.decision().queue_limit_rows)
        rate = self.drain_rate.rows_per_s
        if rate is not None:
            bound = min(bound, max(float(self.max_batch), rate * self.budget_s()))
        return bound
