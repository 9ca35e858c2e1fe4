"""Value types both halves share: priority classes and model version identifiers."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Priority(enum.IntEnum):
    """Priority classes; a lower value is more urgent (sorts first)."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3

    @classmethod
    def parse(cls, value: str | int | Priority | None) -> Priority:
        """'critical'/'high'/'normal'/'low' (any case), 0-3, or None (normal)."""
        if value is None:
            return cls.NORMAL
        if isinstance(value, Priority):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown priority {value!r}; expected one of critical, high, normal, low"
            ) from None


@dataclass(frozen=True, slots=True)
class ModelId:
    """A model version: the unit the scheduler loads and evicts."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"
