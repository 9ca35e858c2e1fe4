"""Status conditions, per the Kubernetes API conventions (metav1.Condition), for both resources."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"
STATUSES = (TRUE, FALSE, UNKNOWN)


@dataclass(frozen=True, slots=True)
class Condition:
    """One condition. `last_transition_time` is RFC 3339; it changes only when `status` does."""

    type: str
    status: str
    reason: str = ""
    message: str = ""
    observed_generation: int = 0
    last_transition_time: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"condition {self.type}: status {self.status!r} is not one of {STATUSES}")

    @property
    def is_true(self) -> bool:
        return self.status == TRUE

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> Condition:
        return cls(
            type=str(obj["type"]),
            status=str(obj["status"]),
            reason=str(obj.get("reason") or ""),
            message=str(obj.get("message") or ""),
            observed_generation=int(obj.get("observedGeneration") or 0),
            last_transition_time=str(obj.get("lastTransitionTime") or ""),
        )

    def to_obj(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "observedGeneration": self.observed_generation,
            "lastTransitionTime": self.last_transition_time,
            "reason": self.reason,
            "message": self.message,
        }

    @property
    def essence(self) -> tuple[str, str, str, str, int]:
        """The condition without its transition time: what a change is judged by."""
        return (self.type, self.status, self.reason, self.message, self.observed_generation)


def conditions_from_obj(objs: Iterable[Mapping[str, Any]] | None) -> tuple[Condition, ...]:
    return tuple(Condition.from_obj(c) for c in objs or ())


def next_condition(
    type_: str,
    status: str | bool,
    reason: str,
    message: str,
    generation: int,
    previous: Sequence[Condition],
    now: str,
) -> Condition:
    """The condition as it is now: `lastTransitionTime` carries over from `previous` while the
    status is unchanged, else it is `now` (RFC 3339). A bool status is True/False."""
    if isinstance(status, bool):
        status = TRUE if status else FALSE
    old = next((c for c in previous if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else ""
    return Condition(type_, status, reason, message, generation, since or now)


def conditions_equal(a: Iterable[Condition], b: Iterable[Condition]) -> bool:
    """Equal apart from lastTransitionTime, in any order."""
    return sorted(c.essence for c in a) == sorted(c.essence for c in b)
