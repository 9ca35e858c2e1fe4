"""EdgeNode.status, built from the runtime's view (`build_status`), and when to send it
(`StatusPacer`; the link sends it as `edgefleet_api.patch.merge_patch`). Pure: no API
server, no disk, no model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgefleet_api.types import ModelId
from node_agent.link.assignment import Assignment, desired_versions

MODEL_STATES = ("Pending", "Loading", "Ready", "Failed", "Unloading", "Evicted")
"""EdgeNode.status.models[].state, as the CRD enumerates them."""
MAX_STATUS_MODELS = 256
"""The CRD's maxItems for status.models."""


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One model version's state as the runtime reports it."""

    state: str
    digest: str | None = None
    """Digest of the verified artifact (present once prepared)."""
    memory_bytes: int | None = None
    """Measured at load (resident or evicted models)."""
    message: str = ""
    insufficient_memory: bool = False
    """It failed for lack of memory (sets MemoryPressure)."""

    def __post_init__(self) -> None:
        if self.state not in MODEL_STATES:
            raise ValueError(f"unknown model state {self.state!r}; expected one of {MODEL_STATES}")


@dataclass(frozen=True, slots=True)
class GpuReading:
    """The device as the agent measures it (status.gpu); None: not measured."""

    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    temperature_c: float | None = None
    soft_limit_c: float | None = None
    throttled: bool | None = None
    throttle_reasons: tuple[str, ...] = ()
    power_w: float | None = None
    utilization: float | None = None

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "memoryTotalBytes": max(int(self.memory_total_bytes), 0),
            "memoryUsedBytes": max(int(self.memory_used_bytes), 0),
            "memoryFreeBytes": max(int(self.memory_free_bytes), 0),
        }
        optional = (
            ("temperatureC", _round(self.temperature_c, 1)),
            ("softLimitC", _round(self.soft_limit_c, 1)),
            ("throttled", self.throttled),
            ("throttleReasons", list(self.throttle_reasons) if self.throttle_reasons else None),
            ("powerW", _round(self.power_w, 1)),
            ("utilization", _round(self.utilization, 3)),
        )
        out.update((k, v) for k, v in optional if v is not None)
        return out


def _round(value: float | None, digits: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


_SLA_FIELDS = {
    "p50LatencyMs": 3,
    "p95LatencyMs": 3,
    "p99LatencyMs": 3,
    "throughputRps": 3,
    "errorRate": 5,
}


def sla_status(window: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A model's SLA window in the CRD's shape, numbers rounded (a status diff should not
    chase the fifth decimal); unknown keys dropped; None when there is nothing to report."""
    if not window:
        return None
    out: dict[str, Any] = {}
    for key, digits in _SLA_FIELDS.items():
        value = window.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = round(float(value), digits)
    for key in ("requests", "windowSeconds"):
        value = window.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            out[key] = int(value)
    if isinstance(window.get("met"), bool):
        out["met"] = window["met"]
    return out or None


@dataclass(frozen=True, slots=True)
class StatusInputs:
    """Everything `build_status` reads."""

    assignment: Assignment | None
    records: Mapping[ModelId, ModelRecord]
    """Per assigned model version; a version without a record is Pending."""
    gpu: GpuReading
    budget_bytes: int
    used_bytes: int
    loaded_models: int
    observed_generation: int
    now: str
    """RFC 3339, second precision (heartbeatTime, condition transitions)."""
    sla: Mapping[ModelId, Mapping[str, Any]] = field(default_factory=dict)
    leftovers: Sequence[tuple[str, ModelId, ModelRecord]] = ()
    """(service, version, record) of versions no longer assigned but still resident."""
    previous_conditions: Sequence[Mapping[str, Any]] = ()
    endpoint: str | None = None
    agent_version: str | None = None
    memory_pressure_fraction: float = 0.95
    """MemoryPressure is True at or above this share of the budget in use."""


def build_status(inp: StatusInputs) -> dict[str, Any]:
    """EdgeNode.status (all of it) from the runtime's view. Pure; the same inputs give the
    same status, and conditions keep their lastTransitionTime while their status holds."""
    assignment = inp.assignment
    desired = desired_versions(assignment)
    models: list[dict[str, Any]] = []
    for entry in assignment.models if assignment is not None else ():
        if entry.key in desired.conflicts:
            record = ModelRecord("Failed", message=desired.conflicts[entry.key])
        elif assignment is not None and assignment.drain:
            record = inp.records.get(entry.id) or ModelRecord("Unloading", message="draining")
        else:
            record = inp.records.get(entry.id) or ModelRecord("Pending")
        models.append(_model_status(entry.service, entry.id, record, entry.traffic_weight, inp.sla))
    for bad in assignment.invalid if assignment is not None else ():
        models.append(
            {
                "service": bad.service,
                "model": bad.model,
                "version": bad.version,
                "state": "Failed",
                "message": f"invalid spec entry: {bad.message}",
            }
        )
    for service, model_id, record in inp.leftovers:
        models.append(_model_status(service, model_id, record, 0, inp.sla))
    models.sort(key=lambda m: (m["service"], m["model"], m["version"]))

    conditions = _conditions(inp, models)
    ready = conditions[0]
    status: dict[str, Any] = {
        "observedGeneration": max(int(inp.observed_generation), 0),
        "conditions": conditions,
        "heartbeatTime": inp.now,
        "gpu": inp.gpu.to_status(),
        "models": models[:MAX_STATUS_MODELS],
        "loadedModels": max(int(inp.loaded_models), 0),
        "message": "" if ready["status"] == "True" else ready["message"],
    }
    if inp.agent_version:
        status["agentVersion"] = inp.agent_version
    if inp.endpoint:
        status["endpoint"] = inp.endpoint
    return status


def _model_status(
    service: str,
    model_id: ModelId,
    record: ModelRecord,
    weight: int,
    sla: Mapping[ModelId, Mapping[str, Any]],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "service": service,
        "model": model_id.name,
        "version": model_id.version,
        "state": record.state,
        "trafficWeight": weight,
    }
    if record.digest is not None:
        out["digest"] = record.digest
    if record.memory_bytes is not None:
        out["memoryBytes"] = max(int(record.memory_bytes), 0)
    window = sla_status(sla.get(model_id))
    if window is not None:
        out["sla"] = window
    if record.message:
        out["message"] = record.message
    return out


def _conditions(inp: StatusInputs, models: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    gen = max(int(inp.observed_generation), 0)

    def cond(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
        return condition(type_, status, reason, message, gen, inp.previous_conditions, inp.now)

    not_ready = [m for m in models if m["state"] not in ("Ready", "Unloading")]
    failed = [m for m in not_ready if m["state"] == "Failed"]
    if inp.assignment is not None and inp.assignment.drain:
        ready = cond("Ready", "False", "Draining", "the operator asked this node to drain")
    elif inp.assignment is None:
        ready = cond("Ready", "False", "NoAssignment", "no EdgeNode spec seen yet")
    elif failed:
        why = "; ".join(f"{m['model']}:{m['version']}: {m.get('message', 'failed')}" for m in failed[:3])
        ready = cond("Ready", "False", "ModelFailed", why)
    elif not_ready:
        names = ", ".join(f"{m['model']}:{m['version']} {m['state']}" for m in not_ready[:5])
        ready = cond("Ready", "False", "ModelsNotReady", f"{len(not_ready)} model(s) not ready: {names}")
    else:
        count = sum(1 for m in models if m["state"] == "Ready")
        ready = cond("Ready", "True", "AllModelsReady", f"{count} model(s) ready")

    short = [m for m, r in inp.records.items() if r.state == "Failed" and r.insufficient_memory]
    used_share = inp.used_bytes / inp.budget_bytes if inp.budget_bytes > 0 else 0.0
    in_use = f"{inp.used_bytes} of {inp.budget_bytes} bytes in use"
    if short:
        memory = cond("MemoryPressure", "True", "InsufficientMemory", f"{len(short)} model(s) do not fit")
    elif inp.budget_bytes > 0 and used_share >= inp.memory_pressure_fraction:
        memory = cond("MemoryPressure", "True", "NearBudget", in_use)
    else:
        memory = cond("MemoryPressure", "False", "WithinBudget", in_use)

    gpu = inp.gpu
    if gpu.throttled:
        reasons = ", ".join(gpu.throttle_reasons) or "throttled"
        thermal = cond("ThermalThrottling", "True", "Throttled", f"clocks throttled ({reasons})")
    elif _at_or_above(gpu.temperature_c, gpu.soft_limit_c):
        hot = f"{gpu.temperature_c:.1f} C >= soft limit {gpu.soft_limit_c:.1f} C"
        thermal = cond("ThermalThrottling", "True", "AboveSoftLimit", hot)
    elif gpu.temperature_c is None and gpu.throttled is None:
        thermal = cond("ThermalThrottling", "Unknown", "NoReading", "no thermal reading")
    else:
        thermal = cond("ThermalThrottling", "False", "Normal", "")

    missed = [m for m in models if (m.get("sla") or {}).get("met") is False]
    if missed:
        names = ", ".join(f"{m['model']}:{m['version']}" for m in missed[:5])
        sla = cond("SLAViolated", "True", "SLAMissed", f"{names} missed the SLA")
    else:
        sla = cond("SLAViolated", "False", "NoViolation", "")
    return [ready, memory, thermal, sla]


def _at_or_above(temperature_c: float | None, limit_c: float | None) -> bool:
    return temperature_c is not None and limit_c is not None and temperature_c >= limit_c


def condition(
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    previous: Sequence[Mapping[str, Any]],
    now: str,
) -> dict[str, Any]:
    """A metav1.Condition; lastTransitionTime carries over while the status is unchanged."""
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    return {
        "type": type_,
        "status": status,
        "observedGeneration": generation,
        "lastTransitionTime": since or now,
        "reason": reason,
        "message": message,
    }


_GPU_METRICS = frozenset({"memoryUsedBytes", "memoryFreeBytes", "temperatureC", "powerW", "utilization"})


def _structure(status: Mapping[str, Any]) -> dict[str, Any]:
    """The status without its measurements: what a change must be written for soon."""
    out = {k: v for k, v in status.items() if k not in ("heartbeatTime", "gpu", "conditions", "models")}
    out["gpu"] = {k: v for k, v in (status.get("gpu") or {}).items() if k not in _GPU_METRICS}
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []
    ]
    out["models"] = [
        {**m, "sla": {"met": (m.get("sla") or {}).get("met")}} for m in status.get("models") or []
    ]
    return out


def _measurements(status: Mapping[str, Any]) -> dict[str, Any]:
    gpu = status.get("gpu") or {}
    return {
        "gpu": {k: gpu.get(k) for k in _GPU_METRICS},
        "sla": [m.get("sla") for m in status.get("models") or []],
    }


@dataclass
class StatusPacer:
    """When to write EdgeNode.status. Pure (times are passed in; monotonic seconds).

    A change of state (models, conditions, generation: anything but measurements) is written
    at most every `min_interval_s`; a change of measurements only (memory in use,
    temperature, SLA numbers) at most every `metrics_interval_s`; an unchanged status every
    `max_interval_s` (it refreshes heartbeatTime; liveness itself is the Lease). At 1,000
    nodes the defaults bound status writes to at most 500/s during churn and 100/s (usually
    33/s) in steady state.
    """

    min_interval_s: float = 2.0
    metrics_interval_s: float = 10.0
    max_interval_s: float = 30.0
    last_write_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_interval_s <= self.metrics_interval_s <= self.max_interval_s:
            raise ValueError("need 0 <= min_interval_s <= metrics_interval_s <= max_interval_s")

    def due(self, now_s: float, written: Mapping[str, Any] | None, status: Mapping[str, Any]) -> bool:
        """Whether `status` should be written now, given the status the API server holds."""
        if written is None or self.last_write_s is None:
            return True
        since = now_s - self.last_write_s
        if since >= self.max_interval_s:
            return True
        if _structure(written) != _structure(status):
            return since >= self.min_interval_s
        if _measurements(written) != _measurements(status):
            return since >= self.metrics_interval_s
        return False

    def wrote(self, now_s: float) -> None:
        self.last_write_s = now_s
