"""Adaptive batcher: one per model version; groups requests into batches on the stream pool.

Life of a request:
1. `submit` (event loop thread) splits it into pieces of at most `max_batch_size` rows
   and offers them, all or none, to an `UrgencyQueue` bounded by the policy's
   `queue_limit_rows`: priority class first, then earliest deadline, then arrival. A
   refusal raises `Overloaded` at once; a more urgent arrival may displace queued
   work, whose callers get `Overloaded`.
2. When a batch is due (the queue holds `batch_size` rows not yet claimed by a
   waiting batch, or the batch window has closed) and fewer than `pipeline_depth`
   batches of this model are out, the loop acquires the model (a lease) and submits
   a batch *ticket* to the pool. The window opens when a request reaches an empty
   queue or when the previous ticket left, and lasts the policy's `delay_s`, read once
   per batch (monotonic clock; no wall-clock remainders, cf. MLServer #1936).
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
   CPU per batch on a 2-core machine).
5. On the loop, each posted batch feeds the policy (rows, service time, latencies) and
   its outputs are sliced into each member's own rows and its futures resolved (chunked
   requests re-joined); when a ticket ends its lease is released, queued work a shrunk
   bound no longer covers is shed, and the next ticket is issued.
6. Staging, when the loop has a core the model's threads leave free (`StreamPool.
   spare_core`: on CUDA, or CPU workers x torch threads < cores) and batches take long
   enough that the model, not the loop, limits throughput (`BatcherSettings.
   stage_min_service_s`, 1 ms; below it the loop is the bottleneck): as it drains a batch,
   which is as the worker starts the next one, the loop takes and concatenates the batch
   after that if a full one of non-urgent pieces waits (`_stage`), and the worker takes
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

Tensors at the boundary are numpy arrays, inside the worker torch tensors: a batch
costs one `np.concatenate`, one `torch.from_numpy` per input, one `.numpy()` per output,
and a numpy view per member (measured: a torch view costs 1.5-3.5 us to create, a
numpy slice 0.5 us, iterating one-row views out of the output 0.1 us: much of the
per-request budget at batch 32). BF16, which
numpy lacks, travels as uint16 arrays holding the raw bits (`bf16_inputs`).

Threads: the queue and the staged batch are shared with pool workers under `_lock`; the
policy is fed on the loop, under `_lock` too (workers read its service predictions; other
policy reads are of immutable decisions); futures, timers and leases are touched on the
loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import types
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgefleet_api.types import Priority
from node_agent.errors import AgentError, DeadlineExceeded, InferenceFailed, Overloaded, ShuttingDown
from node_agent.runtime.stream_pool import URGENT, StreamPool
from node_agent.runtime.urgency_queue import ANY_GROUP, UrgencyQueue

if TYPE_CHECKING:
    import torch

    from node_agent.runtime.batching_policy import BatchingPolicy

log = logging.getLogger(__name__)

Tensors = dict[str, "torch.Tensor"]
Arrays = dict[str, np.ndarray]


class RunsBatches(Protocol):
    """The part of `Backend` the batcher uses."""

    def run(self, inputs: Tensors, stream: Any = None) -> Tensors: ...


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


@dataclass(frozen=True, slots=True)
class BatcherSettings:
    """Per-batcher knobs; the batching numbers themselves come from the policy."""

    max_batch_size: int = 8
    """Hard ceiling on rows per batch (the model's max_batch_size); bigger requests are split."""
    pipeline_depth: int | None = None
    """Batch tickets of this model queued at the pool or running; None: pool workers + 1.
    One more than the workers keeps each worker fed without waiting for the event loop
    between batches where a ticket runs one batch (its lease does not let it go on); since
    tickets are filled when a worker starts them, a deeper pipeline costs no priority
    inversion."""
    isolate_errors: bool = True
    """Re-run members one by one when a batch raises, so only the culprit fails."""
    dynamic_shapes: bool = False
    """The model has -1 dims besides the batch: only requests whose shapes agree share a
    batch (no padding: a pad value would change what the model computes)."""
    bf16_inputs: frozenset[str] = frozenset()
    """Inputs that arrive as uint16 arrays of BF16 bits and go to the model as bfloat16."""
    stage_min_service_s: float = 1e-3
    """Batches predicted to run shorter are not staged (see the module docstring): with
    such models the loop, not the model, limits throughput, and the worker forming their
    batches keeps that work off the loop. math.inf: never stage."""

    def __post_init__(self) -> None:
        if not self.stage_min_service_s >= 0:
            raise ValueError(f"stage_min_service_s must be >= 0, got {self.stage_min_service_s!r}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        if self.pipeline_depth is not None and (
            not isinstance(self.pipeline_depth, int) or self.pipeline_depth < 1
        ):
            raise ValueError(f"pipeline_depth must be an integer >= 1, got {self.pipeline_depth!r}")


class _Request:
    """One caller: its future, and its pieces' outputs until all are in."""

    __slots__ = ("arrival_s", "deadline_s", "future", "parts", "priority", "remaining")

    def __init__(
        self,
        future: asyncio.Future[Arrays],
        priority: Priority,
        deadline_s: float | None,
        arrival_s: float,
        pieces: int,
    ) -> None:
        self.future = future
        self.priority = priority
        self.deadline_s = deadline_s
        self.arrival_s = arrival_s
        self.remaining = pieces
        self.parts: list[Arrays | None] | None = [None] * pieces if pieces > 1 else None


class _Piece:
    """At most max_batch_size rows of one request; the unit that is queued and batched."""

    __slots__ = ("group", "index", "inputs", "request", "rows")

    def __init__(self, request: _Request, index: int, inputs: Arrays, rows: int, group: Hashable) -> None:
        self.request = request
        self.index = index
        self.inputs = inputs
        self.rows = rows
        self.group = group


def _alive(piece: _Piece) -> bool:
    return not piece.request.future.done()


def _dead(piece: _Piece) -> bool:
    return piece.request.future.done()


def _group_of(piece: _Piece) -> Hashable:
    return piece.group


_ALL_CLASSES = (Priority.CRITICAL, Priority.LOW)
_URGENT_CLASSES = (Priority.CRITICAL, URGENT)
_LEAST_URGENT_REGULAR = Priority(URGENT + 1)
_NON_URGENT_CLASSES = (_LEAST_URGENT_REGULAR, Priority.LOW)

SHED_HYSTERESIS = 1.5
"""Queued rows may exceed a shrunk bound by this factor before the excess is shed."""

_SKIPPED = object()  # a member whose caller already had an outcome: nothing to deliver


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


class _Batch:
    """One batch a ticket ran: filled on a worker, completed on the loop.

    `pieces[i]`'s outcome is `outcomes[i]`: its outputs, an error, or `_SKIPPED`; `expired`
    pieces were found past their deadline when the batch was taken (never run)."""

    __slots__ = ("end_s", "expired", "inputs", "live", "live_rows", "outcomes", "outputs", "pieces", "rows",
                 "service_s")  # fmt: skip

    def __init__(self, pieces: list[_Piece], expired: list[_Piece], outcomes: list[Any], live: int) -> None:
        self.pieces = pieces
        self.expired = expired
        self.outcomes = outcomes
        self.live = live
        """Members to run: `pieces[:live]`; the rest were doomed (their deadline)."""
        self.live_rows = pieces[0].rows if live == 1 else sum(p.rows for p in pieces[:live])
        self.inputs: Tensors = {}
        """The live members' inputs, concatenated, as CPU tensors (`assemble`)."""
        self.rows = 0
        """Rows that ran in one successful call of the model (0: none, or it raised)."""
        self.outputs: Arrays | None = None
        """That call's outputs, all members' rows (split among them on the loop)."""
        self.end_s = 0.0
        self.service_s = 0.0
        """Assembly (when the worker did it) and the model call: the batch's cost on its
        worker."""

    @classmethod
    def of(cls, live: list[_Piece], doomed: list[_Piece], expired: list[_Piece], name: str) -> _Batch:
        """A batch running `live` (inputs not yet assembled); `doomed` fail, never run."""
        outcomes: list[Any] = [_SKIPPED] * len(live)
        if doomed:
            why = f"{name}: deadline would pass before the batch finished; not run"
            outcomes += [DeadlineExceeded(why) for _ in doomed]
        return cls(live + doomed, expired, outcomes, len(live))

    def assemble(self, batcher: Batcher) -> None:
        """Concatenate the live members' inputs into tensors (timed into `service_s`).
        Members that cannot be concatenated fail, and none runs.

        The loop does this for a batch it stages; a worker, as it takes a batch, before it
        posts the batch before it to the loop: the copies release the GIL (numpy does, per
        member), and once posted, the loop, busy with that batch's callers, would hold the
        GIL at each of them."""
        live = self.live
        if not live:
            return
        assembling = time.monotonic()
        pieces = self.pieces
        try:
            if live == 1:
                arrays = pieces[0].inputs
            else:
                members = pieces[:live]
                arrays = {n: np.concatenate([p.inputs[n] for p in members]) for n in pieces[0].inputs}
            self.inputs = _tensors(arrays, batcher.settings.bf16_inputs)
        except Exception as exc:
            self.outcomes[:live] = [batcher.failure(exc)] * live
            self.live = 0
        self.service_s += time.monotonic() - assembling


class _Staged:
    """A regular batch the loop formed while a worker ran the batch before it (see
    `Batcher._stage`), waiting for the next regular ticket to take it."""

    __slots__ = ("batch", "earliest_deadline_s", "most_urgent", "yields_to")

    def __init__(self, batch: _Batch) -> None:
        self.batch = batch
        live = batch.pieces[: batch.live]
        least_urgent = max((p.request.priority for p in live), default=Priority.LOW)
        assert least_urgent > URGENT, "urgent pieces are never staged"
        self.yields_to = Priority(least_urgent - 1)
        """Queued pieces of this class or more urgent run before the staged batch."""
        self.most_urgent = min((p.request.priority for p in live), default=Priority.LOW)
        self.earliest_deadline_s = min(
            (d for p in live if (d := p.request.deadline_s) is not None), default=float("inf")
        )

    def ready(self, start: float, size: int, batcher: Batcher) -> _Batch:
        """The batch to run from `start`: as staged, or without the members whose deadline
        would pass before a batch of the planned `size` ends (they fail, never run: the
        rule a batch formed at `start` follows, `Batcher._form_locked`)."""
        batch = self.batch
        latest_start = start + batcher.policy.predict_service_s(size)
        if self.earliest_deadline_s >= latest_start:
            return batch
        live: list[_Piece] = []
        late: list[_Piece] = []
        for piece in batch.pieces[: batch.live]:
            deadline = piece.request.deadline_s
            (late if deadline is not None and deadline < latest_start else live).append(piece)
        doomed = late + batch.pieces[batch.live :]
        batch = _Batch.of(live, doomed, batch.expired, batcher.name)
        batch.assemble(batcher)
        return batch


class _Ticket:
    """A pool job holding one lease: runs batches on a worker, back to back while a batch
    is due, the lease allows it (`may_continue`) and no job of another model waits for the
    worker (`StreamPool.should_yield`); each batch is posted to the loop as it ends (the
    last one with the job's end, `on_done`). Another ticket of the same model waiting at the
    pool (the pipeline) does not stop it: it serves the same queue in the same order.

    A ticket run inline (on the loop) runs one batch. Taking a batch is late binding: the
    most urgent pieces queued when the batch starts."""

    __slots__ = ("batcher", "continues", "current", "lease", "started", "urgent")

    def __init__(self, batcher: Batcher, urgent: bool = False) -> None:
        self.batcher = batcher
        self.urgent = urgent
        """Takes urgent pieces only (see the module docstring)."""
        self.started = False
        self.continues = True
        self.lease: Lease | None = None
        self.current: _Batch | None = None
        """The batch taken and not yet posted (its members' outcome if the job raises)."""

    # --- worker thread -----------------------------------------------------

    def run(self, stream: Any) -> _Batch | None:
        """Run the first batch, then further due batches while the worker may stay. Each
        batch is posted once the next is taken; the last is returned, and `on_done` posts
        it with the job's end."""
        b = self.batcher
        batch = self._take(first=True)
        assert self.lease is not None
        renewable = getattr(self.lease, "may_continue", None)
        while True:
            if batch is not None and batch.pieces:
                self._run_batch(batch, stream)
            if not self.continues or renewable is None or b._stopping:
                return batch
            if not renewable() or b.pool.should_yield(b):
                return batch
            nxt = self._take(first=False)  # (now `current`: the batch a raise would fail)
            if nxt is None:  # the last: posted with the job's end, so its callers hear of
                return batch  # their results no earlier than the lease is released
            if batch is not None:  # after the next batch's inputs are assembled: see `_take`
                b._post(self, batch, None, ends=False)
            batch = nxt

    def _take(self, first: bool) -> _Batch | None:
        """Take the most urgent pieces for a batch of the planned size (None: after the
        first batch, no batch is due): the batch the loop staged for it (`Batcher._stage`)
        unless more urgent pieces have queued since, or else a batch formed now."""
        b = self.batcher
        decision = b.policy.decision()
        size = decision.batch_size
        start = time.monotonic()
        queue = b._queue
        with b._lock:
            if first:
                if not self.urgent:
                    b._pending -= 1
                self.started = True
            elif self.urgent:
                if not queue.holds_up_to(URGENT):
                    return None
            elif not b._due_locked(start, size):
                return None
            else:  # the next batch's window opens as this one leaves (as on the loop)
                b._window_close_s = start + decision.delay_s
            staged = None if self.urgent else b._staged
            if self.urgent:
                classes = _URGENT_CLASSES
            elif b._urgent_lane:  # a batch holds urgent pieces only, or none (see the docstring)
                classes = _URGENT_CLASSES if queue.holds_up_to(URGENT) else _NON_URGENT_CLASSES
            else:
                classes = _ALL_CLASSES
            if staged is not None and queue.holds_up_to(staged.yields_to):
                # more urgent pieces queued since it was staged: they go first, alone
                classes = (classes[0], min(classes[1], staged.yields_to))
                staged = None
            if staged is None:
                batch = b._form_locked(start, size, classes)
            else:
                b._staged = None
                batch = staged.batch
        self.current = batch
        if staged is None:
            batch.assemble(b)
        else:
            batch = self.current = staged.ready(start, size, b)
        return batch

    def _run_batch(self, batch: _Batch, stream: Any) -> None:
        """Run the live pieces of `batch`: its outputs (split and delivered on the loop,
        which feeds the policy with them) or its members' errors land on it.

        As little Python as can be runs here, between one model call and the next: after
        a model call the worker's caches hold the model's data, not the interpreter's, and
        each Python step costs it 10-20x what it costs the loop."""
        start = time.monotonic()
        # the members to run: taken alive (callers without an outcome) a moment ago, under
        # the lock; one whose caller gave up since still runs, and `_complete` skips it
        if batch.live:
            self._run_live(batch, stream)
        end = time.monotonic()
        # the whole batch, assembly on the worker included: per-batch overhead is a fixed
        # cost the planner must see (with it, batch 1 is rarely the throughput knee)
        batch.service_s += end - start
        batch.end_s = end

    def _run_live(self, batch: _Batch, stream: Any) -> None:
        """Run the live members (the first `batch.live`; the doomed follow them)."""
        assert self.lease is not None
        backend = self.lease.backend
        b = self.batcher
        rows = batch.live_rows
        try:
            outputs = _call(backend, batch.inputs, rows, b.device, stream)
        except Exception as exc:
            outcomes = batch.outcomes
            live = batch.pieces[: batch.live]
            if len(live) > 1 and b.settings.isolate_errors:
                # rows stays 0: a batch that raised is no sample of the model's speed
                for i, piece in enumerate(live):
                    try:
                        tensors = _tensors(piece.inputs, b.settings.bf16_inputs)
                        outcomes[i] = _call(backend, tensors, piece.rows, b.device, stream)
                    except Exception as one:
                        outcomes[i] = b.failure(one)
            else:
                outcomes[: len(live)] = [b.failure(exc)] * len(live)
            return
        batch.rows = rows
        batch.outputs = outputs

    def on_done(self, result: _Batch | None, error: BaseException | None) -> None:
        """Pool callback, on any thread: post the last batch and the job's end."""
        self.batcher._post(self, result, error, ends=True)

    def on_done_inline(self, result: _Batch | None, error: BaseException | None) -> None:
        """Pool callback of a ticket run inline, on the loop's thread."""
        self.batcher._post(self, result, error, ends=True, on_loop=True)


def _split(outputs: Arrays, pieces: list[_Piece], rows: int) -> list[Arrays]:
    """Each piece's own rows of a batch's outputs (numpy views, in the pieces' order)."""
    if len(pieces) == 1:
        return [outputs]
    if rows == len(pieces) and len(outputs) == 1:  # one row each, one output: the usual
        # iterating a (rows, 1, ...) view yields each row's (1, ...) view at C speed,
        # where a slice per member costs ~0.5 us of Python
        ((name, out),) = outputs.items()
        return [{name: row} for row in out[:, None]]
    split: list[Arrays] = []
    offset = 0
    items = list(outputs.items())
    for piece in pieces:
        end = offset + piece.rows
        split.append({n: t[offset:end] for n, t in items})
        offset = end
    return split


def _to_torch(array: np.ndarray, bf16: bool) -> torch.Tensor:
    import torch

    flags = array.flags
    if not (flags.writeable and flags.c_contiguous):
        array = np.array(array, order="C")  # torch.from_numpy needs a writable array
    if bf16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """Any tensor as a numpy array: detached, on the CPU, BF16 as uint16 bits."""
    import torch

    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        t = t.cpu()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _tensors(inputs: Arrays, bf16: frozenset[str]) -> Tensors:
    """Numpy inputs as CPU tensors (no copy where torch can share the array)."""
    return {n: _to_torch(a, n in bf16) for n, a in inputs.items()}


def _call(backend: RunsBatches, tensors: Tensors, rows: int, device: str, stream: Any) -> Arrays:
    """Run one batch of CPU tensors on `backend`; outputs as numpy arrays, each with `rows`
    rows.

    Each torch call costs a microsecond or more here, a large share of a small batch: the
    common case (CPU, outputs that `.numpy()` takes as they are) makes no others."""
    if device != "cpu":
        tensors = {n: t.to(device, non_blocking=True) for n, t in tensors.items()}
    outputs = backend.run(tensors, stream)
    if type(outputs) is not dict and not isinstance(outputs, dict):
        raise TypeError(f"backend returned {type(outputs).__name__}, expected a dict of tensors")
    arrays: Arrays = {}
    for name, t in outputs.items():
        try:
            a = t.numpy()  # raises for grad, device and BF16 tensors: _to_numpy handles those
        except (RuntimeError, TypeError):
            a = _to_numpy(t)
        if a.ndim == 0 or a.shape[0] != rows:
            raise ValueError(f"output {name!r} has shape {a.shape} for {rows} input rows")
        arrays[name] = a
    return arrays


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
        self.device = pool.device
        self.settings = settings or BatcherSettings()
        self.policy = policy
        self.loop = loop or asyncio.get_running_loop()
        self._acquire = acquire
        self._acquire_urgent = acquire_urgent or acquire
        self._urgent_lane = pool.urgent_workers > 0
        self._max_batch = self.settings.max_batch_size
        self._dynamic = self.settings.dynamic_shapes
        depth = self.settings.pipeline_depth
        self._depth = depth if depth is not None else pool.num_workers + 1
        self._lock = threading.Lock()
        self._queue: UrgencyQueue[_Piece] = UrgencyQueue(
            policy.decision().queue_limit_rows,
            _group_of if self.settings.dynamic_shapes else None,
        )
        self._out = 0  # tickets issued and not completed, urgent ones included (loop thread)
        self._urgent_out = 0  # urgent tickets issued and not completed (loop thread)
        self._pending = 0  # tickets issued and not yet started by a worker (under _lock)
        self._staged: _Staged | None = None  # under _lock: see `_stage`
        self._window_close_s: float | None = None
        self._window_timer: asyncio.TimerHandle | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_at_s: float | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: list[tuple[_Ticket, _Batch | None, BaseException | None, bool]] = []  # under _lock
        self._drain_armed = False  # under _lock: a _drain is scheduled on the loop
        # counters (tests, benchmarks, metrics); requests unless named otherwise
        self.submitted = 0
        self.completed = 0
        self.refused = 0
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
        (refused: no room), `DeadlineExceeded` (deadline already past) or `ShuttingDown`.
        """
        if self._stopping:
            raise ShuttingDown(f"{self.name}: batcher is stopping")
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows!r}")
        now = time.monotonic()
        if deadline_s is not None and deadline_s <= now:
            self.expired += 1
            raise DeadlineExceeded(f"{self.name}: deadline already passed at submission")
        future: asyncio.Future[Arrays] = self.loop.create_future()
        limit = self._max_batch
        npieces = 1 if rows <= limit else -(-rows // limit)
        request = _Request(future, priority, deadline_s, now, npieces)
        group = tuple(tuple(t.shape[1:]) for t in inputs.values()) if self._dynamic else None
        pieces: list[_Piece] = []
        costs: list[float] = []
        if npieces == 1:
            piece = _Piece(request, 0, inputs, rows, group)
        else:
            for k in range(npieces):
                lo, hi = k * limit, min(rows, (k + 1) * limit)
                pieces.append(_Piece(request, k, {n: t[lo:hi] for n, t in inputs.items()},
                                     hi - lo, group))  # fmt: skip
                costs.append(float(hi - lo))
        queue = self._queue
        decision = self.policy.decision()
        with self._lock:
            was_empty = queue.cost == 0
            queue.bound = decision.queue_limit_rows
            if npieces == 1:
                offer = queue.offer_one(piece, rows, priority, deadline_s, now)
            else:
                offer = queue.offer(pieces, costs, priority, deadline_s, now)
            queued = queue.cost
            if offer.admitted and (was_empty or self._window_close_s is None):
                self._window_close_s = now + decision.delay_s
        if offer.expired:
            self._fail_pieces(offer.expired, DeadlineExceeded, "deadline passed while queued")
        if offer.displaced:
            self._displace(offer.displaced)
        if not offer.admitted:
            self.refused += 1
            raise Overloaded(
                f"{self.name}: queue full ({queued:.0f} rows queued, bound {queue.bound:.0f})",
                retry_after_s=self.policy.retry_after_s(queued),
            )
        self.submitted += 1
        if deadline_s is not None and (self._expiry_at_s is None or deadline_s < self._expiry_at_s):
            self._arm_expiry(deadline_s)
        # (with the pipeline full, a finishing ticket's drain dispatches regular work)
        if priority <= URGENT or self._out - self._urgent_out < self._depth:
            self._dispatch()
        return future

    def queued_rows(self) -> float:
        """Rows waiting to run: queued, and staged (`_stage`)."""
        staged = self._staged
        return self._queue.cost + (staged.batch.live_rows if staged is not None else 0)

    @property
    def batches_out(self) -> int:
        """Tickets issued and not yet completed."""
        return self._out

    async def stop(self, timeout_s: float | None = 10.0) -> None:
        """Fail queued requests with ShuttingDown; wait (bounded) for running batches."""
        self._stopping = True
        for timer in (self._window_timer, self._expiry_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        self._window_timer = self._expiry_timer = self._retry_timer = None
        queued = self._unqueue_all()
        self._fail_pieces(queued, ShuttingDown, "batcher stopped")
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("batcher %s: %d batches still out at stop", self.name, self._out)

    def failure(self, exc: BaseException) -> AgentError:
        """The error a caller sees when running its rows raised `exc`."""
        if isinstance(exc, AgentError):
            return exc
        err = InferenceFailed(f"{self.name}: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err

    # --- batching ----------------------------------------------------------

    def _dispatch(self) -> None:
        """Issue tickets while the pipeline has room and a batch is due, and an urgent
        ticket if urgent pieces wait and none is out."""
        if self._stopping:
            return
        # (unlocked: only this thread queues pieces, so "none urgent" cannot be stale)
        if self._urgent_lane and not self._urgent_out and self._queue.holds_up_to(URGENT):
            with self._lock:
                top = self._queue.top_priority()
            if top is not None and top <= URGENT:
                self._issue(top, urgent=True)
        while self._out - self._urgent_out < self._depth:
            decision = self.policy.decision()
            now = time.monotonic()
            with self._lock:
                top = None
                if self._due_locked(now, decision.batch_size):
                    self._window_close_s = now + decision.delay_s
                    top = self._queue.top_priority()
                    staged = self._staged
                    if staged is not None and (top is None or staged.most_urgent < top):
                        top = staged.most_urgent
                    assert top is not None, "a batch is due from an empty queue"
                close = self._window_close_s
                waiting = self.queued_rows() > self._pending * decision.batch_size
            if top is None:
                if waiting and close is not None:  # rows wait for the window to close
                    self._arm_window(close)
                return
            if self._urgent_lane and top <= URGENT:  # urgency travels with the urgent ticket:
                top = _LEAST_URGENT_REGULAR  # a regular one on the lane would hold it for normal work
            self._issue(top)

    def _form_locked(self, start: float, size: int, classes: tuple[Priority, Priority]) -> _Batch:
        """Under `_lock`: take the most urgent pieces of `classes` for a batch of `size`
        rows that starts at `start` (inputs not yet assembled). Pieces whose deadline would
        pass before a batch of that size ends are dropped (`DeadlineExceeded`, never run),
        and the batch is refilled from the queue in their place, so doomed work costs no
        batch room; pieces already past their deadline are `expired`."""
        queue = self._queue
        latest_start = start + self.policy.predict_service_s(size)
        taken: list[_Piece] = []
        doomed: list[_Piece] = []
        rows = 0
        group: Hashable = ANY_GROUP
        expired = queue.pop_expired(start)
        while rows < size:
            got = queue.take(size - rows, _alive, first_alone=not taken, group=group, classes=classes)
            if not got:
                break
            for piece in got:
                deadline = piece.request.deadline_s
                if deadline is not None and deadline < latest_start:
                    doomed.append(piece)
                else:
                    taken.append(piece)
                    rows += piece.rows
            if taken and self._dynamic:
                group = taken[0].group
        return _Batch.of(taken, doomed, expired, self.name)

    def _due_locked(self, now: float, size: int) -> bool:
        """Whether a batch is due (under `_lock`): rows not claimed by tickets waiting to
        start fill a batch of `size`, or some are queued and the batch window has closed."""
        unclaimed = self.queued_rows() - self._pending * size
        if unclaimed <= 0:
            return False
        if unclaimed >= size:
            return True
        close = self._window_close_s
        return close is None or now >= close

    def _issue(self, priority: Priority, urgent: bool = False) -> None:
        """Acquire the model and submit a ticket. The acquire coroutine's first step runs
        inline: when the model is resident the scheduler answers without awaiting, and
        the batch costs no Task; otherwise a Task finishes what the step started."""
        ticket = _Ticket(self, urgent)
        self._out += 1
        if urgent:
            self._urgent_out += 1
        else:
            with self._lock:
                self._pending += 1
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

    async def _start(self, ticket: _Ticket, priority: Priority, acquiring: Any) -> None:
        try:
            lease = await acquiring
        except BaseException as exc:
            self._acquire_failed(ticket, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._submit(ticket, priority, lease)

    def _acquire_failed(self, ticket: _Ticket, exc: BaseException) -> None:
        self._abandon(ticket)
        if isinstance(exc, Exception):
            self._fail_queued(self.failure(exc))
        else:
            self._fail_queued(ShuttingDown(f"{self.name}: cancelled"))

    def _submit(self, ticket: _Ticket, priority: Priority, lease: Lease) -> None:
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
            if self._retry_timer is None and not self._stopping:
                self._retry_timer = self.loop.call_later(refusal.retry_after_s, self._on_retry)

    def _run_inline(self, ticket: _Ticket) -> bool:
        """Run the ticket now, on the loop, if its batch is full and costs less than a
        hand-off to a worker and back (see stream_pool). Only a full one: a worker takes its
        rows when it starts, and the rows that arrive meanwhile fill it; inline, a part batch
        would run as it is, and at high load every batch would stay as small as the queue at
        the moment it is issued. True when it ran."""
        size = self.policy.decision().batch_size
        with self._lock:
            full = self.queued_rows() >= self._pending * size
        if not full:
            return False
        ticket.continues = False  # one batch: the loop must get back to its intake
        if self.pool.run_inline(ticket.run, ticket.on_done_inline, self.policy.predict_service_s(size)):
            return True
        ticket.continues = True
        return False

    def _abandon(self, ticket: _Ticket) -> None:
        """A ticket that never reached a worker: give its lease and slot back."""
        if ticket.lease is not None:
            ticket.lease.release()
            ticket.lease = None
        if ticket.urgent:
            self._urgent_out -= 1
        else:
            with self._lock:
                self._pending -= 1
        self._out -= 1
        if self._out == 0:
            self._idle.set()

    def _post(
        self,
        ticket: _Ticket,
        batch: _Batch | None,
        error: BaseException | None,
        *,
        ends: bool,
        on_loop: bool = False,
    ) -> None:
        """Any thread: queue a finished batch (and, with `ends`, the ticket's end) for the
        loop. Only the first post after a drain wakes the loop (`call_soon_threadsafe` writes
        to its self-pipe, and under load the write and the GIL hand-off around it cost more
        than the batch)."""
        with self._lock:
            self._done.append((ticket, batch, error, ends))
            if self._drain_armed:
                return
            self._drain_armed = True
        if on_loop:
            self.loop.call_soon(self._drain)
            return
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop closed: nobody is waiting any more
            log.debug("batcher %s: loop closed before a batch completed", self.name)

    def _drain(self) -> None:
        """On the loop: complete every posted batch and ticket, then shed and dispatch once."""
        with self._lock:
            done, self._done = self._done, []
            self._drain_armed = False
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
        """While a regular ticket runs a batch, form its next one here on the loop, if a
        full batch of non-urgent pieces waits beyond what tickets yet to start will take.

        The pieces are taken (the same rule as a worker's take) and concatenated now, on
        the loop, whose cache holds their inputs, while the model runs on the worker; the
        worker then goes from one model call to the next with little Python in between
        (on a 2-core CPU a CNN batch's inputs copied on the worker, cold, cost it 2-3% of
        its time). Called as a batch is drained, which is as the worker starts the next
        one. Urgent pieces are never staged (they keep late binding), and a staged batch
        gives way to more urgent pieces that queue after it (`_Ticket._take`)."""
        if self._staged is not None or self._stopping or not self.pool.spare_core:
            return
        size = self.policy.decision().batch_size
        if self.policy.predict_service_s(size) < self.settings.stage_min_service_s:
            return
        queue = self._queue
        with self._lock:
            pending = self._pending
            if (
                self._out - self._urgent_out - pending <= 0  # no regular ticket is running
                or queue.cost - pending * size < size
                or queue.holds_up_to(URGENT)
            ):
                return
            batch = self._form_locked(time.monotonic(), size, _NON_URGENT_CLASSES)
            if batch.pieces:
                batch.assemble(self)
                batch.service_s = 0.0  # (the worker's time only)
                self._staged = _Staged(batch)
                self.staged += 1
        if not batch.pieces and batch.expired:  # (all it found had expired or had no caller)
            self._fail_pieces(batch.expired, DeadlineExceeded, "deadline passed while queued")

    def _complete(self, batch: _Batch) -> bool:
        """Feed the policy a batch that ran and deliver every member's outcome; True if
        rows ran."""
        self.batches += bool(batch.pieces)
        if batch.expired:
            self._fail_pieces(batch.expired, DeadlineExceeded, "deadline passed while queued")
        pieces, outcomes = batch.pieces, batch.outcomes
        completed = 0
        outputs = batch.outputs
        if outputs is not None:  # the batch ran in one call: every live member has rows
            live = pieces[: batch.live]
            end = batch.end_s
            latencies = [end - p.request.arrival_s for p in live]
            with self._lock:
                self.policy.observe(end, batch.rows, batch.service_s, latencies)
            for piece, part in zip(live, _split(outputs, live, batch.rows), strict=True):
                request = piece.request
                if request.parts is None:  # a whole request (inlined _deliver: the hot path)
                    if not request.future.done():
                        request.future.set_result(part)
                        completed += 1
                elif self._deliver(piece, part):
                    completed += 1
            pieces, outcomes = pieces[batch.live :], outcomes[batch.live :]  # the doomed
        for piece, outcome in zip(pieces, outcomes, strict=True):
            if type(outcome) is dict:  # (a member run alone after its batch raised)
                if self._deliver(piece, outcome):
                    completed += 1
            elif isinstance(outcome, BaseException):
                self._fail(piece.request, outcome)
            else:
                assert outcome is _SKIPPED, outcome
        self.completed += completed
        self.rows_run += batch.rows
        return batch.rows > 0

    def _end(self, ticket: _Ticket, error: BaseException | None) -> None:
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
                with self._lock:
                    self._pending -= 1
            if isinstance(error, ShuttingDown):
                self._fail_queued(error)
            elif self._retry_timer is None and not self._stopping:  # displaced: retry
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
        """After the bound shrank (the model slowed), queued work far past it would only
        wait past its SLO: refuse the least urgent part now, so callers can retry elsewhere.
        Hysteresis (1.5x) keeps small bound fluctuations from shedding anything."""
        bound = self.policy.decision().queue_limit_rows
        with self._lock:
            self._queue.bound = bound
            if self._queue.cost <= SHED_HYSTERESIS * bound:
                return
            shed = self._queue.shed(bound)
        if shed:
            self._displace(shed, "shed: the queue is past what the model can serve in its SLO")

    def _deliver(self, piece: _Piece, outputs: Arrays) -> bool:
        """Record one piece's outputs; True when this completed its request."""
        request = piece.request
        future = request.future
        if future.done():
            return False
        if request.parts is None:
            future.set_result(outputs)
            return True
        request.parts[piece.index] = outputs
        request.remaining -= 1
        if request.remaining:
            return False
        parts: list[Arrays] = request.parts  # type: ignore[assignment]
        future.set_result({n: np.concatenate([p[n] for p in parts]) for n in parts[0]})
        request.parts = None
        return True

    # --- failures and timers -----------------------------------------------

    def _fail(self, request: _Request, error: BaseException) -> None:
        if not request.future.done():
            if isinstance(error, DeadlineExceeded):
                self.expired += 1
            else:
                self.failed += 1
            request.future.set_exception(error)

    def _fail_pieces(self, pieces: Sequence[_Piece], kind: type[AgentError], why: str) -> None:
        for piece in pieces:
            if not piece.request.future.done():
                self._fail(piece.request, kind(f"{self.name}: {why}"))

    def _fail_queued(self, error: BaseException) -> None:
        for piece in self._unqueue_all():
            self._fail(piece.request, error)

    def _unqueue_all(self) -> list[_Piece]:
        """Every piece waiting to run: the staged batch's (run or doomed) and the queue's."""
        with self._lock:
            staged, self._staged = self._staged, None
            queued = self._queue.drain()
        if staged is None:
            return queued
        batch = staged.batch
        return batch.pieces + batch.expired + queued

    def _displace(self, victims: Sequence[_Piece], why: str = "displaced by a more urgent request") -> None:
        err = Overloaded(f"{self.name}: {why}", retry_after_s=self.policy.retry_after_s(self._queue.cost))
        chunked = False
        for piece in victims:
            if not piece.request.future.done():
                self.displaced += 1
                piece.request.future.set_exception(err)
            chunked = chunked or piece.request.parts is not None
        if chunked:  # the victims' other pieces must not hold queue room
            with self._lock:
                self._queue.remove_if(_dead)

    def _arm_window(self, close_s: float) -> None:
        timer = self._window_timer
        if timer is not None:
            if timer.when() == close_s:
                return
            timer.cancel()
        self._window_timer = self.loop.call_at(close_s, self._on_window)

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
        with self._lock:
            expired = self._queue.pop_expired(time.monotonic())
            nxt = self._queue.earliest_deadline()
        if expired:
            self._fail_pieces(expired, DeadlineExceeded, "deadline passed while queued")
        if nxt is not None and not self._stopping:
            self._arm_expiry(nxt)
