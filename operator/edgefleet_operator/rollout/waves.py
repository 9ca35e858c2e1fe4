"""Which nodes run the canary in a wave, and how fast they start. Pure.

- Node waves (`count`, `percent`) take nodes in canary order (a hash of service and node).
- Site waves (`sites`, `sitePercent`) take whole sites (a Node label, spec.rollout.siteLabel):
  sites that already hold canaries first (one node, then that node's site), then by a hash of
  service and site. Nodes without the label belong to no site: only node waves reach them.
- Stable kept per site: while a wave that replaces stable (trafficWeight 100) is judged, at
  least `keepStablePerSite` of each site's nodes stay on stable, in sites with more nodes than
  that; a node wave of every node is exempt (it is the whole fleet). A node wave that cannot
  reach its count without emptying a site takes fewer nodes (`WavePlan.held_back` says how many).
- Pace: at most `maxNodesPerMinute` nodes start the canary in any 60 s; the ledger of recent
  starts lives in status.rollout.nodeStarts so a restarted operator keeps the pace.

Invariants: canaries only grow within a rollout (kept ones stay while placed); the plan is a
function of its arguments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgefleet_api.inference_service import WaveSpec
from edgefleet_operator.rollout.spec import wave_nodes

MINUTE_S = 60


@dataclass(frozen=True, slots=True)
class WavePlan:
    """A wave's canaries now, and what holds the rest back."""

    canaries: tuple[str, ...]
    """Kept canaries first, then the ones added, in the order they were chosen."""
    wanted: int
    """How many canaries the wave wants once pace allows (len(canaries) when not paced)."""
    held_back: int = 0
    """Nodes the wave's count asked for but left on stable to keep stable in their sites."""
    node_starts: tuple[tuple[int, int], ...] = ()
    """The pace ledger after this plan: (epoch second, nodes started) within the last minute."""
    next_start_s: int | None = None
    """When pace lets the next node start (None: nothing waits for pace)."""


def canary_order(service: str, nodes: Sequence[str]) -> list[str]:
    """The order nodes become canaries in: by a hash of (service, node), so canaries of a service
    spread across zones and classes, and different services start on different nodes."""
    return sorted(nodes, key=lambda n: (_hash(service, n), n))


def site_order(service: str, sites: Sequence[str]) -> list[str]:
    """The order sites take canaries in, by a hash of (service, site)."""
    return sorted(sites, key=lambda s: (_hash(service, s), s))


def _hash(service: str, name: str) -> bytes:
    return hashlib.sha256(f"{service}\0{name}".encode()).digest()


def plan_wave(
    wave: WaveSpec,
    service: str,
    nodes: Sequence[str],
    sites: Mapping[str, str],
    kept: Sequence[str],
    keep_stable: int,
    max_per_minute: int | None = None,
    node_starts: Sequence[tuple[int, int]] = (),
    now: int = 0,
) -> WavePlan:
    """The canaries of `wave` over the placed `nodes` (`sites`: node -> site, for labelled nodes;
    `kept`: this rollout's canaries so far), paced by `max_per_minute` given the `node_starts`
    ledger at `now`."""
    placed = set(nodes)
    kept = [n for n in kept if n in placed]
    order = canary_order(service, nodes)
    if wave.by_site:
        wanted, held = _site_wave(wave, service, order, sites, kept, keep_stable)
    else:
        wanted, held = _node_wave(wave, order, sites, kept, keep_stable)
    return _paced(kept, wanted, held, max_per_minute, node_starts, now)


def _node_wave(
    wave: WaveSpec, order: list[str], sites: Mapping[str, str], kept: list[str], keep_stable: int
) -> tuple[list[str], int]:
    """(canaries wanted, held back) for a count or percent wave."""
    want = wave_nodes(wave, len(order))
    guard = wave.traffic_weight >= 100 and want < len(order)
    room = _site_room(order, sites, kept, keep_stable if guard else 0)
    chosen = list(kept)
    taken = set(kept)
    for n in order:
        if len(chosen) >= want:
            break
        site = sites.get(n)
        if n in taken or (site is not None and room.get(site, 1) <= 0):
            continue
        chosen.append(n)
        taken.add(n)
        if site is not None:
            room[site] = room.get(site, 0) - 1
    return chosen, max(0, want - len(chosen))


def _site_wave(
    wave: WaveSpec,
    service: str,
    order: list[str],
    sites: Mapping[str, str],
    kept: list[str],
    keep_stable: int,
) -> tuple[list[str], int]:
    """(canaries wanted, 0) for a sites or sitePercent wave: the chosen sites' nodes, in canary
    order, less the ones kept on stable."""
    members: dict[str, list[str]] = {}
    for n in order:
        if n in sites:
            members.setdefault(sites[n], []).append(n)
    with_canaries = list(dict.fromkeys(sites[n] for n in kept if n in sites))
    ranked = with_canaries + [s for s in site_order(service, list(members)) if s not in with_canaries]
    chosen_sites = ranked[: wave_nodes(wave, len(members))]
    room = _site_room(order, sites, kept, keep_stable if wave.traffic_weight >= 100 else 0)
    chosen = list(kept)
    taken = set(kept)
    for site in chosen_sites:
        for n in members[site]:
            if n not in taken and room[site] > 0:
                chosen.append(n)
                taken.add(n)
                room[site] -= 1
    return chosen, 0


def _site_room(
    order: Sequence[str], sites: Mapping[str, str], kept: Sequence[str], keep: int
) -> dict[str, int]:
    """site -> how many more of its nodes may become canaries, keeping `keep` of them on stable
    where the site has more nodes than that (a smaller site has no node to spare: all may go)."""
    size: dict[str, int] = {}
    for n in order:
        if n in sites:
            size[sites[n]] = size.get(sites[n], 0) + 1
    room = {s: (k - keep if k > keep else k) for s, k in size.items()}
    for n in kept:
        if n in sites:
            room[sites[n]] -= 1
    return room


def _paced(
    kept: list[str],
    wanted: list[str],
    held_back: int,
    max_per_minute: int | None,
    node_starts: Sequence[tuple[int, int]],
    now: int,
) -> WavePlan:
    """Start as many of the wanted new canaries as the pace allows; record them in the ledger."""
    recent = [(t, k) for t, k in node_starts if now - MINUTE_S < t <= now and k > 0]
    new = wanted[len(kept) :]
    budget = len(new) if max_per_minute is None else max_per_minute - sum(k for _, k in recent)
    allowed = max(0, budget)
    started = new[:allowed]
    if started and max_per_minute is not None:
        if recent and recent[-1][0] == now:
            recent[-1] = (now, recent[-1][1] + len(started))
        else:
            recent.append((now, len(started)))
    waiting = len(started) < len(new)
    next_start = None
    if waiting:
        next_start = _next_start(recent, max_per_minute or 0, now)
    return WavePlan(
        tuple(kept + started),
        len(wanted),
        held_back,
        tuple(recent) if max_per_minute is not None else (),
        next_start,
    )


def _next_start(recent: Sequence[tuple[int, int]], limit: int, now: int) -> int:
    """The first time a node may start: when enough of the ledger has aged past a minute that
    fewer than `limit` starts remain in it."""
    total = sum(k for _, k in recent)
    for t, k in recent:
        total -= k
        if total < limit:
            return t + MINUTE_S
    return now
