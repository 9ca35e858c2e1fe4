"""InferenceService status from the placement and the agents' EdgeNode statuses. Pure: the
contract's typed models in, a typed `InferenceServiceStatus` out, the clock's value passed in.

Conditions follow the Kubernetes API conventions: Ready, Progressing and Degraded,
each with observedGeneration; lastTransitionTime changes only when the status does. Degraded names
the nodes that cannot prepare their target and keep serving an older version (reason
ServingPreviousVersion), after a failed rollout's reason.

Aggregated SLA across nodes (the end of the SLA path: the agents' windows, `EdgeNodeStatus`
models[].sla, become the service's status.sla): throughput and requests add up; error rate is
total errors over total requests; p50/p95/p99 are the worst node's (a fleet-wide percentile
cannot be recovered from per-node percentiles, and the worst node is what an SLA is broken by).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgefleet_api.conditions import conditions_from_obj, next_condition
from edgefleet_api.edge_node import EdgeNodeStatus, ModelState
from edgefleet_api.inference_service import (
    MAX_NODES_IN_STATUS,
    InferenceServiceStatus,
    NodeSummary,
    VersionCount,
)
from edgefleet_api.rollout_status import RolloutStatus
from edgefleet_api.sla import SlaWindow
from edgefleet_operator import manifests
from edgefleet_operator.fleet_read import ServiceRead
from edgefleet_operator.fleet_types import ServicePlacement

__all__ = ["MAX_NODES_IN_STATUS", "RolloutView", "aggregate_sla", "service_status", "serving_previous"]


@dataclass(frozen=True, slots=True)
class RolloutView:
    """What the service's rollout decided, as its status shows it."""

    node_versions: Mapping[str, str]
    """node -> the version label it should serve."""
    node_models: Mapping[str, Sequence[tuple[str, str, str]]]
    """node -> the (model, version, digest) it must hold (a canary node holds the new revision,
    others the stable one); a node missing here holds the spec's models."""
    degraded: tuple[str, str] | None = None
    """A failed rollout's (reason, message) for the Degraded condition."""
    status: RolloutStatus | None = None
    """status.rollout, carried as is."""


def model_ready_on(status: EdgeNodeStatus, service: str, model: str, version: str, digest: str) -> bool:
    """The node reports the model version Ready, with the digest (or none: an agent that does not
    report digests is taken at its word)."""
    return any(
        m.service == service
        and m.model == model
        and m.version == version
        and m.state is ModelState.READY
        and (m.digest or digest) == digest
        for m in status.models
    )


def failed_models(status: EdgeNodeStatus, service: str) -> list[str]:
    return [
        f"{m.model}:{m.version}: {m.message or 'failed'}"
        for m in status.models
        if m.service == service and m.state is ModelState.FAILED
    ]


def serving_previous(
    status: EdgeNodeStatus, service: str, wanted: Sequence[tuple[str, str, str]]
) -> list[str]:
    """What a node keeps serving because it cannot prepare its target: for each wanted model
    version reported Failed, the versions of that model no longer wanted that it still reports
    Ready (make before break: the agent keeps them until a target is ready)."""
    want = {(name, version) for name, version, _ in wanted}
    out = []
    for m in status.models:
        if m.service != service or m.state is not ModelState.FAILED or (m.model, m.version) not in want:
            continue
        old = sorted(
            f"{o.model}:{o.version}"
            for o in status.models
            if o.service == service
            and o.model == m.model
            and o.state is ModelState.READY
            and (o.model, o.version) not in want
        )
        if old:
            why = m.message or "failed"
            out.append(f"cannot prepare {m.model}:{m.version} ({why}); still serving {', '.join(old)}")
    return out


def aggregate_sla(windows: Sequence[SlaWindow]) -> SlaWindow:
    """The service's window over its nodes' (see the module docstring); empty for none."""
    if not windows:
        return SlaWindow()
    requests = sum(w.requests or 0 for w in windows)
    errors = sum((w.error_rate or 0.0) * (w.requests or 0) for w in windows)

    def worst(values: Sequence[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return max(present) if present else None

    return SlaWindow(
        p50_latency_s=worst([w.p50_latency_s for w in windows]),
        p95_latency_s=worst([w.p95_latency_s for w in windows]),
        p99_latency_s=worst([w.p99_latency_s for w in windows]),
        throughput_rps=sum(w.throughput_rps or 0.0 for w in windows),
        error_rate=errors / requests if requests else None,
        requests=requests,
    )


def service_status(
    service: ServiceRead,
    placement: ServicePlacement | None,
    edge_node_status: Mapping[str, EdgeNodeStatus],
    now: str,
    rollout: RolloutView | None = None,
) -> InferenceServiceStatus:
    """The whole status of one InferenceService (status.rollout as `rollout` carries it).

    `edge_node_status`: node name -> EdgeNode status, for the nodes holding it (their endpoints
    become the status's endpoints). `now`: the RFC 3339 time a condition that changes gets as its
    lastTransitionTime; one that holds keeps its own. `rollout`: by default every node serves the
    spec's models.
    """
    key = service.key
    generation = int(service.meta.get("generation", 1))
    previous = conditions_from_obj(service.status_obj.get("conditions"))
    node_versions = rollout.node_versions if rollout else {}
    node_models = rollout.node_models if rollout else {}
    nodes = list(placement.nodes) if placement else []
    target = placement.target if placement else 0
    models = service.spec.models
    spec_version = ",".join(m.version for m in models)
    spec_models = [(m.name, m.version, m.artifact.digest) for m in models]

    ready_nodes: list[str] = []
    per_node: list[NodeSummary] = []
    failures: list[str] = []
    fallbacks: list[str] = []
    """Nodes that cannot prepare their target and keep serving an older version."""
    windows: list[SlaWindow] = []
    versions: Counter[str] = Counter()
    ready_versions: Counter[str] = Counter()
    for node in nodes:
        st = edge_node_status.get(node) or EdgeNodeStatus()
        version = node_versions.get(node, spec_version)
        versions[version] += 1
        wanted = node_models.get(node) or spec_models
        ready = all(model_ready_on(st, key, name, v, digest) for name, v, digest in wanted)
        if ready:
            ready_nodes.append(node)
            ready_versions[version] += 1
        held = serving_previous(st, key, wanted)
        fallbacks += [f"{node}: {h}" for h in held]
        if not held:
            failures += [f"{node}: {f}" for f in failed_models(st, key)]
        node_sla = [m.sla for m in st.models_of(key) if m.sla is not None and not m.sla.empty]
        windows += node_sla
        p95s = [w.p95_latency_s for w in node_sla if w.p95_latency_s is not None]
        gpu = st.gpu
        per_node.append(
            NodeSummary(
                node=node,
                version=version,
                ready=ready,
                throttled=bool(gpu is not None and gpu.throttled),
                p95_latency_s=max(p95s) if p95s else None,
                temperature_c=gpu.temperature_c if gpu is not None else None,
            )
        )

    violated = [w for w in windows if w.met is False]
    message = placement.message if placement else "not placed yet"
    all_ready = target > 0 and len(ready_nodes) >= target
    if all_ready:
        ready_reason, ready_msg = "AllNodesReady", f"{len(ready_nodes)}/{target} nodes serve every model"
    elif target == 0:
        ready_reason, ready_msg = "NoNodesRequested", "the service asks for 0 nodes"
    else:
        ready_reason = "NodesNotReady"
        ready_msg = f"{len(ready_nodes)}/{target} nodes ready" + (f"; {message}" if message else "")
    degraded_why = [rollout.degraded] if rollout and rollout.degraded else []
    if message:
        degraded_why.append(("Unplaceable", message))
    if fallbacks:
        listed = "; ".join(fallbacks[:5]) + (f"; and {len(fallbacks) - 5} more" if len(fallbacks) > 5 else "")
        degraded_why.append(("ServingPreviousVersion", listed))
    if failures:
        degraded_why.append(("ModelFailed", "; ".join(failures[:5])))
    if violated:
        degraded_why.append(("SLAViolated", f"{len(violated)} node window(s) missed the SLA"))
    progressing = bool(nodes) and len(ready_nodes) < len(nodes) and not failures and not fallbacks
    loading = f"{len(nodes) - len(ready_nodes)} node(s) loading" if progressing else "no change in progress"
    endpoints = {n: st.endpoint for n, st in edge_node_status.items() if st.endpoint}

    return InferenceServiceStatus(
        observed_generation=generation,
        conditions=(
            next_condition(
                "Ready", all_ready or target == 0, ready_reason, ready_msg, generation, previous, now
            ),
            next_condition(
                "Progressing",
                progressing,
                "Loading" if progressing else "Stable",
                loading,
                generation,
                previous,
                now,
            ),
            next_condition(
                "Degraded",
                bool(degraded_why),
                degraded_why[0][0] if degraded_why else "Healthy",
                "; ".join(m for _, m in degraded_why) if degraded_why else "",
                generation,
                previous,
                now,
            ),
        ),
        serving_version=ready_versions.most_common(1)[0][0] if ready_versions else spec_version,
        desired_nodes=target,
        ready_nodes=len(ready_nodes),
        versions=tuple(VersionCount(v, n, ready_versions[v]) for v, n in sorted(versions.items())),
        sla=aggregate_sla(windows),
        nodes=tuple(per_node[:MAX_NODES_IN_STATUS]),
        rollout=rollout.status if rollout else None,
        url=manifests.service_url(service.obj),
        endpoints=tuple(sorted(endpoints[n] for n in ready_nodes if n in endpoints)),
        message=message,
    )
