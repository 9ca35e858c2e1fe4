"""Adaptive batcher: one per model version; groups requests into batches on the stream pool.

Life of a request:
1. `submit` (event loop thread) first predicts the request's wait (`batch_admission`: rows
   queued ahead of it at its class or more urgent ones over the drain rate measured from
   completed batches, plus its own service time) against its deadline, else the policy's
   latency budget (its SLO), else `admission.DEFAULT_BUDGET_S`. A request that would wait
   past it is refused at once (`TooManyRequests`, Retry-After from the drain rate), one that
   never can fit gets `RequestTooLarge` with the limit; both without taking the lock the
   workers use. Then it splits the request into pieces of at most `max_batch_size` rows
   and offers them, all or none, to an `UrgencyQueue` bounded by the policy's
   `queue_limit_rows` (with an SLO, the rows it serves within it; else the hard cap): priority
   class first, then earliest deadline, then arrival. A refusal raises `TooManyRequests` at
   once; a more urgent arrival may displace queued work, whose callers get `TooManyRequests`.
   A request whose caller goes away (its future is cancelled: the HTTP client disconnected)
   has its queued pieces skipped when the next batch is formed: they never run
   (`abandoned_rows`).
2. When a batch is due (the queue holds `batch_size` rows not yet claimed by a
   waiting batch, or the batch window has closed) and fewer than `pipeline_depth`
   batches of this model are out, the loop acquires the model (a lease) and submits
   a batch *ticket* to the pool. The window opens when a request reaches an empty
   queue or when the previous ticket left, and lasts the policy's `window_s` (at most its
   `delay_s`; the adaptive policy's also no longer than arrivals need to fill the batch),
   read once per batch (monotonic clock; no wall-clock remainders, cf. MLServer #1936).
3. A worker runs the ticket: only then does it take the most urgent pieces from the
   queue (late binding: a high-priority request that arrived a moment ago goes into
   the very next batch), drops those whose deadline passed or would pass before the
   batch ends (`DeadlineExceeded`, never run), concatenates the rest along dim 0, runs
   the model and checks the row count. When the batch raises and has several members,
   each member is re-run alone so only the culprit fails (`InferenceFailed`).
4. The worker posts the batch to the loop (one `call_soon_threadsafe` wakes it for
   every batch posted until it drains them). Then, while another batch is due (step 2's
   rule), the lease allows it (`may_continue`: the scheduler wants no memory back) and
   no job of another model waits at the pool (`StreamPool.should_yield`), the same
   ticket takes and runs the next batch at once: under load a worker goes from batch to
   batch without a thread hand-off or a lease per batch (the hand-off cost 90-230 us of
   CPU per batch on a 2-core machine). A ticket run inline on the loop (`StreamPool.
   run_inline`, tiny models) does the same with full batches only, up to
   `INLINE_MAX_BATCHES` and the pool's inline bound in predicted time: one lease, one pool
   job and one drain for several batches (a no-op model at batch 1: 30 -> 15 us of CPU per
   request).
5. On the loop, each posted batch feeds the policy (rows, service time, latencies) and
   its outputs are sliced into each member's own rows and its futures resolved (chunked
   requests re-joined); when a ticket ends its lease is released, queued work a shrunk
   bound no longer covers is shed, and the next ticket is issued.
6. Staging, when the loop has a core the model's threads leave free (`StreamPool.
   spare_core`: on CUDA, or CPU workers x torch threads < cores) and batches take long
   enough that the model, not the loop, limits throughput (`BatcherSettings.
   stage_min_service_s`, 1 ms; below it the loop is the bottleneck): as it drains a batch,
   which is as the worker starts the next one, the loop takes and concatenates the batch
   after that if a full one of non-urgent pieces waits (`BatchQueue.stage`); the worker takes
   it as is when its batch ends, unless more urgent pieces have queued since (they run
   first, in a batch of their own) or a member's deadline would now pass (it fails). The
   worker then runs Python only around the model call: after a batch its caches hold
   the model's data, and each step there costs 10-20x what it costs the loop (measured on
   the example CNN: 160 us of worker time per batch from 410; served/bare 0.92 -> 0.95).
   Without a spare core the loop would take those cycles from the model's own threads.

Urgent requests (class HIGH or more urgent, `stream_pool.URGENT`), when the pool has an
urgent lane: besides the pipeline's tickets, the batcher keeps one *urgent ticket* out
while such requests are queued. It is issued as the request arrives (no batch window:
urgent work does not wait to be batched with later arrivals), gets its lease from
`acquire_urgent`, goes to the pool at the request's class (regular tickets then go at
NORMAL: only urgent tickets may run on the lane), where an idle regular worker,
or else an urgent-lane worker, takes it even while every regular worker is inside a normal
batch, and runs batches of urgent pieces only, back to back while such pieces are queued
(late binding as above). With a lane no batch mixes classes: a regular ticket that starts
while urgent pieces are queued runs them, in a batch of their own, before normal work (in
a normal batch of 16 rows they would take ten times longer), so urgent pieces that queue
up while the urgent ticket runs get a second worker, and a model whose traffic is all
urgent uses every worker. So an urgent request waits neither for the window nor for a
normal batch that is already running.

Guarantee: every admitted request's future gets exactly one outcome (result or error),
including on `stop()` (`ShuttingDown`) and when its deadline passes while it waits (an
expiry timer fails it at its deadline).

Deadlines are `time.monotonic()` timestamps (the default asyncio loop clock). Once a
request has started it runs to completion and its caller gets the result (a caller who
gave up after its batch was taken is not told: its rows may still run).

Tensors at the boundary are numpy arrays, inside the worker torch tensors (`batch_tensors`):
a batch costs one `np.concatenate` per input and a numpy view of the outputs per member.

This module is the loop's side. `batch_queue` holds what the loop shares with the workers,
under its `lock` (the queue, the staged batch; the policy is fed under it too, as workers
read its service predictions; other policy reads are of immutable decisions); `batch_ticket`
is the pool job, `batches` the requests, pieces and batches. Futures, timers and leases are
touched on the loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from edgefleet_api.types import Priority
from node_agent.errors import AgentError, DeadlineExceeded, ShuttingDown, TooManyRequests
from node_agent.runtime.batch_admission import BatchAdmission
from node_agent.runtime.batch_queue import LEAST_URGENT_REGULAR, BatchQueue
from node_agent.runtime.batch_tensors import Arrays
from node_agent.runtime.batch_ticket import Acquire, Lease, Ticket
from node_agent.runtime.batcher_settings import BatcherSettings
from node_agent.runtime.batches import SKIPPED, Batch, Piece, Request, dead, split_outputs
from node_agent.runtime.stream_pool import URGENT, StreamPool
from node_agent.runtime.urgency_queue import ADMITTED

if TYPE_CHECKING:
    from node_agent.runtime.batching_policy import BatchingPolicy

log = logging.getLogger(__name__)


SHED_HYSTERESIS = 1.5
"""Queued rows may exceed a shrunk bound by this factor before the excess is shed."""
INLINE_MAX_BATCHES = 16
"""The most batches one ticket runs inline, on the loop, before the loop gets back to its
other work (the pool's `inline_max_s` bounds their predicted time in all)."""


@types.coroutine
def _resume(coro: Any, awaited: Any) -> Any:
    """Finish, inside a Task, a coroutine that was stepped by hand and is suspended on
    `awaited`: what the Task sends or throws is forwarded, as `yield from` would."""
    try:
        while True:
            try:
                sent = yield awaited
            except BaseException as exc:
                awaited = coro.throw(exc)
            else:
                awaited = coro.send(sent)
    except StopIteration as stop:
        return stop.value


class Batcher:
    """Collects one model version's requests into batches; see the module docstring.

    Create and use it on one asyncio event loop thread; `stop()` explicitly.
    """

    def __init__(
        self,
        name: str,
        pool: StreamPool,
        acquire: Acquire,
        policy: BatchingPolicy,
        settings: BatcherSettings | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        acquire_urgent: Acquire | None = None,
    ) -> None:
        """`acquire_urgent`: how urgent tickets get their lease (default `acquire`); the
        engine passes one that bypasses the concurrency gate, whose slots are the regular
        workers'."""
        self.name = name
        self.pool = pool
        self.settings = settings or BatcherSettings()
        self.policy = policy
        # (what a policy says it ignores is not made for it per request; by default, all)
        self._observe_arrival = policy.observe_arrival if getattr(policy, "uses_arrivals", True) else None
        self._latencies: bool = getattr(policy, "uses_latencies", True)
        self.loop = loop or asyncio.get_running_loop()
        self._acquire = acquire
        self._acquire_urgent = acquire_urgent or acquire
        self._urgent_lane = pool.urgent_workers > 0
        self._max_batch = self.settings.max_batch_size
        self._dynamic = self.settings.dynamic_shapes
        depth = self.settings.pipeline_depth
        self._depth = depth if depth is not None else pool.num_workers + 1
        self._queue = BatchQueue(
            name,
            policy,
            pool,
            owner=self,
            loop=self.loop,
            drain=self._drain,
            dynamic_shapes=self.settings.dynamic_shapes,
            bf16_inputs=self.settings.bf16_inputs,
            isolate_errors=self.settings.isolate_errors,
        )
        self._admission = BatchAdmission(
            name, policy, self._queue, workers=pool.num_workers, max_batch=self._max_batch
        )
        self._out = 0  # tickets issued and not completed, urgent ones included (loop thread)
        self._urgent_out = 0  # urgent tickets issued and not completed (loop thread)
        self._window_timer: asyncio.Handle | None = None
        self._window_close_s = 0.0
        """When the armed window timer fires (uvloop hands back a plain Handle, with no `when`, for
        a time within its millisecond resolution)."""
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_at_s: float | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        # counters (tests, benchmarks, metrics); requests unless named otherwise
        self.submitted = 0
        self.completed = 0
        self.refused = 0
        """Refused: the queue at its bound (`queue_limit_rows`)."""
        self.displaced = 0
        self.expired = 0
        self.failed = 0
        self.batches = 0
        self.rows_run = 0
        self.staged = 0
        """Batches formed on the loop while a worker ran the one before (`_stage`)."""

    # --- public ------------------------------------------------------------

    def submit(
        self,
        inputs: Arrays,
        rows: int,
        priority: Priority = Priority.NORMAL,
        deadline_s: float | None = None,
    ) -> asyncio.Future[Arrays]:
        """Queue a request of `rows` rows (already validated); its future gets the outputs.

        `inputs` are numpy arrays with `rows` rows along dim 0 (the batcher does not
        copy them; do not modify them until the future is done). Raises `Overloaded`
        (`TooManyRequests`: refused, by predicted wait or for lack of room; retry later),
        `RequestTooLarge` (never fits), `DeadlineExceeded` (deadline already past) or
        `ShuttingDown`. Cancelling the future (the caller went away) drops its queued rows.
        """
        q = self._queue
        if q.closed:
            raise ShuttingDown(f"{self.name}: batcher is stopping")
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows!r}")
        now = time.monotonic()
        if deadline_s is not None and deadline_s <= now:
            self.expired += 1
            raise DeadlineExceeded(f"{self.name}: deadline already passed at submission")
        decision = self.policy.decision()
        queue = q.pieces
        admission = self._admission
        # (`BatchAdmission.check`'s own fast path, inlined: a call is a tenth of this method)
        if deadline_s is not None or queue.cost + rows > admission.fast_rows or rows > admission.max_batch:
            admission.check(rows, priority, deadline_s, now, decision.batch_size, self._out > 0)
        future: asyncio.Future[Arrays] = self.loop.create_future()
        limit = self._max_batch
        npieces = 1 if rows <= limit else -(-rows // limit)
        request = Request(future, priority, deadline_s, now, npieces)
        group = tuple(tuple(t.shape[1:]) for t in inputs.values()) if self._dynamic else None
        if npieces == 1:
            piece = Piece(request, 0, inputs, rows, group)
        else:
            pieces: list[Piece] = []
            costs: list[float] = []
            for k in range(npieces):
                lo, hi = k * limit, min(rows, (k + 1) * limit)
                pieces.append(Piece(request, k, {n: t[lo:hi] for n, t in inputs.items()},
                                     hi - lo, group))  # fmt: skip
                costs.append(float(hi - lo))
        bound = decision.queue_limit_rows
        with q.lock:
            was_empty = queue.cost == 0
            queue.bound = bound if bound >= rows else rows
            if npieces == 1:
                offer = queue.offer_one(piece, rows, priority, deadline_s, now)
            else:
                offer = queue.offer(pieces, costs, priority, deadline_s, now)
            queued = queue.cost
            if offer is ADMITTED or offer.admitted:
                if self._observe_arrival is not None:
                    self._observe_arrival(now, rows)
                if was_empty or q.window_close_s is None:
                    q.open_window_locked(now, decision, q.pending * decision.batch_size)
        if offer is not ADMITTED:  # (something expired, was displaced, or the offer failed)
            if offer.expired:
                self._fail_pieces(offer.expired, DeadlineExceeded, "deadline passed while queued")
            if offer.displaced:
                self._displace(offer.displaced)
            if not offer.admitted:
                self.refused += 1
                raise TooManyRequests(
                    f"{self.name}: queue full ({queued:.0f} rows queued, bound {queue.bound:.0f})",
                    retry_after_s=self._admission.drain_s(queued + rows - queue.bound),
                )
        self.submitted += 1
        if deadline_s is not None and (self._expiry_at_s is None or deadline_s < self._expiry_at_s):
            self._arm_expiry(deadline_s)
        # (with the pipeline full, a finishing ticket's drain dispatches regular work; so does
        # it while tickets yet to start claim every queued row: `_dispatch` would find no
        # batch due and no window to arm. Unlocked reads: workers only lower both counts, and
        # a ticket that lowered them drains, which dispatches)
        if priority <= URGENT or (
            self._out - self._urgent_out < self._depth
            and (q.staged is not None or queue.cost > q.pending * decision.batch_size)
        ):
            self._dispatch()
        return future

    def queued_rows(self) -> float:
        """Rows waiting to run: queued, and staged (step 6 of the module docstring)."""
        return self._queue.queued_rows()

    @property
    def rows_per_s(self) -> float | None:
        """The measured drain rate (None before any batch completed)."""
        return self._admission.drain_rate.rows_per_s

    @property
    def refused_late(self) -> int:
        """Refused: predicted to wait past its deadline or the model's latency budget."""
        return self._admission.refused_late

    @property
    def refused_too_large(self) -> int:
        """Refused: more rows than the model can ever serve within its budget or queue cap."""
        return self._admission.refused_too_large

    @property
    def abandoned_rows(self) -> int:
        """Queued rows skipped, never run, because their caller went away."""
        return self._queue.abandoned_rows

    @property
    def batches_out(self) -> int:
        """Tickets issued and not yet completed."""
        return self._out

    async def stop(self, timeout_s: float | None = 10.0) -> None:
        """Fail queued requests with ShuttingDown; wait (bounded) for running batches."""
        self._queue.closed = True
        for timer in (self._window_timer, self._expiry_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        self._window_timer = self._expiry_timer = self._retry_timer = None
        queued = self._queue.unqueue_all()
        self._fail_pieces(queued, ShuttingDown, "batcher stopped")
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("batcher %s: %d batches still out at stop", self.name, self._out)

    def failure(self, exc: BaseException) -> AgentError:
        """The error a caller sees when running its rows raised `exc`."""
        return self._queue.failure(exc)

    # --- batching ----------------------------------------------------------

    def _dispatch(self) -> None:
        """Issue tickets while the pipeline has room and a batch is due, and an urgent
        ticket if urgent pieces wait and none is out."""
        q = self._queue
        if q.closed:
            return
        queue = q.pieces
        # (unlocked: only this thread queues pieces, so "none urgent" cannot be stale)
        if self._urgent_lane and not self._urgent_out and queue.holds_up_to(URGENT):
            with q.lock:
                top = queue.top_priority()
            if top is not None and top <= URGENT:
                self._issue(top, urgent=True)
        while self._out - self._urgent_out < self._depth:
            decision = self.policy.decision()
            now = time.monotonic()
            with q.lock:
                top = None
                if q.due_locked(now, decision.batch_size):
                    q.open_window_locked(now, decision, (q.pending + 1) * decision.batch_size)
                    top = queue.top_priority()
                    staged = q.staged
                    if staged is not None and (top is None or staged.most_urgent < top):
                        top = staged.most_urgent
                    assert top is not None, "a batch is due from an empty queue"
                close = q.window_close_s
                waiting = q.queued_rows() > q.pending * decision.batch_size
            if top is None:
                if waiting and close is not None:  # rows wait for the window to close
                    self._arm_window(close)
                return
            if self._urgent_lane and top <= URGENT:  # urgency travels with the urgent ticket:
                top = LEAST_URGENT_REGULAR  # a regular one on the lane would hold it for normal work
            self._issue(top)

    def _issue(self, priority: Priority, urgent: bool = False) -> None:
        """Acquire the model and submit a ticket. The acquire coroutine's first step runs
        inline: when the model is resident the scheduler answers without awaiting, and
        the batch costs no Task; otherwise a Task finishes what the step started."""
        ticket = Ticket(self._queue, urgent)
        self._out += 1
        if urgent:
            self._urgent_out += 1
        else:
            q = self._queue
            with q.lock:
                q.pending += 1
        self._idle.clear()
        coro = self._acquire_urgent() if urgent else self._acquire()
        try:
            awaited = coro.send(None)  # type: ignore[attr-defined]
        except StopIteration as got:
            self._submit(ticket, priority, got.value)
            return
        except BaseException as exc:
            self._acquire_failed(ticket, exc)
            if not isinstance(exc, Exception):
                raise
            return
        task = self.loop.create_task(self._start(ticket, priority, _resume(coro, awaited)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, ticket: Ticket, priority: Priority, acquiring: Any) -> None:
        try:
            lease = await acquiring
        except BaseException as exc:
            self._acquire_failed(ticket, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._submit(ticket, priority, lease)

    def _acquire_failed(self, ticket: Ticket, exc: BaseException) -> None:
        self._abandon(ticket)
        if isinstance(exc, Exception):
            self._fail_queued(self.failure(exc))
        else:
            self._fail_queued(ShuttingDown(f"{self.name}: cancelled"))

    def _submit(self, ticket: Ticket, priority: Priority, lease: Lease) -> None:
        ticket.lease = lease
        if self.pool.runs_inline and not ticket.urgent and self._run_inline(ticket):
            return
        try:
            refusal = self.pool.submit(ticket.run, ticket.on_done, priority=priority, owner=self)
        except ShuttingDown as exc:
            self._abandon(ticket)
            self._fail_queued(exc)
            return
        if refusal is not None:  # the pool is saturated (by other models): try again later
            self._abandon(ticket)
            if self._retry_timer is None and not self._queue.closed:
                self._retry_timer = self.loop.call_later(refusal.retry_after_s, self._on_retry)

    def _run_inline(self, ticket: Ticket) -> bool:
        """Run the ticket now, on the loop, if its batch is full and costs less than a
        hand-off to a worker and back (see stream_pool). Only a full one: a worker takes its
        rows when it starts, and the rows that arrive meanwhile fill it; inline, a part batch
        would run as it is, and at high load every batch would stay as small as the queue at
        the moment it is issued. It goes on to further full batches, as a worker's ticket
        does, while their predicted time in all stays within the pool's inline bound and
        for `INLINE_MAX_BATCHES` at most (no request arrives meanwhile: the loop is busy), so
        a tiny model's batches share one lease, one pool job and one drain. True when it ran."""
        size = self.policy.decision().batch_size
        q = self._queue
        with q.lock:
            full = q.queued_rows() >= q.pending * size
        if not full:
            return False
        predicted = self.policy.predict_service_s(size)
        ticket.inline = True
        if predicted > 0:
            ticket.max_batches = max(1, min(INLINE_MAX_BATCHES, int(self.pool.inline_max_s / predicted)))
        if self.pool.run_inline(ticket.run, ticket.on_done_inline, predicted):
            return True
        ticket.inline = False
        ticket.max_batches = None
        return False

    def _abandon(self, ticket: Ticket) -> None:
        """A ticket that never reached a worker: give its lease and slot back."""
        if ticket.lease is not None:
            ticket.lease.release()
            ticket.lease = None
        if ticket.urgent:
            self._urgent_out -= 1
        else:
            q = self._queue
            with q.lock:
                q.pending -= 1
        self._out -= 1
        if self._out == 0:
            self._idle.set()

    def _drain(self) -> None:
        """On the loop: complete every posted batch and ticket, then shed and dispatch once."""
        q = self._queue
        with q.lock:  # (the other side of `BatchQueue.post`)
            done, q.posted = q.posted, []
            q.drain_armed = False
        ran = False
        for ticket, batch, error, ends in done:
            if error is None and batch is not None:
                ran = self._complete(batch) or ran
            if ends:
                self._end(ticket, error)
        if ran:
            self._shed_excess()
        if self._out == 0:
            self._idle.set()
        else:
            self._stage()
        self._dispatch()

    def _stage(self) -> None:
        """While a regular ticket runs a batch, form its next one here on the loop (step 6
        of the module docstring; `BatchQueue.stage`), where there is a spare core and the
        model's batches are long enough. Called as a batch is drained, which is as the
        worker starts the next one."""
        q = self._queue
        if q.staged is not None or q.closed or not self.pool.spare_core:
            return
        size = self.policy.decision().batch_size
        if self.policy.predict_service_s(size) < self.settings.stage_min_service_s:
            return
        batch = q.stage(size, self._out - self._urgent_out)
        if batch is None:
            return
        if batch.pieces:
            self.staged += 1
        elif batch.expired:  # (all it found had expired or had no caller)
            self._fail_pieces(batch.expired, DeadlineExceeded, "deadline passed while queued")

    def _complete(self, batch: Batch) -> bool:
        """Feed the policy a batch that ran and deliver every member's outcome; True if
        rows ran."""
        self.batches += bool(batch.pieces)
        if batch.expired:
            self._fail_pieces(batch.expired, DeadlineExceeded, "deadline passed while queued")
        pieces, outcomes = batch.pieces, batch.outcomes
        completed = 0
        outputs = batch.outputs
        if outputs is not None:  # the batch ran in one call: every live member has rows
            nlive = batch.live
            live = pieces if nlive == len(pieces) else pieces[:nlive]
            end = batch.end_s
            rows = batch.rows
            latencies = [end - p.request.arrival_s for p in live] if self._latencies else ()
            with self._queue.lock:
                self.policy.observe(end, rows, batch.service_s, latencies)
            self._admission.measure(end, rows, batch.service_s)
            if rows == len(live) > 1 and len(outputs) == 1:  # one row each, one output: the usual
                # (`split_outputs`'s row views, each delivered as it is made)
                ((name, out),) = outputs.items()
                for piece, row in zip(live, out[:, None], strict=True):
                    request = piece.request
                    if request.parts is None:  # a whole request (inlined `Piece.deliver`)
                        future = request.future
                        if not future.done():
                            future.set_result({name: row})
                            completed += 1
                    elif piece.deliver({name: row}):
                        completed += 1
            else:
                for piece, part in zip(live, split_outputs(outputs, live, rows), strict=True):
                    request = piece.request
                    if request.parts is None:  # a whole request (inlined `Piece.deliver`)
                        future = request.future
                        if not future.done():
                            future.set_result(part)
                            completed += 1
                    elif piece.deliver(part):
                        completed += 1
            if nlive == len(pieces):  # (none doomed)
                self.completed += completed
                self.rows_run += rows
                return rows > 0
            pieces, outcomes = pieces[nlive:], outcomes[nlive:]  # the doomed
        for piece, outcome in zip(pieces, outcomes, strict=True):
            if type(outcome) is dict:  # (a member run alone after its batch raised)
                if piece.deliver(outcome):
                    completed += 1
            elif isinstance(outcome, BaseException):
                self._fail(piece.request, outcome)
            else:
                assert outcome is SKIPPED, outcome
        self.completed += completed
        self.rows_run += batch.rows
        return batch.rows > 0

    def _end(self, ticket: Ticket, error: BaseException | None) -> None:
        """A ticket's job ended: release its lease and slot; on an error, tell the members
        of the batch it was running (a ticket that raised is a bug)."""
        if ticket.lease is not None:
            ticket.lease.release()
            ticket.lease = None
        self._out -= 1
        if ticket.urgent:
            self._urgent_out -= 1
        if error is None:
            return
        if not ticket.started:  # dropped by the pool before it ran
            if not ticket.urgent:
                q = self._queue
                with q.lock:
                    q.pending -= 1
            if isinstance(error, ShuttingDown):
                self._fail_queued(error)
            elif self._retry_timer is None and not self._queue.closed:  # displaced: retry
                retry = getattr(error, "retry_after_s", 0.001)
                self._retry_timer = self.loop.call_later(retry, self._on_retry)
        batch = ticket.current
        if batch is not None:
            ticket.current = None
            self.batches += bool(batch.pieces)
            if batch.expired:
                self._fail_pieces(batch.expired, DeadlineExceeded, "deadline passed while queued")
            err = self.failure(error)
            for piece in batch.pieces:
                self._fail(piece.request, err)

    def _shed_excess(self) -> None:
        """After the model slowed (a smaller policy bound, or a lower drain rate than the
        one queued work was admitted at), queued work far past what drains within the
        model's budget (its SLO, or `admission.DEFAULT_BUDGET_S`) would only wait past it:
        refuse the least urgent part of the work admitted on that budget (requests without a
        deadline) now (`TooManyRequests`), so callers can retry elsewhere; work with a deadline
        is dropped if and when it is doomed (`BatchQueue.form_locked`). Hysteresis (1.5x) keeps
        small fluctuations from shedding anything."""
        bound = self._admission.shed_bound()
        q = self._queue
        if q.pieces.cost <= SHED_HYSTERESIS * bound:  # (unlocked: only this thread adds)
            return
        with q.lock:
            shed = q.pieces.shed(bound, without_deadline_only=True)
        if shed:
            self._displace(shed, "shed: the queue is past what the model can serve in its budget")

    # --- failures and timers -----------------------------------------------

    def _fail(self, request: Request, error: BaseException) -> None:
        if not request.future.done():
            if isinstance(error, DeadlineExceeded):
                self.expired += 1
            else:
                self.failed += 1
            request.future.set_exception(error)

    def _fail_pieces(self, pieces: Sequence[Piece], kind: type[AgentError], why: str) -> None:
        for piece in pieces:
            if not piece.request.future.done():
                self._fail(piece.request, kind(f"{self.name}: {why}"))

    def _fail_queued(self, error: BaseException) -> None:
        for piece in self._queue.unqueue_all():
            self._fail(piece.request, error)

    def _displace(self, victims: Sequence[Piece], why: str = "displaced by a more urgent request") -> None:
        err = TooManyRequests(
            f"{self.name}: {why}", retry_after_s=self._admission.drain_s(self._queue.pieces.cost)
        )
        chunked = False
        for piece in victims:
            if not piece.request.future.done():
                self.displaced += 1
                piece.request.future.set_exception(err)
            chunked = chunked or piece.request.parts is not None
        if chunked:  # the victims' other pieces must not hold queue room
            q = self._queue
            with q.lock:
                q.pieces.remove_if(dead)

    def _arm_window(self, close_s: float) -> None:
        timer = self._window_timer
        if timer is not None:
            if self._window_close_s == close_s:
                return
            timer.cancel()
        self._window_timer, self._window_close_s = self.loop.call_at(close_s, self._on_window), close_s

    def _on_window(self) -> None:
        self._window_timer = None
        self._dispatch()

    def _on_retry(self) -> None:
        self._retry_timer = None
        self._dispatch()

    def _arm_expiry(self, at_s: float) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._expiry_at_s = at_s
        self._expiry_timer = self.loop.call_at(at_s, self._on_expiry)

    def _on_expiry(self) -> None:
        self._expiry_timer = None
        self._expiry_at_s = None
        q = self._queue
        with q.lock:
            expired = q.pieces.pop_expired(time.monotonic())
            nxt = q.pieces.earliest_deadline()
        if expired:
            self._fail_pieces(expired, DeadlineExceeded, "deadline passed while queued")
        if nxt is not None and not q.closed:
            self._arm_expiry(nxt)
