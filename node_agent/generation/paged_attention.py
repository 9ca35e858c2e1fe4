"""Paged attention over the KV block pool, shared by every model the engine runs.

- `PagedKVPool`: K and V tensors shaped [layers, num_blocks, block_size, kv_heads, head_dim];
  the `KVCacheManager` decides which block ids a sequence owns, the pool holds the values.
- `PagedBatch`: one forward pass over several sequences (prefill and decode rows mixed).
- `AttentionPlan`: the batch's slot indices, built once per step (a few tensor operations,
  so small blocks cost no more than large ones) and used by every layer.
- `paged_attention`: every query row attends over its context gathered from the pool,
  with grouped-query attention (kv_heads dividing heads; query head h reads K/V head
  h // (heads // kv_heads), as Hugging Face's `repeat_kv` does). A lone decode row whose
  blocks are consecutive (one sequence on a pool: the block manager hands out the lowest
  free ids) reads its context in place, a view of the pool, not a copy.

A model writes each layer's new K/V at `plan.slots` before it calls `paged_attention`
(a step writes every new K/V before any attention reads it; the KV manager relies on it).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = ["AttentionPlan", "KVShape", "PagedBatch", "PagedKVPool", "paged_attention"]


class KVShape(Protocol):
    """What the pool needs of a model's config."""

    @property
    def n_layers(self) -> int: ...
    @property
    def n_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...


class PagedKVPool:
    """Paged K/V storage, one tensor per layer (as vLLM keeps it): `k[layer]` and `v[layer]`
    shaped [num_blocks, block_size, heads, head_dim]. A token's slot is
    `block * block_size + offset` (as `KVCacheManager.slot_mapping`); `k_slots[layer]` is the
    same storage as [slots, kv_heads, head_dim], contiguous, so a step reads a layer's context
    with one `index_select` of whole rows."""

    def __init__(
        self,
        config: KVShape,
        num_blocks: int,
        block_size: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Flat views [layers, slots, heads, head_dim] share storage with k and v.
        self.k_slots = self.k.view(shape[0], num_blocks * block_size, *shape[3:])
        self.v_slots = self.v.view(shape[0], num_blocks * block_size, *shape[3:])
        # each layer's view, made once (a step indexes them per layer)
        self.k_layers: list[torch.Tensor] = list(self.k_slots.unbind(0))
        self.v_layers: list[torch.Tensor] = list(self.v_slots.unbind(0))

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy every layer's K and V of block `src` into block `dst`, for each (src, dst)."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.k.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.k.device)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


@dataclass(slots=True)
class PagedBatch:
    """One forward pass over several sequences, their new tokens concatenated.

    Sequence i owns flat rows [query_start[i], query_start[i] + query_len[i]); those are
    its tokens at positions context_len[i] - query_len[i] .. context_len[i] - 1, and its
    K/V for positions [0, context_len[i]) lives at `block_tables[i]` (earlier positions
    were written by earlier passes or are shared prefix blocks).
    """

    input_ids: list[int]
    query_start: list[int]
    query_len: list[int]
    context_len: list[int]
    block_tables: list[Sequence[int]]

    @classmethod
    def build(cls, seqs: Sequence[tuple[Sequence[int], int, Sequence[int]]]) -> PagedBatch:
        """From (new token ids, context length after them, block table) per sequence."""
        ids: list[int] = []
        starts, lens, ctx, tables = [], [], [], []
        for tokens, context_len, table in seqs:
            if not 1 <= len(tokens) <= context_len:
                raise ValueError(f"{len(tokens)} new tokens for a context of {context_len}")
            starts.append(len(ids))
            lens.append(len(tokens))
            ctx.append(context_len)
            tables.append(table)
            ids.extend(tokens)
        return cls(ids, starts, lens, ctx, tables)

    def last_rows(self) -> list[int]:
        """The flat row of each sequence's last token (whose logits predict the next)."""
        return [s + n - 1 for s, n in zip(self.query_start, self.query_len, strict=True)]


class AttentionPlan:
    """Index tensors for one `PagedBatch`, built once and used by every layer.

    Built with a handful of tensor operations whatever the block size: the block tables
    are packed once into a padded [S, blocks] tensor (one Python pass over block ids, not
    over tokens), and every slot is `table[seq, pos // block_size] * block_size +
    pos % block_size` (for a batch of decode rows only, the common step, positions and
    slots are a few Python integers per sequence). Decode rows (one new token) share one
    gather of their whole blocks and one attention call; a prefill whose whole context is
    new attends to its own K/V (causal), and one that continues cached blocks gathers its
    context.
    """

    def __init__(self, batch: PagedBatch, block_size: int, device: torch.device) -> None:
        bs = block_size
        ctx_list, qlen_list = batch.context_len, batch.query_len
        nblk = [-(-c // bs) for c in ctx_list]
        width = max(nblk)
        rows: list[list[int]] = []
        for c, n, blocks in zip(ctx_list, nblk, batch.block_tables, strict=True):
            if n > len(blocks):
                raise ValueError(f"context of {c} tokens needs more than {len(blocks)} blocks")
            rows.append([*itertools.islice(blocks, n), *itertools.repeat(0, width - n)])
        self.block_size = bs
        num_seqs = len(nblk)
        decode = [i for i, n in enumerate(qlen_list) if n == 1]
        self.decode_span: tuple[int, int] | None = None
        if len(decode) == 1:  # one decode row in consecutive blocks: its context is a view
            c, blocks = ctx_list[decode[0]], rows[decode[0]][: nblk[decode[0]]]
            if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
                self.decode_span = (blocks[0] * bs, blocks[0] * bs + c)
        # [S, blocks], 0-padded (not needed by a lone decode row read as a view)
        lone = self.decode_span is not None and num_seqs == 1
        self.table = (
            torch.empty(0, dtype=torch.long) if lone else torch.tensor(rows, dtype=torch.long, device=device)
        )
        # The new tokens: row r belongs to sequence seq[r], at position positions[r].
        if len(decode) == num_seqs:
            pos = [c - 1 for c in ctx_list]
            self.positions = torch.tensor(pos, device=device)
            self.slots = torch.tensor([r[p // bs] * bs + p % bs for r, p in zip(rows, pos, strict=True)],
                                      device=device)  # fmt: skip
        else:
            ctx = torch.tensor(ctx_list, device=device)
            qlen = torch.tensor(qlen_list, device=device)
            seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), qlen)
            starts = torch.tensor(batch.query_start, device=device)
            flat_rows = torch.arange(len(batch.input_ids), device=device)
            self.positions = (ctx - qlen)[seq] + flat_rows - starts[seq]
            self.slots = self._slots(seq, self.positions)
        self.has_decode = bool(decode)
        decode_all = len(decode) == len(batch.input_ids)
        self.decode_index: torch.Tensor | None = None
        """The flat rows of the decode rows, unless every row is one."""
        self._masks: dict[torch.dtype, torch.Tensor] = {}
        self.decode_mask: torch.Tensor | None = None
        if decode:
            dwidth = max(nblk[i] for i in decode)
            if not decode_all:
                self.decode_index = torch.tensor([batch.query_start[i] for i in decode], device=device)
            if self.decode_span is None:
                dtable = self.table if decode_all else self.table[torch.tensor(decode, device=device)]
                self.decode_blocks = dtable[:, :dwidth].reshape(-1)  # [S * blocks]: whole blocks
            if len(decode) == 1:  # one sequence: its context cut from its blocks, no mask
                self.decode_shape = (1, ctx_list[decode[0]])
            else:  # [S, 1, 1, W]: each row's context within the longest one's whole blocks
                self.decode_shape = (len(decode), dwidth * bs)
                dctx = torch.tensor([ctx_list[i] for i in decode], device=device)
                pos_t = torch.arange(dwidth * bs, device=device)
                self.decode_mask = (pos_t[None, :] < dctx[:, None])[:, None, None, :]
        self.prefills: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]] = []
        for i, (start, n, c) in enumerate(zip(batch.query_start, qlen_list, ctx_list, strict=True)):
            if n == 1:
                continue
            if n == c:  # nothing cached: causal attention over its own new K/V
                self.prefills.append((start, n, None, None))
                continue
            pos_t = torch.arange(c, device=device)
            mask = pos_t[None, :] <= pos_t[c - n :, None]  # [n, ctx]
            self.prefills.append((start, n, self._slots(torch.tensor(i, device=device), pos_t), mask))

    def decode_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """`decode_mask` as SDPA adds it (0 or -inf, in `dtype`), made once for every layer."""
        mask = self.decode_mask
        if mask is None:
            return None
        bias = self._masks.get(dtype)
        if bias is None:
            bias = self._masks[dtype] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, float("-inf")
            )
        return bias

    def _slots(self, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Slot of position `pos` of sequence `seq` (broadcast)."""
        bs = self.block_size
        return self.table[seq, torch.div(pos, bs, rounding_mode="floor")] * bs + pos % bs


def paged_attention(
    plan: AttentionPlan,
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    scale: float,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention output [N, H, D] of every row of `q` [N, H, D] over its context in the
    pool (`k_pool`/`v_pool` [slots, kv_heads, D] of one layer, already holding this step's
    new K/V). Query heads are grouped over the kv heads without copying K/V (SDPA's
    grouped-query mode for prefill rows). `new_kv`: this step's K and V [N, kv_heads, D] as
    written to the pool, which a prefill with nothing cached then reads instead of the pool."""
    dtype = q.dtype
    heads, kv_heads, d = q.shape[1], k_pool.shape[1], q.shape[2]
    rep = heads // kv_heads
    assert rep * kv_heads == heads, f"{heads} query heads over {kv_heads} kv heads"
    if plan.has_decode:
        s, w = plan.decode_shape  # w: the longest context's whole blocks (the mask cuts each)
        bs = plan.block_size
        if plan.decode_span is not None:  # one sequence in consecutive blocks: read in place
            span = slice(*plan.decode_span)
            kc, vc = k_pool[None, span], v_pool[None, span]
        else:
            kc = k_pool.view(-1, bs, kv_heads, d).index_select(0, plan.decode_blocks).view(s, -1, kv_heads, d)
            vc = v_pool.view(-1, bs, kv_heads, d).index_select(0, plan.decode_blocks).view(s, -1, kv_heads, d)
            kc, vc = kc[:, :w], vc[:, :w]
        if kc.dtype != dtype:
            kc, vc = kc.to(dtype), vc.to(dtype)
        qd = q if plan.decode_index is None else q.index_select(0, plan.decode_index)
        # [S, kv_heads, rep, D]: the rep query heads of a group are its "query rows"
        a = F.scaled_dot_product_attention(
            qd.view(s, kv_heads, rep, d), kc.transpose(1, 2), vc.transpose(1, 2),
            attn_mask=plan.decode_bias(dtype), scale=scale,
        ).reshape(s, heads, d)  # fmt: skip
        if plan.decode_index is None:
            return a
        out = torch.empty_like(q)
        out.index_copy_(0, plan.decode_index, a)
    else:
        out = torch.empty_like(q)
    for start, n, ctx_slots, mask in plan.prefills:
        rows = slice(start, start + n)
        if ctx_slots is None and new_kv is not None:  # all new: the K/V just written
            kc, vc = new_kv[0][rows], new_kv[1][rows]
        else:  # its cached context and new rows; or all new, read back (no `new_kv` given)
            slots = plan.slots[rows] if ctx_slots is None else ctx_slots
            kc, vc = k_pool.index_select(0, slots), v_pool.index_select(0, slots)
        kc, vc = kc.to(dtype).transpose(0, 1), vc.to(dtype).transpose(0, 1)  # [kv_heads, ctx, D]
        a = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), kc, vc, attn_mask=mask, is_causal=mask is None, scale=scale,
            enable_gqa=rep > 1,
        )  # [H, n, D]  # fmt: skip
        out[rows] = a.transpose(0, 1)
    return out
