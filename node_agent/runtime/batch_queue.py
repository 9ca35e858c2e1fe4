"""The queue between a batcher's event loop and the pool's workers.

Pieces go in on the loop (`Batcher.submit`); batches come out of it on a worker, as a
ticket starts a batch (`take`: late binding, the most urgent pieces queued at that moment),
or on the loop ahead of a ticket (`stage`); finished batches go back to the loop (`post`).
A `BatchQueue` is the `TicketHost` of its batcher's tickets: all a ticket may use.

Threads: what changes here is shared with the workers under `lock`: the queued pieces, the
staged batch, the count of tickets not yet started, the batch window, the posted batches.
The batcher feeds its policy under `lock` too (a take reads its service predictions).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from edgefleet_api.types import Priority
from node_agent.errors import AgentError, InferenceFailed
from node_agent.runtime.batches import Batch, Piece, StagedBatch, group_of
from node_agent.runtime.stream_pool import URGENT, StreamPool
from node_agent.runtime.urgency_queue import ANY_GROUP, UrgencyQueue

if TYPE_CHECKING:
    from node_agent.runtime.batch_ticket import Ticket
    from node_agent.runtime.batching_policy import BatchingDecision, BatchingPolicy

log = logging.getLogger(__name__)

_ALL_CLASSES = (Priority.CRITICAL, Priority.LOW)
_URGENT_CLASSES = (Priority.CRITICAL, URGENT)
LEAST_URGENT_REGULAR = Priority(URGENT + 1)
"""The most urgent class a regular ticket goes to the pool at, with an urgent lane."""
_NON_URGENT_CLASSES = (LEAST_URGENT_REGULAR, Priority.LOW)

Posted = tuple["Ticket", Batch | None, BaseException | None, bool]
"""A ticket, the batch it finished (or None), its job's error, and whether the job ended."""


class BatchQueue:
    """One batcher's pieces, and the batches taken from them; see the module docstring.

    Fields marked "under `lock`" change on both threads; `closed` is set once, on the loop;
    the rest are set at construction.
    """

    __slots__ = ("abandoned_rows", "bf16_inputs", "closed", "device", "drain", "drain_armed", "dynamic",
                 "isolate_errors", "lock", "loop", "name", "pending", "pieces", "policy", "posted",
                 "should_yield", "staged", "urgent_lane", "window_close_s")  # fmt: skip

    def __init__(
        self,
        name: str,
        policy: BatchingPolicy,
        pool: StreamPool,
        *,
        owner: object,
        loop: asyncio.AbstractEventLoop,
        drain: Callable[[], None],
        dynamic_shapes: bool,
        bf16_inputs: frozenset[str],
        isolate_errors: bool,
    ) -> None:
        """`owner`: the batcher, as its tickets' owner at the pool; `drain`: called on the
        loop to collect what was posted (`posted`)."""
        self.name = name
        self.policy = policy
        self.device = pool.device
        self.urgent_lane = pool.urgent_workers > 0
        """With a lane, no batch mixes urgent and other pieces (the batcher's docstring)."""
        self.should_yield = functools.partial(pool.should_yield, owner)
        self.loop = loop
        self.drain = drain
        self.dynamic = dynamic_shapes
        self.bf16_inputs = bf16_inputs
        self.isolate_errors = isolate_errors
        self.lock = threading.Lock()
        self.pieces: UrgencyQueue[Piece] = UrgencyQueue(
            policy.decision().queue_limit_rows, group_of if dynamic_shapes else None
        )
        """Queued pieces, in urgency order (under `lock`)."""
        self.pending = 0
        """Regular tickets issued and not yet started by a worker (under `lock`)."""
        self.staged: StagedBatch | None = None
        """The batch the loop formed for the next regular ticket (under `lock`; `stage`)."""
        self.window_close_s: float | None = None
        """When the open batch window closes (under `lock`)."""
        self.posted: list[Posted] = []
        """Batches and ticket ends for the loop, in order (under `lock`; `post`)."""
        self.drain_armed = False
        """A `drain` is scheduled on the loop (under `lock`)."""
        self.closed = False
        """The batcher is stopping (set on the loop): tickets take no further batch."""
        self.abandoned_rows = 0
        """Queued rows skipped, never run, because their caller went away (its future was
        cancelled: the HTTP client disconnected) (under `lock`; `alive`)."""

    def failure(self, exc: BaseException) -> AgentError:
        """The error a caller sees when running its rows raised `exc`."""
        if isinstance(exc, AgentError):
            return exc
        err = InferenceFailed(f"{self.name}: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err

    def alive(self, piece: Piece) -> bool:
        """Under `lock`: whether `piece`'s caller has no outcome yet; a piece whose caller
        went away (its future cancelled) is counted in `abandoned_rows` as it is skipped."""
        future = piece.request.future
        if not future.done():
            return True
        if future.cancelled():
            self.abandoned_rows += piece.rows
        return False

    def queued_rows(self) -> float:
        """Rows waiting to run: queued, and staged (`stage`)."""
        staged = self.staged
        return self.pieces.cost + (staged.batch.live_rows if staged is not None else 0)

    def due_locked(self, now: float, size: int) -> bool:
        """Whether a batch is due (under `lock`): rows not claimed by tickets waiting to
        start fill a batch of `size`, or some are queued and the batch window has closed."""
        unclaimed = self.queued_rows() - self.pending * size
        if unclaimed <= 0:
            return False
        if unclaimed >= size:
            return True
        close = self.window_close_s
        return close is None or now >= close

    def open_window_locked(self, now: float, decision: BatchingDecision, claimed_rows: float) -> None:
        """Open the next batch's window (under `lock`): it closes after the policy's
        `window_s`, given the queued rows past `claimed_rows` (those earlier batches take)."""
        have = self.queued_rows() - claimed_rows
        self.window_close_s = now + self.policy.window_s(now, decision, max(0.0, have))

    def form_locked(self, start: float, size: int, classes: tuple[Priority, Priority]) -> Batch:
        """Under `lock`: take the most urgent pieces of `classes` for a batch of `size`
        rows that starts at `start` (inputs not yet assembled). Pieces whose deadline would
        pass before a batch of that size ends are dropped (`DeadlineExceeded`, never run),
        and the batch is refilled from the queue in their place, so doomed work costs no
        batch room; pieces already past their deadline are `expired`."""
        queue = self.pieces
        latest_start = start + self.policy.predict_service_s(size)
        taken: list[Piece] = []
        doomed: list[Piece] = []
        rows = 0
        group: Hashable = ANY_GROUP
        expired = queue.pop_expired(start)
        while rows < size:
            got = queue.take(size - rows, self.alive, first_alone=not taken, group=group, classes=classes)
            if not got:
                break
            for piece in got:
                deadline = piece.request.deadline_s
                if deadline is not None and deadline < latest_start:
                    doomed.append(piece)
                else:
                    taken.append(piece)
                    rows += piece.rows
            if taken and self.dynamic:
                group = taken[0].group
        return Batch.of(taken, doomed, expired, self.name)

    # --- worker thread (a ticket) ------------------------------------------

    def take(self, ticket: Ticket, first: bool) -> Batch | None:
        """Take the most urgent pieces for `ticket`'s batch of the planned size (None: after
        the first batch, no batch is due): the batch the loop staged for it (`stage`) unless
        more urgent pieces have queued since, or else a batch formed now. The batch is
        `ticket.current` before its inputs are assembled; the first take marks the ticket
        started."""
        decision = self.policy.decision()
        size = decision.batch_size
        start = time.monotonic()
        queue = self.pieces
        urgent = ticket.urgent
        with self.lock:
            if first:
                if not urgent:
                    self.pending -= 1
                ticket.started = True
            elif urgent:
                if not queue.holds_up_to(URGENT):
                    return None
            elif not self.due_locked(start, size):
                return None
            elif ticket.inline and self.queued_rows() - self.pending * size < size:
                return None  # (inline, only a full batch: see `Batcher._run_inline`)
            else:  # the next batch's window opens as this one leaves (as on the loop)
                self.open_window_locked(start, decision, (self.pending + 1) * size)
            staged = None if urgent else self.staged
            if urgent:
                classes = _URGENT_CLASSES
            elif self.urgent_lane:  # a batch holds urgent pieces only, or none
                classes = _URGENT_CLASSES if queue.holds_up_to(URGENT) else _NON_URGENT_CLASSES
            else:
                classes = _ALL_CLASSES
            if staged is not None and queue.holds_up_to(staged.yields_to):
                # more urgent pieces queued since it was staged: they go first, alone
                classes = (classes[0], min(classes[1], staged.yields_to))
                staged = None
            if staged is None:
                batch = self.form_locked(start, size, classes)
            else:
                self.staged = None
                batch = staged.batch
        ticket.current = batch
        if staged is None:
            batch.assemble(self.bf16_inputs, self.failure)
        else:
            latest_start = start + self.policy.predict_service_s(size)
            batch = ticket.current = staged.ready(latest_start, self.name, self.bf16_inputs, self.failure)
        return batch

    def post(
        self,
        ticket: Ticket,
        batch: Batch | None,
        error: BaseException | None,
        *,
        ends: bool,
        on_loop: bool = False,
    ) -> None:
        """Any thread: queue a finished batch (and, with `ends`, the ticket's end) for the
        loop. Only the first post after a drain wakes the loop (`call_soon_threadsafe` writes
        to its self-pipe, and under load the write and the GIL hand-off around it cost more
        than the batch). The loop's `drain` empties `posted` and clears `drain_armed`."""
        with self.lock:
            self.posted.append((ticket, batch, error, ends))
            if self.drain_armed:
                return
            self.drain_armed = True
        if on_loop:
            self.loop.call_soon(self.drain)
            return
        try:
            self.loop.call_soon_threadsafe(self.drain)
        except RuntimeError:  # loop closed: nobody is waiting any more
            log.debug("batcher %s: loop closed before a batch completed", self.name)

    # --- loop thread -------------------------------------------------------

    def stage(self, size: int, regular_out: int) -> Batch | None:
        """On the loop: form the next regular batch of `size` rows now, if a full batch of
        non-urgent pieces waits beyond what tickets yet to start will take and one of the
        `regular_out` regular tickets is running (`Batcher._stage` says when).

        The pieces are taken (the rule of a worker's take) and concatenated here, on the
        loop, whose cache holds their inputs, while the model runs on the worker; the
        worker then goes from one model call to the next with little Python in between
        (on a 2-core CPU a CNN batch's inputs copied on the worker, cold, cost it 2-3% of
        its time). Urgent pieces are never staged (they keep late binding), and a staged
        batch gives way to more urgent pieces that queue after it (`take`).

        Returns None when none is due, else the batch formed: staged (inputs assembled) if
        it has pieces; else only its `expired` pieces, for the batcher to fail."""
        queue = self.pieces
        with self.lock:
            pending = self.pending
            if (
                regular_out - pending <= 0  # no regular ticket is running
                or queue.cost - pending * size < size
                or queue.holds_up_to(URGENT)
            ):
                return None
            batch = self.form_locked(time.monotonic(), size, _NON_URGENT_CLASSES)
            if batch.pieces:
                batch.assemble(self.bf16_inputs, self.failure)
                batch.service_s = 0.0  # (the worker's time only)
                self.staged = StagedBatch(batch)
        return batch

    def unqueue_all(self) -> list[Piece]:
        """Remove every piece waiting to run: the staged batch's (run or doomed) and the
        queue's."""
        with self.lock:
            staged, self.staged = self.staged, None
            queued = self.pieces.drain()
        if staged is None:
            return queued
        batch = staged.batch
        return batch.pieces + batch.expired + queued
