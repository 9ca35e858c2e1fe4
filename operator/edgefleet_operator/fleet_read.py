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
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgefleet_api import names
from edgefleet_api.edge_node import EdgeNode, EdgeNodeSpec, EdgeNodeStatus
from edgefleet_api.inference_service import InferenceServiceSpec, service_key
from edgefleet_api.rollout_status import RolloutStatus
from edgefleet_operator import manifests
from edgefleet_operator.report_ledger import EntryKey, ReportLedger
from edgefleet_operator.settings import OperatorSettings

Obj = dict[str, Any]
log = logging.getLogger(__name__)


class TypedViews:
    """The contract's typed views of the objects a pass reads, kept from pass to pass: an EdgeNode is
    parsed again only when its resourceVersion changed (the API server changes it with every write,
    so a kept view is never stale), a service's spec only when its generation did. At 500 nodes a
    pass parses the few EdgeNodes whose agents wrote since, not all of them. Each EdgeNode parsed
    goes through the `ledger` (a replayed or older report is not believed; see `report_ledger`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        """Monotonic seconds: how long a service's spec has held (`ServiceRead.spec_age_s`)."""
        self._edge_nodes: dict[str, tuple[Obj, str | None, EdgeNode]] = {}
        self._specs: dict[tuple[str, str, Any], InferenceServiceSpec] = {}
        self._spec_seen: dict[tuple[str, str], tuple[Any, float | None]] = {}
        """(service, uid) -> (generation last read, when that generation replaced an earlier one
        this operator had read: monotonic seconds; None: the first generation it read)."""
        self.ledger = ReportLedger()

    def edge_node(self, name: str, obj: Obj) -> EdgeNode:
        """EdgeNode `name` typed. A status the contract cannot read (not one our agents write) is
        taken as empty, with a warning: the node keeps its place in the fleet."""
        version = obj["metadata"].get("resourceVersion")
        kept = self._edge_nodes.get(name)
        if kept is not None and (kept[0] is obj or (version is not None and kept[1] == version)):
            return kept[2]
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
                int(meta.get("generation") or 0),
            )
        typed = self.ledger.accept(typed, str((obj.get("metadata") or {}).get("uid") or ""))
        self._edge_nodes[name] = (obj, version, typed)
        return typed

    def service(self, obj: Obj) -> ServiceRead:
        """The service as this pass read it, its spec typed. ValueError (KeyError, TypeError) for a
        spec the contract cannot read (the CRD's validation should make it unreachable)."""
        meta = obj["metadata"]
        key = service_key(obj)
        ident = (key, str(meta.get("uid", "")), meta.get("generation"))
        spec = self._specs.get(ident)
        if spec is None:
            spec = self._specs[ident] = InferenceServiceSpec.from_obj(obj["spec"])
        now = self.clock()
        generation, since = self._spec_seen.get(ident[:2], (ident[2], None))
        if generation != ident[2]:
            since = now  # a new generation of a service read before
        self._spec_seen[ident[:2]] = (ident[2], since)
        return ServiceRead(obj, key, spec, None if since is None else now - since)

    def keep_only(self, edge_nodes: Iterable[str], services: Iterable[Obj]) -> None:
        """Forget the views of objects that are gone."""
        names = set(edge_nodes)
        self._edge_nodes = {n: v for n, v in self._edge_nodes.items() if n in names}
        self.ledger.keep_only(names)
        live = {
            (service_key(o), str(o["metadata"].get("uid", "")), o["metadata"].get("generation"))
            for o in services
        }
        self._specs = {k: v for k, v in self._specs.items() if k in live}
        self._spec_seen = {k: v for k, v in self._spec_seen.items() if k in {x[:2] for x in live}}


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
    service_ports: dict[tuple[str, str], list[Obj]] = field(default_factory=dict)
    """Their `spec.ports`, by (namespace, name) (one not in it: ports not compared)."""
    views: TypedViews = field(default_factory=TypedViews, repr=False)

    _typed: dict[str, tuple[Obj, EdgeNode]] = field(default_factory=dict, repr=False)

    def edge_node(self, name: str) -> EdgeNode:
        """EdgeNode `name` typed (see `TypedViews.edge_node`); a phase asking again for the same
        object gets it from this pass's own memo."""
        obj = self.edge_nodes[name]
        kept = self._typed.get(name)
        if kept is not None and kept[0] is obj:
            return kept[1]
        typed = self.views.edge_node(name, obj)
        self._typed[name] = (obj, typed)
        return typed

    def set_at(self, name: str) -> Mapping[EntryKey, int]:
        """EdgeNode `name`'s spec entries -> the spec generation that set each (see `report_ledger`)."""
        self.edge_node(name)  # parsed (and through the ledger) at its current version
        return self.views.ledger.set_at(name)


@dataclass(frozen=True, slots=True)
class ServiceRead:
    """An InferenceService as a pass reads it: the object as the API has it (metadata, and the status
    merge patches are computed against) and its spec, typed."""

    obj: Obj
    key: str
    """namespace/name."""
    spec: InferenceServiceSpec
    spec_age_s: float | None = None
    """Seconds since this operator read the spec's generation replace an earlier one (None: the
    first generation it read of the service, e.g. after a restart: not young). A burst of edits
    keeps it near 0: the rollout follows a new revision once it has settled
    (`rollout.decision.SPEC_SETTLE_S`)."""

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
    """A service read on its own, its spec typed (ValueError, KeyError, TypeError for one the
    contract cannot read)."""
    return TypedViews().service(obj)


def ns_name(obj: Obj) -> tuple[str, str]:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def items(response: Any) -> list[Obj]:
    """The items of a list call made with `_preload_content=False`, as the API's JSON.

    The client's typed models cost more than the rest of a pass together: at 500 nodes, building
    and re-serialising the Node, Pod and Lease models took about 6 s of a 6.5 s pass.
    """
    found: list[Obj] = json.loads(response.data)["items"]
    return found


class FleetSource(Protocol):
    """Where a pass reads the fleet: `FleetReader` lists it (a pass run on its own: tests, tools),
    `fleet_cache.FleetCache` keeps it from watches (the operator). `offer` takes each object a write
    of the pass returned."""

    views: TypedViews

    def read(self) -> FleetRead: ...

    def read_pods(self, read: FleetRead) -> None: ...

    def read_bookkeeping(self, read: FleetRead) -> None: ...

    def offer(self, obj: Obj) -> None: ...


class FleetReader:
    """The pass's list calls: every pass lists what it reads (see `FleetSource`). The API objects
    are the kubernetes client's, typed Any: they take and return plain dicts (the API's JSON) where
    their stubs name models."""

    def __init__(self, core: Any, custom: Any, coordination: Any, discovery: Any, settings: OperatorSettings):
        self.core, self.custom, self.coordination, self.discovery = core, custom, coordination, discovery
        self.settings = settings
        self.views = TypedViews()
        """Kept from pass to pass (see `TypedViews`)."""

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
        self.views.keep_only(edge_nodes, services)
        return FleetRead(nodes, edge_nodes, leases, services, views=self.views)

    def offer(self, obj: Obj) -> None:
        """Nothing to keep: the next pass lists again."""

    def read_pods(self, read: FleetRead) -> None:
        agents = f"app.kubernetes.io/name={names.AGENT_APP}"
        pods = self.core.list_namespaced_pod(
            self.settings.agent.namespace, label_selector=agents, _preload_content=False
        )
        read.pods = {p["metadata"]["name"]: p for p in items(pods)}

    def read_bookkeeping(self, read: FleetRead) -> None:
        # One list each instead of a create or get per service per pass: at 200 services those were
        # 400 requests a pass, most of them answered 409 or unchanged.
        listed = items(
            self.core.list_service_for_all_namespaces(
                label_selector=f"app.kubernetes.io/managed-by={names.MANAGED_BY}", _preload_content=False
            )
        )
        read.kube_services = {ns_name(s) for s in listed}
        read.service_ports = {ns_name(s): s.get("spec", {}).get("ports") or [] for s in listed}
        read.slices = {
            ns_name(s): s
            for s in items(
                self.discovery.list_endpoint_slice_for_all_namespaces(
                    label_selector=f"endpointslice.kubernetes.io/managed-by={manifests.SLICE_MANAGER}",
                    _preload_content=False,
                )
            )
        }
