"""Fleet placement: which nodes hold which services' models. Pure; no I/O.

- `place(services, nodes, previous)` (`planning`): one placement, phase by phase; its docstring
  lists the guarantees.
- `Planner` (`replanning`): `place` for a loop that re-plans the same fleet, re-planning only what
  a change of some nodes' health, heat, capacity or SLA records reaches; its results equal
  `place()`'s.
- `check_invariants` (`invariants`): the guarantees, asserted on a result (tests, benchmarks).

Inside: `reasons` (why a node cannot take a service), `fleet_index` (the per-call index of nodes
and services, and how nodes rank), `phases` (prepare, keep stable, fill, why short).
"""

from edgefleet_operator.placement.invariants import check_invariants
from edgefleet_operator.placement.planning import DEFAULT_SETTINGS, place
from edgefleet_operator.placement.reasons import hot_reason
from edgefleet_operator.placement.replanning import Planner

__all__ = ["DEFAULT_SETTINGS", "Planner", "check_invariants", "hot_reason", "place"]
