"""EdgeNode.status, built from the runtime's view (`build_status` -> the contract's typed
`EdgeNodeStatus`), and when to send it (`StatusPacer`; the link sends it as
`edgefleet_api.patch.merge_patch`). Pure: no API server, no disk, no model.

The SLA path ends here: the SLA monitor's window for each model version (an `SlaWindow`, in
seconds) becomes its status entry's `sla`; any window that missed the SLA sets SLAViolated.
The counters path: each model version's cumulative counts (`ModelCounters`) become its
entry's `counters`; they are measurements, so a change of counts alone is written at the
pacer's measurement pace (`metrics_interval_s`), never once per request, and any write carries
the latest.
The memory path: each record's measured bytes, and the budget in use, set MemoryPressure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edgefleet_api.conditions import TRUE, Condition, next_condition
from edgefleet_api.edge_node import (
    MAX_MODELS,
    EdgeNodeStatus,
    GpuStatus,
    ModelCounters,
    ModelState,
    ModelStatus,
)
from edgefleet_api.sla import SlaWindow
from edgefleet_api.types import ModelId
from node_agent.link.assignment import Assignment, desired_versions


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One model version's state as the runtime reports it."""

    state: ModelState
    digest: str | None = None
    """Digest of the verified artifact (present once prepared)."""
    memory_bytes: int | None = None
    """Measured at load (resident or evicted models)."""
    message: str = ""
    insufficient_memory: bool = False
    """It failed for lack of memory (sets MemoryPressure)."""
    held: bool = False
    """A version no longer assigned that keeps serving its model while none of the model's
    assigned versions is ready (make before break; sets ServingPrevious)."""
    traffic_weight: int = 0
    """The traffic weight in effect, for a version no longer assigned (`leftovers`)."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "state", ModelState(self.state))
        except ValueError:
            states = tuple(s.value for s in ModelState)
            raise ValueError(f"unknown model state {self.state!r}; expected one of {states}") from None


@dataclass(frozen=True, slots=True)
class StatusInputs:
    """Everything `build_status` reads."""

    assignment: Assignment | None
    records: Mapping[ModelId, ModelRecord]
    """Per assigned model version; a version without a record is Pending."""
    gpu: GpuStatus
    budget_bytes: int
    used_bytes: int
    loaded_models: int
    observed_generation: int
    now: str
    """RFC 3339, second precision (heartbeatTime, condition transitions)."""
    sla: Mapping[ModelId, SlaWindow] = field(default_factory=dict)
    counters: Mapping[ModelId, ModelCounters] = field(default_factory=dict)
    """Per model version (assigned or leftover), its cumulative counts; absent: none yet."""
    leftovers: Sequence[tuple[str, ModelId, ModelRecord]] = ()
    """(service, version, record) of versions no longer assigned but still resident."""
    previous_conditions: Sequence[Condition] = ()
    endpoint: str | None = None
    agent_version: str | None = None
    memory_pressure_fraction: float = 0.95
    """MemoryPressure is True at or above this share of the budget in use."""


def build_status(inp: StatusInputs) -> EdgeNodeStatus:
    """EdgeNode.status (all of it) from the runtime's view. Pure; the same inputs give the
    same status, and conditions keep their lastTransitionTime while their status holds."""
    assignment = inp.assignment
    desired = desired_versions(assignment)
    models: list[ModelStatus] = []
    for entry in assignment.models if assignment is not None else ():
        if entry.key in desired.conflicts:
            record = ModelRecord(ModelState.FAILED, message=desired.conflicts[entry.key])
        elif assignment is not None and assignment.drain:
            record = inp.records.get(entry.id) or ModelRecord(ModelState.UNLOADING, message="draining")
        else:
            record = inp.records.get(entry.id) or ModelRecord(ModelState.PENDING)
        models.append(_model_status(entry.service, entry.id, record, entry.traffic_weight, inp))
    for bad in assignment.invalid if assignment is not None else ():
        message = f"invalid spec entry: {bad.message}"
        models.append(ModelStatus(bad.service, bad.model, bad.version, ModelState.FAILED, message=message))
    for service, model_id, record in inp.leftovers:
        models.append(_model_status(service, model_id, record, record.traffic_weight, inp))
    models.sort(key=lambda m: (m.service, m.model, m.version))

    conditions = (*_conditions(inp, models), _serving_previous(inp, models))
    ready = conditions[0]
    return EdgeNodeStatus(
        observed_generation=max(int(inp.observed_generation), 0),
        conditions=conditions,
        heartbeat_time=inp.now,
        gpu=inp.gpu,
        models=tuple(models[:MAX_MODELS]),
        loaded_models=max(int(inp.loaded_models), 0),
        message="" if ready.is_true else ready.message,
        agent_version=inp.agent_version or "",
        endpoint=inp.endpoint or "",
    )


def _model_status(
    service: str, model_id: ModelId, record: ModelRecord, weight: int, inp: StatusInputs
) -> ModelStatus:
    return ModelStatus(
        service=service,
        model=model_id.name,
        version=model_id.version,
        state=record.state,
        digest=record.digest,
        memory_bytes=record.memory_bytes,
        traffic_weight=weight,
        sla=inp.sla.get(model_id),
        message=record.message,
        counters=inp.counters.get(model_id),
    )


def _conditions(inp: StatusInputs, models: Sequence[ModelStatus]) -> tuple[Condition, ...]:
    gen = max(int(inp.observed_generation), 0)

    def cond(type_: str, status: str, reason: str, message: str) -> Condition:
        return next_condition(type_, status, reason, message, gen, inp.previous_conditions, inp.now)

    not_ready = [m for m in models if m.state not in (ModelState.READY, ModelState.UNLOADING)]
    failed = [m for m in not_ready if m.state is ModelState.FAILED]
    if inp.assignment is not None and inp.assignment.drain:
        ready = cond("Ready", "False", "Draining", "the operator asked this node to drain")
    elif inp.assignment is None:
        ready = cond("Ready", "False", "NoAssignment", "no EdgeNode spec seen yet")
    elif failed:
        why = "; ".join(f"{m.model}:{m.version}: {m.message or 'failed'}" for m in failed[:3])
        ready = cond("Ready", "False", "ModelFailed", why)
    elif not_ready:
        listed = ", ".join(f"{m.model}:{m.version} {m.state.value}" for m in not_ready[:5])
        ready = cond("Ready", "False", "ModelsNotReady", f"{len(not_ready)} model(s) not ready: {listed}")
    else:
        count = sum(1 for m in models if m.state is ModelState.READY)
        ready = cond("Ready", TRUE, "AllModelsReady", f"{count} model(s) ready")

    short = [m for m, r in inp.records.items() if r.state is ModelState.FAILED and r.insufficient_memory]
    used_share = inp.used_bytes / inp.budget_bytes if inp.budget_bytes > 0 else 0.0
    in_use = f"{inp.used_bytes} of {inp.budget_bytes} bytes in use"
    if short:
        memory = cond("MemoryPressure", TRUE, "InsufficientMemory", f"{len(short)} model(s) do not fit")
    elif inp.budget_bytes > 0 and used_share >= inp.memory_pressure_fraction:
        memory = cond("MemoryPressure", TRUE, "NearBudget", in_use)
    else:
        memory = cond("MemoryPressure", "False", "WithinBudget", in_use)

    gpu = inp.gpu
    if gpu.throttled:
        reasons = ", ".join(gpu.throttle_reasons) or "throttled"
        thermal = cond("ThermalThrottling", TRUE, "Throttled", f"clocks throttled ({reasons})")
    elif (
        gpu.temperature_c is not None
        and gpu.soft_limit_c is not None
        and gpu.temperature_c >= gpu.soft_limit_c
    ):
        hot = f"{gpu.temperature_c:.1f} C >= soft limit {gpu.soft_limit_c:.1f} C"
        thermal = cond("ThermalThrottling", TRUE, "AboveSoftLimit", hot)
    elif gpu.temperature_c is None and gpu.throttled is None:
        thermal = cond("ThermalThrottling", "Unknown", "NoReading", "no thermal reading")
    else:
        thermal = cond("ThermalThrottling", "False", "Normal", "")

    missed = [m for m in models if m.sla is not None and m.sla.met is False]
    if missed:
        listed = ", ".join(f"{m.model}:{m.version}" for m in missed[:5])
        sla = cond("SLAViolated", TRUE, "SLAMissed", f"{listed} missed the SLA")
    else:
        sla = cond("SLAViolated", "False", "NoViolation", "")
    return (ready, memory, thermal, sla)


def _serving_previous(inp: StatusInputs, models: Sequence[ModelStatus]) -> Condition:
    """ServingPrevious: True while a version no longer assigned serves in place of its model's
    assigned versions, none of which is ready; reason TargetFailed when one of those failed
    (the node cannot fetch, verify or load it and keeps serving what it has), else Replacing."""
    gen = max(int(inp.observed_generation), 0)
    held = [(m, r) for (_, m, r) in inp.leftovers if r.held]
    if not held:
        return next_condition(
            "ServingPrevious", "False", "ServingTarget", "", gen, inp.previous_conditions, inp.now
        )
    failed = {m.model for m in models if m.state is ModelState.FAILED}
    reason = "TargetFailed" if any(m.name in failed for m, _ in held) else "Replacing"
    message = "; ".join(f"{m}: {r.message}" for m, r in held[:5])
    return next_condition("ServingPrevious", TRUE, reason, message, gen, inp.previous_conditions, inp.now)


def _at_or_above(temperature_c: float | None, limit_c: float | None) -> bool:
    return temperature_c is not None and limit_c is not None and temperature_c >= limit_c


_GPU_METRICS = ("memory_used_bytes", "memory_free_bytes", "temperature_c", "power_w", "utilization")
"""The GpuStatus fields that are measurements (the rest say what the device is)."""


def _structure(status: EdgeNodeStatus) -> EdgeNodeStatus:
    """The status without its measurements: what a change must be written for soon."""
    gpu = status.gpu
    return dataclasses.replace(
        status,
        heartbeat_time="",
        report_sequence=0,
        gpu=gpu
        and dataclasses.replace(
            gpu,
            memory_used_bytes=None,
            memory_free_bytes=None,
            temperature_c=None,
            power_w=None,
            utilization=None,
        ),
        conditions=tuple(dataclasses.replace(c, last_transition_time="") for c in status.conditions),
        models=tuple(
            dataclasses.replace(m, sla=SlaWindow(met=m.sla.met if m.sla is not None else None), counters=None)
            for m in status.models
        ),
    )


def _sla(status: EdgeNodeStatus) -> tuple[object, ...]:
    """Each model's SLA window and counters: they change while the model serves (its window rolls)."""
    return tuple((m.sla, m.counters) for m in status.models)


def _gpu_moved(
    written: EdgeNodeStatus, status: EdgeNodeStatus, memory_fraction: float, degrees_c: float
) -> bool:
    """The GPU's memory in use moved by `memory_fraction` of its total or more, or its temperature by
    `degrees_c` or more (or either appeared or vanished), since `written`. Power and utilization
    are not compared: the operator does not act on them (they ride along with other writes)."""
    a, b = written.gpu or GpuStatus(), status.gpu or GpuStatus()
    if (a.memory_used_bytes is None) != (b.memory_used_bytes is None):
        return True
    if a.memory_used_bytes is not None and b.memory_used_bytes is not None:
        total = b.memory_total_bytes or a.memory_total_bytes or 0
        if abs(a.memory_used_bytes - b.memory_used_bytes) >= max(memory_fraction * total, 1):
            return True
    if (a.temperature_c is None) != (b.temperature_c is None):
        return True
    return (
        a.temperature_c is not None
        and b.temperature_c is not None
        and abs(a.temperature_c - b.temperature_c) >= degrees_c
    )


def next_report_sequence(last: int, seen: int, now_s: float) -> int:
    """The reportSequence of the next status write: above the agent's `last` and above the
    highest the API server was `seen` to hold, and at least the wall clock in milliseconds, so
    it keeps growing across agent restarts (a restarted agent starts above its previous life's
    numbers without having to read them first). Pure."""
    return max(int(last) + 1, int(seen) + 1, int(now_s * 1000))


@dataclass
class StatusPacer:
    """When to write EdgeNode.status: only on a change the operator acts on. Pure (times are
    passed in; monotonic seconds).

    A change of state (models, conditions, generation: anything but measurements) is written
    at most every `min_interval_s`; a change of what is measured, at most every
    `metrics_interval_s`, and only where it matters: a model's SLA window or counters moved (it
    served requests: its window rolled), the GPU memory in use moved by `memory_hysteresis_fraction`
    of the total or more, the temperature by `temperature_hysteresis_c` or more (crossing the soft
    limit or throttling is a condition: a change of state). Counters are measurements: requests
    counted on every call never make it write more often. For `settle_s` after a change of state
    was written, the status is written again every `metrics_interval_s` even when unchanged: the
    operator judges a change (a canary wave) only on reports written within its window, which
    starts once the node reports the change, and an idle node would otherwise never write one.
    Past that, an unchanged status is never written again (`max_interval_s` 0, the default):
    liveness is the Lease, and at 10,000 idle nodes a heartbeat-only write every 30 s would be 333
    writes/s of nothing. A positive `max_interval_s` brings back such a refresh of heartbeatTime.
    At 1,000 nodes the defaults bound status writes to at most 500/s during churn, 100/s while
    every node serves or settles, 0 while nothing changes. Statuses are compared as written (each
    number rounded as the wire has it: `EdgeNodeStatus.from_obj(status.to_obj())`).
    """

    min_interval_s: float = 2.0
    metrics_interval_s: float = 10.0
    max_interval_s: float = 0.0
    memory_hysteresis_fraction: float = 0.05
    """Half the operator's default memory reserve (10%): drift under it never makes a placement
    wrong by more than half the slack it keeps."""
    temperature_hysteresis_c: float = 2.0
    settle_s: float = 600.0
    """Ten minutes: a canary wave starts once its nodes report the version loaded and lasts its
    analysis interval (a minute or a few)."""
    last_write_s: float | None = None
    last_change_s: float | None = None
    """When the last change of state was written."""
    _changing: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.min_interval_s <= self.metrics_interval_s:
            raise ValueError("need 0 <= min_interval_s <= metrics_interval_s")
        if self.max_interval_s and self.max_interval_s < self.metrics_interval_s:
            raise ValueError("max_interval_s must be 0 (no heartbeat-only writes) or >= metrics_interval_s")
        if self.memory_hysteresis_fraction < 0 or self.temperature_hysteresis_c < 0 or self.settle_s < 0:
            raise ValueError("hystereses and settle_s must be >= 0")

    def due(self, now_s: float, written: EdgeNodeStatus | None, status: EdgeNodeStatus) -> bool:
        """Whether `status` should be written now, given the status the API server holds."""
        if written is None or self.last_write_s is None:
            self._changing = True
            return True
        since = now_s - self.last_write_s
        if self.max_interval_s and since >= self.max_interval_s:
            return True
        if _structure(written) != _structure(status):
            self._changing = since >= self.min_interval_s
            return self._changing
        settling = self.last_change_s is not None and now_s - self.last_change_s < self.settle_s
        if (
            settling
            or _sla(written) != _sla(status)
            or _gpu_moved(written, status, self.memory_hysteresis_fraction, self.temperature_hysteresis_c)
        ):
            return since >= self.metrics_interval_s
        return False

    def wrote(self, now_s: float) -> None:
        self.last_write_s = now_s
        if self._changing:
            self.last_change_s, self._changing = now_s, False
