"""`oci://` Hugging Face checkpoint folders (issue 19) against a registry on loopback
(`bench.origin` serving what `oras push` stores, with the anonymous Bearer token flow): one
manifest whose layers are the folder's files, each titled with its path; SHA256SUMS is the
artifact, and every file it lists is pulled by its digest, verified, resumed after a cut, and
laid out as the backend reads it. Hostile manifests are refused whole, before any listed file."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.hf_checkpoints import write_checkpoint
from bench.origin import Origin, oras_manifest, registry_paths, sha256_digest
from edgefleet_api.edge_node import ModelAssignment
from edgefleet_api.model_spec import Artifact
from node_agent.errors import DigestMismatch, InvalidModel
from node_agent.generation.hf_checkpoint import HFCheckpointBackend, write_hf_model
from node_agent.link.artifacts import materialize
from node_agent.link.download import Delivery, DeliverySettings, RetryPolicy
from node_agent.link.node_cache import NodeCache
from node_agent.link.oci import MAX_LAYERS, Registry, check_title, parse_oci
from node_agent.link.prefetch import in_cache, prefetch_one
from node_agent.runtime.checksums import CHECKSUMS_FILE, parse_checksums, verify_checksums
from node_agent.runtime.repository import ModelRepository, sha256_file

QUICK = Delivery(DeliverySettings(retry=RetryPolicy(attempts=2, initial_s=0.01, max_s=0.02)))
REPOSITORY = "models/chat"
HF_TYPE = "application/vnd.edgefleet.model.huggingface"
Files = list[tuple[str, bytes]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded Llama checkpoint with a file in a subfolder (as downloads have: original/),
    made a model version (SHA256SUMS, model.yaml)."""
    version = tmp_path_factory.mktemp("checkpoint") / "chat" / "1"
    write_checkpoint(version, "llama", seed=7, max_shard_size="100KB")
    (version / "original").mkdir()
    (version / "original" / "params.json").write_text('{"dim": 64}\n')
    write_hf_model(version, "chat", parameters={"kv_cache_bytes": "256Ki"})
    return version


def pushed(version: Path) -> Files:
    """What `cd <version> && oras push <ref> SHA256SUMS model.yaml $(cut -c67- SHA256SUMS)`
    (docs/huggingface_checkpoints.md) pushes: (title, bytes) per layer."""
    cut = subprocess.run(["cut", "-c67-", CHECKSUMS_FILE], cwd=version, capture_output=True, check=True)
    listed = cut.stdout.decode().split()
    assert listed == [rel for _, rel in parse_checksums((version / CHECKSUMS_FILE).read_text())]
    return [(name, (version / name).read_bytes()) for name in (CHECKSUMS_FILE, "model.yaml", *listed)]


def serve(files: Files, edit: Callable[[dict[str, Any]], None] | None = None) -> tuple[Origin, str]:
    """A registry holding `files` as one ORAS artifact (its manifest changed by `edit`): the
    origin and the artifact's oci:// reference."""
    manifest = oras_manifest(files, HF_TYPE)
    if edit is not None:
        edit(manifest)
    paths, digest = registry_paths(REPOSITORY, manifest, [data for _, data in files])
    origin = Origin(paths)
    origin.token = "t0ken"
    return origin, f"oci://{origin.base.removeprefix('http://')}/{REPOSITORY}@{digest}"


@pytest.fixture
def registry() -> Iterator[Callable[..., tuple[Origin, str]]]:
    started: list[Origin] = []

    def start(files: Files, edit: Callable[[dict[str, Any]], None] | None = None) -> tuple[Origin, str]:
        origin, uri = serve(files, edit)
        started.append(origin)
        return origin, uri

    yield start
    for origin in started:
        origin.close()


def entry(version: Path, uri: str) -> ModelAssignment:
    artifact = Artifact(uri, sha256_file(version / CHECKSUMS_FILE), sha256_file(version / "model.yaml"))
    return ModelAssignment("shop/chat", "chat", "1", artifact, format="huggingface", task="generate")


def blob_path(data: bytes) -> str:
    return f"v2/{REPOSITORY}/blobs/{sha256_digest(data)}"


def test_a_checkpoint_is_pulled_file_by_file_verified_resumed_and_loads(
    checkpoint: Path, registry: Callable[..., tuple[Origin, str]], tmp_path: Path
) -> None:
    files = pushed(checkpoint)
    extra = ("README.md", b"# pushed too, but SHA256SUMS does not list it\n")
    origin, uri = registry([*files, extra])
    shard_name, shard = max(files[2:], key=lambda f: len(f[1]))
    assert shard_name.startswith("model-0000") and len(shard) > 50_000
    origin.cuts, origin.cut_only = [len(shard) // 2], blob_path(shard)
    repo = ModelRepository(tmp_path / "models")
    config = materialize(repo, entry(checkpoint, uri), QUICK)
    version = repo.version_dir(config.id)

    assert (config.format, config.artifact, config.digest) == (
        "huggingface", CHECKSUMS_FILE, sha256_file(checkpoint / CHECKSUMS_FILE)
    )  # fmt: skip
    verify_checksums(version / CHECKSUMS_FILE)  # every listed file there, each the digest its line says
    assert (version / "original" / "params.json").read_bytes() == (
        checkpoint / "original/params.json"
    ).read_bytes()
    assert not (version / "README.md").exists()  # a layer SHA256SUMS does not list is not fetched
    requests = origin.log.requests
    assert requests[0][2] == 401 and ("token", None, 200) in requests  # the anonymous token flow
    assert blob_path(extra[1]) not in {p for p, _, _ in requests}
    shard_gets = [(r, s) for p, r, s in requests if p == blob_path(shard)]
    assert shard_gets == [(None, 200), (f"bytes={len(shard) // 2}-", 206)]  # the cut shard resumed
    backend = HFCheckpointBackend.load(config, version, "cpu")
    assert backend.model is not None and backend.model.config.n_layers > 0

    origin.close()  # everything is there: no registry needed (an agent restarted offline)
    assert materialize(repo, entry(checkpoint, uri), QUICK) == config


def test_the_node_cache_holds_the_checkpoint_as_it_holds_other_artifacts(
    checkpoint: Path, registry: Callable[..., tuple[Origin, str]], tmp_path: Path
) -> None:
    files = pushed(checkpoint)
    origin, uri = registry(files)
    cache = NodeCache(tmp_path / "cache")
    first = materialize(ModelRepository(tmp_path / "a"), entry(checkpoint, uri), QUICK, cache)
    assert all(cache.has(sha256_digest(data)) for name, data in files if name != "model.yaml")
    assert len({p for p, _, s in origin.log.requests if "/blobs/" in p and s == 200}) == len(files)
    origin.close()  # a second repository (a replaced Pod, a version re-assigned): all from the cache
    second_repo = ModelRepository(tmp_path / "b")
    second = materialize(second_repo, entry(checkpoint, uri), QUICK, cache)
    assert second == first
    version = second_repo.version_dir(second.id)
    verify_checksums(version / CHECKSUMS_FILE)
    shard = next(name for name, _ in files if name.startswith("model-0000"))
    assert (version / shard).stat().st_ino == cache.blob_path(
        sha256_digest((version / shard).read_bytes())
    ).stat().st_ino


def test_a_prefetched_checkpoint_is_placed_without_the_registry(
    checkpoint: Path, registry: Callable[..., tuple[Origin, str]], tmp_path: Path
) -> None:
    origin, uri = registry(pushed(checkpoint))
    cache = NodeCache(tmp_path / "cache")
    prefetch_one(entry(checkpoint, uri), tmp_path / "scratch", QUICK, cache)  # spec.prefetch, no load
    assert in_cache(cache, entry(checkpoint, uri))
    assert not (tmp_path / "scratch" / "chat" / "1").exists()
    origin.close()  # the wave reaches the node: its checkpoint comes from the cache alone
    repo = ModelRepository(tmp_path / "models")
    config = materialize(repo, entry(checkpoint, uri), QUICK, cache)
    verify_checksums(repo.artifact_path(config))


def add_layer(title: str, data: bytes = b"x") -> Callable[[Files], Files]:
    return lambda files: [*files, (title, data)]


@pytest.mark.parametrize(
    "title", ["../escape", "/tmp/edgefleet-escape", "original/../../escape", "a\\b", "./config.json", "a//b"]
)
def test_a_title_that_leaves_the_folder_refuses_the_whole_manifest(
    checkpoint: Path, registry: Callable[..., tuple[Origin, str]], tmp_path: Path, title: str
) -> None:
    origin, uri = registry([*pushed(checkpoint), (title, b"owned")])
    repo = ModelRepository(tmp_path / "models")
    with pytest.raises(InvalidModel, match="not a relative path inside the artifact's folder"):
        materialize(repo, entry(checkpoint, uri), QUICK)
    assert [p for p, _, _ in origin.log.requests if "/blobs/" in p] == []  # refused before any blob
    assert not (tmp_path / "escape").exists() and not Path("/tmp/edgefleet-escape").exists()


def listed_paths(origin: Origin) -> set[str]:
    return {p for p, _, _ in origin.log.requests if "/blobs/" in p}


def test_a_manifest_that_does_not_match_sha256sums_is_refused_before_any_listed_file(
    checkpoint: Path, registry: Callable[..., tuple[Origin, str]], tmp_path: Path
) -> None:
    files = pushed(checkpoint)
    sums, config = blob_path(files[0][1]), blob_path(files[1][1])
    repo = ModelRepository(tmp_path / "models")

    shard = next(i for i, (name, _) in enumerate(files) if name.startswith("model-0000"))
    origin, uri = registry(files[:shard] + files[shard + 1 :])  # a listed file not pushed
    with pytest.raises(InvalidModel, match=rf"SHA256SUMS lists 1 file.*{files[shard][0]}.*oras push"):
        materialize(repo, entry(checkpoint, uri), QUICK)
    assert listed_paths(origin) <= {sums, config}

    names = [name for name, _ in files]
    a, b = names.index("config.json"), names.index("tokenizer.json")
    swapped = list(files)
    swapped[a], swapped[b] = (files[a][0], files[b][1]), (files[b][0], files[a][1])
    origin, uri = registry(swapped)  # titles on the wrong blobs
    with pytest.raises(DigestMismatch, match="but SHA256SUMS says"):
        materialize(repo, entry(checkpoint, uri), QUICK)
    assert listed_paths(origin) <= {sums, config}

    origin, uri = registry([*files, ("config.json", b"{}")])  # two layers, one title
    with pytest.raises(InvalidModel, match=r"two layers titled 'config\.json'"):
        materialize(repo, entry(checkpoint, uri), QUICK)
    assert listed_paths(origin) == set()
    assert not (repo.root / "chat" / "1" / "config.json").exists()


def test_a_blob_longer_than_its_layer_says_is_not_read_past_it(
    checkpoint: Path, registry: Callable[..., tuple[Origin, str]], tmp_path: Path
) -> None:
    files = pushed(checkpoint)
    name, shard = max(files[2:], key=lambda f: len(f[1]))
    origin, uri = registry(files)
    origin.files[blob_path(shard)] = shard + b"\0" * (1 << 20)  # a registry streaming more
    repo = ModelRepository(tmp_path / "models")
    with pytest.raises(InvalidModel, match=f"more than the {len(shard)} bytes expected"):
        materialize(repo, entry(checkpoint, uri), QUICK)
    folder = repo.root / "chat" / "1"
    assert not (folder / name).exists()
    assert all(p.stat().st_size <= len(shard) for p in folder.glob(f"{name}*"))


def too_many_layers(manifest: dict[str, Any]) -> None:
    empty = {"mediaType": "application/octet-stream", "digest": sha256_digest(b""), "size": 0}
    manifest["layers"] += [empty] * MAX_LAYERS


def negative_size(manifest: dict[str, Any]) -> None:
    manifest["layers"][-1]["size"] = -1


def text_size(manifest: dict[str, Any]) -> None:
    manifest["layers"][-1]["size"] = "12"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (too_many_layers, f"more than {MAX_LAYERS}; refusing it"),
        (negative_size, "has size -1, not a count of bytes"),
        (text_size, "has size '12', not a count of bytes"),
    ],
)
def test_an_oversize_or_malformed_manifest_is_refused(
    checkpoint: Path,
    registry: Callable[..., tuple[Origin, str]],
    tmp_path: Path,
    edit: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    origin, uri = registry(pushed(checkpoint), edit)
    with pytest.raises(InvalidModel, match=message):
        materialize(ModelRepository(tmp_path / "models"), entry(checkpoint, uri), QUICK)
    assert listed_paths(origin) == set()


def test_the_manifest_bench_origin_serves_is_what_oras_push_writes() -> None:
    manifest = oras_manifest([("SHA256SUMS", b"a"), ("original/params.json", b"{}")], HF_TYPE)
    assert manifest["artifactType"] == HF_TYPE and manifest["config"]["size"] == 2
    titles = [layer["annotations"]["org.opencontainers.image.title"] for layer in manifest["layers"]]
    assert titles == ["SHA256SUMS", "original/params.json"]
    paths, digest = registry_paths(REPOSITORY, manifest, [b"a", b"{}"])
    assert json.loads(paths[f"v2/{REPOSITORY}/manifests/{digest}"]) == manifest


@pytest.mark.parametrize("title", ["SHA256SUMS", "original/params.json", "model-00001-of-00002.safetensors"])
def test_titles_inside_the_folder_pass(title: str) -> None:
    check_title(title, "m")


@pytest.mark.parametrize("title", ["..", ".", "a/", "a\nb", "/abs", "x/../y", "a" * 1025])
def test_titles_outside_the_folder_or_odd_are_refused(title: str) -> None:
    with pytest.raises(InvalidModel, match="not a relative path"):
        check_title(title, "m")


def test_the_pull_token_is_renewed_when_it_is_due(
    checkpoint: Path, registry: Callable[..., tuple[Origin, str]]
) -> None:
    origin, uri = registry(pushed(checkpoint))
    origin.token_expires_in = 300
    now = [0.0]
    pull = Registry(parse_oci(uri), 5.0, clock=lambda: now[0])
    pull.manifest("chat")
    tokens = lambda: sum(1 for p, _, _ in origin.log.requests if p == "token")  # noqa: E731
    assert tokens() == 1 and pull.fresh_headers("chat")["Authorization"] == "Bearer t0ken"
    origin.token = "t1"  # the registry's next token
    now[0] = 260.0  # not yet due: renewed 30 s before the 300 s are over
    assert pull.fresh_headers("chat")["Authorization"] == "Bearer t0ken" and tokens() == 1
    now[0] = 275.0
    assert pull.fresh_headers("chat")["Authorization"] == "Bearer t1" and tokens() == 2
    assert pull.fresh_headers("chat")["Authorization"] == "Bearer t1" and tokens() == 2  # not due again
