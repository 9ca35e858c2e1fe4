"""From the fleet's objects to placement's input, and from its output back to EdgeNode specs.

Pure functions over the contract's typed models (`edgefleet_api`: EdgeNode spec and status,
InferenceService spec, status.rollout) and, for Nodes and Leases (Kubernetes' own objects), the
API's JSON. The reconciler reads the objects and writes the results; this module is tested
without a cluster.

The memory path: an agent measures each model it loads (EdgeNode status.models[].memoryBytes)
and its device (status.gpu) -> `node_state` makes a node's capacity the GPU's total less a reserve
and less what anything but our models uses; `measured_bytes` gathers each model version's
measurements, and `service_demand` sizes a service by them (its models' declared memoryEstimate
until a node has measured one) -> placement grants each placed version a budget -> `edge_entry`
writes it into the EdgeNode spec (memoryBudgetBytes), with the node's capacity as the spec's
memoryBudgetBytes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgefleet_api import names, wire
from edgefleet_api.edge_node import EdgeNode, EdgeNodeStatus, ModelAssignment, ModelState
from edgefleet_api.inference_service import InferenceServiceSpec, Taint
from edgefleet_api.model_spec import Artifact, Batching, GenerationSettings, ModelSpec
from edgefleet_api.rollout_status import ACTIVE, RolloutStatus
from edgefleet_operator.fleet_types import (
    Assignment,
    Health,
    ModelDemand,
    NodeState,
    PlacedModel,
    ServiceDemand,
)
from edgefleet_operator.health import NodeSignals

Obj = Mapping[str, Any]
MIB = 1 << 20
LIFECYCLE_TAINTS = frozenset({"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"})
"""Taints the node lifecycle controller mirrors from the Ready condition. Placement ignores them:
node health (with its grace period and damping) already judges readiness, and honouring them
would move work the instant a node blips."""
PLACEMENT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


class RolloutTargets(Protocol):
    """What `edge_node_models` needs of a service's rollout decision."""

    def placed(self, node: str) -> list[tuple[ModelSpec, int]]: ...

    def prefetched(self, node: str) -> tuple[ModelSpec, ...]: ...


def node_ready(node: Obj) -> tuple[bool, float]:
    """(Ready condition is True, its last transition time)."""
    for cond in node.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True", wire.parse_time(cond.get("lastTransitionTime")) or 0.0
    return False, 0.0


def matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def node_signals(node: Obj, edge_node: EdgeNode | None, lease: Obj | None) -> NodeSignals:
    ready, since = node_ready(node)
    work_since = (
        wire.parse_time(edge_node.annotations.get(names.ANNOTATION_WORK_SINCE)) if edge_node else None
    )
    renew = lease_renewed_s(lease)
    has_work = edge_node is not None and bool(edge_node.spec.models)
    return NodeSignals(node["metadata"]["name"], ready, since, renew, has_work, work_since)


def lease_renewed_s(lease: Obj | None) -> float | None:
    """When an agent Lease was last renewed (epoch seconds); None without one."""
    spec = (lease or {}).get("spec") or {}
    return wire.parse_time(spec.get("renewTime") or spec.get("acquireTime"))


def our_measured_bytes(status: EdgeNodeStatus) -> int:
    """Device memory the models we placed use on this node, as its agent measured it."""
    return sum(
        m.memory_bytes or 0 for m in status.models if m.state in (ModelState.READY, ModelState.LOADING)
    )


def node_state(node: Obj, edge_node: EdgeNode | None, health: Health, reserve_fraction: float) -> NodeState:
    """NodeState from the Node and its EdgeNode's agent-written status.

    Capacity: the GPU's total memory (measured by the agent; until it reports, the GPU feature
    discovery label in MiB) less a reserve and less whatever is used by anything that is not one
    of our models (used - ours), so our own assignments never make a node look full.
    """
    labels = node["metadata"].get("labels") or {}
    status = edge_node.status if edge_node is not None else EdgeNodeStatus()
    gpu = status.gpu
    measured_total = gpu.memory_total_bytes if gpu is not None else None
    total = measured_total or int(labels.get("nvidia.com/gpu.memory", "0") or 0) * MIB
    reserved = int(total * reserve_fraction)
    if gpu is not None and gpu.memory_used_bytes is not None:
        reserved += max(0, gpu.memory_used_bytes - our_measured_bytes(status))
    taints = tuple(
        Taint(t["key"], t.get("effect", "NoSchedule"), t.get("value", ""))
        for t in (node.get("spec", {}).get("taints") or [])
        if t.get("effect") in PLACEMENT_EFFECTS and t["key"] not in LIFECYCLE_TAINTS
    )
    return NodeState(
        name=node["metadata"]["name"],
        memory_total_bytes=total,
        memory_reserved_bytes=min(reserved, total),
        labels=dict(labels),
        taints=taints,
        health=health,
        temperature_c=gpu.temperature_c if gpu is not None else None,
        soft_limit_c=gpu.soft_limit_c if gpu is not None else None,
        throttled=bool(gpu is not None and gpu.throttled),
        sla_scores=sla_scores(status),
    )


def sla_scores(status: EdgeNodeStatus) -> dict[tuple[str, str], float]:
    """(service, model) -> 1.0 if the node's current SLA window for it met the SLA, else 0.0.

    The agent reports `met` per model; models without a verdict have no record.
    """
    out: dict[tuple[str, str], float] = {}
    for m in status.models:
        met = m.sla.met if m.sla is not None else None
        if met is not None and m.service and m.model:
            out[(m.service, m.model)] = 1.0 if met else 0.0
    return out


LoadKey = tuple[str, str | None, str, str, int | None, GenerationSettings | None]
"""What a model version's device memory depends on besides the node (`load_key`)."""


def load_key(
    artifact: Artifact, fmt: str, task: str, batching: Batching | None, generation: GenerationSettings | None
) -> LoadKey:
    """The same artifact (weights and model.yaml, by digest) loaded the same way (format, task,
    largest batch, generation settings) takes the same memory, whichever service holds it."""
    return (
        artifact.digest,
        artifact.config_digest,
        fmt,
        task,
        batching.max_batch_size if batching is not None else None,
        generation,
    )


@dataclass(frozen=True, slots=True)
class Measured:
    """The memory nodes measured for the model versions they hold Ready: by (service, model,
    version), and by `load_key` for a version not measured itself yet: a new service of an
    artifact the fleet already runs is placed at its measured size at once, not at its declared
    estimate and then again at its measurement (one EdgeNode write per placement, not two)."""

    by_version: Mapping[tuple[str, str, str], tuple[int, ...]] = field(default_factory=dict)
    by_load: Mapping[LoadKey, tuple[int, ...]] = field(default_factory=dict)

    def of(self, service: str, model: ModelSpec, batching: Batching | None) -> tuple[int, ...]:
        """The measurements for `model` of `service` (() for none): its own, or its load's."""
        own = self.by_version.get((service, model.name, model.version))
        if own:
            return own
        key = load_key(model.artifact, model.format, model.task, batching, model.generation)
        return self.by_load.get(key, ())


def measured_bytes(edge_nodes: Iterable[EdgeNode]) -> Measured:
    """What each node measured for the Ready versions it holds (`Measured`)."""
    by_version: dict[tuple[str, str, str], list[int]] = {}
    by_load: dict[LoadKey, list[int]] = {}
    for en in edge_nodes:
        entries = None
        for m in en.status.models:
            if not (m.memory_bytes and m.state is ModelState.READY):
                continue
            key = (m.service, m.model, m.version)
            by_version.setdefault(key, []).append(m.memory_bytes)
            if entries is None:
                entries = {e.key: e for e in en.spec.models}
            entry = entries.get(key)
            if entry is not None:
                like = load_key(entry.artifact, entry.format, entry.task, entry.batching, entry.generation)
                by_load.setdefault(like, []).append(m.memory_bytes)
    return Measured({k: tuple(v) for k, v in by_version.items()}, {k: tuple(v) for k, v in by_load.items()})


def service_demand(
    key: str,
    spec: InferenceServiceSpec,
    rollout: RolloutStatus | None,
    measured: Measured,
) -> ServiceDemand:
    """The service `key` (namespace/name) as placement sees it. ValueError for a spec placement
    cannot use."""
    models = tuple(
        ModelDemand(m.name, m.version, m.memory_estimate_bytes, measured.of(key, m, spec.batching))
        for m in (*spec.models, *rollout_extra_models(spec, rollout))
    )
    placement = spec.placement
    return ServiceDemand(
        name=key,
        models=models,
        priority=min(m.priority for m in spec.models),
        replicas=placement.replicas if placement else None,
        node_fraction=placement.node_fraction if placement else None,
        node_selector=dict(placement.node_selector) if placement else {},
        tolerations=placement.tolerations if placement else (),
        spread=placement.spread if placement else None,
    )


def placed_models(en: EdgeNode) -> tuple[PlacedModel, ...]:
    """What an EdgeNode's spec holds now, sorted."""
    return tuple(
        sorted(
            PlacedModel(m.service, m.model, m.version, m.memory_budget_bytes or 0, m.traffic_weight)
            for m in en.spec.models
        )
    )


def previous_assignment(edge_nodes: Iterable[EdgeNode]) -> Assignment:
    """What the EdgeNode specs hold now (the last placement written)."""
    return Assignment({en.name: placed_models(en) for en in edge_nodes})


def edge_entry(
    service: str, model: ModelSpec, spec: InferenceServiceSpec, budget_bytes: int, traffic_weight: int
) -> ModelAssignment:
    """An EdgeNode spec entry for one model version of a service, with the service's batching and
    SLA."""
    return ModelAssignment(
        service=service,
        model=model.name,
        version=model.version,
        artifact=model.artifact,
        format=model.format,
        task=model.task,
        traffic_weight=traffic_weight,
        memory_budget_bytes=budget_bytes,
        priority=model.priority,
        pinned=model.pinned,
        preload=True,
        batching=spec.batching,
        sla=spec.sla,
        generation=model.generation,
    )


def rollout_extra_models(spec: InferenceServiceSpec, rollout: RolloutStatus | None) -> list[ModelSpec]:
    """Stable model versions a rollout in progress still runs beside the spec's (new) ones.

    Placement budgets memory for both on every node of the service while a rollout runs: canary
    nodes hold both side by side, and a rollback must find room for the stable version.
    """
    if rollout is None or rollout.phase not in ACTIVE:
        return []
    spec_refs = {m.id for m in spec.models}
    return [m for m in rollout.stable_models if m.id not in spec_refs]


def edge_node_models(
    node: str,
    placed: Iterable[PlacedModel],
    targets: Mapping[str, RolloutTargets],
    specs: Mapping[str, InferenceServiceSpec],
    current: Sequence[ModelAssignment] = (),
) -> tuple[ModelAssignment, ...]:
    """EdgeNode.spec.models for one node, sorted by (service, model, version).

    `targets`: service -> its rollout Decision (which revision(s) this node runs, with weights);
    budgets come from placement, per model version (a rollout places stable and canary side by side);
    a version placement did not budget this pass (the pass that starts a rollout places the new
    version only) keeps the budget the node's `current` entry has, so that pass rewrites only the
    canaries' specs, not every node's. A service without a decision this pass (its status could not be
    written) keeps the node's `current` entries for it.
    """
    placed = list(placed)
    budgets: dict[tuple[str, ...], int] = {(p.service, p.model): p.memory_budget_bytes for p in placed}
    budgets |= {e.key: e.memory_budget_bytes or 0 for e in current}
    budgets |= {(p.service, p.model, p.version): p.memory_budget_bytes for p in placed}
    out: list[ModelAssignment] = []
    for service in sorted({p.service for p in placed}):
        if service not in targets:
            out += [e for e in current if e.service == service]
            continue
        for model, weight in targets[service].placed(node):
            budget = budgets.get((service, model.name, model.version), budgets.get((service, model.name), 0))
            out.append(edge_entry(service, model, specs[service], budget, weight))
    return tuple(sorted(out, key=lambda e: e.key))


def edge_node_prefetch(
    node: str,
    placed: Iterable[PlacedModel],
    targets: Mapping[str, RolloutTargets],
    specs: Mapping[str, InferenceServiceSpec],
    models: Sequence[ModelAssignment],
) -> tuple[ModelAssignment, ...]:
    """EdgeNode.spec.prefetch for one node: the versions its services' rollouts take it to next
    (`Decision.prefetched`) that its `models` do not hold already, sorted by key."""
    held = {m.key for m in models}
    out = {}
    for service in sorted({p.service for p in placed} & set(targets)):
        for model in targets[service].prefetched(node):
            entry = edge_entry(service, model, specs[service], 0, 0)
            if entry.key not in held:
                out[entry.key] = entry
    return tuple(out[k] for k in sorted(out))


def published_health(edge_node: Mapping[str, Any] | None) -> Health | None:
    """The health the holder of the node's site shard published on its EdgeNode (None: none yet, or
    a value this version does not know)."""
    raw = ((edge_node or {}).get("metadata", {}).get("annotations") or {}).get(names.ANNOTATION_HEALTH)
    try:
        return Health(raw) if raw else None
    except ValueError:
        return None


class NodeMemo:
    """`node_signals`, `node_state` and `placed_models` per node, kept while the objects they derive
    from stand (by resourceVersion; and the health, for the state): a pass over 10,000 nodes
    derives again only those whose Node, EdgeNode or Lease changed. `typed(name, obj)` types an EdgeNode."""

    def __init__(self, typed: Callable[[str, dict[str, Any]], EdgeNode]) -> None:
        self.typed = typed
        self._signals: dict[str, tuple[tuple[Any, ...], NodeSignals]] = {}
        self._states: dict[str, tuple[tuple[Any, ...], NodeState]] = {}
        self._placed: dict[str, tuple[str | None, tuple[PlacedModel, ...]]] = {}

    def signals(self, node: Obj, edge_node: dict[str, Any] | None, lease: Obj | None) -> NodeSignals:
        name = node["metadata"]["name"]
        key = (_version(node), _version(edge_node), _version(lease))
        kept = self._signals.get(name)
        if kept is not None and kept[0] == key and key[0] is not None:
            return kept[1]
        typed = self.typed(name, edge_node) if edge_node is not None else None
        signals = node_signals(node, typed, lease)
        self._signals[name] = (key, signals)
        return signals

    def state(
        self, node: Obj, edge_node: dict[str, Any] | None, health: Health, reserve_fraction: float
    ) -> NodeState:
        name = node["metadata"]["name"]
        key = (_version(node), _version(edge_node), health, reserve_fraction)
        kept = self._states.get(name)
        if kept is not None and kept[0] == key and key[0] is not None:
            return kept[1]
        typed = self.typed(name, edge_node) if edge_node is not None else None
        state = node_state(node, typed, health, reserve_fraction)
        self._states[name] = (key, state)
        return state

    def placed(self, name: str, edge_node: dict[str, Any]) -> tuple[PlacedModel, ...]:
        """`placed_models` of EdgeNode `name`, kept while its resourceVersion stands."""
        key = _version(edge_node)
        kept = self._placed.get(name)
        if kept is not None and kept[0] == key and key is not None:
            return kept[1]
        placed = placed_models(self.typed(name, edge_node))
        self._placed[name] = (key, placed)
        return placed

    def assignment(self, edge_nodes: Mapping[str, dict[str, Any]], nodes: Collection[str]) -> Assignment:
        """`previous_assignment` of the EdgeNodes of `nodes`, each node's entries kept (`placed`)."""
        return Assignment({n: self.placed(n, en) for n, en in edge_nodes.items() if n in nodes})

    def keep_only(self, nodes: Collection[str]) -> None:
        """Forget the nodes not in `nodes` (when the fleet shrank)."""
        if max(len(self._signals), len(self._states), len(self._placed)) > len(nodes):
            self._signals = {n: v for n, v in self._signals.items() if n in nodes}
            self._states = {n: v for n, v in self._states.items() if n in nodes}
            self._placed = {n: v for n, v in self._placed.items() if n in nodes}


def _version(obj: Obj | None) -> str | None:
    return None if obj is None else obj["metadata"].get("resourceVersion")
