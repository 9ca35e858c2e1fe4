"""A small decoder-only transformer whose attention reads K/V through paged block tables.

- `TinyLM`: GPT-style (learned positions, pre-LayerNorm, GELU MLP).
  `forward(tokens)` is the plain causal model (the reference); `forward_paged(batch, pool)`
  runs a flat batch of prefill and decode tokens of many sequences, writes each new token's
  K/V into the paged pool at its slot, then attends by gathering every context token's K/V
  back through the sequence's block table (`paged_attention`). Both give the same logits
  (tests check it).
- `ByteTokenizer`: UTF-8 bytes are tokens 0-255, then BOS, EOS, PAD.
- Weights are stored without pickle: one `.npz` (written with fixed zip timestamps, so the
  same seed gives the same bytes) holding every parameter plus the JSON config;
  `write_tiny_lm(root)` writes the example `tiny-lm/1`, `load_tiny_lm(path)` reads it.
- `TinyLMBackend`: the model as a predict backend (input_ids -> logits) for format
  `TINY_LM_FORMAT`; for a `task: generate` model its `memory_bytes` also counts the KV pool
  the generation engine will allocate (`kv_cache_bytes_for`), so the scheduler's budget
  covers both.
"""

from __future__ import annotations

import codecs
import io
import json
import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgefleet_api.types import Priority
from node_agent.errors import InvalidInput, InvalidModel
from node_agent.generation.kv_cache import block_size_for_context, kv_bytes_per_token
from node_agent.generation.paged_attention import AttentionPlan, PagedBatch, PagedKVPool, paged_attention
from node_agent.runtime.backends.base import Backend
from node_agent.runtime.model_yaml import parse_quantity, write_model_config
from node_agent.runtime.repository import sha256_file
from node_agent.types import KV_BLOCK_SIZE_PARAMETER, ModelConfig, TensorSpec

if TYPE_CHECKING:
    from collections.abc import Sequence

    from node_agent.generation.paged_lm import LMShape, PagedLM, TextTokenizer

__all__ = [
    "BOS",
    "DEFAULT_KV_CONTEXTS",
    "EOS",
    "KV_BLOCK_SIZE_PARAMETER",
    "KV_CACHE_PARAMETER",
    "PAD",
    "TINY_LM_FORMAT",
    "ByteTokenizer",
    "PagedBatch",
    "PagedKVPool",
    "TinyLM",
    "TinyLMBackend",
    "TinyLMConfig",
    "kv_block_size_for",
    "kv_cache_bytes_for",
    "load_tiny_lm",
    "save_tiny_lm",
    "write_tiny_lm",
]

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259
TINY_LM_FORMAT = "tinylm-npz"
"""model.yaml `format` of a TinyLM artifact (register it in `node_agent.runtime.backends`)."""
ARTIFACT = "model.npz"
_CONFIG_KEY = "__config__"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
KV_CACHE_PARAMETER = "kv_cache_bytes"
"""model.yaml `parameters` key: bytes of KV cache (a quantity such as 64Mi) for a
`task: generate` model; the pool holds as many whole blocks as fit."""
DEFAULT_KV_CONTEXTS = 32
"""Without `kv_cache_bytes`, the KV pool holds this many full contexts. Paged, a session
holds only the tokens it has (typically a fraction of the context), so 32 contexts hold
the 50-100 sessions an edge box is asked for."""
KV_DTYPE_BYTES = 4
"""The paged K/V pool is float32 (`PagedKVPool`'s default)."""


@dataclass(frozen=True, slots=True)
class TinyLMConfig:
    """Shape of a TinyLM; `d_model` must divide into `n_heads` heads."""

    vocab_size: int = VOCAB_SIZE
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    max_seq_len: int = 512
    """Context length: learned positions exist for positions below it."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        """Multi-head attention: one K/V head per query head."""
        return self.n_heads


class ByteTokenizer:
    """Bytes of the UTF-8 text are tokens 0-255; BOS/EOS/PAD follow. Lossless for text."""

    bos, eos, pad = BOS, EOS, PAD
    vocab_size = VOCAB_SIZE

    @staticmethod
    def encode(text: str, *, add_bos: bool = True) -> list[int]:
        return ([BOS] if add_bos else []) + list(text.encode("utf-8"))

    @staticmethod
    def decode(token_ids: Sequence[int]) -> str:
        """Text of the byte tokens (specials dropped; invalid UTF-8 becomes U+FFFD)."""
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    @staticmethod
    def incremental_decoder() -> IncrementalDecoder:
        return IncrementalDecoder()


class IncrementalDecoder:
    """Text for one token at a time: a multi-byte character comes out whole, when its last
    byte arrives; concatenated pieces equal `ByteTokenizer.decode` of all the tokens."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._dec.decode(bytes((token_id,))) if token_id < 256 else ""

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class _Block(nn.Module):
    def __init__(self, c: TinyLMConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.fc1 = nn.Linear(c.d_model, c.d_ff)
        self.fc2 = nn.Linear(c.d_ff, c.d_model)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Decoder-only transformer; see the module docstring. A `paged_lm.PagedLM`."""

    eos_token_ids: tuple[int, ...] = (EOS,)

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    @classmethod
    def random(cls, config: TinyLMConfig, seed: int) -> TinyLM:
        """Fixed-seed random weights, in eval mode. Scales chosen so that untrained
        outputs depend on the context and sampling has a spread (neither one token nor
        uniform): embeddings 0.1, LM head 0.2, other matrices 0.05, LayerNorm 1, biases 0."""
        gen = torch.Generator().manual_seed(seed)
        model = cls(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "ln" in name:
                    p.fill_(1.0)
                else:
                    std = 0.1 if "emb" in name else 0.2 if "lm_head" in name else 0.05
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def _layers(self) -> list[_Block]:
        return [cast(_Block, b) for b in self.blocks]

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:-1], self.config.n_heads, self.config.head_dim)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The unpaged reference: tokens [B, T] (T <= max_seq_len) -> logits [B, T, vocab]."""
        b, t = tokens.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"{t} tokens exceed the context of {self.config.max_seq_len}")
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(t, device=tokens.device))
        for blk in self._layers():
            q, k, v = (self._heads(y) for y in blk.qkv(blk.ln1(x)).chunk(3, dim=-1))
            a = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            x = x + blk.proj(a.transpose(1, 2).reshape(b, t, -1))
            x = x + blk.mlp(x)
        return self._logits(x)

    def forward_paged(
        self, batch: PagedBatch, pool: PagedKVPool, *, all_logits: bool = False
    ) -> torch.Tensor:
        """Run `batch` against `pool`: logits of each sequence's last token [S, vocab]
        (or of every row [N, vocab] with `all_logits`). Writes the new tokens' K/V into
        their slots first, then every query reads its context through the block table."""
        dev = pool.k.device
        if max(batch.context_len) > self.config.max_seq_len:
            raise ValueError(f"a position passes the context of {self.config.max_seq_len}")
        plan = AttentionPlan(batch, pool.block_size, dev)
        ids = torch.tensor(batch.input_ids, device=dev)
        x = self.tok_emb(ids) + self.pos_emb(plan.positions)  # [N, d]
        scale = 1.0 / math.sqrt(self.config.head_dim)
        for layer, blk in enumerate(self._layers()):
            q, k, v = (self._heads(y) for y in blk.qkv(blk.ln1(x)).chunk(3, dim=-1))  # [N,H,D]
            k_pool, v_pool = pool.k_slots[layer], pool.v_slots[layer]  # [slots, H, D]
            k_pool.index_copy_(0, plan.slots, k.to(k_pool.dtype))
            v_pool.index_copy_(0, plan.slots, v.to(v_pool.dtype))
            out = paged_attention(plan, q, k_pool, v_pool, scale)
            x = x + blk.proj(out.reshape(out.shape[0], -1))
            x = x + blk.mlp(x)
        if not all_logits:
            x = x[torch.tensor(batch.last_rows(), device=dev)]
        return self._logits(x)


# -- weights on disk (no pickle) --------------------------------------------------------------


def save_tiny_lm(model: TinyLM, path: Path | str) -> None:
    """Write every parameter and the JSON config into one `.npz`, byte-identical for the
    same weights (fixed zip timestamps, sorted names); written to a temp file, then renamed."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {
        name: t.detach().cpu().contiguous().numpy() for name, t in model.state_dict().items()
    }
    arrays[_CONFIG_KEY] = np.array(json.dumps(asdict(model.config), sort_keys=True))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, arrays[name], allow_pickle=False)
            z.writestr(zipfile.ZipInfo(name + ".npy", _ZIP_EPOCH), member.getvalue())
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def load_tiny_lm(path: Path | str, device: str | torch.device = "cpu") -> TinyLM:
    """Read a `save_tiny_lm` file (never unpickles); InvalidModel if it is malformed."""
    try:
        with np.load(path, allow_pickle=False) as data:
            config = TinyLMConfig(**json.loads(str(data[_CONFIG_KEY])))
            state = {k: torch.from_numpy(data[k].copy()) for k in data.files if k != _CONFIG_KEY}
        model = TinyLM(config)
        model.load_state_dict(state, strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise InvalidModel(f"{path}: not a TinyLM weights file: {e}") from e
    return model.to(device).eval()


TINY_LM_EXAMPLE = TinyLMConfig(d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=512)
TINY_LM_SEED = 7


def write_tiny_lm(root: Path | str, name: str = "tiny-lm", version: str = "1") -> ModelConfig:
    """Write the example `tiny-lm/1` (fixed seed) under `root` with its model.yaml."""
    version_dir = Path(root) / name / version
    version_dir.mkdir(parents=True, exist_ok=True)
    model = TinyLM.random(TINY_LM_EXAMPLE, TINY_LM_SEED)
    artifact = version_dir / ARTIFACT
    save_tiny_lm(model, artifact)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = (
        DEFAULT_KV_CONTEXTS
        * TINY_LM_EXAMPLE.max_seq_len
        * kv_bytes_per_token(
            TINY_LM_EXAMPLE.n_layers, TINY_LM_EXAMPLE.n_heads, TINY_LM_EXAMPLE.head_dim, KV_DTYPE_BYTES
        )
    )
    config = ModelConfig(
        name=name,
        version=version,
        format=TINY_LM_FORMAT,
        inputs=(TensorSpec("input_ids", "INT64", (-1,)),),
        outputs=(TensorSpec("logits", "FP32", (-1, VOCAB_SIZE)),),
        artifact=ARTIFACT,
        digest=sha256_file(artifact),
        max_batch_size=8,
        priority=Priority.NORMAL,
        memory_estimate_bytes=params + kv_bytes,
        task="generate",
        parameters={
            "description": "tiny byte-level decoder-only transformer (random weights)",
            "seed": str(TINY_LM_SEED),
            KV_CACHE_PARAMETER: str(kv_bytes),
        },
    )
    write_model_config(version_dir, config)
    return config


def kv_block_size_for(config: ModelConfig, lm: LMShape) -> int:
    """Tokens per KV block of a model: `parameters.kv_block_size` if set, else the default
    for its context (`block_size_for_context`). `InvalidModel` for a value that is not an
    integer in [1, context]."""
    raw = config.parameters.get(KV_BLOCK_SIZE_PARAMETER)
    if raw is None:
        return block_size_for_context(lm.max_seq_len)
    try:
        block_size = int(raw)
    except ValueError:
        block_size = 0
    if not 1 <= block_size <= lm.max_seq_len:
        raise InvalidModel(
            f"{config.id}: parameters.{KV_BLOCK_SIZE_PARAMETER} must be an integer from 1 to the "
            f"context ({lm.max_seq_len}), got {raw!r}"
        )
    return block_size


def kv_cache_bytes_for(
    config: ModelConfig,
    lm: LMShape,
    block_size: int | None = None,
    default_contexts: int = DEFAULT_KV_CONTEXTS,
) -> int:
    """Bytes of the KV pool a model's generation engine allocates: whole blocks of
    `block_size` tokens (default `kv_block_size_for`) within `parameters.kv_cache_bytes`
    (default `default_contexts` full contexts); 0 for a model that does not generate.
    `InvalidModel` for a value that is not a byte quantity or holds less than one block."""
    if config.task != "generate":
        return 0
    if block_size is None:
        block_size = kv_block_size_for(config, lm)
    block_bytes = kv_bytes_per_token(lm.n_layers, lm.n_kv_heads, lm.head_dim, KV_DTYPE_BYTES) * block_size
    raw = config.parameters.get(KV_CACHE_PARAMETER)
    if raw is None:
        budget = default_contexts * -(-lm.max_seq_len // block_size) * block_bytes
    else:
        try:
            budget = parse_quantity(raw)
        except ValueError as e:
            raise InvalidModel(f"{config.id}: parameters.{KV_CACHE_PARAMETER}: {e}") from None
    if budget < block_bytes:
        raise InvalidModel(
            f"{config.id}: parameters.{KV_CACHE_PARAMETER} is {budget} bytes, less than one KV "
            f"block of {block_size} tokens ({block_bytes} bytes)"
        )
    return budget // block_bytes * block_bytes


class TinyLMBackend(Backend):
    """A paged decoder (a TinyLM, or a subclass's model) as a predict backend: input_ids
    INT64 [B, T] -> logits FP32 [B, T, vocab]. For a `task: generate` model, `memory_bytes`
    = weights + `kv_cache_bytes` (the pool of `kv_block_size`-token blocks an engine built
    by `engine.engine_for_backend` allocates); `tokenizer` encodes its text prompts."""

    def __init__(
        self,
        config: ModelConfig,
        model: PagedLM,
        memory_bytes: int,
        kv_cache_bytes: int = 0,
        kv_block_size: int | None = None,
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        self.config = config
        self.model: PagedLM | None = model
        self.tokenizer: TextTokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.kv_cache_bytes = kv_cache_bytes
        self.kv_block_size = kv_block_size or block_size_for_context(model.config.max_seq_len)
        self._memory_bytes = memory_bytes + kv_cache_bytes

    @classmethod
    def load(cls, config: ModelConfig, version_dir: Path, device: str) -> TinyLMBackend:
        model = load_tiny_lm(Path(version_dir) / config.artifact, device)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        block_size = kv_block_size_for(config, model.config) if config.task == "generate" else None
        return cls(config, model, size, kv_cache_bytes_for(config, model.config, block_size), block_size)

    def run(self, inputs: dict[str, torch.Tensor], stream: object | None = None) -> dict[str, torch.Tensor]:
        if self.model is None:
            raise InvalidModel(f"{self.config.id} is unloaded")
        ids = inputs.get("input_ids")
        if ids is None or ids.dim() != 2 or ids.dtype != torch.int64:
            raise InvalidInput("expected input_ids INT64 [batch, tokens]")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.model.config.vocab_size):
            raise InvalidInput(f"token ids must be in [0, {self.model.config.vocab_size})")
        with torch.inference_mode():
            return {"logits": self.model(ids.to(self.model.device)).float()}

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    def unload(self) -> None:
        self.model = None
