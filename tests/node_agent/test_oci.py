"""`oci://` artifacts against a registry on loopback (`bench.origin` serving the registry HTTP
API v2 paths, with the anonymous Bearer token flow): the manifest by its digest, the model and
its model.yaml as blobs by theirs, verified; a real TorchScript model from the examples."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.origin import Origin
from edgefleet_api.edge_node import ModelAssignment
from edgefleet_api.model_spec import Artifact
from node_agent.errors import DigestMismatch, InvalidModel
from node_agent.link.artifacts import materialize
from node_agent.link.download import Delivery, DeliverySettings, RetryPolicy
from node_agent.link.oci import MANIFEST_TYPES, TITLE, parse_oci
from node_agent.runtime.repository import ModelRepository, sha256_file

QUICK = Delivery(DeliverySettings(retry=RetryPolicy(attempts=2, initial_s=0.01, max_s=0.02)))


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def registry(example_repo: Path) -> Iterator[tuple[Origin, str, str, str]]:
    """A registry holding classifier/1 as an ORAS artifact: (origin, manifest digest, artifact
    digest, model.yaml digest)."""
    model = (example_repo / "classifier" / "1" / "model.pt").read_bytes()
    config = (example_repo / "classifier" / "1" / "model.yaml").read_bytes()
    empty = b"{}"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPES[0],
        "artifactType": "application/vnd.edgefleet.model",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(empty), "size": 2},
        "layers": [
            {"mediaType": "application/octet-stream", "digest": sha(model), "size": len(model),
             "annotations": {TITLE: "model.pt"}},
            {"mediaType": "application/yaml", "digest": sha(config), "size": len(config),
             "annotations": {TITLE: "model.yaml"}},
        ],
    }).encode()  # fmt: skip
    base = "v2/models/classifier"
    origin = Origin({
        f"{base}/manifests/{sha(manifest)}": manifest,
        f"{base}/blobs/{sha(model)}": model,
        f"{base}/blobs/{sha(config)}": config,
    })  # fmt: skip
    origin.token = "t0ken"
    yield origin, sha(manifest), sha(model), sha(config)
    origin.close()


def entry(uri: str, digest: str, config: str | None) -> ModelAssignment:
    return ModelAssignment("default/c", "classifier", "1", Artifact(uri, digest, config))


def test_an_oci_artifact_is_pulled_by_digest_verified_and_resumed(
    registry: tuple[Origin, str, str, str], tmp_path: Path, example_repo: Path
) -> None:
    origin, manifest, model, config = registry
    uri = f"oci://{origin.base.removeprefix('http://')}/models/classifier@{manifest}"
    size = (example_repo / "classifier" / "1" / "model.pt").stat().st_size
    origin.cuts, origin.cut_only = [size // 2], f"v2/models/classifier/blobs/{model}"
    repo = ModelRepository(tmp_path / "models")
    got = materialize(repo, entry(uri, model, config), QUICK)
    assert (got.name, got.version, got.digest, got.artifact) == ("classifier", "1", model, "model.pt")
    assert sha256_file(repo.artifact_path(got)) == model
    paths = [(p, r, s) for p, r, s in origin.log.requests]
    assert (f"v2/models/classifier/manifests/{manifest}", None, 401) == paths[0]  # then the token
    assert ("token", None, 200) in paths
    blob = [(r, s) for p, r, s in paths if p.endswith(model.removeprefix("sha256:"))]
    assert blob == [(None, 200), (f"bytes={size // 2}-", 206)]  # a cut blob resumes with Range
    # already there: no registry needed (an agent restarted offline)
    origin.close()
    assert materialize(repo, entry(uri, model, config), QUICK).digest == model


def test_what_the_manifest_does_not_vouch_for_is_refused(
    registry: tuple[Origin, str, str, str], tmp_path: Path
) -> None:
    origin, manifest, model, config = registry
    host = origin.base.removeprefix("http://")
    repo = ModelRepository(tmp_path / "models")
    with pytest.raises(InvalidModel, match="no configDigest"):
        materialize(repo, entry(f"oci://{host}/models/classifier@{manifest}", model, None), QUICK)
    other = "sha256:" + "1" * 64
    with pytest.raises(InvalidModel, match="lists no layer"):
        materialize(repo, entry(f"oci://{host}/models/classifier@{manifest}", other, config), QUICK)
    origin.files[f"v2/models/classifier/manifests/{other}"] = b'{"layers": []}'
    with pytest.raises(DigestMismatch, match="manifest"):
        materialize(repo, entry(f"oci://{host}/models/classifier@{other}", model, config), QUICK)
    with pytest.raises(InvalidModel, match="tags are refused"):
        materialize(repo, entry(f"oci://{host}/models/classifier:latest", model, config), QUICK)
    assert not (tmp_path / "models" / "classifier" / "1" / "model.pt").exists()


def test_references_parse_to_the_registry_api() -> None:
    digest = "sha256:" + "a" * 64
    ref = parse_oci(f"oci://ghcr.io/acme/models/classifier@{digest}")
    assert ref.blob_url(digest) == f"https://ghcr.io/v2/acme/models/classifier/blobs/{digest}"
    assert parse_oci(f"oci://localhost:5000/m@{digest}").base == "http://localhost:5000/v2/m"
