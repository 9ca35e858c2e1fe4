"""The agent's side of the EdgeNode contract, pure: artifact URIs, spec -> assignment (merged
versions, conflicts, traffic weights) and the effective config of an entry."""

from __future__ import annotations

from typing import Any

import pytest
from edge_node_specs import C1, D1, D2, D3, assignment, entry

from edgefleet_api.edge_node import ModelAssignment
from edgefleet_api.model_spec import Artifact, Batching
from edgefleet_api.sla import SlaObjectives
from edgefleet_api.types import Priority
from node_agent.errors import InvalidModel
from node_agent.link.assignment import (
    InvalidAssignment,
    UnsupportedArtifact,
    desired_versions,
    effective_config,
    parse_artifact_uri,
    parse_edge_node,
    traffic_weights,
)
from node_agent.types import ModelConfig, TensorSpec


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


@pytest.mark.parametrize("scheme", ["s3", "gs", "pvc"])  # oci:// is pulled (`link.oci`)
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
    assert m == ModelAssignment(
        service="default/cls",
        model="mlp",
        version="1",
        artifact=Artifact("repo://mlp/1/model.pt", D1),
        traffic_weight=30,
        memory_budget_bytes=64 << 20,
        priority=Priority.CRITICAL,
        pinned=True,
        preload=False,
        batching=Batching(max_batch_size=16, max_queue_delay_s=0.004, adaptive=True),
        sla=SlaObjectives(0.02, 0.05, max_error_rate=0.01, min_throughput_rps=5.0, window_s=30),
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
    assert m.batching is None and m.sla is None and m.memory_budget_bytes is None


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
    assert cfg.memory_estimate_bytes == 64 << 20
    assert cfg.inputs == base_config().inputs  # the signature is model.yaml's
    assert cfg.sla == SlaObjectives(0.015, 0.04, max_error_rate=0.02, window_s=120)
    assert cfg.parameters == {}  # the objectives are typed, not strings in parameters
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
