"""Applies a fleet pass's write plans (`pass_plan`) against the API server.

A phase's writes are in flight together on the write threads (a burst of placements is bound by API
round trips, not by our CPU); the reconciler starts a phase when the one before has finished, which
is the pass's write order. Each write tolerates what the world may have done since the pass read it:
a create that finds its object (409), a delete or patch of an object gone (404) where the next pass
re-plans anyway. One service's trouble (its namespace terminating, a deleted object) is logged and
counted, not raised: the other services go on and the next pass retries it. Anything else raises
and fails the pass.

One writer: `gate` is called before every write and raises `ownership.HoldLost` when this replica
no longer holds the fleet shard; the pass stops there. Where a lost update would matter the write is
conditional: an EdgeNode spec carries the resourceVersion the pass read (409: if only its status
changed since, the spec is written again on the new version, else it is counted and left to the next
pass, which re-reads and re-plans); the rollout-action annotation is removed only if the object
still carries the value the pass acted on (a merge patch conditional on a resourceVersion whose
object shows that value). InferenceService status patches are not conditional: status is ours
alone (users edit spec and metadata, agents EdgeNode status), and only the shard's holder writes it,
so no other writer's update can be lost; making them conditional would only make every user edit
of the spec or annotations hold a rollout step for a pass.

Urgent work (`urgent` set from any thread): Pod writes and services' bookkeeping not yet started are
left to the next pass, which starts at once (`PassReport.deferred` counts them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes.client.exceptions import ApiException

from edgefleet_api import backoff, names
from edgefleet_operator import manifests, pass_plan
from edgefleet_operator.fleet_types import PlacementEvent
from edgefleet_operator.ownership import FLEET_SHARD
from edgefleet_operator.pass_report import PassReport

log = logging.getLogger(__name__)
Obj = dict[str, Any]
WRITTEN_BY = f"{names.GROUP}/spec-written-by"
"""EdgeNode annotation naming the operator replica that last wrote its spec (set with the spec, in
the same patch: no write of its own)."""
HEALTH_WRITTEN_BY = f"{names.GROUP}/health-written-by"
"""EdgeNode annotation naming the operator replica that last published its health (with it)."""
BOOKKEEPING_BACKOFF_CAP_S = 60.0
"""The longest a service whose bookkeeping keeps failing waits between tries."""
WRITE_THREADS = 8
"""Writes of one pass in flight at once: a burst of placements is bound by API round trips, not by
our CPU. More take a larger share of an API server that thousands of agents keep busy, and slow
their Lease renewals with it: at 2,000 serving nodes on 2 cores, 24 in flight tripled the rate of
EdgeNode spec writes, and the agents' renewals then reached the operator so late that it judged
some silent and moved their work (bench.fleet_scale). The client keeps as many connections open
(`handlers.kube_client`)."""


def namespace_terminating(e: ApiException) -> bool:
    """Whether the API server refused a write because its namespace is being deleted."""
    return e.status == 403 and "being terminated" in str(e.body or "")


class FleetWriter:
    """The pass's writes. The API objects are the kubernetes client's, typed Any: they take and return
    plain dicts (the API's JSON) where their stubs name models."""

    def __init__(
        self,
        core: Any,
        custom: Any,
        discovery: Any,
        urgent: threading.Event,
        gate: Callable[[str], None] = lambda shard: None,
        identity: str = "",
        offer: Callable[[Obj], None] = lambda obj: None,
    ) -> None:
        self.core, self.custom, self.discovery = core, custom, discovery
        self.urgent = urgent
        self._gate = gate
        """Raises `ownership.HoldLost` when this replica may no longer write for the shard: called
        before each write (`gate`)."""
        self.identity = identity
        """This replica's identity, written with each EdgeNode spec (`WRITTEN_BY`); "" for none."""
        self.offer = offer
        """Takes each EdgeNode and InferenceService a write returned (`FleetSource.offer`)."""
        self.threads = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="edgefleet-write")
        self.held_back: dict[str, tuple[int, float]] = {}
        """Services whose bookkeeping the API server refused: failures in a row, and the monotonic
        time before which it is not tried again (`write_bookkeeping`)."""
        self._held_lock = threading.Lock()
        self._rng = random.Random()

    def gate(self, shard: str = FLEET_SHARD) -> None:
        """Raises `ownership.HoldLost` unless this replica may still write for `shard` (the fleet's,
        unless a node's per-node work is written)."""
        self._gate(shard)

    def _kept(self, obj: Obj) -> Obj:
        """`obj`, an object a write (or a read after a conflict) returned, offered to the pass's
        source (`offer`)."""
        self.offer(obj)
        return obj

    def _each(self, fn: Callable[[Any], None], items: Iterable[Any]) -> None:
        """fn(item) for every item on the write threads; re-raises the first error once all are done."""
        for future in [self.threads.submit(fn, item) for item in items]:
            future.result()

    def clear_action(self, ro: pass_plan.RolloutWrite, current: Obj | None, report: PassReport) -> None:
        """Remove the rollout-action annotation only if it still holds the value this pass acted on:
        conditional on the resourceVersion of `current` (the service as the status write left it) or,
        without one, of the pass's read. A user who set another action meanwhile keeps it (the
        object shows the new value, or the patch conflicts): the next pass acts on it."""
        version = ro.resource_version
        if current is not None:
            now = (current["metadata"].get("annotations") or {}).get(names.ANNOTATION_ROLLOUT_ACTION)
            if now != ro.action:
                report.wrote("inferenceservice.annotation.changed")
                return
            version = current["metadata"]["resourceVersion"]
        patch: dict[str, Any] = {"metadata": {"annotations": {names.ANNOTATION_ROLLOUT_ACTION: None}}}
        if version:
            patch["metadata"]["resourceVersion"] = version
        self.gate()
        try:
            self._kept(
                self.custom.patch_namespaced_custom_object(
                    names.GROUP, names.VERSION, ro.namespace, names.INFERENCE_SERVICE_PLURAL, ro.name, patch
                )
            )
        except ApiException as e:
            if e.status != 409:
                raise
            report.wrote("inferenceservice.annotation.changed")
            return
        report.wrote("inferenceservice.annotation")

    # --- decisions first: EdgeNodes, rollout steps, EdgeNode specs -----------------------------

    def sync_edge_nodes(self, sync: pass_plan.EdgeNodeSync, report: PassReport) -> dict[str, Obj]:
        """Creates and deletes EdgeNodes, on the write threads (a fleet of 10,000 new Nodes is 10,000
        creates); returns the created ones (or the server's, when one was created since the pass
        listed them)."""
        created = {}

        def create(body: Obj) -> None:
            name = body["metadata"]["name"]
            self.gate()
            try:
                created[name] = self._kept(
                    self.custom.create_cluster_custom_object(
                        names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, body
                    )
                )
                report.wrote("edgenode.create")
            except ApiException as e:
                if e.status != 409:
                    raise
                created[name] = self._kept(
                    self.custom.get_cluster_custom_object(
                        names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name
                    )
                )

        def delete(name: str) -> None:
            self.gate()
            try:
                self.custom.delete_cluster_custom_object(
                    names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name
                )
                report.wrote("edgenode.delete")
            except ApiException as e:
                if e.status != 404:
                    raise

        self._each(create, sync.create)
        self._each(delete, sync.delete)
        return created

    def write_rollouts(
        self, writes: Sequence[pass_plan.RolloutWrite], report: PassReport
    ) -> list[pass_plan.RolloutWrite]:
        """Each service's rollout writes; returns those whose step stands (decided and written). A
        service whose status.rollout could not be read or written holds this pass: its EdgeNode
        entries stay as they are."""
        stand = []

        def write(ro: pass_plan.RolloutWrite) -> None:
            self.gate()
            if ro.action_warning is not None:
                self.post_event(ro.action_warning, report)
            if ro.decision is None:
                # One line per pass, no traceback: this service holds, the fleet goes on.
                log.error("rollout of %s holds: unusable status.rollout (%s)", ro.service, ro.held)
                report.wrote("rollout.invalid")
                return
            try:
                current = None
                if ro.status_patch is not None:
                    self.gate()
                    current = self._kept(
                        self.custom.patch_namespaced_custom_object_status(
                            names.GROUP,
                            names.VERSION,
                            ro.namespace,
                            names.INFERENCE_SERVICE_PLURAL,
                            ro.name,
                            ro.status_patch,
                        )
                    )
                    report.wrote("inferenceservice.rollout")
                if ro.clear_action:
                    self.clear_action(ro, current, report)
            except ApiException as e:
                log.warning("rollout of %s not advanced: %s %s", ro.service, e.status, e.reason)
                report.wrote("rollout.error")
                return
            for event in ro.events:
                self.post_event(event, report)
            stand.append(ro)  # list.append is atomic: the threads share this list

        stand.extend(ro for ro in writes if ro.writes_nothing)  # no thread for a step with no write
        self._each(write, [ro for ro in writes if not ro.writes_nothing])
        return stand

    def write_edge_node_specs(
        self, writes: Sequence[pass_plan.EdgeNodeSpecWrite], report: PassReport
    ) -> dict[str, Obj]:
        """Patches the EdgeNodes, each conditional on the resourceVersion the pass read; returns them
        as patched. The writes that change what a node serves go first, all of them, then the rest
        (prefetch, peers, budget): on an API server loaded by its agents a rollback's canary nodes
        are back on stable in the time of their own writes, not of the next wave's prefetch too.
        One gone since the pass read it (with its Node) is skipped, and so is one whose spec changed
        since (counted as `edgenode.conflict`): the next pass re-reads and re-plans. One whose
        status alone changed since (its agent reported) is patched again on the new version."""
        patched = {}

        def write(w: pass_plan.EdgeNodeSpecWrite) -> None:
            version = w.resource_version
            for _ in range(2):
                try:
                    patched[w.node] = self._patch_edge_node(w, version)
                    report.wrote("edgenode.patch")
                    return
                except ApiException as e:
                    if e.status == 404:
                        return
                    if e.status != 409:
                        raise
                try:
                    now = self._kept(
                        self.custom.get_cluster_custom_object(
                            names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, w.node
                        )
                    )
                except ApiException as e:
                    if e.status != 404:
                        raise
                    return
                if not pass_plan.same_spec_basis(now, w):
                    break
                version = now["metadata"]["resourceVersion"]
            log.info("EdgeNode %s changed since this pass read it; the next pass re-plans it", w.node)
            report.wrote("edgenode.conflict")

        self._each(write, [w for w in writes if w.serving])
        self._each(write, [w for w in writes if not w.serving])
        return patched

    def _patch_edge_node(self, w: pass_plan.EdgeNodeSpecWrite, version: str | None) -> Obj:
        patch = dict(w.patch)
        meta: dict[str, Any] = dict(patch.get("metadata") or {})
        if version is not None:
            meta["resourceVersion"] = version
        if self.identity:
            meta["annotations"] = {**(meta.get("annotations") or {}), WRITTEN_BY: self.identity}
        if meta:
            patch["metadata"] = meta
        self.gate()
        out: Obj = self._kept(
            self.custom.patch_cluster_custom_object(
                names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, w.node, patch
            )
        )
        return out

    def write_finalizers(self, writes: Iterable[pass_plan.FinalizerWrite], report: PassReport) -> None:
        for w in writes:
            self.set_finalizers(w, report)

    # --- then agent Pods ------------------------------------------------------------------------

    def write_health(self, writes: Sequence[pass_plan.HealthWrite], report: PassReport) -> None:
        """Publishes each node's judged health on its EdgeNode (a merge patch of the one annotation, no
        precondition: the holder of the node's site shard is its only writer). A gone EdgeNode is
        skipped."""

        def write(w: pass_plan.HealthWrite) -> None:
            self.gate(w.shard)
            annotations = {names.ANNOTATION_HEALTH: w.health}
            if self.identity:
                annotations[HEALTH_WRITTEN_BY] = self.identity
            patch = {"metadata": {"annotations": annotations}}
            try:
                self._kept(
                    self.custom.patch_cluster_custom_object(
                        names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, w.node, patch
                    )
                )
            except ApiException as e:
                if e.status != 404:
                    raise
                return
            report.wrote("edgenode.health")

        self._each(write, writes)

    def sync_pods(
        self, writes: Sequence[pass_plan.PodWrite], report: PassReport, shard_of: Mapping[str, str]
    ) -> None:
        """Creates and deletes agent Pods, each gated by its node's shard (`shard_of`: node -> shard)."""

        def write(w: pass_plan.PodWrite) -> None:
            self.gate(shard_of.get(w.node, FLEET_SHARD))
            if self.urgent.is_set():
                report.defer()
                return
            if w.create is None:
                try:
                    self.core.delete_namespaced_pod(w.name, w.namespace)
                    report.wrote("pod.delete")
                except ApiException as e:
                    if e.status != 404:
                        raise
                return
            try:
                self.core.create_namespaced_pod(w.namespace, w.create)
                report.wrote("pod.create")
            except ApiException as e:
                if e.status != 409:
                    raise

        self._each(write, writes)

    # --- then each service's bookkeeping --------------------------------------------------------

    def write_bookkeeping(
        self, plans: Sequence[pass_plan.Bookkeeping], report: PassReport
    ) -> dict[str, list[PlacementEvent]]:
        """Each service's bookkeeping; returns the placement events of the services it deferred (for
        the next pass to post)."""
        carried: dict[str, list[PlacementEvent]] = {}
        now = time.monotonic()

        def write(plan: pass_plan.Bookkeeping) -> None:
            self.gate()
            held = self.held_back.get(plan.service, (0, now))[1] > now
            if held or self.urgent.is_set():
                if not held:
                    report.defer()
                if plan.placement_events:
                    carried[plan.service] = list(plan.placement_events)  # one key per service
                return
            try:
                self.write_service(plan, report)
            except ApiException as e:
                report.wrote("service.error")
                self._hold_back(plan.service, e)
                return
            if plan.service in self.held_back:
                with self._held_lock:
                    self.held_back.pop(plan.service, None)

        self._each(write, [plan for plan in plans if not plan.writes_nothing])
        with self._held_lock:  # forget the services gone
            for service in self.held_back.keys() - {plan.service for plan in plans}:
                del self.held_back[service]
        return carried

    def _hold_back(self, service: str, e: ApiException) -> None:
        """A service whose bookkeeping failed is tried again by the next pass, then, if it fails
        again, after a backoff (1 s doubling to BOOKKEEPING_BACKOFF_CAP_S, reset by a success), not
        on every pass: an API server that keeps refusing one write (a Service with no cluster IP
        left, a quota) costs one request per backoff, not one per pass, and one log line per
        doubling."""
        with self._held_lock:
            failures = self.held_back.get(service, (0, 0.0))[0] + 1
            wait = (
                backoff.delay(failures - 1, 1.0, BOOKKEEPING_BACKOFF_CAP_S, self._rng.random(), jitter=0.5)
                if failures > 1
                else 0.0
            )
            self.held_back[service] = (failures, time.monotonic() + wait)
        if failures & (failures - 1) == 0:  # 1, 2, 4, 8...: one line per doubling
            # (a namespace being deleted refuses its objects' creation: expected, not a warning)
            level = logging.DEBUG if namespace_terminating(e) else logging.WARNING
            log.log(
                level,
                "could not update %s: %s %s (%d times in a row; next try in %.0f s)",
                service,
                e.status,
                e.reason,
                failures,
                wait,
            )

    def write_service(self, plan: pass_plan.Bookkeeping, report: PassReport) -> None:
        """One service's bookkeeping, in the plan's order: events, status, finalizer, Service,
        EndpointSlices (written, then those no longer needed deleted)."""
        for event in plan.events:
            self.post_event(event, report)
        finalizer = plan.finalizer
        if plan.status_patch is not None:
            self.gate()
            updated = self._kept(
                self.custom.patch_namespaced_custom_object_status(
                    names.GROUP,
                    names.VERSION,
                    plan.namespace,
                    names.INFERENCE_SERVICE_PLURAL,
                    plan.name,
                    plan.status_patch,
                )
            )
            report.wrote("inferenceservice.status")
            if finalizer is not None:  # conditional on the object as the status write left it
                finalizer = dataclasses.replace(
                    finalizer, resource_version=updated["metadata"]["resourceVersion"]
                )
        if finalizer is not None:
            self.set_finalizers(finalizer, report)
        if plan.create_service is not None:
            self.gate()
            try:
                self.core.create_namespaced_service(plan.namespace, plan.create_service)
                report.wrote("service.create")
            except ApiException as e:
                if e.status != 409:  # created since this pass listed them
                    raise
        if plan.service_ports is not None:  # a list body is a JSON patch: the ports replaced, not merged
            self.gate()
            name = manifests.service_name(plan.name)
            replace = [{"op": "replace", "path": "/spec/ports", "value": list(plan.service_ports)}]
            self.core.patch_namespaced_service(name, plan.namespace, replace)
            report.wrote("service.patch")
        for w in plan.endpoint_slices:
            self.write_endpoint_slice(w, report)
        for name in plan.slice_deletes:
            self.gate()
            try:
                self.discovery.delete_namespaced_endpoint_slice(name, plan.namespace)
            except ApiException as e:
                if e.status != 404:
                    raise
            report.wrote("endpointslice.delete")

    def write_endpoint_slice(self, w: pass_plan.SliceWrite, report: PassReport) -> None:
        endpoints, ports = w.endpoints, w.ports
        self.gate()
        if w.create:
            try:
                self.discovery.create_namespaced_endpoint_slice(w.namespace, w.body)
                report.wrote("endpointslice.create")
                return
            except ApiException as e:
                if e.status != 409:  # created since this pass listed them: compare with the server's
                    raise
            current = json.loads(
                self.discovery.read_namespaced_endpoint_slice(
                    w.name, w.namespace, _preload_content=False
                ).data
            )
            endpoints = pass_plan.endpoints_patch(current, w.body)
            ports = pass_plan.ports_patch(current.get("ports") or [], w.body["ports"])
        patch = {k: v for k, v in (("endpoints", endpoints), ("ports", ports)) if v is not None}
        if patch:  # both lists are atomic: a merge patch replaces them
            self.gate()
            self.discovery.patch_namespaced_endpoint_slice(w.name, w.namespace, patch)
            report.wrote("endpointslice.patch")

    # --- writes more than one phase makes -------------------------------------------------------

    def post_event(self, event: pass_plan.EventWrite, report: PassReport) -> None:
        """Best effort: a terminating namespace refuses events."""
        self.gate()
        try:
            self.core.create_namespaced_event(event.namespace, event.body())
        except ApiException as e:
            log.debug("event %s on %s/%s not posted: %s", event.reason, event.namespace, event.name, e.status)
            return
        report.wrote("event.create")
        log.info("%s %s/%s: %s", event.reason, event.namespace, event.name, event.message)

    def set_finalizers(self, w: pass_plan.FinalizerWrite, report: PassReport) -> None:
        """A conflict (another controller wrote the service since) or a service already gone is left to
        the next pass."""
        patch = {"metadata": {"finalizers": list(w.finalizers), "resourceVersion": w.resource_version}}
        self.gate()
        try:
            self._kept(
                self.custom.patch_namespaced_custom_object(
                    names.GROUP, names.VERSION, w.namespace, names.INFERENCE_SERVICE_PLURAL, w.name, patch
                )
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise
            log.debug("finalizers of %s not written (%s); next pass", w.service, e.status)
            return
        report.wrote("inferenceservice.finalizer")
