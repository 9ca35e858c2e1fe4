"""Paged KV cache manager: per-sequence block tables over a shared block pool.

Pure bookkeeping on token and block ids (no torch). The generation engine asks it for
slots before each forward pass and carries out the copy instructions it returns; the
executor owns the K/V tensors, shaped `[num_blocks, block_size, ...]` per layer.

Outcomes are kept apart: running out of blocks is a return value (`None`; the caller
preempts with `choose_preemption_victim` and retries), misuse raises `ValueError`, a
sequence that could never fit raises `SequenceTooLong`, a broken invariant is an assert.

Guarantees:
- A block is written only by its single owner: appending to a sequence whose partial
  last block is shared (after `fork`) first moves it to a fresh block and returns the
  copy; full blocks are never written again, so prefix sharing cannot corrupt a cache.
- No deadlock: a sequence is admitted only if its prompt plus `max_new_tokens` fits in
  the whole pool, so preempting every other sequence always lets it run alone.
- Prefix reuse: a full block is indexed by its chained hash when it fills; a later
  prompt that starts with the same full blocks shares them (`num_cached_tokens` tells
  the engine what it need not compute). Freed indexed blocks stay cached until evicted,
  least recently freed first, a sequence's last blocks before its first.

Blocks are indexed when their slots are handed out, before the forward pass writes
them (a paged-attention step writes every new K/V before any attention reads it). If
that pass fails, free its sequences with `keep_cached=False`. Not thread-safe: one
scheduler loop owns a manager.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from edgefleet_api.types import Priority
from node_agent.errors import InsufficientMemory, RequestTooLarge
from node_agent.generation.kv_blocks import BlockHash, BlockPool, CopyOp, block_hash, chain_block_hashes

__all__ = [
    "Allocation",
    "AppendResult",
    "BlockPool",
    "CopyOp",
    "KVCacheConfig",
    "KVCacheManager",
    "Preemption",
    "ResizeResult",
    "SeqId",
    "SequenceTooLong",
    "block_size_for_context",
    "blocks_for_budget",
    "kv_bytes_per_token",
]

log = logging.getLogger(__name__)

SeqId = Hashable
"""A sequence's id: one per request, or per sample of a request with parallel samples."""


class SequenceTooLong(RequestTooLarge, InsufficientMemory, ValueError):
    """The prompt plus `max_new_tokens` needs more blocks than the whole pool holds."""


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V for one token across all layers: 2 x layers x kv_heads x head_dim x bytes."""
    for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim), ("dtype_bytes", dtype_bytes)):  # fmt: skip
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


MAX_DEFAULT_BLOCK_SIZE = 16
"""Default block size of long contexts (2048 tokens and more), as in vLLM: their sequences
hold hundreds of tokens, so the partial last block wastes under 1-2% of what they hold."""
MIN_DEFAULT_BLOCK_SIZE = 4
"""Smallest default block: below it the per-block books (an allocation every few tokens, a
prefix hash per block) cost more than the few slots they save."""
CONTEXT_TOKENS_PER_BLOCK = 128
"""The default block holds at most 1/128 of the context (see `block_size_for_context`)."""


def block_size_for_context(max_seq_len: int) -> int:
    """The default tokens per KV block for a model whose context is `max_seq_len` tokens:
    the largest power of two at most `max_seq_len / 128`, kept within [4, 16]
    (512 -> 4, 1024 -> 8, 2048 and longer -> 16).

    Why: a held sequence leaves on average (block - 1) / 2 slots of its last block empty,
    so KV utilization is about L / (L + (block - 1) / 2) for sequences holding L tokens,
    and stays >= 0.96 while L >= 12 (block - 1). The sequences a model serves are a
    fraction of its context (short contexts, short sequences: 59 tokens held at a 512-token
    context in the generation benchmark), and with block <= context / 128 the bound is
    L >= context / 11. A fixed 16 leaves 7.5 empty slots per sequence, 11% of such a short
    one. Small blocks cost no throughput: the paged attention gathers per slot, with
    index tensors built per step, so the number of blocks only changes a step's one pass
    over block ids (`transformer._Plan`).
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    block = MIN_DEFAULT_BLOCK_SIZE
    while block * 2 <= min(MAX_DEFAULT_BLOCK_SIZE, max_seq_len // CONTEXT_TOKENS_PER_BLOCK):
        block *= 2
    return block


def blocks_for_budget(budget_bytes: int, bytes_per_token: int, block_size: int = 16) -> int:
    """How many whole blocks fit in `budget_bytes` (the scheduler's grant for KV)."""
    if budget_bytes < 0 or bytes_per_token < 1 or block_size < 1:
        raise ValueError(
            f"need budget_bytes >= 0, bytes_per_token >= 1, block_size >= 1; got "
            f"{budget_bytes}, {bytes_per_token}, {block_size}"
        )
    return budget_bytes // (bytes_per_token * block_size)


@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    """Settings of one model's KV cache, validated once."""

    num_blocks: int
    """Device blocks in the pool (see `blocks_for_budget`)."""
    block_size: int = MAX_DEFAULT_BLOCK_SIZE
    """Tokens per block: a sequence wastes under one block. 16, as in vLLM, suits long
    contexts; engines size it from the model's context (`block_size_for_context`)."""
    enable_prefix_caching: bool = True
    """Index full blocks by chained hash and share them across requests."""
    num_host_blocks: int = 0
    """Host (CPU) blocks for swapping preempted sequences out; 0 means preemption always
    recomputes (frees the blocks; the prefix cache often gives them back)."""
    hash_seed: int | None = None
    """Root of the block hash chain; None draws a random one, so hashes are not
    predictable from outside the process."""

    def __post_init__(self) -> None:
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {self.num_host_blocks}")

    @classmethod
    def from_budget(
        cls,
        budget_bytes: int,
        bytes_per_token: int,
        block_size: int = 16,
        *,
        enable_prefix_caching: bool = True,
        num_host_blocks: int = 0,
        hash_seed: int | None = None,
    ) -> KVCacheConfig:
        """A config whose pool fills `budget_bytes`."""
        n = blocks_for_budget(budget_bytes, bytes_per_token, block_size)
        return cls(n, block_size, enable_prefix_caching, num_host_blocks, hash_seed)


@dataclass(frozen=True, slots=True)
class Allocation:
    """A newly admitted sequence: its blocks, and how many prompt tokens are already in
    them (shared prefix blocks) so the engine computes only the rest."""

    block_table: tuple[int, ...]
    num_cached_tokens: int
    new_blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Slots for appended tokens: blocks added to the table, and block copies the executor
    must run before writing (copy-on-write of a shared partial last block)."""

    new_blocks: tuple[int, ...] = ()
    copies: tuple[CopyOp, ...] = ()


_NO_CHANGE = AppendResult()


@dataclass(frozen=True, slots=True)
class Preemption:
    """A preempted sequence. Swapped: `copies` (device block -> host block) must run
    before the device blocks are reused, and `swap_in` brings it back. Not swapped: its
    blocks are freed; re-`allocate` it with prompt + generated tokens to recompute."""

    seq_id: SeqId
    swapped: bool
    copies: tuple[CopyOp, ...] = ()


@dataclass(frozen=True, slots=True)
class ResizeResult:
    """The outcome of `resize`. Apply `moves` (copy src -> dst) before dropping ids at or
    above `num_blocks`. `must_release` more blocks must be freed by preemption (then call
    `resize` again); the sequences in `too_long` can no longer fit even alone and must be
    aborted."""

    num_blocks: int
    moves: tuple[CopyOp, ...]
    evicted_cached: int
    must_release: int
    too_long: tuple[SeqId, ...] = ()


@dataclass(slots=True)
class _Seq:
    """One sequence's books. `table[i]` holds tokens [i*bs, (i+1)*bs)."""

    table: list[int]
    num_tokens: int
    max_tokens: int
    priority: Priority
    arrival_s: float
    order: int
    tail: list[int] = field(default_factory=list)
    """Tokens of the partial last block (kept only with prefix caching)."""
    hashes: list[BlockHash] = field(default_factory=list)
    """Identity of each full block (kept only with prefix caching)."""


class KVCacheManager:
    """Block tables, copy-on-write sharing, prefix reuse, preemption, swap and resize."""

    def __init__(self, config: KVCacheConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self._caching = config.enable_prefix_caching
        self._root = config.hash_seed if config.hash_seed is not None else secrets.randbits(62)
        self.pool = BlockPool(config.num_blocks)
        self._seqs: dict[SeqId, _Seq] = {}
        self._swapped: dict[SeqId, _Seq] = {}
        self._host_free: list[int] = list(range(config.num_host_blocks - 1, -1, -1))
        self._admitted = 0

    # -- queries -----------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_host_free_blocks(self) -> int:
        return len(self._host_free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def is_swapped(self, seq_id: SeqId) -> bool:
        return seq_id in self._swapped

    def sequences(self) -> list[SeqId]:
        """Sequences holding device blocks, in admission order."""
        return list(self._seqs)

    def block_table(self, seq_id: SeqId) -> tuple[int, ...]:
        return tuple(self._get(seq_id).table)

    def num_tokens(self, seq_id: SeqId) -> int:
        s = self._seqs.get(seq_id) or self._swapped.get(seq_id)
        if s is None:
            raise ValueError(f"unknown sequence {seq_id!r}")
        return s.num_tokens

    def slot_mapping(self, seq_id: SeqId, start: int, stop: int) -> list[int]:
        """Flat slot index (block * block_size + offset) of tokens [start, stop)."""
        s, bs = self._get(seq_id), self.block_size
        if not 0 <= start <= stop <= s.num_tokens:
            raise ValueError(f"token range [{start}, {stop}) outside 0..{s.num_tokens}")
        return [s.table[i // bs] * bs + i % bs for i in range(start, stop)]

    def _get(self, seq_id: SeqId) -> _Seq:
        s = self._seqs.get(seq_id)
        if s is None:
            where = "swapped out" if seq_id in self._swapped else "unknown"
            raise ValueError(f"sequence {seq_id!r} is {where}")
        return s

    # -- admission and growth ----------------------------------------------------------

    def allocate(
        self,
        seq_id: SeqId,
        prompt_token_ids: Sequence[int],
        max_new_tokens: int,
        *,
        priority: Priority = Priority.NORMAL,
        arrival_s: float = 0.0,
    ) -> Allocation | None:
        """Admit a sequence with blocks for its prompt, sharing cached prefix blocks.

        Returns None, changing nothing, if too few blocks are free now. Raises
        `SequenceTooLong` if prompt + `max_new_tokens` exceeds the whole pool.
        `arrival_s` (monotonic clock) orders preemption; ties go by admission order.
        """
        if seq_id in self._seqs or seq_id in self._swapped:
            raise ValueError(f"sequence {seq_id!r} already exists")
        n = len(prompt_token_ids)
        if n < 1 or max_new_tokens < 0:
            raise ValueError(f"need a non-empty prompt and max_new_tokens >= 0, got {n}, "
                             f"{max_new_tokens}")  # fmt: skip
        if self.blocks_needed(n + max_new_tokens) > self.pool.num_blocks:
            raise SequenceTooLong(
                f"{n} prompt + {max_new_tokens} new tokens need "
                f"{self.blocks_needed(n + max_new_tokens)} blocks of {self.block_size}; "
                f"the KV cache holds {self.pool.num_blocks}"
            )
        pool, bs = self.pool, self.block_size
        hashes: list[BlockHash] = []
        hits: list[int] = []
        if self._caching:
            tokens = list(prompt_token_ids)
            hashes = chain_block_hashes(self._root, tokens, bs)
            for key in hashes[: (n - 1) // bs]:  # the last prompt token is always computed
                b = pool.lookup(key)
                if b is None:
                    break
                hits.append(b)
        need = self.blocks_needed(n) - len(hits)
        revive = sum(1 for b in hits if pool.refcount(b) == 0)
        if need + revive > pool.num_free:
            return None
        for b in hits:
            pool.share(b)
        new = pool.allocate(need)
        assert new is not None, "free-block count lied"
        table = hits + new
        if len(hashes) > len(hits):
            pool.register_many(new, hashes[len(hits) :])
        s = _Seq(table, n, n + max_new_tokens, priority, arrival_s, self._admitted)
        self._admitted += 1
        if self._caching:
            s.hashes = hashes
            s.tail = tokens[len(hashes) * bs :]
        self._seqs[seq_id] = s
        log.debug("kv: admitted %r, %d tokens, %d cached", seq_id, n, len(hits) * bs)
        return Allocation(tuple(table), len(hits) * bs, tuple(new))

    def append_slots(self, seq_id: SeqId, token_ids: Sequence[int]) -> AppendResult | None:
        """Make room for `token_ids` after the sequence's tokens (their K/V is written
        by the next forward pass). Returns None, changing nothing, if blocks run out."""
        s = self._get(seq_id)
        k = len(token_ids)
        if k == 0:
            return _NO_CHANGE
        total = s.num_tokens + k
        if total > s.max_tokens:
            raise ValueError(
                f"sequence {seq_id!r} would hold {total} tokens; it was admitted for {s.max_tokens}"
            )
        bs, pool, table = self.block_size, self.pool, s.table
        num_new = -(-total // bs) - len(table)
        cow = s.num_tokens % bs != 0 and pool.refcount(table[-1]) > 1
        if num_new + cow > pool.num_free:
            return None
        copies: tuple[CopyOp, ...] = ()
        if cow:
            got = pool.allocate(1)
            assert got is not None
            src = table[-1]
            table[-1] = got[0]
            pool.release((src,))
            copies = (CopyOp(src, got[0]),)
        new: list[int] = []
        if num_new:
            got = pool.allocate(num_new)
            assert got is not None
            new = got
            table.extend(new)
        s.num_tokens = total
        if self._caching:
            if len(s.tail) + k < bs:
                s.tail.extend(token_ids)
            else:
                self._hash_filled(s, token_ids)
        if not new and not copies:
            return _NO_CHANGE  # most decode steps: skip building a result
        return AppendResult(tuple(new), copies)

    def _hash_filled(self, s: _Seq, token_ids: Sequence[int]) -> None:
        """Index the blocks that `token_ids` just filled."""
        tail, bs = s.tail, self.block_size
        tail.extend(token_ids)
        while len(tail) >= bs:
            key = block_hash(s.hashes[-1][0] if s.hashes else self._root, tuple(tail[:bs]))
            del tail[:bs]
            self.pool.register(s.table[len(s.hashes)], key)
            s.hashes.append(key)

    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        """A new sequence sharing all of the parent's blocks (a beam or a parallel sample);
        the first append to either copies a shared partial last block. Needs no blocks."""
        p = self._get(parent_id)
        if child_id in self._seqs or child_id in self._swapped:
            raise ValueError(f"sequence {child_id!r} already exists")
        for b in p.table:
            self.pool.share(b)
        self._seqs[child_id] = _Seq(
            list(p.table), p.num_tokens, p.max_tokens, p.priority, p.arrival_s,
            self._admitted, list(p.tail), list(p.hashes),
        )  # fmt: skip
        self._admitted += 1

    def free(self, seq_id: SeqId, *, keep_cached: bool = True) -> None:
        """Release a finished (or recompute-preempted) sequence's blocks, last block
        first, so its tail is evicted before its prefix; or drop a swapped-out one.
        After a failed forward pass pass `keep_cached=False`: blocks indexed for that
        step were never written, so blocks left unreferenced are not kept for reuse."""
        s = self._swapped.pop(seq_id, None)
        if s is not None:
            self._host_free.extend(s.table)
            return
        s = self._seqs.pop(seq_id, None)
        if s is None:
            raise ValueError(f"unknown sequence {seq_id!r}")
        self.pool.release(reversed(s.table), keep_cached=keep_cached)

    # -- preemption --------------------------------------------------------------------

    def choose_preemption_victim(self, running: Iterable[SeqId]) -> SeqId | None:
        """The lowest-priority, latest-arrived of `running` (None if empty). Include the
        sequence that needs blocks: if it is the victim, preempt it rather than another."""
        best: SeqId | None = None
        best_key: tuple[int, float, int] | None = None
        for seq_id in running:
            s = self._get(seq_id)
            key = (int(s.priority), s.arrival_s, s.order)
            if best_key is None or key > best_key:
                best, best_key = seq_id, key
        return best

    def preempt(self, seq_id: SeqId) -> Preemption:
        """Take a sequence's device blocks back: swap it to host blocks if configured
        and room is left, else free it for recompute."""
        s = self._get(seq_id)
        if len(s.table) <= len(self._host_free):
            host = [self._host_free.pop() for _ in s.table]
            copies = tuple(CopyOp(d, h) for d, h in zip(s.table, host, strict=True))
            self.pool.release(reversed(s.table))
            s.table = host
            self._swapped[seq_id] = self._seqs.pop(seq_id)
            log.debug("kv: swapped out %r (%d blocks)", seq_id, len(host))
            return Preemption(seq_id, True, copies)
        self.free(seq_id)
        log.debug("kv: preempted %r for recompute", seq_id)
        return Preemption(seq_id, False)

    def swap_in(self, seq_id: SeqId) -> tuple[CopyOp, ...] | None:
        """Bring a swapped-out sequence back; returns host block -> device block copies
        to run before its next forward pass, or None (nothing changed) if blocks run out."""
        s = self._swapped.get(seq_id)
        if s is None:
            raise ValueError(f"sequence {seq_id!r} is not swapped out")
        dev = self.pool.allocate(len(s.table))
        if dev is None:
            return None
        copies = tuple(CopyOp(h, d) for h, d in zip(s.table, dev, strict=True))
        self._host_free.extend(s.table)
        s.table = dev
        self.pool.register_many(dev, s.hashes)
        self._seqs[seq_id] = self._swapped.pop(seq_id)
        return copies

    # -- resize ------------------------------------------------------------------------

    def resize(self, num_blocks: int) -> ResizeResult:
        """Grow or shrink the pool when the scheduler changes the model's KV budget.

        Shrinking evicts cached free blocks first and moves used blocks below the new
        size; `must_release` blocks are still to be freed by preemption when the used
        blocks exceed it. Call again with the same size after preempting.
        """
        moves, evicted = self.pool.resize(num_blocks)
        if moves:
            remap = {m.src: m.dst for m in moves}
            for s in self._seqs.values():
                s.table = [remap.get(b, b) for b in s.table]
        too_long = tuple(
            sid for sid, s in (*self._seqs.items(), *self._swapped.items())
            if self.blocks_needed(s.max_tokens) > num_blocks
        )  # fmt: skip
        must = self.pool.pending_release
        if moves or evicted or must:
            log.debug("kv: resized to %d blocks: %d moves, %d evicted, %d to release",
                      num_blocks, len(moves), evicted, must)  # fmt: skip
        return ResizeResult(num_blocks, tuple(moves), evicted, must, too_long)

    # -- invariants --------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert: free + used = total; refcount == number of table references (so no
        block is held twice without a shared reference); refcounts never negative;
        cached-free blocks have refcount 0; every table matches its token count; a
        hashed block in a table holds that sequence's tokens; a shared partial block is
        the last block of each holder at the same fill; host blocks owned once."""
        bs = self.block_size
        refs = Counter(b for s in self._seqs.values() for b in s.table)
        self.pool.check_invariants(refs)
        tails: dict[int, tuple[int, int]] = {}
        for sid, s in self._seqs.items():
            assert len(s.table) == self.blocks_needed(s.num_tokens), f"{sid!r}: table size"
            assert s.num_tokens <= s.max_tokens, f"{sid!r}: past its max tokens"
            self._check_hashes(sid, s)
            full = s.num_tokens // bs
            for i, b in enumerate(s.table[:full]):
                h = self.pool.block_hash(b)
                assert h is None or not self._caching or h == s.hashes[i], (
                    f"{sid!r}: block {b} is indexed with other tokens"
                )
            if full < len(s.table):
                b, at = s.table[-1], (full, s.num_tokens % bs)
                assert self.pool.block_hash(b) is None, f"{sid!r}: partial block hashed"
                assert tails.setdefault(b, at) == at, f"{sid!r}: shared partial block {b}"
        for s in self._seqs.values():
            for b in s.table[: s.num_tokens // bs]:
                assert b not in tails, f"block {b} is full in one table, partial in another"
        host = [b for s in self._swapped.values() for b in s.table] + self._host_free
        assert sorted(host) == list(range(self.config.num_host_blocks)), "host blocks"
        for sid, s in self._swapped.items():
            assert len(s.table) == self.blocks_needed(s.num_tokens), f"{sid!r}: host table"
            self._check_hashes(sid, s)

    def _check_hashes(self, sid: SeqId, s: _Seq) -> None:
        if not self._caching:
            return
        bs = self.block_size
        assert len(s.hashes) == s.num_tokens // bs, f"{sid!r}: hash count"
        assert len(s.tail) == s.num_tokens % bs, f"{sid!r}: tail length"
        parent = self._root
        for key in s.hashes:
            assert key == block_hash(parent, key[2]) and len(key[2]) == bs, f"{sid!r}: broken hash chain"
            parent = key[0]
