"""The fleet in memory, fed by watches: what the operator's passes read (`FleetSource`), so that a
pass lists nothing and a pass over an unchanged fleet sends no request at all.

One `Informer` per kind a pass reads: the fleet's Nodes (its label selector), EdgeNodes, the agents'
Leases and Pods (the agents' namespace, their app label), InferenceServices, and the Services and
EndpointSlices this operator manages. Each is listed once and then watched from the list's
resourceVersion (bookmarks on; 410 Gone relists), each on its own thread. `read` hands a pass a
snapshot: a copy of each mapping, the objects shared (nothing changes a stored object in place).

Events ask for a pass (`request(urgent)`) when they change something a pass acts on: a Node, an
EdgeNode, an agent Pod, an InferenceService (urgent when it is new, its spec changed, or it is
being deleted: `serving_change`). Lease renewals do not: they age node health, which the resync
pass judges (at 10,000 agents they would be hundreds of passes asked for a second).

The pass's own writes are offered back (`offer`) with the object each write returned, so a pass
that starts before the write's event arrives decides from what was written (a rollout step is not
taken twice from a stale status).

Until every kind has been listed once, `read` raises `NotSynced`: a pass then would see EdgeNodes
without their Nodes and delete them. While a watch fails, the cache is `blind`: the fleet loop tells
node health that the span was not observed (an API server down is not a fleet of silent agents).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client

from edgefleet_api import names
from edgefleet_api.list_watch import ListWatchTimings
from edgefleet_operator import manifests
from edgefleet_operator.fleet_read import FleetRead, TypedViews, ns_name
from edgefleet_operator.informer import (
    Informer,
    Obj,
    strip_metadata,
    strip_node,
    strip_pod,
    strip_service,
)
from edgefleet_operator.settings import OperatorSettings
from edgefleet_operator.watching import WatchingSettings

NODES, EDGE_NODES, LEASES, SERVICES, PODS, KUBE_SERVICES, SLICES = (
    "Node",
    "EdgeNode",
    "Lease",
    "InferenceService",
    "Pod",
    "Service",
    "EndpointSlice",
)
QUIET_KINDS = frozenset({LEASES, KUBE_SERVICES, SLICES})
"""Kinds whose changes ask for no pass: Lease renewals age health (the resync judges it); the
Services and EndpointSlices are this operator's own output."""


class NotSynced(RuntimeError):
    """A kind has not been listed yet: no pass may decide from a partial fleet."""


def serving_change(event_type: str | None, body: Mapping[str, Any]) -> bool:
    """Whether an InferenceService event asks for work on the serving path: the service is new,
    its spec changed since the status was written (generation ahead of observedGeneration), or it
    is being deleted. Our own status writes are none of these."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    return (
        event_type in ("ADDED", "DELETED")
        or bool(meta.get("deletionTimestamp"))
        or meta.get("generation") != status.get("observedGeneration")
    )


def timings(watching: WatchingSettings) -> ListWatchTimings:
    """The operator's list-and-watch timings (its watches' bounds are kopf's: `watching`)."""
    return ListWatchTimings(
        request_timeout_s=watching.api_read_timeout_s,
        watch_timeout_s=watching.watch_server_timeout_s,
        watch_read_timeout_s=watching.watch_inactivity_timeout_s,
        resync_s=float("inf"),  # an informer's relist is for 410s; the pass re-decides every resync
    )


class FleetCache:
    """The informers of a fleet pass's kinds, and snapshots of them for passes."""

    def __init__(
        self,
        api_client: Any,
        settings: OperatorSettings,
        watching: WatchingSettings,
        request: Callable[[bool], None] = lambda urgent: None,
    ) -> None:
        self.settings = settings
        self.request = request
        """Asks for a pass (`FleetLoop.request`); called on an informer's thread."""
        self.views = TypedViews()
        core: Any = client.CoreV1Api(api_client)
        custom: Any = client.CustomObjectsApi(api_client)
        coordination: Any = client.CoordinationV1Api(api_client)
        discovery: Any = client.DiscoveryV1Api(api_client)
        fleet = ",".join(f"{k}={v}" for k, v in settings.fleet.node_selector.items())
        agents = f"app.kubernetes.io/name={names.AGENT_APP}"
        ns = settings.agent.namespace
        t = timings(watching)
        calls: list[tuple[str, Callable[..., Any], Callable[[Obj], Obj]]] = [
            (NODES, functools.partial(core.list_node, label_selector=fleet), strip_node),
            (
                EDGE_NODES,
                functools.partial(
                    custom.list_cluster_custom_object, names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL
                ),
                strip_metadata,
            ),
            (
                LEASES,
                functools.partial(coordination.list_namespaced_lease, ns, label_selector=agents),
                strip_metadata,
            ),
            (
                SERVICES,
                functools.partial(
                    custom.list_cluster_custom_object,
                    names.GROUP,
                    names.VERSION,
                    names.INFERENCE_SERVICE_PLURAL,
                ),
                strip_metadata,
            ),
            (PODS, functools.partial(core.list_namespaced_pod, ns, label_selector=agents), strip_pod),
            (
                KUBE_SERVICES,
                functools.partial(
                    core.list_service_for_all_namespaces,
                    label_selector=f"app.kubernetes.io/managed-by={names.MANAGED_BY}",
                ),
                strip_service,
            ),
            (
                SLICES,
                functools.partial(
                    discovery.list_endpoint_slice_for_all_namespaces,
                    label_selector=f"endpointslice.kubernetes.io/managed-by={manifests.SLICE_MANAGER}",
                ),
                strip_metadata,
            ),
        ]
        self.informers = {kind: Informer(kind, call, t, strip, self._changed) for kind, call, strip in calls}
        self._failures_seen = 0

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        for informer in self.informers.values():
            informer.start()

    def stop(self) -> None:
        for informer in self.informers.values():
            informer.stop()

    def restart(self) -> None:
        """Cut every watch (the API server was found out of reach on another call: their connections
        may be half-open and silent); each resumes on a new connection at once."""
        for informer in self.informers.values():
            informer.restart()

    @property
    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers.values())

    def wait_synced(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for informer in self.informers.values():
            if not informer.synced.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def blind(self) -> bool:
        """Whether some watch failed since the last call, or is not connected now: the cache may have
        missed what happened meanwhile (Lease renewals above all), so the span since the last pass
        was not observed (`FleetReconciler.lost_sight`). A pass reads no API: without this an API
        server that went away would look like a fleet whose agents all fell silent."""
        failures = sum(i.failures for i in self.informers.values())
        seen, self._failures_seen = self._failures_seen, failures
        return failures != seen or not all(i.connected for i in self.informers.values())

    def lists(self) -> int:
        """Lists made by all informers (first lists, and relists after 410 Gone)."""
        return sum(i.list_watch.lists for i in self.informers.values())

    # --- FleetSource ----------------------------------------------------------------------------

    def read(self) -> FleetRead:
        if not self.synced:
            missing = [k for k, i in self.informers.items() if not i.synced.is_set()]
            raise NotSynced(f"not listed yet: {', '.join(missing)}")
        nodes = self._snapshot(NODES)
        edge_nodes = self._snapshot(EDGE_NODES)
        leases = {o["metadata"]["name"]: o for o in self._snapshot(LEASES).values()}
        services = [o for _, o in sorted(self._snapshot(SERVICES).items())]
        self.views.keep_only(edge_nodes, services)
        return FleetRead(
            [o for _, o in sorted(nodes.items())], edge_nodes, leases, services, views=self.views
        )

    def read_pods(self, read: FleetRead) -> None:
        read.pods = {o["metadata"]["name"]: o for o in self._snapshot(PODS).values()}

    def read_bookkeeping(self, read: FleetRead) -> None:
        services = self._snapshot(KUBE_SERVICES).values()
        read.kube_services = {ns_name(o) for o in services}
        read.service_ports = {ns_name(o): (o.get("spec") or {}).get("ports") or [] for o in services}
        read.slices = {ns_name(o): o for o in self._snapshot(SLICES).values()}

    def offer(self, obj: Obj) -> None:
        """An object one of the pass's writes returned (the API's JSON): stored unless the watch
        already brought a newer one. Only our two kinds: the writes of the others return models."""
        kind = obj.get("kind")
        informer = self.informers.get(kind) if isinstance(kind, str) else None
        if informer is not None:
            informer.store.put(obj)

    # --- internals ------------------------------------------------------------------------------

    def _snapshot(self, kind: str) -> dict[str, Obj]:
        return self.informers[kind].store.snapshot()

    def _changed(self, kind: str, event: str, obj: Obj) -> None:
        if kind in QUIET_KINDS:
            return
        self.request(kind == SERVICES and serving_change(event, obj))
