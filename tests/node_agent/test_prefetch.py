"""Fetching a rollout's next versions ahead (EdgeNode spec.prefetch): the pure choice, a real fetch
into a real node cache (verified, nothing loaded, the scratch folder gone), and the link's
prefetcher that fetches each once and retries a failure later."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from edgefleet_api.edge_node import EdgeNodeSpec, ModelAssignment
from edgefleet_api.model_spec import Artifact
from node_agent.link.artifacts import materialize
from node_agent.link.assignment import Assignment
from node_agent.link.connection import LinkStats
from node_agent.link.node_cache import NodeCache
from node_agent.link.prefetch import Prefetcher, in_cache, pending, prefetch_one
from node_agent.runtime.model_yaml import parse_model_config
from node_agent.runtime.repository import ModelRepository


def entry(version: str, digest: str, uri: str = "https://origin/m.pt") -> ModelAssignment:
    return ModelAssignment("shop/cam", "classifier", version, Artifact(uri, digest))


D = {v: "sha256:" + v * 64 for v in "123"}


def test_pending_skips_assigned_cached_failed_and_repeated_digests() -> None:
    twin = ModelAssignment("other/svc", "classifier", "3", Artifact("https://x/m.pt", D["3"]))
    wanted = [entry("1", D["1"]), entry("2", D["2"]), entry("3", D["3"]), twin]
    assigned = {entry("1", D["1"]).id}
    assert pending(wanted, assigned, lambda e: False) == [wanted[1], wanted[2]]
    assert pending(wanted, assigned, lambda e: e.version == "2") == [wanted[2]]
    assert pending(wanted, (), lambda e: False, failed_recently={D["1"], D["3"]}) == [wanted[1]]


def origin_copy(example_repo: Path, tmp_path: Path) -> tuple[str, str]:
    origin = tmp_path / "origin" / "classifier"
    shutil.copytree(example_repo / "classifier" / "1", origin / "1")
    digest = parse_model_config(origin / "1" / "model.yaml").digest
    return digest, f"file://{origin}/1/model.pt"


def test_a_prefetched_version_is_placed_from_the_cache_when_assigned(
    example_repo: Path, tmp_path: Path
) -> None:
    digest, uri = origin_copy(example_repo, tmp_path)
    cache = NodeCache(tmp_path / "cache")
    ahead = entry("2", digest, uri)
    assert not in_cache(cache, ahead)
    prefetch_one(ahead, tmp_path / "scratch", None, cache)
    assert in_cache(cache, ahead) and not (tmp_path / "scratch" / "classifier" / "2").exists()
    shutil.rmtree(tmp_path / "origin")  # the link to the origin is gone when the wave starts
    repo = ModelRepository(tmp_path / "models")
    config = materialize(repo, ahead, cache=cache)
    assert os.path.samefile(repo.artifact_path(config), cache.blob_path(digest))


def test_the_prefetcher_fetches_once_and_retries_a_failure_later(example_repo: Path, tmp_path: Path) -> None:
    digest, uri = origin_copy(example_repo, tmp_path)
    good, bad = entry("2", digest, uri), entry("3", D["3"], f"file://{tmp_path}/nowhere/model.pt")
    assignment = Assignment("n1", 1, EdgeNodeSpec("n1", prefetch=(good, bad)))
    cache, stats, now = NodeCache(tmp_path / "cache"), LinkStats(), [0.0]

    async def run(fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(fn, *args)

    async def main() -> None:
        p = Prefetcher(
            cache, run, None, tmp_path / "scratch", lambda: assignment, lambda: now[0], 30.0, stats
        )
        tasks: list[asyncio.Task[None]] = []
        for t in (0.0, 10.0, 31.0):
            now[0] = t
            p.start(assignment, lambda c: tasks.append(asyncio.ensure_future(c)))
            await asyncio.gather(*tasks)
        assert in_cache(cache, good) and not in_cache(cache, bad)

    asyncio.run(main())
    assert stats.prefetched == 1  # fetched once; the bad one tried at 0 and again after 30 s only
