"""What a fleet pass reads: one list call per kind, as the API's JSON, with the contract's typed
views of our own resources (`FleetRead.edge_node`, `read_service`).

The Nodes, EdgeNodes, agent Leases and InferenceServices first; the agent Pods, and the Services
and EndpointSlices this operator manages, only when the pass gets to the phases that need them
(a pass that defers those phases to the next one does not read them). The objects stay as the API
returned them (their metadata and what a merge patch is computed against); decisions read the typed
views.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from edgefleet_api import names
from edgefleet_api.edge_node import EdgeNode, EdgeNodeSpec, EdgeNodeStatus
from edgefleet_api.inference_service import InferenceServiceSpec, service_key
from edgefleet_api.rollout_status import RolloutStatus
from edgefleet_operator import manifests
from edgefleet_operator.settings import OperatorSettings

Obj = dict[str, Any]
log = logging.getLogger(__name__)


@dataclass
class FleetRead:
    """One pass's view of the fleet. The pass keeps it current with its own writes (the EdgeNodes it
    creates, deletes and patches), so that a later phase decides from what an earlier one wrote."""

    nodes: list[Obj]
    edge_nodes: dict[str, Obj]
    leases: dict[str, Obj]
    services: list[Obj]
    pods: dict[str, Obj] = field(default_factory=dict)
    kube_services: set[tuple[str, str]] = field(default_factory=set)
    """(namespace, name) of the Services this operator manages."""
    slices: dict[tuple[str, str], Obj] = field(default_factory=dict)
    """The EndpointSlices this operator manages, by (namespace, name)."""
    _typed: dict[str, tuple[Obj, EdgeNode]] = field(default_factory=dict, repr=False)

    def edge_node(self, name: str) -> EdgeNode:
        """EdgeNode `name` typed, parsed once per object (a write that replaces the object in
        `edge_nodes` is parsed again). A status the contract cannot read (not one our agents
        write) is taken as empty, with a warning: the node keeps its place in the fleet."""
        obj = self.edge_nodes[name]
        cached = self._typed.get(name)
        if cached is not None and cached[0] is obj:
            return cached[1]
        try:
            typed = EdgeNode.from_obj(obj)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("EdgeNode %s: unreadable status, taken as empty (%s)", name, e)
            meta = obj.get("metadata") or {}
            typed = EdgeNode(
                name,
                EdgeNodeSpec.from_obj(obj.get("spec") or {}, name),
                EdgeNodeStatus(),
                dict(meta.get("labels") or {}),
                dict(meta.get("annotations") or {}),
            )
        self._typed[name] = (obj, typed)
        return typed


@dataclass(frozen=True, slots=True)
class ServiceRead:
    """An InferenceService as a pass reads it: the object as the API has it (metadata, and the status
    merge patches are computed against) and its spec, typed."""

    obj: Obj
    key: str
    """namespace/name."""
    spec: InferenceServiceSpec

    @property
    def meta(self) -> Obj:
        meta: Obj = self.obj["metadata"]
        return meta

    @property
    def status_obj(self) -> Obj:
        status: Obj = self.obj.get("status") or {}
        return status

    def rollout(self) -> RolloutStatus | None:
        """status.rollout typed; None before the first one. ValueError (KeyError, TypeError) for one
        this operator cannot follow (edited by hand, or from another version)."""
        raw = self.status_obj.get("rollout")
        return RolloutStatus.from_obj(raw) if raw is not None else None


def read_service(obj: Obj) -> ServiceRead:
    """ValueError (KeyError, TypeError) for a spec the contract cannot read (the CRD's validation
    should make it unreachable)."""
    return ServiceRead(obj, service_key(obj), InferenceServiceSpec.from_obj(obj["spec"]))


def ns_name(obj: Obj) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def items(response: Any) -> list[Obj]:
    """The items of a list call made with `_preload_content=False`, as the API's JSON.

    The client's typed models cost more than the rest of a pass together: at 500 nodes, building
    and re-serialising the Node, Pod and Lease models took about 6 s of a 6.5 s pass.
    """
    found: list[Obj] = json.loads(response.data)["items"]
    return found


class FleetReader:
    """The pass's list calls. The API objects are the kubernetes client's, typed Any: they take and
    return plain dicts (the API's JSON) where their stubs name models."""

    def __init__(self, core: Any, custom: Any, coordination: Any, discovery: Any, settings: OperatorSettings):
        self.core, self.custom, self.coordination, self.discovery = core, custom, coordination, discovery
        self.settings = settings

    def read(self) -> FleetRead:
        fleet_selector = ",".join(f"{k}={v}" for k, v in self.settings.fleet.node_selector.items())
        agents = f"app.kubernetes.io/name={names.AGENT_APP}"
        nodes = items(self.core.list_node(label_selector=fleet_selector, _preload_content=False))
        edge_nodes = {
            e["metadata"]["name"]: e
            for e in self.custom.list_cluster_custom_object(
                names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL
            )["items"]
        }
        leases = {
            lease["metadata"]["name"]: lease
            for lease in items(
                self.coordination.list_namespaced_lease(
                    self.settings.agent.namespace, label_selector=agents, _preload_content=False
                )
            )
        }
        services = self.custom.list_cluster_custom_object(
            names.GROUP, names.VERSION, names.INFERENCE_SERVICE_PLURAL
        )["items"]
        return FleetRead(nodes, edge_nodes, leases, services)

    def read_pods(self, read: FleetRead) -> None:
        agents = f"app.kubernetes.io/name={names.AGENT_APP}"
        pods = self.core.list_namespaced_pod(
            self.settings.agent.namespace, label_selector=agents, _preload_content=False
        )
        read.pods = {p["metadata"]["name"]: p for p in items(pods)}

    def read_bookkeeping(self, read: FleetRead) -> None:
        # One list each instead of a create or get per service per pass: at 200 services those were
        # 400 requests a pass, most of them answered 409 or unchanged.
        read.kube_services = {
            ns_name(s)
            for s in items(
                self.core.list_service_for_all_namespaces(
                    label_selector=f"app.kubernetes.io/managed-by={names.MANAGED_BY}", _preload_content=False
                )
            )
        }
        read.slices = {
            ns_name(s): s
            for s in items(
                self.discovery.list_endpoint_slice_for_all_namespaces(
                    label_selector=f"endpointslice.kubernetes.io/managed-by={manifests.SLICE_MANAGER}",
                    _preload_content=False,
                )
            )
        }
