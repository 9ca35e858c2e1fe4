"""A Hugging Face checkpoint folder as an artifact an agent fetches (issue 19): the manifest
(`SHA256SUMS`) pinned by the spec's digest, every file it lists fetched from beside it and
verified by its own line; a tampered file never takes its name."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.hf_checkpoints import write_checkpoint
from edgefleet_api.edge_node import ModelAssignment
from edgefleet_api.model_spec import Artifact
from node_agent.errors import DigestMismatch
from node_agent.generation.hf_checkpoint import load_hf_model, write_hf_model
from node_agent.link.artifacts import materialize
from node_agent.runtime.checksums import CHECKSUMS_FILE, parse_checksums, verify_checksums
from node_agent.runtime.repository import ModelRepository, sha256_file


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(root: Path) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A sharded Llama checkpoint made a model version under an HTTP origin's root: (root, URL)."""
    root = tmp_path_factory.mktemp("origin")
    version = root / "chat" / "1"
    write_checkpoint(version, "llama", seed=5, max_shard_size="100KB")
    write_hf_model(version, "chat", parameters={"kv_cache_bytes": "256Ki"})
    server = serve(root)
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def entry(root: Path, url: str) -> ModelAssignment:
    version = root / "chat" / "1"
    artifact = Artifact(
        f"{url}/chat/1/{CHECKSUMS_FILE}",
        sha256_file(version / CHECKSUMS_FILE),
        sha256_file(version / "model.yaml"),
    )
    return ModelAssignment("shop/chat", "chat", "1", artifact, format="huggingface", task="generate")


def test_every_listed_file_is_fetched_and_verified(origin: tuple[Path, str], tmp_path: Path) -> None:
    root, url = origin
    listed = parse_checksums((root / "chat" / "1" / CHECKSUMS_FILE).read_text())
    assert len(listed) >= 5 and any("model-0000" in rel for _, rel in listed)  # shards, tokenizer, config
    repo = ModelRepository(tmp_path / "models")
    config = materialize(repo, entry(root, url))
    version = repo.version_dir(config.id)
    verify_checksums(version / CHECKSUMS_FILE)  # every file there, each the digest its line says
    model, tokenizer = load_hf_model(version)
    assert model.config.vocab_size > 0 and tokenizer.encode("hello")
    again = materialize(repo, entry(root, url))  # all there already: nothing fetched, same config
    assert again == config


def test_a_tampered_file_is_refused_and_never_takes_its_name(
    origin: tuple[Path, str], tmp_path: Path
) -> None:
    root, _ = origin
    bad_root = tmp_path / "bad-origin"
    shutil.copytree(root, bad_root)
    served = bad_root / "chat" / "1"
    victim = next(
        rel for _, rel in parse_checksums((served / CHECKSUMS_FILE).read_text()) if rel.endswith(".json")
    )
    (served / victim).write_text((served / victim).read_text() + " ")
    server = serve(bad_root)
    try:
        repo = ModelRepository(tmp_path / "models")
        with pytest.raises(DigestMismatch):
            materialize(repo, entry(root, f"http://127.0.0.1:{server.server_address[1]}"))
        assert not (repo.root / "chat" / "1" / victim).exists()
    finally:
        server.shutdown()
