"""Artifact peers: for each EdgeNode, up to K agents of the same site (Node label
`edgefleet.io/site`) its agent may fetch artifacts from before the origin (EdgeNode
spec.artifactPeers). Pure: no API calls.

Invariants: a node is never its own peer; peers share its site (a node with no site label gets
none: the operator cannot tell which links are local); only agents that report an endpoint
and are healthy are chosen; every node but the site's seed (the eligible agent whose endpoint
ranks first by `edge_node.seed_rank`) has the seed among its peers, so exactly one agent of
the site goes to the origin at once and the others wait for a peer to hold the artifact;
the other peers are stable (rendezvous hashing of the node and peer names: adding or losing
one agent changes few lists) and spread a site's fetches over its agents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgefleet_api import names
from edgefleet_api.edge_node import seed_rank

SITE_LABEL = names.LABEL_SITE
DEFAULT_MAX_PEERS = 3
"""Peers per node: enough that one gone or slow does not send the node to the origin."""


@dataclass(frozen=True, slots=True)
class PeerCandidate:
    """One EdgeNode as peer selection sees it."""

    name: str
    """The EdgeNode's name."""
    site: str
    """Its Node's `edgefleet.io/site` label ('' when it has none)."""
    endpoint: str
    """status.endpoint: the agent's base URL ('' when it reports none)."""
    healthy: bool = True
    """Its agent heartbeats (an agent that does not will not answer a peer either)."""

    @classmethod
    def of(
        cls, name: str, node_labels: Mapping[str, str], endpoint: str, healthy: bool = True
    ) -> PeerCandidate:
        return cls(name, node_labels.get(SITE_LABEL, ""), endpoint, healthy)


def _score(node: str, peer: str) -> bytes:
    return hashlib.sha256(f"{node}\x00{peer}".encode()).digest()


def choose_peers(
    node: PeerCandidate, candidates: Iterable[PeerCandidate], k: int = DEFAULT_MAX_PEERS
) -> tuple[str, ...]:
    """The endpoints of up to `k` peers of `node` (see the module docstring), highest
    rendezvous score first."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if not node.site or k == 0:
        return ()
    eligible = [
        c for c in candidates if c.name != node.name and c.site == node.site and c.endpoint and c.healthy
    ]
    eligible.sort(key=lambda c: _score(node.name, c.name))
    chosen: list[str] = []
    if eligible:
        seed = min(eligible, key=lambda c: seed_rank(c.endpoint))
        if not node.endpoint or seed_rank(seed.endpoint) < seed_rank(node.endpoint):
            chosen.append(seed.endpoint)
    for c in eligible:
        if c.endpoint not in chosen and c.endpoint != node.endpoint:
            chosen.append(c.endpoint)
        if len(chosen) == k:
            break
    return tuple(chosen)


def artifact_peers(
    candidates: Iterable[PeerCandidate], k: int = DEFAULT_MAX_PEERS
) -> dict[str, tuple[str, ...]]:
    """EdgeNode name -> its spec.artifactPeers, for every candidate."""
    every = list(candidates)
    by_site: dict[str, list[PeerCandidate]] = {}
    for c in every:
        by_site.setdefault(c.site, []).append(c)
    return {c.name: choose_peers(c, by_site.get(c.site, ()), k) for c in every}


def candidates(
    nodes: Iterable[Mapping[str, Any]], edge_nodes: Mapping[str, Mapping[str, Any]], healthy: Container[str]
) -> list[PeerCandidate]:
    """PeerCandidates from the API's JSON: each EdgeNode (by name) with the site label of its
    Node (spec.nodeName), its status.endpoint, and whether its name is in `healthy`."""
    labels = {
        str(n.get("metadata", {}).get("name")): n.get("metadata", {}).get("labels") or {} for n in nodes
    }
    out = []
    for name, en in sorted(edge_nodes.items()):
        node = str((en.get("spec") or {}).get("nodeName") or name)
        endpoint = str((en.get("status") or {}).get("endpoint") or "")
        out.append(PeerCandidate.of(name, labels.get(node, {}), endpoint, name in healthy))
    return out
