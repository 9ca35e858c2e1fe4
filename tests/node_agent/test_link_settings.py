"""The link's settings: the backoff between failed calls."""

from __future__ import annotations

import random

import pytest

from node_agent.link.settings import Backoff

# --- backoff --------------------------------------------------------------------------------


def test_backoff_grows_is_bounded_jittered_and_resets() -> None:
    b = Backoff(0.5, 8.0, rng=random.Random(1))
    delays = [b.next() for _ in range(10)]
    for i, d in enumerate(delays):
        cap = min(8.0, 0.5 * 2**i)
        assert cap / 2 <= d <= cap
    assert max(delays) <= 8.0 and b.failures == 10
    b.reset()
    assert 0.25 <= b.next() <= 0.5
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
