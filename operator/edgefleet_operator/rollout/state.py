"""A rollout's state: status.rollout as a value (`RolloutState`, with its status dict
(de)serialisation), its phases, records and the manual actions. Pure.

Times are whole epoch seconds, written to status as RFC 3339 (`parse_time` reads them back).
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Any

from edgefleet_operator.rollout.analysis import Outcome
from edgefleet_operator.rollout.spec import Obj, Revision

MAX_ANALYSES = 64
"""status.rollout.analysis keeps the newest this many (the CRD's maxItems)."""
MAX_HISTORY = 10
"""status.rollout.history keeps the newest this many (the CRD's maxItems)."""


class Phase(enum.Enum):
    IDLE = "Idle"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    ABORTED = "Aborted"


ACTIVE = (Phase.PROGRESSING, Phase.PAUSED)
STOPPED = (Phase.ROLLED_BACK, Phase.ABORTED)


class Action(enum.Enum):
    """Manual control (annotation edgefleet.io/rollout-action)."""

    PROMOTE = "promote"
    ABORT = "abort"
    PAUSE = "pause"
    RESUME = "resume"


def parse_action(value: str | None) -> Action | None:
    """The annotation's value as an Action; None for none. Unknown values raise ValueError."""
    if not value:
        return None
    try:
        return Action(value.strip().lower())
    except ValueError:
        raise ValueError(
            f"unknown rollout action {value!r}: use one of {', '.join(a.value for a in Action)}"
        ) from None


@dataclass(frozen=True, slots=True)
class AnalysisRecord:
    wave: int
    time_s: int
    result: Outcome
    message: str


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    from_version: str
    to_version: str
    result: str
    """Promoted, RolledBack, Aborted or Superseded."""
    start_s: int
    finish_s: int
    message: str


@dataclass(frozen=True, slots=True)
class RolloutState:
    """status.rollout as a value. Invariants: canary_nodes are set only in an active phase with both
    revisions known; canary is set in an active phase; 0 <= wave < total_waves when active."""

    phase: Phase = Phase.IDLE
    stable: Revision | None = None
    stable_models: tuple[Obj, ...] = ()
    canary: Revision | None = None
    canary_models: tuple[Obj, ...] = ()
    wave: int = 0
    total_waves: int = 0
    wave_start_s: int | None = None
    """When the current wave's analysis window began; None until all its nodes confirmed."""
    start_s: int | None = None
    failed_checks: int = 0
    canary_nodes: tuple[str, ...] = ()
    analysis: tuple[AnalysisRecord, ...] = ()
    history: tuple[HistoryRecord, ...] = ()
    manually_paused: bool = False
    rollback_reason: str = ""
    step_text: str = ""
    message: str = ""

    def check_invariants(self) -> None:
        if self.phase in ACTIVE:
            assert self.canary is not None, "an active rollout has a canary"
            assert 0 <= self.wave < max(1, self.total_waves), (self.wave, self.total_waves)
        if self.canary_nodes:
            assert self.phase in ACTIVE and self.stable is not None, "canary nodes outside a rollout"
            assert len(set(self.canary_nodes)) == len(self.canary_nodes), "a canary node twice"
        assert self.stable is None or self.stable != self.canary or self.phase not in ACTIVE

    # --- status dict <-> state ---

    @classmethod
    def from_status(cls, d: Obj | None) -> RolloutState:
        """Parse status.rollout (as `to_status` wrote it); an empty or missing dict is Idle."""
        d = d or {}
        stable_models = tuple(d.get("stableModels") or ())
        canary_models = tuple(d.get("canaryModels") or ())
        return cls(
            phase=Phase(d.get("phase", "Idle")),
            stable=Revision.of(stable_models) if stable_models else None,
            stable_models=stable_models,
            canary=Revision.of(canary_models) if canary_models else None,
            canary_models=canary_models,
            wave=int(d.get("currentWave", 0)),
            total_waves=int(d.get("totalWaves", 0)),
            wave_start_s=parse_time(d.get("waveStartTime")),
            start_s=parse_time(d.get("startTime")),
            failed_checks=int(d.get("failedChecks", 0)),
            canary_nodes=tuple(d.get("canaryNodes") or ()),
            analysis=tuple(
                AnalysisRecord(
                    int(a["wave"]), parse_time(a["time"]) or 0, Outcome(a["result"]), a.get("message", "")
                )
                for a in d.get("analysis") or ()
            ),
            history=tuple(
                HistoryRecord(
                    h.get("fromVersion", ""),
                    h["toVersion"],
                    h["result"],
                    parse_time(h.get("startTime")) or 0,
                    parse_time(h.get("finishTime")) or 0,
                    h.get("message", ""),
                )
                for h in d.get("history") or ()
            ),
            manually_paused=bool(d.get("manuallyPaused", False)),
            rollback_reason=d.get("rollbackReason", ""),
            step_text=d.get("step", ""),
            message=d.get("message", ""),
        )

    def to_status(self) -> dict[str, Any]:
        """status.rollout (JSON-ready; `from_status(to_status(s)) == s`)."""
        out: dict[str, Any] = {
            "phase": self.phase.value,
            "currentWave": self.wave,
            "totalWaves": self.total_waves,
            "step": self.step_text,
            "failedChecks": self.failed_checks,
            "canaryNodes": list(self.canary_nodes),
            "analysis": [
                {"wave": a.wave, "time": _rfc3339(a.time_s), "result": a.result.value, "message": a.message}
                for a in self.analysis
            ],
            "history": [
                {
                    "fromVersion": h.from_version,
                    "toVersion": h.to_version,
                    "result": h.result,
                    "startTime": _rfc3339(h.start_s),
                    "finishTime": _rfc3339(h.finish_s),
                    "message": h.message,
                }
                for h in self.history
            ],
            "manuallyPaused": self.manually_paused,
            "message": self.message,
        }
        if self.stable is not None:
            out["stableVersion"] = self.stable.label
            out["stableModels"] = [dict(m) for m in self.stable_models]
        if self.canary is not None:
            out["canaryVersion"] = self.canary.label
            out["canaryModels"] = [dict(m) for m in self.canary_models]
        if self.wave_start_s is not None:
            out["waveStartTime"] = _rfc3339(self.wave_start_s)
        if self.start_s is not None:
            out["startTime"] = _rfc3339(self.start_s)
        if self.rollback_reason:
            out["rollbackReason"] = self.rollback_reason
        return out


def _rfc3339(epoch_s: int) -> str:
    """Epoch seconds as status writes them: RFC 3339, UTC, whole seconds."""
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> int | None:
    """Epoch seconds of an RFC 3339 time as status writes it; None for none."""
    if not value:
        return None
    return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
