"""The phases of a placement call, on a `Fleet` and its `Svc`s. Pure; no I/O.

- `prepare`: each service's eligible nodes and node target, in processing order (priority, name).
- `keep_stable`: every previous pair still valid stays (node Healthy or Suspect, constraints met,
  within the service's target and the node's memory); higher priorities keep first.
- `fill`: each service, highest priority first, gets nodes up to its target: the best ranked
  Healthy, cool nodes where it fits; then nodes where displacing strictly lower-priority services
  makes room (least urgent victims, then fewest); spread services go domain by domain within
  their max skew. A service still short says why (`why_short`), every node counted once under
  the first constraint it fails, like the scheduler's FailedScheduling.

`place` runs them once over a fresh fleet; `Planner` replays `keep_stable`'s and `fill`'s steps
on kept state, so what they leave in the fleet and the services is all either needs.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from typing import Any

from edgefleet_api.types import Priority
from edgefleet_operator.fleet_types import Assignment, PlacedModel, PlacementSettings, ServiceDemand
from edgefleet_operator.placement.fleet_index import Fleet, Svc, constraints
from edgefleet_operator.placement.reasons import (
    ALREADY_SERVING,
    NEAR_THERMAL_LIMIT,
    NO_MEMORY,
    NODE_DELETED,
    NOT_READY,
    SCALED_DOWN,
    SPREAD_BLOCKED,
    THROTTLED,
)

log = logging.getLogger(__name__)

DISPLACEMENT_SAMPLE = 16
"""Nodes of the least urgent victim class whose victims are counted to find the fewest."""
_LESS_URGENT = {p: tuple(q for q in Priority if q > p) for p in Priority}


def previous_pairs(previous: Assignment | None) -> dict[str, list[str]]:
    """service -> the nodes that held it, each once."""
    pairs: dict[str, list[str]] = defaultdict(list)
    if previous is not None:
        for node, models in previous.by_node.items():
            last = None
            for m in models:
                if m.service != last:  # a service's models are adjacent when sorted
                    pairs[m.service].append(node)
                    last = m.service
    return {s: list(dict.fromkeys(nodes)) for s, nodes in pairs.items()}


def prepare(services: Iterable[ServiceDemand], fleet: Fleet, settings: PlacementSettings) -> list[Svc]:
    """Services in processing order (priority, then name), with eligible nodes and targets."""
    demands: dict[str, ServiceDemand] = {}
    for demand in services:
        if demand.name in demands:
            raise ValueError(f"service {demand.name} is listed twice")
        demands[demand.name] = demand
    ordered = sorted(demands.values(), key=lambda d: (d.priority, d.name))
    svcs = []
    weight = settings.traffic_weight
    for rank, d in enumerate(ordered):
        key = ("eligible", *constraints(d))
        eligible = fleet.eligible_by(key)
        entries = [PlacedModel(d.name, m.name, m.version, m.memory_bytes, weight) for m in d.models]
        if len(entries) > 1:
            entries.sort()
        need = sum(e.memory_budget_bytes for e in entries)
        target = d.target_nodes(len(eligible))
        svcs.append(Svc(d, d.name, d.priority, rank, need, eligible, target, tuple(entries), key))
    return svcs


def keep_stable(svcs: list[Svc], fleet: Fleet, previous: Mapping[str, list[str]]) -> None:
    """Keep every previous pair still valid: node Healthy or Suspect, constraints met, within
    the service's target and the node's memory. Higher priority keeps first; a service over
    its target keeps healthy cool nodes before suspect or hot ones, and a spread service
    keeps round-robin across domains, so trimming takes from the fullest domain."""
    for svc in svcs:
        held = previous.get(svc.name)
        if not held:
            continue
        eligible = svc.eligible
        valid = [node for node in held if node in eligible]
        if len(valid) < len(held):
            svc.lost += [(n, why_not_eligible(svc, n, fleet)) for n in held if n not in eligible]
        if len(valid) > svc.target:
            valid = keep_order(svc, valid, fleet)
            svc.lost += [(node, SCALED_DOWN) for node in valid[svc.target :]]
            del valid[svc.target :]
        # Each pair is on its own node: the order does not matter for memory.
        svc.lost += [(node, NO_MEMORY) for node in fleet.keep(svc, valid)]


def keep_order(svc: Svc, nodes: list[str], fleet: Fleet) -> list[str]:
    """`nodes` in the order a service over its target keeps them: healthy cool nodes first, then
    by rank; a spread service round-robin across domains (trimming takes from the fullest)."""
    base = fleet.rank_key(svc, with_free=False)

    def key(node: str) -> tuple[Any, ...]:
        hot = node in fleet.hot[THROTTLED] or node in fleet.hot[NEAR_THERMAL_LIMIT]
        return (node in fleet.suspect, hot, *base(node))

    nodes = sorted(nodes, key=key)
    if svc.demand.spread is None:
        return nodes
    label = svc.demand.spread.topology_key
    seen: dict[str, int] = defaultdict(int)
    turn = {}
    for node in nodes:
        domain = fleet.nodes[node].labels[label]
        turn[node] = seen[domain]
        seen[domain] += 1
    return sorted(nodes, key=lambda n: (turn[n], key(n)))


def why_not_eligible(svc: Svc, node: str, fleet: Fleet) -> str:
    """Why the service lost a node that left its eligible set (a `lost` entry's reason)."""
    d = svc.demand
    if node not in fleet.nodes:
        return NODE_DELETED
    for reason, nodes in fleet.out.items():
        if node in nodes:
            return f"node {reason}" if reason == NOT_READY else reason
    if node not in fleet.selector_match(d.node_selector):
        return "node selector no longer matches"
    if node in fleet.untolerated(d.tolerations):
        return "untolerated taint"
    assert d.spread is not None, "an ineligible node must fail one constraint"
    return f"missing spread label {d.spread.topology_key}"


def fill(svc: Svc, fleet: Fleet) -> None:
    """Add nodes up to the target: fitting nodes first, then by displacing lower priorities."""
    short = svc.target - len(svc.nodes)
    if short <= 0:
        return
    if svc.demand.spread is not None:
        blocked = _fill_spread(svc, fleet, short)
    else:
        blocked = frozenset()
        for node in list(itertools.islice(fleet.fitting(svc), short)):
            _add_new(svc, node, (), fleet)
        short = svc.target - len(svc.nodes)
        if short > 0:
            for node, victims in _displaceable(svc, fleet, short)[:short]:
                _add_new(svc, node, victims, fleet)
    if len(svc.nodes) < svc.target:
        svc.message = why_short(svc, fleet, blocked)
        svc.roomless = not blocked  # spread: blocked holds every candidate with room
        log.debug("placement: %s short: %s", svc.name, svc.message)


def _room_by_displacement(svc: Svc, fleet: Fleet) -> dict[Priority, list[str]]:
    """Placeable candidates where the service does not fit now but would after evicting
    strictly lower-priority services, by the most urgent priority that would have to go."""
    if svc.priority == Priority.LOW:
        return {}
    need, free, holders = svc.need, fleet.free, svc.nodes
    room = fleet.room_for(svc.priority)  # placeable nodes only
    rest = [n for n in svc.eligible if room.get(n, -1) >= need and free[n] < need and n not in holders]
    found = {}
    for p in reversed(_LESS_URGENT[svc.priority]):  # least urgent first
        # Evicting priority p and everything less urgent frees the room of the next more urgent.
        freed = fleet.room_for(Priority(p - 1))
        found[p] = [n for n in rest if freed[n] >= need]
        rest = [n for n in rest if freed[n] < need]
    assert not rest
    return found


def _displaceable(
    svc: Svc, fleet: Fleet, wanted: int, room: Mapping[Priority, list[str]] | None = None
) -> list[tuple[str, tuple[Svc, ...]]]:
    """Nodes where evicting lower-priority services makes room, with the victims, cheapest
    first: least urgent victims, then fewest, then the usual ranking. With `wanted`, stops
    after the priority class that brings the count to `wanted` (the rest would rank after),
    and weighs victim counts over the best-ranked DISPLACEMENT_SAMPLE nodes of a class (at
    least 4 x `wanted`), like the scheduler's preemption, which samples its candidates.
    `room`: the candidates by victim class, if already known (`_room_by_displacement`)."""
    key = fleet.rank_key(svc)
    found: list[tuple[str, tuple[Svc, ...]]] = []
    if room is None:
        room = _room_by_displacement(svc, fleet)
    for _, nodes in sorted(room.items(), reverse=True):
        batch, singles = [], 0
        ranked = fleet.ranked(svc, nodes)
        del ranked[max(DISPLACEMENT_SAMPLE, 4 * (wanted - len(found))) :]
        for node in ranked:
            victims = fleet.victims(svc, node)
            assert victims is not None
            batch.append((node, victims))
            singles += len(victims) == 1
            if singles >= wanted - len(found):
                break  # nothing later in rank order can beat single-victim nodes ranked earlier
        batch.sort(key=lambda nv: (len(nv[1]), key(nv[0])))
        found += batch
        if len(found) >= wanted:
            break
    return found


def _add_new(svc: Svc, node: str, victims: tuple[Svc, ...], fleet: Fleet) -> None:
    for victim in victims:
        assert victim.priority > svc.priority and victim.rank > svc.rank
        fleet.remove(victim, node)
        victim.displaced.append((node, f"{svc.priority.name.lower()} service {svc.name}"))
        fleet.displaced.append(victim)
    fleet.add(svc, node)
    svc.gained.append(node)


def _fill_spread(svc: Svc, fleet: Fleet, short: int) -> frozenset[str]:
    """Add nodes domain by domain: each new node goes to a domain that stays within max skew of
    the least-loaded eligible domain, preferring no displacement, then the least-loaded
    domain. Returns the candidates left unused because the skew blocked them."""
    assert svc.demand.spread is not None
    label, max_skew = svc.demand.spread.topology_key, svc.demand.spread.max_skew
    domain_of = fleet.domain_map(label)
    counts = dict.fromkeys(fleet.domains(svc.demand), 0)
    for node in svc.nodes:
        counts[domain_of[node]] += 1
    queues: dict[str, deque[tuple[str, tuple[Svc, ...] | None]]] = {d: deque() for d in counts}
    fits = fleet.fitting(svc)
    displacing = svc.priority < Priority.LOW

    def pull(cap: int) -> None:
        """Queue ranked candidates until every domain has `cap` (or there are no more); the
        nodes where displacement makes room come after all fitting ones."""
        nonlocal displacing
        full = sum(len(q) >= cap for q in queues.values())
        for node in fits:
            queue = queues[domain_of[node]]
            queue.append((node, None))
            full += len(queue) == cap
            if full == len(queues):
                return
        if displacing:  # per domain: at most `short` of a domain's nodes can be used
            displacing = False
            by_domain: dict[str, dict[Priority, list[str]]] = defaultdict(dict)
            for p, nodes in _room_by_displacement(svc, fleet).items():
                for node in nodes:
                    by_domain[domain_of[node]].setdefault(p, []).append(node)
            for domain, room in by_domain.items():
                queues[domain].extend(_displaceable(svc, fleet, short, room)[:short])

    pull(short)
    while short > 0:
        floor = min(counts.values(), default=0)
        open_ = [d for d, q in queues.items() if q and counts[d] + 1 - floor <= max_skew]
        if not open_:
            break
        domain = min(open_, key=lambda d: (queues[d][0][1] is not None, counts[d], d))
        node, victims = queues[domain].popleft()
        _add_new(svc, node, victims or (), fleet)
        counts[domain] += 1
        short -= 1
    if short == 0:
        return frozenset()
    # Short: every candidate the skew kept out, for the message. Listed afresh: `fits` walked
    # the free-memory order, which the placements above have since changed.
    blocked = set(fleet.fitting(svc))
    if svc.priority < Priority.LOW:
        blocked.update(n for nodes in _room_by_displacement(svc, fleet).values() for n in nodes)
    return frozenset(blocked)


def why_short(svc: Svc, fleet: Fleet, spread_blocked: frozenset[str]) -> str:
    """FailedScheduling-style: every node counted once, under the first constraint it fails.
    Counted by intersecting the eligible set with the small ones (suspect, hot, spread-blocked)."""
    counts = dict(fleet.ineligible_reasons(svc.demand))
    eligible, held = svc.eligible, svc.nodes  # held <= eligible
    if held:
        counts[ALREADY_SERVING] = len(held)
    rest = len(eligible) - len(held)
    parts = fleet.no_new_work()
    if spread_blocked:  # candidates, so in none of the parts
        parts = (*parts, (SPREAD_BLOCKED, spread_blocked))
    for reason, nodes in parts:
        hit = len(eligible.intersection(nodes)) - (len(held.intersection(nodes)) if held else 0)
        if hit:
            counts[reason] = hit
            rest -= hit
    if rest:  # placeable, eligible, not serving it: no room even after displacement
        counts[NO_MEMORY] = rest
    assert sum(counts.values()) == len(fleet.names)
    head = f"placed on {len(svc.nodes)}/{svc.target} nodes"
    if svc.displaced:
        head += f" ({len(svc.displaced)} lost to higher-priority services)"
    ranked = sorted(counts.items(), key=lambda rn: (-rn[1], rn[0]))
    reasons = ", ".join(f"{n} {r}" for r, n in ranked)
    return f"{head}; 0/{len(fleet.names)} nodes available" + (f": {reasons}" if reasons else "")
