"""A batch ticket: the pool job that runs a batcher's batches on a worker, under a lease.

A ticket uses only its `TicketHost` (the batcher's `BatchQueue`): it takes a batch, runs
it, and posts it back to the loop; it never touches the batcher itself. The lease it holds
(`Lease`, from the batcher's `Acquire`) keeps its model resident while its batches run.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from node_agent.errors import AgentError
from node_agent.runtime.batch_tensors import RunsBatches, run_backend, to_tensors
from node_agent.runtime.batches import Batch


class Lease(Protocol):
    """A model held for a ticket's batches; `release()` once when the ticket is done.

    A lease may also have `may_continue() -> bool` (any thread): whether its holder may run
    another batch under it rather than release it and acquire again, because nothing waits
    for what it holds (a slot, memory). A ticket runs batches back to back only on a lease
    that has it and says so; on any other lease it runs one batch (a lease per batch)."""

    @property
    def backend(self) -> RunsBatches: ...

    def release(self) -> None: ...


Acquire = Callable[[], Awaitable[Lease]]


class StaticLease:
    """A lease on a backend that is always resident (tests, benchmarks)."""

    __slots__ = ("backend",)

    def __init__(self, backend: RunsBatches) -> None:
        self.backend = backend

    def release(self) -> None:
        pass

    def may_continue(self) -> bool:
        return True


def static_acquire(backend: RunsBatches) -> Acquire:
    """An `Acquire` that always hands out `backend`."""
    lease = StaticLease(backend)

    async def acquire() -> Lease:
        return lease

    return acquire


class TicketHost(Protocol):
    """All a ticket uses of the batcher that issued it: batches to take and to post back,
    whether to stop, and how to run a batch. Called on the worker running the ticket
    (`post` with `on_loop` and the inline ticket's calls: on the loop's thread)."""

    @property
    def closed(self) -> bool:
        """The batcher is stopping: take no further batch."""
        ...

    @property
    def device(self) -> str: ...

    @property
    def bf16_inputs(self) -> frozenset[str]: ...

    @property
    def isolate_errors(self) -> bool:
        """Re-run the members of a batch that raised one by one (`BatcherSettings`)."""
        ...

    def take(self, ticket: Ticket, first: bool) -> Batch | None:
        """The ticket's next batch, now `ticket.current`; None: after the first, none is due."""
        ...

    def post(
        self,
        ticket: Ticket,
        batch: Batch | None,
        error: BaseException | None,
        *,
        ends: bool,
        on_loop: bool = False,
    ) -> None:
        """Hand a finished batch (and, with `ends`, the ticket's end) to the loop."""
        ...

    def should_yield(self) -> bool:
        """A job of another model waits for this worker (`StreamPool.should_yield`)."""
        ...

    def failure(self, exc: BaseException) -> AgentError:
        """The error a member's caller gets when running its rows raised `exc`."""
        ...


class Ticket:
    """A pool job holding one lease: runs batches on a worker, back to back while a batch
    is due, the lease allows it (`may_continue`) and no job of another model waits for the
    worker (`TicketHost.should_yield`); each batch is posted to the loop as it ends (the
    last one with the job's end, `on_done`). Another ticket of the same model waiting at the
    pool (the pipeline) does not stop it: it serves the same queue in the same order.

    A ticket run inline (on the loop) runs at most `max_batches` batches, each a full one
    after the first (`inline`). Taking a batch is late binding: the most urgent pieces
    queued when the batch starts."""

    __slots__ = ("current", "host", "inline", "lease", "max_batches", "started", "urgent")

    def __init__(self, host: TicketHost, urgent: bool = False) -> None:
        self.host = host
        self.urgent = urgent
        """Takes urgent pieces only (see the batcher's module docstring)."""
        self.started = False
        """A worker (or the loop, inline) began it: its first `take` has run."""
        self.inline = False
        """Runs on the loop's thread (`StreamPool.run_inline`): it posts its batches without a
        wake-up, and takes a batch after the first only if a full one waits."""
        self.max_batches: int | None = None
        """The most batches this run may take (None: no bound but `run`'s rules)."""
        self.lease: Lease | None = None
        self.current: Batch | None = None
        """The batch taken and not yet posted (its members' outcome if the job raises)."""

    # --- worker thread -----------------------------------------------------

    def run(self, stream: Any) -> Batch | None:
        """Run the first batch, then further due batches while the worker may stay. Each
        batch is posted once the next is taken; the last is returned, and `on_done` posts
        it with the job's end."""
        host = self.host
        batch = host.take(self, True)
        assert self.lease is not None
        renewable = getattr(self.lease, "may_continue", None)
        left = self.max_batches
        while True:
            if batch is not None and batch.pieces:
                self._run_batch(batch, stream)
            if renewable is None or host.closed:
                return batch
            if left is not None:
                left -= 1
                if left <= 0:
                    return batch
            if not renewable() or host.should_yield():
                return batch
            nxt = host.take(self, False)  # (now `current`: the batch a raise would fail)
            if nxt is None:  # the last: posted with the job's end, so its callers hear of
                return batch  # their results no earlier than the lease is released
            if batch is not None:  # after the next batch's inputs are assembled (see `take`)
                host.post(self, batch, None, ends=False, on_loop=self.inline)
            batch = nxt

    def _run_batch(self, batch: Batch, stream: Any) -> None:
        """Run the live pieces of `batch`: its outputs (split and delivered on the loop,
        which feeds the policy with them) or its members' errors land on it.

        As little Python as can be runs here, between one model call and the next: after
        a model call the worker's caches hold the model's data, not the interpreter's, and
        each Python step costs it 10-20x what it costs the loop."""
        start = time.monotonic()
        # the members to run: taken alive (callers without an outcome) a moment ago, under
        # the lock; one whose caller gave up since still runs, and the loop skips it
        if batch.live:
            self._run_live(batch, stream)
        end = time.monotonic()
        # the whole batch, assembly on the worker included: per-batch overhead is a fixed
        # cost the planner must see (with it, batch 1 is rarely the throughput knee)
        batch.service_s += end - start
        batch.end_s = end

    def _run_live(self, batch: Batch, stream: Any) -> None:
        """Run the live members (the first `batch.live`; the doomed follow them)."""
        assert self.lease is not None
        backend = self.lease.backend
        host = self.host
        rows = batch.live_rows
        try:
            outputs = run_backend(backend, batch.inputs, rows, host.device, stream)
        except Exception as exc:
            outcomes = batch.outcomes
            live = batch.pieces[: batch.live]
            if len(live) > 1 and host.isolate_errors:
                # rows stays 0: a batch that raised is no sample of the model's speed
                for i, piece in enumerate(live):
                    try:
                        tensors = to_tensors(piece.inputs, host.bf16_inputs)
                        outcomes[i] = run_backend(backend, tensors, piece.rows, host.device, stream)
                    except Exception as one:
                        outcomes[i] = host.failure(one)
            else:
                outcomes[: len(live)] = [host.failure(exc)] * len(live)
            return
        batch.rows = rows
        batch.outputs = outputs

    def on_done(self, result: Batch | None, error: BaseException | None) -> None:
        """Pool callback, on any thread: post the last batch and the job's end."""
        self.host.post(self, result, error, ends=True)

    def on_done_inline(self, result: Batch | None, error: BaseException | None) -> None:
        """Pool callback of a ticket run inline, on the loop's thread."""
        self.host.post(self, result, error, ends=True, on_loop=True)
