"""The link's settings: the backoff between failed calls, and the settings read from the environment."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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
    assert s.lease_renew_s == 15.0  # the default (issue 22: was 10)
    with pytest.raises(ValueError, match="EDGEFLEET_LINK_WATCH_TIMEOUT_S"):
        LinkSettings.from_env(
            {"EDGEFLEET_LINK_WATCH_TIMEOUT_S": "1.5"}, edge_node="n", namespace="ns", state_dir=tmp_path
        )
    with pytest.raises(ValueError, match="request_timeout_s must be > 0"):
        LinkSettings.from_env(
            {"EDGEFLEET_LINK_REQUEST_TIMEOUT_S": "0"}, edge_node="n", namespace="ns", state_dir=tmp_path
        )


def test_lease_renewals_are_jittered_never_late_and_the_duration_follows_them(tmp_path: Path) -> None:
    """Issue 22: renewals spread over [(1 - jitter) x interval, interval]; the Lease's duration
    defaults to 3 renewals."""
    from node_agent.link.lease import LeaseRenewer

    s = LinkSettings("n1", "ns", tmp_path, lease_renew_s=40.0)
    assert (s.lease_duration_s, s.lease_jitter) == (120, 0.2)
    assert LinkSettings("n1", "ns", tmp_path).lease_duration_s == 45
    renewer = LeaseRenewer(s, None, None, None, lambda: "n1")  # type: ignore[arg-type]
    waits = [renewer.next_wait_s() for _ in range(2000)]
    assert 32.0 <= min(waits) < 33.0 and 39.0 < max(waits) <= 40.0
    with pytest.raises(ValueError, match="lease_jitter"):
        LinkSettings("n1", "ns", tmp_path, lease_jitter=1.0)


def test_a_slow_api_server_does_not_stretch_the_renewal_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each renewal is written with the time it starts: the next one starts `lease_renew_s` after
    that start, however long the API server took to answer, so renewTimes stay at most the
    interval apart (the operator judges silence from them)."""
    from node_agent.link import lease
    from node_agent.link.lease import LeaseRenewer

    clock = [1000.0]
    waits: list[float] = []

    class SlowConnection:
        def may_call(self) -> bool:
            return True

        async def run(self, fn: Any, *args: Any) -> None:
            clock[0] += 4.0  # answered 4 s after the renewal was sent

        def online(self) -> None:
            pass

    async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
        waits.append(timeout_s)
        clock[0] += timeout_s
        if len(waits) == 3:
            raise asyncio.CancelledError

    monkeypatch.setattr(lease, "wait_event", wait_event)
    s = LinkSettings("n1", "ns", tmp_path, lease_renew_s=15.0, lease_jitter=0.0)
    stats = SimpleNamespace(lease_renewals=0)
    renewer = LeaseRenewer(s, None, SlowConnection(), stats, lambda: "n1", lambda: clock[0])  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(renewer.run())
    assert waits == [11.0, 11.0, 11.0]  # a renewal starts every 15 s: 4 s answering, 11 s waiting
    assert renewer.next_wait_s(busy_s=20.0) == 0.0  # answered later than the period: at once
