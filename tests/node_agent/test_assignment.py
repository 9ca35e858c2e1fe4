"""The agent's side of the EdgeNode contract, pure: spec parsing, the reconcile plan, the
traffic split, the persisted format, status building, merge patches and status pacing."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet_api.patch import merge_patch
from edgefleet_api.types import ModelId, Priority
from node_agent.control.sla_monitor import SlaSpec
from node_agent.errors import InvalidModel
from node_agent.link.assignment import (
    Assignment,
    DesiredModel,
    GpuReading,
    InvalidAssignment,
    ModelRecord,
    ModelView,
    RuntimeView,
    StatusInputs,
    StatusPacer,
    TrafficSplit,
    UnsupportedArtifact,
    build_status,
    decode_persisted,
    desired_versions,
    effective_config,
    encode_persisted,
    parse_artifact_uri,
    parse_edge_node,
    plan,
    servable_weights,
    sla_status,
    traffic_weights,
)
from node_agent.link.operator_link import Backoff
from node_agent.types import ModelConfig, TensorSpec

REPO = Path(__file__).resolve().parents[2]
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:01:00Z"
GIB = 1 << 30


def entry(model: str = "classifier", version: str = "1", digest: str = D1, **kw: Any) -> dict[str, Any]:
    """An EdgeNode spec entry as the operator writes it."""
    out: dict[str, Any] = {
        "service": kw.pop("service", "default/cls"),
        "model": model,
        "version": version,
        "artifact": {"uri": kw.pop("uri", f"repo://{model}/{version}/model.pt"), "digest": digest},
        "format": "torchscript",
        "task": "predict",
        "priority": "normal",
        "pinned": False,
        "preload": True,
        "trafficWeight": 100,
        "memoryBudgetBytes": 64 << 20,
    }
    out.update(kw)
    return out


def edge_node(*models: dict[str, Any], generation: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeNode",
        "metadata": {"name": "node-a", "generation": generation, "resourceVersion": "42"},
        "spec": {"nodeName": "node-a", "models": list(models), **spec},
        "status": {"loadedModels": 3},
    }


def assignment(*models: dict[str, Any], **spec: Any) -> Assignment:
    return parse_edge_node(edge_node(*models, **spec))


def base_config(**kw: Any) -> ModelConfig:
    fields: dict[str, Any] = {
        "name": "classifier",
        "version": "1",
        "format": "torchscript",
        "inputs": (TensorSpec("image", "FP32", (3, 64, 64)),),
        "outputs": (TensorSpec("logits", "FP32", (10,)),),
        "artifact": "model.pt",
        "digest": D3,
    }
    fields.update(kw)
    return ModelConfig(**fields)


def view(
    models: dict[ModelId, ModelView] | None = None, free: int = GIB, device: int = 2 * GIB
) -> RuntimeView:
    return RuntimeView(models or {}, free, device)


C1, C2 = ModelId("classifier", "1"), ModelId("classifier", "2")
MLP = ModelId("mlp", "1")


# --- artifact URIs --------------------------------------------------------------------------


def test_repo_and_file_uris_resolve_to_locations() -> None:
    loc = parse_artifact_uri("repo://classifier/1/model.pt")
    assert (loc.scheme, loc.path) == ("repo", "classifier/1/model.pt")
    assert parse_artifact_uri("repo://classifier/1").path == "classifier/1"
    loc = parse_artifact_uri("file:///srv/models/a%20b/model.pt")
    assert (loc.scheme, loc.path) == ("file", "/srv/models/a b/model.pt")


def test_http_uris_are_whole_urls_of_a_file() -> None:
    loc = parse_artifact_uri("https://models.example.com/repo/classifier/1/model.pt")
    assert (loc.scheme, loc.path) == ("https", "https://models.example.com/repo/classifier/1/model.pt")
    for bad in ("https://models.example.com/", "https:///model.pt", "http://host/dir/", "https://h/a b.pt"):
        with pytest.raises(InvalidModel, match="expected http"):
            parse_artifact_uri(bad)


@pytest.mark.parametrize("scheme", ["s3", "gs", "oci", "pvc"])
def test_unfetchable_schemes_are_refused_with_a_clear_message(scheme: str) -> None:
    with pytest.raises(UnsupportedArtifact, match=f"unsupported artifact scheme '{scheme}'"):
        parse_artifact_uri(f"{scheme}://bucket/classifier/1/model.pt")


@pytest.mark.parametrize(
    "uri",
    [
        "repo://../etc/passwd",
        "repo://classifier/../../x",
        "repo://classifier",
        "repo:///abs/x",
        "file://relative/x",
        "no-scheme",
        "repo://",
        "repo://a\\b/1",
    ],
)
def test_malformed_uris_are_invalid(uri: str) -> None:
    with pytest.raises(InvalidModel):
        parse_artifact_uri(uri)


# --- spec -> assignment ---------------------------------------------------------------------


def test_parse_reads_every_field_the_operator_writes() -> None:
    raw = entry(
        "mlp",
        "1",
        priority="critical",
        pinned=True,
        preload=False,
        trafficWeight=30,
        batching={"maxBatchSize": 16, "maxQueueDelayMs": 4, "adaptive": True},
        sla={
            "p95LatencyMs": 20,
            "p99LatencyMs": 50,
            "windowSeconds": 30,
            "maxErrorRate": 0.01,
            "minThroughputRps": 5,
        },
    )
    a = assignment(raw, entry(), memoryBudgetBytes=3 << 30, drain=False)
    assert (a.edge_node, a.node_name, a.generation, a.memory_budget_bytes) == ("node-a", "node-a", 1, 3 << 30)
    assert [m.key for m in a.models] == [("default/cls", "classifier", "1"), ("default/cls", "mlp", "1")]
    m = a.models[1]
    assert m == DesiredModel(
        service="default/cls",
        model="mlp",
        version="1",
        artifact_uri="repo://mlp/1/model.pt",
        digest=D1,
        traffic_weight=30,
        memory_budget_bytes=64 << 20,
        priority=Priority.CRITICAL,
        pinned=True,
        preload=False,
        max_batch_size=16,
        max_queue_delay_s=0.004,
        p95_latency_s=0.02,
        p99_latency_s=0.05,
        min_throughput_rps=5.0,
        max_error_rate=0.01,
        sla_window_s=30,
    )
    assert not a.invalid


def test_defaults_apply_to_a_minimal_entry() -> None:
    raw = {"service": "ns/s", "model": "m", "version": "2", "artifact": {"uri": "repo://m/2", "digest": D2}}
    (m,) = assignment(raw).models
    assert (m.format, m.task, m.traffic_weight, m.priority, m.pinned, m.preload) == (
        "torchscript",
        "predict",
        100,
        Priority.NORMAL,
        False,
        True,
    )
    assert m.max_batch_size is None and m.p95_latency_s is None and m.memory_budget_bytes is None


def test_a_bad_entry_is_reported_not_fatal() -> None:
    bad_digest = entry("mlp", digest="md5:abc")
    no_artifact = {"service": "ns/s", "model": "x", "version": "1"}
    a = assignment(entry(), bad_digest, no_artifact)
    assert [m.id for m in a.models] == [C1]
    assert sorted((i.model, i.version) for i in a.invalid) == [("mlp", "1"), ("x", "1")]
    assert any("digest" in i.message for i in a.invalid)
    assert any("artifact" in i.message for i in a.invalid)


def test_a_malformed_object_raises() -> None:
    with pytest.raises(InvalidAssignment):
        parse_edge_node({"spec": {}})
    with pytest.raises(InvalidAssignment):
        parse_edge_node({"metadata": {"name": "n"}, "spec": {"models": {"not": "a list"}}})


def test_services_sharing_a_version_merge_and_conflicts_are_named() -> None:
    a = assignment(
        entry(service="a/one", priority="low"),
        entry(service="b/two", priority="high", pinned=True, preload=False),
        entry(service="c/three", digest=D2),  # the same version with other bytes
    )
    desired = desired_versions(a)
    (merged,) = desired.versions.values()
    assert (merged.service, merged.priority, merged.pinned, merged.preload) == (
        "a/one",
        Priority.HIGH,
        True,
        True,
    )
    assert list(desired.conflicts) == [("c/three", "classifier", "1")]
    assert "also assigned by service a/one" in desired.conflicts[("c/three", "classifier", "1")]
    assert traffic_weights(a) == {"classifier": {"1": 200}}  # the conflict carries no weight


def test_weights_per_model_and_draining_holds_nothing() -> None:
    a = assignment(entry(trafficWeight=90), entry(version="2", digest=D2, trafficWeight=10), entry("mlp"))
    assert traffic_weights(a) == {"classifier": {"1": 90, "2": 10}, "mlp": {"1": 100}}
    drained = assignment(entry(), drain=True)
    assert desired_versions(drained).versions == {} and traffic_weights(drained) == {}
    assert desired_versions(None).versions == {}


def test_effective_config_takes_the_spec_over_model_yaml() -> None:
    (m,) = assignment(
        entry(
            priority="critical",
            pinned=True,
            batching={"maxBatchSize": 32, "maxQueueDelayMs": 2},
            sla={"p95LatencyMs": 15, "p99LatencyMs": 40, "maxErrorRate": 0.02, "windowSeconds": 120},
        )
    ).models
    cfg = effective_config(base_config(name="other", version="9", memory_estimate_bytes=None), m)
    assert (cfg.name, cfg.version, cfg.digest) == ("classifier", "1", D1)
    assert (cfg.priority, cfg.pinned, cfg.max_batch_size, cfg.max_queue_delay_s) == (
        Priority.CRITICAL,
        True,
        32,
        0.002,
    )
    assert (cfg.p95_latency_s, cfg.p99_latency_s, cfg.memory_estimate_bytes) == (0.015, 0.04, 64 << 20)
    assert cfg.inputs == base_config().inputs  # the signature is model.yaml's
    assert cfg.parameters == {"max_error_rate": "0.02", "sla_window_s": "120"}
    assert SlaSpec.from_config(cfg) == SlaSpec(0.015, 0.04, max_error_rate=0.02, window_s=120.0)
    measured = effective_config(base_config(memory_estimate_bytes=5), m)
    assert measured.memory_estimate_bytes == 5  # model.yaml's own estimate wins over the budget


def test_effective_config_refuses_a_different_format_or_task_and_caps_tensorrt_batches() -> None:
    (m,) = assignment(entry(batching={"maxBatchSize": 32})).models
    with pytest.raises(InvalidModel, match=r"format 'torchscript'.*'tensorrt'"):
        effective_config(base_config(format="tensorrt", artifact="model.plan"), m)
    with pytest.raises(InvalidModel, match="task"):
        effective_config(base_config(task="generate"), m)
    (trt,) = assignment(entry(format="tensorrt", batching={"maxBatchSize": 32})).models
    assert effective_config(base_config(format="tensorrt", max_batch_size=8), trt).max_batch_size == 8


# --- plan -----------------------------------------------------------------------------------


def test_plan_from_nothing_prepares_everything_and_preloads_by_urgency() -> None:
    a = assignment(
        entry("mlp", priority="low"),
        entry(version="2", digest=D2, priority="critical"),
        entry(version="1", pinned=True),
        entry("lazy", preload=False),
    )
    p = plan(a, view(), now_s=0.0)
    assert [d.id for d in p.prepare] == [C1, C2, ModelId("lazy", "1"), MLP]
    assert p.preload == (C2, C1, MLP)  # critical, then normal (pinned), then low; lazy loads on demand
    assert p.unload == () and p.forget == () and not p.idle


def test_plan_unloads_what_is_no_longer_assigned_and_forgets_what_is_gone() -> None:
    a = assignment(entry())
    models = {
        C1: ModelView(D1, resident=True, preloaded=True),
        C2: ModelView(D2, resident=True, preloaded=True),
        MLP: ModelView(D1, resident=False),
    }
    p = plan(a, view(models), now_s=0.0)
    assert p.unload == (C2,) and p.forget == (MLP,)
    assert p.prepare == () and p.preload == ()


def test_a_converged_runtime_gives_an_idle_plan() -> None:
    a = assignment(entry(), entry("lazy", preload=False))
    models = {C1: ModelView(D1, resident=True, preloaded=True), ModelId("lazy", "1"): ModelView(D1)}
    assert plan(a, view(models), 0.0).idle


def test_a_changed_digest_unloads_then_prepares_and_preloads_again() -> None:
    a = assignment(entry(digest=D2))
    p = plan(a, view({C1: ModelView(D1, resident=True, preloaded=True)}), 0.0)
    assert p.unload == (C1,) and [d.digest for d in p.prepare] == [D2] and p.preload == (C1,)


def test_failures_wait_for_the_retry_interval_or_a_new_digest() -> None:
    failed = {C1: ModelView(None, failed_digest=D1, failed_at_s=100.0)}
    assert plan(assignment(entry()), view(failed), now_s=110.0, retry_failed_s=30.0).idle
    again = plan(assignment(entry()), view(failed), now_s=130.0, retry_failed_s=30.0)
    assert [d.id for d in again.prepare] == [C1] and again.preload == (C1,)
    new_digest = plan(assignment(entry(digest=D2)), view(failed), now_s=101.0)
    assert [d.digest for d in new_digest.prepare] == [D2]
    load_failed = {C1: ModelView(D1, failed_digest=D1, failed_at_s=100.0)}  # prepared, preload failed
    assert plan(assignment(entry()), view(load_failed), now_s=110.0).idle
    assert plan(assignment(entry()), view(load_failed), now_s=131.0).preload == (C1,)


def test_an_evicted_preload_comes_back_only_when_it_fits_in_free_memory() -> None:
    evicted = {C1: ModelView(D1, resident=False, preloaded=True, measured_bytes=300)}
    assert plan(assignment(entry()), view(evicted, free=299), 0.0).idle
    assert plan(assignment(entry()), view(evicted, free=300), 0.0).preload == (C1,)
    never_loaded = {C1: ModelView(D1, resident=False, preloaded=False, measured_bytes=300)}
    assert plan(assignment(entry()), view(never_loaded, free=0), 0.0).preload == (C1,)


def test_budget_is_the_spec_capped_by_the_device() -> None:
    assert plan(assignment(entry(), memoryBudgetBytes=GIB), view(device=2 * GIB), 0.0).budget_bytes == GIB
    assert (
        plan(assignment(entry(), memoryBudgetBytes=4 * GIB), view(device=2 * GIB), 0.0).budget_bytes
        == 2 * GIB
    )
    assert plan(assignment(entry()), view(device=2 * GIB), 0.0).budget_bytes == 2 * GIB


def test_draining_unloads_everything() -> None:
    models = {C1: ModelView(D1, resident=True), MLP: ModelView(D1, resident=True)}
    p = plan(assignment(entry(), entry("mlp"), drain=True), view(models), 0.0)
    assert p.unload == (C1, MLP) and p.prepare == () and p.preload == () and p.weights == {}


def test_resident_models_the_link_did_not_prepare_are_replaced() -> None:
    p = plan(assignment(entry()), view({C1: ModelView(None, resident=True)}), 0.0)
    assert p.unload == (C1,) and [d.id for d in p.prepare] == [C1]


def test_servable_weights_drop_versions_that_cannot_serve() -> None:
    weights = {"classifier": {"1": 90, "2": 10}, "mlp": {"1": 100}}
    assert servable_weights(weights, [C2]) == {"classifier": {"2": 10}}
    assert servable_weights(weights, []) == {}


# --- traffic split --------------------------------------------------------------------------


def test_split_is_deterministic_and_exactly_proportioned_over_a_cycle() -> None:
    split = TrafficSplit({"classifier": {"1": 90, "2": 10}}, seed=0)
    seq = [split.choose("classifier") for _ in range(100)]
    assert seq.count("2") == 10 and seq.count("1") == 90
    assert seq == [TrafficSplit({"classifier": {"1": 90, "2": 10}}).pick("classifier", n) for n in range(100)]
    positions = [i for i, v in enumerate(seq) if v == "2"]
    gaps = {b - a for a, b in itertools.pairwise(positions)}
    assert max(gaps) <= 13  # spread out, never a burst of canary requests
    seeded = TrafficSplit({"classifier": {"1": 90, "2": 10}}, seed=7)
    assert [seeded.choose("classifier") for _ in range(100)] != seq  # the seed shifts the sequence
    assert TrafficSplit({"classifier": {"1": 90, "2": 10}}, seed=7).pick("classifier", 93) == split.pick(
        "classifier", 100
    )


@settings(max_examples=60, deadline=None)
@given(
    weights=st.dictionaries(st.sampled_from(["1", "2", "3", "2-rc1", "10"]), st.integers(0, 100), min_size=1),
    seed=st.integers(0, 2**32),
    start=st.integers(0, 10**9),
    n=st.integers(1, 2000),
)
def test_split_shares_stay_within_a_few_requests_of_the_weights(
    weights: dict[str, int], seed: int, start: int, n: int
) -> None:
    split = TrafficSplit({"m": weights}, seed=seed)
    total = sum(weights.values())
    counts: dict[str | None, int] = {}
    for i in range(start, start + n):
        v = split.pick("m", i)
        counts[v] = counts.get(v, 0) + 1
    if total == 0:
        assert counts == {None: n}
        return
    for version, weight in weights.items():
        assert abs(counts.get(version, 0) - n * weight / total) <= 3 + math.log2(n) / 4, (version, counts)
        if weight == 0:
            assert version not in counts


def test_split_without_weights_and_bad_weights() -> None:
    split = TrafficSplit({"m": {"1": 0, "2": 0}})
    assert split.choose("m") is None and split.choose("unknown") is None
    with pytest.raises(ValueError):
        split.set_weights({"m": {"1": -1}})
    split.set_weights({"m": {"2": 5}})
    assert split.choose("m") == "2" and split.weights == {"m": {"2": 5}}


# --- persistence ----------------------------------------------------------------------------


def test_persisted_assignment_round_trips_without_status() -> None:
    obj = edge_node(entry(), entry("mlp"), generation=7, memoryBudgetBytes=GIB)
    text = encode_persisted(obj, NOW)
    assert text == encode_persisted(json.loads(json.dumps(obj)), NOW)  # same object, same bytes
    back = decode_persisted(text, "node-a")
    assert "status" not in back and "loadedModels" not in text
    assert back["metadata"] == {"name": "node-a", "generation": 7, "resourceVersion": "42"}
    assert parse_edge_node(back) == parse_edge_node(obj)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"kind": "Other"}',
        '{"kind": "PersistedAssignment", "format": 99}',
        '{"kind": "PersistedAssignment", "format": 1, "metadata": {"name": "node-a"}}',
    ],
)
def test_a_corrupt_persisted_file_is_refused(text: str) -> None:
    with pytest.raises(InvalidAssignment):
        decode_persisted(text, "node-a")


def test_a_persisted_file_of_another_node_is_refused() -> None:
    with pytest.raises(InvalidAssignment, match="node-b"):
        decode_persisted(encode_persisted(edge_node(entry()), NOW), "node-b")


# --- status ---------------------------------------------------------------------------------

CPU = GpuReading("cpu", 2 * GIB, GIB // 2, GIB + GIB // 2)


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
    window = {"p50LatencyMs": 1.23456, "p95LatencyMs": 4.0, "p99LatencyMs": 9.0, "throughputRps": 50.0}
    sla = {C1: {**window, "errorRate": 0.0, "requests": 3000, "windowSeconds": 60, "met": True, "bogus": 1}}
    gpu = GpuReading("Orin", 8 * GIB, 3 * GIB, 5 * GIB, 55.04, 83.0, False, (), 12.3, 0.42)
    status = build_status(inputs(a, records, sla=sla, gpu=gpu))
    check_schema(status, status_schema())
    assert conditions(status) == {
        "Ready": ("True", "AllModelsReady"),
        "MemoryPressure": ("False", "WithinBudget"),
        "ThermalThrottling": ("False", "Normal"),
        "SLAViolated": ("False", "NoViolation"),
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
    assert m1["sla"]["p50LatencyMs"] == 1.235 and "bogus" not in m1["sla"] and m1["sla"]["met"] is True
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
    hot = GpuReading("Orin", 8 * GIB, GIB, 7 * GIB, 90.0, 83.0, True, ("hw_thermal_slowdown",))
    sla = {MLP: {"p95LatencyMs": 80.0, "met": False}}
    status = build_status(inputs(a, records, gpu=hot, sla=sla))
    check_schema(status, status_schema())
    assert conditions(status) == {
        "Ready": ("False", "ModelFailed"),
        "MemoryPressure": ("True", "InsufficientMemory"),
        "ThermalThrottling": ("True", "Throttled"),
        "SLAViolated": ("True", "SLAMissed"),
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
    status = build_status(inputs(a, {C1: ModelRecord("Ready", D1, 5)}, leftovers=leftover))
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
    warm = GpuReading("Orin", 8 * GIB, GIB, 7 * GIB, 84.0, 83.0, False)
    status = build_status(
        inputs(a, {C1: ModelRecord("Ready", D1, 5)}, used_bytes=1980 << 20, budget_bytes=2000 << 20, gpu=warm)
    )
    assert conditions(status)["MemoryPressure"] == ("True", "NearBudget")
    assert conditions(status)["ThermalThrottling"] == ("True", "AboveSoftLimit")
    assert conditions(build_status(inputs(a, {})))["ThermalThrottling"] == ("Unknown", "NoReading")
    assert conditions(build_status(inputs(None, {})))["Ready"] == ("False", "NoAssignment")
    drained = build_status(inputs(assignment(entry(), drain=True), {}))
    assert conditions(drained)["Ready"] == ("False", "Draining")
    assert [m["state"] for m in drained["models"]] == ["Unloading"]


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    a = assignment(entry())
    first = build_status(inputs(a, {C1: ModelRecord("Loading", D1)}, now=NOW))
    same = build_status(
        inputs(a, {C1: ModelRecord("Loading", D1)}, now=LATER, previous_conditions=first["conditions"])
    )
    assert same["conditions"] == first["conditions"] and same["heartbeatTime"] == LATER
    flipped = build_status(
        inputs(a, {C1: ModelRecord("Ready", D1, 1)}, now=LATER, previous_conditions=first["conditions"])
    )
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times["Ready"] == LATER and times["MemoryPressure"] == NOW


def test_model_record_rejects_unknown_states_and_sla_drops_junk() -> None:
    with pytest.raises(ValueError):
        ModelRecord("Running")
    assert sla_status(None) is None and sla_status({"p95LatencyMs": float("nan")}) is None
    assert sla_status({"requests": 3.0, "met": False}) == {"requests": 3, "met": False}


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


def status_for(state: str = "Ready", temp: float = 50.0, p95: float = 4.0, now: str = NOW) -> dict[str, Any]:
    a = assignment(entry())
    gpu = GpuReading("Orin", 8 * GIB, GIB, 7 * GIB, temp, 83.0, False)
    return build_status(
        inputs(
            a, {C1: ModelRecord(state, D1, 5)}, gpu=gpu, now=now, sla={C1: {"p95LatencyMs": p95, "met": True}}
        )
    )


def test_pacer_writes_state_changes_soon_measurements_later_and_heartbeats_rarely() -> None:
    pacer = StatusPacer(min_interval_s=2.0, metrics_interval_s=10.0, max_interval_s=30.0)
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


def test_pacer_bounds_the_write_rate_of_a_churning_status() -> None:
    pacer = StatusPacer(2.0, 10.0, 30.0)
    written: dict[str, Any] | None = None
    writes: list[float] = []
    for tick in range(600):  # 10 minutes at 1 s ticks, the state flapping every tick
        status = status_for("Ready" if tick % 2 else "Loading")
        if pacer.due(float(tick), written, status):
            written = status
            writes.append(float(tick))
            pacer.wrote(float(tick))
    assert min(b - a for a, b in itertools.pairwise(writes)) >= 2.0
    assert len(writes) >= 199  # and the latest state is never more than 3 s old


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
