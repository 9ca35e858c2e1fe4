"""From API objects to placement's input, and from its output back to EdgeNode specs.

Pure functions over plain dicts (the JSON the API server returns), so they are
tested without a cluster. The reconciler reads the objects and writes the results.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from edgefleet_api import names
from edgefleet_api.types import Priority
from edgefleet_operator.fleet_types import (
    Assignment,
    Health,
    ModelDemand,
    NodeState,
    PlacedModel,
    ServiceDemand,
    Spread,
    Taint,
    Toleration,
)
from edgefleet_operator.health import NodeSignals

Obj = Mapping[str, Any]
MIB = 1 << 20
LIFECYCLE_TAINTS = frozenset({"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"})
"""Taints the node lifecycle controller mirrors from the Ready condition. Placement ignores them:
node health (with its grace period and damping) already judges readiness, and honouring them
would move work the instant a node blips."""


def service_key(obj: Obj) -> str:
    """namespace/name of an InferenceService."""
    return f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"


def parse_quantity(value: str | int | None) -> int:
    """A Kubernetes quantity ('512Mi', '1G', 1024) in bytes; None -> 0."""
    if value is None:
        return 0
    from kubernetes.utils.quantity import parse_quantity as parse

    return int(parse(value))


def parse_time(value: str | None) -> float | None:
    """RFC 3339 (API server timestamps, MicroTime too) -> epoch seconds."""
    if not value:
        return None
    import datetime as dt

    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def node_ready(node: Obj) -> tuple[bool, float]:
    """(Ready condition is True, its last transition time)."""
    for cond in node.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True", parse_time(cond.get("lastTransitionTime")) or 0.0
    return False, 0.0


def matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def node_signals(node: Obj, edge_node: Obj | None, lease: Obj | None) -> NodeSignals:
    ready, since = node_ready(node)
    models = (edge_node or {}).get("spec", {}).get("models") or []
    work_since = parse_time(
        (edge_node or {}).get("metadata", {}).get("annotations", {}).get(names.ANNOTATION_WORK_SINCE)
    )
    renew = None
    if lease:
        spec = lease.get("spec", {})
        renew = parse_time(spec.get("renewTime") or spec.get("acquireTime"))
    return NodeSignals(node["metadata"]["name"], ready, since, renew, bool(models), work_since)


def our_measured_bytes(edge_node: Obj | None) -> int:
    """Device memory the models we placed use on this node, as its agent measured it."""
    models = (edge_node or {}).get("status", {}).get("models") or []
    return sum(int(m.get("memoryBytes") or 0) for m in models if m.get("state") in ("Ready", "Loading"))


def node_state(node: Obj, edge_node: Obj | None, health: Health, reserve_fraction: float) -> NodeState:
    """NodeState from the Node and its EdgeNode's agent-written status.

    Capacity: the GPU's total memory (measured by the agent; until it reports, the GPU feature
    discovery label in MiB) less a reserve and less whatever is used by anything that is not one
    of our models (used - ours), so our own assignments never make a node look full.
    """
    labels = node["metadata"].get("labels") or {}
    gpu = (edge_node or {}).get("status", {}).get("gpu") or {}
    total = int(gpu.get("memoryTotalBytes") or 0) or int(labels.get("nvidia.com/gpu.memory", "0") or 0) * MIB
    reserved = int(total * reserve_fraction)
    if "memoryUsedBytes" in gpu:
        reserved += max(0, int(gpu["memoryUsedBytes"]) - our_measured_bytes(edge_node))
    taints = tuple(
        Taint(t["key"], t.get("effect", "NoSchedule"), t.get("value", ""))
        for t in (node.get("spec", {}).get("taints") or [])
        if t.get("effect") in ("NoSchedule", "PreferNoSchedule", "NoExecute")
        and t["key"] not in LIFECYCLE_TAINTS
    )
    return NodeState(
        name=node["metadata"]["name"],
        memory_total_bytes=total,
        memory_reserved_bytes=min(reserved, total),
        labels=dict(labels),
        taints=taints,
        health=health,
        temperature_c=gpu.get("temperatureC"),
        soft_limit_c=gpu.get("softLimitC"),
        throttled=bool(gpu.get("throttled", False)),
        sla_scores=sla_scores(edge_node),
    )


def sla_scores(edge_node: Obj | None) -> dict[tuple[str, str], float]:
    """(service, model) -> 1.0 if the node's current SLA window for it met the SLA, else 0.0.

    The agent reports `slaMet` per model; models without a verdict have no record.
    """
    out: dict[tuple[str, str], float] = {}
    for m in (edge_node or {}).get("status", {}).get("models") or []:
        met = (m.get("sla") or {}).get("met")
        if met is not None and m.get("service") and m.get("model"):
            out[(m["service"], m["model"])] = 1.0 if met else 0.0
    return out


def measured_bytes(edge_nodes: Iterable[Obj]) -> dict[tuple[str, str, str], tuple[int, ...]]:
    """(service, model, version) -> the memory each node measured for it."""
    out: dict[tuple[str, str, str], list[int]] = {}
    for en in edge_nodes:
        for m in en.get("status", {}).get("models") or []:
            if m.get("memoryBytes") and m.get("state") == "Ready":
                out.setdefault((m.get("service", ""), m["model"], m["version"]), []).append(
                    int(m["memoryBytes"])
                )
    return {k: tuple(v) for k, v in out.items()}


def service_demand(isvc: Obj, measured: Mapping[tuple[str, str, str], tuple[int, ...]]) -> ServiceDemand:
    key = service_key(isvc)
    spec = isvc["spec"]
    models = tuple(
        ModelDemand(
            m["name"],
            str(m["version"]),
            parse_quantity(m.get("memoryEstimate")),
            measured.get((key, m["name"], str(m["version"])), ()),
        )
        for m in [*spec["models"], *rollout_extra_models(isvc)]
    )
    priority = min(Priority.parse(m.get("priority", "normal")) for m in spec["models"])
    placement = spec.get("placement") or {}
    spread = placement.get("spread")
    return ServiceDemand(
        name=key,
        models=models,
        priority=priority,
        replicas=placement.get("replicas"),
        node_fraction=placement.get("nodeFraction"),
        node_selector=dict(placement.get("nodeSelector") or {}),
        tolerations=tuple(
            Toleration(t.get("key", ""), t.get("operator", "Equal"), t.get("value", ""), t.get("effect", ""))
            for t in placement.get("tolerations") or []
        ),
        spread=Spread(spread.get("topologyKey", "topology.kubernetes.io/zone"), spread.get("maxSkew", 1))
        if spread
        else None,
    )


def previous_assignment(edge_nodes: Iterable[Obj]) -> Assignment:
    """What the EdgeNode specs hold now (the last placement written)."""
    by_node: dict[str, tuple[PlacedModel, ...]] = {}
    for en in edge_nodes:
        models = en.get("spec", {}).get("models") or []
        by_node[en["metadata"]["name"]] = tuple(
            sorted(
                PlacedModel(
                    m["service"],
                    m["model"],
                    str(m["version"]),
                    int(m.get("memoryBudgetBytes") or 0),
                    int(m.get("trafficWeight", 100)),
                )
                for m in models
            )
        )
    return Assignment(by_node)


def edge_entry(service: str, model: Obj, isvc_spec: Obj) -> dict[str, Any]:
    """An EdgeNode spec entry (without budget and weight) for one model version of a service."""
    entry: dict[str, Any] = {
        "service": service,
        "model": model["name"],
        "version": str(model["version"]),
        "artifact": dict(model["artifact"]),
        "format": model.get("format", "torchscript"),
        "task": model.get("task", "predict"),
        "priority": model.get("priority", "normal"),
        "pinned": bool(model.get("pinned", False)),
        "preload": True,
    }
    if isvc_spec.get("batching"):
        entry["batching"] = dict(isvc_spec["batching"])
    if isvc_spec.get("sla"):
        entry["sla"] = dict(isvc_spec["sla"])
    return entry


def rollout_extra_models(isvc: Obj) -> list[Obj]:
    """Stable model versions a rollout in progress still runs beside the spec's (new) ones.

    Placement budgets memory for both on every node of the service while a rollout runs: canary
    nodes hold both side by side, and a rollback must find room for the stable version.
    """
    rollout = (isvc.get("status") or {}).get("rollout") or {}
    if rollout.get("phase") not in ("Progressing", "Paused"):
        return []
    spec_refs = {(m["name"], str(m["version"])) for m in isvc["spec"]["models"]}
    return [m for m in rollout.get("stableModels") or [] if (m["name"], str(m["version"])) not in spec_refs]


def edge_node_models(
    node: str,
    placed: Iterable[PlacedModel],
    targets: Mapping[str, Any],
    specs: Mapping[str, Obj],
    current: Sequence[Obj] = (),
) -> list[dict[str, Any]]:
    """EdgeNode.spec.models for one node, sorted by (service, model, version).

    `targets`: service -> its rollout Decision (which revision(s) this node runs, with weights);
    budgets come from placement, per model version (a rollout places stable and canary side by side);
    a version placement did not budget this pass (the pass that starts a rollout places the new
    version only) keeps the budget the node's `current` entry has, so that pass rewrites only the
    canaries' specs, not every node's. A service without a decision this pass (its status could not be
    written) keeps the node's `current` entries for it.
    """
    budgets: dict[tuple[str, ...], int] = {(p.service, p.model): p.memory_budget_bytes for p in placed}
    budgets |= {
        (str(e.get("service")), str(e.get("model")), str(e.get("version"))): int(
            e.get("memoryBudgetBytes") or 0
        )
        for e in current
    }
    budgets |= {(p.service, p.model, p.version): p.memory_budget_bytes for p in placed}
    out: list[dict[str, Any]] = []
    for service in sorted({p.service for p in placed}):
        if service not in targets:
            out += [dict(e) for e in current if e.get("service") == service]
            continue
        for model, weight in targets[service].placed(node):
            entry = edge_entry(service, model, specs[service])
            key = (service, model["name"])
            entry["memoryBudgetBytes"] = budgets.get((*key, str(model["version"])), budgets.get(key, 0))
            entry["trafficWeight"] = weight
            out.append(entry)
    return sorted(out, key=lambda e: (e["service"], e["model"], e["version"]))
