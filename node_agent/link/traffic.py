"""`TrafficSplit`: model name -> version by weight, for requests that name no version. Pure."""

from __future__ import annotations

from collections.abc import Mapping

from node_agent.runtime.model_names import version_sort_key

_GOLDEN_64 = 0x9E3779B97F4A7C15
"""2**64 / golden ratio: the Weyl sequence n * this (mod 2**64) is spread as evenly as any."""
_MASK_64 = (1 << 64) - 1


class TrafficSplit:
    """Model name -> version, by weight. Deterministic: the n-th choice for a model depends
    only on its weights, the seed and n, so a run can be replayed.

    The n-th choice takes the point frac((n + seed) / golden ratio) of [0, 1) (exact integer
    arithmetic) and returns the version whose cumulative-weight interval holds it. Over any
    run of N consecutive choices each version's share is within a few requests of
    N * weight / total (the golden-ratio Weyl sequence has discrepancy O(log N / N)), and a
    version's requests are spread through the sequence, never bunched (a 10% canary gets
    every 5th, 8th or 13th request). Versions with weight 0 are never chosen; a model whose
    weights are all 0, or that has none, gets None. `choose` may be called from any thread
    (a race can at worst hand two callers the same counter value).
    """

    def __init__(self, weights: Mapping[str, Mapping[str, int]] | None = None, seed: int = 0) -> None:
        self.seed = seed
        self._tables: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
        self._weights: dict[str, dict[str, int]] = {}
        self._counters: dict[str, int] = {}
        self.set_weights(weights or {})

    def set_weights(self, weights: Mapping[str, Mapping[str, int]]) -> None:
        """Replace every model's weights (a model left out gets None). Counters carry on."""
        tables: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
        for model, versions in weights.items():
            for version, weight in versions.items():
                if not isinstance(weight, int) or weight < 0:
                    raise ValueError(f"{model}:{version}: weight must be an integer >= 0, got {weight!r}")
            ordered = sorted((v for v, w in versions.items() if w > 0), key=version_sort_key)
            cumulative, total = [], 0
            for v in ordered:
                total += versions[v]
                cumulative.append(total)
            tables[model] = (tuple(ordered), tuple(cumulative))
        self._weights = {m: dict(v) for m, v in weights.items()}
        self._tables = tables

    @property
    def weights(self) -> dict[str, dict[str, int]]:
        return {m: dict(v) for m, v in self._weights.items()}

    def choose(self, model: str) -> str | None:
        """The version the next request for `model` goes to (None: no weighted version)."""
        n = self._counters.get(model, 0)
        self._counters[model] = n + 1
        return self.pick(model, n)

    def pick(self, model: str, n: int) -> str | None:
        """The n-th choice for `model` (pure; `choose` is this with a counter)."""
        table = self._tables.get(model)
        if not table or not table[0]:
            return None
        versions, cumulative = table
        total = cumulative[-1]
        point = ((((n + self.seed) * _GOLDEN_64) & _MASK_64) * total) >> 64  # in [0, total)
        lo, hi = 0, len(cumulative) - 1
        while lo < hi:  # first interval whose end is beyond `point`
            mid = (lo + hi) // 2
            if cumulative[mid] > point:
                hi = mid
            else:
                lo = mid + 1
        return versions[lo]
