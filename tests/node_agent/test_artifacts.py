"""`materialize`: artifact URIs (repo://, file://, http://) into the model repository, on real
files and a real HTTP server, verified against the spec's digest; `write_atomic`."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from edgefleet_api.edge_node import ModelAssignment
from edgefleet_api.model_spec import Artifact
from node_agent.errors import DigestMismatch, InvalidModel
from node_agent.link.artifacts import materialize
from node_agent.link.assignment import UnsupportedArtifact
from node_agent.link.download import Delivery, DeliverySettings, RetryPolicy
from node_agent.runtime.model_yaml import parse_model_config
from node_agent.runtime.repository import ModelRepository, sha256_file

SERVICE = "default/classify"


def digest(root: Path, model: str, version: str) -> str:
    return parse_model_config(root / model / version / "model.yaml").digest


def desired(model: str, version: str, digest_: str, uri: str, config: str | None = None) -> ModelAssignment:
    return ModelAssignment(SERVICE, model, version, Artifact(uri, digest_, config))


def config_digest(root: Path, model: str, version: str) -> str:
    return sha256_file(root / model / version / "model.yaml")


QUICK = Delivery(DeliverySettings(retry=RetryPolicy(attempts=2, initial_s=0.01, max_s=0.02)))
"""Retries that keep a test short."""


class ModelServer:
    """A model repository served over HTTP on 127.0.0.1 (http.server), counting requests."""

    def __init__(self, root: Path) -> None:
        import functools
        import http.server

        self.paths: list[str] = []
        paths = self.paths

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                paths.append(self.path)
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_materialize_downloads_http_artifacts_verified(example_repo: Path, tmp_path: Path) -> None:
    """https:// or http://: the artifact and the model.yaml beside it are downloaded into
    the version folder, the artifact hashed as it streams in, the model.yaml checked against
    configDigest; a second pass downloads nothing; wrong bytes, a missing file or a dead
    server fail with what went wrong, and leave nothing under the artifact's name."""
    server = ModelServer(example_repo)
    try:
        repo = ModelRepository(tmp_path / "models")
        d1 = digest(example_repo, "classifier", "1")
        c1 = config_digest(example_repo, "classifier", "1")
        url = f"{server.base}/classifier/1/model.pt"
        with pytest.raises(InvalidModel, match="no configDigest"):
            materialize(repo, desired("classifier", "1", d1, url))
        with pytest.raises(DigestMismatch, match="configDigest"):
            materialize(repo, desired("classifier", "1", d1, url, "sha256:" + "0" * 64))
        assert not (tmp_path / "models" / "classifier" / "1" / "model.yaml").exists()  # never unverified
        (tmp_path / "models" / "classifier" / "1" / "model.pt").unlink()  # (verified: it was kept)
        server.paths.clear()
        config = materialize(repo, desired("classifier", "1", d1, url, c1))
        assert (config.name, config.version, config.digest) == ("classifier", "1", d1)
        assert config.artifact == "model.pt"
        assert sha256_file(repo.artifact_path(config)) == d1
        assert config.inputs == parse_model_config(example_repo / "classifier" / "1" / "model.yaml").inputs
        assert sorted(server.paths) == ["/classifier/1/model.pt", "/classifier/1/model.yaml"]
        materialize(repo, desired("classifier", "1", d1, url, c1))
        assert len(server.paths) == 2  # present with its digest: not fetched again

        mlp_config = config_digest(example_repo, "mlp", "1")
        with pytest.raises(DigestMismatch, match="refusing to load it"):
            materialize(repo, desired("mlp", "1", d1, f"{server.base}/mlp/1/model.pt", mlp_config), QUICK)
        assert not any(
            p.suffix in (".pt", ".tmp", ".part") for p in (tmp_path / "models" / "mlp" / "1").glob("*")
        )
        with pytest.raises(InvalidModel, match="HTTP 404"):
            materialize(repo, desired("detector", "1", d1, f"{server.base}/detector/1/model.pt", c1), QUICK)
    finally:
        server.close()
    with pytest.raises(InvalidModel, match=r"fetching .* failed"):
        materialize(repo, desired("classifier", "2", d1, f"{server.base}/classifier/2/model.pt", c1), QUICK)


def test_materialize_uses_repo_artifacts_in_place(example_repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(example_repo, root)
    repo = ModelRepository(root)
    yaml_before = (root / "classifier" / "1" / "model.yaml").read_bytes()
    d1 = digest(root, "classifier", "1")
    for uri in ("repo://classifier/1/model.pt", "repo://classifier/1"):
        config = materialize(repo, desired("classifier", "1", d1, uri))
        assert (config.name, config.version, config.digest, config.artifact) == (
            "classifier",
            "1",
            d1,
            "model.pt",
        )
        assert config.inputs == repo.config("classifier", "1").inputs
    assert (root / "classifier" / "1" / "model.yaml").read_bytes() == yaml_before  # left alone
    repo.load(config, "cpu").unload()  # the repository's own digest check agrees


def test_materialize_copies_file_and_foreign_repo_artifacts(example_repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(example_repo / "classifier", root / "classifier")
    repo = ModelRepository(root)
    d_mlp = digest(example_repo, "mlp", "1")
    config = materialize(repo, desired("mlp", "1", d_mlp, f"file://{example_repo}/mlp/1/model.pt"))
    assert sha256_file(root / "mlp" / "1" / "model.pt") == d_mlp
    assert repo.config("mlp", "1") == config  # model.yaml written with the effective config
    # repo:// naming another folder: copied under the spec's name and version
    d2 = digest(root, "classifier", "2")
    canary = materialize(repo, desired("classifier-canary", "7", d2, "repo://classifier/2/model.pt"))
    assert (canary.name, canary.version) == ("classifier-canary", "7")
    assert sha256_file(root / "classifier-canary" / "7" / "model.pt") == d2
    assert repo.config("classifier-canary", "7").inputs == repo.config("classifier", "2").inputs


def test_materialize_refuses_wrong_digests_unknown_schemes_and_missing_signatures(
    example_repo: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    shutil.copytree(example_repo / "classifier", root / "classifier")
    repo = ModelRepository(root)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatch, match=r"requires sha256:0+; refusing"):
        materialize(repo, desired("classifier", "1", wrong, "repo://classifier/1/model.pt"))
    with pytest.raises(DigestMismatch):
        materialize(repo, desired("mlp", "1", wrong, f"file://{example_repo}/mlp/1/model.pt"))
    assert not (root / "mlp" / "1" / "model.pt").exists()  # bad bytes never land
    assert not list((root / "mlp" / "1").glob(".*.tmp"))
    with pytest.raises(UnsupportedArtifact, match="unsupported artifact scheme 's3'"):
        materialize(repo, desired("mlp", "1", wrong, "s3://bucket/mlp/1/model.pt"))
    lone = tmp_path / "lone" / "model.pt"
    lone.parent.mkdir()
    shutil.copy(example_repo / "mlp" / "1" / "model.pt", lone)
    with pytest.raises(InvalidModel, match=r"no model\.yaml"):
        materialize(repo, desired("lone", "1", sha256_file(lone), f"file://{lone}"))
    with pytest.raises(InvalidModel, match="not found"):
        materialize(repo, desired("mlp", "1", wrong, f"file://{tmp_path}/nowhere/model.pt"))
    with pytest.raises(InvalidModel, match="outside"):
        (root / "escape").symlink_to(tmp_path)
        materialize(repo, desired("mlp", "1", wrong, "repo://escape/lone/model.pt"))


def test_persisted_file_is_plain_json(tmp_path: Path) -> None:
    from node_agent.link.durable import write_atomic

    path = tmp_path / "state" / "a.json"
    write_atomic(path, json.dumps({"a": 1}))
    write_atomic(path, json.dumps({"a": 2}))
    assert json.loads(path.read_text()) == {"a": 2} and [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_a_download_cut_mid_transfer_leaves_nothing_under_its_name(
    example_repo: Path, tmp_path: Path
) -> None:
    """The connection drops halfway through the artifact, every time: an error naming the URL
    once the retries are spent, no artifact and no model.yaml in the version folder; only the
    partial download (`model.pt.part`, kept to resume from), never under the artifact's name."""
    import http.server

    data = (example_repo / "mlp" / "1" / "model.pt").read_bytes()
    config = (example_repo / "mlp" / "1" / "model.yaml").read_bytes()

    class Cut(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.endswith("model.yaml"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(config)))
                self.end_headers()
                self.wfile.write(config)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cut)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        repo = ModelRepository(tmp_path / "models")
        url = f"http://127.0.0.1:{httpd.server_address[1]}/mlp/1/model.pt"
        entry = desired(
            "mlp", "1", digest(example_repo, "mlp", "1"), url, config_digest(example_repo, "mlp", "1")
        )
        with pytest.raises(
            InvalidModel, match=r"fetching .*model\.pt failed: (the transfer stopped|cut after)"
        ):
            materialize(repo, entry, QUICK)
    finally:
        httpd.shutdown()
        httpd.server_close()
    folder = tmp_path / "models" / "mlp" / "1"
    assert [p.name for p in folder.iterdir()] == ["model.pt.part"]
