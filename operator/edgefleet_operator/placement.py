"""Fleet placement: which nodes hold which services' models. A pure function; no I/O.

`place(services, nodes, previous)` runs named phases:

1. index: nodes by label, taint, health, thermal state and free memory (`_Fleet`);
   each service's eligible nodes and node target (`_prepare`).
2. keep stable: every (service, node) pair of `previous` that is still valid stays:
   node Healthy or Suspect (hot nodes keep their work), selector, taints and spread
   label still allow it, within the service's target and the node's memory; higher
   priorities keep first (`_keep_stable`).
3. fill: each service, highest priority first, gets nodes up to its target: the best
   ranked Healthy, cool nodes where it fits; then nodes where displacing strictly
   lower-priority services makes room (`_displaceable`: least urgent victims, then
   fewest); spread services go domain by domain within their max skew
   (`_fill_spread`). A service still short says why, every node counted once under
   the first constraint it fails, like the scheduler's FailedScheduling (`_why_short`).
4. report: the assignment, per-service results, events (`_report`).

Guarantees (`check_invariants` asserts them; the tests call it after every placement):
- the memory placed on a node never exceeds its capacity;
- a service sits only on nodes its selector, tolerations and spread label allow,
  and only on Healthy or Suspect nodes;
- a pair that was not in `previous` is on a Healthy node that is not hot;
- a priority never displaces an equal or higher one; a short service left no node
  where it would fit, even by displacement;
- the result depends on the input's content only: neither list order nor set
  iteration order (hash seeds) changes it; ties go to the node name;
- re-planning from its own result with unchanged input keeps every pair.

Ranking (best first): fewest untolerated PreferNoSchedule taints, then SLA record
(met at least `sla_unknown_score` of windows > no record > worse), then most free
memory (spreads load like the scheduler's LeastAllocated), then node name.

Cost: selectors are set intersections over a label index, cached per distinct
constraint set; a service that may use much of the fleet walks one list of nodes
sorted by free memory and stops at its k-th node (or where memory runs out), a
selective one sorts only its own candidates; a failed-placement message is counted
over small sets. At 1,000 nodes x 1,000 services a full plan takes a few hundred
milliseconds and a `place()` re-plan tens (`python -m bench.placement`).

`Planner` is `place` for a loop that re-plans the same fleet: it keeps the last call's
indexes and result and, when only some nodes' health, heat, capacity or SLA records
changed and `previous` is its last result, re-plans only what that change reaches
(a node failure at that scale: about 15 ms of CPU). Its results equal `place()`'s;
any other change (labels, taints, nodes or services added, removed or edited,
another `previous`) makes it plan from scratch.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from edgefleet_api.types import Priority
from edgefleet_operator.fleet_types import (
    NO_EXECUTE,
    NO_SCHEDULE,
    PREFER_NO_SCHEDULE,
    Assignment,
    Health,
    NodeState,
    PlacedModel,
    PlacementEvent,
    PlacementResult,
    PlacementSettings,
    ServiceDemand,
    ServicePlacement,
    Taint,
    Toleration,
)

log = logging.getLogger(__name__)

__all__ = ["check_invariants", "hot_reason", "place"]

WALK_SHARE = 4
"""A service whose candidate nodes (eligible, not yet holding it) number at least 1/WALK_SHARE
of the placeable fleet walks the fleet's free-memory order and stops at its k-th node; a more
selective one sorts its own candidates. Both rank alike; this only picks the cheaper way."""
WALK_BUDGET = 1
"""A walk that has passed WALK_BUDGET x (its candidate count) entries without finishing sorts
the rest of its candidates instead, so a walk never costs much more than a sort."""

DISPLACEMENT_SAMPLE = 16
"""Nodes of the least urgent victim class whose victims are counted to find the fewest."""

# Why a node cannot take a service, in the order a node is counted (each node once).
NOT_READY = "not ready"
AGENT_SILENT = "agent silent"
NO_SELECTOR_MATCH = "didn't match node selector"
UNTOLERATED_TAINT = "had untolerated taint"
MISSING_LABEL = "missing spread label"
ALREADY_SERVING = "already serving it"
SUSPECT = "suspect (no new work)"
THROTTLED = "thermally throttled"
NEAR_THERMAL_LIMIT = "near thermal limit"
SPREAD_BLOCKED = "didn't satisfy spread constraint"
NO_MEMORY = "insufficient memory"
# Why a service lost a node it held.
NODE_DELETED = "node deleted"
SCALED_DOWN = "scaled down"

DEFAULT_SETTINGS = PlacementSettings()
_HARD_EFFECTS = (NO_SCHEDULE, NO_EXECUTE)
_LESS_URGENT = {p: tuple(q for q in Priority if q > p) for p in Priority}
_DISPLACERS = {q: tuple(p for p in Priority if q <= p < Priority.LOW) for q in Priority}
"""priority q -> the priorities p that may displace something and whose room a service of
priority q uses up (p >= q: q is not below p)."""


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
    return _place(services, nodes, previous, settings)[0]


def _place(
    services: Iterable[ServiceDemand],
    nodes: Iterable[NodeState],
    previous: Assignment | None,
    settings: PlacementSettings,
) -> tuple[PlacementResult, _Fleet, list[_Svc]]:
    """`place`, also returning its final state: the fleet and the services in rank order."""
    fleet = _Fleet(nodes, settings)
    svcs = _prepare(services, fleet, settings)
    _keep_stable(svcs, fleet, _previous_pairs(previous))
    fleet.build_order()
    for svc in svcs:
        _fill(svc, fleet)
    return _report(svcs, fleet, settings), fleet, svcs


def hot_reason(node: NodeState, margin_c: float) -> str | None:
    """THROTTLED, NEAR_THERMAL_LIMIT (within `margin_c` of the soft limit) or None."""
    if node.throttled:
        return THROTTLED
    temp, limit = node.temperature_c, node.soft_limit_c
    if temp is not None and limit is not None and temp >= limit - margin_c:
        return NEAR_THERMAL_LIMIT
    return None


# --- per-call state ----------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Svc:
    """A service during one placement call."""

    demand: ServiceDemand
    name: str
    priority: Priority
    rank: int
    """Position in processing order: (priority, name)."""
    need: int
    """Bytes the service needs on each node."""
    eligible: frozenset[str]
    target: int
    entries: tuple[PlacedModel, ...]
    eligible_key: tuple[object, ...]
    """The fleet's cache key of `eligible` (shared by services with the same constraints)."""
    nodes: set[str] = field(default_factory=set)
    gained: list[str] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)
    """(node, why) for nodes lost other than by displacement."""
    displaced: list[tuple[str, str]] = field(default_factory=list)
    """(node, by whom) for nodes lost to higher-priority services."""
    message: str = ""
    roomless: bool = False
    """Set when a fill leaves the service short: True if then no node it may newly use had room
    for it, even by displacement (always, without spread; with spread, unless the skew held
    back nodes with room)."""


class _Fleet:
    """Indexed nodes and the memory placed so far. Mutated only by `add`, `remove`, `keep` and
    (between calls, by `Planner`) `restate`; after each, every index equals what a fresh
    `_Fleet` over the same nodes and pairs would hold (`Planner.check_state` asserts it)."""

    def __init__(self, nodes: Iterable[NodeState], settings: PlacementSettings) -> None:
        self.settings = settings
        self.nodes: dict[str, NodeState] = {}
        for node in nodes:
            if node.name in self.nodes:
                raise ValueError(f"node {node.name} is listed twice")
            self.nodes[node.name] = node
        self.names = frozenset(self.nodes)
        self.out: dict[str, set[str]] = {NOT_READY: set(), AGENT_SILENT: set()}
        self.suspect: set[str] = set()
        self.hot: dict[str, set[str]] = {THROTTLED: set(), NEAR_THERMAL_LIMIT: set()}
        self.placeable: set[str] = set()
        """Healthy and not hot: may receive new work."""
        self.free: dict[str, int] = {}
        self.residents: dict[str, dict[str, _Svc]] = {}
        self.bytes_at: dict[Priority, dict[str, int]] = {p: {} for p in Priority}
        """priority -> node -> bytes placed there by services of that priority (no zeros)."""
        self.label_index: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.hard_taints: dict[str, tuple[Taint, ...]] = {}
        self.soft_taints: dict[str, tuple[Taint, ...]] = {}
        self.sla: dict[str, dict[str, float]] = {}
        """service -> node -> worst SLA score of the service's models there."""
        self.order: list[tuple[int, str]] = []
        """(-free bytes, name) of placeable nodes, sorted; built after the keep phase."""
        self._order_built = False
        self._cache: dict[tuple, Any] = {}
        self.room: dict[Priority, dict[str, int]] = {}
        """p -> placeable node -> free bytes + bytes of services less urgent than p there: what
        a service of priority p could have by displacement. Built on first use."""
        self._eviction_order: dict[str, list[_Svc]] = {}
        """node -> its residents, least urgent first (then largest, then name); dropped when
        the node changes."""
        self.displaced: list[_Svc] = []
        """Services displaced during fills, in order (one entry per lost node)."""
        for name in sorted(self.nodes):
            self._index(self.nodes[name])

    def _index(self, node: NodeState) -> None:
        name = node.name
        self.residents[name] = {}
        self._index_state(node)
        index = self.label_index
        for item in node.labels.items():
            index[item].add(name)
        if node.taints:
            hard = tuple(t for t in node.taints if t.effect in _HARD_EFFECTS)
            soft = tuple(t for t in node.taints if t.effect == PREFER_NO_SCHEDULE)
            if hard:
                self.hard_taints[name] = hard
            if soft:
                self.soft_taints[name] = soft

    def _index_state(self, node: NodeState) -> None:
        """Index what `restate` may change: health, thermal state, capacity, SLA records."""
        name, health = node.name, node.health
        if health is Health.NOT_READY:
            self.out[NOT_READY].add(name)
        elif health is Health.AGENT_SILENT:
            self.out[AGENT_SILENT].add(name)
        else:
            self.free[name] = node.capacity_bytes
            hot = hot_reason(node, self.settings.thermal_margin_c)
            if hot is not None:
                self.hot[hot].add(name)
            if health is Health.SUSPECT:
                self.suspect.add(name)
            elif hot is None:
                self.placeable.add(name)
        sla = self.sla
        for (service, _model), score in node.sla_scores.items():
            per_node = sla.get(service)
            if per_node is None:
                sla[service] = {name: score}
            else:
                old = per_node.get(name)
                if old is None or score < old:
                    per_node[name] = score

    # -- cached node sets, shared by services with the same constraints --

    def selector_match(self, selector: Mapping[str, str]) -> frozenset[str]:
        key = ("selector", frozenset(selector.items()))
        if key not in self._cache:
            sets = sorted((self.label_index.get(item, set()) for item in selector.items()), key=len)
            self._cache[key] = frozenset(sets[0].intersection(*sets[1:])) if sets else self.names
        return self._cache[key]

    def untolerated(self, tolerations: tuple[Toleration, ...]) -> frozenset[str]:
        """Nodes with a NoSchedule or NoExecute taint that no toleration tolerates."""
        key = ("untolerated", tolerations)
        if key not in self._cache:
            self._cache[key] = frozenset(
                n for n, taints in self.hard_taints.items() if not _tolerated(taints, tolerations)
            )
        return self._cache[key]

    def soft_penalty(self, tolerations: tuple[Toleration, ...]) -> dict[str, int]:
        """node -> number of its PreferNoSchedule taints no toleration tolerates (0s left out)."""
        key = ("soft", tolerations)
        if key not in self._cache:
            penalty = {
                n: sum(not any(t.tolerates(taint) for t in tolerations) for taint in taints)
                for n, taints in self.soft_taints.items()
            }
            self._cache[key] = {n: p for n, p in penalty.items() if p}
        return self._cache[key]

    def labelled(self, label: str) -> frozenset[str]:
        key = ("labelled", label)
        if key not in self._cache:
            self._cache[key] = frozenset(n for n, nd in self.nodes.items() if label in nd.labels)
        return self._cache[key]

    def eligible(self, demand: ServiceDemand) -> frozenset[str]:
        """Nodes that count for the service's target: constraints met, Healthy or Suspect."""
        return self.eligible_by(("eligible", *_constraints(demand)))

    def eligible_by(self, key: tuple[Any, ...]) -> frozenset[str]:
        """`eligible` by its cache key: ("eligible", selector items, tolerations, spread label)."""
        if key not in self._cache:
            _, items, tolerations, label = key
            excluded = [self.untolerated(tolerations), *self.out.values()]
            nodes = self.selector_match(dict(items)).difference(*excluded)
            if label is not None:
                nodes &= self.labelled(label)
            self._cache[key] = nodes
        return self._cache[key]

    def _is_eligible(self, node: str, key: tuple[Any, ...]) -> bool:
        """Whether `node` belongs in the set `eligible_by(key)`, checked on that node alone."""
        _, items, tolerations, label = key
        labels = self.nodes[node].labels
        return (
            not any(node in out for out in self.out.values())
            and all(labels.get(k) == v for k, v in items)
            and node not in self.untolerated(tolerations)
            and (label is None or label in labels)
        )

    def no_new_work(self) -> tuple[tuple[str, frozenset[str]], ...]:
        """(reason, nodes) for the live nodes that take no new work, each node under its first
        reason: suspect, throttled, near the thermal limit."""
        key = ("no new work",)
        if key not in self._cache:
            suspect, throttled = frozenset(self.suspect), frozenset(self.hot[THROTTLED])
            near = frozenset(self.hot[NEAR_THERMAL_LIMIT] - suspect - throttled)
            self._cache[key] = (
                (SUSPECT, suspect),
                (THROTTLED, throttled - suspect),
                (NEAR_THERMAL_LIMIT, near),
            )
        return self._cache[key]

    def ineligible_reasons(self, demand: ServiceDemand) -> dict[str, int]:
        """Why the nodes outside the service's eligible set are: each counted once, under its
        first failed constraint (health, selector, taints, spread label). Counted through the
        small sets (down nodes, tainted nodes), never by walking the fleet."""
        key = ("reasons", *_constraints(demand))
        if key not in self._cache:
            label = demand.spread.topology_key if demand.spread else None
            down = self.out[NOT_READY] | self.out[AGENT_SILENT]
            match = self.selector_match(demand.node_selector)
            live_match = len(match) - sum(n in match for n in down)
            untolerated = sum(n in match and n not in down for n in self.untolerated(demand.tolerations))
            eligible = len(self.eligible(demand))
            counts = {
                NOT_READY: len(self.out[NOT_READY]),
                AGENT_SILENT: len(self.out[AGENT_SILENT]),
                NO_SELECTOR_MATCH: len(self.names) - len(down) - live_match,
                UNTOLERATED_TAINT: untolerated,
                f"{MISSING_LABEL} {label}": live_match - untolerated - eligible,
            }
            self._cache[key] = {r: n for r, n in counts.items() if n}
        return self._cache[key]

    def domain_map(self, label: str) -> dict[str, str]:
        """node -> its value of `label`, for the nodes that have it."""
        key = ("domain", label)
        if key not in self._cache:
            self._cache[key] = {n: nd.labels[label] for n, nd in self.nodes.items() if label in nd.labels}
        return self._cache[key]

    def domains(self, demand: ServiceDemand) -> list[str]:
        """The spread domains of the service's eligible nodes, sorted."""
        assert demand.spread is not None
        label = demand.spread.topology_key
        key = ("domains", *_constraints(demand))
        if key not in self._cache:
            domain_of = self.domain_map(label)
            self._cache[key] = sorted({domain_of[n] for n in self.eligible(demand)})
        return self._cache[key]

    # -- memory accounting --

    def build_order(self) -> None:
        self.order = sorted((-self.free[n], n) for n in self.placeable)
        self._order_built = True

    def _set_free(self, node: str, free: int) -> None:
        assert free >= 0, f"node {node} over its memory"
        if self._order_built and node in self.placeable:
            i = bisect.bisect_left(self.order, (-self.free[node], node))
            assert self.order[i] == (-self.free[node], node)
            del self.order[i]
            bisect.insort(self.order, (-free, node))
        self.free[node] = free

    def _room_changed(self, svc: _Svc, node: str, delta: int) -> None:
        for p in _DISPLACERS[svc.priority]:  # lower priorities move free and room alike
            room = self.room[p]
            if node in room:
                room[node] += delta

    def room_for(self, priority: Priority) -> dict[str, int]:
        if not self.room:
            assert self._order_built
            at = self.bytes_at
            low, normal, high = at[Priority.LOW], at[Priority.NORMAL], at[Priority.HIGH]
            rooms: dict[Priority, dict[str, int]] = {p: {} for p in Priority if p < Priority.LOW}
            r_normal, r_high, r_critical = (rooms[Priority.NORMAL], rooms[Priority.HIGH],
                                            rooms[Priority.CRITICAL])  # fmt: skip
            for node in self.placeable:
                room = self.free[node] + low.get(node, 0)
                r_normal[node] = room
                room += normal.get(node, 0)
                r_high[node] = room
                r_critical[node] = room + high.get(node, 0)
            self.room = rooms
        return self.room[priority]

    def add(self, svc: _Svc, node: str) -> None:
        assert svc.name not in self.residents[node]
        self._eviction_order.pop(node, None)
        if self.room:
            self._room_changed(svc, node, -svc.need)
        self._set_free(node, self.free[node] - svc.need)
        self.residents[node][svc.name] = svc
        if svc.need:
            at = self.bytes_at[svc.priority]
            at[node] = at.get(node, 0) + svc.need
        svc.nodes.add(node)

    def keep(self, svc: _Svc, nodes: list[str]) -> list[str]:
        """`add` for the keep phase, before the free-memory order exists: adds the service to
        each node where it fits; returns the nodes where it no longer does."""
        assert not self._order_built
        free, residents, need, name = self.free, self.residents, svc.need, svc.name
        at, held, rejected = self.bytes_at[svc.priority], svc.nodes, []
        for node in nodes:
            left = free[node] - need
            if left < 0:
                rejected.append(node)
                continue
            free[node] = left
            residents[node][name] = svc
            if need:
                at[node] = at.get(node, 0) + need
            held.add(node)
        return rejected

    def remove(self, svc: _Svc, node: str) -> None:
        del self.residents[node][svc.name]
        self._eviction_order.pop(node, None)
        if self.room:
            self._room_changed(svc, node, svc.need)
        self._set_free(node, self.free[node] + svc.need)
        if svc.need:
            at = self.bytes_at[svc.priority]
            at[node] -= svc.need
            if not at[node]:
                del at[node]
        svc.nodes.remove(node)

    def restate(self, node: NodeState) -> bool:
        """Replace a node's state by one that differs from it only in what `_index_state` reads
        (health, thermal state, capacity, SLA records). The node must hold nothing: `remove`
        its residents first, `add` back those that stay. Returns whether its NotReady or
        AgentSilent status changed; then call `refresh_eligible` before reading eligible sets."""
        name = node.name
        assert not self.residents[name], f"restate {name}: remove its residents first"
        was_out = [name in out for out in self.out.values()]
        if name in self.placeable:
            if self._order_built:
                i = bisect.bisect_left(self.order, (-self.free[name], name))
                assert self.order[i] == (-self.free[name], name)
                del self.order[i]
            for room in self.room.values():
                del room[name]
            self.placeable.discard(name)
        self.suspect.discard(name)
        for nodes in (*self.out.values(), *self.hot.values()):
            nodes.discard(name)
        self.free.pop(name, None)
        self._eviction_order.pop(name, None)
        self._cache.pop(("no new work",), None)
        for service, _model in self.nodes[name].sla_scores:
            per_node = self.sla.get(service)
            if per_node is not None:
                per_node.pop(name, None)
        self.nodes[name] = node
        self._index_state(node)
        if name in self.placeable:
            if self._order_built:
                bisect.insort(self.order, (-self.free[name], name))
            for room in self.room.values():
                room[name] = self.free[name]  # nothing placed there: room is the free memory
        return was_out != [name in out for out in self.out.values()]

    def refresh_eligible(self, nodes: Iterable[str]) -> list[tuple[Any, ...]]:
        """After `restate` changed whether `nodes` are out of service: update the cached
        eligible sets they enter or leave, drop the caches derived from them. Returns the
        keys of the eligible sets that changed."""
        nodes, changed = list(nodes), []
        for key, value in list(self._cache.items()):
            if key[0] == "eligible":
                joined = {n for n in nodes if n not in value and self._is_eligible(n, key)}
                left = {n for n in nodes if n in value and not self._is_eligible(n, key)}
                if joined or left:
                    self._cache[key] = (value - left) | joined
                    changed.append(key)
            elif key[0] in ("reasons", "domains"):
                del self._cache[key]
        return changed

    # -- ranking --

    def rank_key(self, svc: _Svc, with_free: bool = True) -> Callable[[str], tuple]:
        """Sort key of a node for a service, best first (see the module docstring)."""
        penalty = self.soft_penalty(svc.demand.tolerations)
        sla = self.sla.get(svc.name, {})
        unknown = self.settings.sla_unknown_score
        free = self.free

        def key(node: str) -> tuple:
            score = sla.get(node)
            tier = 1 if score is None else 0 if score >= unknown else 2
            s = unknown if score is None else score
            return (penalty.get(node, 0), tier, -s, -free[node] if with_free else 0, node)

        return key

    def ranked(self, svc: _Svc, nodes: Iterable[str]) -> list[str]:
        """`sorted(nodes, key=self.rank_key(svc))`, with the plain nodes (no soft-taint penalty,
        no SLA record) sorted as (-free, name) tuples, without calling the key on each."""
        special = self.soft_penalty(svc.demand.tolerations).keys() | self.sla.get(svc.name, {})
        key, free = self.rank_key(svc), self.free
        marked, plain = [], []
        for node in nodes:
            if node in special:
                marked.append(node)
            else:
                plain.append((-free[node], node))
        marked.sort(key=key)
        plain.sort()
        head = [n for n in marked if key(n)[:2] < (0, 1)]
        tail = marked[len(head) :]
        return head + [n for _, n in plain] + tail

    def fitting(self, svc: _Svc) -> Iterator[str]:
        """Placeable nodes where the service fits and is not yet, best first (lazy).

        Nodes that differ from the plain order by free memory (an SLA record for the service,
        an untolerated soft taint) are few: they are ranked apart with the full key and go
        before or after the plain ones. The plain ones are either sorted (a selective
        service) or taken by walking the fleet's free-memory order, which ends where memory
        runs out and, past its budget, sorts the candidates left instead.
        """
        need, eligible, holders = svc.need, svc.eligible, svc.nodes
        free, placeable, key = self.free, self.placeable, self.rank_key(svc)
        special = self.soft_penalty(svc.demand.tolerations).keys() | self.sla.get(svc.name, {})
        ranked = sorted(
            (n for n in special if n in eligible and n in placeable and n not in holders and free[n] >= need),
            key=key,
        )
        plain = (0, 1)  # no soft-taint penalty, no SLA record
        yield from (n for n in ranked if key(n)[:2] < plain)
        candidates = len(eligible) - len(holders)
        if candidates * WALK_SHARE < len(self.order):
            yield from self._sorted_plain(svc, special, None)
        else:
            budget = WALK_BUDGET * candidates
            for seen, entry in enumerate(self.order):
                neg_free, n = entry
                if -neg_free < need:
                    break
                if seen >= budget:  # mostly strangers so far: sort the candidates left instead
                    yield from self._sorted_plain(svc, special, entry)
                    break
                if n in eligible and n not in holders and n not in special:
                    yield n
        yield from (n for n in ranked if key(n)[:2] > plain)

    def _sorted_plain(self, svc: _Svc, special: Set[str], start: tuple[int, str] | None) -> Iterator[str]:
        """Fitting candidates without a special rank, by (-free, name), from `start` on."""
        free, placeable, holders = self.free, self.placeable, svc.nodes
        pool = svc.eligible - holders if holders else svc.eligible
        plain = [(-free[n], n) for n in pool if n in placeable and n not in special]
        plain.sort()
        begin = 0 if start is None else bisect.bisect_left(plain, start)
        end = bisect.bisect_right(plain, (-svc.need, "\U0010ffff"))
        return (n for _, n in plain[begin:end])

    def victims(self, svc: _Svc, node: str) -> tuple[_Svc, ...] | None:
        """The least urgent, fewest lower-priority services to evict so `svc` fits, or None."""
        order = self._eviction_order.get(node)
        if order is None:
            order = sorted(self.residents[node].values(), key=lambda v: (-v.priority, -v.need, v.name))
            self._eviction_order[node] = order
        free, chosen = self.free[node], []
        for v in order:
            if free >= svc.need or v.priority <= svc.priority:
                break
            chosen.append(v)
            free += v.need
        if free < svc.need:
            return None
        if len(chosen) == 1:
            return (chosen[0],)
        for v in sorted(chosen, key=lambda v: (v.priority, v.need, v.name)):
            if free - v.need >= svc.need:  # reprieve: it was not needed after all
                chosen.remove(v)
                free -= v.need
        return tuple(sorted(chosen, key=lambda v: v.name))


_NO_SELECTOR: frozenset[tuple[str, str]] = frozenset()


def _constraints(demand: ServiceDemand) -> tuple[object, ...]:
    """What decides a service's eligible nodes: services that share it share the sets."""
    selector = demand.node_selector
    items = frozenset(selector.items()) if selector else _NO_SELECTOR
    return items, demand.tolerations, demand.spread.topology_key if demand.spread else None


def _tolerated(taints: tuple[Taint, ...], tolerations: tuple[Toleration, ...]) -> bool:
    return all(any(t.tolerates(taint) for t in tolerations) for taint in taints)


def _previous_pairs(previous: Assignment | None) -> dict[str, list[str]]:
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


# --- phases ------------------------------------------------------------------------------------


def _prepare(services: Iterable[ServiceDemand], fleet: _Fleet, settings: PlacementSettings) -> list[_Svc]:
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
        key = ("eligible", *_constraints(d))
        eligible = fleet.eligible_by(key)
        entries = [PlacedModel(d.name, m.name, m.version, m.memory_bytes, weight) for m in d.models]
        if len(entries) > 1:
            entries.sort()
        need = sum(e.memory_budget_bytes for e in entries)
        target = d.target_nodes(len(eligible))
        svcs.append(_Svc(d, d.name, d.priority, rank, need, eligible, target, tuple(entries), key))
    return svcs


def _keep_stable(svcs: list[_Svc], fleet: _Fleet, previous: Mapping[str, list[str]]) -> None:
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
            svc.lost += [(n, _why_not_eligible(svc, n, fleet)) for n in held if n not in eligible]
        if len(valid) > svc.target:
            valid = _keep_order(svc, valid, fleet)
            svc.lost += [(node, SCALED_DOWN) for node in valid[svc.target :]]
            del valid[svc.target :]
        # Each pair is on its own node: the order does not matter for memory.
        svc.lost += [(node, NO_MEMORY) for node in fleet.keep(svc, valid)]


def _keep_order(svc: _Svc, nodes: list[str], fleet: _Fleet) -> list[str]:
    base = fleet.rank_key(svc, with_free=False)

    def key(node: str) -> tuple:
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


def _why_not_eligible(svc: _Svc, node: str, fleet: _Fleet) -> str:
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


def _fill(svc: _Svc, fleet: _Fleet) -> None:
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
        svc.message = _why_short(svc, fleet, blocked)
        svc.roomless = not blocked  # spread: blocked holds every candidate with room
        log.debug("placement: %s short: %s", svc.name, svc.message)


def _room_by_displacement(svc: _Svc, fleet: _Fleet) -> dict[Priority, list[str]]:
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
    svc: _Svc, fleet: _Fleet, wanted: int, room: Mapping[Priority, list[str]] | None = None
) -> list[tuple[str, tuple[_Svc, ...]]]:
    """Nodes where evicting lower-priority services makes room, with the victims, cheapest
    first: least urgent victims, then fewest, then the usual ranking. With `wanted`, stops
    after the priority class that brings the count to `wanted` (the rest would rank after),
    and weighs victim counts over the best-ranked DISPLACEMENT_SAMPLE nodes of a class (at
    least 4 x `wanted`), like the scheduler's preemption, which samples its candidates.
    `room`: the candidates by victim class, if already known (`_room_by_displacement`)."""
    key = fleet.rank_key(svc)
    found: list[tuple[str, tuple[_Svc, ...]]] = []
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


def _add_new(svc: _Svc, node: str, victims: tuple[_Svc, ...], fleet: _Fleet) -> None:
    for victim in victims:
        assert victim.priority > svc.priority and victim.rank > svc.rank
        fleet.remove(victim, node)
        victim.displaced.append((node, f"{svc.priority.name.lower()} service {svc.name}"))
        fleet.displaced.append(victim)
    fleet.add(svc, node)
    svc.gained.append(node)


def _fill_spread(svc: _Svc, fleet: _Fleet, short: int) -> frozenset[str]:
    """Add nodes domain by domain: each new node goes to a domain that stays within max skew of
    the least-loaded eligible domain, preferring no displacement, then the least-loaded
    domain. Returns the candidates left unused because the skew blocked them."""
    assert svc.demand.spread is not None
    label, max_skew = svc.demand.spread.topology_key, svc.demand.spread.max_skew
    domain_of = fleet.domain_map(label)
    counts = dict.fromkeys(fleet.domains(svc.demand), 0)
    for node in svc.nodes:
        counts[domain_of[node]] += 1
    queues: dict[str, deque[tuple[str, tuple[_Svc, ...] | None]]] = {d: deque() for d in counts}
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


def _why_short(svc: _Svc, fleet: _Fleet, spread_blocked: frozenset[str]) -> str:
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


def _report(svcs: list[_Svc], fleet: _Fleet, settings: PlacementSettings) -> PlacementResult:
    by_node = {}
    for node in sorted(fleet.nodes):
        residents = fleet.residents[node]
        by_node[node] = tuple(e for s in sorted(residents) for e in residents[s].entries)
    services = {}
    events: list[PlacementEvent] = []
    for svc in sorted(svcs, key=lambda s: s.name):
        services[svc.name] = ServicePlacement(tuple(sorted(svc.nodes)), svc.target, svc.message)
        events.extend(_events(svc, settings.message_nodes))
    return PlacementResult(Assignment(by_node), services, tuple(events))


def _events(svc: _Svc, limit: int) -> list[PlacementEvent]:
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


# --- invariants --------------------------------------------------------------------------------


def check_invariants(
    result: PlacementResult,
    services: Iterable[ServiceDemand],
    nodes: Iterable[NodeState],
    previous: Assignment | None = None,
    settings: PlacementSettings = DEFAULT_SETTINGS,
) -> None:
    """Assert the guarantees of `place` on its result (see the module docstring), recomputing
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
    hard = tuple(t for t in node.taints if t.effect in _HARD_EFFECTS)
    return (
        node.health in (Health.HEALTHY, Health.SUSPECT)
        and all(node.labels.get(k) == v for k, v in d.node_selector.items())
        and _tolerated(hard, d.tolerations)
        and (d.spread is None or d.spread.topology_key in node.labels)
    )
