"""Fleet placement: exact small scenarios, then properties over random fleets (hypothesis).

Every placement in this file is checked with `check_invariants`, which recomputes the
constraints from the input without the indexes `place` uses.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet_api.inference_service import Spread, Taint, Toleration
from edgefleet_api.types import Priority
from edgefleet_operator import placement
from edgefleet_operator.fleet_types import (
    Assignment,
    Health,
    ModelDemand,
    NodeState,
    PlacedModel,
    PlacementResult,
    PlacementSettings,
    ServiceDemand,
)
from edgefleet_operator.placement import fleet_index

G = 2**30


# --- factories ---------------------------------------------------------------------------------


def node(
    name: str,
    gib: int = 8,
    *,
    reserved_gib: int = 0,
    labels: dict[str, str] | None = None,
    taints: Sequence[Taint] = (),
    health: Health = Health.HEALTHY,
    temp: float | None = None,
    limit: float | None = 83.0,
    throttled: bool = False,
    sla: dict[tuple[str, str], float] | None = None,
) -> NodeState:
    return NodeState(
        name,
        gib * G,
        reserved_gib * G,
        labels or {},
        tuple(taints),
        health,
        temp,
        limit if temp is not None else None,
        throttled,
        sla or {},
    )


def svc(
    name: str,
    gib: int = 1,
    *,
    models: Sequence[ModelDemand] | None = None,
    priority: Priority = Priority.NORMAL,
    replicas: int | None = 1,
    fraction: float | None = None,
    selector: dict[str, str] | None = None,
    tolerations: Sequence[Toleration] = (),
    spread: Spread | None = None,
) -> ServiceDemand:
    """A service of one model `m` (version 1) of `gib` GiB; one replica unless told otherwise."""
    return ServiceDemand(
        name,
        tuple(models or (ModelDemand("m", "1", gib * G),)),
        priority,
        None if fraction is not None else replicas,
        fraction,
        selector or {},
        tuple(tolerations),
        spread,
    )


def plan(
    services: Sequence[ServiceDemand],
    nodes: Sequence[NodeState],
    previous: Assignment | None = None,
    settings_: PlacementSettings = placement.DEFAULT_SETTINGS,
) -> PlacementResult:
    result = placement.place(services, nodes, previous, settings_)
    placement.check_invariants(result, services, nodes, previous, settings_)
    return result


def on(result: PlacementResult, service: str) -> tuple[str, ...]:
    return result.services[service].nodes


def pairs(result: PlacementResult) -> set[tuple[str, str]]:
    return set(result.assignment.pairs())


def events(result: PlacementResult, service: str | None = None) -> list[tuple[str, str, str]]:
    return [(e.service, e.reason, e.message) for e in result.events if service in (None, e.service)]


def assignment(**by_service: Iterable[str]) -> Assignment:
    """A previous assignment: service name (with '__' for '/') -> nodes holding it."""
    by_node: dict[str, list] = {}
    for service, nodes in by_service.items():
        name = service.replace("__", "/")
        for n in nodes:
            by_node.setdefault(n, []).append(PlacedModel(name, "m", "1", G))
    return Assignment({n: tuple(ms) for n, ms in by_node.items()})


# --- memory ------------------------------------------------------------------------------------


def test_most_free_memory_first_then_node_name() -> None:
    nodes = [node("a", 8), node("b", 16), node("c", 16)]
    r = plan([svc("ns/one", 1, replicas=2), svc("ns/two", 1)], nodes)
    assert on(r, "ns/one") == ("b", "c")
    assert on(r, "ns/two") == ("b",)  # b and c both have 15 GiB left: the name decides
    assert r.assignment.by_node["a"] == ()
    assert r.assignment.used_bytes("b") == 2 * G


def test_a_node_whose_gpu_memory_nobody_reported_is_named_as_such() -> None:
    # A fleet node without GPU feature discovery's memory label, whose agent has not reported (it
    # starts only with work): "insufficient memory" would send users looking at model sizes.
    r = plan([svc("ns/s", 1)], [node("unlabelled", 0), node("full", 1, reserved_gib=1)])
    assert on(r, "ns/s") == ()
    assert r.services["ns/s"].message == (
        "placed on 0/1 nodes; 0/2 nodes available: "
        "1 GPU memory unknown (no nvidia.com/gpu.memory label or agent report), 1 insufficient memory"
    )


def test_largest_measurement_wins_over_the_estimate() -> None:
    m = ModelDemand("m", "1", estimate_bytes=1 * G, measured_bytes=(3 * G, 5 * G, 2 * G))
    assert m.memory_bytes == 5 * G
    assert ModelDemand("m", "1", 1 * G).memory_bytes == 1 * G
    r = plan([svc("ns/s", models=[m, ModelDemand("k", "2", 2 * G)])], [node("small", 6), node("big", 7)])
    assert on(r, "ns/s") == ("big",)
    assert [(p.model, p.memory_budget_bytes, p.traffic_weight) for p in r.assignment.by_node["big"]] == [
        ("k", 2 * G, 100),
        ("m", 5 * G, 100),
    ]


def test_never_over_a_nodes_memory_and_says_so() -> None:
    nodes = [node("a", 8, reserved_gib=4), node("b", 4)]
    r = plan([svc("ns/big", 5), svc("ns/fits", 4)], nodes)
    assert on(r, "ns/big") == ()
    assert r.services["ns/big"].message == "placed on 0/1 nodes; 0/2 nodes available: 2 insufficient memory"
    assert ("ns/big", "FailedPlacement", r.services["ns/big"].message) in events(r)
    assert on(r, "ns/fits") == ("a",)


def test_memory_pressure_moves_work_to_a_node_with_room() -> None:
    previous = assignment(ns__s=["a"])
    nodes = [node("a", 8, reserved_gib=7), node("b", 8)]  # something else now uses 7 GiB of a
    r = plan([svc("ns/s", 2)], nodes, previous)
    assert on(r, "ns/s") == ("b",)
    assert events(r) == [("ns/s", "Moved", "moved from a (insufficient memory) to b")]


def test_our_own_models_never_look_like_insufficient_memory() -> None:
    services = [svc("ns/a", 2), svc("ns/b", 3), svc("ns/c", 3)]
    nodes = [node("full", 8), node("spare", 4)]
    previous = assignment(ns__a=["full"], ns__b=["full"], ns__c=["full"])
    r = plan(services, nodes, previous)
    assert pairs(r) == {("ns/a", "full"), ("ns/b", "full"), ("ns/c", "full")}
    assert r.assignment.used_bytes("full") == 8 * G
    assert events(r) == []


def test_memory_pressure_drops_the_lower_priority_pair_first() -> None:
    services = [
        svc("ns/low", 3, priority=Priority.LOW),
        svc("ns/crit", 3, priority=Priority.CRITICAL),
    ]
    previous = assignment(ns__low=["a"], ns__crit=["a"])
    r = plan(services, [node("a", 8, reserved_gib=3)], previous)  # room for one of them now
    assert on(r, "ns/crit") == ("a",)
    assert on(r, "ns/low") == ()
    assert events(r, "ns/low")[0] == ("ns/low", "Removed", "removed from a (insufficient memory)")


# --- thermal -----------------------------------------------------------------------------------


def test_hot_nodes_get_no_new_work_but_keep_what_they_hold() -> None:
    nodes = [
        node("cool", temp=60.0),
        node("warm", temp=78.0),  # exactly soft limit 83 - margin 5: near the limit
        node("hot", temp=70.0, throttled=True),
        node("mild", temp=77.9),
    ]
    r = plan([svc("ns/s", replicas=4)], nodes)
    assert on(r, "ns/s") == ("cool", "mild")
    assert r.services["ns/s"].message == (
        "placed on 2/4 nodes; 0/4 nodes available: 2 already serving it, "
        "1 near thermal limit, 1 thermally throttled"
    )
    kept = plan([svc("ns/s", replicas=4)], nodes, assignment(ns__s=["hot", "warm"]))
    assert on(kept, "ns/s") == ("cool", "hot", "mild", "warm")
    wider = PlacementSettings(thermal_margin_c=10.0)
    assert on(plan([svc("ns/s", replicas=4)], nodes, settings_=wider), "ns/s") == ("cool",)


# --- node health -------------------------------------------------------------------------------


def test_not_ready_and_silent_nodes_lose_their_work_suspect_nodes_keep_it() -> None:
    nodes = [
        node("n1", health=Health.NOT_READY),
        node("n2", health=Health.AGENT_SILENT),
        node("n3", health=Health.SUSPECT),
        node("n4"),
        node("n5"),
    ]
    previous = assignment(ns__a=["n1"], ns__b=["n2"], ns__c=["n3"])
    services = [svc("ns/a"), svc("ns/b"), svc("ns/c"), svc("ns/new", replicas=5)]
    r = plan(services, nodes, previous)
    assert on(r, "ns/a") == ("n4",)
    assert on(r, "ns/b") == ("n5",)
    assert on(r, "ns/c") == ("n3",)
    assert on(r, "ns/new") == ("n4", "n5")
    assert r.assignment.by_node["n1"] == () and r.assignment.by_node["n2"] == ()
    assert events(r, "ns/a") == [("ns/a", "Moved", "moved from n1 (node not ready) to n4")]
    assert events(r, "ns/b") == [("ns/b", "Moved", "moved from n2 (agent silent) to n5")]
    assert events(r, "ns/c") == []
    assert r.services["ns/new"].message == (
        "placed on 2/5 nodes; 0/5 nodes available: "
        "2 already serving it, 1 agent silent, 1 not ready, 1 suspect (no new work)"
    )


def test_a_deleted_node_s_work_moves() -> None:
    r = plan(
        [svc("ns/s", replicas=2)],
        [node("a"), node("b"), node("c")],
        assignment(ns__s=["gone", "b"]),
    )
    assert on(r, "ns/s") == ("a", "b")
    assert "gone" not in r.assignment.by_node
    assert events(r) == [("ns/s", "Moved", "moved from gone (node deleted) to a")]


def test_work_with_nowhere_to_go_is_removed_and_reported() -> None:
    r = plan([svc("ns/s")], [node("a", health=Health.NOT_READY)], assignment(ns__s=["a"]))
    assert on(r, "ns/s") == ()
    assert events(r) == [
        ("ns/s", "Removed", "removed from a (node not ready)"),
        ("ns/s", "FailedPlacement", "placed on 0/1 nodes; 0/1 nodes available: 1 not ready"),
    ]


# --- selectors and taints ----------------------------------------------------------------------


def test_node_selector_and_taints_exclude_nodes() -> None:
    nodes = [
        node("x1", labels={"class": "x"}),
        node("y1", labels={"class": "y"}),
        node("x2", labels={"class": "x"}, taints=[Taint("dedicated", "NoSchedule", "ml")]),
        node("x3", labels={"class": "x"}, taints=[Taint("maintenance", "NoExecute")]),
    ]
    plain = svc("ns/s", replicas=4, selector={"class": "x"})
    r = plan([plain], nodes)
    assert on(r, "ns/s") == ("x1",)
    assert r.services["ns/s"].message == (
        "placed on 1/4 nodes; 0/4 nodes available: "
        "2 had untolerated taint, 1 already serving it, 1 didn't match node selector"
    )
    dedicated = Toleration("dedicated", "Equal", "ml", "NoSchedule")
    r = plan([dataclasses.replace(plain, tolerations=(dedicated,))], nodes)
    assert on(r, "ns/s") == ("x1", "x2")
    r = plan([dataclasses.replace(plain, tolerations=(Toleration(operator="Exists"),))], nodes)
    assert on(r, "ns/s") == ("x1", "x2", "x3")
    moved = plan([plain], [*nodes[:2], node("x2", labels={"class": "y"})], assignment(ns__s=["x2"]))
    assert events(moved)[0] == (
        "ns/s",
        "Moved",
        "moved from x2 (node selector no longer matches) to x1",
    )


@pytest.mark.parametrize(
    ("toleration", "taint", "tolerated"),
    [
        (Toleration("k", "Equal", "v"), Taint("k", "NoSchedule", "v"), True),
        (Toleration("k", "Equal", "v"), Taint("k", "NoSchedule", "w"), False),
        (Toleration("k", "Equal", "v", "NoSchedule"), Taint("k", "NoExecute", "v"), False),
        (Toleration("k", "Exists"), Taint("k", "NoExecute", "any"), True),
        (Toleration("k", "Exists"), Taint("other", "NoExecute"), False),
        (Toleration("", "Exists"), Taint("anything", "NoSchedule", "x"), True),
        (Toleration("", "Exists", effect="NoExecute"), Taint("anything", "NoSchedule"), False),
        (Toleration("k", "Equal"), Taint("k", "PreferNoSchedule"), True),
    ],
)
def test_toleration_matches_like_kubernetes(toleration: Toleration, taint: Taint, tolerated: bool) -> None:
    assert toleration.tolerates(taint) is tolerated


def test_prefer_no_schedule_is_only_a_preference() -> None:
    nodes = [node("tainted", 16, taints=[Taint("spot", "PreferNoSchedule")]), node("plain", 8)]
    assert on(plan([svc("ns/s")], nodes), "ns/s") == ("plain",)  # despite more free memory there
    assert on(plan([svc("ns/s", replicas=2)], nodes), "ns/s") == ("plain", "tainted")
    tolerant = svc("ns/s", tolerations=[Toleration("spot", "Exists")])
    assert on(plan([tolerant], nodes), "ns/s") == ("tainted",)


# --- node counts -------------------------------------------------------------------------------


def test_replicas_fraction_and_every_eligible_node() -> None:
    nodes = [node(f"x{i}", labels={"class": "x"}) for i in range(10)]
    nodes += [node(f"y{i}", labels={"class": "y"}) for i in range(5)]
    nodes += [node("xs", labels={"class": "x"}, health=Health.SUSPECT)]
    nodes += [node("xd", labels={"class": "x"}, health=Health.NOT_READY)]
    x = {"class": "x"}
    cases = {
        "ns/replicas": (svc("ns/replicas", replicas=3, selector=x), 3),
        "ns/quarter": (svc("ns/quarter", fraction=0.25, selector=x), 3),  # ceil(0.25 x 11)
        "ns/tiny": (svc("ns/tiny", fraction=0.01, selector=x), 1),
        "ns/all": (svc("ns/all", replicas=None, selector=x), 11),  # suspect counts, not ready not
        "ns/zero": (svc("ns/zero", replicas=0, selector=x), 0),
    }
    r = plan([s for s, _ in cases.values()], nodes)
    for name, (_, target) in cases.items():
        assert r.services[name].target == target, name
    assert len(on(r, "ns/replicas")) == 3 and len(on(r, "ns/quarter")) == 3
    assert on(r, "ns/all") == tuple(sorted(f"x{i}" for i in range(10)))  # not the suspect one
    assert r.services["ns/all"].message.endswith("1 suspect (no new work)")
    assert on(r, "ns/zero") == () and r.services["ns/zero"].message == ""


def test_fraction_is_exact_despite_binary_floating_point() -> None:
    assert svc("ns/s", fraction=0.1).target_nodes(30) == 3  # 0.1 * 30 = 3.0000000000000004
    assert svc("ns/s", fraction=0.1).target_nodes(31) == 4
    assert svc("ns/s", fraction=0.5).target_nodes(0) == 1
    assert svc("ns/s", replicas=None).target_nodes(0) == 1


def test_scaling_down_drops_suspect_and_hot_nodes_first() -> None:
    nodes = [node("a", health=Health.SUSPECT), node("b", temp=90.0), node("c"), node("d")]
    r = plan([svc("ns/s", replicas=1)], nodes, assignment(ns__s=["a", "b", "c"]))
    assert on(r, "ns/s") == ("c",)
    assert events(r) == [("ns/s", "Removed", "removed from a (scaled down), b (scaled down)")]


# --- spread ------------------------------------------------------------------------------------


def zoned(layout: dict[str, int], gib: int = 8) -> list[NodeState]:
    return [node(f"{zone}{i}", gib, labels={"zone": zone}) for zone, n in layout.items() for i in range(n)]


def zone_counts(result: PlacementResult, service: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in on(result, service):
        counts[n[0]] = counts.get(n[0], 0) + 1
    return counts


def test_zone_spread_within_max_skew() -> None:
    nodes = zoned({"a": 3, "b": 3, "c": 1})
    r = plan([svc("ns/s", replicas=6, spread=Spread("zone", 1))], nodes)
    assert zone_counts(r, "ns/s") == {"a": 2, "b": 2, "c": 1}
    counts = "5 already serving it, 2 didn't satisfy spread constraint"
    assert r.services["ns/s"].message == f"placed on 5/6 nodes; 0/7 nodes available: {counts}"
    r = plan([svc("ns/s", replicas=6, spread=Spread("zone", 2))], nodes)
    assert zone_counts(r, "ns/s") == {"a": 3, "b": 2, "c": 1}
    r = plan([svc("ns/s", replicas=3, spread=Spread("zone", 1))], nodes)
    assert zone_counts(r, "ns/s") == {"a": 1, "b": 1, "c": 1}


def test_spread_excludes_nodes_without_the_label() -> None:
    nodes = [*zoned({"a": 1}), node("nolabel", 64)]
    r = plan([svc("ns/s", replicas=2, spread=Spread("zone", 3))], nodes)
    assert on(r, "ns/s") == ("a0",)
    assert r.services["ns/s"].message.endswith("1 already serving it, 1 missing spread label zone")


def test_spread_trims_the_fullest_domain_first() -> None:
    nodes = zoned({"a": 3, "b": 3})
    r = plan(
        [svc("ns/s", replicas=2, spread=Spread("zone"))],
        nodes,
        assignment(ns__s=["a0", "a1", "a2", "b2"]),
    )
    assert on(r, "ns/s") == ("a0", "b2")


def test_spread_domains_fill_even_when_one_domain_is_full() -> None:
    nodes = zoned({"a": 2}) + zoned({"b": 2}, gib=1)
    r = plan([svc("ns/s", 2, replicas=4, spread=Spread("zone", 1))], nodes)
    assert on(r, "ns/s") == ("a0",)  # b is an eligible domain with no room: skew allows one in a
    assert "1 didn't satisfy spread constraint" in r.services["ns/s"].message
    assert "2 insufficient memory" in r.services["ns/s"].message


# --- priorities --------------------------------------------------------------------------------


def test_critical_displaces_low_and_low_says_why() -> None:
    nodes = [node("n1"), node("n2")]
    low = svc("ns/low", 6, priority=Priority.LOW, replicas=2)
    crit = svc("ns/crit", 6, priority=Priority.CRITICAL)
    r = plan([low, crit], nodes, assignment(ns__low=["n1", "n2"]))
    assert on(r, "ns/crit") == ("n1",)
    assert on(r, "ns/low") == ("n2",)
    assert events(r, "ns/low") == [
        ("ns/low", "Evicted", "displaced from n1 (by critical service ns/crit)"),
        (
            "ns/low",
            "FailedPlacement",
            "placed on 1/2 nodes (1 lost to higher-priority services); "
            "0/2 nodes available: 1 already serving it, 1 insufficient memory",
        ),
    ]
    again = plan([low, crit], nodes, r.assignment)
    assert pairs(again) == pairs(r)  # and it stays that way
    assert [e[1] for e in events(again)] == ["FailedPlacement"]


def test_low_never_displaces_critical_and_equals_never_displace_each_other() -> None:
    nodes = [node("n1"), node("n2")]
    crit = svc("ns/crit", 6, priority=Priority.CRITICAL, replicas=2)
    low = svc("ns/low", 6, priority=Priority.LOW)
    r = plan([crit, low], nodes, assignment(ns__crit=["n1", "n2"]))
    assert on(r, "ns/crit") == ("n1", "n2") and on(r, "ns/low") == ()
    assert [e[1] for e in events(r)] == ["FailedPlacement"]
    peer = svc("ns/peer", 6, priority=Priority.CRITICAL)
    r = plan([crit, peer], nodes, assignment(ns__crit=["n1", "n2"]))
    assert on(r, "ns/crit") == ("n1", "n2") and on(r, "ns/peer") == ()


def test_displacement_takes_the_least_urgent_fewest_victims() -> None:
    nodes = [node("n1"), node("n2"), node("n3")]
    services = [
        svc("ns/normal", 5, priority=Priority.NORMAL),
        svc("ns/low-a", 3, priority=Priority.LOW),
        svc("ns/low-b", 3, priority=Priority.LOW),
        svc("ns/low-big", 6, priority=Priority.LOW),
        svc("ns/crit", 6, priority=Priority.CRITICAL),
    ]
    previous = assignment(
        ns__normal=["n1"], **{"ns__low-a": ["n2"], "ns__low-b": ["n2"]}, **{"ns__low-big": ["n3"]}
    )
    r = plan(services, nodes, previous)
    assert on(r, "ns/crit") == ("n3",)  # one low victim beats two low ones and a normal one
    assert on(r, "ns/normal") == ("n1",) and on(r, "ns/low-a") == ("n2",)
    assert events(r, "ns/low-big")[0] == (
        "ns/low-big",
        "Evicted",
        "displaced from n3 (by critical service ns/crit)",
    )


def test_displaced_service_moves_elsewhere_when_it_can() -> None:
    nodes = [node("n1"), node("n2", 4)]
    low = svc("ns/low", 3, priority=Priority.LOW)
    crit = svc("ns/crit", 8, priority=Priority.CRITICAL)
    r = plan([low, crit], nodes, assignment(ns__low=["n1"]))
    assert on(r, "ns/crit") == ("n1",) and on(r, "ns/low") == ("n2",)
    assert events(r, "ns/low") == [
        ("ns/low", "Evicted", "displaced from n1 (by critical service ns/crit)"),
        ("ns/low", "Placed", "placed on n2"),
    ]


# --- the unplaceable message at fleet scale ----------------------------------------------------


def test_failed_placement_counts_each_constraint_across_a_thousand_nodes() -> None:
    x, y = {"class": "x"}, {"class": "y"}
    nodes = [node(f"y{i:03d}", labels=y) for i in range(600)]
    nodes += [node(f"m{i:03d}", labels=x, reserved_gib=8) for i in range(300)]
    nodes += [node(f"t{i:03d}", labels=x, temp=70.0, throttled=True) for i in range(80)]
    nodes += [node(f"d{i:03d}", labels=x, health=Health.NOT_READY) for i in range(20)]
    r = plan([svc("ns/s", selector=x)], nodes)
    assert r.services["ns/s"].message == (
        "placed on 0/1 nodes; 0/1000 nodes available: 600 didn't match node selector, "
        "300 insufficient memory, 80 thermally throttled, 20 not ready"
    )


# --- SLA record --------------------------------------------------------------------------------


def test_nodes_with_a_good_sla_record_are_preferred() -> None:
    nodes = [
        node("good", 4, sla={("ns/s", "m"): 1.0}),
        node("unknown", 8),
        node("bad", 16, sla={("ns/s", "m"): 0.2}),
        node("mixed", 32, sla={("ns/s", "m"): 1.0, ("ns/s", "k"): 0.5}),  # the worst model counts
        node("other", 64, sla={("ns/other", "m"): 0.0}),  # another service's record: no record
    ]
    models = [ModelDemand("m", "1", G), ModelDemand("k", "1", G)]
    order = [on(plan([svc("ns/s", models=models, replicas=k)], nodes), "ns/s") for k in (1, 2, 3, 4, 5)]
    assert order == [
        ("good",),
        ("good", "other"),
        ("good", "other", "unknown"),
        ("good", "mixed", "other", "unknown"),
        ("bad", "good", "mixed", "other", "unknown"),
    ]


# --- stability ---------------------------------------------------------------------------------


def test_unrelated_changes_move_nothing() -> None:
    nodes = [node(f"n{i}", 8, labels={"zone": "ab"[i % 2]}) for i in range(6)]
    services = [
        svc("ns/a", 3, replicas=2),
        svc("ns/b", 4, replicas=3, spread=Spread("zone")),
        svc("ns/c", 2, fraction=0.5, priority=Priority.HIGH),
    ]
    base = plan(services, nodes)
    variants = {
        "a node with work gets hot": [
            dataclasses.replace(nodes[0], temperature_c=95.0, soft_limit_c=83.0),
            *nodes[1:],
        ],
        "SLA records change": [dataclasses.replace(n, sla_scores={("ns/a", "m"): 0.0}) for n in nodes],
        "a node joins that nobody tolerates": [*nodes, node("new", 64, taints=[Taint("gpu-test")])],
    }
    for what, fleet in variants.items():
        r = plan(services, fleet, base.assignment)
        assert pairs(r) == pairs(base), what
        assert events(r) == [], what
    more = [*services, svc("zz/unrelated", 1, priority=Priority.LOW)]
    r = plan(more, nodes, base.assignment)
    assert pairs(base) <= pairs(r) and on(r, "zz/unrelated") != ()


def test_events_list_a_bounded_number_of_nodes() -> None:
    nodes = [node(f"n{i:02d}") for i in range(15)]
    r = plan([svc("ns/s", replicas=None)], nodes)
    assert events(r) == [
        ("ns/s", "Placed", "placed on " + ", ".join(f"n{i:02d}" for i in range(10)) + " and 5 more")
    ]


# --- the invariant checker ----------------------------------------------------------------------


def test_check_invariants_catches_broken_results() -> None:
    """The checker the properties rely on fails on each kind of broken result."""
    nodes = [node("a", 4), node("b", 4, health=Health.NOT_READY), node("c", 4, temp=90.0)]
    services = [svc("ns/s", 2, replicas=2)]
    good = plan(services, nodes)
    assert on(good, "ns/s") == ("a",)
    entry = good.assignment.by_node["a"][0]

    def broken(**by_node: tuple[PlacedModel, ...]) -> PlacementResult:
        nodes_of = tuple(sorted(n for n, ms in {**good.assignment.by_node, **by_node}.items() if ms))
        message = good.services["ns/s"].message if len(nodes_of) < 2 else ""
        placed = dataclasses.replace(good.services["ns/s"], nodes=nodes_of, message=message)
        return dataclasses.replace(
            good,
            assignment=Assignment({**good.assignment.by_node, **by_node}),
            services={"ns/s": placed},
        )

    over = dataclasses.replace(entry, memory_budget_bytes=5 * G)
    with pytest.raises(AssertionError, match="capacity"):
        placement.check_invariants(broken(a=(over,)), services, nodes)
    with pytest.raises(AssertionError, match="may not use"):
        placement.check_invariants(broken(b=(entry,)), services, nodes)
    with pytest.raises(AssertionError, match="new ns/s on"):
        placement.check_invariants(broken(c=(entry,)), services, nodes)
    placement.check_invariants(broken(c=(entry,)), services, nodes, assignment(ns__s=["c"]))
    short = plan(services, [node("a", 4), node("d", 1)])
    with pytest.raises(AssertionError, match="would fit on d"):  # as if d had been left unused
        placement.check_invariants(short, services, [node("a", 4), node("d", 4)])


# --- misuse ------------------------------------------------------------------------------------


def test_misuse_raises_value_error() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        placement.place([svc("ns/s"), svc("ns/s")], [node("a")])
    with pytest.raises(ValueError, match="listed twice"):
        placement.place([svc("ns/s")], [node("a"), node("a")])
    with pytest.raises(ValueError, match="not both"):
        ServiceDemand("ns/s", (ModelDemand("m", "1", G),), replicas=1, node_fraction=0.5)
    with pytest.raises(ValueError, match="node_fraction"):
        ServiceDemand("ns/s", (ModelDemand("m", "1", G),), node_fraction=0.0)
    with pytest.raises(ValueError, match="at least one model"):
        ServiceDemand("ns/s", ())
    with pytest.raises(ValueError, match="listed twice"):
        ServiceDemand("ns/s", (ModelDemand("m", "1", G), ModelDemand("m", "1", 2 * G)))
    with pytest.raises(ValueError, match="Exists"):
        Toleration("k", "Exists", "v")
    with pytest.raises(ValueError, match="empty key"):
        Toleration("", "Equal", "v")
    with pytest.raises(ValueError, match="effect"):
        Taint("k", "Sometimes")
    with pytest.raises(ValueError, match="max_skew"):
        Spread("zone", 0)
    with pytest.raises(ValueError, match="negative"):
        ModelDemand("m", "1", -1)
    with pytest.raises(ValueError, match="SLA"):
        node("a", sla={("ns/s", "m"): 1.5})


# --- properties --------------------------------------------------------------------------------
# Strategies draw whole attributes from small tables: few draws per node keep generation fast.

LABELS = [{"class": c, "zone": z} for c in "xy" for z in "abc"] + [{"class": "x"}, {"class": "y"}]
TAINT_SETS = [
    (),
    (),
    (),
    (Taint("dedicated", "NoSchedule", "ml"),),
    (Taint("maint", "NoExecute"),),
    (Taint("spot", "PreferNoSchedule"),),
    (Taint("dedicated", "NoSchedule", "ml"), Taint("spot", "PreferNoSchedule")),
]
TOLERATION_SETS = [
    (),
    (),
    (Toleration("dedicated", "Equal", "ml"),),
    (Toleration("spot", "Exists"),),
    (Toleration("maint", "Exists", effect="NoExecute"), Toleration("dedicated", "Exists")),
]
HEALTH = [Health.HEALTHY] * 6 + [Health.SUSPECT, Health.AGENT_SILENT, Health.NOT_READY]
THERMAL = [(None, False)] * 4 + [
    (50.0, False),
    (79.0, False),
    (60.0, True),
]  # (temperature, throttled)
SERVICE_NAMES = [f"ns/s{i}" for i in range(7)]
SLA = [
    {},
    {},
    {},
    {("ns/s0", "m0"): 1.0},
    {("ns/s1", "m0"): 0.2},
    {("ns/s0", "m0"): 0.5, ("ns/s2", "m1"): 1.0},
]
SIZES = [
    (0, ()),
    (1, ()),
    (2, ()),
    (3, ()),
    (5, ()),
    (1, (2,)),
    (2, (1, 4)),
    (6, (3,)),
]  # (estimate, measured)
COUNTS = [
    (0, None),
    (1, None),
    (2, None),
    (3, None),
    (6, None),
    (None, 0.1),
    (None, 0.5),
    (None, 1.0),
    (None, None),
]  # (replicas, fraction); neither: every eligible node
SPREADS = [None, None, Spread("zone", 1), Spread("zone", 2)]


@st.composite
def fleets(draw: st.DrawFn) -> list[NodeState]:
    nodes = []
    for i in range(draw(st.integers(1, 12))):
        temp, throttled = draw(st.sampled_from(THERMAL))
        nodes.append(
            node(
                f"n{i:02d}",
                draw(st.integers(0, 12)),
                reserved_gib=draw(st.integers(0, 3)),
                labels=draw(st.sampled_from(LABELS)),
                taints=draw(st.sampled_from(TAINT_SETS)),
                health=draw(st.sampled_from(HEALTH)),
                temp=temp,
                throttled=throttled,
                sla=draw(st.sampled_from(SLA)),
            )
        )
    return nodes


@st.composite
def demands(draw: st.DrawFn) -> list[ServiceDemand]:
    services = []
    for name in SERVICE_NAMES[: draw(st.integers(1, len(SERVICE_NAMES)))]:
        sizes = draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=2))
        models = [
            ModelDemand(f"m{i}", "1", e * G, tuple(m * G for m in ms)) for i, (e, ms) in enumerate(sizes)
        ]
        replicas, fraction = draw(st.sampled_from(COUNTS))
        services.append(
            svc(
                name,
                models=models,
                priority=draw(st.sampled_from(list(Priority))),
                replicas=replicas,
                fraction=fraction,
                selector=draw(st.sampled_from([{}, {}, {"class": "x"}, {"class": "y"}])),
                tolerations=draw(st.sampled_from(TOLERATION_SETS)),
                spread=draw(st.sampled_from(SPREADS)),
            )
        )
    return services


@st.composite
def changed(draw: st.DrawFn, nodes: list[NodeState]) -> list[NodeState]:
    """The fleet a moment later: some nodes fail, heat up, lose memory, or disappear."""
    out = []
    for n in nodes:
        change = draw(st.integers(0, 9))
        if change == 0:
            continue  # deleted
        if change <= 3:
            temp, throttled = draw(st.sampled_from(THERMAL))
            n = dataclasses.replace(
                n,
                health=draw(st.sampled_from(HEALTH)),
                throttled=throttled,
                temperature_c=temp,
                soft_limit_c=None if temp is None else 83.0,
                memory_reserved_bytes=draw(st.integers(0, 6)) * G,
            )
        out.append(n)
    return out


PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(demands(), fleets(), st.data())
def test_guarantees_and_stability_as_the_fleet_changes(
    services: list[ServiceDemand], nodes: list[NodeState], data: st.DataObject
) -> None:
    # plan() runs check_invariants: memory, selectors/taints/spread label, health, new work only
    # on Healthy cool nodes, targets, skew from scratch, messages iff short.
    first = plan(services, nodes)
    # Nothing changes: a re-plan from its own result keeps every pair and adds none.
    assert pairs(plan(services, nodes, first.assignment)) == pairs(first)
    later = data.draw(changed(nodes), label="later")
    current = plan(services, later, first.assignment)
    assert pairs(plan(services, later, current.assignment)) == pairs(current)
    # Unrelated changes: a node nobody may use joins; a low-priority service arrives.
    healthy = {n.name for n in later if n.health is Health.HEALTHY}
    existing = {(s, n) for s, n in pairs(current) if n in healthy}
    stranger = node("zz-new", 64, taints=[Taint("nobody-tolerates-this")])
    assert existing <= pairs(plan(services, [*later, stranger], current.assignment))
    newcomer = svc(
        "ns/zz-new",
        data.draw(st.integers(0, 4)),
        priority=Priority.LOW,
        replicas=data.draw(st.integers(1, 3)),
    )
    assert existing <= pairs(plan([*services, newcomer], later, current.assignment))


@PROPERTY
@given(demands(), fleets(), st.data(), st.randoms(use_true_random=False))
def test_same_input_in_any_order_and_either_ranking_path_gives_the_same_result(
    services: list[ServiceDemand], nodes: list[NodeState], data: st.DataObject, rnd: random.Random
) -> None:
    previous = plan(services, nodes).assignment
    later = data.draw(changed(nodes), label="later")
    expected = plan(services, later, previous)

    def shuffled(items: Iterable) -> list:
        items = list(items)
        rnd.shuffle(items)
        return items

    services2 = [
        dataclasses.replace(
            s,
            node_selector=dict(shuffled(s.node_selector.items())),
            models=tuple(shuffled(s.models)),
        )
        for s in shuffled(services)
    ]
    nodes2 = [
        dataclasses.replace(
            n,
            labels=dict(shuffled(n.labels.items())),
            sla_scores=dict(shuffled(n.sla_scores.items())),
        )
        for n in shuffled(later)
    ]
    previous2 = Assignment(dict(shuffled(previous.by_node.items())))
    assert plan(services2, nodes2, previous2) == expected
    # Sorting a service's candidates and walking the fleet's free-memory order (to the end, or
    # falling back to sorting at once or part-way) rank alike.
    for share, budget in ((0, 1), (10**9, 10**9), (10**9, 0), (10**9, 1)):
        with mock.patch.multiple(fleet_index, WALK_SHARE=share, WALK_BUDGET=budget):
            assert plan(services, later, previous) == expected, (share, budget)


SCRIPT = """
import hashlib, random
from edgefleet_operator.fleet_types import *
from edgefleet_api.inference_service import Spread, Taint, Toleration
from edgefleet_api.types import Priority
from dataclasses import replace
from edgefleet_operator.placement import Planner, place
rnd = random.Random(7)
G = 2**30
nodes = [
    NodeState(
        f"n{i}", rnd.randint(2, 16) * G,
        labels={"zone": rnd.choice("abc"), "class": rnd.choice("xy")},
        health=rnd.choice([Health.HEALTHY] * 8 + [Health.SUSPECT, Health.NOT_READY]),
        sla_scores={(f"s{j}", "m"): rnd.random() for j in range(40) if rnd.random() < 0.1},
    )
    for i in range(200)
]
services = [
    ServiceDemand(
        f"s{j}", (ModelDemand("m", "1", rnd.randint(1, 6) * G),), rnd.choice(list(Priority)),
        replicas=rnd.randint(1, 20), node_selector=rnd.choice([{}, {"class": "x"}]),
        spread=rnd.choice([None, Spread("zone", 1)]),
    )
    for j in range(40)
]
first = place(services, nodes)
planner = Planner()
planner.plan(services, nodes)
failed = [replace(n, health=Health.NOT_READY) if n.name in ("n7", "n9") else n for n in nodes]
incremental = planner.plan(services, failed, first.assignment)
assert planner.incremental
nodes = [n for n in nodes if n.name not in ("n3", "n5")]
results = (first, place(services, nodes, first.assignment), incremental)
print(hashlib.sha256(repr(results).encode()).hexdigest())
"""


def test_result_does_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    """Same input in fresh interpreters with different string hash seeds: same result."""
    digests = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1
    assert re.fullmatch("[0-9a-f]{64}", digests.pop())
