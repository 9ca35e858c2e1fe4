"""The operator's Prometheus metrics, declared in one place, on a passed-in registry.

Names follow the Prometheus conventions: base units, `_seconds`, `_total`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from edgefleet_operator.pass_report import PassReport


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            "edgefleet_operator_reconciles_total",
            "Fleet reconcile passes, by result.",
            ["result"],
            registry=r,
        )
        self.reconcile_seconds = Histogram(
            "edgefleet_operator_reconcile_duration_seconds",
            "Duration of a fleet reconcile pass.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.api_writes = Counter(
            "edgefleet_operator_api_writes_total",
            "Writes to the API server, by object and verb.",
            ["what"],
            registry=r,
        )
        self.services = Gauge(
            "edgefleet_operator_inference_services", "InferenceServices the operator places.", registry=r
        )
        self.unplaceable = Gauge(
            "edgefleet_operator_unplaceable_services",
            "InferenceServices short of their node target.",
            registry=r,
        )
        self.placed_pairs = Gauge(
            "edgefleet_operator_placements", "(service, node) pairs in the current placement.", registry=r
        )
        self.plans = Counter(
            "edgefleet_operator_placement_plans_total",
            "Placements computed, by kind: incremental (only what changed nodes reach) or full.",
            ["kind"],
            registry=r,
        )
        self.fleet_nodes = Gauge(
            "edgefleet_operator_fleet_nodes", "Fleet nodes by health.", ["health"], registry=r
        )
        self.rollout_events = Counter(
            "edgefleet_operator_rollout_events_total",
            "Rollout events by reason: RolloutStarted, WaveStarted, AnalysisPassed, RolledBack, "
            "RolloutPromoted, RolloutPaused, JudgeVerdict, ...",
            ["reason"],
            registry=r,
        )

        self.shards_held = Gauge(
            "edgefleet_operator_shards_held",
            "1 for each shard this replica holds (may write for), 0 for the others it knows.",
            ["shard"],
            registry=r,
        )
        self.shard_transitions = Counter(
            "edgefleet_operator_shard_transitions_total",
            "Shards this replica acquired or lost (released, taken over, or a renewal that failed).",
            ["shard", "event"],
            registry=r,
        )

    def observe_holds(self, shards: Iterable[str], held: Iterable[str]) -> None:
        mine = set(held)
        for shard in shards:
            self.shards_held.labels(shard).set(1 if shard in mine else 0)

    def observe_transitions(self, acquired: Iterable[str], lost: Iterable[str]) -> None:
        for shard in acquired:
            self.shard_transitions.labels(shard, "acquired").inc()
        for shard in lost:
            self.shard_transitions.labels(shard, "lost").inc()

    def observe_pass(self, report: PassReport, seconds: float, ok: bool, result: str = "") -> None:
        """`result`: the label when not "ok"/"error" (a pass `stopped` because its hold was lost)."""
        self.reconciles.labels(result or ("ok" if ok else "error")).inc()
        self.reconcile_seconds.observe(seconds)
        for what, n in report.writes.items():
            self.api_writes.labels(what).inc(n)
        for reason, n in report.rollout_events.items():
            self.rollout_events.labels(reason).inc(n)
        if not ok:
            return
        self.services.set(report.services)
        self.unplaceable.set(report.unplaced)
        if report.result is not None:
            self.plans.labels("incremental" if report.incremental_plan else "full").inc()
            self.placed_pairs.set(sum(1 for _ in report.result.assignment.pairs()))
        counts: dict[str, int] = {}
        for h in report.health.values():
            counts[h] = counts.get(h, 0) + 1
        for h in ("Healthy", "Suspect", "AgentSilent", "NotReady"):
            self.fleet_nodes.labels(h).set(counts.get(h, 0))
