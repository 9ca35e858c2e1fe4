"""Drawing tokens from logits: `sample_token` and its batched form `sample_tokens`.

Reproducible: each sampled row consumes exactly one uniform draw from its own generator, and
every operation works row by row, so a row's token never depends on the rest of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from node_agent.generation.sampling_params import SamplingParams

__all__ = ["sample_token", "sample_tokens"]


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from `logits` [vocab]: argmax at temperature 0, else a draw from the
    temperature-scaled, top-p-truncated distribution using exactly one uniform from
    `generator` (inverse CDF over tokens sorted by probability, ties by id)."""
    return sample_tokens(logits[None], [params], [generator])[0]


def sample_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """`sample_token` for each row of `logits` [rows, vocab], batched: every operation works
    row by row, so a row's token depends only on its logits, its params and its generator
    (one uniform drawn per sampled row), never on the other rows of the batch."""
    n = logits.shape[0]
    if len(params) != n or len(generators) != n:
        raise ValueError(f"{n} rows of logits, {len(params)} params, {len(generators)} generators")
    greedy = torch.argmax(logits, dim=-1).tolist() if any(p.temperature == 0.0 for p in params) else []
    rows = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if not rows:
        return [int(t) for t in greedy]
    dev = logits.device
    sub = logits if len(rows) == n else logits[torch.tensor(rows, device=dev)]
    temps = torch.tensor([params[i].temperature for i in rows], dtype=torch.float32, device=dev)
    probs = torch.softmax(sub.float() / temps[:, None], dim=-1)
    p, idx = torch.sort(probs, descending=True, stable=True)
    if any(params[i].top_p < 1.0 for i in rows):
        top_p = torch.tensor([params[i].top_p if params[i].top_p < 1.0 else math.inf for i in rows],
                             dtype=torch.float32, device=dev)  # fmt: skip
        before = torch.cumsum(p, dim=-1) - p
        p = torch.where(before < top_p[:, None], p, torch.zeros_like(p))
    cdf = torch.cumsum(p, dim=-1)
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows]).to(dev) * cdf[:, -1]
    pick = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=p.shape[-1] - 1)
    drawn = idx.gather(-1, pick)[:, 0].tolist()
    out = [int(t) for t in greedy] if greedy else [0] * n
    for i, token in zip(rows, drawn, strict=True):
        out[i] = int(token)
    return out
