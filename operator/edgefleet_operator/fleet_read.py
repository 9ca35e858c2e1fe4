"""What a fleet pass reads: one list call per kind, as the API's JSON.

The Nodes, EdgeNodes, agent Leases and InferenceServices first; the agent Pods, and the Services
and EndpointSlices this operator manages, only when the pass gets to the phases that need them
(a pass that defers those phases to the next one does not read them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edgefleet_api import names
from edgefleet_operator import manifests
from edgefleet_operator.settings import OperatorSettings

Obj = dict[str, Any]


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
