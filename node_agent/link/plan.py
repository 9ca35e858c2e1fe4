"""Desired versions + what the runtime has -> the reconcile `Plan`. Pure (no API server, no
disk, no model): the link builds the `RuntimeView` and runs the plan's actions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgefleet_api.edge_node import ModelAssignment
from edgefleet_api.types import ModelId
from node_agent.link.assignment import Assignment, desired_versions, traffic_weights
from node_agent.runtime.model_names import version_sort_key


@dataclass(frozen=True, slots=True)
class ModelView:
    """What the runtime has for one model version."""

    prepared_digest: str | None = None
    """Digest of the artifact verified in the repository for it; None: not prepared."""
    resident: bool = False
    preloaded: bool = False
    """Preloaded since it was (re)assigned; if it is not resident now, it was evicted."""
    failed_digest: str | None = None
    """The digest whose preparation or load failed last; None: no failure on record."""
    failed_at_s: float = 0.0
    measured_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class RuntimeView:
    models: Mapping[ModelId, ModelView]
    free_bytes: int
    """Budget minus used bytes now."""
    device_budget_bytes: int
    """The most the device allows; a spec budget above it is capped."""


@dataclass(frozen=True, slots=True)
class Plan:
    """Actions, in the order the link runs them: weights, unload, budget, prepare, preload."""

    weights: dict[str, dict[str, int]]
    unload: tuple[ModelId, ...]
    """Resident versions no longer assigned, or whose artifact changed."""
    budget_bytes: int
    prepare: tuple[ModelAssignment, ...]
    """Versions whose artifact must be resolved into the repository and verified."""
    preload: tuple[ModelId, ...]
    """Versions to load before their first request, most urgent first (after `prepare`)."""
    forget: tuple[ModelId, ...]
    """Versions the runtime tracks that are neither assigned nor resident."""

    @property
    def idle(self) -> bool:
        """Nothing to do but keep the weights and budget."""
        return not (self.unload or self.prepare or self.preload or self.forget)


def plan(
    assignment: Assignment | None, view: RuntimeView, now_s: float, retry_failed_s: float = 30.0
) -> Plan:
    """What to do to make the runtime hold `assignment`. Pure.

    Invariants: a version is never both unloaded and preloaded unless its artifact changed
    (unload, then prepare and preload the new one); a failure is retried only after
    `retry_failed_s` or when the spec's digest changes; an evicted preloaded version is
    preloaded again only when its measured size fits in free memory (a re-preload never
    evicts, so two preloaded versions that do not fit together cannot evict each other
    in turn).
    """
    desired = desired_versions(assignment).versions
    models = view.models
    tracked = sorted(models.items(), key=lambda kv: _id_key(kv[0]))
    unload = [
        m
        for m, mv in tracked
        if mv.resident and (m not in desired or mv.prepared_digest != desired[m].artifact.digest)
    ]
    forget = tuple(m for m, mv in tracked if m not in desired and not mv.resident)

    def backing_off(model_id: ModelId, digest: str) -> bool:
        mv = models.get(model_id)
        return mv is not None and mv.failed_digest == digest and now_s - mv.failed_at_s < retry_failed_s

    prepare: list[ModelAssignment] = []
    preload: list[ModelAssignment] = []
    for model_id, want in sorted(desired.items(), key=lambda kv: _id_key(kv[0])):
        mv = models.get(model_id, ModelView())
        if backing_off(model_id, want.artifact.digest):
            continue
        fresh = mv.prepared_digest != want.artifact.digest
        if fresh:
            prepare.append(want)
        if not want.preload:
            continue
        fits = mv.measured_bytes is not None and mv.measured_bytes <= view.free_bytes
        if fresh or model_id in unload or (not mv.resident and (not mv.preloaded or fits)):
            preload.append(want)
    preload.sort(key=lambda d: (d.priority, not d.pinned, _id_key(d.id)))
    budget = view.device_budget_bytes
    if assignment is not None and assignment.memory_budget_bytes is not None:
        budget = min(budget, assignment.memory_budget_bytes)
    return Plan(
        weights=traffic_weights(assignment),
        unload=tuple(unload),
        budget_bytes=budget,
        prepare=tuple(prepare),
        preload=tuple(d.id for d in preload),
        forget=forget,
    )


def _id_key(model_id: ModelId) -> tuple[Any, ...]:
    return (model_id.name, version_sort_key(model_id.version))


def servable_weights(
    weights: Mapping[str, Mapping[str, int]], servable: Iterable[ModelId]
) -> dict[str, dict[str, int]]:
    """`weights` restricted to versions that can serve now (prepared, not failed)."""
    ok = {(m.name, m.version) for m in servable}
    out: dict[str, dict[str, int]] = {}
    for model, versions in weights.items():
        kept = {v: w for v, w in versions.items() if (model, v) in ok}
        if kept:
            out[model] = kept
    return out
