"""Linear maps y = x W^T (+ b) with float, int8 and int4 weights, and the CPU kernels they use.

The engine's decode step is mostly these products (two thirds of its time on a CPU), on a
few rows (one per running sequence) against weights that do not fit in the cache. Which
kernel is fastest depends on the shape, so each call picks:

- float weights (`Linear`): oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, what
  torch's inductor calls on CPU) for products of at least `ONEDNN_MIN_MACS`; below that,
  `F.linear` (MKL), whose smaller fixed cost (~1 us against ~10 us) wins on tiny products.
  Both compute in the weights' dtype with float32 sums (oneDNN's float32 is IEEE float32
  unless `torch.backends.mkldnn` is told otherwise): measured on 1 core of an AVX-512 CPU,
  oneDNN is 1.2-1.5x MKL at 1-16 rows with weights from memory and 2x at 64 rows or more.
  A model's matrices are packed once at load (`Linear.pack`: oneDNN's own blocked layout,
  which an unpacked call re-lays out every time): then oneDNN at any size, 1.3-1.9x faster
  again at a decode step's rows.
- int8 weights (`Int8Linear`, per-output-channel scales): on CPUs where oneDNN computes
  bfloat16 natively, the matmul input is rounded to bfloat16 and multiplied with the int8
  matrix directly (`torch._weight_int8pack_mm`, float32 sums) up to `INT8_FUSED_MAX_ROWS`
  rows (a decode step), or with the matrix converted to bfloat16 (exactly: |q| <= 127) by
  oneDNN beyond (a prefill, where the conversion is repaid by the rows). Elsewhere (no
  bfloat16, or not a CPU) the matrix is converted to the input's dtype for each call.
  The weight stays int8 in memory either way.
- int4 weights (`Int4Linear`, group scales): on those CPUs, in torch's own int4 layout,
  multiplied by `torch._weight_int4pack_mm_for_cpu` (bfloat16 inputs, float32 sums) at any
  number of rows; elsewhere the matrix is converted for each call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BF16_KERNELS", "INT4_GROUP", "INT4_KERNELS", "ONEDNN_AVAILABLE", "PACK_ROWS", "QUANTIZE_ROWS",
           "Int4Linear", "Int8Linear", "Linear", "RowsKernel", "matmul"]  # fmt: skip

QUANTIZE_ROWS = 1024
"""Output channels quantized at a time: bounds the float temporaries (a few MiB)."""
INT4_GROUP = 64
"""Inputs per int4 scale: 64 (as GPTQ/AWQ's 128 or llama.cpp's 32, between): a scale per 64
weights costs 1/16 of a byte each."""
ONEDNN_MIN_MACS = 1 << 18
"""Multiply-adds (rows x outputs x inputs) from which oneDNN beats MKL on one core: its ~10 us
fixed cost against a faster kernel. Measured with the weights coming from memory, as in a
decode step: a 512 x 512 matrix at one row took 54 us with oneDNN, 64 us with MKL; a 256 x 256
one at 2 rows is below (MKL: 4 us against 14 us, its weights in cache)."""
PACK_ROWS = 16
"""The row count oneDNN's packed layout is chosen for (`Linear.pack`): a decode step's rows;
products of any other count use it too."""
INT8_FUSED_MAX_ROWS = 16
"""Rows up to which `torch._weight_int8pack_mm` beats converting the int8 matrix to bfloat16
and calling oneDNN (measured: about equal at 16 rows; 4x faster at 1 row, 2x slower at 64)."""


def _onednn_linear() -> Any:
    """oneDNN's float linear on CPU (None where torch lacks it)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def _bf16_native() -> bool:
    """Whether oneDNN computes bfloat16 natively here (AVX-512 BF16 or AMX on x86)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and hasattr(torch, "_weight_int8pack_mm")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_linear()
ONEDNN_AVAILABLE = _ONEDNN is not None
"""Whether oneDNN's float linear is there (and `Linear.pack` packs CPU matrices)."""
BF16_KERNELS = _ONEDNN is not None and _bf16_native()
"""Whether int8 products take bfloat16 inputs through torch's int8 and oneDNN kernels here."""
INT4_KERNELS = BF16_KERNELS and hasattr(torch, "_weight_int4pack_mm_for_cpu")
"""Whether int4 matrices are kept in torch's CPU int4 layout and multiplied by its kernel."""


RowsKernel = Callable[[torch.Tensor], torch.Tensor]
"""A matrix's product as a plain function of x [rows, in], its tensors bound once: what a
model's per-step loop calls, without a module's attribute lookups and dispatch on every
call. Valid until the module is changed or moved (the model makes them anew then)."""


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T (+ bias), with the faster kernel for the shape."""
    if (
        _ONEDNN is not None
        and x.device.type == "cpu"
        and x.numel() // x.shape[-1] * weight.numel() >= ONEDNN_MIN_MACS
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
    ):
        return cast(torch.Tensor, _ONEDNN(x, weight, bias, "none", [], ""))
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """y = x W^T (+ b), weights in the compute dtype. `pack()` puts the matrix in oneDNN's
    own layout (see there); `dense_weight()` is the plain [out, in] matrix either way."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        shared = isinstance(weight, nn.Parameter)  # a tied LM head: the embedding itself
        self.weight = weight if shared else nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.packed = False

    def pack(self) -> bool:
        """Keep the matrix in oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`,
        an opaque tensor of the same values and bytes) and multiply with oneDNN at any number
        of rows: unpacked, oneDNN re-lays the whole matrix out on every call, which is most of
        a decode step's product (measured on 1 core, weights from memory: 1.3-1.9x faster at
        1-16 rows for matrices of 512 x 512 and up; 8192 x 256 at 16 rows 0.51 ms against
        0.81; only matrices under ~2^18 weights at 1 row lose a few us to MKL). A CPU float32
        or bfloat16 matrix of its own (not a tied embedding) where oneDNN is; else nothing
        changes. Returns whether it is packed."""
        w = self.weight
        if (
            not self.packed
            and _ONEDNN is not None
            and w.device.type == "cpu"
            and (w.dtype in (torch.float32, torch.bfloat16) and w.dim() == 2)
        ):
            packed = torch.ops.mkldnn._reorder_linear_weight(w.data, PACK_ROWS)
            self.weight = nn.Parameter(packed, requires_grad=False)
            self.packed = True
        return self.packed

    def dense_weight(self) -> torch.Tensor:
        """The plain [out, in] matrix (a copy when packed)."""
        return self.weight.to_dense() if self.packed else self.weight.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return cast(torch.Tensor, _ONEDNN(x, self.weight, self.bias, "none", [], ""))
        return matmul(x, self.weight, self.bias)

    def rows_kernel(self) -> RowsKernel:
        """`forward` for [rows, in] inputs with the module's tensors bound (see `RowsKernel`)."""
        if not self.packed:
            return self.forward
        weight, bias, onednn = self.weight, self.bias, _ONEDNN
        return lambda x: cast(torch.Tensor, onednn(x, weight, bias, "none", [], ""))


class Int8Linear(nn.Module):
    """Weight-only int8: W ~= q * scale[:, None], q int8 in [-127, 127], one float32 scale
    per output channel (max |w| / 127 of its row). y = (x q^T) * scale (+ b), the product
    as the module docstring says."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        assert qweight.dtype == torch.int8 and scale.shape == qweight.shape[:1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # the fused kernel's scales, converted once (counted with the weights: 2 bytes a row)
        self.register_buffer(
            "scale_bf16", scale.to(torch.bfloat16) if BF16_KERNELS else None, persistent=False
        )

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 rows, float32 scale per row) of a [out, in] weight, `QUANTIZE_ROWS` rows at
        a time (the float temporaries of a large embedding stay small)."""
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        for start in range(0, weight.shape[0], QUANTIZE_ROWS):
            rows = slice(start, start + QUANTIZE_ROWS)
            w = weight[rows].float()
            s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
            q[rows] = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
            scale[rows] = s
        return q, scale

    @classmethod
    def from_linear(cls, lin: Linear) -> Int8Linear:
        q, scale = cls.quantize(lin.dense_weight())
        return cls(q, scale, None if lin.bias is None else lin.bias.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qweight, scale = cast(torch.Tensor, self.qweight), cast(torch.Tensor, self.scale)
        if BF16_KERNELS and x.device.type == "cpu":
            y = self._bf16(x.reshape(-1, x.shape[-1]), qweight, scale).view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, qweight.to(x.dtype)) * scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def rows_kernel(self) -> RowsKernel:
        """`forward` for [rows, in] inputs with the module's tensors bound (see `RowsKernel`)."""
        qweight, scale = cast(torch.Tensor, self.qweight), cast(torch.Tensor, self.scale_bf16)
        bias, forward = self.bias, self.forward
        if not (BF16_KERNELS and qweight.device.type == "cpu"):
            return forward
        fused, bf16, max_rows = torch._weight_int8pack_mm, torch.bfloat16, INT8_FUSED_MAX_ROWS

        def kernel(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > max_rows:
                return cast(torch.Tensor, forward(x))
            dtype = x.dtype
            if dtype is not bf16:  # (no-op calls cost too, at 33 products a step)
                y = fused(x.to(bf16), qweight, scale).to(dtype)
            else:
                y = fused(x if x.is_contiguous() else x.contiguous(), qweight, scale)
            return y if bias is None else y + bias

        return kernel

    def _bf16(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [rows, in] through bfloat16 products with float32 sums; output in x's dtype
        (bfloat16 inputs are taken as they are and give bfloat16: no conversions)."""
        xb = x.to(torch.bfloat16).contiguous()
        if x.shape[0] <= INT8_FUSED_MAX_ROWS:
            return torch._weight_int8pack_mm(xb, qweight, cast(torch.Tensor, self.scale_bf16)).to(x.dtype)
        y = cast(torch.Tensor, _ONEDNN(xb, qweight.to(torch.bfloat16), None, "none", [], ""))
        return y.to(x.dtype) * scale.to(x.dtype)


class Int4Linear(nn.Module):
    """Weight-only int4 with group scales: W[o, g*G:(g+1)*G] ~= (q - 8) * scale[o, g], q in
    [1, 15], G = `group` inputs, two weights to a byte either way:

    - on CPUs with native bfloat16 (and out % 16 == 0): `packed` in the layout of
      `torch._convert_weight_to_int4pack_for_cpu` and `scale` as its [groups, out, 2]
      bfloat16 (scale, zero = 0) table, multiplied by `torch._weight_int4pack_mm_for_cpu`
      on bfloat16 inputs (float32 sums), the matrix never expanded;
    - elsewhere: `packed` [out, in / 2] (even input in the low nibble) and float32 `scale`
      [out, groups], the matrix expanded to the input's dtype for each call."""

    def __init__(
        self, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, group: int,
        *, torch_layout: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        groups = packed.shape[1] * 2 // group
        expected = (groups, packed.shape[0], 2) if torch_layout else (packed.shape[0], groups)
        assert packed.dtype == torch.uint8 and scale.shape == expected
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group
        self.torch_layout = torch_layout

    @classmethod
    def from_linear(
        cls, lin: Linear, group: int = INT4_GROUP, *, portable: bool = False
    ) -> Int4Linear | Int8Linear:
        """The int4 form of `lin` (torch's layout where `INT4_KERNELS` allows, unless
        `portable`); int8 when its inputs do not split into groups of `group`."""
        weight = lin.dense_weight()
        out, inp = weight.shape
        if inp % group or inp % 2:
            return Int8Linear.from_linear(lin)
        fast = INT4_KERNELS and not portable and weight.device.type == "cpu" and out % 16 == 0
        packed = torch.empty(out, inp // 2, dtype=torch.uint8, device=weight.device)
        scale = torch.empty(out, inp // group, dtype=torch.float32, device=weight.device)
        for start in range(0, out, QUANTIZE_ROWS):  # in slices: small float temporaries
            rows = slice(start, start + QUANTIZE_ROWS)
            g = weight[rows].float().view(-1, inp // group, group)
            s = (g.abs().amax(dim=-1) / 7.0).clamp(min=1e-12)  # [rows, groups]
            q = (torch.round(g / s[..., None]).clamp(-7, 7) + 8).view(-1, inp)
            if fast:  # packed in 1024-row slices: the same bytes as packing all at once
                packed[rows] = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            else:
                q = q.to(torch.uint8)
                packed[rows] = q[:, 0::2] | (q[:, 1::2] << 4)
            scale[rows] = s
        bias = None if lin.bias is None else lin.bias.data
        if fast:
            table = torch.stack((scale.t(), torch.zeros_like(scale.t())), dim=-1).to(torch.bfloat16)
            return cls(packed, table.contiguous(), bias, group, torch_layout=True)
        return cls(packed, scale, bias, group)

    def rows_kernel(self) -> RowsKernel:
        """`forward` (see `RowsKernel`)."""
        return self.forward

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The expanded [out, in] matrix (the portable layout only)."""
        assert not self.torch_layout, "torch's int4 layout is multiplied, never expanded"
        packed, scale = cast(torch.Tensor, self.packed), cast(torch.Tensor, self.scale)
        out = packed.shape[0]
        q = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(out, -1, self.group).to(dtype) - 8
        return (q * scale.to(dtype)[..., None]).view(out, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.torch_layout:
            return matmul(x, self.weight(x.dtype), self.bias)
        packed, table = cast(torch.Tensor, self.packed), cast(torch.Tensor, self.scale)
        xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(xb, packed, self.group, table).to(x.dtype)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias
