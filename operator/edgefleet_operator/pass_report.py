"""What one fleet pass saw and did (for logs, metrics and tests)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from edgefleet_operator.fleet_types import PlacementResult


@dataclass
class PassReport:
    """Counts of one pass; `wrote` and `defer` may be called from the writer threads."""

    nodes: int = 0
    services: int = 0
    unplaced: int = 0
    writes: dict[str, int] = field(default_factory=dict)
    health: dict[str, str] = field(default_factory=dict)
    result: PlacementResult | None = None
    incremental_plan: bool = False
    deferred: int = 0
    """Agent Pod syncs (nodes with work) and bookkeeping (services) this pass left to the next because
    urgent work arrived."""
    seconds: float = 0.0
    rollout_events: dict[str, int] = field(default_factory=dict)
    """Rollout events (RolloutStarted, RolledBack, RolloutPromoted, ...) of the steps that stood."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def wrote(self, what: str) -> None:
        with self._lock:  # writes run on several threads
            self.writes[what] = self.writes.get(what, 0) + 1

    def defer(self, n: int = 1) -> None:
        with self._lock:
            self.deferred += n
