"""The Llama architecture family (Llama, Qwen2, Mistral) as a `paged_lm.PagedLM`.

Hugging Face decoder checkpoints run in our engine: our paged KV pool, our block tables,
prefix sharing and preemption, not a second serving engine. The math is transformers'
`LlamaForCausalLM` (and `Qwen2ForCausalLM`, `MistralForCausalLM`, which differ only in
config): token embedding; per layer a pre-RMSNorm grouped-query attention with rotary
positions (RoPE, `rope_theta`, optionally `linear` or `llama3` frequency scaling) and a
pre-RMSNorm SwiGLU MLP, each added to the residual; a final RMSNorm and the LM head (tied to
the embedding or not). Tests check logits equal transformers' within 1e-4 (float32).

- `LlamaShape.from_hf(config.json)`: the shape, validated (`InvalidModel` for what this
  module does not compute: another `hidden_act`, `dynamic`/`yarn` RoPE, partial rotary).
- `LlamaForPaged.from_hf_state(shape, tensors)`: the model from Hugging Face tensor names
  (`model.layers.{i}.self_attn.q_proj.weight`, ...). q/k/v are fused into one matmul and
  gate/up into another (the same products, in one call each); q and k rows with each
  head's rotary halves interleaved (RoPE is then one complex multiply; q.k is unchanged);
  unquantized on a CPU, the matrices are kept in oneDNN's packed layout (`pack`).
- `forward_paged`: the engine's step, through kernels bound once per model (`_kernels`):
  the matrices' `rows_kernel`s and, for a decode step's few rows, RMSNorm as one LayerNorm
  (`rms_kernel`), so a layer costs few calls beyond its products.
- `quantize("int8")`: weight-only int8, one symmetric scale per output channel (per row of
  the embedding, which a tied LM head shares): weights take a quarter of float32's bytes;
  the residual stream, norms, attention and the KV cache stay in the compute dtype (on a CPU
  with native bfloat16, the int8 products take bfloat16 inputs: `linear`; the MLP between
  its products and the o/down outputs stay in bfloat16 there). `quantize("int4")`:
  the layers' and an untied head's matrices in int4, two to a byte, one scale per group of
  `INT4_GROUP` inputs of an output channel (about 0.56 bytes a weight); the embedding int8.
  The matrices and their kernels are `linear`'s.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from node_agent.errors import InvalidModel
from node_agent.generation.linear import BF16_KERNELS, Int4Linear, Int8Linear, Linear, RowsKernel
from node_agent.generation.paged_attention import AttentionPlan, PagedBatch, PagedKVPool, paged_attention

__all__ = ["ARCHITECTURES", "QUANTIZATIONS", "Int4Linear", "Int8Linear", "LlamaForPaged", "LlamaShape",
           "rope_inv_freq"]  # fmt: skip

_FUSED_RMS_NORM = hasattr(torch, "rms_norm")
"""torch >= 2.4 has a fused RMSNorm."""
QUANTIZATIONS = ("none", "int8", "int4")
ARCHITECTURES: frozenset[str] = frozenset({"llama", "qwen2", "mistral"})
"""config.json `model_type`s this module computes."""


@dataclass(frozen=True, slots=True)
class LlamaShape:
    """A Llama-family checkpoint's shape (an `LMShape`), read from its config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int
    """Context served: max_position_embeddings, capped by a sliding window (positions past
    it would attend differently) and by the caller's limit."""
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...]
    """The RoPE parameters other than theta (sorted items), empty for plain RoPE."""
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], max_context: int | None = None) -> LlamaShape:
        """From a config.json mapping; `max_context` caps the context served."""
        model_type = str(cfg.get("model_type", ""))
        if model_type not in ARCHITECTURES:
            raise InvalidModel(f"config.json model_type {model_type!r} is not one of {sorted(ARCHITECTURES)}")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise InvalidModel(f"config.json hidden_act {act!r}: only silu (SwiGLU) is computed")
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            theta, scaling = _rope_settings(cfg)
            context = int(cfg.get("max_position_embeddings", 2048))
            window = cfg.get("sliding_window")
            if window and (model_type == "mistral" or cfg.get("use_sliding_window")):
                context = min(context, int(window))
            if max_context is not None:
                context = min(context, max_context)
            shape = cls(
                model_type=model_type, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]), n_layers=int(cfg["num_hidden_layers"]),
                n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, max_seq_len=context,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                rope_scaling=scaling,
                qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
                o_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                eos_token_ids=_ids(cfg.get("eos_token_id")),
                bos_token_id=cfg.get("bos_token_id"),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidModel(f"config.json: {type(e).__name__}: {e}") from None
        if (
            heads % kv_heads
            or head_dim % 2
            or min(shape.vocab_size, hidden, shape.n_layers, head_dim, context) < 1
        ):
            raise InvalidModel(f"config.json: inconsistent shape {shape}")
        return shape


def _ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(cast(int, value)),)


def _rope_settings(cfg: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """(theta, other RoPE parameters) from `rope_parameters` (transformers 5) or
    `rope_theta` + `rope_scaling` (earlier)."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    if not params and cfg.get("rope_scaling"):
        params = dict(cfg["rope_scaling"])
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        params = {}
    elif kind not in ("linear", "llama3"):
        raise InvalidModel(f"config.json: RoPE type {kind!r} is not computed (default, linear, llama3)")
    else:
        params["rope_type"] = kind
        params.pop("type", None)
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise InvalidModel("config.json: partial_rotary_factor other than 1 is not computed")
    return theta, tuple(sorted(params.items()))


def rope_inv_freq(shape: LlamaShape) -> torch.Tensor:
    """The rotary inverse frequencies [head_dim / 2], as transformers computes them."""
    dim = shape.head_dim
    inv = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    p = dict(shape.rope_scaling)
    if p.get("rope_type") == "linear":
        return inv / float(p["factor"])
    if p.get("rope_type") == "llama3":
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled)
    return inv


def _interleave_rotary(heads: int, head_dim: int) -> torch.Tensor:
    """The order of a q or k projection's rows with each head's rotary halves interleaved:
    row 2j of a head is its row j, row 2j + 1 its row j + head_dim / 2, so RoPE turns
    adjacent pairs (`LlamaForPaged._rope`). q and k are permuted alike: q.k is unchanged, and
    the KV pool holds K in this order."""
    half = head_dim // 2
    pairs = torch.stack((torch.arange(half), torch.arange(half) + half), dim=-1).reshape(-1)
    return (torch.arange(heads)[:, None] * head_dim + pairs).reshape(-1)


def _int4(for_cpu: bool) -> Callable[[Linear], Int4Linear | Int8Linear]:
    return functools.partial(Int4Linear.from_linear, portable=not for_cpu)


@dataclass(frozen=True, slots=True)
class _StepLayer:
    """One layer as the paged step runs it: bound norm and matrix kernels."""

    norm1: RowsKernel
    qkv: RowsKernel
    o: RowsKernel
    norm2: RowsKernel
    gate_up: RowsKernel
    down: RowsKernel


FEW_ROWS = 16
"""Rows up to which `rms_kernel` normalizes as a LayerNorm (a decode step's rows)."""


def rms_kernel(weight: torch.Tensor, eps: float, general: RowsKernel) -> RowsKernel:
    """RMSNorm with `weight` of float32 x [rows, d], for up to `FEW_ROWS` rows as the
    LayerNorm of [x, -x] (mean 0, variance mean(x^2): x / sqrt(mean(x^2) + eps), the same
    formula) cut to its first d columns: one fused kernel and a concatenation, where torch's
    CPU RMSNorm runs about eight small kernels; `general` for the rest."""
    twice, d = torch.cat((weight, weight)), weight.shape[0]
    layer_norm, cat = torch.layer_norm, torch.cat

    def kernel(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > FEW_ROWS or x.dtype != torch.float32:
            return general(x)
        return layer_norm(cat((x, x.neg()), -1), twice.shape, twice, None, eps)[:, :d]

    return kernel


class _Layer(nn.Module):
    def __init__(self, qkv: nn.Module, o: nn.Module, gate_up: nn.Module, down: nn.Module,
                 norm1: torch.Tensor, norm2: torch.Tensor) -> None:  # fmt: skip
        super().__init__()
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down
        self.norm1 = nn.Parameter(norm1, requires_grad=False)
        self.norm2 = nn.Parameter(norm2, requires_grad=False)

    def step_layer(self, norm: Callable[[torch.Tensor], RowsKernel]) -> _StepLayer:
        """Its kernels; `norm` makes the kernel of a norm weight."""

        def kernel(m: nn.Module) -> RowsKernel:
            return cast("Linear | Int8Linear | Int4Linear", m).rows_kernel()

        return _StepLayer(norm(self.norm1), kernel(self.qkv), kernel(self.o), norm(self.norm2),
                          kernel(self.gate_up), kernel(self.down))  # fmt: skip

    def quantize(self, mode: str, *, for_cpu: bool = True) -> None:
        """Its full-precision weight matrices to `mode` ('int8' or 'int4'); `for_cpu`: int4 in
        torch's CPU layout where this CPU has its kernel (`linear.INT4_KERNELS`)."""
        make = Int8Linear.from_linear if mode == "int8" else _int4(for_cpu)
        with torch.no_grad():
            for name in ("qkv", "o", "gate_up", "down"):
                lin = getattr(self, name)
                if isinstance(lin, Linear):
                    setattr(self, name, make(lin))


class LlamaForPaged(nn.Module):
    """A Llama-family decoder over the paged KV pool; see the module docstring."""

    def __init__(self, shape: LlamaShape, embed: torch.Tensor, layers: list[_Layer],
                 norm: torch.Tensor, lm_head: torch.Tensor | None) -> None:  # fmt: skip
        super().__init__()
        self.shape = shape
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.register_buffer("embed_scale", None)  # per-row scales of an int8 embedding
        self.layers = nn.ModuleList(layers)
        self.norm = nn.Parameter(norm, requires_grad=False)
        self.lm_head: nn.Module = Linear(self.embed if lm_head is None else lm_head, None)
        freqs = torch.outer(torch.arange(shape.max_seq_len, dtype=torch.float32), rope_inv_freq(shape))
        # e^(i * position * frequency) [positions, head_dim / 2]: cos and sin as transformers' tables
        self.register_buffer("rotary", torch.complex(freqs.cos(), freqs.sin()), persistent=False)
        self.quantization = "none"
        self._step_layers: list[_StepLayer] | None = None
        self._step_norm: tuple[RowsKernel, RowsKernel] | None = None

    def _apply(self, fn: Any, recurse: bool = True) -> LlamaForPaged:  # .to(), .cpu(), ...
        self._step_layers = None  # the kernels hold the tensors they were made with
        return cast(LlamaForPaged, super()._apply(fn, recurse))

    def _kernels(self) -> tuple[list[_StepLayer], tuple[RowsKernel, RowsKernel]]:
        """Each layer's norm and matrix kernels (`linear.RowsKernel`), the final norm's and
        the LM head's, made once and again after the model changes (`pack`, `quantize`, a
        move)."""
        if self._step_layers is None or self._step_norm is None:
            eps = self.shape.rms_norm_eps

            def norm(weight: torch.Tensor) -> RowsKernel:
                return rms_kernel(weight.data, eps, functools.partial(self._rms, weight=weight))

            self._step_layers = [m.step_layer(norm) for m in self._layers()]
            head = cast("Linear | Int8Linear | Int4Linear", self.lm_head).rows_kernel()
            self._step_norm = norm(self.norm), head
        return self._step_layers, self._step_norm

    @property
    def config(self) -> LlamaShape:
        return self.shape

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.shape.eos_token_ids

    @property
    def device(self) -> torch.device:
        return self.norm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.dtype

    # -- building -------------------------------------------------------------------------

    @classmethod
    def from_hf_state(
        cls,
        shape: LlamaShape,
        tensors: Mapping[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        *,
        quantization: str = "none",
        for_cpu: bool = True,
    ) -> LlamaForPaged:
        """The model from Hugging Face tensor names; `InvalidModel` naming a missing or
        misshapen tensor. Each tensor is read once (`tensors` may read lazily from disk);
        quantized, each layer is quantized as soon as it is built, so loading holds the
        full-precision copy of one layer at a time, not of the model. `for_cpu`: False when
        the model will run on another device (int4 then keeps the portable layout)."""
        if quantization not in QUANTIZATIONS:
            raise InvalidModel(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")

        def t(name: str, shape_: tuple[int, ...] | None = None) -> torch.Tensor:
            x = tensors.get(name)
            if x is None:
                raise InvalidModel(f"weights: tensor {name!r} is missing")
            if shape_ is not None and tuple(x.shape) != shape_:
                raise InvalidModel(f"weights: {name} has shape {tuple(x.shape)}, expected {shape_}")
            # quantized, the model keeps only its vectors as read: copies, so no view holds the file
            return x.to(dtype, copy=quantization != "none" and x.dim() == 1)

        def opt(name: str, present: bool) -> torch.Tensor | None:
            return t(name) if present else None

        s, d, hd = shape, shape.hidden_size, shape.head_dim
        qo, kvo = s.n_heads * hd, s.n_kv_heads * hd
        layers = []
        for i in range(s.n_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            q_rows, k_rows = _interleave_rotary(s.n_heads, hd), _interleave_rotary(s.n_kv_heads, hd)
            wq, wk = t(a + "q_proj.weight", (qo, d))[q_rows], t(a + "k_proj.weight", (kvo, d))[k_rows]
            qkv_w = torch.cat([wq, wk, t(a + "v_proj.weight", (kvo, d))])
            qkv_b = None
            if s.qkv_bias:
                qkv_b = torch.cat([t(a + "q_proj.bias")[q_rows], t(a + "k_proj.bias")[k_rows],
                                   t(a + "v_proj.bias")])  # fmt: skip
            f = s.intermediate_size
            gate_up = torch.cat([t(m + "gate_proj.weight", (f, d)), t(m + "up_proj.weight", (f, d))])
            gate_up_b = None
            if s.mlp_bias:
                gate_up_b = torch.cat([t(m + "gate_proj.bias"), t(m + "up_proj.bias")])
            o = Linear(t(a + "o_proj.weight", (d, qo)), opt(a + "o_proj.bias", s.o_bias))
            layers.append(_Layer(
                Linear(qkv_w, qkv_b), o,
                Linear(gate_up, gate_up_b),
                Linear(t(m + "down_proj.weight", (d, f)), opt(m + "down_proj.bias", s.mlp_bias)),
                t(p + "input_layernorm.weight", (d,)), t(p + "post_attention_layernorm.weight", (d,)),
            ))  # fmt: skip
            if quantization != "none":
                layers[-1].quantize(quantization, for_cpu=for_cpu)
        embed = t("model.embed_tokens.weight", (s.vocab_size, d))
        head = None if s.tie_word_embeddings or "lm_head.weight" not in tensors else t("lm_head.weight")
        model = cls(s, embed, layers, t("model.norm.weight", (d,)), head).eval()
        if quantization != "none":
            model.quantize(quantization, for_cpu=for_cpu)
        elif for_cpu:
            model.pack()
        return model

    def pack(self) -> None:
        """Its float matrices (not a tied LM head: that is the embedding) in oneDNN's layout,
        where this CPU has oneDNN (`Linear.pack`): the same values and bytes, faster products."""
        for m in self.modules():
            if isinstance(m, Linear) and m.weight is not self.embed:
                m.pack()
        self._step_layers = None

    def quantize(self, mode: str, *, for_cpu: bool = True) -> None:
        """Replace every weight matrix by `mode` ('int8': per-output-channel scales; 'int4':
        group scales) and the embedding by int8 with per-row scales, in place. A tied LM head
        shares the int8 embedding and its row scales. Once only. `for_cpu`: as in
        `from_hf_state` (int4 matrices in torch's CPU layout run on the CPU only)."""
        if mode not in QUANTIZATIONS[1:]:
            raise ValueError(f"quantization {mode!r}: expected int8 or int4")
        if self.quantization != "none":
            raise ValueError(f"the model is already {self.quantization}")
        with torch.no_grad():
            tied = cast(Linear, self.lm_head).weight is self.embed
            for layer in self._layers():
                layer.quantize(mode, for_cpu=for_cpu)
            q, scale = Int8Linear.quantize(self.embed.data)
            head = cast(Linear, self.lm_head)
            make = Int8Linear.from_linear if mode == "int8" else _int4(for_cpu)
            self.lm_head = Int8Linear(q, scale, None) if tied else make(head)
            del self.embed
            self.register_buffer("embed", q)
            self.register_buffer("embed_scale", scale)
        self.quantization = mode
        self._step_layers = None

    def weight_bytes(self) -> int:
        """Bytes of every parameter and buffer (shared storage counted once)."""
        seen: dict[int, int] = {}
        for x in [*self.parameters(), *self.buffers()]:
            if x.is_mkldnn:  # a packed matrix (opaque storage): its own, as many bytes as plain
                seen[id(x)] = x.numel() * x.element_size()
            else:
                seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return sum(seen.values())

    # -- compute --------------------------------------------------------------------------

    def _layers(self) -> list[_Layer]:
        return [cast(_Layer, m) for m in self.layers]

    def _rotary(self) -> torch.Tensor:
        return cast(torch.Tensor, self.rotary)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.embed.index_select(0, flat).view(*ids.shape, -1)
        scale = cast("torch.Tensor | None", self.embed_scale)
        if scale is None:
            return rows
        return rows.to(self.dtype) * scale.index_select(0, flat).view(*ids.shape, 1).to(self.dtype)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and _FUSED_RMS_NORM:  # one call, the same formula
            return torch.rms_norm(x, weight.shape, weight, self.shape.rms_norm_eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.shape.rms_norm_eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
        """transformers' x * cos + rotate_half(x) * sin, on heads whose rotary halves are
        interleaved (`_interleave_rotary`): each pair (x_i, x_{i + D/2}) is adjacent, one
        complex number, turned by one complex multiply with e^(i theta) (`rotary` rows
        [..., 1, D/2]): one kernel instead of five, in float32 whatever x's dtype."""
        pairs = x.view(*x.shape[:-1], -1, 2)
        if x.dtype is torch.float32:
            return torch.view_as_real(torch.view_as_complex(pairs) * rotary).view(x.shape)
        turned = torch.view_as_complex(pairs.float()) * rotary
        return torch.view_as_real(turned).flatten(-2).to(x.dtype)

    def _qkv(
        self, layer: _Layer, x: torch.Tensor, rotary: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [..., H, D], k and v [..., Hkv, D] of `x` [..., d], RoPE applied."""
        s = self.shape
        qkv = layer.qkv(self._rms(x, layer.norm1))
        qk, v = qkv.split([(s.n_heads + s.n_kv_heads) * s.head_dim, s.n_kv_heads * s.head_dim], -1)
        lead = x.shape[:-1]
        qk = self._rope(qk.reshape(*lead, s.n_heads + s.n_kv_heads, s.head_dim), rotary)
        q, k = qk.split([s.n_heads, s.n_kv_heads], dim=-2)
        return q, k, v.reshape(*lead, s.n_kv_heads, s.head_dim)

    def _mm_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the matrices take their inputs in: bfloat16 where the quantized kernels
        round to it anyway (`linear.BF16_KERNELS`), so that the MLP runs between its products
        without converting back and forth and the outputs of `o` and `down` join the
        residual stream as they are (an add that widens them: the same sums); else x's."""
        if self.quantization != "none" and BF16_KERNELS and x.device.type == "cpu":
            return torch.bfloat16
        return x.dtype

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        h = self._rms(x, layer.norm2).to(self._mm_dtype(x))
        gate, up = layer.gate_up(h).chunk(2, dim=-1)
        return cast(torch.Tensor, layer.down(F.silu(gate).mul_(up)))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.lm_head(self._rms(x, self.norm))).float()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The unpaged reference: tokens [B, T] -> float32 logits [B, T, vocab]."""
        s = self.shape
        b, t = tokens.shape
        if t > s.max_seq_len:
            raise ValueError(f"{t} tokens exceed the context of {s.max_seq_len}")
        x = self._embed(tokens)
        rotary = self._rotary()[:t, None, :]  # [T, 1, D/2]
        rep, mm = s.n_heads // s.n_kv_heads, self._mm_dtype(x)
        for layer in self._layers():
            q, k, v = (y.transpose(1, 2) for y in self._qkv(layer, x, rotary))  # [B, h, T, D]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s.head_dim**-0.5)
            x = x + layer.o(a.transpose(1, 2).reshape(b, t, -1).to(mm))
            x = x + self._mlp(layer, x)
        return self._logits(x)

    def forward_paged(
        self, batch: PagedBatch, pool: PagedKVPool, *, all_logits: bool = False
    ) -> torch.Tensor:
        """Run `batch` against `pool`: float32 logits of each sequence's last token [S, vocab]
        (or of every row [N, vocab] with `all_logits`). Each layer writes the new tokens'
        K/V into their slots, then every query reads its context through its block table."""
        s, dev = self.shape, pool.k.device
        if max(batch.context_len) > s.max_seq_len:
            raise ValueError(f"a position passes the context of {s.max_seq_len}")
        plan = AttentionPlan(batch, pool.block_size, dev)
        x = self._embed(torch.tensor(batch.input_ids, device=dev))  # [N, d]
        rotary = self._rotary().index_select(0, plan.positions).unsqueeze(1)  # [N, 1, D/2]
        n, heads, kv_heads, d = x.shape[0], s.n_heads, s.n_kv_heads, s.head_dim
        widths, head_split = [(heads + kv_heads) * d, kv_heads * d], [heads, kv_heads]
        scale, same_dtype = d**-0.5, pool.k.dtype == x.dtype
        mm = self._mm_dtype(x)
        # One pass over the layers, the per-step tensors (plan, RoPE rows) built above; the
        # matrices are called through their bound kernels (no module hooks are used).
        layers, (final_norm, head) = self._kernels()
        for i, layer in enumerate(layers):
            qk, v = layer.qkv(layer.norm1(x)).split_with_sizes(widths, 1)
            q, k = self._rope(qk.view(n, heads + kv_heads, d), rotary).split_with_sizes(head_split, 1)
            v = v.view(n, kv_heads, d)
            k_pool, v_pool = pool.k_layers[i], pool.v_layers[i]
            if not same_dtype:
                k, v = k.to(k_pool.dtype), v.to(v_pool.dtype)
            k_pool.index_copy_(0, plan.slots, k)
            v_pool.index_copy_(0, plan.slots, v)
            a = paged_attention(plan, q, k_pool, v_pool, scale, (k, v))
            x = x + layer.o(a.reshape(n, -1).to(mm))
            gate, up = layer.gate_up(layer.norm2(x).to(mm)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate).mul_(up))
        if not all_logits and n > len(batch.query_start):  # else every row is its sequence's last
            x = x.index_select(0, torch.tensor(batch.last_rows(), device=dev))
        return head(final_norm(x)).float()
