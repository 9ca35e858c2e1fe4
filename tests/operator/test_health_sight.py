"""The fleet loop tells node health when it could not observe the fleet (`lost_sight`): a pass that
could not reach the API server, a pass stopped because the hold lapsed, a replica in standby; not a
pass the API server answered with a refusal (it was observed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ReadTimeoutError

from edgefleet_operator.fleet_loop import FleetLoop, unreachable
from edgefleet_operator.ownership import HoldLost
from edgefleet_operator.settings import OperatorSettings


class FakeReconciler:
    """What the loop calls of a reconciler; each pass raises `error` (None: succeeds)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.gate: Any = None
        self.urgent = asyncio.Event()
        self.lost = 0

    def forget(self) -> None:
        pass

    def lost_sight(self) -> None:
        self.lost += 1

    def reconcile_once(self) -> Any:
        assert self.error is not None
        raise self.error


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (ReadTimeoutError(None, "/api/v1/nodes", "read timed out"), 1),  # type: ignore[arg-type]
        (ConnectionRefusedError(111, "refused"), 1),
        (ApiException(status=503, reason="Service Unavailable"), 1),
        (ApiException(status=429, reason="Too Many Requests"), 1),
        (HoldLost("shard fleet no longer held"), 1),
        (ApiException(status=403, reason="Forbidden"), 0),
        (ApiException(status=422, reason="Unprocessable Entity"), 0),
        (ValueError("a bug"), 0),
    ],
)
def test_a_pass_that_could_not_reach_the_api_server_is_reported_unobserved(
    error: BaseException, lost: int
) -> None:
    reconciler = FakeReconciler(error)
    loop = FleetLoop(reconciler, OperatorSettings(api_backoff_base_s=0.01), rand=lambda: 0.0)  # type: ignore[arg-type]
    asyncio.run(loop._pass())
    assert reconciler.lost == lost
    assert unreachable(error) is (lost == 1 and not isinstance(error, HoldLost))


class Standby:
    """Leases that hold nothing."""

    def holds(self, shard: str) -> bool:
        return False

    def held(self) -> list[str]:
        return []


def test_a_replica_in_standby_is_reported_unobserved() -> None:
    reconciler = FakeReconciler(None)
    settings = OperatorSettings(resync_interval_s=0.01, reconcile_debounce_s=0.01)
    loop = FleetLoop(reconciler, settings, leases=Standby())  # type: ignore[arg-type]

    async def run_a_while() -> None:
        task = asyncio.create_task(loop.run())
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(run_a_while())
    assert reconciler.lost >= 1
