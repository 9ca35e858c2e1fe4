"""What the generation engine needs of a model and of its tokenizer (structural types).

`TinyLM` (the byte-level toy) and `LlamaForPaged` (Hugging Face Llama-family checkpoints)
both satisfy `PagedLM`; `ByteTokenizer` and `HFTokenizer` satisfy `TextTokenizer`. The
engine, the async generator and the backends see only these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from node_agent.generation.paged_attention import PagedBatch, PagedKVPool

__all__ = ["IncrementalDecoder", "LMShape", "PagedLM", "TextTokenizer"]


class LMShape(Protocol):
    """The shape of a decoder: what the KV pool, the engine and the KV budget read."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def max_seq_len(self) -> int:
        """Context length: positions below it exist."""

    @property
    def n_layers(self) -> int: ...
    @property
    def n_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...


class PagedLM(Protocol):
    """A decoder-only model that runs a flat batch of prefill and decode rows against the
    paged KV pool (writing each new token's K/V at its slot first), and as a plain causal
    model for the predict path."""

    @property
    def config(self) -> LMShape: ...
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a sequence (unless a request ignores EOS)."""

    @property
    def device(self) -> torch.device: ...
    def forward_paged(
        self, batch: PagedBatch, pool: PagedKVPool, *, all_logits: bool = False
    ) -> torch.Tensor: ...
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor: ...


class IncrementalDecoder(Protocol):
    """Text for one token at a time; the pieces (then `flush`) concatenate to the decode
    of all the tokens."""

    def feed(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class TextTokenizer(Protocol):
    """Text <-> token ids for the generate API."""

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt (with the special tokens the model expects, e.g. BOS)."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids (special tokens dropped)."""

    def incremental_decoder(self) -> IncrementalDecoder: ...
