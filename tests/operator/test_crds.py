"""The API against a real kube-apiserver: CRDs install, examples validate, bad
objects are rejected with messages that name the field, printer columns show."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefleet_api import names
from edgefleet_api.inference_service import InferenceServiceSpec

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))
DIGEST = "sha256:" + "ab" * 32


def valid_service(name: str = "svc") -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.INFERENCE_SERVICE_KIND,
        "metadata": {"name": name},
        "spec": {
            "models": [
                {
                    "name": "classifier",
                    "version": "1",
                    "artifact": {"uri": "repo://classifier/1/model.pt", "digest": DIGEST},
                    "inputs": [{"name": "image", "datatype": "FP32", "shape": [3, 64, 64]}],
                    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}],
                }
            ],
            "batching": {"maxBatchSize": 8},
            "sla": {"p95LatencyMs": 20, "p99LatencyMs": 40},
            # Matches no node: an operator running in other tests must not place these.
            "placement": {"nodeSelector": {"edgefleet.io/test": "api-only"}},
            "rollout": {"waves": [{"percent": 10}, {"percent": 50}, {"percent": 100}], "analysis": {}},
        },
    }


@pytest.fixture(scope="module")
def dry_run_namespace(kube: Any) -> Any:
    """One namespace for the dry-run tests of this module (nothing is stored in it)."""
    from kubernetes import client

    name = f"t-crds-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(kube).create_namespace({"metadata": {"name": name}})
    yield name
    client.CoreV1Api(kube).delete_namespace(name)


def custom(kube: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(kube)


def create(kube: Any, namespace: str, body: dict[str, Any], dry_run: bool = True) -> dict[str, Any]:
    kwargs = {"dry_run": "All"} if dry_run else {}
    return custom(kube).create_namespaced_custom_object(  # type: ignore[no-any-return]
        names.GROUP,
        names.VERSION,
        namespace,
        names.INFERENCE_SERVICE_PLURAL,
        body,
        field_validation="Strict",
        **kwargs,
    )


def test_crds_are_established(control_plane: Any, kube: Any) -> None:
    from kubernetes import client

    ext = client.ApiextensionsV1Api(kube)
    for plural in (names.INFERENCE_SERVICE_PLURAL, names.EDGE_NODE_PLURAL):
        crd = ext.read_custom_resource_definition(f"{plural}.{names.GROUP}")
        conditions = {c.type: c.status for c in crd.status.conditions}
        assert conditions.get("Established") == "True", conditions
        assert conditions.get("NamesAccepted") == "True", conditions
        assert names.CATEGORY in crd.spec.names.categories
        assert "isvc" not in (crd.spec.names.short_names or [])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_passes_server_side_dry_run(control_plane: Any, dry_run_namespace: str, path: Path) -> None:
    from e2e.cluster import kubectl

    out = kubectl(
        control_plane,
        "apply",
        "-n",
        dry_run_namespace,
        "--dry-run=server",
        "--validate=strict",
        "-f",
        str(path),
    )
    assert "(server dry run)" in out.stdout


def test_there_are_the_four_kinds_of_example() -> None:
    specs = [yaml.safe_load(p.read_text())["spec"] for p in EXAMPLES]
    assert len(EXAMPLES) >= 4
    assert any(len(s["models"]) > 1 for s in specs), "a multi-model example"
    assert any(m.get("task") == "generate" for s in specs for m in s["models"]), "an LLM example"
    assert any("waves" in s.get("rollout", {}) for s in specs), "a canary example"
    assert any(m["inputs"][0]["shape"] == [3, 64, 64] for s in specs for m in s["models"]), "an image one"


def test_valid_service_gets_defaults(kube: Any, namespace: str) -> None:
    created = create(kube, namespace, valid_service(), dry_run=False)
    model = created["spec"]["models"][0]
    assert model["priority"] == "normal"
    assert model["format"] == "torchscript"
    assert model["pinned"] is False
    assert created["spec"]["batching"]["adaptive"] is True
    assert created["spec"]["batching"]["maxQueueDelayMs"] == 5
    rollout = created["spec"]["rollout"]
    assert rollout["strategy"] == "Canary"
    assert [w["trafficWeight"] for w in rollout["waves"]] == [100, 100, 100]
    assert rollout["analysis"]["intervalSeconds"] == 60
    assert rollout["analysis"]["minSamples"] == 100
    assert rollout["siteLabel"] == "edgefleet.io/site" and rollout["keepStablePerSite"] == 1
    assert "maxNodesPerMinute" not in rollout


def test_a_ladder_by_place_is_accepted(kube: Any, namespace: str) -> None:
    """One node, then one site, then a quarter of the sites, then every node, paced."""
    obj = valid_service()
    ladder = [{"count": 1}, {"sites": 1}, {"sitePercent": 25}, {"percent": 100}]
    obj["spec"]["rollout"].update(waves=ladder, maxNodesPerMinute=20, siteLabel="example.com/store")
    created = create(kube, namespace, obj, dry_run=True)
    rollout = created["spec"]["rollout"]
    assert [{k: v for k, v in w.items() if k != "trafficWeight"} for w in rollout["waves"]] == ladder
    assert rollout["maxNodesPerMinute"] == 20 and rollout["siteLabel"] == "example.com/store"
    spec = InferenceServiceSpec.from_obj(created["spec"])
    assert spec.rollout is not None and spec.rollout.waves is not None
    assert [w.by_site for w in spec.rollout.waves] == [False, True, True, False]


Mutation = Callable[[dict[str, Any]], None]


def set_path(path: str, value: Any) -> Mutation:
    """spec.a.b[0].c = value, creating dicts on the way."""

    def mutate(obj: dict[str, Any]) -> None:
        cur: Any = obj
        parts = path.replace("]", "").replace("[", ".").split(".")
        for part in parts[:-1]:
            key: Any = int(part) if part.isdigit() else part
            if isinstance(cur, dict) and key not in cur:
                cur[key] = {}
            cur = cur[key]
        last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
        cur[last] = value

    return mutate


def drop_path(path: str) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        cur: Any = obj
        parts = path.replace("]", "").replace("[", ".").split(".")
        for part in parts[:-1]:
            cur = cur[int(part) if part.isdigit() else part]
        del cur[parts[-1]]

    return mutate


def duplicate_model(obj: dict[str, Any]) -> None:
    obj["spec"]["models"].append(copy.deepcopy(obj["spec"]["models"][0]))


def waves(*ws: dict[str, Any]) -> Mutation:
    return set_path("spec.rollout.waves", list(ws))


# (id, mutation, substrings the apiserver's message must contain: the field, and why)
INVALID: list[tuple[str, Mutation, tuple[str, ...]]] = [
    (
        "bad-digest",
        set_path("spec.models[0].artifact.digest", "sha256:abc"),
        ("spec.models[0].artifact.digest",),
    ),
    (
        "digest-uppercase-hex",
        set_path("spec.models[0].artifact.digest", "sha256:" + "AB" * 32),
        ("spec.models[0].artifact.digest",),
    ),
    (
        "negative-batch-size",
        set_path("spec.batching.maxBatchSize", -1),
        ("spec.batching.maxBatchSize", "greater than or equal to 1"),
    ),
    (
        "p95-above-p99",
        set_path("spec.sla.p95LatencyMs", 50),
        ("spec.sla.p95LatencyMs", "must not exceed p99LatencyMs"),
    ),
    ("duplicate-model-names", duplicate_model, ("spec.models[1]", "Duplicate value")),
    ("unknown-rollout-field", set_path("spec.rollout.canaryz", 5), ('unknown field "spec.rollout.canaryz"',)),
    ("unknown-spec-field", set_path("spec.modelz", []), ('unknown field "spec.modelz"',)),
    (
        "weight-above-100",
        waves({"percent": 10, "trafficWeight": 150}),
        ("spec.rollout.waves[0].trafficWeight", "less than or equal to 100"),
    ),
    (
        "waves-not-rising",
        waves({"percent": 50}, {"percent": 25}),
        ("spec.rollout.waves", "wave percents must rise strictly"),
    ),
    ("wave-percent-zero", waves({"percent": 0}), ("spec.rollout.waves[0].percent",)),
    (
        "wave-percent-and-count",
        waves({"percent": 10, "count": 2}),
        ("spec.rollout.waves[0]", "exactly one of percent, count, sites or sitePercent"),
    ),
    (
        "wave-sites-and-percent",
        waves({"sites": 1, "percent": 50}),
        ("spec.rollout.waves[0]", "exactly one of percent, count, sites or sitePercent"),
    ),
    ("wave-site-percent-above-100", waves({"sitePercent": 101}), ("spec.rollout.waves[0].sitePercent",)),
    ("pace-zero", set_path("spec.rollout.maxNodesPerMinute", 0), ("spec.rollout.maxNodesPerMinute",)),
    ("empty-site-label", set_path("spec.rollout.siteLabel", ""), ("spec.rollout.siteLabel",)),
    (
        "waves-mixed-units",
        waves({"count": 2}, {"percent": 50}),
        ("spec.rollout.waves", "all use percent or all use count, unless some wave picks sites"),
    ),
    (
        "weights-falling",
        waves({"percent": 10, "trafficWeight": 50}, {"percent": 50, "trafficWeight": 20}),
        ("spec.rollout.waves", "trafficWeights must not fall"),
    ),
    (
        "replicas-and-fraction",
        set_path("spec.placement", {"replicas": 2, "nodeFraction": 0.5}),
        ("spec.placement.nodeFraction", "mutually exclusive"),
    ),
    ("fraction-zero", set_path("spec.placement.nodeFraction", 0), ("spec.placement.nodeFraction",)),
    ("no-models", set_path("spec.models", []), ("spec.models",)),
    ("uppercase-model-name", set_path("spec.models[0].name", "Classifier"), ("spec.models[0].name",)),
    (
        "unknown-format",
        set_path("spec.models[0].format", "pickle"),
        ("spec.models[0].format", "Unsupported value"),
    ),
    ("unknown-priority", set_path("spec.models[0].priority", "urgent"), ("spec.models[0].priority",)),
    (
        "bad-datatype",
        set_path("spec.models[0].inputs[0].datatype", "FLOAT"),
        ("spec.models[0].inputs[0].datatype",),
    ),
    (
        "shape-below-minus-one",
        set_path("spec.models[0].inputs[0].shape", [-2, 64]),
        ("spec.models[0].inputs[0].shape[0]",),
    ),
    (
        "shape-zero",
        set_path("spec.models[0].inputs[0].shape", [0]),
        ("spec.models[0].inputs[0].shape", "-1 (dynamic) or positive"),
    ),
    (
        "missing-artifact-uri",
        drop_path("spec.models[0].artifact.uri"),
        ("spec.models[0].artifact.uri", "Required"),
    ),
    (
        "bad-uri-scheme",
        set_path("spec.models[0].artifact.uri", "ftp://host/model.pt"),
        ("spec.models[0].artifact.uri",),
    ),
    # No agent fetches from these: refused at admission, not accepted and failing on the node.
    *[
        (
            f"{scheme}-uri-scheme",
            set_path("spec.models[0].artifact.uri", f"{scheme}://bucket/model.pt"),
            ("spec.models[0].artifact.uri", "should match"),
        )
        for scheme in ("s3", "gs", "pvc")
    ],
    (
        "oci-tag-reference",
        set_path("spec.models[0].artifact.uri", "oci://registry.example/models/classifier:v1"),
        ("spec.models[0].artifact.uri", "should match"),
    ),
    (
        "onnx-format",
        set_path("spec.models[0].format", "onnx"),
        ("spec.models[0].format", "Unsupported value"),
    ),
    (
        "bad-config-digest",
        set_path("spec.models[0].artifact.configDigest", "md5:abc"),
        ("spec.models[0].artifact.configDigest",),
    ),
    ("error-rate-above-one", set_path("spec.sla.maxErrorRate", 1.5), ("spec.sla.maxErrorRate",)),
    (
        "min-samples-zero",
        set_path("spec.rollout.analysis.minSamples", 0),
        ("spec.rollout.analysis.minSamples",),
    ),
    (
        "negative-queue-delay",
        set_path("spec.batching.maxQueueDelayMs", -1),
        ("spec.batching.maxQueueDelayMs",),
    ),
    (
        "bad-memory-estimate",
        set_path("spec.models[0].memoryEstimate", "lots"),
        ("spec.models[0].memoryEstimate",),
    ),
    (
        "toleration-exists-with-value",
        set_path("spec.placement.tolerations", [{"key": "k", "operator": "Exists", "value": "v"}]),
        ("spec.placement.tolerations[0].value", "must be empty"),
    ),
    (
        "toleration-equal-without-key",
        set_path("spec.placement.tolerations", [{"operator": "Equal", "value": "v"}]),
        ("spec.placement.tolerations[0].key", "key is required"),
    ),
    ("unknown-strategy", set_path("spec.rollout.strategy", "BlueGreen"), ("spec.rollout.strategy",)),
    (
        "analysis-p95-above-p99",
        set_path("spec.rollout.analysis", {"maxP95LatencyMs": 90, "maxP99LatencyMs": 60}),
        ("spec.rollout.analysis.maxP95LatencyMs", "must not exceed"),
    ),
]


@pytest.mark.parametrize(("case", "mutate", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_service_is_rejected_naming_the_field(
    kube: Any, dry_run_namespace: str, case: str, mutate: Mutation, expected: tuple[str, ...]
) -> None:
    from kubernetes.client.exceptions import ApiException

    body = valid_service(f"bad-{case}")
    mutate(body)
    with pytest.raises(ApiException) as err:
        create(kube, dry_run_namespace, body)
    assert err.value.status in (400, 422), err.value.body
    message = json.loads(err.value.body)["message"]
    for text in expected:
        assert text in message, f"{text!r} not in {message}"


def test_kubectl_get_shows_printer_columns(kube: Any, namespace: str, kubectl: Any) -> None:
    create(kube, namespace, valid_service("shown"), dry_run=False)
    custom(kube).patch_namespaced_custom_object_status(
        names.GROUP,
        names.VERSION,
        namespace,
        names.INFERENCE_SERVICE_PLURAL,
        "shown",
        {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "AllNodesReady",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }
                ],
                "nodesSummary": "3/4",
                "servingVersion": "1",
                "sla": {"p95LatencyMs": 12.5},
                "rollout": {"step": "wave 2/3 (50%)"},
            }
        },
    )
    out = kubectl("get", "efis", "shown").stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "READY", "NODES", "VERSION", "P95-MS", "ROLLOUT", "AGE"]
    assert row.split()[:5] == ["shown", "True", "3/4", "1", "12.5"]
    assert "wave 2/3 (50%)" in row
    # The category lists it with everything else of ours.
    assert "inferenceservice.edgefleet.io/shown" in kubectl("get", "edgefleet", "-o", "name").stdout


def test_status_is_a_subresource(kube: Any, namespace: str) -> None:
    created = create(kube, namespace, valid_service("sub"), dry_run=False)
    created["status"] = {"servingVersion": "9"}
    updated = custom(kube).replace_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.INFERENCE_SERVICE_PLURAL, "sub", created
    )
    assert "servingVersion" not in updated.get("status", {}), "status must only change via /status"


def test_kubectl_explain_describes_fields(kubectl: Any) -> None:
    out = kubectl("explain", "inferenceservices.spec.rollout").stdout
    assert "Manual control" in out and "paused" in out and "waves" in out
    out = kubectl("explain", "edgenodes.status.gpu").stdout
    assert "memoryFreeBytes" in out


def edge_node(name: str) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.EDGE_NODE_KIND,
        "metadata": {"name": name},
        "spec": {
            "nodeName": name,
            "models": [
                {
                    "service": "default/svc",
                    "model": "classifier",
                    "version": "1",
                    "artifact": {"uri": "repo://classifier/1/model.pt", "digest": DIGEST},
                    "trafficWeight": 100,
                }
            ],
        },
    }


def test_edge_node_is_cluster_scoped_and_node_name_immutable(kube: Any) -> None:
    from kubernetes.client.exceptions import ApiException

    co = custom(kube)
    name = "en-immutable-test"
    co.create_cluster_custom_object(
        names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, edge_node(name), field_validation="Strict"
    )
    try:
        obj = co.get_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name)
        assert obj["spec"]["models"][0]["preload"] is True
        with pytest.raises(ApiException) as err:
            co.patch_cluster_custom_object(
                names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name, {"spec": {"nodeName": "elsewhere"}}
            )
        message = json.loads(err.value.body)["message"]
        assert "spec.nodeName" in message and "immutable" in message
        # The agent's status write validates too: a bad digest is refused.
        with pytest.raises(ApiException) as err:
            co.patch_cluster_custom_object_status(
                names.GROUP,
                names.VERSION,
                names.EDGE_NODE_PLURAL,
                name,
                {"status": {"models": [{"model": "classifier", "digest": "md5:xyz"}]}},
            )
        assert "status.models[0].digest" in json.loads(err.value.body)["message"]
    finally:
        co.delete_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name)


def test_edge_node_artifact_peers_are_base_urls_and_bounded(kube: Any) -> None:
    """spec.artifactPeers: http(s) base URLs, at most MAX_ARTIFACT_PEERS."""
    from kubernetes.client.exceptions import ApiException

    from edgefleet_api.edge_node import MAX_ARTIFACT_PEERS

    co = custom(kube)
    name = "en-peers-test"
    body = edge_node(name)
    body["spec"]["artifactPeers"] = ["http://10.0.0.2:8000", "https://edge-3.site:8443"]
    co.create_cluster_custom_object(
        names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, body, field_validation="Strict"
    )
    try:
        obj = co.get_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name)
        assert obj["spec"]["artifactPeers"] == ["http://10.0.0.2:8000", "https://edge-3.site:8443"]
        for peers, field in (
            (["ftp://10.0.0.2/"], "spec.artifactPeers[0]"),
            ([f"http://10.0.0.{i}:8000" for i in range(MAX_ARTIFACT_PEERS + 1)], "spec.artifactPeers"),
        ):
            with pytest.raises(ApiException) as err:
                co.patch_cluster_custom_object(
                    names.GROUP,
                    names.VERSION,
                    names.EDGE_NODE_PLURAL,
                    name,
                    {"spec": {"artifactPeers": peers}},
                )
            assert field in json.loads(err.value.body)["message"]
    finally:
        co.delete_cluster_custom_object(names.GROUP, names.VERSION, names.EDGE_NODE_PLURAL, name)
