"""A batcher's settings: its knobs other than the batching numbers, which come from its
policy (`batching_policy`); validated at construction."""

from __future__ import annotations

from dataclasses import dataclass


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
    """Batches predicted to run shorter are not staged (`batcher`'s docstring, step 6): with
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
