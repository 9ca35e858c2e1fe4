"""Eviction policies: which resident models to unload so that another one fits.

Pure decision logic on identifiers, byte counts and seconds: no I/O, no torch, no
clock reads (callers pass `now`). The scheduler owns the models; a policy only
mirrors which models are resident (and how big they are) and their history.

Three policies share one interface:

- `CostAwarePolicy` (the default): evicts the model with the lowest expected
  reload cost per byte kept, i.e. the lowest
  ``decayed access frequency x reload seconds / bytes x priority weight``.
  A GreedyDual-Size-Frequency-style score whose ageing is an exponential decay
  of the access counts (measured in accesses, not seconds) instead of GDSF's
  inflation value; benchmark 4 (`bench/eviction.py`) compares the two.
- `LRUPolicy`: least recently used, the textbook baseline.
- `WeightedLRUPolicy`: the seeds' weighted LRU, ``idle_s / (weight x (uses + 1))``.

Outcomes: `choose_victims` returns None when the evictable models cannot free
enough (a capacity shortfall is a value); misuse (loading a resident model,
unloading an unknown one, negative sizes) raises ValueError; a broken invariant
is an assert.
"""

from __future__ import annotations

import abc
import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Collection, Generator
from dataclasses import dataclass

from edgefleet_api.types import ModelId, Priority

_NOTHING: frozenset[ModelId] = frozenset()


class EvictionPolicy(abc.ABC):
    """Mirrors the resident set and chooses victims.

    Invariants: the resident set is exactly the models passed to `record_load`
    and not since to `record_unload`; `choose_victims` never returns a protected
    or non-resident model, returns victims whose sizes add up to at least
    `need_bytes` (or None when the unprotected residents cannot), and does not
    change the resident set: the caller evicts, then calls `record_unload`.
    """

    def __init__(self) -> None:
        self._sizes: dict[ModelId, int] = {}

    # -- events ------------------------------------------------------------------

    @abc.abstractmethod
    def record_access(self, model_id: ModelId, now: float) -> None:
        """A request used (or asked for) `model_id`, resident or not."""

    def record_load(
        self,
        model_id: ModelId,
        size_bytes: int,
        load_seconds: float,
        priority: Priority,
        now: float,
    ) -> None:
        """`model_id` became resident, measured at `size_bytes`, after loading for `load_seconds`."""
        if model_id in self._sizes:
            raise ValueError(f"{model_id} is already resident")
        if size_bytes < 0 or load_seconds < 0:
            raise ValueError(f"negative size ({size_bytes}) or load time ({load_seconds})")
        self._sizes[model_id] = size_bytes
        self._on_load(model_id, size_bytes, load_seconds, Priority.parse(priority), now)

    def record_unload(self, model_id: ModelId) -> None:
        """`model_id` is no longer resident (evicted or unloaded); its history is kept."""
        if self._sizes.pop(model_id, None) is None:
            raise ValueError(f"{model_id} is not resident")
        self._on_unload(model_id)

    def forget(self, model_id: ModelId) -> None:
        """Drop everything known about a non-resident model (e.g. removed from the repository)."""
        if model_id in self._sizes:
            raise ValueError(f"{model_id} is resident; unload it before forgetting it")
        self._on_forget(model_id)

    # -- decisions ---------------------------------------------------------------

    def choose_victims(
        self,
        need_bytes: int,
        now: float,
        protected: Collection[ModelId] = _NOTHING,
    ) -> list[ModelId] | None:
        """Models to evict, in eviction order, to free at least `need_bytes`.

        `protected` models (pinned, or with requests in flight) are never chosen.
        [] when nothing needs freeing; None when all unprotected residents
        together hold less than `need_bytes` (then nothing should be evicted).
        Victims the plan turns out not to need (a later, larger victim freed
        enough) are dropped from it.
        """
        if need_bytes <= 0:
            return []
        chosen: list[ModelId] = []
        freed = 0
        order = self._eviction_order(now)
        try:
            for model_id in order:
                if model_id in protected:
                    continue
                chosen.append(model_id)
                freed += self._sizes[model_id]
                if freed >= need_bytes:
                    break
            else:
                return None
        finally:
            order.close()
        return self._drop_unneeded(chosen, freed, need_bytes)

    def _drop_unneeded(self, chosen: list[ModelId], freed: int, need_bytes: int) -> list[ModelId]:
        """Keep the cheapest-to-keep victims whose removal the plan can spare.

        Walks from the last (most valuable) victim back; the last one is always
        needed, since the greedy walk stopped right after it.
        """
        kept: list[ModelId] = []
        for model_id in reversed(chosen[:-1]):
            size = self._sizes[model_id]
            if freed - size >= need_bytes:
                freed -= size
            else:
                kept.append(model_id)
        kept.reverse()
        kept.append(chosen[-1])
        assert freed >= need_bytes
        return kept

    # -- views -------------------------------------------------------------------

    def resident(self) -> dict[ModelId, int]:
        """Resident model -> bytes, as recorded."""
        return dict(self._sizes)

    @property
    def resident_bytes(self) -> int:
        return sum(self._sizes.values())

    def check_invariants(self) -> None:
        assert all(size >= 0 for size in self._sizes.values())

    # -- hooks -------------------------------------------------------------------

    @abc.abstractmethod
    def _eviction_order(self, now: float) -> Generator[ModelId, None, None]:
        """Resident models, most evictable first. Closing the iterator early must leave
        the policy's state as it was."""

    @abc.abstractmethod
    def _on_load(
        self,
        model_id: ModelId,
        size_bytes: int,
        load_seconds: float,
        priority: Priority,
        now: float,
    ) -> None: ...

    def _on_unload(self, model_id: ModelId) -> None:  # noqa: B027 - optional hook
        """Hook: `model_id` left the resident set."""

    def _on_forget(self, model_id: ModelId) -> None:  # noqa: B027 - optional hook
        """Hook: drop the history of `model_id`."""


class LRUPolicy(EvictionPolicy):
    """Least recently used first. Knows nothing of models that are not resident."""

    def __init__(self) -> None:
        super().__init__()
        self._order: OrderedDict[ModelId, None] = OrderedDict()
        """Resident models, least recently used first."""

    def record_access(self, model_id: ModelId, now: float) -> None:
        if model_id in self._order:
            self._order.move_to_end(model_id)

    def _on_load(
        self,
        model_id: ModelId,
        size_bytes: int,
        load_seconds: float,
        priority: Priority,
        now: float,
    ) -> None:
        self._order[model_id] = None

    def _on_unload(self, model_id: ModelId) -> None:
        del self._order[model_id]

    def _eviction_order(self, now: float) -> Generator[ModelId, None, None]:
        yield from self._order

    def check_invariants(self) -> None:
        super().check_invariants()
        assert set(self._order) == set(self._sizes)


def seed_weight(priority: Priority) -> int:
    """The seeds' priority weight: a larger number is more important (CRITICAL 4 ... LOW 1)."""
    return 4 - int(priority)


class WeightedLRUPolicy(EvictionPolicy):
    """The seeds' weighted LRU: evict the highest ``idle_s / (weight x (uses + 1))``.

    `uses` counts every access, kept across evictions (the seed kept it in the
    model's metadata); `weight` is `seed_weight(priority)`. Ignores sizes and
    load times. Ties go to the model loaded first.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_used: dict[ModelId, float] = {}
        self._uses: dict[ModelId, int] = {}
        self._weight: dict[ModelId, int] = {}
        self._loaded_seq: dict[ModelId, int] = {}
        self._seq = itertools.count()

    def record_access(self, model_id: ModelId, now: float) -> None:
        self._last_used[model_id] = now
        self._uses[model_id] = self._uses.get(model_id, 0) + 1

    def _on_load(
        self,
        model_id: ModelId,
        size_bytes: int,
        load_seconds: float,
        priority: Priority,
        now: float,
    ) -> None:
        self._weight[model_id] = seed_weight(priority)
        self._loaded_seq[model_id] = next(self._seq)
        self._last_used.setdefault(model_id, now)

    def _on_unload(self, model_id: ModelId) -> None:
        del self._loaded_seq[model_id]

    def _on_forget(self, model_id: ModelId) -> None:
        for table in (self._last_used, self._uses, self._weight):
            table.pop(model_id, None)

    def score(self, model_id: ModelId, now: float) -> float:
        """Higher is evicted first."""
        idle_s = now - self._last_used[model_id]
        return idle_s / (self._weight[model_id] * (self._uses.get(model_id, 0) + 1))

    def _eviction_order(self, now: float) -> Generator[ModelId, None, None]:
        seq = self._loaded_seq
        yield from sorted(self._sizes, key=lambda m: (-self.score(m, now), seq[m]))


@dataclass(frozen=True, slots=True)
class CostAwareSettings:
    """Tuning of `CostAwarePolicy`; defaults chosen on benchmark 4's traces (stationary
    Zipf, abrupt and gradual popularity shifts; 20 to 500 models)."""

    half_life_per_model: float = 2.0
    """Half-life of access counts, in accesses per model seen. 2.0: long enough to rank a
    stationary Zipf popularity almost as well as perfect LFU, short enough to follow a
    popularity shift within a few hundred accesses per hundred models."""
    half_life_per_resident: float = 16.0
    """Lower bound on the half-life, in accesses per resident model: a large cache needs
    longer memories to rank its tail models (16 cut misses at 25% of the catalogue by 4-6%
    vs 8; 32 cut more but fell behind LRU in bytes once popularity drifts)."""
    min_half_life: float = 32.0
    """Accesses; stops a node with two models from forgetting everything every few requests."""
    priority_step: float = 1.0
    """log2 of the weight between adjacent priority classes: 1.0 doubles it per class, so a
    CRITICAL model is kept as if used 4x as often as a NORMAL one (2 more half-lives idle)."""
    min_load_seconds: float = 1e-3
    """Floor of the reload cost, so that a load timed at ~0 s does not make a model free."""
    load_seconds_smoothing: float = 0.5
    """Weight of the newest load time in the running estimate of a model's reload cost."""
    max_history: int = 4096
    """Models remembered while not resident; beyond it the least used half is forgotten."""

    def __post_init__(self) -> None:
        if min(self.half_life_per_model, self.half_life_per_resident, self.min_half_life) <= 0:
            raise ValueError("half-lives must be > 0")
        if self.min_load_seconds <= 0 or not 0 < self.load_seconds_smoothing <= 1:
            raise ValueError("min_load_seconds must be > 0 and load_seconds_smoothing in (0, 1]")
        if self.priority_step < 0 or self.max_history < 1:
            raise ValueError("priority_step must be >= 0 and max_history >= 1")


@dataclass(slots=True)
class _Resident:
    gen: int
    """Unique per load; tells a heap entry of this load from one of an earlier load."""
    static_key: float
    """log2(reload seconds / bytes) + priority term; fixed while resident."""


class CostAwarePolicy(EvictionPolicy):
    """Evicts the lowest ``decayed frequency x reload seconds / bytes x priority weight``.

    Frequencies decay by half every `half_life` accesses (to any model), so the
    score is a per-byte estimate of the reload time the model saves soon. Kept in
    log2 form: ``key = tau_last + log2(count at tau_last)``, where `tau` counts
    half-lives; a key is fixed between accesses and only grows on access, so a
    lazily updated heap orders the residents (ties: the earlier load first).
    Models never accessed (e.g. preloaded) count as accessed once at load.
    Ages by accesses, not seconds: `now` is not used.
    """

    def __init__(self, settings: CostAwareSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or CostAwareSettings()
        self._tau = 0.0
        """Accesses so far, in half-lives."""
        self._history: dict[ModelId, float] = {}
        """model -> key = tau at its last access + log2(decayed count then)."""
        self._load_s: dict[ModelId, float] = {}
        """model -> smoothed measured load time (seconds), kept across evictions."""
        self._res: dict[ModelId, _Resident] = {}
        self._heap: list[tuple[float, int, ModelId]] = []
        """(key, gen, model); stale entries are skipped or refreshed when popped."""
        self._gen = itertools.count()
        self._step = 1.0 / self.half_life
        """tau per access: 1 / half_life, refreshed when the model counts change."""

    @property
    def half_life(self) -> float:
        """Current half-life of access counts, in accesses."""
        s = self.settings
        return max(
            s.min_half_life,
            s.half_life_per_model * len(self._history),
            s.half_life_per_resident * len(self._res),
        )

    def record_access(self, model_id: ModelId, now: float) -> None:
        self._tau = tau = self._tau + self._step
        key = self._history.get(model_id)
        if key is None:
            self._history[model_id] = tau
            if len(self._history) > self.settings.max_history + len(self._res):
                self._prune_history()
            self._step = 1.0 / self.half_life
        else:
            self._history[model_id] = tau + math.log2(2.0 ** (key - tau) + 1.0)

    def frequency(self, model_id: ModelId) -> float:
        """Decayed access count now (0.0 for an unknown model)."""
        key = self._history.get(model_id)
        return 0.0 if key is None else 2.0 ** (key - self._tau)

    def _on_load(
        self,
        model_id: ModelId,
        size_bytes: int,
        load_seconds: float,
        priority: Priority,
        now: float,
    ) -> None:
        s = self.settings
        if model_id not in self._history:
            self._history[model_id] = self._tau
        previous = self._load_s.get(model_id)
        load_s = (
            load_seconds
            if previous is None
            else (s.load_seconds_smoothing * load_seconds + (1 - s.load_seconds_smoothing) * previous)
        )
        self._load_s[model_id] = load_s
        static_key = (
            math.log2(max(load_s, s.min_load_seconds) / max(size_bytes, 1))
            + (int(Priority.NORMAL) - int(priority)) * s.priority_step
        )
        gen = next(self._gen)
        self._res[model_id] = _Resident(gen, static_key)
        heapq.heappush(self._heap, (self._history[model_id] + static_key, gen, model_id))
        if len(self._heap) > 4 * len(self._res) + 64:
            self._rebuild_heap()
        self._step = 1.0 / self.half_life

    def _on_unload(self, model_id: ModelId) -> None:
        del self._res[model_id]  # its heap entries go stale
        self._step = 1.0 / self.half_life

    def _on_forget(self, model_id: ModelId) -> None:
        self._history.pop(model_id, None)
        self._load_s.pop(model_id, None)
        self._step = 1.0 / self.half_life

    def key(self, model_id: ModelId) -> float:
        """Eviction key of a resident model; the lowest is evicted first."""
        return self._history[model_id] + self._res[model_id].static_key

    def _eviction_order(self, now: float) -> Generator[ModelId, None, None]:
        heap, held = self._heap, []
        try:
            while heap:
                entry = heapq.heappop(heap)
                key, gen, model_id = entry
                res = self._res.get(model_id)
                if res is None or res.gen != gen:
                    continue  # stale: from an earlier load
                current = self._history[model_id] + res.static_key
                if current != key:
                    assert current > key, "keys only grow between loads"
                    heapq.heappush(heap, (current, gen, model_id))
                    continue
                held.append(entry)
                yield model_id
        finally:
            for entry in held:
                heapq.heappush(heap, entry)

    def _rebuild_heap(self) -> None:
        self._heap = [(self.key(m), r.gen, m) for m, r in self._res.items()]
        heapq.heapify(self._heap)

    def _prune_history(self) -> None:
        idle = sorted((m for m in self._history if m not in self._res), key=lambda m: self._history[m])
        for model_id in idle[: len(idle) // 2 + 1]:
            self._on_forget(model_id)

    def check_invariants(self) -> None:
        super().check_invariants()
        assert set(self._res) == set(self._sizes)
        assert all(m in self._history for m in self._res)
        live = {(m, gen) for _, gen, m in self._heap}
        assert all((m, r.gen) in live for m, r in self._res.items()), "resident missing from heap"
        assert all(k <= self.key(m) for k, gen, m in self._heap if m in self._res and self._res[m].gen == gen)
        assert self._step == 1.0 / self.half_life


def default_policy() -> EvictionPolicy:
    """The scheduler's default policy."""
    return CostAwarePolicy()
