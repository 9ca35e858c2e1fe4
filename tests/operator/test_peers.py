"""`peers.choose_peers`: up to K agents of the same site, with endpoints, healthy, never the
node itself; one seed per site in every other node's list; stable under churn."""

from __future__ import annotations

from edgefleet_api.edge_node import seed_rank
from edgefleet_operator.peers import SITE_LABEL, PeerCandidate, artifact_peers, candidates, choose_peers


def fleet(sites: int, per_site: int) -> list[PeerCandidate]:
    return [
        PeerCandidate.of(f"s{s}-n{i}", {SITE_LABEL: f"site-{s}"}, f"http://10.{s}.0.{i}:8000")
        for s in range(sites)
        for i in range(per_site)
    ]


def test_peers_share_the_site_report_an_endpoint_and_are_healthy() -> None:
    nodes = fleet(2, 5)
    nodes.append(PeerCandidate("s0-silent", "site-0", ""))
    nodes.append(PeerCandidate("s0-dead", "site-0", "http://10.0.0.99:8000", healthy=False))
    nodes.append(PeerCandidate.of("nosite", {}, "http://10.9.9.9:8000"))
    chosen = artifact_peers(nodes, k=3)
    by_endpoint = {c.endpoint: c for c in nodes}
    for c in nodes:
        peers = chosen[c.name]
        assert len(peers) == (0 if c.site == "" else 3), (c.name, peers)
        assert c.endpoint not in peers and len(set(peers)) == len(peers)
        for p in peers:
            assert by_endpoint[p].site == c.site and by_endpoint[p].healthy
    assert choose_peers(nodes[0], nodes, k=0) == ()


def test_every_node_but_the_seed_has_the_seed_among_its_peers() -> None:
    nodes = fleet(3, 10)
    chosen = artifact_peers(nodes, k=2)
    for site in ("site-0", "site-1", "site-2"):
        members = [c for c in nodes if c.site == site]
        seed = min(members, key=lambda c: seed_rank(c.endpoint))
        seeds = [c for c in members if min((*chosen[c.name], c.endpoint), key=seed_rank) == c.endpoint]
        assert seeds == [seed]  # exactly one node of the site goes to the origin at once


def test_the_choice_is_stable_when_an_agent_leaves() -> None:
    nodes = fleet(1, 12)
    before = artifact_peers(nodes, k=3)
    gone = nodes[5]
    after = artifact_peers([c for c in nodes if c is not gone], k=3)
    changed = [n for n in after if set(after[n]) != set(before[n])]
    assert all(gone.endpoint in before[n] for n in changed)  # only the lists that held it change
    assert len(changed) < len(after)


def test_candidates_from_the_api_objects() -> None:
    nodes = [
        {"metadata": {"name": "n1", "labels": {SITE_LABEL: "berlin"}}},
        {"metadata": {"name": "n2", "labels": {SITE_LABEL: "berlin"}}},
        {"metadata": {"name": "n3"}},
    ]
    edge_nodes = {
        "n1": {"spec": {"nodeName": "n1"}, "status": {"endpoint": "http://10.0.0.1:8000"}},
        "n2": {"spec": {"nodeName": "n2"}, "status": {"endpoint": "http://10.0.0.2:8000"}},
        "n3": {"spec": {"nodeName": "n3"}, "status": {}},
    }
    got = candidates(nodes, edge_nodes, healthy={"n1"})
    assert got == [
        PeerCandidate("n1", "berlin", "http://10.0.0.1:8000", True),
        PeerCandidate("n2", "berlin", "http://10.0.0.2:8000", False),
        PeerCandidate("n3", "", "", False),
    ]
    assert artifact_peers(got) == {"n1": (), "n2": ("http://10.0.0.1:8000",), "n3": ()}
