"""EdgeNode as typed values: the spec the operator writes (what a GPU node must hold) and the
status its agent writes (what it has, its GPU, its measured service levels).

One writer per field: `EdgeNodeSpec` only by the operator, `EdgeNodeStatus` only by the node's
agent. Conventions of `from_obj`/`to_obj`: see `model_spec`.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgefleet_api import wire
from edgefleet_api.conditions import Condition, conditions_from_obj
from edgefleet_api.model_spec import Artifact, Batching, GenerationSettings, priority_to_obj
from edgefleet_api.sla import SlaObjectives, SlaWindow
from edgefleet_api.types import ModelId, Priority
from edgefleet_api.wire import Obj, mapping, required

MAX_MODELS = 256
"""The CRD's maxItems for spec.models and status.models."""
MAX_ARTIFACT_PEERS = 8
"""The CRD's maxItems for spec.artifactPeers."""


def seed_rank(endpoint: str) -> bytes:
    """Orders a site's agents for artifact seeding: the agent whose endpoint ranks first among
    itself and its spec.artifactPeers fetches from the origin at once, the others wait for a
    peer to hold the artifact. The operator puts the site's first-ranked agent into every other
    agent's peers, so a site has one seed and its uplink carries about one copy."""
    return hashlib.sha256(endpoint.encode()).digest()


# --- spec -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelAssignment:
    """One entry of EdgeNode.spec.models: a model version a service needs on this node, with the
    share of the model's traffic it gets here, the memory granted to it, and the service's
    batching and SLA. Keyed by (service, model, version)."""

    service: str
    """The InferenceService, namespace/name."""
    model: str
    version: str
    artifact: Artifact
    format: str = "torchscript"
    task: str = "predict"
    traffic_weight: int = 100
    """Percent of this model's traffic on this node served by this version."""
    memory_budget_bytes: int | None = None
    """Device memory granted to it; None or 0: none granted (the node's budget applies)."""
    priority: Priority = Priority.NORMAL
    pinned: bool = False
    preload: bool = True
    batching: Batching | None = None
    sla: SlaObjectives | None = None
    generation: GenerationSettings | None = None
    """The service's settings for a `task: generate` model (None: the model's own)."""

    def __post_init__(self) -> None:
        if not 0 <= self.traffic_weight <= 100:
            raise ValueError(f"trafficWeight {self.traffic_weight} is not in [0, 100]")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 0:
            raise ValueError(f"memoryBudgetBytes {self.memory_budget_bytes} is negative")

    @property
    def id(self) -> ModelId:
        return ModelId(self.model, self.version)

    @property
    def key(self) -> tuple[str, str, str]:
        """The spec's list-map key: (service, model, version)."""
        return (self.service, self.model, self.version)

    @classmethod
    def from_obj(cls, obj: Obj) -> ModelAssignment:
        obj = mapping(obj, "spec.models[]")
        batching, sla, gen = obj.get("batching"), obj.get("sla"), obj.get("generation")
        return cls(
            service=str(required(obj, "service")),
            model=str(required(obj, "model")),
            version=str(required(obj, "version")),
            artifact=Artifact.from_obj(required(obj, "artifact")),
            format=str(obj.get("format", "torchscript")),
            task=str(obj.get("task", "predict")),
            traffic_weight=int(obj.get("trafficWeight", 100)),
            memory_budget_bytes=wire.optional_int(obj.get("memoryBudgetBytes")),
            priority=Priority.parse(obj.get("priority")),
            pinned=bool(obj.get("pinned", False)),
            preload=bool(obj.get("preload", True)),
            batching=Batching.from_obj(batching) if batching is not None else None,
            sla=SlaObjectives.from_obj(sla) if sla is not None else None,
            generation=GenerationSettings.from_obj(gen) if gen is not None else None,
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "service": self.service,
            "model": self.model,
            "version": self.version,
            "artifact": self.artifact.to_obj(),
            "format": self.format,
            "task": self.task,
            "priority": priority_to_obj(self.priority),
            "pinned": self.pinned,
            "preload": self.preload,
        }
        if self.batching is not None:
            out["batching"] = self.batching.to_obj()
        if self.sla is not None:
            out["sla"] = self.sla.to_obj()
        if self.generation is not None:
            out["generation"] = self.generation.to_obj()
        if self.memory_budget_bytes is not None:
            out["memoryBudgetBytes"] = self.memory_budget_bytes
        out["trafficWeight"] = self.traffic_weight
        return out


@dataclass(frozen=True, slots=True)
class InvalidEntry:
    """A spec entry that cannot be read; its agent reports it Failed with `message`."""

    service: str
    model: str
    version: str
    message: str


@dataclass(frozen=True, slots=True)
class EdgeNodeSpec:
    """What a node must hold. `models` sorted by key; `invalid`: the entries `from_obj` could not
    read (never written back)."""

    node_name: str
    gpu_index: int = 0
    memory_budget_bytes: int | None = None
    """Device memory the agent may use for models; None: the device's own budget."""
    models: tuple[ModelAssignment, ...] = ()
    drain: bool = False
    invalid: tuple[InvalidEntry, ...] = ()
    artifact_peers: tuple[str, ...] = ()
    """Base URLs of agents of this node's site that may hold its artifacts: its agent fetches
    from them (by digest) before the origin (`peers.choose_peers` in the operator)."""
    prefetch: tuple[ModelAssignment, ...] = ()
    """Model versions to fetch into the node cache, not load: a rollout's next wave (its agent
    verifies them ahead, so the wave's analysis is not delayed by downloads). Malformed entries
    are left out."""

    @classmethod
    def from_obj(cls, obj: Obj, name: str = "") -> EdgeNodeSpec:
        """The spec of EdgeNode `name`. A malformed entry becomes an `InvalidEntry`; a spec that
        is not an object, or whose models are not a list, raises ValueError."""
        obj = mapping(obj if obj is not None else {}, f"EdgeNode {name}: spec")
        raw_models = obj.get("models") or []
        if not isinstance(raw_models, list):
            raise ValueError(f"EdgeNode {name}: spec.models is not a list")
        models: list[ModelAssignment] = []
        invalid: list[InvalidEntry] = []
        for raw in raw_models:
            try:
                models.append(ModelAssignment.from_obj(raw))
            except (KeyError, TypeError, ValueError) as e:
                get = raw.get if isinstance(raw, Mapping) else (lambda _k, d=None: d)
                why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                invalid.append(
                    InvalidEntry(str(get("service", "")), str(get("model", "")), str(get("version", "")), why)
                )
        return cls(
            node_name=str(obj.get("nodeName") or name),
            gpu_index=int(obj.get("gpuIndex", 0)),
            memory_budget_bytes=wire.optional_int(obj.get("memoryBudgetBytes")),
            models=tuple(sorted(models, key=lambda m: m.key)),
            drain=bool(obj.get("drain", False)),
            invalid=tuple(invalid),
            artifact_peers=tuple(str(p) for p in obj.get("artifactPeers") or ()),
            prefetch=tuple(_readable(obj.get("prefetch"))),
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "nodeName": self.node_name,
            "gpuIndex": self.gpu_index,
            "models": [m.to_obj() for m in self.models],
            "drain": self.drain,
        }
        if self.memory_budget_bytes is not None:
            out["memoryBudgetBytes"] = self.memory_budget_bytes
        if self.artifact_peers:
            out["artifactPeers"] = list(self.artifact_peers)
        if self.prefetch:
            out["prefetch"] = [m.to_obj() for m in self.prefetch]
        return out


def _readable(raw: object) -> list[ModelAssignment]:
    """The entries of a list that `ModelAssignment.from_obj` can read (a hint: others are dropped)."""
    out = []
    for item in raw if isinstance(raw, list) else ():
        try:
            out.append(ModelAssignment.from_obj(item))
        except (KeyError, TypeError, ValueError):
            continue
    return out


# --- status -----------------------------------------------------------------------------------


class ModelState(enum.StrEnum):
    """Where a model version is on a node (status.models[].state)."""

    PENDING = "Pending"
    LOADING = "Loading"
    READY = "Ready"
    FAILED = "Failed"
    UNLOADING = "Unloading"
    EVICTED = "Evicted"


@dataclass(frozen=True, slots=True)
class GpuStatus:
    """The device as its agent measures it; None: not measured."""

    name: str = ""
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    temperature_c: float | None = None
    soft_limit_c: float | None = None
    """The temperature above which the agent lowers concurrency."""
    throttled: bool | None = None
    """Clocks are being throttled (thermal or power)."""
    throttle_reasons: tuple[str, ...] = ()
    power_w: float | None = None
    utilization: float | None = None
    """0 to 1."""

    @classmethod
    def from_obj(cls, obj: Obj) -> GpuStatus:
        obj = mapping(obj, "status.gpu")
        throttled = obj.get("throttled")
        return cls(
            name=str(obj.get("name") or ""),
            memory_total_bytes=wire.optional_int(obj.get("memoryTotalBytes")),
            memory_used_bytes=wire.optional_int(obj.get("memoryUsedBytes")),
            memory_free_bytes=wire.optional_int(obj.get("memoryFreeBytes")),
            temperature_c=wire.optional_float(obj.get("temperatureC")),
            soft_limit_c=wire.optional_float(obj.get("softLimitC")),
            throttled=throttled if isinstance(throttled, bool) else None,
            throttle_reasons=tuple(str(r) for r in obj.get("throttleReasons") or ()),
            power_w=wire.optional_float(obj.get("powerW")),
            utilization=wire.optional_float(obj.get("utilization")),
        )

    def to_obj(self) -> dict[str, Any]:
        """Memory clamped at 0, readings rounded once (`wire`'s digits), the unmeasured left out."""
        fields = (
            ("name", self.name),
            ("memoryTotalBytes", _bytes(self.memory_total_bytes)),
            ("memoryUsedBytes", _bytes(self.memory_used_bytes)),
            ("memoryFreeBytes", _bytes(self.memory_free_bytes)),
            ("temperatureC", wire.rounded(self.temperature_c, wire.CELSIUS_DIGITS)),
            ("softLimitC", wire.rounded(self.soft_limit_c, wire.CELSIUS_DIGITS)),
            ("throttled", self.throttled),
            ("throttleReasons", list(self.throttle_reasons) if self.throttle_reasons else None),
            ("powerW", wire.rounded(self.power_w, wire.WATTS_DIGITS)),
            ("utilization", wire.rounded(self.utilization, wire.UTILIZATION_DIGITS)),
        )
        return {k: v for k, v in fields if v is not None}


@dataclass(frozen=True, slots=True)
class ModelCounters:
    """Cumulative outcome counts of one model version on one node since its agent started
    (status.models[].counters): what a sequential canary judge reads. They only grow within an
    `epoch`; a new epoch is a restarted agent whose counts began again at 0. So the requests
    between two reads of the same epoch are `later - earlier`, however far apart the reads (no
    window is lost), and a reader that sees a new epoch takes the new counts as they are.

    - requests: completed + errors (requests refused by admission control, 429/503, are not
      counted at all: a refusal is the agent protecting its SLA, and it is not an answer the
      model version gave);
    - errors: the model failed (500) or the request's deadline passed before it ran (504);
      requests the client got wrong (4xx) never reach the model and are not counted;
    - slow: completed requests whose latency (admission to result) exceeded `slo_latency_s`,
      the service's p99 latency objective, else its p95 one; 0 while it has neither. A
      request split into several batches counts once per part in requests and slow;
    - slo_latency_s: the threshold `slow` was counted against (None: none). When it changes
      within an epoch, `slow` goes on counting against the new one: a reader must not take a
      difference of `slow` across a change of `slo_latency_s`."""

    epoch: str
    requests: int = 0
    errors: int = 0
    slow: int = 0
    slo_latency_s: float | None = None

    def __post_init__(self) -> None:
        if not self.epoch:
            raise ValueError("counters need an epoch")
        if min(self.requests, self.errors, self.slow) < 0:
            raise ValueError(f"counters must be >= 0: {self}")

    @classmethod
    def from_obj(cls, obj: Obj) -> ModelCounters:
        obj = mapping(obj, "status.models[].counters")
        return cls(
            epoch=str(required(obj, "epoch")),
            requests=int(obj.get("requests") or 0),
            errors=int(obj.get("errors") or 0),
            slow=int(obj.get("slow") or 0),
            slo_latency_s=wire.ms_to_s(obj.get("sloLatencyMs")),
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "requests": int(self.requests),
            "errors": int(self.errors),
            "slow": int(self.slow),
        }
        if self.slo_latency_s is not None:
            out["sloLatencyMs"] = wire.s_to_ms(self.slo_latency_s)
        return out


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One model version on a node (status.models[])."""

    service: str
    model: str
    version: str
    state: ModelState
    digest: str | None = None
    """Digest of the artifact the agent verified (present once prepared)."""
    memory_bytes: int | None = None
    """Device memory measured when it loaded."""
    traffic_weight: int | None = None
    """Traffic weight in effect (0 for a version no longer assigned)."""
    sla: SlaWindow | None = None
    message: str = ""
    counters: ModelCounters | None = None
    """Cumulative outcome counts since the agent started (None: not measured yet)."""

    @property
    def id(self) -> ModelId:
        return ModelId(self.model, self.version)

    @classmethod
    def from_obj(cls, obj: Obj) -> ModelStatus:
        obj = mapping(obj, "status.models[]")
        sla, counters = obj.get("sla"), obj.get("counters")
        return cls(
            service=str(obj.get("service") or ""),
            model=str(required(obj, "model")),
            version=str(required(obj, "version")),
            state=ModelState(obj.get("state") or ModelState.PENDING),
            digest=obj.get("digest") or None,
            memory_bytes=wire.optional_int(obj.get("memoryBytes")),
            traffic_weight=wire.optional_int(obj.get("trafficWeight")),
            sla=SlaWindow.from_obj(sla) if sla else None,
            message=str(obj.get("message") or ""),
            counters=ModelCounters.from_obj(counters) if counters else None,
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "service": self.service,
            "model": self.model,
            "version": self.version,
            "state": self.state.value,
        }
        if self.traffic_weight is not None:
            out["trafficWeight"] = self.traffic_weight
        if self.digest is not None:
            out["digest"] = self.digest
        if self.memory_bytes is not None:
            out["memoryBytes"] = max(int(self.memory_bytes), 0)
        window = self.sla.to_obj() if self.sla is not None else {}
        if window:
            out["sla"] = window
        if self.message:
            out["message"] = self.message
        if self.counters is not None:
            out["counters"] = self.counters.to_obj()
        return out


@dataclass(frozen=True, slots=True)
class EdgeNodeStatus:
    """What a node has: conditions (Ready, MemoryPressure, ThermalThrottling, SLAViolated), its
    GPU, its model versions (at most MAX_MODELS), and when the agent last wrote."""

    observed_generation: int = 0
    """The EdgeNode spec generation this status describes (the agent acted on it)."""
    conditions: tuple[Condition, ...] = ()
    heartbeat_time: str = ""
    """RFC 3339; liveness itself is the agent's Lease."""
    report_sequence: int = 0
    """Grows with every status the agent writes, across its restarts (0: an agent that does not
    number its reports). A reader that saw a higher one from this node is looking at a replayed
    or older report."""
    gpu: GpuStatus | None = None
    models: tuple[ModelStatus, ...] = ()
    loaded_models: int = 0
    message: str = ""
    agent_version: str = ""
    endpoint: str = ""
    """Base URL of the agent's v2 inference API."""

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def models_of(self, service: str) -> tuple[ModelStatus, ...]:
        return tuple(m for m in self.models if m.service == service)

    @classmethod
    def from_obj(cls, obj: Obj | None) -> EdgeNodeStatus:
        """The status of an EdgeNode; None or {} (no agent has written yet) is the empty status."""
        obj = mapping(obj if obj is not None else {}, "status")
        gpu = obj.get("gpu")
        return cls(
            observed_generation=int(obj.get("observedGeneration") or 0),
            conditions=conditions_from_obj(obj.get("conditions")),
            heartbeat_time=str(obj.get("heartbeatTime") or ""),
            report_sequence=int(obj.get("reportSequence") or 0),
            gpu=GpuStatus.from_obj(gpu) if gpu is not None else None,
            models=tuple(ModelStatus.from_obj(m) for m in obj.get("models") or ()),
            loaded_models=int(obj.get("loadedModels") or 0),
            message=str(obj.get("message") or ""),
            agent_version=str(obj.get("agentVersion") or ""),
            endpoint=str(obj.get("endpoint") or ""),
        )

    def to_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "observedGeneration": max(int(self.observed_generation), 0),
            "conditions": [c.to_obj() for c in self.conditions],
            "heartbeatTime": self.heartbeat_time,
            "reportSequence": max(int(self.report_sequence), 0),
            "gpu": self.gpu.to_obj() if self.gpu is not None else {},
            "models": [m.to_obj() for m in self.models[:MAX_MODELS]],
            "loadedModels": max(int(self.loaded_models), 0),
            "message": self.message,
        }
        if self.agent_version:
            out["agentVersion"] = self.agent_version
        if self.endpoint:
            out["endpoint"] = self.endpoint
        return out


def _bytes(value: int | None) -> int | None:
    return None if value is None else max(int(value), 0)


@dataclass(frozen=True, slots=True)
class EdgeNode:
    """An EdgeNode object: its name and the metadata the operator reads (labels, annotations),
    with the typed spec and status."""

    name: str
    spec: EdgeNodeSpec
    status: EdgeNodeStatus
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    generation: int = 0
    """metadata.generation: the spec's (the status's observedGeneration says which it describes)."""

    @classmethod
    def from_obj(cls, obj: Obj) -> EdgeNode:
        meta = mapping(obj.get("metadata"), "EdgeNode metadata")
        name = str(required(meta, "name", "metadata."))
        return cls(
            name=name,
            spec=EdgeNodeSpec.from_obj(obj.get("spec") or {}, name),
            status=EdgeNodeStatus.from_obj(obj.get("status")),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            generation=int(meta.get("generation") or 0),
        )
