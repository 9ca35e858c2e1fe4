"""InferenceService status from the placement and the agents' EdgeNode statuses, with the clock
passed in: conditions keep their lastTransitionTime while they hold."""

from __future__ import annotations

from typing import Any

from edgefleet_api import wire
from edgefleet_api.edge_node import EdgeNodeStatus
from edgefleet_api.rollout_status import Phase, RolloutStatus
from edgefleet_operator import service_status as status_module
from edgefleet_operator.fleet_read import read_service
from edgefleet_operator.fleet_types import ServicePlacement
from edgefleet_operator.service_status import RolloutView


def service_status(
    obj: dict[str, Any], placement: ServicePlacement, statuses: dict[str, Any], now: str, view: Any = None
) -> dict[str, Any]:
    """The status as written, from the objects as the API returns them."""
    typed = {n: EdgeNodeStatus.from_obj(st) for n, st in statuses.items()}
    return status_module.service_status(read_service(obj), placement, typed, now, view).to_obj()


DIGEST = "sha256:" + "1a" * 32
T0, T1 = "2026-09-21T14:13:20Z", "2026-09-21T14:20:00Z"


def isvc(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    model = {
        "name": "classifier",
        "version": "1",
        "artifact": {"uri": "repo://classifier/1", "digest": DIGEST},
    }
    return {
        "metadata": {"name": "cam", "namespace": "shop", "generation": generation},
        "spec": {"models": [model]},
        "status": status or {},
    }


def node_status(state: str = "Ready", version: str = "1", **sla: Any) -> dict[str, Any]:
    m = {"service": "shop/cam", "model": "classifier", "version": version, "digest": DIGEST, "state": state}
    return {"models": [m | ({"sla": sla} if sla else {})], "endpoint": "http://n1:8000"}


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["lastTransitionTime"]) for c in status["conditions"]}


def test_rfc3339_is_whole_seconds_utc() -> None:
    assert wire.rfc3339(1_790_000_000.7) == T0


def test_a_condition_keeps_its_transition_time_while_it_holds() -> None:
    placement = ServicePlacement(("n1",), 1)
    loading = service_status(isvc(), placement, {"n1": node_status("Loading")}, T0)
    assert conditions(loading) == {
        "Ready": ("False", T0),
        "Progressing": ("True", T0),
        "Degraded": ("False", T0),
    }
    # Later, still loading: every condition holds, every time is kept.
    still = service_status(isvc(loading), placement, {"n1": node_status("Loading")}, T1)
    assert conditions(still) == conditions(loading)
    # Loaded: Ready and Progressing change (now), Degraded holds (kept).
    ready = service_status(isvc(still), placement, {"n1": node_status()}, T1)
    assert conditions(ready) == {
        "Ready": ("True", T1),
        "Progressing": ("False", T1),
        "Degraded": ("False", T0),
    }
    assert ready["endpoints"] == ["http://n1:8000"] and ready["url"] == "http://cam-v2.shop.svc"


def test_a_new_generation_keeps_the_times_of_conditions_that_hold() -> None:
    placement = ServicePlacement(("n1",), 1)
    ready = service_status(isvc(), placement, {"n1": node_status()}, T0)
    newer = service_status(isvc(ready, generation=2), placement, {"n1": node_status()}, T1)
    assert conditions(newer) == conditions(ready)
    assert {c["observedGeneration"] for c in newer["conditions"]} == {2}


def test_the_rollout_view_decides_versions_models_and_degraded() -> None:
    placement = ServicePlacement(("n1",), 1)
    canary = RolloutView(
        {"n1": "2"},
        {"n1": [("classifier", "2", DIGEST)]},
        ("RolloutFailed", "p95 too high"),
        RolloutStatus(phase=Phase.ROLLED_BACK),
    )
    # The node serves version 1, the rollout wants 2 there: not ready; degraded by the rollout.
    status = service_status(isvc(), placement, {"n1": node_status()}, T0, canary)
    assert status["readyNodes"] == 0 and status["versions"] == [
        {"version": "2", "desiredNodes": 1, "readyNodes": 0}
    ]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RolloutFailed")
    assert status["rollout"] == RolloutStatus(phase=Phase.ROLLED_BACK).to_obj()  # carried as is
    assert "rollout" not in service_status(isvc(), placement, {"n1": node_status()}, T0)


def test_degraded_names_the_nodes_that_cannot_prepare_their_target_and_serve_an_older_version() -> None:
    placement = ServicePlacement(("n1", "n2"), 2)
    failed = {
        "service": "shop/cam",
        "model": "classifier",
        "version": "1",
        "state": "Failed",
        "message": "artifact unreachable",
    }
    kept = {"service": "shop/cam", "model": "classifier", "version": "2", "digest": DIGEST, "state": "Ready"}
    statuses = {"n1": {"models": [failed, kept]}, "n2": node_status()}
    status = service_status(isvc(), placement, statuses, T0)
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ServingPreviousVersion"
    assert degraded["message"] == (
        "n1: cannot prepare classifier:1 (artifact unreachable); still serving classifier:2"
    )
    assert status["readyNodes"] == 1
    # A failure with nothing older to serve is ModelFailed, as before.
    alone = service_status(isvc(), placement, {"n1": {"models": [failed]}, "n2": node_status()}, T0)
    assert next(c for c in alone["conditions"] if c["type"] == "Degraded")["reason"] == "ModelFailed"
