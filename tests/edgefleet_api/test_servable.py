"""The contract admits only what an agent can serve: artifact schemes repo/file/http/https/oci
the formats an agent backend loads; an https:// artifact's model.yaml digest (configDigest) and
an EdgeNode's artifact peers are carried through."""

from __future__ import annotations

import pytest

from edgefleet_api.edge_node import EdgeNodeSpec
from edgefleet_api.model_spec import FORMATS, URI_SCHEMES, Artifact, ModelSpec
from edgefleet_api.openapi import FORMATS as CRD_FORMATS
from edgefleet_api.openapi import URI_PATTERN
from node_agent.link.assignment import SUPPORTED_SCHEMES
from node_agent.runtime.backends import FORMATS as BACKEND_FORMATS

DIGEST = "sha256:" + "ab" * 32


def model(
    uri: str = "https://models.example/m/1/model.pt", format_: str = "torchscript"
) -> dict[str, object]:
    return {"name": "m", "version": "1", "format": format_, "artifact": {"uri": uri, "digest": DIGEST}}


def test_the_crd_admits_what_the_agent_serves_and_nothing_else() -> None:
    assert set(FORMATS) == set(CRD_FORMATS) == set(BACKEND_FORMATS)
    assert set(URI_SCHEMES) == set(SUPPORTED_SCHEMES)
    assert URI_PATTERN == r"^((file|https?|repo)://\S+|oci://\S+@sha256:[a-f0-9]{64})$"


@pytest.mark.parametrize("scheme", ["s3", "gs", "pvc"])
def test_unfetchable_schemes_are_refused_with_what_is_admitted(scheme: str) -> None:
    with pytest.raises(ValueError, match=rf"scheme '{scheme}' is not one an agent fetches from \(repo://"):
        ModelSpec.from_obj(model(f"{scheme}://bucket/m/1/model.pt"))


def test_oci_takes_a_digest_reference_not_a_tag() -> None:
    uri = "oci://registry.example:5000/models/classifier@" + DIGEST
    assert ModelSpec.from_obj(model(uri)).artifact.uri == uri
    with pytest.raises(ValueError, match="oci:// takes a digest reference"):
        ModelSpec.from_obj(model("oci://registry.example/models/classifier:v1"))


def test_a_format_no_backend_serves_is_refused() -> None:
    with pytest.raises(ValueError, match="format 'onnx': no agent backend serves it"):
        ModelSpec.from_obj(model(format_="onnx"))
    assert ModelSpec.from_obj(model(format_="tinylm-npz")).format == "tinylm-npz"


def test_config_digest_and_peers_round_trip() -> None:
    obj = {"uri": "https://h/m/1/model.pt", "digest": DIGEST, "configDigest": "sha256:" + "cd" * 32}
    artifact = Artifact.from_obj(obj)
    assert artifact.config_digest == "sha256:" + "cd" * 32 and artifact.to_obj() == obj
    assert Artifact.from_obj({"uri": "repo://m/1", "digest": DIGEST}).to_obj() == {
        "uri": "repo://m/1",
        "digest": DIGEST,
    }
    with pytest.raises(ValueError, match="configDigest"):
        Artifact("https://h/m.pt", DIGEST, "sha256:nothex")
    spec = EdgeNodeSpec.from_obj({"nodeName": "n1", "artifactPeers": ["http://10.0.0.2:8000"]}, "n1")
    assert spec.artifact_peers == ("http://10.0.0.2:8000",)
    assert spec.to_obj()["artifactPeers"] == ["http://10.0.0.2:8000"]
    assert "artifactPeers" not in EdgeNodeSpec.from_obj({"nodeName": "n1"}, "n1").to_obj()
