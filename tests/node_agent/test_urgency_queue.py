"""The urgency queue (pure): ordering, deadlines, admission, displacement, take."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet_api.types import Priority
from node_agent.runtime.urgency_queue import UrgencyQueue

P = Priority


def test_queue_orders_by_class_then_deadline_then_arrival() -> None:
    q: UrgencyQueue[str] = UrgencyQueue(100)
    q.offer(["low"], [1], P.LOW, None, 0.0)
    q.offer(["n-late"], [1], P.NORMAL, 9.0, 0.0)
    q.offer(["n-none-1"], [1], P.NORMAL, None, 0.0)
    q.offer(["n-early"], [1], P.NORMAL, 5.0, 0.0)
    q.offer(["crit"], [1], P.CRITICAL, None, 0.0)
    q.offer(["n-none-2"], [1], P.NORMAL, None, 0.0)
    q.offer(["high"], [1], P.HIGH, 50.0, 0.0)
    q.check_invariants()
    order = [q.pop() for _ in range(len(q))]
    assert order == ["crit", "high", "n-early", "n-late", "n-none-1", "n-none-2", "low"]
    assert q.pop() is None and q.cost == 0


def test_queue_refuses_at_bound_and_displaces_least_urgent() -> None:
    q: UrgencyQueue[str] = UrgencyQueue(3)
    for name, prio in [("n1", P.NORMAL), ("l1", P.LOW), ("l2", P.LOW)]:
        assert q.offer([name], [1], prio, None, 0.0).admitted
    # same class as the least urgent queued item: refused, nothing displaced
    o = q.offer(["l3"], [1], P.LOW, None, 0.0)
    assert not o.admitted and list(o.displaced) == []
    # a normal arrival displaces the newest low item
    o = q.offer(["n2"], [1], P.NORMAL, None, 0.0)
    assert o.admitted and list(o.displaced) == ["l2"]
    # a critical arrival needing 2 units displaces the remaining low, then the newest normal
    o = q.offer(["c1"], [2], P.CRITICAL, None, 0.0)
    assert o.admitted and list(o.displaced) == ["l1", "n2"]
    q.check_invariants()
    assert [q.pop(), q.pop()] == ["c1", "n1"]


def test_queue_admits_all_or_nothing_and_never_displaces_in_vain() -> None:
    q: UrgencyQueue[str] = UrgencyQueue(4)
    q.offer(["n1", "n2"], [1, 1], P.NORMAL, None, 0.0)
    q.offer(["l1"], [1], P.LOW, None, 0.0)
    # needs 3, only 1 free + 1 displaceable (low): refused and low stays
    o = q.offer(["x1", "x2"], [2, 1], P.NORMAL, None, 0.0)
    assert not o.admitted and list(o.displaced) == []
    assert len(q) == 3 and q.cost == 3
    # bigger than the bound: refused outright
    assert not q.offer(["huge"], [5], P.CRITICAL, None, 0.0).admitted


def test_queue_drops_expired_items_to_make_room() -> None:
    q: UrgencyQueue[str] = UrgencyQueue(2)
    q.offer(["soon"], [1], P.NORMAL, 1.0, 0.0)
    q.offer(["later"], [1], P.NORMAL, 10.0, 0.0)
    o = q.offer(["new"], [1], P.LOW, None, 2.0)
    assert o.admitted and list(o.expired) == ["soon"] and list(o.displaced) == []
    assert q.pop_expired(10.0) == ["later"]
    assert q.earliest_deadline() is None


def test_take_respects_cost_groups_and_liveness() -> None:
    q: UrgencyQueue[tuple[str, int]] = UrgencyQueue(100, group_of=lambda it: it[1])
    q.offer([("a", 1)], [3], P.HIGH, None, 0.0)
    q.offer([("b", 2)], [1], P.NORMAL, None, 0.0)  # other group: keeps its place
    q.offer([("dead", 1)], [2], P.NORMAL, None, 0.0)
    q.offer([("c", 1)], [2], P.NORMAL, None, 0.0)
    q.offer([("d", 1)], [4], P.LOW, None, 0.0)  # does not fit: taking stops
    q.offer([("e", 1)], [1], P.LOW, None, 0.0)
    taken = q.take(8, alive=lambda it: it[0] != "dead")
    assert taken == [("a", 1), ("c", 1)]
    q.check_invariants()
    assert q.cost == 6  # b, d, e
    assert q.take(1) == [("b", 2)]
    # a refill: nothing costlier than the room left, only the batch's own group
    q.offer([("f", 2)], [1], P.LOW, None, 0.0)
    assert q.take(3, first_alone=False) == []  # d (cost 4) is first and does not fit
    # a first item costlier than the batch goes alone
    assert q.take(1) == [("d", 1)]
    assert q.take(5, group=2) == [("f", 2)]
    assert q.take(5) == [("e", 1)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(Priority)),
            st.one_of(st.none(), st.integers(0, 20)),
            st.integers(1, 3),
        ),
        max_size=40,
    ),
    st.integers(3, 12),
)
def test_queue_matches_reference_model(ops: list[tuple[Priority, int | None, int]], bound: int) -> None:
    """Against a brute-force model: same admissions, same victims, same pop order."""
    q: UrgencyQueue[int] = UrgencyQueue(bound)
    ref: list[tuple[int, float, int, int]] = []  # (prio, deadline, seq, cost)
    for seq, (prio, deadline, cost) in enumerate(ops):
        d = math.inf if deadline is None else float(deadline)
        o = q.offer([seq], [cost], prio, deadline, now_s=-1.0)
        used = sum(e[3] for e in ref)
        if used + cost <= bound:
            expect_ok, expect_victims = True, []
        else:
            below = sorted((e for e in ref if e[0] > prio), key=lambda e: (e[0], e[1], e[2]))
            freed, victims = 0, []
            while below and used + cost - freed > bound:
                victim = below.pop()
                freed += victim[3]
                victims.append(victim)
            expect_ok = used + cost - freed <= bound
            expect_victims = [v[2] for v in victims] if expect_ok else []
        assert o.admitted == expect_ok
        assert list(o.displaced) == expect_victims
        ref = [e for e in ref if e[2] not in expect_victims]
        if expect_ok:
            ref.append((prio, d, seq, cost))
        q.check_invariants()
        assert q.cost <= bound
    expected = [e[2] for e in sorted(ref, key=lambda e: (e[0], e[1], e[2]))]
    assert [q.pop() for _ in range(len(ref))] == expected


def test_cost_up_to_a_class_and_shedding_work_without_a_deadline() -> None:
    q: UrgencyQueue[str] = UrgencyQueue(100)
    q.offer(["crit"], [1], P.CRITICAL, None, 0.0)
    q.offer(["high"], [2], P.HIGH, None, 0.0)
    q.offer(["n-dl"], [4], P.NORMAL, 5.0, 0.0)
    q.offer(["n-none"], [8], P.NORMAL, None, 0.0)
    q.offer(["low-dl"], [16], P.LOW, 5.0, 0.0)
    assert [q.cost_up_to(p) for p in (P.CRITICAL, P.HIGH, P.NORMAL, P.LOW)] == [1, 3, 15, 31]
    # only work without a deadline goes, least urgent first: the queue may stay above
    assert q.shed(0, without_deadline_only=True) == ["n-none", "high", "crit"]
    assert q.cost == 20 and q.cost_up_to(P.NORMAL) == 4
    q.check_invariants()
    assert q.shed(4) == ["low-dl"]
    q.take(10)
    assert q.cost_up_to(P.LOW) == 0
    q.check_invariants()
