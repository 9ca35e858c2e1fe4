"""The manual actions on a rollout (annotation edgefleet.io/rollout-action). Its state is
status.rollout, typed in the contract (`edgefleet_api.rollout_status.RolloutStatus`). Pure."""

from __future__ import annotations

import enum


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
