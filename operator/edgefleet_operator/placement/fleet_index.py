"""The fleet index of one placement call: nodes by label, taint, health, thermal state and free
memory (`Fleet`), and each service's per-call state (`Svc`). Pure; no I/O.

Ranking (best first): fewest untolerated PreferNoSchedule taints, then SLA record (met at least
`sla_unknown_score` of windows > no record > worse), then most free memory (spreads load like the
scheduler's LeastAllocated), then node name.

Cost: selectors are set intersections over a label index, cached per distinct constraint set; a
service that may use much of the fleet walks one list of nodes sorted by free memory and stops at
its k-th node (or where memory runs out), a selective one sorts only its own candidates; a
failed-placement message is counted over small sets.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from edgefleet_api.inference_service import NO_EXECUTE, NO_SCHEDULE, PREFER_NO_SCHEDULE, Taint, Toleration
from edgefleet_api.types import Priority
from edgefleet_operator.fleet_types import Health, NodeState, PlacedModel, PlacementSettings, ServiceDemand
from edgefleet_operator.placement.reasons import (
    AGENT_SILENT,
    MEMORY_UNKNOWN,
    MISSING_LABEL,
    NEAR_THERMAL_LIMIT,
    NO_SELECTOR_MATCH,
    NOT_READY,
    SUSPECT,
    THROTTLED,
    UNTOLERATED_TAINT,
    hot_reason,
)

WALK_SHARE = 4
"""A service whose candidate nodes (eligible, not yet holding it) number at least 1/WALK_SHARE
of the placeable fleet walks the fleet's free-memory order and stops at its k-th node; a more
selective one sorts its own candidates. Both rank alike; this only picks the cheaper way."""
WALK_BUDGET = 1
"""A walk that has passed WALK_BUDGET x (its candidate count) entries without finishing sorts
the rest of its candidates instead, so a walk never costs much more than a sort."""

HARD_EFFECTS = (NO_SCHEDULE, NO_EXECUTE)
"""Taint effects that keep a service off a node unless tolerated."""
_DISPLACERS = {q: tuple(p for p in Priority if q <= p < Priority.LOW) for q in Priority}
"""priority q -> the priorities p that may displace something and whose room a service of
priority q uses up (p >= q: q is not below p)."""


@dataclass(slots=True, eq=False)
class Svc:
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


class Fleet:
    """Indexed nodes and the memory placed so far. Mutated only by `add`, `remove`, `keep` and
    (between calls, by `Planner`) `restate`; after each, every index equals what a fresh
    `Fleet` over the same nodes and pairs would hold (`Planner.check_state` asserts it)."""

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
        self.unmeasured: set[str] = set()
        """Live nodes whose GPU memory nobody has told (no feature-discovery label, no agent
        report): nothing fits there, and the message should say why."""
        self.placeable: set[str] = set()
        """Healthy and not hot: may receive new work."""
        self.free: dict[str, int] = {}
        self.residents: dict[str, dict[str, Svc]] = {}
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
        self._cache: dict[tuple[Any, ...], Any] = {}
        self.room: dict[Priority, dict[str, int]] = {}
        """p -> placeable node -> free bytes + bytes of services less urgent than p there: what
        a service of priority p could have by displacement. Built on first use."""
        self._eviction_order: dict[str, list[Svc]] = {}
        """node -> its residents, least urgent first (then largest, then name); dropped when
        the node changes."""
        self.displaced: list[Svc] = []
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
            hard = tuple(t for t in node.taints if t.effect in HARD_EFFECTS)
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
            if node.memory_total_bytes == 0:
                self.unmeasured.add(name)
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
        cached: frozenset[str] = self._cache[key]
        return cached

    def untolerated(self, tolerations: tuple[Toleration, ...]) -> frozenset[str]:
        """Nodes with a NoSchedule or NoExecute taint that no toleration tolerates."""
        key = ("untolerated", tolerations)
        if key not in self._cache:
            self._cache[key] = frozenset(
                n for n, taints in self.hard_taints.items() if not tolerated(taints, tolerations)
            )
        cached: frozenset[str] = self._cache[key]
        return cached

    def soft_penalty(self, tolerations: tuple[Toleration, ...]) -> dict[str, int]:
        """node -> number of its PreferNoSchedule taints no toleration tolerates (0s left out)."""
        key = ("soft", tolerations)
        if key not in self._cache:
            penalty = {
                n: sum(not any(t.tolerates(taint) for t in tolerations) for taint in taints)
                for n, taints in self.soft_taints.items()
            }
            self._cache[key] = {n: p for n, p in penalty.items() if p}
        cached: dict[str, int] = self._cache[key]
        return cached

    def labelled(self, label: str) -> frozenset[str]:
        key = ("labelled", label)
        if key not in self._cache:
            self._cache[key] = frozenset(n for n, nd in self.nodes.items() if label in nd.labels)
        cached: frozenset[str] = self._cache[key]
        return cached

    def eligible(self, demand: ServiceDemand) -> frozenset[str]:
        """Nodes that count for the service's target: constraints met, Healthy or Suspect."""
        return self.eligible_by(("eligible", *constraints(demand)))

    def eligible_by(self, key: tuple[Any, ...]) -> frozenset[str]:
        """`eligible` by its cache key: ("eligible", selector items, tolerations, spread label)."""
        if key not in self._cache:
            _, items, tolerations, label = key
            excluded = [self.untolerated(tolerations), *self.out.values()]
            nodes = self.selector_match(dict(items)).difference(*excluded)
            if label is not None:
                nodes &= self.labelled(label)
            self._cache[key] = nodes
        cached: frozenset[str] = self._cache[key]
        return cached

    def cached_eligible(self) -> Iterator[tuple[tuple[Any, ...], frozenset[str]]]:
        """(key, nodes) of every eligible set computed so far (`eligible_by`'s cache)."""
        return ((key, value) for key, value in self._cache.items() if key[0] == "eligible")

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
        reason: suspect, throttled, near the thermal limit, GPU memory unknown."""
        key = ("no new work",)
        if key not in self._cache:
            suspect, throttled = frozenset(self.suspect), frozenset(self.hot[THROTTLED])
            near = frozenset(self.hot[NEAR_THERMAL_LIMIT] - suspect - throttled)
            self._cache[key] = (
                (SUSPECT, suspect),
                (THROTTLED, throttled - suspect),
                (NEAR_THERMAL_LIMIT, near),
                (MEMORY_UNKNOWN, frozenset(self.unmeasured - suspect - throttled - near)),
            )
        cached: tuple[tuple[str, frozenset[str]], ...] = self._cache[key]
        return cached

    def ineligible_reasons(self, demand: ServiceDemand) -> dict[str, int]:
        """Why the nodes outside the service's eligible set are: each counted once, under its
        first failed constraint (health, selector, taints, spread label). Counted through the
        small sets (down nodes, tainted nodes), never by walking the fleet."""
        key = ("reasons", *constraints(demand))
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
        cached: dict[str, int] = self._cache[key]
        return cached

    def domain_map(self, label: str) -> dict[str, str]:
        """node -> its value of `label`, for the nodes that have it."""
        key = ("domain", label)
        if key not in self._cache:
            self._cache[key] = {n: nd.labels[label] for n, nd in self.nodes.items() if label in nd.labels}
        cached: dict[str, str] = self._cache[key]
        return cached

    def domains(self, demand: ServiceDemand) -> list[str]:
        """The spread domains of the service's eligible nodes, sorted."""
        assert demand.spread is not None
        label = demand.spread.topology_key
        key = ("domains", *constraints(demand))
        if key not in self._cache:
            domain_of = self.domain_map(label)
            self._cache[key] = sorted({domain_of[n] for n in self.eligible(demand)})
        cached: list[str] = self._cache[key]
        return cached

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

    def _room_changed(self, svc: Svc, node: str, delta: int) -> None:
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

    def add(self, svc: Svc, node: str) -> None:
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

    def keep(self, svc: Svc, nodes: list[str]) -> list[str]:
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

    def remove(self, svc: Svc, node: str) -> None:
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
        (health, thermal state, capacity, SLA records) and in labels no service's constraints
        read (its cached sets stay valid). The node must hold nothing: `remove`
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
        self.unmeasured.discard(name)
        for nodes in (*self.out.values(), *self.hot.values()):
            nodes.discard(name)
        self.free.pop(name, None)
        self._eviction_order.pop(name, None)
        self._cache.pop(("no new work",), None)
        for service, _model in self.nodes[name].sla_scores:
            per_node = self.sla.get(service)
            if per_node is not None:
                per_node.pop(name, None)
        old_labels = self.nodes[name].labels
        if old_labels != node.labels:  # (in labels no service selects or spreads by: see `Planner`)
            for item in old_labels.items() - node.labels.items():
                self.label_index[item].discard(name)
            for item in node.labels.items() - old_labels.items():
                self.label_index[item].add(name)
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

    def rank_key(self, svc: Svc, with_free: bool = True) -> Callable[[str], tuple[Any, ...]]:
        """Sort key of a node for a service, best first (see the module docstring)."""
        penalty = self.soft_penalty(svc.demand.tolerations)
        sla = self.sla.get(svc.name, {})
        unknown = self.settings.sla_unknown_score
        free = self.free

        def key(node: str) -> tuple[Any, ...]:
            score = sla.get(node)
            tier = 1 if score is None else 0 if score >= unknown else 2
            s = unknown if score is None else score
            return (penalty.get(node, 0), tier, -s, -free[node] if with_free else 0, node)

        return key

    def ranked(self, svc: Svc, nodes: Iterable[str]) -> list[str]:
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

    def fitting(self, svc: Svc) -> Iterator[str]:
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

    def _sorted_plain(self, svc: Svc, special: Set[str], start: tuple[int, str] | None) -> Iterator[str]:
        """Fitting candidates without a special rank, by (-free, name), from `start` on."""
        free, placeable, holders = self.free, self.placeable, svc.nodes
        pool = svc.eligible - holders if holders else svc.eligible
        plain = [(-free[n], n) for n in pool if n in placeable and n not in special]
        plain.sort()
        begin = 0 if start is None else bisect.bisect_left(plain, start)
        end = bisect.bisect_right(plain, (-svc.need, "\U0010ffff"))
        return (n for _, n in plain[begin:end])

    def victims(self, svc: Svc, node: str) -> tuple[Svc, ...] | None:
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


def constraints(demand: ServiceDemand) -> tuple[object, ...]:
    """What decides a service's eligible nodes: services that share it share the sets."""
    selector = demand.node_selector
    items = frozenset(selector.items()) if selector else _NO_SELECTOR
    return items, demand.tolerations, demand.spread.topology_key if demand.spread else None


def tolerated(taints: tuple[Taint, ...], tolerations: tuple[Toleration, ...]) -> bool:
    return all(any(t.tolerates(taint) for t in tolerations) for taint in taints)
