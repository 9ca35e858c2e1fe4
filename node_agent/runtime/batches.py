"""What a batcher queues and runs: requests, their pieces, and the batches made of them.

A `Request` is one caller; it is cut into `Piece`s of at most the model's batch size, the
unit that is queued and batched. A `Batch` is the pieces one ticket ran in one model call
(filled on a worker, completed on the loop); a `StagedBatch` is a batch the loop formed
ahead for the next ticket. Every piece of a batch gets exactly one outcome: outputs, an
error, or `SKIPPED` (its caller already had one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from edgefleet_api.types import Priority
from node_agent.errors import AgentError, DeadlineExceeded
from node_agent.runtime.batch_tensors import Arrays, Tensors, to_tensors
from node_agent.runtime.stream_pool import URGENT


class Request:
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


class Piece:
    """At most max_batch_size rows of one request; the unit that is queued and batched."""

    __slots__ = ("group", "index", "inputs", "request", "rows")

    def __init__(self, request: Request, index: int, inputs: Arrays, rows: int, group: Hashable) -> None:
        self.request = request
        self.index = index
        self.inputs = inputs
        self.rows = rows
        self.group = group

    def deliver(self, outputs: Arrays) -> bool:
        """Record this piece's outputs (on the loop); True when this completed its request
        (its future got the outputs of all its pieces, joined)."""
        request = self.request
        future = request.future
        if future.done():
            return False
        if request.parts is None:
            future.set_result(outputs)
            return True
        request.parts[self.index] = outputs
        request.remaining -= 1
        if request.remaining:
            return False
        parts: list[Arrays] = request.parts  # type: ignore[assignment]
        future.set_result({n: np.concatenate([p[n] for p in parts]) for n in parts[0]})
        request.parts = None
        return True


def alive(piece: Piece) -> bool:
    """Its caller has no outcome yet."""
    return not piece.request.future.done()


def dead(piece: Piece) -> bool:
    """Its caller already has an outcome (a result, an error, or it gave up)."""
    return piece.request.future.done()


def group_of(piece: Piece) -> Hashable:
    """The shapes that pieces sharing a batch must agree on (`dynamic_shapes`)."""
    return piece.group


SKIPPED = object()
"""A member's outcome when its caller already had one: nothing to deliver."""

Failure = Callable[[BaseException], AgentError]
"""What a caller is told when running its rows raised (`Batcher.failure`)."""


class Batch:
    """One batch a ticket ran: filled on a worker, completed on the loop.

    `pieces[i]`'s outcome is `outcomes[i]`: its outputs, an error, or `SKIPPED`; `expired`
    pieces were found past their deadline when the batch was taken (never run)."""

    __slots__ = ("end_s", "expired", "inputs", "live", "live_rows", "outcomes", "outputs", "pieces", "rows",
                 "service_s")  # fmt: skip

    def __init__(self, pieces: list[Piece], expired: list[Piece], outcomes: list[Any], live: int) -> None:
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
    def of(cls, live: list[Piece], doomed: list[Piece], expired: list[Piece], name: str) -> Batch:
        """A batch running `live` (inputs not yet assembled); `doomed` fail, never run."""
        outcomes: list[Any] = [SKIPPED] * len(live)
        if doomed:
            why = f"{name}: deadline would pass before the batch finished; not run"
            outcomes += [DeadlineExceeded(why) for _ in doomed]
        return cls(live + doomed, expired, outcomes, len(live))

    def assemble(self, bf16_inputs: frozenset[str], failure: Failure) -> None:
        """Concatenate the live members' inputs into tensors (timed into `service_s`).
        Members that cannot be concatenated fail (`failure`), and none runs.

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
            self.inputs = to_tensors(arrays, bf16_inputs)
        except Exception as exc:
            self.outcomes[:live] = [failure(exc)] * live
            self.live = 0
        self.service_s += time.monotonic() - assembling


class StagedBatch:
    """A regular batch the loop formed while a worker ran the batch before it (see
    `BatchQueue.stage`), waiting for the next regular ticket to take it."""

    __slots__ = ("batch", "earliest_deadline_s", "most_urgent", "yields_to")

    def __init__(self, batch: Batch) -> None:
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

    def ready(self, latest_start: float, name: str, bf16_inputs: frozenset[str], failure: Failure) -> Batch:
        """The batch to run now: as staged, or without the members whose deadline is before
        `latest_start`, when a batch of the planned size started now would end (they fail,
        never run: the rule a batch formed now follows, `BatchQueue.form_locked`)."""
        batch = self.batch
        if self.earliest_deadline_s >= latest_start:
            return batch
        live: list[Piece] = []
        late: list[Piece] = []
        for piece in batch.pieces[: batch.live]:
            deadline = piece.request.deadline_s
            (late if deadline is not None and deadline < latest_start else live).append(piece)
        doomed = late + batch.pieces[batch.live :]
        batch = Batch.of(live, doomed, batch.expired, name)
        batch.assemble(bf16_inputs, failure)
        return batch


def split_outputs(outputs: Arrays, pieces: list[Piece], rows: int) -> list[Arrays]:
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
