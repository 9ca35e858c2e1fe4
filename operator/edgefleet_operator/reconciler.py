"""The fleet reconcile: read the fleet, place, write what changed.

One pass reads Nodes, EdgeNodes, agent Leases and Pods, and InferenceServices;
runs placement (a pure function; a `Planner` kept between passes re-plans only what
changed nodes reach); then writes only the differences: EdgeNode
specs, agent Pods (created where a node has work, deleted where it has none),
each service's Service and EndpointSlice, its status, and events. Every write is
idempotent and derived from what is read, so a pass interrupted anywhere (an
operator killed mid-way) is completed by the next one with no duplicates:
object names are deterministic and a create that finds the object is a no-op.

Passes run one at a time in a worker thread (the kubernetes client is
synchronous); handlers only ask for a pass (`FleetLoop.request`).

A pass writes the decisions first (rollout steps, EdgeNode specs), then agent Pods,
then each service's bookkeeping (finalizer, status, Service, EndpointSlice, events).
When urgent work arrives meanwhile (a service created, its spec changed, or deleted),
the Pod syncs and bookkeeping not yet started are left to the next pass, which starts
at once: a burst of new services is placed pass after pass without waiting for the
earlier ones' Pods and bookkeeping (their placement events are carried over).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from edgefleet_api import names
from edgefleet_api.patch import merge_patch
from edgefleet_operator import fleet_state, manifests, replanning, rollout, service_status
from edgefleet_operator.fleet_types import Health, PlacementEvent, PlacementResult
from edgefleet_operator.health import HealthTracker
from edgefleet_operator.metrics import OperatorMetrics
from edgefleet_operator.settings import OperatorSettings

log = logging.getLogger(__name__)
Obj = dict[str, Any]
URGENT_DEBOUNCE_S = 0.1
"""The debounce before a pass for urgent work: a burst of new services is then placed pass after pass
as it arrives (each pass leaves the earlier ones' bookkeeping to later), not after a full debounce."""
WRITE_THREADS = 8
"""Writes of one pass in flight at once: a burst of placements is bound by API round trips, not by
our CPU; 8 keeps the API server's default client QPS budget in reach without flooding it."""


@dataclass
class PassReport:
    """What one pass saw and did (for logs, metrics and tests)."""

    nodes: int = 0
    services: int = 0
    unplaced: int = 0
    writes: dict[str, int] = field(default_factory=dict)
    health: dict[str, str] = field(default_factory=dict)
    result: PlacementResult | None = None
    incremental_plan: bool = False
    deferred: int = 0
    """Agent Pod syncs (nodes with work) and bookkeeping (services) this pass left to the next because
    urgent work arrived."""
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def wrote(self, what: str) -> None:
        with self._lock:  # writes run on several threads
            self.writes[what] = self.writes.get(what, 0) + 1

    def defer(self, n: int = 1) -> None:
        with self._lock:
            self.deferred += n


@dataclass
class FleetRead:
    """What one pass reads, one list call each: the fleet's Nodes, EdgeNodes, agent Leases and the
    InferenceServices first; the agent Pods, and the Services and EndpointSlices this operator manages
    (keyed by (namespace, name)), only when the pass gets to the phases that need them."""

    nodes: list[Obj]
    edge_nodes: dict[str, Obj]
    leases: dict[str, Obj]
    services: list[Obj]
    pods: dict[str, Obj] = field(default_factory=dict)
    kube_services: set[tuple[str, str]] = field(default_factory=set)
    slices: dict[tuple[str, str], Obj] = field(default_factory=dict)


def _ns_name(obj: Obj) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def _items(response: Any) -> list[Obj]:
    """The items of a list call made with `_preload_content=False`, as the API's JSON.

    The client's typed models cost more than the rest of a pass together: at 500 nodes, building
    and re-serialising the Node, Pod and Lease models took about 6 s of a 6.5 s pass.
    """
    items: list[Obj] = json.loads(response.data)["items"]
    return items


class FleetReconciler:
    """Reads the fleet and writes the decisions. Synchronous; one pass at a time."""

    def __init__(
        self,
        api_client: Any,
        settings: OperatorSettings,
        metrics: OperatorMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from kubernetes import client

        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        # Typed as Any: the client takes plain dicts (the API's JSON) where its stubs name models.
        self.core: Any = client.CoreV1Api(api_client)
        self.custom: Any = client.CustomObjectsApi(api_client)
        self.coordination: Any = client.CoordinationV1Api(api_client)
        self.discovery: Any = client.DiscoveryV1Api(api_client)
        self.tracker = HealthTracker(settings.fleet)
        # Keeps the last pass's plan: a change in some nodes re-plans only what it reaches.
        self.planner = replanning.Planner()
        self.writers = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="edgefleet-write")
        self.urgent = threading.Event()
        """Set (from any thread) when work on the serving path is waiting: the running pass stops
        starting services' bookkeeping. Cleared as a pass begins (its read then sees that work)."""
        self._carried: dict[str, list[PlacementEvent]] = {}
        """Placement events of services whose bookkeeping a pass deferred, for the next pass."""

    def _each(self, fn: Callable[..., None], items: Iterable[Any]) -> None:
        """Run fn(*item) for every item on the writer threads; re-raise the first error."""
        for future in [self.writers.submit(fn, *item) for item in items]:
            future.result()

    # --- reading -------------------------------------------------------------

    def _read(self) -> FleetRead:
        fleet_selector = ",".join(f"{k}={v}" for k, v in self.settings.fleet.node_selector.items())
        ns = self.settings.agent.namespace
        agents = f"app.kubernetes.io/name={names.AGENT_APP}"
        nodes = _items(self.core.list_node(label_selector=fleet_selector, _preload_content=False))
        edge_nodes = {
            e["metadata"]["name"]: e
            for e in self.custom.list_cluster_custom_object(
                names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL
            )["items"]
        }
        leases = {
            item["metadata"]["name"]: item
            for item in _items(
                self.coordination.list_namespaced_lease(ns, label_selector=agents, _preload_content=False)
            )
        }
        services = self.custom.list_cluster_custom_object(
            names.GROUP, names.VERSION, names.INFERENCE_SERVICE_PLURAL
        )["items"]
        return FleetRead(nodes, edge_nodes, leases, services)

    def _read_pods(self, read: FleetRead) -> None:
        agents = f"app.kubernetes.io/name={names.AGENT_APP}"
        pods = self.core.list_namespaced_pod(
            self.settings.agent.namespace, label_selector=agents, _preload_content=False
        )
        read.pods = {p["metadata"]["name"]: p for p in _items(pods)}

    def _read_bookkeeping(self, read: FleetRead) -> None:
        # One list each instead of a create or get per service per pass: at 200 services those were
        # 400 requests a pass, most of them answered 409 or unchanged.
        read.kube_services = {
            _ns_name(s)
            for s in _items(
                self.core.list_service_for_all_namespaces(
                    label_selector=f"app.kubernetes.io/managed-by={names.MANAGED_BY}", _preload_content=False
                )
            )
        }
        read.slices = {
            _ns_name(s): s
            for s in _items(
                self.discovery.list_endpoint_slice_for_all_namespaces(
                    label_selector=f"endpointslice.kubernetes.io/managed-by={manifests.SLICE_MANAGER}",
                    _preload_content=False,
                )
            )
        }

    # --- one pass ------------------------------------------------------------

    def reconcile_once(self) -> PassReport:
        t0 = time.monotonic()
        report = PassReport()
        self.urgent.clear()  # this pass's read sees what was urgent until now
        try:
            read = self._read()
            nodes, edge_nodes, services = read.nodes, read.edge_nodes, read.services
            now = self.clock()
            self._sync_edge_nodes(nodes, edge_nodes, report)
            deleting = [s for s in services if s["metadata"].get("deletionTimestamp")]
            live = [s for s in services if not s["metadata"].get("deletionTimestamp")]
            states = []
            for node in nodes:
                name = node["metadata"]["name"]
                en = edge_nodes.get(name)
                health = self.tracker.judge(
                    fleet_state.node_signals(node, en, read.leases.get(names.agent_name(name))), now
                )
                report.health[name] = health.value
                states.append(
                    fleet_state.node_state(node, en, health, self.settings.fleet.memory_reserve_fraction)
                )
            self.tracker.forget(set(self.tracker.lost_work_at) - {n["metadata"]["name"] for n in nodes})
            measured = fleet_state.measured_bytes(edge_nodes.values())
            demands = []
            for s in list(live):
                try:
                    demands.append(fleet_state.service_demand(s, measured))
                except ValueError as e:  # the CRD's validation should make this unreachable
                    log.warning("skipping %s: %s", fleet_state.service_key(s), e)
                    live.remove(s)
            previous = fleet_state.previous_assignment(e for n, e in edge_nodes.items() if n in report.health)
            result = self.planner.plan(demands, states, previous)
            report.result, report.incremental_plan = result, self.planner.incremental
            node_labels = {n["metadata"]["name"]: n["metadata"].get("labels") or {} for n in nodes}
            decisions = self._rollouts(live, result, edge_nodes, node_labels, now, report)
            specs = {fleet_state.service_key(s): s["spec"] for s in live}
            self._write_edge_node_specs(result, decisions, specs, edge_nodes, states, report)
            self._release_finalizers(deleting, edge_nodes, report)
            self._sync_pods(result, read, report)
            self._write_services(live, result, decisions, read, report)
            report.nodes, report.services = len(nodes), len(live)
            report.unplaced = sum(1 for p in result.services.values() if not p.complete)
            report.seconds = time.monotonic() - t0
            self.metrics.observe_pass(report, report.seconds, ok=True)
            return report
        except Exception:
            self.metrics.observe_pass(report, time.monotonic() - t0, ok=False)
            raise

    # --- writing -------------------------------------------------------------

    def _sync_edge_nodes(self, nodes: list[Obj], edge_nodes: dict[str, Obj], report: PassReport) -> None:
        """One EdgeNode per fleet Node; EdgeNodes of Nodes that left the fleet are deleted."""
        from kubernetes.client.exceptions import ApiException

        fleet = {n["metadata"]["name"] for n in nodes}
        for node in nodes:
            name = node["metadata"]["name"]
            if name not in edge_nodes:
                try:
                    edge_nodes[name] = self.custom.create_cluster_custom_object(
                        names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, manifests.edge_node(node)
                    )
                    report.wrote("edgenode.create")
                except ApiException as e:
                    if e.status != 409:
                        raise
                    edge_nodes[name] = self.custom.get_cluster_custom_object(
                        names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name
                    )
        ours = {
            n
            for n, e in edge_nodes.items()
            if (e["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") == names.MANAGED_BY
        }
        for name in sorted(set(edge_nodes) - fleet):
            if name not in ours:
                del edge_nodes[name]  # someone else's EdgeNode: neither ours to delete nor to place on
                continue
            try:
                self.custom.delete_cluster_custom_object(
                    names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name
                )
                report.wrote("edgenode.delete")
            except ApiException as e:
                if e.status != 404:
                    raise
            del edge_nodes[name]

    def _rollouts(
        self,
        services: list[Obj],
        result: PlacementResult,
        edge_nodes: dict[str, Obj],
        node_labels: dict[str, Any],
        now: float,
        report: PassReport,
    ) -> dict[str, rollout.Decision]:
        """Each service's rollout step. Its status.rollout is written here, BEFORE any EdgeNode spec
        built from it: a crash in between leaves no node on a revision status does not record.

        Except a first deployment (no status.rollout yet, no stable version): its targets follow from the spec
        alone, and a first deployment's revision replaces any earlier try, so the pass after a crash
        recomputes them; its status.rollout goes out with the service's status after the specs, one
        write instead of two on the path of a new service's placement."""
        decisions = {}

        def decide(isvc: Obj) -> None:
            key = fleet_state.service_key(isvc)
            meta = isvc["metadata"]
            annotation = (meta.get("annotations") or {}).get(names.ANNOTATION_ROLLOUT_ACTION)
            try:
                action = rollout.parse_action(annotation)
            except ValueError as e:
                action = None
                self._event(isvc, "InvalidRolloutAction", str(e), "Warning", report)
            nodes = result.services[key].nodes if key in result.services else ()
            observations = {
                n: rollout.observe(
                    key,
                    edge_nodes[n].get("status") or {},
                    node_labels.get(n, {}).get(names.LABEL_DEVICE_CLASS, ""),
                )
                for n in nodes
            }
            previous = (isvc.get("status") or {}).get("rollout")
            decision = rollout.step(
                rollout.parse_spec(isvc["spec"]), previous, nodes, observations, now, action, key
            )
            first_deployment = previous is None and "stableVersion" not in decision.status
            if decision.status != previous and not first_deployment:
                self.custom.patch_namespaced_custom_object_status(
                    names.GROUP,
                    names.VERSION,
                    meta["namespace"],
                    names.INFERENCE_SERVICE_PLURAL,
                    meta["name"],
                    {"status": {"rollout": merge_patch(previous or {}, decision.status)}},
                )
                isvc.setdefault("status", {})["rollout"] = decision.status
                report.wrote("inferenceservice.rollout")
            if annotation is not None:
                self.custom.patch_namespaced_custom_object(
                    names.GROUP,
                    names.VERSION,
                    meta["namespace"],
                    names.INFERENCE_SERVICE_PLURAL,
                    meta["name"],
                    {"metadata": {"annotations": {names.ANNOTATION_ROLLOUT_ACTION: None}}},
                )
                report.wrote("inferenceservice.annotation")
            for event in decision.events:
                self._event(
                    isvc, event.reason, event.message, "Warning" if event.warning else "Normal", report
                )
            decisions[key] = decision

        from kubernetes.client.exceptions import ApiException

        def decide_safely(isvc: Obj) -> None:
            try:
                decide(isvc)
            except ApiException as e:
                # Status not written: this service's EdgeNode entries stay as they are this pass.
                log.warning(
                    "rollout of %s not advanced: %s %s", fleet_state.service_key(isvc), e.status, e.reason
                )
                report.wrote("rollout.error")
            except (AssertionError, ValueError, KeyError, TypeError) as e:
                # A status.rollout this operator cannot follow (edited by hand, or from an older
                # version): this one service holds; the fleet goes on. One line per pass, no traceback.
                log.error(
                    "rollout of %s holds: unusable status.rollout (%s: %s)",
                    fleet_state.service_key(isvc),
                    type(e).__name__,
                    e,
                )
                report.wrote("rollout.invalid")

        self._each(decide_safely, ((s,) for s in services))
        return decisions

    def _write_edge_node_specs(
        self,
        result: PlacementResult,
        decisions: dict[str, rollout.Decision],
        specs: dict[str, Obj],
        edge_nodes: dict[str, Obj],
        states: list[Any],
        report: PassReport,
    ) -> None:
        from kubernetes.client.exceptions import ApiException

        capacity = {s.name: s.capacity_bytes for s in states}

        def write(node: str, placed: Any) -> None:
            en = edge_nodes[node]
            spec = en.get("spec", {})
            models = fleet_state.edge_node_models(node, placed, decisions, specs, spec.get("models") or [])
            if spec.get("models", []) == models and spec.get("memoryBudgetBytes") == capacity[node]:
                return
            annotations = dict(en["metadata"].get("annotations") or {})
            patch: Obj = {"spec": {"models": models, "memoryBudgetBytes": capacity[node]}}
            if models and names.ANNOTATION_WORK_SINCE not in annotations:
                patch["metadata"] = {
                    "annotations": {names.ANNOTATION_WORK_SINCE: service_status.now_rfc3339()}
                }
            elif not models and names.ANNOTATION_WORK_SINCE in annotations:
                patch["metadata"] = {"annotations": {names.ANNOTATION_WORK_SINCE: None}}
            try:
                edge_nodes[node] = self.custom.patch_cluster_custom_object(
                    names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, node, patch
                )
            except ApiException as e:
                if e.status != 404:
                    raise
                return  # the EdgeNode went with its Node since this pass read it; the next pass re-plans
            report.wrote("edgenode.patch")

        self._each(write, sorted(result.assignment.by_node.items()))

    def _sync_pods(self, result: PlacementResult, read: FleetRead, report: PassReport) -> None:
        """An agent Pod on every node with work, none on nodes without; failed Pods are replaced."""
        from kubernetes.client.exceptions import ApiException

        if self.urgent.is_set():  # not even the read: the next pass starts at once
            report.defer(sum(1 for placed in result.assignment.by_node.values() if placed))
            return
        self._read_pods(read)
        ns, edge_nodes, pods = self.settings.agent.namespace, read.edge_nodes, read.pods

        def sync(node: str, placed: Any) -> None:
            name = names.agent_name(node)
            pod = pods.get(name)
            phase = (pod or {}).get("status", {}).get("phase")
            delete = bool(pod) and (not placed or phase in ("Failed", "Succeeded"))
            create = bool(placed) and not pod
            if (delete or create) and self.urgent.is_set():
                report.defer()
                return
            if delete:
                try:
                    self.core.delete_namespaced_pod(name, ns)
                    report.wrote("pod.delete")
                except ApiException as e:
                    if e.status != 404:
                        raise
            elif create:
                try:
                    self.core.create_namespaced_pod(
                        ns, manifests.agent_pod(edge_nodes[node], self.settings.agent)
                    )
                    report.wrote("pod.create")
                except ApiException as e:
                    if e.status != 409:
                        raise

        self._each(sync, sorted(result.assignment.by_node.items()))

    def _write_services(
        self,
        services: list[Obj],
        result: PlacementResult,
        decisions: dict[str, rollout.Decision],
        read: FleetRead,
        report: PassReport,
    ) -> None:
        from kubernetes.client.exceptions import ApiException

        carried, self._carried = self._carried, {}
        events: dict[str, list[PlacementEvent]] = {}
        for event in result.events:
            events.setdefault(event.service, []).append(event)
        if not self.urgent.is_set():
            self._read_bookkeeping(read)

        def write(isvc: Obj) -> None:
            key = fleet_state.service_key(isvc)
            mine = [*carried.get(key, ()), *events.get(key, ())]
            if self.urgent.is_set():
                report.defer()
                if mine:
                    self._carried[key] = mine  # one key per service: no two threads share one
                return
            try:
                self._write_service(isvc, result, decisions[key], mine, read, report)
            except ApiException as e:
                # One service's trouble (its namespace terminating, a deleted object) must not stop
                # the others; the next pass retries it.
                log.warning("could not update %s: %s %s", fleet_state.service_key(isvc), e.status, e.reason)
                report.wrote("service.error")

        self._each(write, ((s,) for s in services))

    def _write_service(
        self,
        isvc: Obj,
        result: PlacementResult,
        decision: rollout.Decision,
        events: list[PlacementEvent],
        read: FleetRead,
        report: PassReport,
    ) -> None:
        """The service's bookkeeping: finalizer, placement `events`, status, Service, EndpointSlice."""
        edge_nodes, pods = read.edge_nodes, read.pods
        port = self.settings.agent.port
        key = fleet_state.service_key(isvc)
        sp = result.services.get(key)
        holding = sp.nodes if sp else ()
        statuses = {n: edge_nodes[n].get("status") or {} for n in holding}
        endpoints = {n: st["endpoint"] for n, st in statuses.items() if st.get("endpoint")}
        node_models = {
            n: [(m["name"], str(m["version"]), m["artifact"]["digest"]) for m, _ in decision.placed(n)]
            for n in holding
        }
        status = service_status.service_status(
            isvc,
            key,
            sp,
            statuses,
            manifests.service_url(isvc),
            endpoints,
            node_versions=decision.node_versions(),
            node_models=node_models,
            degraded=decision.degraded,
            rollout_status=decision.status,
        )
        old_message = (isvc.get("status") or {}).get("message", "")
        for event in events:
            if event.reason == "FailedPlacement" and event.message == old_message:
                continue  # said already; repeating it every pass is noise
            self._event(
                isvc,
                event.reason,
                event.message,
                "Warning" if event.reason in ("FailedPlacement", "Evicted") else "Normal",
                report,
            )
        self._patch_status(isvc, status, report)
        # After the status: the finalizer's watch event then carries the current observedGeneration,
        # which `handlers.serving_change` does not count as urgent work.
        if names.FINALIZER not in (isvc["metadata"].get("finalizers") or []):
            self._set_finalizers(isvc, [*(isvc["metadata"].get("finalizers") or []), names.FINALIZER], report)
        if (isvc["metadata"]["namespace"], manifests.service_name(isvc["metadata"]["name"])) not in (
            read.kube_services
        ):
            self._create_service(isvc, report)
        agents = []
        for n in holding:
            pod = pods.get(names.agent_name(n)) or {}
            ip = pod.get("status", {}).get("podIP")
            if ip:
                agents.append((n, ip, any(e["node"] == n and e["ready"] for e in status["nodes"])))
        self._sync_endpoint_slice(isvc, agents, port, read.slices, report)

    def _patch_status(self, isvc: Obj, status: Obj, report: PassReport) -> None:
        old = isvc.get("status") or {}
        comparable = {k: v for k, v in status.items() if k != "conditions"}
        if {k: old.get(k) for k in comparable} == comparable and service_status.conditions_equal(
            old.get("conditions") or [], status["conditions"]
        ):
            return
        meta = isvc["metadata"]
        updated = self.custom.patch_namespaced_custom_object_status(
            names.GROUP,
            names.VERSION,
            meta["namespace"],
            names.INFERENCE_SERVICE_PLURAL,
            meta["name"],
            {"status": merge_patch(old, status)},
        )
        meta["resourceVersion"] = updated["metadata"]["resourceVersion"]  # for a write that follows
        report.wrote("inferenceservice.status")

    def _create_service(self, isvc: Obj, report: PassReport) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.create_namespaced_service(isvc["metadata"]["namespace"], manifests.service(isvc))
            report.wrote("service.create")
        except ApiException as e:
            if e.status != 409:  # created since this pass listed them
                raise

    def _sync_endpoint_slice(
        self,
        isvc: Obj,
        agents: list[tuple[str, str, bool]],
        port: int,
        slices: dict[tuple[str, str], Obj],
        report: PassReport,
    ) -> None:
        """Create the service's EndpointSlice if the pass's list lacked it; patch its endpoints if they
        differ from the agents serving it."""
        from kubernetes.client.exceptions import ApiException

        body = manifests.endpoint_slice(isvc, agents, port)
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        current = slices.get((ns, name))
        if current is None:
            try:
                self.discovery.create_namespaced_endpoint_slice(ns, body)
                report.wrote("endpointslice.create")
                return
            except ApiException as e:
                if e.status != 409:  # created since this pass listed them: compare with the server's
                    raise
            current = json.loads(
                self.discovery.read_namespaced_endpoint_slice(name, ns, _preload_content=False).data
            )
        have = current.get("endpoints") or []
        want = body["endpoints"]
        if [(e["addresses"], e.get("nodeName"), e.get("conditions", {}).get("ready")) for e in have] != [
            (e["addresses"], e["nodeName"], e["conditions"]["ready"]) for e in want
        ]:
            self.discovery.patch_namespaced_endpoint_slice(name, ns, {"endpoints": want})
            report.wrote("endpointslice.patch")

    def _event(self, isvc: Obj, reason: str, message: str, type_: str, report: PassReport) -> None:
        meta = isvc["metadata"]
        now = service_status.now_rfc3339()
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.create_namespaced_event(
                meta["namespace"],
                {
                    "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                    "involvedObject": {
                        "apiVersion": names.API_VERSION,
                        "kind": names.INFERENCE_SERVICE_KIND,
                        "name": meta["name"],
                        "namespace": meta["namespace"],
                        "uid": meta["uid"],
                    },
                    "reason": reason,
                    "message": message[:1024],
                    "type": type_,
                    "source": {"component": names.MANAGED_BY},
                    "firstTimestamp": now,
                    "lastTimestamp": now,
                    "count": 1,
                },
            )
        except ApiException as e:  # events are best effort: a terminating namespace refuses them
            log.debug("event %s on %s/%s not posted: %s", reason, meta["namespace"], meta["name"], e.status)
            return
        report.wrote("event.create")
        log.info("%s %s/%s: %s", reason, meta["namespace"], meta["name"], message)

    def _release_finalizers(
        self, deleting: list[Obj], edge_nodes: dict[str, Obj], report: PassReport
    ) -> None:
        """Drop our finalizer from each deleted service that no EdgeNode spec holds any more (this pass
        wrote the specs without it): `kubectl delete` returns once its models are unplaced everywhere."""
        held = {m.get("service") for e in edge_nodes.values() for m in e.get("spec", {}).get("models") or []}
        for isvc in deleting:
            finalizers = isvc["metadata"].get("finalizers") or []
            if names.FINALIZER in finalizers and fleet_state.service_key(isvc) not in held:
                self._set_finalizers(isvc, [f for f in finalizers if f != names.FINALIZER], report)

    def _set_finalizers(self, isvc: Obj, finalizers: list[str], report: PassReport) -> None:
        """Write the service's finalizer list, conditional on the resourceVersion this pass read so
        that another controller's finalizer added meanwhile is never dropped (a conflict or a service
        already gone is left to the next pass)."""
        from kubernetes.client.exceptions import ApiException

        meta = isvc["metadata"]
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        try:
            updated = self.custom.patch_namespaced_custom_object(
                names.GROUP,
                names.VERSION,
                meta["namespace"],
                names.INFERENCE_SERVICE_PLURAL,
                meta["name"],
                patch,
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise
            log.debug("finalizers of %s not written (%s); next pass", fleet_state.service_key(isvc), e.status)
            return
        meta["finalizers"], meta["resourceVersion"] = finalizers, updated["metadata"]["resourceVersion"]
        report.wrote("inferenceservice.finalizer")


class FleetLoop:
    """Runs reconcile passes in a worker thread: on request (debounced) and every resync interval.

    `request()` is cheap and may be called from any handler; a burst of requests within the
    debounce window costs one pass.
    """

    def __init__(self, reconciler: FleetReconciler, settings: OperatorSettings) -> None:
        self.reconciler = reconciler
        self.settings = settings
        self._wake = asyncio.Event()
        self._passes = 0
        self._done = asyncio.Condition()
        self.last_ok_s: float = time.monotonic()
        self.last_report: PassReport | None = None

    def request(self, urgent: bool = False) -> None:
        """Ask for a pass; `urgent`: work on the serving path (see the module docstring) is waiting,
        so the running pass, if any, leaves bookkeeping not yet started to this one."""
        if urgent:
            self.reconciler.urgent.set()
        self._wake.set()

    async def run(self) -> None:
        debounce = self.settings.reconcile_debounce_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.resync_interval_s)
            urgent = self.reconciler.urgent.is_set()
            await asyncio.sleep(min(URGENT_DEBOUNCE_S, debounce) if urgent else debounce)
            self._wake.clear()
            try:
                self.last_report = await asyncio.to_thread(self.reconciler.reconcile_once)
                self.last_ok_s = time.monotonic()
                silent = [n for n, h in self.last_report.health.items() if h != Health.HEALTHY.value]
                log.log(
                    logging.INFO if self.last_report.writes else logging.DEBUG,
                    "pass: %.2f s, %d nodes, %d services, writes %s, deferred %d, not healthy %s",
                    self.last_report.seconds,
                    self.last_report.nodes,
                    self.last_report.services,
                    self.last_report.writes,
                    self.last_report.deferred,
                    silent,
                )
            except Exception as e:
                from kubernetes.client.exceptions import ApiException

                if isinstance(e, ApiException):  # the API server said no (or went away): one line
                    log.warning("fleet reconcile failed (%s %s); retrying", e.status, e.reason)
                else:
                    log.exception("fleet reconcile failed; retrying")
                self._wake.set()
                await asyncio.sleep(1.0)
            async with self._done:
                self._passes += 1
                self._done.notify_all()
