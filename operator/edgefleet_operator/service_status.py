"""InferenceService status from the placement and the agents' EdgeNode statuses. Pure.

Conditions follow the Kubernetes API conventions: Ready, Progressing and Degraded,
each with observedGeneration; lastTransitionTime changes only when the status does.

Aggregated SLA across nodes: throughput and requests add up; error rate is total
errors over total requests; p50/p95/p99 are the worst node's (a fleet-wide
percentile cannot be recovered from per-node percentiles, and the worst node is
what an SLA is broken by).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet_operator import manifests
from edgefleet_operator.fleet_types import ServicePlacement

Obj = Mapping[str, Any]
MAX_NODES_IN_STATUS = 100


def rfc3339(epoch_s: float) -> str:
    """Epoch seconds as the API's RFC 3339 timestamp, in whole seconds (UTC)."""
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    status: Mapping[str, Any] | None = None
    """status.rollout, carried as is."""


def condition(
    type_: str, ok: bool, reason: str, message: str, generation: int, previous: Sequence[Obj], now: str
) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old.get("lastTransitionTime", now) if old and old.get("status") == status else now
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def model_ready_on(node_status: Obj, service: str, model: str, version: str, digest: str) -> bool:
    for m in node_status.get("models") or []:
        if (
            m.get("service") == service
            and m.get("model") == model
            and str(m.get("version")) == version
            and m.get("state") == "Ready"
            and m.get("digest", digest) == digest
        ):
            return True
    return False


def failed_models(node_status: Obj, service: str) -> list[str]:
    return [
        f"{m.get('model')}:{m.get('version')}: {m.get('message', 'failed')}"
        for m in node_status.get("models") or []
        if m.get("service") == service and m.get("state") == "Failed"
    ]


def aggregate_sla(windows: Sequence[Obj]) -> dict[str, Any]:
    if not windows:
        return {}
    requests = sum(int(w.get("requests") or 0) for w in windows)
    out: dict[str, Any] = {
        "requests": requests,
        "throughputRps": round(sum(float(w.get("throughputRps") or 0.0) for w in windows), 3),
    }
    if requests:
        errors = sum(float(w.get("errorRate") or 0.0) * int(w.get("requests") or 0) for w in windows)
        out["errorRate"] = round(errors / requests, 6)
    for p in ("p50LatencyMs", "p95LatencyMs", "p99LatencyMs"):
        values = [float(w[p]) for w in windows if w.get(p) is not None]
        if values:
            out[p] = round(max(values), 3)
    return out


def service_status(
    isvc: Obj,
    placement: ServicePlacement | None,
    edge_node_status: Mapping[str, Obj],
    now: str,
    rollout: RolloutView | None = None,
) -> dict[str, Any]:
    """The whole status of one InferenceService (status.rollout as `rollout` carries it).

    `edge_node_status`: node name -> EdgeNode.status, for the nodes holding it (their `endpoint`s
    become the status's endpoints). `now`: the RFC 3339 time a condition that changes gets as its
    lastTransitionTime; one that holds keeps its own. `rollout`: by default every node serves the
    spec's models.
    """
    meta, spec = isvc["metadata"], isvc["spec"]
    generation = int(meta.get("generation", 1))
    previous = (isvc.get("status") or {}).get("conditions") or []
    service = f"{meta['namespace']}/{meta['name']}"
    endpoints = {n: st["endpoint"] for n, st in edge_node_status.items() if st.get("endpoint")}
    node_versions = rollout.node_versions if rollout else {}
    node_models = rollout.node_models if rollout else {}
    nodes = list(placement.nodes) if placement else []
    target = placement.target if placement else 0
    models = spec["models"]
    spec_version = ",".join(str(m["version"]) for m in models)

    ready_nodes, per_node, failures, windows = [], [], [], []
    versions: Counter[str] = Counter()
    ready_versions: Counter[str] = Counter()
    for node in nodes:
        st = edge_node_status.get(node) or {}
        version = node_versions.get(node, spec_version)
        versions[version] += 1
        wanted = node_models.get(node) or [
            (m["name"], str(m["version"]), m["artifact"]["digest"]) for m in models
        ]
        ready = all(model_ready_on(st, service, name, version, digest) for name, version, digest in wanted)
        if ready:
            ready_nodes.append(node)
            ready_versions[version] += 1
        failures += [f"{node}: {f}" for f in failed_models(st, service)]
        node_sla = [m.get("sla") or {} for m in st.get("models") or [] if m.get("service") == service]
        windows += [w for w in node_sla if w]
        gpu = st.get("gpu") or {}
        p95s = [w["p95LatencyMs"] for w in node_sla if w.get("p95LatencyMs") is not None]
        entry: dict[str, Any] = {
            "node": node,
            "version": version,
            "ready": ready,
            "throttled": bool(gpu.get("throttled", False)),
        }
        if p95s:
            entry["p95LatencyMs"] = max(p95s)
        if gpu.get("temperatureC") is not None:
            entry["temperatureC"] = gpu["temperatureC"]
        per_node.append(entry)

    sla = aggregate_sla(windows)
    violated = [w for w in windows if w.get("met") is False]
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
    if failures:
        degraded_why.append(("ModelFailed", "; ".join(failures[:5])))
    if violated:
        degraded_why.append(("SLAViolated", f"{len(violated)} node window(s) missed the SLA"))
    progressing = bool(nodes) and len(ready_nodes) < len(nodes) and not failures

    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": [
            condition("Ready", all_ready or target == 0, ready_reason, ready_msg, generation, previous, now),
            condition(
                "Progressing",
                progressing,
                "Loading" if progressing else "Stable",
                f"{len(nodes) - len(ready_nodes)} node(s) loading"
                if progressing
                else "no change in progress",
                generation,
                previous,
                now,
            ),
            condition(
                "Degraded",
                bool(degraded_why),
                degraded_why[0][0] if degraded_why else "Healthy",
                "; ".join(m for _, m in degraded_why) if degraded_why else "",
                generation,
                previous,
                now,
            ),
        ],
        "servingVersion": (ready_versions.most_common(1)[0][0] if ready_versions else spec_version),
        "desiredNodes": target,
        "readyNodes": len(ready_nodes),
        "nodesSummary": f"{len(ready_nodes)}/{target}",
        "versions": [
            {"version": v, "desiredNodes": n, "readyNodes": ready_versions[v]}
            for v, n in sorted(versions.items())
        ],
        "sla": sla,
        "nodes": per_node[:MAX_NODES_IN_STATUS],
        "url": manifests.service_url(isvc),
        "endpoints": sorted(endpoints[n] for n in ready_nodes if n in endpoints),
        "message": message,
    }
    if rollout and rollout.status is not None:
        status["rollout"] = dict(rollout.status)
    return status


def conditions_equal(a: Sequence[Obj], b: Sequence[Obj]) -> bool:
    """Equal apart from lastTransitionTime (which `condition` carries over when unchanged)."""

    def essence(cs: Sequence[Obj]) -> list[tuple[Any, ...]]:
        fields = ("type", "status", "reason", "message", "observedGeneration")
        return sorted(tuple(c.get(f) for f in fields) for c in cs)

    return essence(a) == essence(b)
