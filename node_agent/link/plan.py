"""Desired versions + what the runtime has -> the reconcile `Plan`. Pure (no API server, no
disk, no model): the link builds the `RuntimeView` and runs the plan's actions.

Make before break: a version that replaces another of the same model (a rollout, a rollback, a
new digest) is prepared (fetched, verified) and, where memory allows, loaded before the version
it replaces is unloaded; until then the old version stays resident and keeps the model's traffic
(`Plan.held`, `servable_weights`). A node that cannot fetch its target keeps serving what it has.
Where memory cannot hold both (the new version's known size exceeds free memory, or its load
failed for lack of memory, or both are one version with a new digest), the order is: fetch and
verify the new artifact first, then unload the old, then load the new. The link runs the plan in
rounds (`OperatorLink`): each round's plan is what can be done now, given the last round's results.
"""

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
    stale: bool = False
    """Resident, but the loaded copy is not of `prepared_digest` (an older artifact of the same
    version, or one the link did not prepare): it must be unloaded before the new one loads."""
    insufficient_memory: bool = False
    """The last failure was a load that did not fit in memory."""

    @property
    def servable(self) -> bool:
        """It can answer requests now or after a load of its prepared artifact."""
        return (self.resident and not self.stale) or (
            self.prepared_digest is not None and self.failed_digest is None
        )


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
    """Resident versions to unload now: no longer assigned and no longer needed to serve in
    place of an unready target, or a stale copy whose replacement is prepared."""
    budget_bytes: int
    prepare: tuple[ModelAssignment, ...]
    """Versions whose artifact must be resolved into the repository and verified."""
    preload: tuple[ModelId, ...]
    """Versions to load before their first request, most urgent first (after `prepare`)."""
    forget: tuple[ModelId, ...]
    """Versions the runtime tracks that are neither assigned, resident nor held."""
    held: tuple[ModelId, ...] = ()
    """Versions no longer assigned that keep serving their model while none of its assigned
    versions is ready (make before break); unloaded once one is."""

    @property
    def idle(self) -> bool:
        """Nothing to do but keep the weights and budget (held versions wait on a target that
        is being retried, not on this plan)."""
        return not (self.unload or self.prepare or self.preload or self.forget)


def plan(
    assignment: Assignment | None, view: RuntimeView, now_s: float, retry_failed_s: float = 30.0
) -> Plan:
    """What to do now to make the runtime hold `assignment`. Pure.

    Invariants: a version no longer assigned (or a stale copy of an assigned one) is unloaded
    only when its model has no assigned version, when every assigned version of its model is
    ready (loaded, or lazy and prepared), or when they are all prepared and memory cannot hold
    both (see the module docstring); a model therefore never loses its last servable version to
    a target that was not fetched and verified. A failure is retried only after
    `retry_failed_s` or when the spec's digest changes (a load that failed for lack of memory is
    retried at once after the version it waited on is unloaded); an evicted preloaded version
    is preloaded again only when its measured size fits in free memory (a re-preload never
    evicts, so two preloaded versions that do not fit together cannot evict each other in turn).
    """
    desired = desired_versions(assignment).versions
    models = view.models
    tracked = sorted(models.items(), key=lambda kv: _id_key(kv[0]))
    wanted_of: dict[str, list[ModelAssignment]] = {}
    for want in desired.values():
        wanted_of.setdefault(want.model, []).append(want)

    def mv_of(model_id: ModelId) -> ModelView:
        return models.get(model_id, ModelView())

    def prepared(want: ModelAssignment) -> bool:
        mv = mv_of(want.id)
        return mv.prepared_digest == want.artifact.digest

    def ready(want: ModelAssignment) -> bool:
        mv = mv_of(want.id)
        if not prepared(want) or mv.failed_digest == want.artifact.digest or mv.stale:
            return False
        return mv.resident or mv.preloaded or not want.preload

    def fits(want: ModelAssignment) -> bool:
        mv = mv_of(want.id)
        expected = mv.measured_bytes if mv.measured_bytes is not None else want.memory_budget_bytes
        return not mv.insufficient_memory and (not expected or expected <= view.free_bytes)

    def release(name: str) -> bool:
        """Whether the versions model `name` held before may go now."""
        wants = wanted_of.get(name, [])
        if all(ready(w) for w in wants):
            return True
        return all(prepared(w) for w in wants) and not all(fits(w) for w in wants if w.preload)

    outgoing = [
        m
        for m, mv in tracked
        if (m not in desired and (mv.resident or mv.servable))
        or (m in desired and mv.resident and (mv.stale or mv.prepared_digest is None))
    ]
    released = {m for m in outgoing if release(m.name) or (m in desired and prepared(desired[m]))}
    unload = [m for m in outgoing if m in released and mv_of(m).resident]
    held = tuple(m for m in outgoing if m not in released and m not in desired)
    forget = tuple(
        m for m, mv in tracked if m not in desired and not mv.resident and (m in released or not mv.servable)
    )
    breaking = {m.name for m in unload}

    def backing_off(want: ModelAssignment) -> bool:
        mv = models.get(want.id)
        if mv is None or mv.failed_digest != want.artifact.digest:
            return False
        if mv.insufficient_memory and want.model in breaking:
            return False  # it waited for the memory this plan frees
        return now_s - mv.failed_at_s < retry_failed_s

    prepare: list[ModelAssignment] = []
    preload: list[ModelAssignment] = []
    for model_id, want in sorted(desired.items(), key=lambda kv: _id_key(kv[0])):
        mv = mv_of(model_id)
        if backing_off(want):
            continue
        fresh = not prepared(want)
        if fresh:
            prepare.append(want)
        if not want.preload:
            continue
        if model_id in unload:
            preload.append(want)  # a stale copy goes first; then the new artifact loads
        elif mv.resident:
            continue
        elif fresh or not mv.preloaded:
            # Make before break: load it beside the version it replaces, unless that one is to
            # go first for lack of memory (the next round loads it, after the unload).
            if not any(o.name == want.model and o not in released for o in outgoing) or fits(want):
                preload.append(want)
        elif mv.measured_bytes is not None and mv.measured_bytes <= view.free_bytes:
            preload.append(want)  # evicted: back only when it fits without evicting
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
        held=held,
    )


def _id_key(model_id: ModelId) -> tuple[Any, ...]:
    return (model_id.name, version_sort_key(model_id.version))


def servable_weights(
    weights: Mapping[str, Mapping[str, int]],
    servable: Iterable[ModelId],
    *,
    ready: Iterable[ModelId] | None = None,
    held: Iterable[ModelId] = (),
) -> dict[str, dict[str, int]]:
    """`weights` restricted to versions that can serve now, per model in this order of
    preference: assigned versions `ready` (loaded; default: every `servable` one), versions
    `held` from before (make before break: they serve while no assigned version is ready; equal
    weights), assigned versions merely `servable` (prepared, not failed: they load on their
    first request). A model none of these can serve is left out."""
    ok = {(m.name, m.version) for m in servable}
    loaded = ok if ready is None else {(m.name, m.version) for m in ready} & ok
    kept_by: dict[str, dict[str, int]] = {}
    for m in sorted(held, key=_id_key):
        kept_by.setdefault(m.name, {})[m.version] = 100
    out: dict[str, dict[str, int]] = {}
    for model, versions in weights.items():
        for tier in (loaded, None, ok):
            if tier is None:
                kept = kept_by.get(model, {})
            else:
                kept = {v: w for v, w in versions.items() if (model, v) in tier}
            if kept:
                out[model] = kept
                break
    return out
