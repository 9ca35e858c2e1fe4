"""What one generation request asks for: `SamplingParams`, validated once.

Free of torch, so the serving layer parses a generate request's `parameters` without loading it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgefleet_api.types import Priority
from node_agent.errors import InvalidInput

__all__ = ["SamplingParams"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples; validated once (`InvalidInput` for bad values)."""

    max_tokens: int = 64
    """Output tokens at most (the KV cache is reserved for prompt + max_tokens)."""
    temperature: float = 1.0
    """0 means greedy (argmax, no random draw)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely tokens whose mass reaches top_p."""
    seed: int | None = None
    """Seeds the request's own generator; None draws a random seed."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    priority: Priority = Priority.NORMAL

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 1 << 20:
            raise InvalidInput(f"max_tokens must be in [1, 1048576], got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidInput(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 1 << 63:
            raise InvalidInput(f"seed must be in [0, 2**63), got {self.seed}")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> SamplingParams:
        """From the generate API's `parameters` (unknown keys are an `InvalidInput`)."""
        known = {"max_tokens", "temperature", "top_p", "seed", "stop_token_ids", "ignore_eos",
                 "priority"}  # fmt: skip
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidInput(
                f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        kw: dict[str, Any] = {}
        try:
            for key, kind in (("max_tokens", int), ("seed", int), ("temperature", float), ("top_p", float)):
                if params.get(key) is not None:
                    value = params[key]
                    if (
                        isinstance(value, bool)
                        or not isinstance(value, int | float)
                        or (kind is int and not isinstance(value, int))
                    ):
                        raise InvalidInput(
                            f"parameter {key} must be a{'n integer' if kind is int else ' number'}"
                        )
                    kw[key] = kind(value)
            if params.get("stop_token_ids") is not None:
                ids = params["stop_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                        for t in ids):  # fmt: skip
                    raise InvalidInput("parameter stop_token_ids must be a list of integers")
                kw["stop_token_ids"] = tuple(ids)
            if params.get("ignore_eos") is not None:
                if not isinstance(params["ignore_eos"], bool):
                    raise InvalidInput("parameter ignore_eos must be true or false")
                kw["ignore_eos"] = params["ignore_eos"]
            if params.get("priority") is not None:
                kw["priority"] = Priority.parse(params["priority"])
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        return cls(**kw)
