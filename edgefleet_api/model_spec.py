"""The parts of a model's spec both resources carry: the model entry of an InferenceService, its
artifact and signature, and the batching the EdgeNode spec passes on (the SLA: `sla`).

Each model is frozen and holds SI units (seconds, bytes); `from_obj` reads the API's JSON (CRD
defaults applied or not: absent fields take the CRD's defaults) and raises ValueError, naming
the field, for what it cannot use; `to_obj` writes it back with every defaulted field present,
so it equals the API server's echo of it and a comparison with what was read never churns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edgefleet_api import wire
from edgefleet_api.types import ModelId, Priority
from edgefleet_api.wire import Obj, mapping, required

DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
FORMATS = ("torchscript", "tensorrt", "onnx", "tinylm-npz", "huggingface")
TASKS = ("predict", "generate")
PRIORITY_NAMES = tuple(p.name.lower() for p in Priority)


def priority_to_obj(priority: Priority) -> str:
    return priority.name.lower()


@dataclass(frozen=True, slots=True)
class Artifact:
    """Where a model's artifact is and the digest its bytes must have."""

    uri: str
    digest: str

    def __post_init__(self) -> None:
        if not DIGEST_RE.match(self.digest):
            raise ValueError(f"artifact digest {self.digest!r} is not 'sha256:' and 64 lowercase hex digits")

    @classmethod
    def from_obj(cls, obj: Obj) -> Artifact:
        obj = mapping(obj, "artifact")
        return cls(str(required(obj, "uri", "artifact.")), str(required(obj, "digest", "artifact.")))

    def to_obj(self) -> dict[str, Any]:
        return {"uri": self.uri, "digest": self.digest}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A named tensor of a model's signature (KServe v2 metadata); `shape` excludes the batch
    dimension, -1 marks a dynamic one."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_obj(cls, obj: Obj) -> TensorSpec:
        obj = mapping(obj, "tensor")
        return cls(str(obj["name"]), str(obj["datatype"]), tuple(int(d) for d in obj.get("shape") or ()))

    def to_obj(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    """Settings of a `task: generate` model."""

    max_tokens: int = 256
    max_sequences: int = 64
    kv_block_tokens: int = 16

    @classmethod
    def from_obj(cls, obj: Obj) -> GenerationSettings:
        obj = mapping(obj, "generation")
        return cls(
            int(obj.get("maxTokens", 256)),
            int(obj.get("maxSequences", 64)),
            int(obj.get("kvBlockTokens", 16)),
        )

    def to_obj(self) -> dict[str, Any]:
        return {
            "maxTokens": self.max_tokens,
            "maxSequences": self.max_sequences,
            "kvBlockTokens": self.kv_block_tokens,
        }


@dataclass(frozen=True, slots=True)
class Batching:
    """Dynamic batching: batches of up to `max_batch_size` rows, a request waiting at most
    `max_queue_delay_s` for one to fill; `adaptive` tunes both to the SLA."""

    max_batch_size: int = 8
    max_queue_delay_s: float = 0.005
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"batching.maxBatchSize must be at least 1, got {self.max_batch_size}")
        if not self.max_queue_delay_s >= 0:
            raise ValueError("batching.maxQueueDelayMs must not be negative")

    @classmethod
    def from_obj(cls, obj: Obj) -> Batching:
        obj = mapping(obj, "batching")
        delay_s = wire.ms_to_s(obj.get("maxQueueDelayMs"))
        return cls(
            int(obj.get("maxBatchSize", 8)),
            0.005 if delay_s is None else delay_s,
            bool(obj.get("adaptive", True)),
        )

    def to_obj(self) -> dict[str, Any]:
        return {
            "maxBatchSize": self.max_batch_size,
            "maxQueueDelayMs": wire.s_to_ms(self.max_queue_delay_s),
            "adaptive": self.adaptive,
        }


@dataclass(frozen=True, slots=True, order=True)
class ModelRef:
    """A model version identified by its artifact's digest: the unit a rollout revision is made of."""

    name: str
    version: str
    digest: str


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model of an InferenceService (spec.models[]; also recorded in status.rollout)."""

    name: str
    version: str
    artifact: Artifact
    format: str = "torchscript"
    task: str = "predict"
    inputs: tuple[TensorSpec, ...] | None = None
    outputs: tuple[TensorSpec, ...] | None = None
    memory_estimate: str | int | None = None
    """A Kubernetes quantity, as given ('512Mi'); `memory_estimate_bytes` is its value."""
    priority: Priority = Priority.NORMAL
    pinned: bool = False
    generation: GenerationSettings | None = None

    @property
    def id(self) -> ModelId:
        return ModelId(self.name, self.version)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.version, self.artifact.digest)

    @property
    def memory_estimate_bytes(self) -> int:
        """The declared memory estimate in bytes (0 when none is declared)."""
        return wire.parse_quantity(self.memory_estimate)

    @classmethod
    def from_obj(cls, obj: Obj) -> ModelSpec:
        obj = mapping(obj, "model")
        gen = obj.get("generation")
        return cls(
            name=str(required(obj, "name")),
            version=str(required(obj, "version")),
            artifact=Artifact.from_obj(required(obj, "artifact")),
            format=str(obj.get("format", "torchscript")),
            task=str(obj.get("task", "predict")),
            inputs=_tensors(obj.get("inputs")),
            outputs=_tensors(obj.get("outputs")),
            memory_estimate=obj.get("memoryEstimate"),
            priority=Priority.parse(obj.get("priority")),
            pinned=bool(obj.get("pinned", False)),
            generation=GenerationSettings.from_obj(gen) if gen is not None else None,
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "artifact": self.artifact.to_obj(),
            "format": self.format,
            "task": self.task,
            "priority": priority_to_obj(self.priority),
            "pinned": self.pinned,
        }
        if self.inputs is not None:
            out["inputs"] = [t.to_obj() for t in self.inputs]
        if self.outputs is not None:
            out["outputs"] = [t.to_obj() for t in self.outputs]
        if self.memory_estimate is not None:
            out["memoryEstimate"] = self.memory_estimate
        if self.generation is not None:
            out["generation"] = self.generation.to_obj()
        return out


def _tensors(value: Any) -> tuple[TensorSpec, ...] | None:
    return None if value is None else tuple(TensorSpec.from_obj(t) for t in value)
