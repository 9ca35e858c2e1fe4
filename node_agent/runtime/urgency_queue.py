"""The urgency queue: a bounded priority queue ordered by (priority class, deadline, arrival).

Strict priority classes (critical first), earliest deadline first within a class, arrival
order among equal deadlines. Past its bound an arrival is refused (an `Offer` that is not
admitted) unless it is of a more urgent class than queued work, in which case the least
urgent queued items are displaced and handed back to the caller. Items past their deadline
are handed back as expired. The stream pool queues its jobs in one, each batcher its pieces.

Pure data structure: no clock reads (time is passed in), no locking, no I/O.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from edgefleet_api.types import Priority

T = TypeVar("T")

_NUM_CLASSES = len(Priority)
_INF = math.inf

ANY_GROUP: Hashable = object()
"""`UrgencyQueue.take(group=ANY_GROUP)`: take the first item's group."""


@dataclass(frozen=True, slots=True)
class Offer(Generic[T]):
    """Outcome of `UrgencyQueue.offer`: admitted or not, and who lost their place.

    `displaced` items were queued and are now out (their callers get Overloaded);
    `expired` items were found past their deadline while making room.
    """

    admitted: bool
    displaced: tuple[T, ...] = ()
    expired: tuple[T, ...] = ()


ADMITTED: Offer[Any] = Offer(True)
"""The offer of an arrival admitted with nothing displaced or expired (always this object)."""
_REFUSED: Offer[Any] = Offer(False)


class UrgencyQueue(Generic[T]):
    """A bounded priority queue ordered by (priority class, deadline, arrival).

    Invariants (checked by `check_invariants`):
    - each class list is sorted by (deadline, seq); deadline None is +inf;
    - `cost` is the sum of queued items' costs and never exceeds `bound` after an
      `offer` (lowering `bound` refuses arrivals until the queue drains; it evicts nothing);
      `cost_up_to(p)` is the sum over classes p and more urgent;
    - an item is displaced only by an arrival of a strictly more urgent class, and
      only the least urgent items go (lowest class, latest deadline, newest first).

    Pure data structure: no clock reads (time is passed in), no locking.
    """

    __slots__ = ("_class_cost", "_classes", "_group_of", "_seq", "bound", "cost")

    def __init__(self, bound: float, group_of: Callable[[T], Hashable] | None = None) -> None:
        if not bound > 0:
            raise ValueError(f"bound must be > 0, got {bound!r}")
        self.bound = bound
        self.cost = 0.0
        self._seq = 0
        self._group_of = group_of
        # per class: sorted list of (deadline_s, seq, cost, item)
        self._classes: list[list[tuple[float, int, float, T]]] = [[] for _ in range(_NUM_CLASSES)]
        self._class_cost = [0.0] * _NUM_CLASSES

    def __len__(self) -> int:
        return sum(len(c) for c in self._classes)

    def __bool__(self) -> bool:
        return any(self._classes)

    def offer(
        self,
        items: Sequence[T],
        costs: Sequence[float],
        priority: Priority,
        deadline_s: float | None,
        now_s: float,
    ) -> Offer[T]:
        """Admit all of `items` (one caller's work) or none of them.

        Room is made, in this order, by dropping expired items and by displacing
        queued items of less urgent classes than `priority`.
        """
        n = len(items)
        assert n == len(costs) and n, "offer needs one cost per item"
        need = float(costs[0]) if n == 1 else float(sum(costs))
        if self.cost + need <= self.bound:  # the common case: room for it as things are
            self._insert(items, costs, priority, deadline_s)
            return ADMITTED
        if need > self.bound:
            return _REFUSED
        displaced: tuple[T, ...] = ()
        expired = tuple(self.pop_expired(now_s))
        if self.cost + need > self.bound:
            victims = self._least_urgent_below(priority, self.cost + need - self.bound)
            if victims is None:
                return Offer(False, (), expired)
            displaced = tuple(victims)
        self._insert(items, costs, priority, deadline_s)
        if expired or displaced:
            return Offer(True, displaced, expired)
        return ADMITTED

    def offer_one(
        self, item: T, cost: float, priority: Priority, deadline_s: float | None, now_s: float
    ) -> Offer[T]:
        """`offer` of a single item (the common case, without building sequences)."""
        if self.cost + cost > self.bound:
            return self.offer((item,), (cost,), priority, deadline_s, now_s)
        # (`_insert_one`, inlined: this runs for every request)
        deadline = _INF if deadline_s is None else deadline_s
        lst = self._classes[priority]
        self._seq = seq = self._seq + 1
        entry = (deadline, seq, float(cost), item)
        if not lst or lst[-1][0] <= deadline:  # (seq only grows: it sorts last)
            lst.append(entry)
        else:
            bisect.insort(lst, entry)
        self.cost += cost
        self._class_cost[priority] += cost
        return ADMITTED

    def _insert(
        self, items: Sequence[T], costs: Sequence[float], priority: Priority, deadline_s: float | None
    ) -> None:
        for item, cost in zip(items, costs, strict=True):
            self._insert_one(item, cost, priority, deadline_s)

    def _insert_one(self, item: T, cost: float, priority: Priority, deadline_s: float | None) -> None:
        deadline = _INF if deadline_s is None else deadline_s
        lst = self._classes[priority]
        self._seq += 1
        entry = (deadline, self._seq, float(cost), item)
        if not lst or lst[-1][0] <= deadline:  # (seq only grows: it sorts last)
            lst.append(entry)
        else:
            bisect.insort(lst, entry)
        self.cost += cost
        self._class_cost[priority] += cost

    def _least_urgent_below(self, priority: Priority, excess: float) -> list[T] | None:
        """Remove least urgent items of classes below `priority` until `excess` is freed.

        Returns None (removing nothing) when even all of them would not free enough.
        """
        available = sum(e[2] for c in self._classes[priority + 1 :] for e in c)
        if available < excess:
            return None
        victims: list[T] = []
        freed = 0.0
        for cls in range(_NUM_CLASSES - 1, priority, -1):
            lst = self._classes[cls]
            while lst and freed < excess:
                _, _, cost, item = lst.pop()
                freed += cost
                self._class_cost[cls] -= cost
                victims.append(item)
            if freed >= excess:
                break
        self.cost -= freed
        return victims

    def pop_expired(self, now_s: float) -> list[T]:
        """Remove and return every item whose deadline is at or before `now_s`."""
        out: list[T] = []
        for cls, lst in enumerate(self._classes):
            if not lst or lst[0][0] > now_s:
                continue
            i = bisect.bisect_right(lst, now_s, key=lambda e: e[0])
            for e in lst[:i]:
                self.cost -= e[2]
                self._class_cost[cls] -= e[2]
                out.append(e[3])
            del lst[:i]
        return out

    def pop(self) -> T | None:
        """Remove and return the most urgent item, or None when empty."""
        for cls, lst in enumerate(self._classes):
            if lst:
                entry = lst.pop(0)
                self.cost -= entry[2]
                self._class_cost[cls] -= entry[2]
                return entry[3]
        return None

    def take(
        self,
        max_cost: float,
        alive: Callable[[T], bool] | None = None,
        *,
        first_alone: bool = True,
        group: Hashable = ANY_GROUP,
        classes: tuple[Priority, Priority] = (Priority.CRITICAL, Priority.LOW),
    ) -> list[T]:
        """Remove and return the most urgent items whose costs sum to at most `max_cost`,
        of the `classes` (most urgent, least urgent) range (all classes by default).

        Stops at the first item that does not fit, so urgency order is kept; with
        `first_alone` (the default) a first item costlier than `max_cost` goes alone, so
        a non-empty queue always yields something. With `group_of`, only items of one
        group are taken (`group`, or else the first item's); others keep their places.
        Items for which `alive` is false are dropped silently (their callers already
        have an outcome).
        """
        lo, hi = classes
        lists = self._classes if lo == 0 and hi == _NUM_CLASSES - 1 else self._classes[lo : hi + 1]
        group_of = self._group_of
        if group_of is None:
            return self._take_any(lists, lo, max_cost, alive, first_alone)
        taken: list[T] = []
        total = 0.0
        stop = False
        class_cost = self._class_cost
        for cls, lst in enumerate(lists, lo):
            keep: list[tuple[float, int, float, T]] | None = None
            i, n = 0, len(lst)
            while i < n:
                entry = lst[i]
                cost, item = entry[2], entry[3]
                if alive is not None and not alive(item):
                    self.cost -= cost
                    class_cost[cls] -= cost
                    i += 1
                    continue
                g = group_of(item)
                if group is not ANY_GROUP and g != group:
                    if keep is None:
                        keep = []
                    keep.append(entry)
                    i += 1
                    continue
                group = g
                if total + cost > max_cost and (taken or not first_alone):
                    stop = True
                    break
                taken.append(item)
                total += cost
                self.cost -= cost
                class_cost[cls] -= cost
                i += 1
                if total >= max_cost:
                    stop = True
                    break
            if keep is None:
                del lst[:i]
            else:
                lst[:i] = keep
            if stop:
                break
        return taken

    def _take_any(
        self,
        lists: list[list[tuple[float, int, float, T]]],
        lo: int,
        max_cost: float,
        alive: Callable[[T], bool] | None,
        first_alone: bool,
    ) -> list[T]:
        """`take` without groups (the common case, with fewer checks per item)."""
        taken: list[T] = []
        total = 0.0
        removed = 0.0
        class_cost = self._class_cost
        for cls, lst in enumerate(lists, lo):
            if not lst:
                continue
            before = total + removed
            i, n = 0, len(lst)
            while i < n:
                _, _, cost, item = lst[i]
                if alive is not None and not alive(item):
                    removed += cost
                    i += 1
                    continue
                if total + cost > max_cost and (taken or not first_alone):
                    break
                taken.append(item)
                total += cost
                i += 1
                if total >= max_cost:
                    break
            del lst[:i]
            class_cost[cls] -= total + removed - before
            if i < n:  # stopped inside this class: the rest stays first in line
                break
        self.cost -= total + removed
        return taken

    def shed(self, max_cost: float, *, without_deadline_only: bool = False) -> list[T]:
        """Remove the least urgent items until `cost <= max_cost` (with `without_deadline_only`,
        only items without a deadline: the cost may stay above); returns them."""
        out: list[T] = []
        for cls in range(_NUM_CLASSES - 1, -1, -1):
            lst = self._classes[cls]
            while lst and self.cost > max_cost and (not without_deadline_only or lst[-1][0] == _INF):
                entry = lst.pop()
                self.cost -= entry[2]
                self._class_cost[cls] -= entry[2]
                out.append(entry[3])
        return out

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove and return every item for which `predicate` is true (O(n))."""
        out: list[T] = []
        for cls, lst in enumerate(self._classes):
            if any(predicate(e[3]) for e in lst):
                keep = []
                for e in lst:
                    if predicate(e[3]):
                        self.cost -= e[2]
                        self._class_cost[cls] -= e[2]
                        out.append(e[3])
                    else:
                        keep.append(e)
                lst[:] = keep
        return out

    def items(self) -> Iterator[T]:
        """The queued items, most urgent first (do not change the queue meanwhile)."""
        return (e[3] for lst in self._classes for e in lst)

    def drain(self) -> list[T]:
        """Remove and return everything, most urgent first."""
        out = [e[3] for lst in self._classes for e in lst]
        for lst in self._classes:
            lst.clear()
        self.cost = 0.0
        self._class_cost = [0.0] * _NUM_CLASSES
        return out

    def cost_up_to(self, priority: Priority) -> float:
        """The cost queued at class `priority` or more urgent (what an item of that class
        waits behind). Safe to read without the queue's lock for an estimate: it reads only
        floats, each written whole."""
        costs = self._class_cost
        return sum(costs[: priority + 1]) if priority < _NUM_CLASSES - 1 else self.cost

    def holds_up_to(self, priority: Priority) -> bool:
        """Whether an item of class `priority` or more urgent is queued."""
        return any(self._classes[: priority + 1])

    def top_priority(self) -> Priority | None:
        """The most urgent class holding an item, None when empty."""
        for cls, lst in enumerate(self._classes):
            if lst:
                return Priority(cls)
        return None

    def earliest_deadline(self) -> float | None:
        """The earliest deadline among queued items, None if none has one."""
        best = math.inf
        for lst in self._classes:
            if lst and lst[0][0] < best:
                best = lst[0][0]
        return None if best == math.inf else best

    def check_invariants(self) -> None:
        total = 0.0
        for cls, lst in enumerate(self._classes):
            assert all(lst[i][:2] < lst[i + 1][:2] for i in range(len(lst) - 1)), "unsorted"
            in_class = sum(e[2] for e in lst)
            assert math.isclose(in_class, self._class_cost[cls], abs_tol=1e-6), (cls, self._class_cost)
            total += in_class
        assert math.isclose(total, self.cost, abs_tol=1e-6), (total, self.cost)
