"""From typed fleet objects to placement's input and back to EdgeNode specs (pure, no cluster):
the memory path (measured GPU memory -> capacity -> budgets in the spec) and the SLA path
(objectives copied into every spec entry; met windows -> placement's SLA record)."""

from __future__ import annotations

from typing import Any

from edgefleet_api import names
from edgefleet_api.edge_node import EdgeNode, EdgeNodeSpec, ModelAssignment
from edgefleet_api.inference_service import InferenceServiceSpec, Taint
from edgefleet_api.model_spec import ModelSpec
from edgefleet_api.rollout_status import Phase, RolloutStatus
from edgefleet_api.sla import SlaObjectives
from edgefleet_api.types import Priority
from edgefleet_operator import fleet_state
from edgefleet_operator.fleet_types import Health, PlacedModel

GIB = 1 << 30
SERVICE = "default/camera"


def digest(tag: str) -> str:
    return "sha256:" + (tag * 64)[:64]


def model_obj(version: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "classifier",
        "version": version,
        "artifact": {"uri": f"repo://classifier/{version}/model.pt", "digest": digest(version)},
        **extra,
    }


def node(
    name: str = "n1", labels: dict[str, str] | None = None, taints: list[Any] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"taints": taints or []},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
        },
    }


def edge_node(
    status: dict[str, Any] | None = None, spec: dict[str, Any] | None = None, **annotations: str
) -> EdgeNode:
    return EdgeNode.from_obj(
        {
            "metadata": {"name": "n1", "annotations": annotations},
            "spec": spec or {"nodeName": "n1"},
            "status": status or {},
        }
    )


def test_capacity_is_the_measured_gpu_less_reserve_and_what_is_not_ours() -> None:
    status = {
        "gpu": {"name": "Orin", "memoryTotalBytes": 8 * GIB, "memoryUsedBytes": 3 * GIB, "temperatureC": 61.5,
                "softLimitC": 80.0, "throttled": True},
        "models": [
            {"service": SERVICE, "model": "classifier", "version": "1", "state": "Ready", "memoryBytes": GIB},
            {"service": SERVICE, "model": "det", "version": "1", "state": "Loading", "memoryBytes": GIB // 2},
            {"service": SERVICE, "model": "old", "version": "1", "state": "Evicted", "memoryBytes": GIB},
        ],
    }  # fmt: skip
    state = fleet_state.node_state(node(), edge_node(status), Health.HEALTHY, 0.1)
    # ours: the Ready and the Loading model (1.5 GiB); the other 1.5 GiB in use is someone else's
    assert state.memory_total_bytes == 8 * GIB
    assert state.memory_reserved_bytes == int(8 * GIB * 0.1) + 3 * GIB // 2
    assert (state.temperature_c, state.soft_limit_c, state.throttled) == (61.5, 80.0, True)


def test_until_the_agent_reports_the_gpu_label_gives_the_total() -> None:
    labels = {"nvidia.com/gpu.memory": "16384"}
    state = fleet_state.node_state(node(labels=labels), None, Health.SUSPECT, 0.25)
    assert state.memory_total_bytes == 16 * GIB and state.memory_reserved_bytes == 4 * GIB
    assert state.health is Health.SUSPECT and state.temperature_c is None and not state.throttled


def test_lifecycle_taints_are_left_to_health() -> None:
    taints = [
        {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"},
        {"key": "edge", "effect": "NoSchedule", "value": "x"},
        {"key": "noisy", "effect": "PreferNoSchedule"},
    ]
    state = fleet_state.node_state(node(taints=taints), None, Health.HEALTHY, 0.0)
    assert state.taints == (Taint("edge", "NoSchedule", "x"), Taint("noisy", "PreferNoSchedule"))


def test_met_windows_are_the_sla_record() -> None:
    status = {
        "models": [
            {
                "service": SERVICE,
                "model": "classifier",
                "version": "1",
                "state": "Ready",
                "sla": {"met": True},
            },
            {"service": SERVICE, "model": "det", "version": "1", "state": "Ready", "sla": {"met": False}},
            {"service": SERVICE, "model": "new", "version": "1", "state": "Ready", "sla": {"requests": 3}},
        ]
    }
    assert fleet_state.sla_scores(edge_node(status).status) == {
        (SERVICE, "classifier"): 1.0,
        (SERVICE, "det"): 0.0,
    }


def test_signals_read_the_work_annotation_and_the_lease() -> None:
    en = edge_node(
        spec={"nodeName": "n1", "models": [{**model_obj("1"), "service": SERVICE, "model": "classifier"}]},
        **{names.ANNOTATION_WORK_SINCE: "2026-01-01T00:00:10Z"},
    )
    lease = {"spec": {"renewTime": "2026-01-01T00:00:20.500000Z"}}
    signals = fleet_state.node_signals(node(), en, lease)
    assert signals.ready and signals.has_work
    assert signals.work_since_s == 1767225610.0 and signals.lease_renew_s == 1767225620.5
    assert not fleet_state.node_signals(node(), None, None).has_work


def test_demand_uses_measurements_over_estimates_and_budgets_for_a_rollouts_stable_version() -> None:
    spec = InferenceServiceSpec.from_obj(
        {
            "models": [model_obj("2", memoryEstimate="512Mi", priority="high")],
            "placement": {"replicas": 3, "tolerations": [{"key": "edge", "operator": "Exists"}]},
        }
    )
    measured = fleet_state.Measured({(SERVICE, "classifier", "2"): (600 << 20, 700 << 20)})
    demand = fleet_state.service_demand(SERVICE, spec, None, measured)
    assert demand.memory_bytes == 700 << 20 and demand.replicas == 3 and demand.priority is Priority.HIGH
    assert demand.tolerations[0].key == "edge"
    rollout = RolloutStatus(
        phase=Phase.PROGRESSING,
        stable_models=(ModelSpec.from_obj(model_obj("1", memoryEstimate="1Gi")),),
        canary_models=spec.models,
    )
    during = fleet_state.service_demand(SERVICE, spec, rollout, measured)
    assert [(m.version, m.memory_bytes) for m in during.models] == [("2", 700 << 20), ("1", GIB)]
    done = fleet_state.service_demand(SERVICE, spec, RolloutStatus(stable_models=spec.models), measured)
    assert [m.version for m in done.models] == ["2"]


def test_a_new_service_of_an_artifact_the_fleet_runs_is_sized_by_its_measurement() -> None:
    """Measurements count for every service loading the same artifact the same way (one EdgeNode
    write per placement, not one at the estimate and one at the measurement), never across a
    different artifact, model.yaml, largest batch or generation settings; a version's own
    measurements come first."""
    batching = {"maxBatchSize": 8}
    running = {"service": "other/cam", "model": "det", "version": "7", "memoryBudgetBytes": GIB}
    en = edge_node(
        status={"models": [{"service": "other/cam", "model": "det", "version": "7", "state": "Ready",
                            "memoryBytes": 300 << 20}]},
        spec={"nodeName": "n1", "models": [{**model_obj("2"), **running, "batching": batching}]},
    )  # fmt: skip
    measured = fleet_state.measured_bytes([en])
    assert measured.by_version == {("other/cam", "det", "7"): (300 << 20,)}

    def demand(**changes: Any) -> int:
        obj = {"models": [model_obj("2", memoryEstimate="1Gi")], "batching": batching, **changes}
        return fleet_state.service_demand(
            SERVICE, InferenceServiceSpec.from_obj(obj), None, measured
        ).memory_bytes

    assert demand() == 300 << 20  # same artifact, same batch: the fleet's measurement
    assert demand(batching={"maxBatchSize": 8, "maxQueueDelayMs": 1}) == 300 << 20  # (delay: no memory)
    assert demand(batching={"maxBatchSize": 32}) == GIB  # a larger batch: the estimate
    assert demand(models=[model_obj("3", memoryEstimate="1Gi")]) == GIB  # another artifact
    other_config = model_obj("2", memoryEstimate="1Gi")
    other_config["artifact"] = {**other_config["artifact"], "configDigest": digest("c")}
    assert demand(models=[other_config]) == GIB  # another model.yaml
    own = fleet_state.Measured({(SERVICE, "classifier", "2"): (200 << 20,)}, measured.by_load)
    spec = InferenceServiceSpec.from_obj({"models": [model_obj("2")], "batching": batching})
    assert fleet_state.service_demand(SERVICE, spec, None, own).memory_bytes == 200 << 20


class Targets:
    def __init__(self, *placed: tuple[ModelSpec, int]) -> None:
        self._placed = list(placed)

    def placed(self, node: str) -> list[tuple[ModelSpec, int]]:
        return self._placed


def test_spec_entries_carry_budgets_weights_batching_and_the_sla() -> None:
    spec = InferenceServiceSpec.from_obj(
        {
            "models": [model_obj("2", pinned=True)],
            "batching": {"maxBatchSize": 4, "maxQueueDelayMs": 2.5, "adaptive": False},
            "sla": {"p95LatencyMs": 40, "p99LatencyMs": 80, "maxErrorRate": 0.01, "windowSeconds": 30},
        }
    )
    v1 = ModelSpec.from_obj(model_obj("1"))
    placed = [PlacedModel(SERVICE, "classifier", "2", 300 << 20, 100)]
    budgeted_v1 = {
        **model_obj("1"),
        "service": SERVICE,
        "model": "classifier",
        "memoryBudgetBytes": 200 << 20,
    }
    current = (
        ModelAssignment.from_obj(budgeted_v1),
        ModelAssignment.from_obj({**model_obj("7"), "service": "other/svc", "model": "classifier"}),
    )
    placed.append(PlacedModel("other/svc", "classifier", "7", 0))
    targets = {SERVICE: Targets((v1, 70), (spec.models[0], 30))}
    models = fleet_state.edge_node_models("n1", placed, targets, {SERVICE: spec}, current)
    assert [(m.service, m.version, m.traffic_weight, m.memory_budget_bytes) for m in models] == [
        (SERVICE, "1", 70, 200 << 20),  # not budgeted this pass: keeps the budget it has
        (SERVICE, "2", 30, 300 << 20),
        ("other/svc", "7", 100, None),  # no decision this pass: kept as it is
    ]
    entry = models[1]
    assert entry.sla == SlaObjectives(0.04, 0.08, max_error_rate=0.01, window_s=30)
    assert entry.batching is not None and entry.batching.max_queue_delay_s == 0.0025 and entry.pinned
    written = entry.to_obj()
    assert written["sla"] == {
        "p95LatencyMs": 40,
        "p99LatencyMs": 80,
        "maxErrorRate": 0.01,
        "windowSeconds": 30,
    }
    assert written["batching"] == {"maxBatchSize": 4, "maxQueueDelayMs": 2.5, "adaptive": False}
    assert ModelAssignment.from_obj(written) == entry  # what the API server echoes compares equal


def test_previous_assignment_reads_the_specs() -> None:
    spec = {
        "nodeName": "n1",
        "models": [
            {
                **model_obj("1"),
                "service": SERVICE,
                "model": "classifier",
                "memoryBudgetBytes": 5,
                "trafficWeight": 40,
            }
        ],
    }
    previous = fleet_state.previous_assignment([edge_node(spec=spec)])
    assert previous.by_node == {"n1": (PlacedModel(SERVICE, "classifier", "1", 5, 40),)}
    assert EdgeNodeSpec.from_obj(spec).models[0].memory_budget_bytes == 5


def test_the_node_memo_keeps_a_nodes_placed_models_while_its_resource_version_stands() -> None:
    parsed: list[str] = []

    def typed(name: str, obj: dict[str, Any]) -> EdgeNode:
        parsed.append(obj["metadata"]["resourceVersion"])
        return EdgeNode.from_obj(obj)

    def obj(version: str, budget: int) -> dict[str, Any]:
        entry = {**model_obj("1"), "service": SERVICE, "model": "classifier", "memoryBudgetBytes": budget}
        return {
            "metadata": {"name": "n1", "resourceVersion": version},
            "spec": {"nodeName": "n1", "models": [entry]},
        }

    memo = fleet_state.NodeMemo(typed)
    first = memo.placed("n1", obj("7", 5))
    assert first == (PlacedModel(SERVICE, "classifier", "1", 5, 100),)
    assert memo.placed("n1", obj("7", 5)) is first and parsed == ["7"]  # the same version: kept
    assert memo.placed("n1", obj("8", 6))[0].memory_budget_bytes == 6 and parsed == ["7", "8"]
    memo.keep_only([])
    memo.placed("n1", obj("8", 6))
    assert parsed == ["7", "8", "8"]  # forgotten once the node left
