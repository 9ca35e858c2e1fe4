"""Incremental re-planning (`placement.Planner`): every result equals `place()` over the same input.

Exact scenarios first (each also checks that the incremental path ran, or that an unhandled change
fell back to a full plan), then a property over random fleets and random sequences of small
changes, then the bench's fleet at a reduced scale. Every Planner result is compared with
`place()`, checked with `check_invariants`, and the Planner's kept state with `check_state`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_placement import (
    HEALTH,
    SLA,
    THERMAL,
    G,
    assignment,
    demands,
    events,
    fleets,
    node,
    on,
    pairs,
    svc,
)

from bench.placement import make_fleet
from edgefleet_api.inference_service import Spread, Taint
from edgefleet_api.types import Priority
from edgefleet_operator import placement
from edgefleet_operator.fleet_types import (
    Assignment,
    Health,
    NodeState,
    PlacementResult,
    PlacementSettings,
    ServiceDemand,
)


def replan(
    planner: placement.Planner,
    services: Sequence[ServiceDemand],
    nodes: Sequence[NodeState],
    previous: Assignment | None = None,
    *,
    incremental: bool | None = None,
) -> PlacementResult:
    """planner.plan(...), asserted equal to place(...) and valid; `incremental`: the path it must take."""
    result = planner.plan(services, nodes, previous)
    assert result == placement.place(services, nodes, previous, planner.settings)
    placement.check_invariants(result, services, nodes, previous, planner.settings)
    planner.check_state()
    if incremental is not None:
        assert planner.incremental is incremental
    return result


def changed(nodes: Sequence[NodeState], name: str, **fields: object) -> list[NodeState]:
    return [dataclasses.replace(n, **fields) if n.name == name else n for n in nodes]


# --- scenarios ---------------------------------------------------------------------------------


def test_a_failed_node_s_work_moves_and_only_that() -> None:
    nodes = [node("a"), node("b"), node("c", 4)]
    services = [svc("ns/one", 2), svc("ns/two", 3, replicas=2), svc("ns/other", 1)]
    planner = placement.Planner()
    first = replan(planner, services, nodes, incremental=False)
    assert on(first, "ns/one") == ("a",) and on(first, "ns/two") == ("a", "b")
    failed = changed(nodes, "a", health=Health.NOT_READY)
    r = replan(planner, services, failed, first.assignment, incremental=True)
    assert on(r, "ns/one") == ("b",) and on(r, "ns/two") == ("b", "c")
    assert events(r, "ns/one") == [("ns/one", "Moved", "moved from a (node not ready) to b")]
    assert pairs(r) - pairs(first) == {("ns/one", "b"), ("ns/two", "c")}
    # the node recovers: nothing moves back (pairs stay), and the re-plan is incremental again
    back = replan(planner, services, nodes, r.assignment, incremental=True)
    assert pairs(back) == pairs(r) and events(back) == []


def test_a_short_service_takes_a_node_that_recovers_or_gains_memory() -> None:
    nodes = [node("a", 4), node("b", 4, health=Health.NOT_READY), node("c", 4, reserved_gib=3)]
    services = [svc("ns/big", 3, replicas=3), svc("ns/small", 1)]
    planner = placement.Planner()
    first = replan(planner, services, nodes)
    assert on(first, "ns/big") == ("a",) and first.services["ns/big"].message
    recovered = changed(nodes, "b", health=Health.HEALTHY)
    r = replan(planner, services, recovered, first.assignment, incremental=True)
    assert on(r, "ns/big") == ("a", "b")
    roomier = changed(recovered, "c", memory_reserved_bytes=0)
    r = replan(planner, services, roomier, r.assignment, incremental=True)
    assert on(r, "ns/big") == ("a", "b", "c") and not r.services["ns/big"].message


def test_a_node_that_loses_memory_drops_its_least_urgent_pairs_first() -> None:
    nodes = [node("a", 8), node("b", 2)]
    services = [
        svc("ns/low", 3, priority=Priority.LOW),
        svc("ns/crit", 3, priority=Priority.CRITICAL),
        svc("ns/norm", 2),
    ]
    planner = placement.Planner()
    first = replan(planner, services, nodes, assignment(ns__low=["a"], ns__crit=["a"], ns__norm=["a"]))
    squeezed = changed(nodes, "a", memory_reserved_bytes=3 * G)
    r = replan(planner, services, squeezed, first.assignment, incremental=True)
    assert on(r, "ns/crit") == ("a",) and on(r, "ns/norm") == ("a",) and on(r, "ns/low") == ()
    assert events(r, "ns/low")[0] == ("ns/low", "Removed", "removed from a (insufficient memory)")


def test_displacement_cascades_down_the_priorities() -> None:
    gpu = {"tier": "gpu"}
    nodes = [node("a", 6, labels=gpu), node("b", 6, labels=gpu), node("c", 6, labels=gpu), node("d", 6)]
    services = [
        svc("ns/crit", 6, priority=Priority.CRITICAL, selector=gpu),
        svc("ns/crit2", 6, priority=Priority.CRITICAL, selector=gpu),
        svc("ns/high", 6, priority=Priority.HIGH),
        svc("ns/low", 6, priority=Priority.LOW),
    ]
    planner = placement.Planner()
    first = replan(
        planner, services, nodes, assignment(ns__crit=["a"], ns__crit2=["c"], ns__high=["b"], ns__low=["d"])
    )
    r = replan(
        planner, services, changed(nodes, "a", health=Health.AGENT_SILENT), first.assignment, incremental=True
    )
    assert on(r, "ns/crit") == ("b",) and on(r, "ns/high") == ("d",) and on(r, "ns/low") == ()
    assert [e[1] for e in events(r)] == ["Moved", "Evicted", "Placed", "Evicted", "FailedPlacement"]


def test_a_fraction_target_follows_the_eligible_count() -> None:
    nodes = [node(f"n{i}") for i in range(4)]
    services = [svc("ns/half", fraction=0.5), svc("ns/all", replicas=None)]
    planner = placement.Planner()
    first = replan(planner, services, nodes)
    assert on(first, "ns/half") == ("n0", "n1") and len(on(first, "ns/all")) == 4
    down = nodes[:2] + [dataclasses.replace(n, health=Health.NOT_READY) for n in nodes[2:]]
    r = replan(planner, services, down, first.assignment, incremental=True)
    assert r.services["ns/half"].target == 1 and r.services["ns/all"].target == 2
    assert on(r, "ns/half") == ("n0",) and on(r, "ns/all") == ("n0", "n1")
    assert events(r, "ns/half") == [("ns/half", "Removed", "removed from n1 (scaled down)")]
    back = replan(planner, services, nodes, r.assignment, incremental=True)
    assert on(back, "ns/half") == ("n0", "n1") and on(back, "ns/all") == ("n0", "n1", "n2", "n3")


def test_a_shrinking_target_drops_suspect_nodes_first() -> None:
    nodes = [node(f"n{i}") for i in range(4)]
    planner = placement.Planner()
    first = replan(planner, [svc("ns/half", fraction=0.5)], nodes)
    assert on(first, "ns/half") == ("n0", "n1")
    later = [dataclasses.replace(nodes[0], health=Health.SUSPECT), nodes[1]]
    later += [dataclasses.replace(n, health=Health.NOT_READY) for n in nodes[2:]]
    r = replan(planner, [svc("ns/half", fraction=0.5)], later, first.assignment, incremental=True)
    assert on(r, "ns/half") == ("n1",)
    assert events(r) == [("ns/half", "Removed", "removed from n0 (scaled down)")]


def test_spread_services_re_plan_within_their_skew() -> None:
    nodes = [node(f"{z}{i}", labels={"zone": z}) for z in "ab" for i in range(3)]
    spread = svc("ns/spread", 5, replicas=6, spread=Spread("zone", 1))
    filler = svc("ns/filler", 4, priority=Priority.LOW, replicas=2)
    planner = placement.Planner()
    first = replan(planner, [spread, filler], nodes)
    for name in ("a0", "b1", "a2"):
        first = replan(
            planner,
            [spread, filler],
            changed(nodes, name, throttled=True, temperature_c=70.0),
            first.assignment,
        )
        assert planner.incremental


def test_sla_records_and_heat_change_rankings_only_for_new_work() -> None:
    nodes = [node("a", sla={("ns/s", "m"): 0.2}), node("b"), node("c")]
    services = [svc("ns/s", replicas=2), svc("ns/t")]
    planner = placement.Planner()
    first = replan(planner, services, nodes)
    assert on(first, "ns/s") == ("b", "c")
    later = changed(changed(nodes, "a", sla_scores={("ns/s", "m"): 1.0}), "c", health=Health.NOT_READY)
    r = replan(planner, services, later, first.assignment, incremental=True)
    assert on(r, "ns/s") == ("a", "b")  # the better record now ranks a first


@pytest.mark.parametrize(
    "change",
    ["labels", "taints", "node added", "node deleted", "service changed", "service added", "previous"],
)
def test_changes_it_does_not_handle_plan_from_scratch(change: str) -> None:
    nodes = [node("a", labels={"zone": "x"}), node("b"), node("c", health=Health.NOT_READY)]
    services = [svc("ns/s", replicas=2), svc("ns/t", 9, spread=Spread("zone", 1))]
    planner = placement.Planner()
    first = replan(planner, services, nodes)
    previous: Assignment | None = first.assignment
    if change == "labels":
        nodes = changed(nodes, "a", labels={"zone": "y"})
    elif change == "taints":
        nodes = changed(nodes, "b", taints=(Taint("k"),))
    elif change == "node added":
        nodes = [*nodes, node("d")]
    elif change == "node deleted":
        nodes = nodes[1:]
    elif change == "service changed":
        services = [svc("ns/s", replicas=3), services[1]]
    elif change == "service added":
        services = [*services, svc("ns/u")]
    else:
        previous = assignment(ns__s=["a"])
    replan(planner, services, nodes, previous, incremental=False)
    # and from that fresh state, an unchanged re-plan is incremental
    replan(planner, services, nodes, planner.plan(services, nodes, previous).assignment, incremental=True)


def test_labels_no_service_reads_re_plan_incrementally() -> None:
    """A node's label that no service selects or spreads by (a bookkeeping label a tool sets)
    changes no placement: no plan from scratch at 10,000 nodes for it. One that a selector or a
    spread reads does."""
    nodes = [node("a", labels={"zone": "x", "k": "v"}), node("b", labels={"zone": "y"}), node("c")]
    services = [svc("ns/s", selector={"k": "v"}), svc("ns/t", replicas=3, spread=Spread("zone", 1))]
    planner = placement.Planner()
    last = replan(planner, services, nodes)
    for labels in (
        {"zone": "x", "k": "v", "tick": "1"},
        {"zone": "x", "k": "v", "tick": "2"},
        {"zone": "x", "k": "v"},
    ):
        nodes = changed(nodes, "a", labels=labels)
        last = replan(planner, services, nodes, last.assignment, incremental=True)
    for labels in ({"zone": "x"}, {"zone": "y"}):  # the selector's key, then the spread's
        nodes = changed(nodes, "a", labels=labels)
        last = replan(planner, services, nodes, last.assignment, incremental=False)
    assert on(last, "ns/s") == ()


def test_equal_copies_of_the_input_re_plan_incrementally() -> None:
    """The operator rebuilds every object each pass: equal values, new objects."""
    nodes = [node("a", sla={("ns/s", "m"): 1.0}, labels={"k": "v"}), node("b")]
    services = [svc("ns/s", selector={"k": "v"}), svc("ns/t", replicas=2)]
    planner = placement.Planner()
    first = replan(planner, services, nodes)
    copies = [dataclasses.replace(n, labels=dict(n.labels), sla_scores=dict(n.sla_scores)) for n in nodes]
    rebuilt = Assignment(
        {
            n: tuple(dataclasses.replace(m, traffic_weight=50) for m in ms)
            for n, ms in first.assignment.by_node.items()
        }
    )  # a rollout's weights differ from the plan's; the pairs are what counts
    demands_ = [dataclasses.replace(s, node_selector=dict(s.node_selector)) for s in services]
    replan(planner, demands_, copies, rebuilt, incremental=True)


def test_misuse_raises_and_the_next_call_plans_afresh() -> None:
    planner = placement.Planner()
    first = replan(planner, [svc("ns/s")], [node("a")])
    with pytest.raises(ValueError, match="listed twice"):
        planner.plan([svc("ns/s")], [node("a"), node("a")], first.assignment)
    with pytest.raises(ValueError, match="listed twice"):
        planner.plan([svc("ns/s"), svc("ns/s")], [node("a")], first.assignment)
    replan(planner, [svc("ns/s")], [node("a")], first.assignment, incremental=False)


def test_settings_are_the_planner_s() -> None:
    nodes = [node("a", temp=74.0), node("b")]
    wide = PlacementSettings(thermal_margin_c=10.0)
    planner = placement.Planner(wide)
    first = replan(planner, [svc("ns/s", replicas=2)], nodes)
    assert on(first, "ns/s") == ("b",)
    replan(planner, [svc("ns/s", replicas=2)], changed(nodes, "a", temperature_c=60.0), first.assignment)
    assert planner.incremental and on(planner.plan([svc("ns/s", replicas=2)], nodes), "ns/s")


# --- properties --------------------------------------------------------------------------------


@st.composite
def drifted(draw: st.DrawFn, nodes: list[NodeState]) -> list[NodeState]:
    """The fleet a moment later, changed only in what a Planner re-plans incrementally: health,
    heat, capacity, SLA records, labels no service reads (a few nodes, or none)."""
    out = []
    for n in nodes:
        change = draw(st.integers(0, 9))
        if change == 1:
            n = dataclasses.replace(n, health=draw(st.sampled_from(HEALTH)))
        elif change == 2:
            temp, throttled = draw(st.sampled_from(THERMAL))
            n = dataclasses.replace(
                n, temperature_c=temp, throttled=throttled, soft_limit_c=None if temp is None else 83.0
            )
        elif change == 3:
            n = dataclasses.replace(n, memory_reserved_bytes=draw(st.integers(0, 6)) * G)
        elif change == 4:
            n = dataclasses.replace(n, memory_total_bytes=draw(st.integers(0, 12)) * G)
        elif change == 5:
            n = dataclasses.replace(n, sla_scores=draw(st.sampled_from(SLA)))
        elif change == 6:  # a label no service reads
            n = dataclasses.replace(n, labels={**n.labels, "tick": str(draw(st.integers(0, 2)))})
        out.append(n)
    return out


PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(demands(), fleets(), st.data())
def test_incremental_re_plans_equal_full_plans(
    services: list[ServiceDemand], nodes: list[NodeState], data: st.DataObject
) -> None:
    planner = placement.Planner()
    last = replan(planner, services, nodes, None)
    first = last
    for _ in range(data.draw(st.integers(1, 4), label="steps")):
        nodes = data.draw(drifted(nodes), label="nodes")
        which = data.draw(st.sampled_from(["last"] * 4 + ["first", "none"]), label="previous")
        previous = {"last": last.assignment, "first": first.assignment, "none": None}[which]
        last = replan(planner, services, nodes, previous, incremental=True if which == "last" else None)


def test_the_bench_fleet_re_plans_incrementally_through_failures_and_recoveries() -> None:
    nodes, services = make_fleet(160, 160, seed=5)
    planner = placement.Planner()
    result = replan(planner, services, nodes)
    busiest = sorted(result.assignment.by_node, key=lambda n: (-len(result.assignment.by_node[n]), n))
    current = nodes
    for step, name in enumerate(busiest[:6]):
        health = Health.NOT_READY if step % 3 else Health.SUSPECT
        current = changed(current, name, health=health)
        result = replan(planner, services, current, result.assignment, incremental=True)
    for name in busiest[:6:2]:  # some come back
        current = changed(current, name, health=Health.HEALTHY)
        result = replan(planner, services, current, result.assignment, incremental=True)
