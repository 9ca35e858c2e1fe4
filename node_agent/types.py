"""Small value types shared across the agent: priorities, tensor specs, model configs.

Policies (scheduler, batcher, stream pool) work on these and on identifiers;
only backends touch tensors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Priority(enum.IntEnum):
    """Priority classes; a lower value is more urgent (sorts first)."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3

    @classmethod
    def parse(cls, value: str | int | Priority | None) -> Priority:
        """'critical'/'high'/'normal'/'low' (any case), 0-3, or None (normal)."""
        if value is None:
            return cls.NORMAL
        if isinstance(value, Priority):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown priority {value!r}; expected one of critical, high, normal, low"
            ) from None


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


@dataclass(frozen=True, slots=True)
class ModelId:
    """A model version: the unit the scheduler loads and evicts."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


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
    p95_latency_s: float | None = None
    p99_latency_s: float | None = None
    task: str = "predict"
    parameters: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> ModelId:
        return ModelId(self.name, self.version)
