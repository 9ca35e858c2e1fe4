"""The agent's value types: tensor specs and model configs (priorities and model ids are the
contract's, `edgefleet_api.types`).

Policies (scheduler, batcher, stream pool) work on these and on identifiers;
only backends touch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgefleet_api.sla import NO_OBJECTIVES, SlaObjectives
from edgefleet_api.types import ModelId, Priority

# KServe v2 datatype -> numpy dtype name. BYTES is carried as object arrays.
V2_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A named tensor; `shape` excludes the batch dimension, -1 marks a dynamic dim."""

    name: str
    datatype: str
    shape: tuple[int, ...]


KV_BLOCK_SIZE_PARAMETER = "kv_block_size"
"""model.yaml `parameters` key: tokens per KV block for a `task: generate` model (an integer
from 1 to the context length); without it, `kv_cache.block_size_for_context` of the context."""
MAX_SEQUENCES_PARAMETER = "max_sequences"
"""model.yaml `parameters` key: sequences a `task: generate` model decodes at once."""
MAX_TOKENS_PARAMETER = "max_tokens"
"""model.yaml `parameters` key: default and upper bound of new tokens per generate request."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything the agent knows about a model version before loading it (model.yaml)."""

    name: str
    version: str
    format: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    artifact: str
    """Artifact file name, relative to the version folder."""
    digest: str
    """'sha256:<64 hex>' of the artifact's bytes."""
    max_batch_size: int = 8
    priority: Priority = Priority.NORMAL
    pinned: bool = False
    memory_estimate_bytes: int | None = None
    max_queue_delay_s: float = 0.005
    sla: SlaObjectives = NO_OBJECTIVES
    """The service-level objectives it is measured against (model.yaml's, or its EdgeNode spec
    entry's in a cluster)."""
    task: str = "predict"
    parameters: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> ModelId:
        return ModelId(self.name, self.version)
