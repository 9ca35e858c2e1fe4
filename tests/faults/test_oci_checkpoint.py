"""A site of two real agents (EdgeNode mode, API server out of reach) serving a Hugging Face
checkpoint pulled from an OCI registry on loopback (`bench.origin`, holding what `oras push`
stores: one layer per file of the folder, titled with its path).

Invariants asserted: every file a node serves hashes to its SHA256SUMS line; the registry sends
SHA256SUMS and every checkpoint file once for the whole site (a shard cut halfway resumes, the
second node takes each file from the first over the site's LAN); both nodes answer the same
greedy tokens.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.hf_checkpoints import write_checkpoint
from bench.origin import Origin, oras_manifest, registry_paths, sha256_digest
from node_agent.generation.hf_checkpoint import write_hf_model
from node_agent.link.download import ARTIFACT_ROUTE
from node_agent.runtime.checksums import CHECKSUMS_FILE, parse_checksums, verify_checksums
from node_agent.runtime.repository import sha256_file
from tests.faults.agent_process import AgentProcess, offline_edge_node

REPOSITORY = "models/chat"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    version = tmp_path_factory.mktemp("checkpoint") / "chat" / "1"
    write_checkpoint(version, "llama", seed=11, max_shard_size="100KB")
    write_hf_model(version, "chat", parameters={"kv_cache_bytes": "256Ki"})
    return version


@pytest.fixture
def registry(checkpoint: Path) -> Iterator[tuple[Origin, str, dict[str, bytes]]]:
    """(the registry, the oci:// reference, title -> bytes of every file pushed)."""
    listed = [rel for _, rel in parse_checksums((checkpoint / CHECKSUMS_FILE).read_text())]
    files = [(name, (checkpoint / name).read_bytes()) for name in (CHECKSUMS_FILE, "model.yaml", *listed)]
    manifest = oras_manifest(files, "application/vnd.edgefleet.model.huggingface")
    paths, digest = registry_paths(REPOSITORY, manifest, [data for _, data in files])
    origin = Origin(paths)
    origin.token = "t0ken"
    yield origin, f"oci://{origin.base.removeprefix('http://')}/{REPOSITORY}@{digest}", dict(files)
    origin.close()


def args(workdir: Path, uri: str, checkpoint: Path, peers: list[str]) -> list[str]:
    artifact = {
        "uri": uri,
        "digest": sha256_file(checkpoint / CHECKSUMS_FILE),
        "configDigest": sha256_file(checkpoint / "model.yaml"),
    }
    entry = {"service": "default/chat", "model": "chat", "version": "1", "artifact": artifact,
             "format": "huggingface", "task": "generate"}  # fmt: skip
    spec: dict[str, object] = {"nodeName": "edge-1", "artifactPeers": peers, "models": [entry]}
    return [
        "--model-repository", str(workdir / "models"), "--workers", "1",
        *offline_edge_node(workdir, workdir / "state", spec), "--download-backoff-max", "0.2",
    ]  # fmt: skip


def generate(agent: AgentProcess) -> list[int]:
    body = {"text_input": "hello edge", "parameters": {"max_tokens": 8, "temperature": 0, "ignore_eos": True}}
    request = urllib.request.Request(
        agent.base + "/v2/models/chat/versions/1/generate",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        answer: dict[str, Any] = json.loads(r.read())
    tokens: list[int] = answer["token_ids"]
    assert len(tokens) == 8, answer
    return tokens


def test_a_site_pulls_a_checkpoint_from_the_registry_once(
    checkpoint: Path, registry: tuple[Origin, str, dict[str, bytes]], tmp_path: Path
) -> None:
    origin, uri, files = registry
    shard = max((n for n in files if n.startswith("model-0000")), key=lambda n: len(files[n]))
    shard_path = f"v2/{REPOSITORY}/blobs/{sha256_digest(files[shard])}"
    origin.cuts, origin.cut_only = [len(files[shard]) // 2], shard_path  # the uplink drops halfway
    first = AgentProcess(args(tmp_path / "a", uri, checkpoint, []), tmp_path / "a.log")
    second = None
    try:
        first.wait_ready(90)
        tokens = generate(first)
        verify_checksums(tmp_path / "a" / "models" / "chat" / "1" / CHECKSUMS_FILE)
        gets = [(r, s) for p, r, s in origin.log.requests if p == shard_path]
        assert gets == [(None, 200), (f"bytes={len(files[shard]) // 2}-", 206)], gets  # resumed

        # The first node serves each checkpoint file to its peers, by digest.
        status, data = first.get(ARTIFACT_ROUTE + sha256_digest(files["config.json"]).removeprefix("sha256:"))
        assert status == 200 and data == files["config.json"]

        second = AgentProcess(args(tmp_path / "b", uri, checkpoint, [first.base]), tmp_path / "b.log")
        second.wait_ready(90)
        assert generate(second) == tokens
        verify_checksums(tmp_path / "b" / "models" / "chat" / "1" / CHECKSUMS_FILE)
        sent = origin.log.sent_by_path
        for name, data in files.items():
            if name != "model.yaml":  # model.yaml comes from the origin, as beside an https artifact
                path = f"v2/{REPOSITORY}/blobs/{sha256_digest(data)}"
                assert sent[path] == len(data), f"{name}: the registry sent {sent[path]} bytes of {len(data)}"
    finally:
        if second is not None:
            second.stop()
        first.stop()
