"""`check_invariants`: the guarantees of `place` (listed in `planning`'s docstring), asserted on a
result. Recomputes every constraint from the input, without the indexes `place` uses, so a broken
index cannot hide its own mistake. For tests and benchmarks. Pure; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from edgefleet_operator.fleet_types import (
    Assignment,
    Health,
    NodeState,
    PlacementResult,
    PlacementSettings,
    ServiceDemand,
)
from edgefleet_operator.placement.fleet_index import HARD_EFFECTS, tolerated
from edgefleet_operator.placement.planning import DEFAULT_SETTINGS
from edgefleet_operator.placement.reasons import hot_reason


def check_invariants(
    result: PlacementResult,
    services: Iterable[ServiceDemand],
    nodes: Iterable[NodeState],
    previous: Assignment | None = None,
    settings: PlacementSettings = DEFAULT_SETTINGS,
) -> None:
    """Assert the guarantees of `place` on its result (see `planning`'s docstring), recomputing
    every constraint from the input without the indexes `place` uses."""
    demands = {s.name: s for s in services}
    by_name = {n.name: n for n in nodes}
    before = set(previous.pairs()) if previous is not None else set()
    assignment = result.assignment
    assert set(assignment.by_node) == set(by_name), "every node, and only those, appears"
    assert set(result.services) == set(demands), "every service appears"
    for name, node in by_name.items():
        used = assignment.used_bytes(name)
        assert used <= node.capacity_bytes, f"{name}: {used} bytes, capacity {node.capacity_bytes}"
    for service, name in assignment.pairs():
        d, node = demands[service], by_name[name]
        assert _allows(d, node), f"{service} on {name}, which it may not use"
        if (service, name) not in before:
            assert node.health is Health.HEALTHY, f"new {service} on {node.health} {name}"
            hot = hot_reason(node, settings.thermal_margin_c)
            assert hot is None, f"new {service} on {hot} {name}"
        placed = [
            (m.model, m.version, m.memory_budget_bytes)
            for m in assignment.by_node[name]
            if m.service == service
        ]
        wanted = [(m.name, m.version, m.memory_bytes) for m in d.models]
        assert sorted(placed) == sorted(wanted), f"{service} on {name}: models or budgets differ"
    for service, sp in result.services.items():
        d = demands[service]
        assert sp.nodes == assignment.nodes_of(service)
        assert sp.target == d.target_nodes(sum(_allows(d, n) for n in by_name.values()))
        assert len(sp.nodes) <= sp.target, f"{service}: over its target"
        assert bool(sp.message) == (len(sp.nodes) < sp.target), f"{service}: message iff short"
        if sp.message:  # every node counted once, under one reason
            counted = re.search(r"nodes available(?:: (.*))?$", sp.message)
            assert counted is not None, sp.message
            total = sum(int(part.split(" ", 1)[0]) for part in (counted[1] or "").split(", ") if part)
            assert total == len(by_name), f"{service}: {sp.message}"
        if d.spread is None and len(sp.nodes) < sp.target:
            _assert_no_room_left(service, d, by_name, demands, assignment, settings)
        if d.spread is not None and not before:
            label = d.spread.topology_key
            counts = dict.fromkeys((n.labels[label] for n in by_name.values() if _allows(d, n)), 0)
            for name in sp.nodes:
                counts[by_name[name].labels[label]] += 1
            assert not counts or max(counts.values()) - min(counts.values()) <= d.spread.max_skew


def _assert_no_room_left(
    service: str,
    d: ServiceDemand,
    nodes: Mapping[str, NodeState],
    demands: Mapping[str, ServiceDemand],
    assignment: Assignment,
    settings: PlacementSettings,
) -> None:
    """A short service (without spread) left no node where it fits, even by displacement."""
    for name, node in nodes.items():
        models = assignment.by_node[name]
        if node.health is not Health.HEALTHY or hot_reason(node, settings.thermal_margin_c):
            continue
        if not _allows(d, node) or any(m.service == service for m in models):
            continue
        free = node.capacity_bytes - sum(m.memory_budget_bytes for m in models)
        lower = sum(m.memory_budget_bytes for m in models if demands[m.service].priority > d.priority)
        assert free + lower < d.memory_bytes, f"{service} is short but would fit on {name}"


def _allows(d: ServiceDemand, node: NodeState) -> bool:
    """The service may run on the node: Healthy or Suspect, selector, taints, spread label."""
    hard = tuple(t for t in node.taints if t.effect in HARD_EFFECTS)
    return (
        node.health in (Health.HEALTHY, Health.SUSPECT)
        and all(node.labels.get(k) == v for k, v in d.node_selector.items())
        and tolerated(hard, d.tolerations)
        and (d.spread is None or d.spread.topology_key in node.labels)
    )
