"""The link's settings: the backoff between failed calls, and the settings read from the environment."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from edgefleet_api.backoff import Backoff
from node_agent.link.settings import LinkSettings

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


# --- from the environment -------------------------------------------------------------------


def test_settings_from_the_environment_fill_only_what_is_not_given(tmp_path: Path) -> None:
    env = {
        "EDGEFLEET_LINK_WATCH_TIMEOUT_S": "30",
        "EDGEFLEET_LINK_REQUEST_TIMEOUT_S": "2.5",
        "EDGEFLEET_LINK_BACKOFF_MAX_S": " 8 ",
        "EDGEFLEET_LINK_LEASE_RENEW_S": "",  # empty: the default
        "EDGEFLEET_LINK_EDGE_NODE": "ignored",  # not a number field: never read
    }
    s = LinkSettings.from_env(env, edge_node="n1", namespace="ns", state_dir=tmp_path, backoff_max_s=4.0)
    assert (s.edge_node, s.namespace, s.state_dir) == ("n1", "ns", tmp_path)
    assert s.watch_timeout_s == 30 and isinstance(s.watch_timeout_s, int)
    assert s.request_timeout_s == 2.5
    assert s.backoff_max_s == 4.0  # given: the environment does not override it
    assert s.lease_renew_s == 10.0  # the default
    with pytest.raises(ValueError, match="EDGEFLEET_LINK_WATCH_TIMEOUT_S"):
        LinkSettings.from_env(
            {"EDGEFLEET_LINK_WATCH_TIMEOUT_S": "1.5"}, edge_node="n", namespace="ns", state_dir=tmp_path
        )
    with pytest.raises(ValueError, match="request_timeout_s must be > 0"):
        LinkSettings.from_env(
            {"EDGEFLEET_LINK_REQUEST_TIMEOUT_S": "0"}, edge_node="n", namespace="ns", state_dir=tmp_path
        )
