"""The linear maps' kernels (`node_agent.generation.linear`): each gives the product it
stands for, whichever kernel the shape picks.

- float: oneDNN above `ONEDNN_MIN_MACS`, MKL below, both float32 products (within 1e-4 x
  sqrt(n) of the float64 product of n-term sums of unit-size terms, what float32 gives);
- packed float matrices (oneDNN's layout) give the products of the plain ones and quantize
  to the same int8;
- int8: the fused int8 kernel (<= `INT8_FUSED_MAX_ROWS` rows) and the bfloat16 product
  beyond agree with x @ (q * scale)^T within bfloat16's rounding of the inputs (~0.4%);
- int4: the torch layout (where bfloat16 is native) and the portable layout both equal the
  expanded group-scaled matrix within that rounding, and take the same bytes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from node_agent.generation.linear import (
    INT4_KERNELS,
    INT8_FUSED_MAX_ROWS,
    ONEDNN_AVAILABLE,
    Int4Linear,
    Int8Linear,
    Linear,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BF16_REL = 0.01
"""Relative error allowed where the inputs are rounded to bfloat16 (8 bits of mantissa)."""


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


@pytest.mark.parametrize("rows", [1, 3, 16, 70])
@pytest.mark.parametrize("out,inp", [(64, 64), (1024, 512)])  # below / above ONEDNN_MIN_MACS at 1 row
def test_float_products_equal_f_linear_on_both_sides_of_the_threshold(
    gen: torch.Generator, rows: int, out: int, inp: int
) -> None:
    w, b = torch.randn(out, inp, generator=gen), torch.randn(out, generator=gen)
    x = torch.randn(rows, inp, generator=gen)
    want = x.double() @ w.double().t() + b.double()
    lin = Linear(w, b)
    with torch.inference_mode():
        got, got_3d = lin(x), lin(x.view(1, rows, inp))
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    assert (got.double() - want).abs().max().item() < 1e-4 * inp**0.5
    assert torch.equal(got_3d[0], got)
    assert torch.allclose(got, F.linear(x, w, b), atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_matrix_gives_the_same_products_and_quantizes_the_same(
    gen: torch.Generator, dtype: torch.dtype
) -> None:
    w, b = torch.randn(1024, 512, generator=gen, dtype=dtype), torch.randn(1024, generator=gen, dtype=dtype)
    plain, packed = Linear(w, b), Linear(w.clone(), b)
    assert packed.pack() == ONEDNN_AVAILABLE
    assert torch.equal(packed.dense_weight(), w)
    for rows in (1, 3, 16, 70):
        x = torch.randn(rows, 512, generator=gen, dtype=dtype)
        with torch.inference_mode():
            got, want, got_3d = packed(x), plain(x), packed(x.view(1, rows, 512))
        tol = 1e-4 * 512**0.5 if dtype == torch.float32 else BF16_REL * want.abs().max().item()
        assert got.dtype == dtype and (got.double() - want.double()).abs().max().item() < tol
        assert torch.equal(got_3d[0], got)
    q_plain, q_packed = Int8Linear.from_linear(plain), Int8Linear.from_linear(packed)
    assert torch.equal(q_plain.qweight, q_packed.qweight) and torch.equal(q_plain.scale, q_packed.scale)


@pytest.mark.parametrize("rows", [1, INT8_FUSED_MAX_ROWS, INT8_FUSED_MAX_ROWS + 1, 100])
def test_int8_products_equal_the_dequantized_matrix(gen: torch.Generator, rows: int) -> None:
    w, b = torch.randn(192, 128, generator=gen), torch.randn(192, generator=gen)
    q8 = Int8Linear.from_linear(Linear(w, b))
    qweight, scale = q8.qweight, q8.scale
    assert isinstance(qweight, torch.Tensor) and isinstance(scale, torch.Tensor)
    assert qweight.dtype == torch.int8 and scale.dtype == torch.float32  # int8 stays int8 in memory
    x = torch.randn(rows, 128, generator=gen)
    want = x.double() @ (qweight.double() * scale.double()[:, None]).t() + b.double()
    with torch.inference_mode():
        got = q8(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 192)
    assert rel_err(got, want) < BF16_REL
    # and it is close to the float matrix it quantized (int8: ~0.4% of a row's largest weight)
    assert rel_err(got, F.linear(x, w, b)) < 0.05


def int4_reference(layer: Int4Linear, x: torch.Tensor, w: torch.Tensor, group: int) -> torch.Tensor:
    """x @ W4^T with W4 the group-quantized `w` (computed here, independently of `layer`)."""
    out, inp = w.shape
    g = w.double().view(out, inp // group, group)
    s = (g.abs().amax(-1) / 7.0).clamp(min=1e-12)
    w4 = (torch.round(g / s[..., None]).clamp(-7, 7) * s[..., None]).view(out, inp)
    return x.double() @ w4.t()


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int4_products_equal_the_group_quantized_matrix_in_either_layout(
    gen: torch.Generator, rows: int
) -> None:
    w = torch.randn(128, 256, generator=gen)
    x = torch.randn(rows, 256, generator=gen)
    portable = Int4Linear.from_linear(Linear(w, None), portable=True)
    native = Int4Linear.from_linear(Linear(w, None))  # torch's layout where this machine has its kernel
    assert isinstance(portable, Int4Linear) and isinstance(native, Int4Linear)
    assert not portable.torch_layout and native.torch_layout == INT4_KERNELS
    for layer in (portable, native):
        with torch.inference_mode():
            got = layer(x)
        assert got.dtype == torch.float32 and got.shape == (rows, 128)
        tol = BF16_REL if layer.torch_layout else 1e-5
        assert rel_err(got, int4_reference(layer, x, w, layer.group)) < tol
    nbytes = [sum(b.numel() * b.element_size() for b in m.buffers()) for m in (portable, native)]
    assert nbytes[0] == nbytes[1] == 128 * 256 // 2 + 128 * (256 // 64) * 4


def test_int4_falls_back_to_int8_where_groups_do_not_divide(gen: torch.Generator) -> None:
    q = Int4Linear.from_linear(Linear(torch.randn(32, 96, generator=gen), None))
    assert isinstance(q, Int8Linear)
