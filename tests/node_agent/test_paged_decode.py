"""The decode step's shortcuts give what the general paths give.

- A lone decode row whose blocks are consecutive reads its context as a view of the pool
  (`AttentionPlan.decode_span`); the same context in scattered blocks is gathered: equal
  attention outputs, and the plan says which path it took.
- Several decode rows (gathered, an additive mask made once per step) equal each row run
  alone.
- `rms_kernel`: RMSNorm of up to `FEW_ROWS` rows as a LayerNorm of [x, -x] equals torch's
  RMSNorm; more rows go to the general kernel.
"""

from __future__ import annotations

import pytest
import torch

from node_agent.generation.hf_llama import FEW_ROWS, rms_kernel
from node_agent.generation.paged_attention import AttentionPlan, PagedBatch, PagedKVPool, paged_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Shape:
    n_layers, n_kv_heads, head_dim = 1, 2, 8


BS, HEADS = 4, 4


def pool_with(contexts: dict[tuple[int, ...], torch.Tensor]) -> PagedKVPool:
    """A pool whose blocks hold each context's K (its values) and V (its values + 1)."""
    pool = PagedKVPool(Shape(), 32, BS)
    for blocks, kv in contexts.items():
        slots = torch.tensor([b * BS + i for b in blocks for i in range(BS)][: kv.shape[0]])
        pool.k_slots[0].index_copy_(0, slots, kv)
        pool.v_slots[0].index_copy_(0, slots, kv + 1)
    return pool


Rows = list[tuple[int, tuple[int, ...]]]


def attend(pool: PagedKVPool, rows: Rows, q: torch.Tensor) -> tuple[AttentionPlan, torch.Tensor]:
    """Attention of one decode row per (context length, block table)."""
    batch = PagedBatch.build([([1], ctx, table) for ctx, table in rows])
    plan = AttentionPlan(batch, BS, torch.device("cpu"))
    return plan, paged_attention(plan, q, pool.k_slots[0], pool.v_slots[0], 0.3)


def test_a_lone_row_reads_consecutive_blocks_in_place_and_scattered_ones_gathered() -> None:
    gen = torch.Generator().manual_seed(1)
    kv = torch.randn(10, Shape.n_kv_heads, Shape.head_dim, generator=gen)
    q = torch.randn(1, HEADS, Shape.head_dim, generator=gen)
    consecutive, scattered = (5, 6, 7), (9, 2, 30)
    pool = pool_with({consecutive: kv, scattered: kv})
    plan_a, a = attend(pool, [(10, consecutive)], q)
    plan_b, b = attend(pool, [(10, scattered)], q)
    assert plan_a.decode_span == (5 * BS, 5 * BS + 10) and plan_b.decode_span is None
    assert torch.equal(a, b)
    # the reference: softmax(q k^T) v over the 10 positions, query head h reading kv head h // 2
    k, v = kv.repeat_interleave(2, dim=1), (kv + 1).repeat_interleave(2, dim=1)  # [10, H, D]
    want = torch.einsum("ht,thd->hd", torch.softmax(torch.einsum("hd,thd->ht", q[0], k) * 0.3, -1), v)
    assert torch.allclose(a[0], want, atol=1e-5)


def test_several_decode_rows_equal_each_row_alone() -> None:
    gen = torch.Generator().manual_seed(2)
    tables = {(0, 1, 2): 11, (8, 3): 5, (12, 13, 14, 15): 16}
    contexts = {t: torch.randn(n, Shape.n_kv_heads, Shape.head_dim, generator=gen) for t, n in tables.items()}
    pool = pool_with(contexts)
    q = torch.randn(len(tables), HEADS, Shape.head_dim, generator=gen)
    rows = [(n, t) for t, n in tables.items()]
    plan, together = attend(pool, rows, q)
    assert plan.decode_mask is not None and plan.decode_bias(torch.float32) is plan.decode_bias(torch.float32)
    for i, row in enumerate(rows):
        assert torch.allclose(together[i], attend(pool, [row], q[i : i + 1])[1][0], atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS, FEW_ROWS + 1, 40])
def test_rms_kernel_equals_torchs_rms_norm(rows: int) -> None:
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(rows, 96, generator=gen) * 3, torch.randn(96, generator=gen)
    calls: list[int] = []

    def general(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[0])
        return torch.rms_norm(t, w.shape, w, 1e-6)

    with torch.inference_mode():
        got = rms_kernel(w, 1e-6, general)(x)
    assert torch.allclose(got, torch.rms_norm(x, w.shape, w, 1e-6), atol=1e-5, rtol=1e-5)
    assert calls == ([] if rows <= FEW_ROWS else [rows])
