"""InferenceService status.rollout as a typed value: where a canary rollout stands.

The operator keeps a rollout's whole state here, so a restarted operator resumes at the same
wave. Times are whole epoch seconds (RFC 3339 on the wire). A revision is derived from the
recorded model entries, never stored beside them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from edgefleet_api import wire
from edgefleet_api.model_spec import ModelRef, ModelSpec
from edgefleet_api.wire import Obj, mapping

MAX_ANALYSES = 64
"""status.rollout.analysis keeps the newest this many (the CRD's maxItems)."""
MAX_HISTORY = 10
"""status.rollout.history keeps the newest this many (the CRD's maxItems)."""
MAX_TALLIES = 256
"""status.rollout.counters holds at most this many (node, model version) tallies (the CRD's
maxItems): the canary nodes' first, then comparable stable nodes in canary order."""


class Phase(enum.Enum):
    IDLE = "Idle"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    ABORTED = "Aborted"


ACTIVE = (Phase.PROGRESSING, Phase.PAUSED)
STOPPED = (Phase.ROLLED_BACK, Phase.ABORTED)


class Outcome(enum.Enum):
    """A wave analysis' result."""

    PASSED = "Passed"
    FAILED = "Failed"
    INCONCLUSIVE = "Inconclusive"


@dataclass(frozen=True, slots=True)
class Revision:
    """The (model, version, digest) of all of a service's models, sorted by model name."""

    refs: tuple[ModelRef, ...]

    @classmethod
    def of(cls, models: Iterable[ModelSpec]) -> Revision:
        refs = tuple(sorted(m.ref for m in models))
        if not refs:
            raise ValueError("a revision needs at least one model")
        return cls(refs)

    @property
    def label(self) -> str:
        """The versions joined by commas (what status.stableVersion/canaryVersion show)."""
        return ",".join(r.version for r in self.refs)


@dataclass(frozen=True, slots=True)
class AnalysisRecord:
    wave: int
    time_s: int
    result: Outcome
    message: str

    @classmethod
    def from_obj(cls, obj: Obj) -> AnalysisRecord:
        obj = mapping(obj, "status.rollout.analysis[]")
        return cls(
            int(obj["wave"]), _time(obj["time"]) or 0, Outcome(obj["result"]), str(obj.get("message", ""))
        )

    def to_obj(self) -> dict[str, Any]:
        return {
            "wave": self.wave,
            "time": wire.rfc3339(self.time_s),
            "result": self.result.value,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    from_version: str
    to_version: str
    result: str
    """Promoted, RolledBack, Aborted or Superseded."""
    start_s: int
    finish_s: int
    message: str

    @classmethod
    def from_obj(cls, obj: Obj) -> HistoryRecord:
        obj = mapping(obj, "status.rollout.history[]")
        return cls(
            str(obj.get("fromVersion", "")),
            str(obj["toVersion"]),
            str(obj["result"]),
            _time(obj.get("startTime")) or 0,
            _time(obj.get("finishTime")) or 0,
            str(obj.get("message", "")),
        )

    def to_obj(self) -> dict[str, Any]:
        return {
            "fromVersion": self.from_version,
            "toVersion": self.to_version,
            "result": self.result,
            "startTime": wire.rfc3339(self.start_s),
            "finishTime": wire.rfc3339(self.finish_s),
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class CounterTally:
    """The current wave's counts of one model version on one node (status.rollout.counters[]):
    `epoch` and `last` (requests, errors, slow) are the agent's last cumulative reading folded in,
    `total` what it served since the wave's window began (across agent restarts). A restarted
    operator resumes from these exactly."""

    node: str
    model: str
    """model/version."""
    epoch: str
    last: tuple[int, int, int]
    total: tuple[int, int, int]

    @classmethod
    def from_obj(cls, obj: Obj) -> CounterTally:
        obj = mapping(obj, "status.rollout.counters[]")
        return cls(
            str(obj["node"]),
            str(obj["model"]),
            str(obj["epoch"]),
            (int(obj.get("requests", 0)), int(obj.get("errors", 0)), int(obj.get("slow", 0))),
            (int(obj.get("totalRequests", 0)), int(obj.get("totalErrors", 0)), int(obj.get("totalSlow", 0))),
        )

    def to_obj(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "model": self.model,
            "epoch": self.epoch,
            "requests": self.last[0],
            "errors": self.last[1],
            "slow": self.last[2],
            "totalRequests": self.total[0],
            "totalErrors": self.total[1],
            "totalSlow": self.total[2],
        }


@dataclass(frozen=True, slots=True)
class MetricRecord:
    """One metric's evidence in the current wave (status.rollout.evidence.metrics[])."""

    name: str
    verdict: str
    e_worse: float
    """E-value against "the canary is no worse" (fails at 1 / alpha)."""
    e_within: float
    """E-value against "the canary regressed by the regression to detect" (passes at 1 / alpha)."""
    message: str

    @classmethod
    def from_obj(cls, obj: Obj) -> MetricRecord:
        obj = mapping(obj, "status.rollout.evidence.metrics[]")
        return cls(
            str(obj["name"]),
            str(obj["verdict"]),
            float(obj.get("eValueWorse", 1.0)),
            float(obj.get("eValueWithin", 1.0)),
            str(obj.get("message", "")),
        )

    def to_obj(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "verdict": self.verdict,
            "eValueWorse": self.e_worse,
            "eValueWithin": self.e_within,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class Evidence:
    """The sequential judge's verdict on the current wave so far (status.rollout.evidence)."""

    verdict: str
    """Pass, Fail or Continue."""
    canary_requests: int
    stable_requests: int
    metrics: tuple[MetricRecord, ...] = ()

    @classmethod
    def from_obj(cls, obj: Obj) -> Evidence:
        obj = mapping(obj, "status.rollout.evidence")
        return cls(
            str(obj["verdict"]),
            int(obj.get("canaryRequests", 0)),
            int(obj.get("stableRequests", 0)),
            tuple(MetricRecord.from_obj(m) for m in obj.get("metrics") or ()),
        )

    def to_obj(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "canaryRequests": self.canary_requests,
            "stableRequests": self.stable_requests,
            "metrics": [m.to_obj() for m in self.metrics],
        }


@dataclass(frozen=True, slots=True)
class RolloutStatus:
    """status.rollout. Invariants (`check_invariants`): an active phase has a canary and
    0 <= wave < total_waves; canary nodes only in an active phase with a stable revision, each
    once; stable and canary differ while active."""

    phase: Phase = Phase.IDLE
    stable_models: tuple[ModelSpec, ...] = ()
    """The stable revision's model entries (recorded: the spec may have moved on)."""
    canary_models: tuple[ModelSpec, ...] = ()
    wave: int = 0
    total_waves: int = 0
    wave_start_s: int | None = None
    """When the current wave's analysis window began; None until all its nodes confirmed."""
    start_s: int | None = None
    failed_checks: int = 0
    canary_nodes: tuple[str, ...] = ()
    analysis: tuple[AnalysisRecord, ...] = ()
    history: tuple[HistoryRecord, ...] = ()
    """Newest first."""
    manually_paused: bool = False
    rollback_reason: str = ""
    step: str = ""
    """Human summary, e.g. 'wave 2/4 (25%)'."""
    message: str = ""
    counters: tuple[CounterTally, ...] = ()
    """The current wave's counter tallies (empty until its window begins)."""
    evidence: Evidence | None = None
    """The sequential judge's evidence on the current wave (None: not judged yet)."""
    pause_reason: str = ""
    """Why the operator paused the rollout itself (progress deadline); cleared by resume."""
    node_starts: tuple[tuple[int, int], ...] = ()
    """(epoch second, nodes started then) for the canary nodes started in the last minute
    (spec.rollout.maxNodesPerMinute's ledger), oldest first."""
    stable: Revision | None = field(init=False, repr=False, compare=False)
    """The stable revision, derived from `stable_models` (never written on its own)."""
    canary: Revision | None = field(init=False, repr=False, compare=False)
    """The canary revision, derived from `canary_models`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stable", Revision.of(self.stable_models) if self.stable_models else None)
        object.__setattr__(self, "canary", Revision.of(self.canary_models) if self.canary_models else None)

    def check_invariants(self) -> None:
        stable, canary = self.stable, self.canary
        if self.phase in ACTIVE:
            assert canary is not None, "an active rollout has a canary"
            assert 0 <= self.wave < max(1, self.total_waves), (self.wave, self.total_waves)
        if self.canary_nodes:
            assert self.phase in ACTIVE and stable is not None, "canary nodes outside a rollout"
            assert len(set(self.canary_nodes)) == len(self.canary_nodes), "a canary node twice"
        assert stable is None or stable != canary or self.phase not in ACTIVE

    @classmethod
    def from_obj(cls, obj: Obj | None) -> RolloutStatus:
        """status.rollout as `to_obj` writes it; None or {} is Idle."""
        obj = mapping(obj if obj is not None else {}, "status.rollout")
        return cls(
            phase=Phase(obj.get("phase", "Idle")),
            stable_models=tuple(ModelSpec.from_obj(m) for m in obj.get("stableModels") or ()),
            canary_models=tuple(ModelSpec.from_obj(m) for m in obj.get("canaryModels") or ()),
            wave=int(obj.get("currentWave", 0)),
            total_waves=int(obj.get("totalWaves", 0)),
            wave_start_s=_time(obj.get("waveStartTime")),
            start_s=_time(obj.get("startTime")),
            failed_checks=int(obj.get("failedChecks", 0)),
            canary_nodes=tuple(str(n) for n in obj.get("canaryNodes") or ()),
            analysis=tuple(AnalysisRecord.from_obj(a) for a in obj.get("analysis") or ()),
            history=tuple(HistoryRecord.from_obj(h) for h in obj.get("history") or ()),
            manually_paused=bool(obj.get("manuallyPaused", False)),
            rollback_reason=str(obj.get("rollbackReason", "")),
            step=str(obj.get("step", "")),
            message=str(obj.get("message", "")),
            counters=tuple(CounterTally.from_obj(c) for c in obj.get("counters") or ()),
            evidence=Evidence.from_obj(obj["evidence"]) if obj.get("evidence") else None,
            pause_reason=str(obj.get("pauseReason", "")),
            node_starts=tuple(
                (t, int(e.get("count", 0)))
                for e in obj.get("nodeStarts") or ()
                if (t := _time(e.get("time"))) is not None
            ),
        )

    def to_obj(self) -> dict[str, Any]:
        """JSON-ready; `from_obj(to_obj(s)) == s`."""
        out: dict[str, Any] = {
            "phase": self.phase.value,
            "currentWave": self.wave,
            "totalWaves": self.total_waves,
            "step": self.step,
            "failedChecks": self.failed_checks,
            "canaryNodes": list(self.canary_nodes),
            "analysis": [a.to_obj() for a in self.analysis],
            "history": [h.to_obj() for h in self.history],
            "manuallyPaused": self.manually_paused,
            "message": self.message,
        }
        stable, canary = self.stable, self.canary
        if stable is not None:
            out["stableVersion"] = stable.label
            out["stableModels"] = [m.to_obj() for m in self.stable_models]
        if canary is not None:
            out["canaryVersion"] = canary.label
            out["canaryModels"] = [m.to_obj() for m in self.canary_models]
        if self.wave_start_s is not None:
            out["waveStartTime"] = wire.rfc3339(self.wave_start_s)
        if self.start_s is not None:
            out["startTime"] = wire.rfc3339(self.start_s)
        if self.rollback_reason:
            out["rollbackReason"] = self.rollback_reason
        if self.counters:
            out["counters"] = [c.to_obj() for c in self.counters]
        if self.evidence is not None:
            out["evidence"] = self.evidence.to_obj()
        if self.pause_reason:
            out["pauseReason"] = self.pause_reason
        if self.node_starts:
            out["nodeStarts"] = [{"time": wire.rfc3339(t), "count": n} for t, n in self.node_starts]
        return out


def _time(value: str | None) -> int | None:
    epoch = wire.parse_time(value)
    return None if epoch is None else int(epoch)
