"""Waves by place and pace (issue 17): site waves, stable kept per site, nodes started per
minute. The pure choice (`rollout.plan_wave`) with exact expectations and properties, then whole
rollouts driven through `rollout.step` as the reconciler drives it."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_rollout import SERVICE, Runner, canary_nodes, isvc_spec, model, phase, reasons

from edgefleet_api.inference_service import WaveSpec
from edgefleet_operator.rollout import canary_order, plan_wave
from edgefleet_operator.rollout.waves import MINUTE_S, site_order

# Four sites: a (4 nodes), b (3), c (2), d (1); two nodes without a site.
SITES = {f"{s}{i}": s for s, k in (("a", 4), ("b", 3), ("c", 2), ("d", 1)) for i in range(k)}
NODES = (*sorted(SITES), "loose0", "loose1")


def plan(wave: dict[str, Any], kept: tuple[str, ...] = (), keep: int = 1, **kw: Any) -> Any:
    return plan_wave(WaveSpec.from_obj(wave), SERVICE, NODES, SITES, kept, keep, **kw)


def per_site(nodes: tuple[str, ...]) -> Counter[str]:
    return Counter(SITES[n] for n in nodes if n in SITES)


def site_sizes() -> Counter[str]:
    return Counter(SITES.values())


# --- the pure choice ---------------------------------------------------------------------------


def test_one_node_then_its_site_then_half_the_sites() -> None:
    first = plan({"count": 1})
    assert first.canaries == (canary_order(SERVICE, NODES)[0],) and first.wanted == 1
    # Choose a first node that has a site, to follow the ladder.
    start = next(n for n in canary_order(SERVICE, NODES) if n in SITES)
    site = SITES[start]
    one_site = plan({"sites": 1}, kept=(start,))
    assert one_site.canaries[0] == start  # kept canaries stay first
    assert set(per_site(one_site.canaries)) == {site}  # the first node's site, not another
    # Every node of the site but one (keepStablePerSite 1), a one-node site aside.
    assert per_site(one_site.canaries)[site] == max(1, site_sizes()[site] - 1)
    half = plan({"sitePercent": 50}, kept=one_site.canaries)
    chosen = set(per_site(half.canaries))
    assert len(chosen) == 2 and site in chosen
    other = (chosen - {site}).pop()
    assert other == next(s for s in site_order(SERVICE, sorted(set(SITES.values()))) if s != site)
    for s in chosen:  # stable kept in each chosen site that can spare a node
        assert per_site(half.canaries)[s] == max(1, site_sizes()[s] - 1)
    assert not set(half.canaries) & {"loose0", "loose1"}  # site waves leave unlabelled nodes alone


def test_site_waves_never_reach_unlabelled_nodes_and_node_waves_do() -> None:
    every_site = plan({"sitePercent": 100})
    assert not {"loose0", "loose1"} & set(every_site.canaries)
    assert per_site(every_site.canaries) == {"a": 3, "b": 2, "c": 1, "d": 1}
    everything = plan({"percent": 100}, kept=every_site.canaries)
    assert set(everything.canaries) == set(NODES)  # the wave of every node is exempt


def test_a_node_wave_keeps_stable_in_every_site_and_says_how_many_it_held_back() -> None:
    p = plan({"percent": 75})  # 9 of 12 nodes wanted
    counts = per_site(p.canaries)
    for s, k in site_sizes().items():
        assert counts[s] <= (k - 1 if k > 1 else 1), (s, counts)
    # a, b, c can give 3 + 2 + 1; d (one node) goes whole; plus the two unlabelled nodes: 9.
    assert len(p.canaries) == 9 and p.held_back == 0
    q = plan({"count": 11})
    assert len(q.canaries) == 9 and q.held_back == 2
    assert plan({"count": 11}, keep=0).canaries == tuple(canary_order(SERVICE, NODES)[:11])


def test_side_by_side_waves_take_whole_sites() -> None:
    """With the stable version beside the canary on every canary node, no node is held back."""
    p = plan({"sites": 2, "trafficWeight": 30})
    assert sum(per_site(p.canaries).values()) == sum(site_sizes()[s] for s in per_site(p.canaries))


def test_pace_starts_at_most_n_a_minute_and_resumes_on_time() -> None:
    t0 = 1_000_000
    p = plan({"percent": 100}, max_per_minute=4, now=t0)
    assert len(p.canaries) == 4 and p.wanted == 12 and p.next_start_s == t0 + MINUTE_S
    assert p.node_starts == ((t0, 4),)
    again = plan({"percent": 100}, kept=p.canaries, max_per_minute=4, node_starts=p.node_starts, now=t0 + 30)
    assert again.canaries == p.canaries and again.next_start_s == t0 + MINUTE_S
    later = plan(
        {"percent": 100}, kept=p.canaries, max_per_minute=4, node_starts=p.node_starts, now=t0 + MINUTE_S
    )
    assert len(later.canaries) == 8 and later.canaries[:4] == p.canaries
    assert later.node_starts == ((t0 + MINUTE_S, 4),)  # the old entry aged out
    done = plan(
        {"percent": 100}, kept=tuple(NODES), max_per_minute=4, node_starts=later.node_starts, now=t0 + 61
    )
    assert done.next_start_s is None and len(done.canaries) == 12


@settings(max_examples=200, deadline=None)
@given(
    ladder=st.lists(
        st.one_of(
            st.builds(lambda c: {"count": c}, st.integers(1, 12)),
            st.builds(lambda p: {"percent": p}, st.integers(1, 100)),
            st.builds(lambda s: {"sites": s}, st.integers(1, 5)),
            st.builds(lambda p: {"sitePercent": p}, st.integers(1, 100)),
        ),
        min_size=1,
        max_size=5,
    ),
    keep=st.integers(0, 3),
    pace=st.one_of(st.none(), st.integers(1, 5)),
    gaps=st.lists(st.integers(0, 90), min_size=30, max_size=30),
)
def test_canaries_only_grow_sites_keep_stable_and_pace_holds(
    ladder: list[dict[str, Any]], keep: int, pace: int | None, gaps: list[int]
) -> None:
    now, kept, ledger = 0, (), ()
    starts: list[tuple[int, int]] = []
    for wave in ladder:
        for gap in gaps:
            now += gap
            p = plan(wave, kept=kept, keep=keep, max_per_minute=pace, node_starts=ledger, now=now)
            assert p.canaries[: len(kept)] == kept, "canaries only grow"
            assert len(set(p.canaries)) == len(p.canaries)
            every = ("percent" in wave or "count" in wave) and p.wanted == len(NODES)
            if not every and keep:
                counts = per_site(p.canaries)
                grown = per_site(p.canaries[len(kept) :])
                for s, k in site_sizes().items():
                    if grown[s] and k > keep:
                        assert counts[s] <= k - keep, (wave, s, counts)
            if len(p.canaries) > len(kept):
                starts.append((now, len(p.canaries) - len(kept)))
            kept, ledger = p.canaries, p.node_starts
            if p.next_start_s is None:
                break
    if pace is not None:
        for t, _ in starts:
            assert sum(k for u, k in starts if t - MINUTE_S < u <= t) <= pace


# --- whole rollouts ----------------------------------------------------------------------------


LADDER = [{"count": 1}, {"sites": 1}, {"sitePercent": 50}, {"percent": 100}]


def test_a_rollout_by_place_goes_node_site_half_all_and_keeps_stable_per_site() -> None:
    spec = isvc_spec(model("1"), waves=LADDER)
    r = Runner(spec, NODES, SITES)
    r.tick()
    r.tick()
    assert phase(r.last) == "Idle"
    r.set_spec(isvc_spec(model("2"), waves=LADDER))
    seen: list[tuple[int, tuple[str, ...]]] = []
    for _ in range(40):
        d = r.tick(1)
        d = r.tick(60)
        if not seen or seen[-1][1] != tuple(canary_nodes(d)):
            seen.append((d.status["currentWave"], tuple(canary_nodes(d))))
            # While a wave that replaces stable is judged, every site that can spare a node keeps one.
            if d.status["phase"] == "Progressing" and d.status["currentWave"] < 3:
                counts = per_site(tuple(canary_nodes(d)))
                for s, k in site_sizes().items():
                    assert k == 1 or counts[s] < k, (d.status["step"], counts)
        if phase(d) == "Promoted":
            break
    assert phase(d) == "Promoted" and d.status["stableVersion"] == "2"
    sizes = [len(nodes) for _, nodes in seen if nodes]
    assert sizes[0] == 1 and sizes == sorted(sizes) and sizes[-1] == len(NODES)
    steps = [w for w, _ in seen]
    assert steps == sorted(steps)


def test_a_paced_rollout_never_starts_more_than_the_limit_a_minute() -> None:
    spec = isvc_spec(model("1"), waves=[{"percent": 100}])
    r = Runner(spec, NODES, SITES)
    r.tick()
    r.tick()
    paced = {**isvc_spec(model("2"), waves=[{"percent": 100}])}
    paced["rollout"]["maxNodesPerMinute"] = 5
    r.set_spec(paced)
    starts: list[tuple[float, int]] = []
    before: list[str] = []
    for _ in range(30):
        d = r.tick(7)
        now = canary_nodes(d)
        if len(now) > len(before):
            starts.append((r.now, len(now) - len(before)))
        if phase(d) != "Promoted" and len(now) < len(NODES):
            assert "pacing" in d.status["message"], d.status["message"]
        before = now
        if phase(d) == "Promoted":
            break
    assert phase(d) == "Promoted"
    assert sum(k for _, k in starts) == len(NODES)
    for t, _ in starts:
        assert sum(k for u, k in starts if t - MINUTE_S < u <= t) <= 5, starts
    assert "nodeStarts" not in d.status  # a finished rollout keeps no ledger


def test_a_node_wave_that_must_hold_nodes_back_says_so() -> None:
    r = Runner(isvc_spec(model("1"), waves=[{"count": 11}, {"percent": 100}]), NODES, SITES)
    r.tick()
    r.tick()
    r.set_spec(isvc_spec(model("2"), waves=[{"count": 11}, {"percent": 100}]))
    d = r.tick(1)
    assert len(canary_nodes(d)) == 9 and "StableKeptPerSite" in reasons(d)


def test_the_nodes_a_rollout_takes_next_fetch_the_canary_ahead() -> None:
    """Decision.prefetch: during a wave, the next wave's new nodes (and the current wave's paced
    ones); in the last wave every other node (promotion moves them); none once finished."""
    r = Runner(isvc_spec(model("1"), waves=LADDER), NODES, SITES)
    r.tick()
    r.tick()
    r.set_spec(isvc_spec(model("2"), waves=LADDER))
    d = r.tick(1)
    first = canary_nodes(d)
    assert len(first) == 1
    ahead = set(d.prefetch)
    site = SITES.get(first[0])
    if site is not None:  # wave 2 takes the first node's site, less one node kept on stable
        assert ahead == {n for n, s in SITES.items() if s == site} - set(first) - {
            max((n for n, s in SITES.items() if s == site), key=canary_order(SERVICE, NODES).index)
        }
    assert not ahead & set(first)
    assert all(rev.label == "2" for rev in d.prefetch.values())
    assert {m.version for n in ahead for m in d.prefetched(n)} == {"2"}
    for _ in range(10):  # to the last wave
        d = r.tick(61)
        if d.status["currentWave"] == 3:
            break
    assert set(d.prefetch) == set(NODES) - set(canary_nodes(d))
    while phase(d) != "Promoted":
        d = r.tick(61)
    assert d.prefetch == {}
