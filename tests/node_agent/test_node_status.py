"""EdgeNode.status, pure: status building (checked against the CRD's schema), the merge
patches it is written as, and status pacing."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from edge_node_specs import C1, C2, D1, D2, GIB, LATER, MLP, NOW, assignment, edge_node, entry
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet_api.conditions import conditions_from_obj
from edgefleet_api.edge_node import EdgeNodeStatus, GpuStatus, ModelCounters
from edgefleet_api.patch import merge_patch
from edgefleet_api.sla import SlaWindow
from edgefleet_api.types import ModelId
from node_agent.link.assignment import (
    Assignment,
    parse_edge_node,
)
from node_agent.link.node_status import ModelRecord, StatusInputs, StatusPacer, build_status

REPO = Path(__file__).resolve().parents[2]


# --- status ---------------------------------------------------------------------------------

CPU = GpuStatus("cpu", 2 * GIB, GIB // 2, GIB + GIB // 2)


def inputs(a: Assignment | None, records: dict[ModelId, ModelRecord], **kw: Any) -> StatusInputs:
    base: dict[str, Any] = {
        "assignment": a,
        "records": records,
        "gpu": CPU,
        "budget_bytes": 2 * GIB,
        "used_bytes": GIB // 2,
        "loaded_models": sum(1 for r in records.values() if r.state == "Ready"),
        "observed_generation": 1,
        "now": NOW,
        "endpoint": "http://10.0.0.5:8000",
        "agent_version": "0.1.0",
    }
    base.update(kw)
    return StatusInputs(**base)


def built(inp: StatusInputs) -> dict[str, Any]:
    """The status as the link writes it."""
    return build_status(inp).to_obj()


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def status_schema() -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / "edgefleet.io_edgenodes.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    return schema


def check_schema(value: Any, schema: dict[str, Any], path: str = "status") -> None:
    """The parts of OpenAPI validation the status can get wrong: unknown fields (the API
    server would prune them silently), types, enums, patterns and minimums."""
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), path
        for key, item in value.items():
            assert key in schema["properties"], f"{path}.{key} is not in the CRD"
            check_schema(item, schema["properties"][key], f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list), path
        for i, item in enumerate(value):
            check_schema(item, schema["items"], f"{path}[{i}]")
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), path
    elif kind == "number":
        assert isinstance(value, int | float) and not isinstance(value, bool), path
    elif kind == "string":
        assert isinstance(value, str), path
    elif kind == "boolean":
        assert isinstance(value, bool), path
    if "enum" in schema:
        assert value in schema["enum"], f"{path}={value!r}"
    if "minimum" in schema:
        assert value >= schema["minimum"], path
    if "pattern" in schema:
        import re

        assert re.match(schema["pattern"], value), f"{path}={value!r}"
    for key in schema.get("required", []):
        assert key in value, f"{path}.{key} is required"


def test_status_of_a_ready_node_matches_the_crd_and_what_the_operator_reads() -> None:
    a = assignment(entry(trafficWeight=90), entry(version="2", digest=D2, trafficWeight=10))
    records = {C1: ModelRecord("Ready", D1, 1000), C2: ModelRecord("Ready", D2, 1200)}
    window = SlaWindow(0.00123456, 0.004, 0.009, 50.0, error_rate=0.0, requests=3000, window_s=60, met=True)
    sla = {C1: window}
    gpu = GpuStatus("Orin", 8 * GIB, 3 * GIB, 5 * GIB, 55.04, 83.0, False, (), 12.3, 0.42)
    status = built(inputs(a, records, sla=sla, gpu=gpu))
    check_schema(status, status_schema())
    assert conditions(status) == {
        "Ready": ("True", "AllModelsReady"),
        "MemoryPressure": ("False", "WithinBudget"),
        "ThermalThrottling": ("False", "Normal"),
        "SLAViolated": ("False", "NoViolation"),
        "ServingPrevious": ("False", "ServingTarget"),
    }
    assert status["message"] == "" and status["loadedModels"] == 2 and status["observedGeneration"] == 1
    assert status["endpoint"] == "http://10.0.0.5:8000" and status["heartbeatTime"] == NOW
    m1, m2 = status["models"]
    assert (m1["version"], m1["state"], m1["digest"], m1["memoryBytes"], m1["trafficWeight"]) == (
        "1",
        "Ready",
        D1,
        1000,
        90,
    )
    assert (
        m1["sla"]["p50LatencyMs"] == 1.235 and m1["sla"]["p95LatencyMs"] == 4.0 and m1["sla"]["met"] is True
    )
    assert (m2["trafficWeight"], "sla" in m2) == (10, False)
    assert status["gpu"]["temperatureC"] == 55.0 and status["gpu"]["utilization"] == 0.42
    # what operator/service_status.model_ready_on checks
    assert all(m["state"] == "Ready" and m["digest"] in (D1, D2) for m in status["models"])


def test_status_of_a_node_with_trouble() -> None:
    a = assignment(entry(), entry("mlp"), entry("big", digest=D2), entry("lazy", preload=False))
    records = {
        C1: ModelRecord(
            "Failed", message="classifier:1: artifact has digest X, but the EdgeNode spec requires Y"
        ),
        MLP: ModelRecord("Loading", D1),
        ModelId("big", "1"): ModelRecord("Failed", message="big:1 needs 9 bytes", insufficient_memory=True),
    }
    hot = GpuStatus("Orin", 8 * GIB, GIB, 7 * GIB, 90.0, 83.0, True, ("hw_thermal_slowdown",))
    sla = {MLP: SlaWindow(p95_latency_s=0.08, met=False)}
    status = built(inputs(a, records, gpu=hot, sla=sla))
    check_schema(status, status_schema())
    assert conditions(status) == {
        "Ready": ("False", "ModelFailed"),
        "MemoryPressure": ("True", "InsufficientMemory"),
        "ThermalThrottling": ("True", "Throttled"),
        "SLAViolated": ("True", "SLAMissed"),
        "ServingPrevious": ("False", "ServingTarget"),
    }
    by = {m["model"]: m for m in status["models"]}
    assert by["classifier"]["state"] == "Failed" and "requires Y" in by["classifier"]["message"]
    assert "digest" not in by["classifier"]
    assert by["lazy"]["state"] == "Pending" and by["mlp"]["state"] == "Loading"
    assert "requires Y" in status["message"]


def test_conflicts_invalid_entries_and_leftovers_are_reported() -> None:
    a = parse_edge_node(
        edge_node(entry(service="a/x"), entry(service="b/y", digest=D2), entry("bad", digest="x"))
    )
    leftover = [("a/old", MLP, ModelRecord("Unloading", D1, 77))]
    status = built(inputs(a, {C1: ModelRecord("Ready", D1, 5)}, leftovers=leftover))
    check_schema(status, status_schema())
    states = [(m["service"], m["model"], m["state"]) for m in status["models"]]
    assert states == [
        ("a/old", "mlp", "Unloading"),
        ("a/x", "classifier", "Ready"),
        ("b/y", "classifier", "Failed"),
        ("default/cls", "bad", "Failed"),
    ]
    assert conditions(status)["Ready"] == ("False", "ModelFailed")


def test_near_budget_thermal_soft_limit_and_no_reading() -> None:
    a = assignment(entry())
    warm = GpuStatus("Orin", 8 * GIB, GIB, 7 * GIB, 84.0, 83.0, False)
    status = built(
        inputs(a, {C1: ModelRecord("Ready", D1, 5)}, used_bytes=1980 << 20, budget_bytes=2000 << 20, gpu=warm)
    )
    assert conditions(status)["MemoryPressure"] == ("True", "NearBudget")
    assert conditions(status)["ThermalThrottling"] == ("True", "AboveSoftLimit")
    assert conditions(built(inputs(a, {})))["ThermalThrottling"] == ("Unknown", "NoReading")
    assert conditions(built(inputs(None, {})))["Ready"] == ("False", "NoAssignment")
    drained = built(inputs(assignment(entry(), drain=True), {}))
    assert conditions(drained)["Ready"] == ("False", "Draining")
    assert [m["state"] for m in drained["models"]] == ["Unloading"]


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    a = assignment(entry())
    first = built(inputs(a, {C1: ModelRecord("Loading", D1)}, now=NOW))
    previous = conditions_from_obj(first["conditions"])
    same = built(inputs(a, {C1: ModelRecord("Loading", D1)}, now=LATER, previous_conditions=previous))
    assert same["conditions"] == first["conditions"] and same["heartbeatTime"] == LATER
    flipped = built(inputs(a, {C1: ModelRecord("Ready", D1, 1)}, now=LATER, previous_conditions=previous))
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times["Ready"] == LATER and times["MemoryPressure"] == NOW


def test_model_record_rejects_unknown_states_and_sla_drops_junk() -> None:
    with pytest.raises(ValueError):
        ModelRecord("Running")
    assert SlaWindow(p95_latency_s=float("nan")).to_obj() == {}
    assert SlaWindow(requests=3, met=False).to_obj() == {"requests": 3, "met": False}


# --- merge patches --------------------------------------------------------------------------


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, section 2 (the reference algorithm)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def test_merge_patch_examples() -> None:
    old = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "gone": True}
    new = {"a": 1, "b": {"c": 2, "d": 4}, "e": [1, 2, 3], "f": "x"}
    patch = merge_patch(old, new)
    assert patch == {"b": {"d": 4}, "e": [1, 2, 3], "f": "x", "gone": None}
    assert merge_patch(new, new) == {}
    assert merge_patch({}, new) == new


json_leaf = st.one_of(st.integers(-2, 2), st.sampled_from(["a", "b"]), st.booleans())
json_inner = st.one_of(
    json_leaf,
    st.lists(json_leaf, max_size=2),
    st.dictionaries(st.sampled_from("abc"), json_leaf, max_size=3),
)
json_value = st.one_of(json_inner, st.dictionaries(st.sampled_from("abc"), json_inner, max_size=3))
json_object = st.dictionaries(st.sampled_from("abcde"), json_value, max_size=4)


@settings(max_examples=150, deadline=None)
@given(old=json_object, new=json_object)
def test_merge_patch_applied_to_old_gives_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    patch = merge_patch(old, new)
    assert apply_merge_patch(old, patch) == new
    assert (patch == {}) == (old == new)


# --- pacing ---------------------------------------------------------------------------------


def status_for(state: str = "Ready", temp: float = 50.0, p95: float = 4.0, now: str = NOW) -> EdgeNodeStatus:
    """The status as written (numbers rounded as on the wire), which the pacer compares."""
    a = assignment(entry())
    gpu = GpuStatus("Orin", 8 * GIB, GIB, 7 * GIB, temp, 83.0, False)
    sla = {C1: SlaWindow(p95_latency_s=p95 / 1000, met=True)}
    return EdgeNodeStatus.from_obj(
        built(inputs(a, {C1: ModelRecord(state, D1, 5)}, gpu=gpu, now=now, sla=sla))
    )


def test_pacer_writes_state_changes_soon_measurements_later_and_heartbeats_rarely() -> None:
    pacer = StatusPacer(min_interval_s=2.0, metrics_interval_s=10.0, max_interval_s=30.0, settle_s=0.0)
    written = status_for("Loading")
    assert pacer.due(0.0, None, written)  # nothing written yet
    pacer.wrote(0.0)
    assert not pacer.due(1.0, written, status_for("Loading", now=LATER))  # only the heartbeat differs
    assert not pacer.due(1.0, written, status_for("Ready"))  # a state change, too soon
    assert pacer.due(2.0, written, status_for("Ready"))
    assert not pacer.due(5.0, written, status_for("Loading", temp=61.0, p95=5.5))  # measurements only
    assert pacer.due(10.0, written, status_for("Loading", temp=61.0, p95=5.5))
    assert not pacer.due(29.9, written, status_for("Loading", now=LATER))
    assert pacer.due(30.0, written, status_for("Loading", now=LATER))
    with pytest.raises(ValueError):
        StatusPacer(min_interval_s=5.0, metrics_interval_s=1.0)


def test_pacer_writes_only_on_change_by_default_with_hystereses() -> None:
    """Issue 22: no heartbeat-only writes (liveness is the Lease); small moves of memory or
    temperature are not worth a write, larger ones are, at the measurement pace."""
    pacer = StatusPacer()
    written = status_for("Ready")
    assert pacer.due(0.0, None, written)
    pacer.wrote(0.0)
    # settling: for 10 minutes after a change, rewritten at the measurement pace, changed or not
    assert not pacer.due(5.0, written, status_for("Ready", now=LATER))
    assert pacer.due(10.0, written, status_for("Ready", now=LATER))
    pacer.wrote(590.0)
    assert not pacer.due(600.0, written, status_for("Ready", now=LATER))  # settled
    for t in (630.0, 3000.0, 86_400.0):
        assert not pacer.due(t, written, status_for("Ready", now=LATER))  # unchanged: never again
    pacer = StatusPacer(settle_s=0.0)  # the hystereses, apart from settling
    pacer.wrote(0.0)
    assert not pacer.due(60.0, written, status_for("Ready", temp=51.9))  # under 2 C
    assert pacer.due(60.0, written, status_for("Ready", temp=52.0))
    assert not pacer.due(5.0, written, status_for("Ready", temp=58.0))  # at the measurement pace
    assert pacer.due(60.0, written, status_for("Ready", p95=4.5))  # the SLA window rolled
    assert pacer.due(3.0, written, status_for("Loading"))  # a change of state: soon
    gpu = written.gpu
    assert gpu is not None and gpu.memory_total_bytes is not None and gpu.memory_used_bytes is not None
    small = dataclasses.replace(gpu, memory_used_bytes=gpu.memory_used_bytes + gpu.memory_total_bytes // 25)
    large = dataclasses.replace(
        gpu, memory_used_bytes=gpu.memory_used_bytes + gpu.memory_total_bytes // 20 + 1
    )
    assert not pacer.due(60.0, written, dataclasses.replace(written, gpu=small))  # 4% of the GPU
    assert pacer.due(60.0, written, dataclasses.replace(written, gpu=large))  # 5%
    with pytest.raises(ValueError):
        StatusPacer(2.0, 10.0, 5.0)  # a refresh more often than measurements


def test_pacer_bounds_the_write_rate_of_a_churning_status() -> None:
    pacer = StatusPacer(2.0, 10.0, 30.0)
    written: EdgeNodeStatus | None = None
    writes: list[float] = []
    for tick in range(600):  # 10 minutes at 1 s ticks, the state flapping every tick
        status = status_for("Ready" if tick % 2 else "Loading")
        if pacer.due(float(tick), written, status):
            written = status
            writes.append(float(tick))
            pacer.wrote(float(tick))
    assert min(b - a for a, b in itertools.pairwise(writes)) >= 2.0
    assert len(writes) >= 199  # and the latest state is never more than 3 s old


def test_counters_ride_along_per_version_and_never_make_a_write_per_request() -> None:
    a = assignment(entry(trafficWeight=90), entry(version="2", digest=D2, trafficWeight=10))
    records = {C1: ModelRecord("Ready", D1, 1000), C2: ModelRecord("Ready", D2, 1200)}
    stable = ModelCounters("18a-1f", requests=900, errors=3, slow=12, slo_latency_s=0.05)
    canary = ModelCounters("18a-1f", requests=100, errors=2, slow=5, slo_latency_s=0.05)
    old = ModelCounters("18a-1f", requests=7)
    leftover = [("default/cls", ModelId("classifier", "0"), ModelRecord("Unloading", D1, 5))]
    counters = {C1: stable, C2: canary, ModelId("classifier", "0"): old}
    status = built(inputs(a, records, counters=counters, leftovers=leftover))
    check_schema(status, status_schema())
    by_version = {m["version"]: m.get("counters") for m in status["models"]}
    assert by_version == {
        "0": {"epoch": "18a-1f", "requests": 7, "errors": 0, "slow": 0},
        "1": {"epoch": "18a-1f", "requests": 900, "errors": 3, "slow": 12, "sloLatencyMs": 50.0},
        "2": {"epoch": "18a-1f", "requests": 100, "errors": 2, "slow": 5, "sloLatencyMs": 50.0},
    }
    typed = EdgeNodeStatus.from_obj(status)  # what the operator reads back
    assert {m.version: m.counters for m in typed.models} == {"0": old, "1": stable, "2": canary}
    assert "counters" not in built(inputs(a, records))["models"][0]  # none measured yet

    # counters grow with every request: a measurement, written at the measurement pace only
    pacer = StatusPacer(2.0, 10.0, 30.0)
    written: EdgeNodeStatus | None = None
    writes: list[int] = []
    for tick in range(120):  # 2 minutes at 1 s ticks, 50 requests a second
        grown = {C1: dataclasses.replace(stable, requests=stable.requests + 50 * tick)}
        now = EdgeNodeStatus.from_obj(built(inputs(a, records, counters=grown)))
        if pacer.due(float(tick), written, now):
            written = now
            writes.append(tick)
            pacer.wrote(float(tick))
    assert writes == list(range(0, 120, 10))
    assert written is not None and written.models[0].counters is not None
    assert written.models[0].counters.requests == stable.requests + 50 * 110  # the latest rides along


# --- make before break, report sequence ---------------------------------------------------------


def test_a_version_kept_serving_for_a_target_that_cannot_be_fetched_says_so() -> None:
    a = assignment(entry())  # classifier:1 assigned; classifier:2 still serves
    failed = ModelRecord("Failed", message="artifact unreachable (connection refused)")
    held = ModelRecord(
        "Ready", D2, 100, "serving in place of classifier:1 Failed", held=True, traffic_weight=100
    )
    status = built(inputs(a, {C1: failed}, leftovers=[("default/cls", C2, held)]))
    check_schema(status, status_schema())
    assert conditions(status)["ServingPrevious"] == ("True", "TargetFailed")
    by_version = {m["version"]: m for m in status["models"]}
    assert by_version["2"]["state"] == "Ready" and by_version["2"]["trafficWeight"] == 100
    assert by_version["1"]["state"] == "Failed"
    replacing = built(inputs(a, {C1: ModelRecord("Loading")}, leftovers=[("default/cls", C2, held)]))
    assert conditions(replacing)["ServingPrevious"] == ("True", "Replacing")


def test_report_sequence_grows_across_restarts_and_above_what_the_server_holds() -> None:
    from node_agent.link.node_status import next_report_sequence

    first = next_report_sequence(0, 0, 1000.0)
    assert first == 1_000_000
    assert next_report_sequence(first, first, 1000.0) == first + 1  # same millisecond
    assert next_report_sequence(0, 5_000_000, 1000.0) == 5_000_001  # a restart under a slow clock
    assert next_report_sequence(7, 0, 2000.0) == 2_000_000
    status = EdgeNodeStatus(report_sequence=first)
    assert EdgeNodeStatus.from_obj(status.to_obj()).report_sequence == first
    pacer = StatusPacer(2.0, 10.0, 30.0)
    pacer.wrote(0.0)
    later = EdgeNodeStatus(report_sequence=first + 1)
    assert not pacer.due(1.0, status, later)  # a new number alone is no change worth a write
