"""A fleet pass's decisions as typed writes. Pure: no API calls, no clock.

Each function takes what the pass read (the API's JSON), what it decided (placement) and the pass's
clock value, and returns frozen write plans; `fleet_writer` applies them in the reconciler's order:

1. `EdgeNodeSync`: an EdgeNode for every fleet Node; ours of Nodes that left are deleted.
2. `RolloutWrite` per service: its status.rollout BEFORE any EdgeNode spec built from it (a crash in
   between leaves no node on a revision status does not record), except a first deployment's and a
   step that changes no node's entries: those go out with the service's status (`RolloutWrite.folded`).
3. `EdgeNodeSpecWrite` per node whose spec changes.
4. `FinalizerWrite` per deleted service no EdgeNode spec holds any more.
5. `PodWrite` per node: an agent Pod where there is work, none where there is none.
6. `Bookkeeping` per service: events, status, finalizer (after the status), Service, EndpointSlice.

Every write is derived from what was read, so applying a plan twice (a pass interrupted and redone)
writes nothing twice: names are deterministic and a create that finds its object is a no-op.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet_api import names, wire
from edgefleet_api.conditions import conditions_equal, conditions_from_obj
from edgefleet_api.inference_service import InferenceServiceSpec, service_key
from edgefleet_api.patch import merge_patch
from edgefleet_operator import fleet_state, manifests, rollout, service_status
from edgefleet_operator.fleet_read import FleetRead, ServiceRead
from edgefleet_operator.fleet_types import Health, PlacedModel, PlacementEvent, ServicePlacement
from edgefleet_operator.settings import AgentPodSettings

Obj = Mapping[str, Any]
WARNING_PLACEMENTS = ("FailedPlacement", "Evicted")
"""Placement event reasons posted as Warning events (the others are Normal)."""


@dataclass(frozen=True, slots=True)
class EventWrite:
    """A Kubernetes Event on an InferenceService; best effort (a terminating namespace refuses it)."""

    namespace: str
    name: str
    uid: str
    reason: str
    message: str
    warning: bool
    time: str
    """RFC 3339: the pass's clock."""

    def body(self) -> dict[str, Any]:
        return {
            "metadata": {"generateName": f"{self.name}.", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": names.API_VERSION,
                "kind": names.INFERENCE_SERVICE_KIND,
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
            },
            "reason": self.reason,
            "message": self.message[:1024],
            "type": "Warning" if self.warning else "Normal",
            "source": {"component": names.MANAGED_BY},
            "firstTimestamp": self.time,
            "lastTimestamp": self.time,
            "count": 1,
        }


def event(isvc: Obj, reason: str, message: str, warning: bool, time: str) -> EventWrite:
    meta = isvc["metadata"]
    return EventWrite(meta["namespace"], meta["name"], meta["uid"], reason, message, warning, time)


@dataclass(frozen=True, slots=True)
class EdgeNodeSync:
    """EdgeNodes to match the fleet's Nodes: one per Node, none for a Node that left."""

    create: tuple[Obj, ...]
    """New EdgeNodes, for fleet Nodes that have none (named after them)."""
    delete: tuple[str, ...]
    """Ours, whose Node left the fleet."""
    ignore: tuple[str, ...]
    """Someone else's, of no fleet Node: neither ours to delete nor to place on."""


def edge_node_sync(nodes: Sequence[Obj], edge_nodes: Mapping[str, Obj]) -> EdgeNodeSync:
    fleet = {n["metadata"]["name"] for n in nodes}
    gone = sorted(set(edge_nodes) - fleet)
    ours = {
        n
        for n in gone
        if (edge_nodes[n]["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by")
        == names.MANAGED_BY
    }
    return EdgeNodeSync(
        tuple(manifests.edge_node(n) for n in nodes if n["metadata"]["name"] not in edge_nodes),
        tuple(n for n in gone if n in ours),
        tuple(n for n in gone if n not in ours),
    )


@dataclass(frozen=True, slots=True)
class RolloutWrite:
    """One service's rollout step and its writes, in this order: a warning for an unknown action,
    status.rollout, the action annotation cleared, the step's events."""

    service: str
    namespace: str
    name: str
    decision: rollout.Decision | None
    """None: the service's status.rollout cannot be followed (`held` says why); it holds this pass."""
    held: str = ""
    action_warning: EventWrite | None = None
    status_patch: Obj | None = None
    """The merge patch of status.rollout; None when it is unchanged, or when it goes out with the
    service's status, after the specs (`folded`)."""
    clear_action: bool = False
    events: tuple[EventWrite, ...] = ()
    folded: tuple[EventWrite, ...] | None = None
    """Set when the step's status.rollout goes out in the service's one status write (`bookkeeping`)
    rather than before the specs, with these events (the step's, posted with the write that records
    them): a first deployment, and a step that changes no node's entries of the service and applies
    no user action. Nothing on a node depends on it then, so a pass that defers the bookkeeping
    loses nothing: the next one recomputes the same step from the same status.rollout."""
    action: str | None = None
    """The rollout-action annotation's value as read: it is removed only if it still holds this."""
    resource_version: str | None = None
    """The service's resourceVersion as read (the annotation removal's condition when no status
    write precedes it)."""

    @property
    def writes_nothing(self) -> bool:
        """A step that stands and sends nothing (most services, most passes)."""
        return (
            self.decision is not None
            and self.action_warning is None
            and self.status_patch is None
            and not self.clear_action
            and not self.events
        )


def rollout_write(
    service: ServiceRead,
    nodes: Sequence[str],
    read: FleetRead,
    node_labels: Mapping[str, Mapping[str, str]],
    now: float,
    memo: rollout.ObservationMemo | None = None,
) -> RolloutWrite:
    """The service's rollout step over the `nodes` placement chose for it, at `now` (epoch seconds);
    `memo` keeps the nodes' observations from pass to pass (None: each made afresh).

    A first deployment (no status.rollout yet, no stable version) writes no status.rollout here: its
    targets follow from the spec alone, and its revision replaces any earlier try, so the pass after
    a crash recomputes them."""
    key, meta, isvc = service.key, service.meta, service.obj
    stamp = wire.rfc3339(now)
    annotation = (meta.get("annotations") or {}).get(names.ANNOTATION_ROLLOUT_ACTION)
    warning = None
    try:
        action = rollout.parse_action(annotation)
    except ValueError as e:
        action, warning = None, event(isvc, "InvalidRolloutAction", str(e), True, stamp)
    previous = service.status_obj.get("rollout")
    memo = memo or rollout.ObservationMemo()
    try:
        observations = {
            n: memo.observe(
                key,
                n,
                read.edge_node(n).status,
                node_labels.get(n, {}).get(names.LABEL_DEVICE_CLASS, ""),
                read.set_at(n),
                fleet_state.lease_renewed_s(read.leases.get(names.agent_name(n))),
            )
            for n in nodes
        }
        wanted = rollout.parse_spec(service.spec)
        sites = {n: site for n in nodes if (site := node_labels.get(n, {}).get(wanted.site_label))}
        decision = rollout.step(
            wanted, service.rollout(), nodes, observations, now, action, key,
            spec_age_s=service.spec_age_s, sites=sites,
        )  # fmt: skip
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        # A status.rollout this operator cannot follow (edited by hand, or from an older version).
        return RolloutWrite(
            key, meta["namespace"], meta["name"], None, f"{type(e).__name__}: {e}", action_warning=warning
        )
    written = decision.status.to_obj()
    events = tuple(event(isvc, e.reason, e.message, e.warning, stamp) for e in decision.events)
    patch, folded = None, None
    if previous is None and decision.status.stable is None:
        folded = events  # a first deployment
    elif written != previous:
        if annotation is None and _nodes_hold_as_decided(key, decision, read):
            folded = events
        else:
            patch = {"status": {"rollout": merge_patch(previous or {}, written)}}
    return RolloutWrite(
        key,
        meta["namespace"],
        meta["name"],
        decision,
        action_warning=warning,
        status_patch=patch,
        clear_action=annotation is not None,
        events=() if folded is not None else events,
        folded=folded,
        action=annotation,
        resource_version=meta.get("resourceVersion"),
    )


def _nodes_hold_as_decided(service: str, decision: rollout.Decision, read: FleetRead) -> bool:
    """Whether every node of the step's holds the service's model versions, at the weights, that
    the step gives it (read from its EdgeNode spec as the pass read it)."""
    for node, targets in decision.targets.items():
        if node not in read.edge_nodes:
            return False
        held = {
            (m.model, m.version, m.artifact.digest): m.traffic_weight
            for m in read.edge_node(node).spec.models
            if m.service == service
        }
        wanted = (
            {(m.name, m.version, m.artifact.digest): w for m, w in decision.placed(node)} if targets else {}
        )
        if held != wanted:
            return False
    return True


@dataclass(frozen=True, slots=True)
class EdgeNodeSpecWrite:
    """A merge patch of one EdgeNode: its models and budget, and the work-since annotation;
    conditional on the resourceVersion read (`fleet_writer`), planned from `basis`."""

    node: str
    patch: Obj
    resource_version: str | None = None
    """The EdgeNode's resourceVersion as the pass read it."""
    basis: Obj | None = None
    """What the patch was planned from: the spec and work-since annotation as read
    (`spec_basis`)."""
    serving: bool = True
    """Whether it changes what the node serves (its models, their versions or weights). False: only
    what it prefetches, its artifact peers or its memory budget; those are written after every
    serving change of the pass (`fleet_writer`), so a rollback's canaries are back on stable
    before the next wave's prefetch is taken back."""


def spec_basis(obj: Obj) -> Obj:
    """What of an EdgeNode a spec write is planned from: its spec and the work-since annotation
    (status, which its agent writes, is not)."""
    annotations = obj.get("metadata", {}).get("annotations") or {}
    return {"spec": obj.get("spec") or {}, "workSince": annotations.get(names.ANNOTATION_WORK_SINCE)}


def same_spec_basis(obj: Obj, write: EdgeNodeSpecWrite) -> bool:
    """Whether `obj` (the EdgeNode now) still has what `write` was planned from: if so, a conflict
    on its resourceVersion was a status write, and the patch is still right."""
    return write.basis is not None and spec_basis(obj) == write.basis


def edge_node_spec_writes(
    by_node: Mapping[str, Sequence[PlacedModel]],
    rollouts: Mapping[str, rollout.Decision],
    specs: Mapping[str, InferenceServiceSpec],
    read: FleetRead,
    capacity: Mapping[str, int],
    now: str,
    peers: Mapping[str, tuple[str, ...]] | None = None,
) -> tuple[EdgeNodeSpecWrite, ...]:
    """Patches of the EdgeNodes whose spec differs from the placement, by node name.

    `rollouts`: service -> its rollout decision (a service without one keeps its entries as they
    are); `specs`: service -> its spec; `capacity`: node -> its memory budget; `now`: RFC 3339, when
    a node's work starts (the health tracker's allowance for its agent to come up); `peers`: node ->
    its artifact peers (`peers.artifact_peers`; None: left as they are). A spec entry the contract
    cannot read is dropped by the rewrite."""
    out = []
    for node, placed in sorted(by_node.items()):
        en = read.edge_node(node)
        models = fleet_state.edge_node_models(node, placed, rollouts, specs, en.spec.models)
        prefetch = fleet_state.edge_node_prefetch(node, placed, rollouts, specs, models)
        node_peers = en.spec.artifact_peers if peers is None else peers.get(node, ())
        unchanged = (
            en.spec.models == models
            and not en.spec.invalid
            and en.spec.artifact_peers == node_peers
            and en.spec.prefetch == prefetch
        )
        if unchanged and en.spec.memory_budget_bytes == capacity[node]:
            continue
        patch: dict[str, Any] = {
            "spec": {"models": [m.to_obj() for m in models], "memoryBudgetBytes": capacity[node]}
        }
        if prefetch or en.spec.prefetch:
            patch["spec"]["prefetch"] = [m.to_obj() for m in prefetch]
        if peers is not None:
            patch["spec"]["artifactPeers"] = list(node_peers)
        if models and names.ANNOTATION_WORK_SINCE not in en.annotations:
            patch["metadata"] = {"annotations": {names.ANNOTATION_WORK_SINCE: now}}
        elif not models and names.ANNOTATION_WORK_SINCE in en.annotations:
            patch["metadata"] = {"annotations": {names.ANNOTATION_WORK_SINCE: None}}
        raw = read.edge_nodes[node]
        serving = en.spec.models != models or bool(en.spec.invalid)
        out.append(
            EdgeNodeSpecWrite(node, patch, raw["metadata"].get("resourceVersion"), spec_basis(raw), serving)
        )
    return tuple(out)


@dataclass(frozen=True, slots=True)
class FinalizerWrite:
    """A service's finalizer list, conditional on `resource_version` so that another controller's
    finalizer added meanwhile is never dropped (a conflict is left to the next pass)."""

    service: str
    namespace: str
    name: str
    finalizers: tuple[str, ...]
    resource_version: str


def finalizer_write(isvc: Obj, finalizers: Iterable[str]) -> FinalizerWrite:
    meta = isvc["metadata"]
    return FinalizerWrite(
        service_key(isvc),
        meta["namespace"],
        meta["name"],
        tuple(finalizers),
        meta["resourceVersion"],
    )


def finalizer_releases(deleting: Iterable[Obj], read: FleetRead) -> tuple[FinalizerWrite, ...]:
    """Our finalizer dropped from each deleted service that no EdgeNode spec holds any more (given the
    specs as this pass wrote them): `kubectl delete` returns once its models are unplaced everywhere."""
    held = set()
    for name in read.edge_nodes:
        spec = read.edge_node(name).spec
        held |= {m.service for m in spec.models} | {m.service for m in spec.invalid}
    out = []
    for isvc in deleting:
        finalizers = isvc["metadata"].get("finalizers") or []
        if names.FINALIZER in finalizers and service_key(isvc) not in held:
            out.append(finalizer_write(isvc, (f for f in finalizers if f != names.FINALIZER)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class HealthWrite:
    """A node's judged health published on its EdgeNode (`names.ANNOTATION_HEALTH`), by the holder of
    its site's shard."""

    node: str
    health: str
    shard: str


def health_writes(
    judged: Mapping[str, Health], edge_nodes: Mapping[str, Obj], shard_of: Mapping[str, str]
) -> tuple[HealthWrite, ...]:
    """The judged nodes whose EdgeNode does not carry their health yet (nodes without an EdgeNode
    are skipped: the pass that creates it comes first)."""
    out = []
    for node, health in sorted(judged.items()):
        en = edge_nodes.get(node)
        if en is not None and fleet_state.published_health(en) is not health:
            out.append(HealthWrite(node, health.value, shard_of[node]))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PodWrite:
    """One node's agent Pod created or deleted."""

    node: str
    namespace: str
    name: str
    create: Obj | None
    """The Pod to create; None: delete it (its node has no work, or it ended)."""


def nodes_with_work(by_node: Mapping[str, Sequence[PlacedModel]]) -> int:
    return sum(1 for placed in by_node.values() if placed)


def external_agents(nodes: Iterable[Obj], agent: AgentPodSettings) -> frozenset[str]:
    """The nodes whose agent runs outside the operator (a systemd unit or a static Pod): every node
    when the chart says agents are external, else those labelled `edgefleet.io/agent-managed-by`
    with anything but 'operator'."""
    out = set()
    for node in nodes:
        labels = node["metadata"].get("labels") or {}
        if agent.external or labels.get(names.LABEL_AGENT_MANAGED_BY, "operator") != "operator":
            out.add(node["metadata"]["name"])
    return frozenset(out)


def pod_writes(
    by_node: Mapping[str, Sequence[PlacedModel]],
    pods: Mapping[str, Obj],
    edge_nodes: Mapping[str, Obj],
    agent: AgentPodSettings,
    external: Collection[str] = frozenset(),
) -> tuple[PodWrite, ...]:
    """An agent Pod on every node with work, none on nodes without, nor on `external` nodes (their
    agent runs outside: a Pod there would be a second agent for the same GPU and EdgeNode); failed
    Pods are replaced (deleted here, created by the next pass)."""
    out = []
    for node, placed in sorted(by_node.items()):
        name = names.agent_name(node)
        pod = pods.get(name)
        phase = (pod or {}).get("status", {}).get("phase")
        if node in external:
            placed = ()
        if pod and (not placed or phase in ("Failed", "Succeeded")):
            out.append(PodWrite(node, agent.namespace, name, None))
        elif placed and not pod:
            out.append(PodWrite(node, agent.namespace, name, manifests.agent_pod(edge_nodes[node], agent)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SliceWrite:
    """The service's EndpointSlice: created when the pass's list lacked it, else its endpoints patched
    when they differ from the agents serving it."""

    body: Obj
    create: bool
    endpoints: Sequence[Obj] | None = None
    """The endpoints to patch in; None: the listed slice has them."""
    ports: Sequence[Obj] | None = None
    """The ports to patch in (the agents' gRPC port came or went); None: the listed slice has them."""

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])


def _port_keys(ports: Sequence[Obj]) -> list[tuple[Any, ...]]:
    return [
        (p.get("name"), p.get("port"), p.get("protocol", "TCP"), p.get("appProtocol"), p.get("targetPort"))
        for p in ports
    ]


def ports_patch(current: Sequence[Obj], want: Sequence[Obj]) -> Sequence[Obj] | None:
    """`want` when the listed object's ports differ from it (name, port, protocol, appProtocol,
    targetPort), else None."""
    return None if _port_keys(current) == _port_keys(want) else want


def endpoints_patch(current: Obj, body: Obj) -> Sequence[Obj] | None:
    """`body`'s endpoints when `current` (the slice on the server) has others, else None."""
    have = current.get("endpoints") or []
    want: Sequence[Obj] = body["endpoints"]
    if [(e["addresses"], e.get("nodeName"), e.get("conditions", {}).get("ready")) for e in have] == [
        (e["addresses"], e["nodeName"], e["conditions"]["ready"]) for e in want
    ]:
        return None
    return want


MAX_ENDPOINTS_PER_SLICE = 100
"""Endpoints per EndpointSlice, the endpointslice controller's default (the API refuses more than
1,000 in one): a service on 10,000 nodes has 100 slices, and one agent's readiness changing
rewrites one of them."""


def slice_name(service_name: str, index: int) -> str:
    """The name of a Service's `index`th EndpointSlice: the Service's, then `<name>.1`, `<name>.2`...
    (a Service's name has no dot, so no other Service's slice can take one of these)."""
    return service_name if index == 0 else f"{service_name}.{index}"


def slice_writes(
    isvc: Obj,
    agents: Sequence[tuple[str, str, bool]],
    listed: Mapping[tuple[str, str], Obj],
    port: int,
    grpc_port: int = 0,
    limit: int = MAX_ENDPOINTS_PER_SLICE,
) -> tuple[tuple[SliceWrite, ...], tuple[str, ...]]:
    """The service's EndpointSlices for `agents` (node, pod IP, ready), at most `limit` endpoints
    each, against the `listed` ones (by namespace and name): the writes, creates first, and the names
    of the slices to delete (the last first, so that those left are always numbered from 0 without a
    gap), so an agent moving between slices is listed in its new one before it leaves the old. An
    agent stays in the slice that lists it; new ones fill the first slices with room; the agents of
    slices past the number needed move to the others."""
    meta = isvc["metadata"]
    ns, base = meta["namespace"], manifests.service_name(meta["name"])
    existing: list[Obj] = []
    while (found := listed.get((ns, slice_name(base, len(existing))))) is not None:
        existing.append(found)
    count = max(1, -(-len(agents) // limit))
    by_node = {a[0]: a for a in agents}
    groups: list[list[tuple[str, str, bool]]] = [[] for _ in range(count)]
    placed: set[str] = set()
    for group, current in zip(groups, existing, strict=False):
        for e in current.get("endpoints") or []:
            node = e.get("nodeName")
            if node in by_node and node not in placed and len(group) < limit:
                group.append(by_node[node])
                placed.add(node)
    k = 0
    for node in sorted(by_node.keys() - placed):
        while len(groups[k]) >= limit:
            k += 1
        groups[k].append(by_node[node])
    writes = []
    for index, group in enumerate(groups):
        body = manifests.endpoint_slice(isvc, group, port, grpc_port, slice_name(base, index))
        if index >= len(existing):
            writes.append(SliceWrite(body, create=True))
            continue
        endpoints = endpoints_patch(existing[index], body)
        ports = ports_patch(existing[index].get("ports") or [], body["ports"])
        if endpoints is not None or ports is not None:
            writes.append(SliceWrite(body, create=False, endpoints=endpoints, ports=ports))
    deletes = tuple(slice_name(base, index) for index in range(len(existing) - 1, count - 1, -1))
    # make before break: the new slices first (the agents they take leave an old one only after)
    return tuple(sorted(writes, key=lambda w: not w.create)), deletes


@dataclass(frozen=True, slots=True)
class Bookkeeping:
    """One service's bookkeeping, written in this order: events, status, finalizer, Service,
    EndpointSlice. The finalizer goes after the status: its watch event then carries the current
    observedGeneration, which `fleet_cache.serving_change` does not count as urgent work."""

    service: str
    namespace: str
    name: str
    placement_events: tuple[PlacementEvent, ...]
    """This pass's placement events for the service (with those carried from passes that deferred
    its bookkeeping): carried to the next pass if this one defers it too."""
    events: tuple[EventWrite, ...]
    status_patch: Obj | None
    """The merge patch of the status; None when it is unchanged (lastTransitionTimes aside)."""
    finalizer: FinalizerWrite | None
    """Our finalizer added; its resourceVersion is the one read, or the status write's if one went."""
    create_service: Obj | None
    """The Service to create, when the pass's list lacked it."""
    endpoint_slices: tuple[SliceWrite, ...]
    """The EndpointSlices to create or patch (`slice_writes`)."""
    service_ports: Sequence[Obj] | None = None
    """The listed Service's ports to replace (the agents' gRPC port came or went); None: as listed."""
    slice_deletes: tuple[str, ...] = ()
    """EndpointSlices of the service no longer needed, by name, the last first."""

    @property
    def writes_nothing(self) -> bool:
        return (
            not self.events
            and self.status_patch is None
            and self.finalizer is None
            and self.create_service is None
            and not self.endpoint_slices
            and not self.slice_deletes
        )


def bookkeeping(
    service: ServiceRead,
    placement: ServicePlacement | None,
    ro: RolloutWrite,
    placement_events: Sequence[PlacementEvent],
    read: FleetRead,
    port: int,
    now: str,
    grpc_port: int = 0,
) -> Bookkeeping:
    """The service's writes after its placement and rollout step `ro` (which has a decision), from
    the EdgeNodes as this pass wrote their specs, and the agent Pods, Services and EndpointSlices it
    read; `port`, `grpc_port`: the agents' (0: no gRPC); `now`: RFC 3339, for its events and the
    conditions that change."""
    assert ro.decision is not None, "a held rollout has no bookkeeping"
    decision, meta, isvc = ro.decision, service.meta, service.obj
    holding = placement.nodes if placement else ()
    statuses = {n: read.edge_node(n).status for n in holding}
    view = service_status.RolloutView(
        decision.node_versions(),
        {n: [(m.name, m.version, m.artifact.digest) for m, _ in decision.placed(n)] for n in holding},
        decision.degraded,
        decision.status,
    )
    status = service_status.service_status(service, placement, statuses, now, view)
    new = status.to_obj()
    old = dict(service.status_obj)
    if ro.folded is None:
        old["rollout"] = new["rollout"]  # written by the rollout step already, or unchanged
    events = tuple(
        event(isvc, e.reason, e.message, e.reason in WARNING_PLACEMENTS, now)
        for e in placement_events
        # said already (the status's message); repeating it every pass is noise
        if not (e.reason == "FailedPlacement" and e.message == old.get("message", ""))
    ) + (ro.folded or ())
    unchanged = all(old.get(k) == v for k, v in new.items() if k != "conditions") and conditions_equal(
        conditions_from_obj(old.get("conditions")), status.conditions
    )
    finalizers = meta.get("finalizers") or []
    ready_on = {n.node for n in status.nodes if n.ready}
    agents = []
    for n in holding:
        ip = (read.pods.get(names.agent_name(n)) or {}).get("status", {}).get("podIP")
        if ip:
            agents.append((n, ip, n in ready_on))
    slices, slice_deletes = slice_writes(isvc, agents, read.slices, port, grpc_port)
    svc_key = (meta["namespace"], manifests.service_name(meta["name"]))
    svc_ports = manifests.service_ports(grpc_port)
    listed_ports = read.service_ports.get(svc_key)
    return Bookkeeping(
        ro.service,
        meta["namespace"],
        meta["name"],
        tuple(placement_events),
        events,
        None if unchanged else {"status": merge_patch(old, new)},
        None if names.FINALIZER in finalizers else finalizer_write(isvc, [*finalizers, names.FINALIZER]),
        None if svc_key in read.kube_services else manifests.service(isvc, grpc_port),
        slices,
        None if listed_ports is None else ports_patch(listed_ports, svc_ports),
        slice_deletes,
    )
