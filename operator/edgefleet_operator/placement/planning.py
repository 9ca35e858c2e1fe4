"""`place(services, nodes, previous)`: which nodes hold which services' models. A pure function;
no I/O.

It runs named phases:

1. index: nodes by label, taint, health, thermal state and free memory (`Fleet`); each service's
   eligible nodes and node target (`prepare`).
2. keep stable: every (service, node) pair of `previous` that is still valid stays: node Healthy
   or Suspect (hot nodes keep their work), selector, taints and spread label still allow it,
   within the service's target and the node's memory; higher priorities keep first
   (`keep_stable`).
3. fill: each service, highest priority first, gets nodes up to its target: the best ranked
   Healthy, cool nodes where it fits; then nodes where displacing strictly lower-priority
   services makes room (least urgent victims, then fewest); spread services go domain by domain
   within their max skew. A service still short says why, every node counted once under the
   first constraint it fails, like the scheduler's FailedScheduling (`fill`, `why_short`).
4. report: the assignment, per-service results, events (`report`, `service_events`).

Guarantees (`check_invariants` asserts them; the tests call it after every placement):
- the memory placed on a node never exceeds its capacity;
- a service sits only on nodes its selector, tolerations and spread label allow, and only on
  Healthy or Suspect nodes;
- a pair that was not in `previous` is on a Healthy node that is not hot;
- a priority never displaces an equal or higher one; a short service left no node where it
  would fit, even by displacement;
- the result depends on the input's content only: neither list order nor set iteration order
  (hash seeds) changes it; ties go to the node name;
- re-planning from its own result with unchanged input keeps every pair.

How nodes rank and what a call costs: `fleet_index`. At 1,000 nodes x 1,000 services a full plan
takes a few hundred milliseconds and a `place()` re-plan tens (`python -m bench.placement`).
"""

from __future__ import annotations

from collections.abc import Iterable

from edgefleet_operator.fleet_types import (
    Assignment,
    NodeState,
    PlacementEvent,
    PlacementResult,
    PlacementSettings,
    ServiceDemand,
    ServicePlacement,
)
from edgefleet_operator.placement.fleet_index import Fleet, Svc
from edgefleet_operator.placement.phases import fill, keep_stable, prepare, previous_pairs

DEFAULT_SETTINGS = PlacementSettings()


def place(
    services: Iterable[ServiceDemand],
    nodes: Iterable[NodeState],
    previous: Assignment | None = None,
    settings: PlacementSettings = DEFAULT_SETTINGS,
) -> PlacementResult:
    """Decide which nodes hold which services; see the module docstring for the guarantees.

    `previous` is the last assignment (from the EdgeNode specs); its still-valid pairs
    stay. A node absent from `nodes` has been deleted: its work moves. Raises
    ValueError if a service or node name is given twice.
    """
    return place_with_state(services, nodes, previous, settings)[0]


def place_with_state(
    services: Iterable[ServiceDemand],
    nodes: Iterable[NodeState],
    previous: Assignment | None,
    settings: PlacementSettings,
) -> tuple[PlacementResult, Fleet, list[Svc]]:
    """`place`, also returning its final state: the fleet and the services in rank order."""
    fleet = Fleet(nodes, settings)
    svcs = prepare(services, fleet, settings)
    keep_stable(svcs, fleet, previous_pairs(previous))
    fleet.build_order()
    for svc in svcs:
        fill(svc, fleet)
    return report(svcs, fleet, settings), fleet, svcs


def report(svcs: list[Svc], fleet: Fleet, settings: PlacementSettings) -> PlacementResult:
    """The result of a call: every node's models (by service name), every service's nodes,
    target and message, and each service's events."""
    by_node = {}
    for node in sorted(fleet.nodes):
        residents = fleet.residents[node]
        by_node[node] = tuple(e for s in sorted(residents) for e in residents[s].entries)
    services = {}
    events: list[PlacementEvent] = []
    for svc in sorted(svcs, key=lambda s: s.name):
        services[svc.name] = ServicePlacement(tuple(sorted(svc.nodes)), svc.target, svc.message)
        events.extend(service_events(svc, settings.message_nodes))
    return PlacementResult(Assignment(by_node), services, tuple(events))


def service_events(svc: Svc, limit: int) -> list[PlacementEvent]:
    """The service's events of this call (Evicted, Moved, Placed, Removed, FailedPlacement),
    each naming at most `limit` nodes."""
    if not (svc.displaced or svc.lost or svc.gained or svc.message):
        return []

    def names(items: list[str]) -> str:
        items = sorted(items)
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    out = []
    if svc.displaced:
        where = names([f"{node} (by {by})" for node, by in svc.displaced])
        out.append(PlacementEvent(svc.name, "Evicted", f"displaced from {where}"))
    lost = names([f"{node} ({why})" for node, why in svc.lost])
    if svc.lost and svc.gained:
        out.append(PlacementEvent(svc.name, "Moved", f"moved from {lost} to {names(svc.gained)}"))
    elif svc.gained:
        out.append(PlacementEvent(svc.name, "Placed", f"placed on {names(svc.gained)}"))
    elif svc.lost:
        out.append(PlacementEvent(svc.name, "Removed", f"removed from {lost}"))
    if svc.message:
        out.append(PlacementEvent(svc.name, "FailedPlacement", svc.message))
    return out
