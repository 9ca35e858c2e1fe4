"""Exponential backoff with jitter: the one rule every retry loop of the operator and the agent
uses (the operator's failed passes and Lease rounds, the agent's API calls, watch and
downloads). Pure.

`delay(failures, base_s, cap_s, rand, jitter)`: the ceiling doubles with each failure in a row,
from `base_s` to at most `cap_s`, and a `jitter` share of it is random: 1.0 is full jitter (a
fleet of operators spreads over the whole window), 0.5 draws from [d/2, d] (an agent never
retries much sooner than the schedule says). `Backoff` keeps the count for a loop.

Why not tenacity: its wait strategies are written for decorated calls that end; these loops run
for the life of the process, reset on success, and a pure function of the failure count is what
the operator's tests and its deterministic pass timing need.
"""

from __future__ import annotations

import random

__all__ = ["Backoff", "delay"]


def delay(failures: int, base_s: float, cap_s: float, rand: float, jitter: float = 1.0) -> float:
    """Seconds to wait after `failures` failures in a row (>= 1): min(cap, base * 2^(failures-1)),
    less a `jitter` share of it times `rand` (in [0, 1))."""
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    ceiling = min(cap_s, base_s * 2.0 ** min(failures - 1, 62))
    return ceiling * (1.0 - jitter * rand)


class Backoff:
    """`delay` for a retry loop: `next()` after each failure, `reset()` after a success.
    Equal jitter by default: each delay in [d/2, d] of the schedule initial, x2, ..., `max_s`."""

    def __init__(
        self, initial_s: float, max_s: float, rng: random.Random | None = None, jitter: float = 0.5
    ) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError("need 0 < initial_s <= max_s")
        self.initial_s, self.max_s, self.jitter = initial_s, max_s, jitter
        self._rng = rng or random.Random()
        self._failures = 0

    def next(self) -> float:
        """The delay before the next attempt, after one more failure."""
        self._failures += 1
        return delay(self._failures, self.initial_s, self.max_s, self._rng.random(), self.jitter)

    def reset(self) -> None:
        self._failures = 0

    @property
    def failures(self) -> int:
        return self._failures
