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
OCI_DIGEST_REFERENCE = re.compile(r"@sha256:[a-f0-9]{64}$")
FORMATS = ("torchscript", "tensorrt", "tinylm-npz", "huggingface")
"""The formats an agent backend serves (`node_agent.runtime.backends`); the CRD admits only these."""
URI_SCHEMES = ("repo", "file", "http", "https", "oci")
"""The artifact URI schemes an agent fetches from (`node_agent.link.assignment`)."""
TASKS = ("predict", "generate")
PRIORITY_NAMES = tuple(p.name.lower() for p in Priority)


def check_servable(uri: str, format_: str) -> None:
    """ValueError, saying what is admitted, unless an agent can fetch `uri` and serve `format_`
    (the CRD's pattern and enum say the same; this holds objects written before they did)."""
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme not in URI_SCHEMES:
        raise ValueError(
            f"artifact.uri {uri!r}: scheme {scheme or '(none)'!r} is not one an agent fetches from "
            f"({', '.join(s + '://' for s in URI_SCHEMES)})"
            "; s3://, gs:// and pvc:// are not supported"
        )
    if scheme == "oci" and not OCI_DIGEST_REFERENCE.search(uri):
        raise ValueError(
            f"artifact.uri {uri!r}: oci:// takes a digest reference (...@sha256:<64 hex>), not a tag"
        )
    if format_ not in FORMATS:
        raise ValueError(f"format {format_!r}: no agent backend serves it (one of {', '.join(FORMATS)})")


def priority_to_obj(priority: Priority) -> str:
    return priority.name.lower()


@dataclass(frozen=True, slots=True)
class Artifact:
    """Where a model's artifact is and the digest its bytes must have; `config_digest`: the
    digest of the model.yaml beside it (required for http(s) artifacts: an agent loads no
    model.yaml it cannot verify)."""

    uri: str
    digest: str
    config_digest: str | None = None

    def __post_init__(self) -> None:
        for what, value in (("digest", self.digest), ("configDigest", self.config_digest)):
            if value is not None and not DIGEST_RE.match(value):
                raise ValueError(f"artifact {what} {value!r} is not 'sha256:' and 64 lowercase hex digits")

    @classmethod
    def from_obj(cls, obj: Obj) -> Artifact:
        obj = mapping(obj, "artifact")
        config = obj.get("configDigest")
        return cls(
            str(required(obj, "uri", "artifact.")),
            str(required(obj, "digest", "artifact.")),
            str(config) if config is not None else None,
        )

    def to_obj(self) -> dict[str, Any]:
        out = {"uri": self.uri, "digest": self.digest}
        if self.config_digest is not None:
            out["configDigest"] = self.config_digest
        return out


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

    def __post_init__(self) -> None:
        check_servable(self.artifact.uri, self.format)

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
