"""The fleet reconcile: read the fleet, decide, write what changed.

One pass reads Nodes, EdgeNodes, agent Leases and InferenceServices (`fleet_read`); judges node
health and runs placement (a pure function; a `Planner` kept between passes re-plans only what
changed nodes reach); then, phase by phase, decides the writes (`pass_plan`, pure, with the pass's
clock value passed in) and applies them (`fleet_writer`), writing only the differences:

1. EdgeNodes for the fleet's Nodes;
2. each service's rollout step: its status.rollout BEFORE any EdgeNode spec built from it;
3. EdgeNode specs;
4. finalizer releases of deleted services no spec holds any more;
5. agent Pods (created where a node has work, deleted where it has none);
6. each service's bookkeeping (events, status, finalizer, Service, EndpointSlice).

Only the holder of the fleet's shard writes (`ownership`, `fleet_loop`): `gate` is called before the
pass, before every phase and before every single write, and raises `ownership.HoldLost` once the
hold is gone, which stops the pass where it is (the next holder's pass completes it, as after a
crash).

A phase decides from what the phases before it wrote (the pass keeps its `FleetRead` current). Every
write is idempotent and derived from what is read, so a pass interrupted anywhere (an operator
killed mid-way) is completed by the next one with no duplicates: object names are deterministic and
a create that finds the object is a no-op.

When urgent work arrives meanwhile (a service created, its spec changed, or deleted), the Pod syncs
and bookkeeping not yet started are left to the next pass, which starts at once: a burst of new
services is placed pass after pass without waiting for the earlier ones' Pods and bookkeeping
(their placement events are carried over).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from kubernetes import client

from edgefleet_api import names, wire
from edgefleet_api.inference_service import service_key
from edgefleet_api.rollout_status import RolloutStatus
from edgefleet_operator import fleet_state, pass_plan, peers, rollout
from edgefleet_operator.fleet_read import FleetRead, FleetReader, FleetSource, Obj, ServiceRead
from edgefleet_operator.fleet_types import Health, NodeState, PlacedModel, PlacementEvent, PlacementResult
from edgefleet_operator.fleet_writer import FleetWriter
from edgefleet_operator.health import HealthTracker, Recovery
from edgefleet_operator.metrics import OperatorMetrics
from edgefleet_operator.ownership import FLEET_SHARD, HoldLost, site_shard, site_shards
from edgefleet_operator.pass_report import PassReport
from edgefleet_operator.placement import Planner
from edgefleet_operator.settings import OperatorSettings

log = logging.getLogger(__name__)


class FleetReconciler:
    """Reads the fleet, decides, and writes the decisions. Synchronous; one pass at a time."""

    def __init__(
        self,
        api_client: Any,
        settings: OperatorSettings,
        metrics: OperatorMetrics,
        clock: Callable[[], float] = time.time,
        identity: str = "",
        source: FleetSource | None = None,
    ) -> None:
        self.settings = settings
        self.gate: Callable[[str], None] = _always
        """Raises `ownership.HoldLost` when this replica may no longer write for a shard (`fleet_loop`
        sets it); by default it always may (a single instance, or a test's reconciler)."""
        every = frozenset({FLEET_SHARD, *site_shards(settings.ownership.site_shards)})
        self.held: Callable[[], frozenset[str]] = lambda: every
        """The shards this replica holds now (`fleet_loop` sets it); by default all of them."""
        self.metrics = metrics
        self.clock = clock
        # Typed as Any: the client takes plain dicts (the API's JSON) where its stubs name models.
        core: Any = client.CoreV1Api(api_client)
        custom: Any = client.CustomObjectsApi(api_client)
        discovery: Any = client.DiscoveryV1Api(api_client)
        self.reader: FleetSource = source or FleetReader(
            core, custom, client.CoordinationV1Api(api_client), discovery, settings
        )
        """Where passes read the fleet: lists per pass by default, the watch-fed cache in the operator."""
        self.urgent = threading.Event()
        """Set (from any thread) when work on the serving path is waiting: the running pass stops
        starting Pod writes and services' bookkeeping. Cleared as a pass begins (its read then sees
        that work)."""
        self.writer = FleetWriter(
            core, custom, discovery, self.urgent, lambda shard: self.gate(shard), identity, self.reader.offer
        )
        self.tracker = HealthTracker(settings.fleet)
        self._recovering: Recovery | None = None
        self._recovery_tenth = 0
        self.node_memo = fleet_state.NodeMemo(self.reader.views.edge_node)
        """Each node's health signals and state, derived again only when its objects change."""
        # Keeps the last pass's plan: a change in some nodes re-plans only what it reaches.
        self.planner = Planner()
        self.observations = rollout.ObservationMemo()
        """The nodes' rollout observations, kept from pass to pass (`rollout.ObservationMemo`)."""
        self._carried: dict[str, list[PlacementEvent]] = {}
        """Placement events of services whose bookkeeping a pass deferred, for the next pass."""

    def forget(self) -> None:
        """Drop what was kept from earlier passes (the planner's last plan, carried events): after a
        hold is (re)gained another replica may have written meanwhile. Node health memory stays: it
        errs towards damping, as after a restart."""
        self.planner = Planner()
        self.observations = rollout.ObservationMemo()
        self._carried = {}

    def lost_sight(self) -> None:
        """The fleet could not be observed since the last pass's read (a pass failed to reach the API
        server, or this replica held no shard): agents' Lease silence meanwhile is not theirs."""
        self.tracker.lost_sight()

    def reconcile_once(self) -> PassReport:
        t0 = time.monotonic()
        report = PassReport()
        self.urgent.clear()  # this pass's read sees what was urgent until now
        try:
            held = self.held()
            fleet = FLEET_SHARD in held
            if fleet:
                self.gate(FLEET_SHARD)
            read = self.reader.read()
            now = self.clock()
            shard_of = self._shards_of(read)
            # The nodes whose per-node work (health, agent Pod) this replica writes.
            mine = {n for n, shard in shard_of.items() if shard in held}
            if fleet:
                self.gate(FLEET_SHARD)
                self._sync_edge_nodes(read, report)
            states = self._node_states(read, now, mine, report)
            self._publish_health(read, report, mine, shard_of)
            live: list[ServiceRead] = []
            result: PlacementResult | None = None
            if fleet:
                deleting = [s for s in read.services if s["metadata"].get("deletionTimestamp")]
                live, result = self._place(read, states, report)
                self.gate(FLEET_SHARD)
                rollouts = self._rollouts(live, result, read, now, report)
                self.gate(FLEET_SHARD)
                # Positional arguments: a test wraps this phase to set `urgent` right after it.
                self._write_edge_node_specs(live, result, rollouts, states, read, now, report)
                self.gate(FLEET_SHARD)
                self._release_finalizers(deleting, read, report)
            self._sync_pods(result, read, report, mine, shard_of)
            if fleet:
                assert result is not None
                self.gate(FLEET_SHARD)
                self._write_services(live, result, rollouts, read, now, report)
                report.unplaced = sum(1 for p in result.services.values() if not p.complete)
            report.nodes, report.services = len(read.nodes), len(live)
            report.seconds = time.monotonic() - t0
            self.metrics.observe_pass(report, report.seconds, ok=True)
            return report
        except HoldLost:
            self.metrics.observe_pass(report, time.monotonic() - t0, ok=False, result="stopped")
            raise
        except Exception:
            self.metrics.observe_pass(report, time.monotonic() - t0, ok=False)
            raise

    def _shards_of(self, read: FleetRead) -> dict[str, str]:
        """Each fleet node -> the shard of its per-node work (its site's; the fleet's without site
        shards)."""
        o = self.settings.ownership
        if o.site_shards == 0:
            return dict.fromkeys((n["metadata"]["name"] for n in read.nodes), FLEET_SHARD)
        return {
            n["metadata"]["name"]: site_shard(
                (n["metadata"].get("labels") or {}).get(o.site_label, ""), o.site_shards
            )
            for n in read.nodes
        }

    # --- the phases, in order ------------------------------------------------------------------

    def _sync_edge_nodes(self, read: FleetRead, report: PassReport) -> None:
        """One EdgeNode per fleet Node; EdgeNodes of Nodes that left the fleet are deleted (ours) or
        left alone (someone else's), and are no part of this pass either way."""
        sync = pass_plan.edge_node_sync(read.nodes, read.edge_nodes)
        read.edge_nodes.update(self.writer.sync_edge_nodes(sync, report))
        for name in (*sync.delete, *sync.ignore):
            del read.edge_nodes[name]

    def _node_states(
        self, read: FleetRead, now: float, mine: Collection[str], report: PassReport
    ) -> list[NodeState]:
        """Every node's state for placement. The health of the nodes in `mine` is judged here (their
        Node and their agent's Lease); the others' is what the holder of their site's shard published
        (`fleet_state.published_health`; Suspect until it has: they keep their work, get none new)."""
        states = []
        memo, reserve = self.node_memo, self.settings.fleet.memory_reserve_fraction
        signals = {
            name: memo.signals(node, read.edge_nodes.get(name), read.leases.get(names.agent_name(name)))
            for node in read.nodes
            if (name := node["metadata"]["name"]) in mine
        }
        self._recovery(self.tracker.begin_pass(now, (s.lease_renew_s for s in signals.values())))
        for node in read.nodes:
            name = node["metadata"]["name"]
            en = read.edge_nodes.get(name)
            if name in mine:
                health = self.tracker.judge(signals[name], now)
            else:
                health = fleet_state.published_health(en) or Health.SUSPECT
            report.health[name] = health.value
            states.append(memo.state(node, en, health, reserve))
        memo.keep_only(report.health)
        self.tracker.forget(set(self.tracker.lost_work_at) - set(report.health))
        return states

    def _recovery(self, recovery: Recovery | None) -> None:
        """Logs a reconnect storm's start, progress (on each tenth of the agents) and end."""
        was, self._recovering = self._recovering, recovery
        if recovery is not None:
            tenth = 10 * recovery.back // max(recovery.expected, 1)
            if was is None or tenth != self._recovery_tenth:
                log.info(
                    "agents coming back after an unobserved span: %d of %d renewed; no silence is "
                    "judged until they are",
                    recovery.back,
                    recovery.expected,
                )
            self._recovery_tenth = tenth
        elif was is not None:
            log.info("agents' reconnect over: %d of %d back; silence is judged again", was.back, was.expected)

    def _publish_health(
        self, read: FleetRead, report: PassReport, mine: Collection[str], shard_of: Mapping[str, str]
    ) -> None:
        """With site shards, the health of the nodes this replica judged goes on their EdgeNodes (on
        change), for whichever replica places."""
        if self.settings.ownership.site_shards == 0:
            return
        judged = {n: Health(report.health[n]) for n in mine}
        self.writer.write_health(pass_plan.health_writes(judged, read.edge_nodes, shard_of), report)

    def _place(
        self, read: FleetRead, states: list[NodeState], report: PassReport
    ) -> tuple[list[ServiceRead], PlacementResult]:
        """Places the live services; returns the services placed (a spec the contract or placement
        cannot read is logged and skipped) and the placement."""
        measured = fleet_state.measured_bytes(read.edge_node(n) for n in read.edge_nodes)
        live, demands = [], []
        for obj in read.services:
            if obj["metadata"].get("deletionTimestamp"):
                continue
            try:
                service = read.views.service(obj)
                demands.append(
                    fleet_state.service_demand(service.key, service.spec, _rollout(service), measured)
                )
            except (
                KeyError,
                TypeError,
                ValueError,
            ) as e:  # the CRD's validation should make this unreachable
                log.warning("skipping %s: %s", service_key(obj), e)
                continue
            live.append(service)
        previous = self.node_memo.assignment(read.edge_nodes, report.health)
        result = self.planner.plan(demands, states, previous)
        report.result, report.incremental_plan = result, self.planner.incremental
        return live, result

    def _rollouts(
        self,
        services: list[ServiceRead],
        result: PlacementResult,
        read: FleetRead,
        now: float,
        report: PassReport,
    ) -> dict[str, pass_plan.RolloutWrite]:
        """Each service's rollout step, its status.rollout written BEFORE any EdgeNode spec built from
        it (a crash in between leaves no node on a revision status does not record); returns the
        steps that stand, by service (a service missing holds this pass)."""
        node_labels = {n["metadata"]["name"]: n["metadata"].get("labels") or {} for n in read.nodes}
        writes = []
        for service in services:
            placed = result.services.get(service.key)
            nodes = placed.nodes if placed else ()
            writes.append(pass_plan.rollout_write(service, nodes, read, node_labels, now, self.observations))
        self.observations.end_pass()
        stood = {ro.service: ro for ro in self.writer.write_rollouts(writes, report)}
        for ro in stood.values():
            for e in ro.decision.events if ro.decision is not None else ():
                report.rollout_events[e.reason] = report.rollout_events.get(e.reason, 0) + 1
        return stood

    def _write_edge_node_specs(
        self,
        services: list[ServiceRead],
        result: PlacementResult,
        rollouts: dict[str, pass_plan.RolloutWrite],
        states: list[NodeState],
        read: FleetRead,
        now: float,
        report: PassReport,
    ) -> None:
        healthy = {s.name for s in states if s.health is Health.HEALTHY}
        writes = pass_plan.edge_node_spec_writes(
            result.assignment.by_node,
            {k: ro.decision for k, ro in rollouts.items() if ro.decision is not None},
            {s.key: s.spec for s in services},
            read,
            {s.name: s.capacity_bytes for s in states},
            wire.rfc3339(now),
            peers.artifact_peers(peers.candidates(read.nodes, read.edge_nodes, healthy)),
        )
        read.edge_nodes.update(self.writer.write_edge_node_specs(writes, report))

    def _release_finalizers(self, deleting: list[Obj], read: FleetRead, report: PassReport) -> None:
        """Drop our finalizer from each deleted service no EdgeNode spec holds any more (this pass wrote
        the specs without it): `kubectl delete` returns once its models are unplaced everywhere."""
        self.writer.write_finalizers(pass_plan.finalizer_releases(deleting, read), report)

    def _sync_pods(
        self,
        result: PlacementResult | None,
        read: FleetRead,
        report: PassReport,
        mine: Collection[str],
        shard_of: Mapping[str, str],
    ) -> None:
        """An agent Pod on every node of `mine` with work, none on those without; failed Pods are
        replaced. Work is this pass's placement when it placed, else the EdgeNode specs."""
        by_node: Mapping[str, tuple[PlacedModel, ...]]
        if result is not None:
            by_node = {n: p for n, p in result.assignment.by_node.items() if n in mine}
        else:
            by_node = self.node_memo.assignment(read.edge_nodes, mine).by_node
        if self.urgent.is_set():  # not even the read: the next pass starts at once
            report.defer(pass_plan.nodes_with_work(by_node))
            return
        self.reader.read_pods(read)
        external = pass_plan.external_agents(read.nodes, self.settings.agent)
        writes = pass_plan.pod_writes(by_node, read.pods, read.edge_nodes, self.settings.agent, external)
        self.writer.sync_pods(writes, report, shard_of)

    def _write_services(
        self,
        services: list[ServiceRead],
        result: PlacementResult,
        rollouts: dict[str, pass_plan.RolloutWrite],
        read: FleetRead,
        now: float,
        report: PassReport,
    ) -> None:
        """Each service's bookkeeping, with its placement events (and those carried from a pass that
        deferred them). A service whose rollout step holds this pass (`_rollouts`) has none: its
        status would describe targets its EdgeNode specs do not have. Its placement events are
        dropped, not carried: its new nodes' specs were not written either, so the next pass places
        it on them again (and says so then)."""
        events: dict[str, list[PlacementEvent]] = {}
        for event in result.events:
            events.setdefault(event.service, []).append(event)
        carried, self._carried = self._carried, {}
        mine = {key: [*carried.get(key, ()), *events.get(key, ())] for key in (s.key for s in services)}
        if self.urgent.is_set():  # not even the reads
            report.defer(len(services))
            self._carried = {key: e for key, e in mine.items() if e}
            return
        self.reader.read_bookkeeping(read)
        stamp, plans = wire.rfc3339(now), []
        for service in services:
            key = service.key
            if key not in rollouts:
                continue  # its rollout holds this pass, and so does its bookkeeping
            plans.append(
                pass_plan.bookkeeping(
                    service,
                    result.services.get(key),
                    rollouts[key],
                    mine[key],
                    read,
                    self.settings.agent.port,
                    stamp,
                    self.settings.agent.grpc_port,
                )
            )
        self._carried |= self.writer.write_bookkeeping(plans, report)


def _always(shard: str) -> None:
    """The gate of a reconciler that always may write."""


def _rollout(service: ServiceRead) -> RolloutStatus | None:
    """The service's status.rollout for placement; one this operator cannot follow counts as none
    here (its rollout step holds the service, and says why)."""
    try:
        return service.rollout()
    except (KeyError, TypeError, ValueError):
        return None
