"""The one backoff rule of every retry loop (operator passes and Leases, agent calls, watch and
downloads): exact delays, the jitter ranges, no overflow."""

from __future__ import annotations

import random

import pytest

from edgefleet_api.backoff import Backoff, delay


def test_the_ceiling_doubles_to_the_cap_and_jitter_takes_its_share() -> None:
    assert [delay(n, 0.5, 8.0, 0.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert delay(3, 1.0, 30.0, 0.5, jitter=1.0) == 2.0  # full jitter: anywhere in [0, 4]
    assert delay(3, 1.0, 30.0, 0.5, jitter=0.5) == 3.0  # equal jitter: in [2, 4]
    assert delay(3, 1.0, 30.0, 0.999, jitter=0.0) == 4.0  # none
    assert delay(10_000, 1.0, 30.0, 0.0) == 30.0, "no overflow after many failures"
    for bad in ({"failures": 0}, {"jitter": 1.5}):
        with pytest.raises(ValueError):
            delay(**{"failures": 1, "base_s": 1.0, "cap_s": 2.0, "rand": 0.0, **bad})  # type: ignore[arg-type]


def test_a_loop_backs_off_within_the_schedule_and_resets() -> None:
    b = Backoff(0.5, 8.0, rng=random.Random(3))
    seen = [b.next() for _ in range(8)]
    schedule = [min(8.0, 0.5 * 2**k) for k in range(8)]
    assert all(d / 2 <= x <= d for x, d in zip(seen, schedule, strict=True)), seen
    assert b.failures == 8
    b.reset()
    assert b.failures == 0 and 0.25 <= b.next() <= 0.5
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
