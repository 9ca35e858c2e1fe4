"""The node cache: `choose_evictions` (pure: the exact eviction order), `NodeCache` on real files
(atomic put, verified place, GC to the budget) and `materialize` through it (a second repository
is filled from the cache with the origin gone)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from edgefleet_api.edge_node import ModelAssignment
from edgefleet_api.model_spec import Artifact
from node_agent.errors import InvalidModel
from node_agent.link.artifacts import materialize
from node_agent.link.node_cache import BlobInfo, NodeCache, choose_evictions, hex_of
from node_agent.runtime.model_yaml import parse_model_config
from node_agent.runtime.repository import ModelRepository, sha256_file


def d(n: int) -> str:
    return "sha256:" + f"{n:064x}"


def blob(n: int, size: int, used: float, links: int = 1) -> BlobInfo:
    return BlobInfo(d(n), size, used, links)


# --- the pure choice ------------------------------------------------------------------------------


def test_evictions_go_least_recently_used_first_until_the_budget_holds() -> None:
    blobs = [blob(1, 40, used=30.0), blob(2, 40, used=10.0), blob(3, 40, used=20.0), blob(4, 40, used=5.0)]
    assert choose_evictions(blobs, budget_bytes=160, in_use=set()) == []
    assert choose_evictions(blobs, budget_bytes=120, in_use=set()) == [d(4)]
    assert choose_evictions(blobs, budget_bytes=79, in_use=set()) == [d(4), d(2), d(3)]
    assert choose_evictions(blobs, budget_bytes=0, in_use=set()) == [d(4), d(2), d(3), d(1)]


def test_evictions_never_take_a_blob_in_use_or_held_by_a_version_folder() -> None:
    blobs = [blob(1, 50, used=1.0), blob(2, 50, used=2.0, links=2), blob(3, 50, used=3.0)]
    # blob 1 is assigned, blob 2 is linked from a version folder: only blob 3 may go
    assert choose_evictions(blobs, budget_bytes=0, in_use={d(1)}) == [d(3)]
    # over budget with nothing that may go: a value (nothing), not an error
    assert choose_evictions(blobs, budget_bytes=0, in_use={d(1), d(3)}) == []


def test_eviction_ties_are_deterministic_and_a_negative_budget_is_misuse() -> None:
    blobs = [blob(2, 10, used=1.0), blob(1, 10, used=1.0), blob(3, 30, used=1.0)]
    assert choose_evictions(blobs, budget_bytes=25, in_use=set()) == [d(3)]  # the larger first
    assert choose_evictions(blobs, budget_bytes=5, in_use=set()) == [d(3), d(1), d(2)]
    with pytest.raises(ValueError):
        choose_evictions(blobs, budget_bytes=-1, in_use=set())
    with pytest.raises(ValueError):
        hex_of("md5:abc")


# --- the store on real files ------------------------------------------------------------------------


def write_blob(folder: Path, name: str, data: bytes) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path, "sha256:" + hashlib.sha256(data).hexdigest()


def test_put_links_a_verified_file_and_place_hands_out_verified_blobs(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache")
    cache.open()
    source, digest = write_blob(tmp_path / "v1", "model.pt", b"weights" * 1000)
    cache.put(source, digest, "config: 1\n")
    stored = cache.blob_path(digest)
    assert stored.name == hex_of(digest) and os.path.samefile(stored, source)  # a hard link
    assert cache.config_text(digest) == "config: 1\n"
    assert not list(cache.blobs_dir.glob(".*"))  # no temp file left

    target = tmp_path / "v2" / "model.pt"
    assert cache.place(digest, target)
    assert target.read_bytes() == source.read_bytes()

    with open(stored, "r+b") as f:  # rot on disk: the blob no longer matches its name
        f.write(b"X")
    other = tmp_path / "v3" / "model.pt"
    assert not cache.place(digest, other)
    assert not other.exists() and not cache.has(digest), "a rotten blob is dropped, never handed out"
    assert not cache.place(d(7), tmp_path / "v4" / "model.pt")  # not in the cache


def test_put_copies_across_filesystems_and_refuses_bytes_that_are_not_their_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    cache = NodeCache(tmp_path / "cache")
    source, digest = write_blob(tmp_path / "v1", "model.pt", b"abc" * 100)
    cache.put(source, digest)
    assert cache.blob_path(digest).read_bytes() == source.read_bytes()
    assert not os.path.samefile(cache.blob_path(digest), source)
    liar, _ = write_blob(tmp_path / "v2", "model.pt", b"not those bytes")
    with pytest.raises(ValueError):
        cache.put(liar, d(9))
    assert not cache.has(d(9)) and not list(cache.blobs_dir.glob(".*.tmp"))


def test_open_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache")
    cache.open()
    leftover = cache.blobs_dir / f".{hex_of(d(1))}.abc.tmp"
    leftover.write_bytes(b"half")
    assert cache.open() == [leftover] and not leftover.exists()


def test_gc_keeps_the_budget_least_recently_used_first_and_never_an_assigned_blob(tmp_path: Path) -> None:
    now = [1000.0]
    assigned: set[str] = set()
    cache = NodeCache(tmp_path / "cache", budget_bytes=250, in_use=lambda: assigned, clock=lambda: now[0])
    digests = []
    for i in range(3):
        src, digest = write_blob(tmp_path / f"src{i}", "m.pt", bytes([i]) * 100)
        now[0] += 10
        cache.put(src, digest)
        src.unlink()  # only the cache holds it now (one link)
        digests.append(digest)
    # 300 bytes > 250: the oldest (0) went when the third came in
    assert [cache.has(x) for x in digests] == [False, True, True]
    now[0] += 10
    assert cache.place(digests[1], tmp_path / "placed" / "m.pt")  # used again: now the newest
    (tmp_path / "placed" / "m.pt").unlink()
    assigned.add(digests[2])
    src, digest3 = write_blob(tmp_path / "src3", "m.pt", b"z" * 100)
    now[0] += 10
    cache.put(src, digest3)
    src.unlink()
    # 300 > 250: blob 2 (last used at +30) is the least recently used, but assigned: it stays,
    # and blob 1 (used at +40) goes
    assert [cache.has(x) for x in (digests[1], digests[2], digest3)] == [False, True, True]
    assert sum(b.size_bytes for b in cache.usage()) <= 250


# --- materialize through the cache --------------------------------------------------------------------


def entry(model: str, version: str, digest: str, uri: str) -> ModelAssignment:
    return ModelAssignment("default/classify", model, version, Artifact(uri, digest))


def test_a_second_repository_is_filled_from_the_cache_with_the_source_gone(
    example_repo: Path, tmp_path: Path
) -> None:
    origin = tmp_path / "origin"
    (origin / "classifier").mkdir(parents=True)
    shutil.copytree(example_repo / "classifier" / "1", origin / "classifier" / "1")
    d1 = parse_model_config(origin / "classifier" / "1" / "model.yaml").digest
    uri = f"file://{origin}/classifier/1/model.pt"
    cache = NodeCache(tmp_path / "cache")
    first = ModelRepository(tmp_path / "agent-a" / "models")
    config = materialize(first, entry("classifier", "1", d1, uri), cache=cache)
    assert cache.has(d1) and os.path.samefile(cache.blob_path(d1), first.artifact_path(config))

    shutil.rmtree(origin)  # the origin is gone (a node cut off from it)
    with pytest.raises(InvalidModel):
        materialize(ModelRepository(tmp_path / "no-cache" / "models"), entry("classifier", "1", d1, uri))
    second = ModelRepository(tmp_path / "agent-b" / "models")
    placed = materialize(second, entry("classifier", "1", d1, uri), cache=cache)
    assert placed.digest == d1 and placed.inputs == config.inputs
    assert sha256_file(second.artifact_path(placed)) == d1
    assert os.path.samefile(second.artifact_path(placed), cache.blob_path(d1))
    assert parse_model_config(second.version_dir(placed.id) / "model.yaml").digest == d1


def test_a_model_yaml_is_kept_per_config_digest_and_goes_with_its_blob(tmp_path: Path) -> None:
    """A blob served with model.yaml files of different spec digests (`configDigest`) keeps each
    under its own: a version is never placed with a model.yaml derived from another spec's."""
    cache = NodeCache(tmp_path / "cache", budget_bytes=0)
    source, digest = write_blob(tmp_path / "v1", "model.pt", b"w" * 64)
    cache.put(source, digest, "signature: a\n", config_digest=d(5))
    cache.put(source, digest, "signature: b\n", config_digest=d(6))
    assert cache.config_text(digest) is None  # none stored without a config digest
    assert (cache.config_text(digest, d(5)), cache.config_text(digest, d(6))) == (
        "signature: a\n",
        "signature: b\n",
    )
    source.unlink()  # the version folder lets go: the blob is evictable, and over a budget of 0
    assert cache.collect() == [digest]
    assert not cache.has(digest) and not list(cache.meta_dir.iterdir()), "its model.yaml files go with it"
