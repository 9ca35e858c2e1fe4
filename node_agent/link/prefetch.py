"""Ahead-of-time fetches (EdgeNode spec.prefetch): the versions a rollout takes this node to next
are fetched and verified into the node cache, not loaded, so that when they are assigned their
version folder is placed from the cache (a hard link) and the wave's analysis waits for no
download.

`pending` (pure) picks what to fetch; `prefetch_one` fetches one (blocking: the link runs it on
its thread pool) through `materialize` into a scratch repository whose version folder is removed
once the cache holds the blob: the cache keeps its own copy (a hard link), nothing is loaded.
Invariant: only verified bytes (the spec's digest) ever reach the cache.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable
from pathlib import Path
from typing import Any

from edgefleet_api.edge_node import ModelAssignment
from edgefleet_api.types import ModelId
from node_agent.errors import AgentError
from node_agent.link.artifacts import materialize
from node_agent.link.assignment import Assignment
from node_agent.link.connection import LinkStats
from node_agent.link.download import Delivery
from node_agent.link.node_cache import NodeCache
from node_agent.runtime.repository import ModelRepository


def pending(
    entries: Iterable[ModelAssignment],
    assigned: Collection[ModelId],
    cached: Callable[[ModelAssignment], bool],
    failed_recently: Collection[str] = (),
) -> list[ModelAssignment]:
    """The entries to fetch now, in order: not assigned (the link prepares those itself), not in
    the cache, not failed recently (by digest); one per digest."""
    out, seen = [], set()
    for e in entries:
        digest = e.artifact.digest
        if e.id in assigned or digest in seen or digest in failed_recently or cached(e):
            continue
        seen.add(digest)
        out.append(e)
    return out


def in_cache(cache: NodeCache, entry: ModelAssignment) -> bool:
    """Whether `cache` holds what placing `entry` needs: its blob and its model.yaml."""
    digest, config_digest = entry.artifact.digest, entry.artifact.config_digest
    return cache.has(digest) and cache.meta_path(digest, config_digest).is_file()


def prefetch_one(entry: ModelAssignment, scratch: Path, delivery: Delivery | None, cache: NodeCache) -> None:
    """Fetch `entry` into `cache` (verified); `scratch` is a folder the link owns. Raises what
    `materialize` raises."""
    repository = ModelRepository(scratch)
    try:
        materialize(repository, entry, delivery, cache)
    finally:
        shutil.rmtree(repository.version_dir(entry.id), ignore_errors=True)


log = logging.getLogger(__name__)


class Prefetcher:
    """The link's fetches ahead: `start(assignment, spawn)` after each reconcile pass (assigned
    work first) fetches what is pending, one at a time on the link's threads (`run`); a failed
    one is retried after `retry_s`."""

    def __init__(
        self,
        cache: NodeCache,
        run: Callable[..., Awaitable[Any]],
        delivery: Delivery | None,
        scratch: Path,
        current: Callable[[], Assignment | None],
        clock: Callable[[], float],
        retry_s: float,
        stats: LinkStats,
    ) -> None:
        self.cache, self._run, self.delivery, self.scratch = cache, run, delivery, scratch
        self._current, self._clock, self.retry_s, self.stats = current, clock, retry_s, stats
        self._running = False
        self._failed: dict[str, float] = {}
        """digest -> when fetching it last failed."""

    def start(self, assignment: Assignment, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        if self._running or not assignment.spec.prefetch:
            return
        now = self._clock()
        failed = {d for d, at in self._failed.items() if now - at < self.retry_s}
        assigned = {m.id for m in assignment.models}
        todo = pending(assignment.spec.prefetch, assigned, lambda e: in_cache(self.cache, e), failed)
        if todo:
            self._running = True
            spawn(self._fetch(todo))

    async def _fetch(self, entries: list[ModelAssignment]) -> None:
        try:
            for entry in entries:
                current = self._current()
                if current is None or entry not in current.spec.prefetch:
                    continue  # the spec moved on
                try:
                    await self._run(prefetch_one, entry, self.scratch, self.delivery, self.cache)
                except (AgentError, OSError, ValueError) as e:
                    self._failed[entry.artifact.digest] = self._clock()
                    log.warning("prefetching %s failed: %s", entry.id, e)
                    continue
                self.stats.prefetched += 1
                log.info("prefetched %s (%s) into the node cache", entry.id, entry.artifact.digest)
        finally:
            self._running = False
