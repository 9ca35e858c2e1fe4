"""Paged KV cache manager: exact behaviour on tiny pools, and invariants under random
operation sequences, checked against a simulated executor that really moves tokens."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edgefleet_api.types import Priority
from node_agent.errors import InsufficientMemory
from node_agent.generation.kv_blocks import BlockPool, CopyOp, chain_block_hashes
from node_agent.generation.kv_cache import (
    Allocation,
    AppendResult,
    KVCacheConfig,
    KVCacheManager,
    SequenceTooLong,
    block_size_for_context,
    blocks_for_budget,
    kv_bytes_per_token,
)

SEED = 1234
Memory = dict[int, list[int | None]]


def make(num_blocks: int, block_size: int = 4, **kwargs: object) -> KVCacheManager:
    cfg = KVCacheConfig(num_blocks, block_size, hash_seed=SEED, **kwargs)  # type: ignore[arg-type]
    return KVCacheManager(cfg)


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# -- sizing ----------------------------------------------------------------------------


def test_bytes_per_token_and_blocks_from_budget() -> None:
    assert kv_bytes_per_token(num_layers=2, num_kv_heads=4, head_dim=8, dtype_bytes=2) == 256
    assert blocks_for_budget(256 * 16 * 10 + 255, 256, 16) == 10
    cfg = KVCacheConfig.from_budget(256 * 16 * 10, 256, num_host_blocks=3)
    assert (cfg.num_blocks, cfg.block_size, cfg.num_host_blocks) == (10, 16, 3)
    with pytest.raises(ValueError):
        kv_bytes_per_token(0, 4, 8, 2)
    with pytest.raises(ValueError):
        blocks_for_budget(100, 0)
    with pytest.raises(ValueError):
        KVCacheConfig(4, block_size=0)


def test_default_block_size_follows_the_context() -> None:
    """A block is at most 1/128 of the context, a power of two within [4, 16]."""
    got = {ctx: block_size_for_context(ctx) for ctx in (1, 128, 511, 512, 1023, 1024, 2048, 4096, 1 << 20)}
    assert got == {1: 4, 128: 4, 511: 4, 512: 4, 1023: 4, 1024: 8, 2048: 16, 4096: 16, 1 << 20: 16}
    with pytest.raises(ValueError):
        block_size_for_context(0)


# -- allocation and append -------------------------------------------------------------


def test_allocate_takes_blocks_for_the_prompt_only() -> None:
    m = make(8)
    a = m.allocate("a", toks(0, 10), max_new_tokens=6)
    assert a == Allocation(block_table=(0, 1, 2), num_cached_tokens=0, new_blocks=(0, 1, 2))
    assert m.num_free_blocks == 5
    assert m.slot_mapping("a", 8, 10) == [8, 9]
    m.check_invariants()


def test_append_fills_the_last_block_before_taking_another() -> None:
    m = make(8)
    m.allocate("a", toks(0, 10), max_new_tokens=20)
    assert m.append_slots("a", [10, 11]) == AppendResult()
    assert m.append_slots("a", [12]) == AppendResult(new_blocks=(3,))
    assert m.block_table("a") == (0, 1, 2, 3)
    assert m.append_slots("a", toks(13, 8)) == AppendResult(new_blocks=(4, 5))
    assert m.num_tokens("a") == 21
    assert m.slot_mapping("a", 12, 13) == [12]
    m.check_invariants()


def test_allocation_shortfall_returns_none_and_changes_nothing() -> None:
    m = make(4)
    m.allocate("a", toks(0, 12), max_new_tokens=4)
    assert m.allocate("b", toks(100, 5), max_new_tokens=0) is None
    assert "b" not in m and m.num_free_blocks == 1
    m.append_slots("a", toks(12, 4))
    assert m.append_slots("a", []) == AppendResult()
    m.check_invariants()


def test_append_shortfall_returns_none_and_changes_nothing() -> None:
    m = make(3)
    m.allocate("a", toks(0, 8), max_new_tokens=4)
    m.allocate("b", toks(50, 3), max_new_tokens=1)
    assert m.append_slots("a", [8]) is None
    assert m.num_tokens("a") == 8 and m.block_table("a") == (0, 1)
    m.free("b")
    assert m.append_slots("a", [8]) == AppendResult(new_blocks=(2,))
    m.check_invariants()


# -- fork and copy-on-write --------------------------------------------------------------


def test_fork_shares_blocks_and_append_copies_the_shared_partial_block() -> None:
    m = make(8)
    m.allocate("p", toks(0, 6), max_new_tokens=10)
    m.fork("p", "c")
    assert m.block_table("c") == (0, 1)
    assert (m.pool.refcount(0), m.pool.refcount(1)) == (2, 2)
    assert m.num_free_blocks == 6
    r = m.append_slots("c", [99])
    assert r == AppendResult(new_blocks=(), copies=(CopyOp(src=1, dst=2),))
    assert m.block_table("c") == (0, 2) and m.block_table("p") == (0, 1)
    assert [m.pool.refcount(b) for b in (0, 1, 2)] == [2, 1, 1]
    # The parent now owns its partial block alone: it writes in place.
    assert m.append_slots("p", [6]) == AppendResult()
    m.check_invariants()


def test_fork_with_a_full_last_block_needs_no_copy() -> None:
    m = make(8)
    m.allocate("p", toks(0, 8), max_new_tokens=8)
    m.fork("p", "c")
    assert m.append_slots("c", [8]) == AppendResult(new_blocks=(2,))
    assert m.append_slots("p", [8]) == AppendResult(new_blocks=(3,))
    assert m.block_table("c") == (0, 1, 2) and m.block_table("p") == (0, 1, 3)
    m.check_invariants()


def test_copy_on_write_without_a_free_block_returns_none() -> None:
    m = make(2)
    m.allocate("p", toks(0, 6), max_new_tokens=2)
    m.fork("p", "c")
    assert m.num_free_blocks == 0
    assert m.append_slots("c", [6]) is None
    assert m.block_table("c") == (0, 1) and m.pool.refcount(1) == 2
    m.free("p")  # now "c" owns block 1 alone and writes in place
    assert m.append_slots("c", [6]) == AppendResult()
    m.check_invariants()


# -- prefix caching ----------------------------------------------------------------------


def test_prefix_hit_across_two_requests() -> None:
    m = make(8)
    m.allocate("a", toks(0, 9), max_new_tokens=0)
    b = m.allocate("b", [*toks(0, 8), 99, 98], max_new_tokens=0)
    assert b == Allocation(block_table=(0, 1, 3), num_cached_tokens=8, new_blocks=(3,))
    assert (m.pool.refcount(0), m.pool.refcount(1), m.pool.refcount(2)) == (2, 2, 1)
    m.check_invariants()


def test_prefix_hit_leaves_the_last_prompt_token_to_compute() -> None:
    m = make(8)
    m.allocate("a", toks(0, 8), max_new_tokens=0)
    b = m.allocate("b", toks(0, 8), max_new_tokens=0)
    assert b == Allocation(block_table=(0, 2), num_cached_tokens=4, new_blocks=(2,))
    assert m.pool.block_hash(2) is None  # block 1 already holds that content
    m.check_invariants()


def test_generated_tokens_become_a_reusable_prefix() -> None:
    m = make(8)
    m.allocate("a", toks(0, 3), max_new_tokens=8)
    m.append_slots("a", [3])
    m.append_slots("a", [4, 5, 6, 7])
    b = m.allocate("b", toks(0, 9), max_new_tokens=0)
    assert b is not None and b.num_cached_tokens == 8 and b.block_table[:2] == (0, 1)


def test_freed_cached_blocks_are_reused_by_a_later_request() -> None:
    m = make(8)
    m.allocate("a", toks(0, 9), max_new_tokens=0)
    m.free("a")
    assert m.num_free_blocks == 8
    assert m.pool.eviction_order() == [1, 0]  # the partial block 2 is plain-free
    b = m.allocate("b", toks(0, 9), max_new_tokens=0)
    assert b == Allocation(block_table=(0, 1, 2), num_cached_tokens=8, new_blocks=(2,))
    assert m.num_free_blocks == 5 and m.pool.eviction_order() == []
    m.check_invariants()


def test_eviction_takes_plain_free_first_then_least_recently_freed() -> None:
    m = make(6)
    m.allocate("a", toks(0, 8), max_new_tokens=0)  # blocks 0, 1
    m.allocate("b", toks(100, 8), max_new_tokens=0)  # blocks 2, 3
    m.free("a")
    m.free("b")
    assert m.pool.eviction_order() == [1, 0, 3, 2]
    c = m.allocate("c", toks(200, 16), max_new_tokens=0)
    assert c is not None and c.block_table == (4, 5, 1, 0)
    assert m.pool.eviction_order() == [3, 2]
    first_a, first_b = (chain_block_hashes(SEED, t, 4)[0] for t in (toks(0, 4), toks(100, 4)))
    assert m.pool.lookup(first_a) is None and m.pool.lookup(first_b) == 2
    # b's first block revives; its second (last prompt token) is recomputed into block 3,
    # the least recently freed, which is evicted for it.
    b2 = m.allocate("b2", toks(100, 8), max_new_tokens=0)
    assert b2 == Allocation(block_table=(2, 3), num_cached_tokens=4, new_blocks=(3,))
    assert m.num_free_blocks == 0
    m.check_invariants()


def test_reviving_cached_blocks_counts_against_free_blocks() -> None:
    m = make(3)
    m.allocate("a", toks(0, 8), max_new_tokens=0)
    m.free("a")
    m.allocate("x", toks(500, 1), max_new_tokens=0)  # takes plain-free block 2
    # 9 tokens: 2 cached blocks to revive + 1 new, but only those 2 are free.
    assert m.allocate("b", toks(0, 9), max_new_tokens=0) is None
    assert m.pool.eviction_order() == [1, 0]
    m.check_invariants()


def test_free_without_keeping_cache_forgets_unwritten_blocks() -> None:
    m = make(8)
    m.allocate("ok", toks(0, 4), max_new_tokens=0)  # block 0, shared below
    m.allocate("failed", toks(0, 9), max_new_tokens=0)  # hits block 0; indexes block 1
    m.free("failed", keep_cached=False)  # its forward pass failed: block 1 never written
    assert m.pool.eviction_order() == [] and m.pool.refcount(0) == 1
    again = m.allocate("retry", toks(0, 9), max_new_tokens=0)
    assert again is not None and again.num_cached_tokens == 4  # only the written block
    m.check_invariants()


def test_prefix_caching_off_shares_nothing() -> None:
    m = make(8, enable_prefix_caching=False)
    m.allocate("a", toks(0, 9), max_new_tokens=0)
    b = m.allocate("b", toks(0, 9), max_new_tokens=0)
    assert b == Allocation(block_table=(3, 4, 5), num_cached_tokens=0, new_blocks=(3, 4, 5))
    m.free("a")
    assert m.pool.eviction_order() == [] and m.num_free_blocks == 5
    m.check_invariants()


# -- refusal and misuse --------------------------------------------------------------------


def test_a_sequence_that_can_never_fit_is_refused() -> None:
    m = make(4)
    with pytest.raises(SequenceTooLong) as err:
        m.allocate("a", toks(0, 10), max_new_tokens=7)  # 17 tokens: 5 blocks of 4
    assert isinstance(err.value, ValueError) and isinstance(err.value, InsufficientMemory)
    assert "a" not in m
    assert m.allocate("a", toks(0, 10), max_new_tokens=6) is not None  # exactly 4 blocks


def test_misuse_raises_value_error() -> None:
    m = make(8)
    m.allocate("a", toks(0, 4), max_new_tokens=2)
    with pytest.raises(ValueError):
        m.allocate("a", toks(0, 4), max_new_tokens=2)
    with pytest.raises(ValueError):
        m.allocate("e", [], max_new_tokens=2)
    with pytest.raises(ValueError):
        m.append_slots("a", [4, 5, 6])  # admitted for 6 tokens
    with pytest.raises(ValueError):
        m.append_slots("nope", [1])
    with pytest.raises(ValueError):
        m.free("nope")
    with pytest.raises(ValueError):
        m.fork("a", "a")
    with pytest.raises(ValueError):
        m.slot_mapping("a", 0, 5)
    with pytest.raises(ValueError):
        BlockPool(-1)


# -- preemption ------------------------------------------------------------------------------


def test_victim_is_lowest_priority_then_latest_arrival() -> None:
    m = make(16)
    for sid, prio, t in [("a", Priority.HIGH, 1.0), ("b", Priority.LOW, 0.5),
                         ("c", Priority.LOW, 2.0), ("d", Priority.NORMAL, 3.0)]:  # fmt: skip
        m.allocate(sid, toks(0, 2), max_new_tokens=2, priority=prio, arrival_s=t)
    assert m.choose_preemption_victim(["a", "b", "c", "d"]) == "c"
    assert m.choose_preemption_victim(["a", "b", "d"]) == "b"
    assert m.choose_preemption_victim(["a", "d"]) == "d"
    assert m.choose_preemption_victim([]) is None
    m.fork("a", "a2")  # same priority and arrival as "a": admitted later, so it goes first
    assert m.choose_preemption_victim(["a2", "a"]) == "a2"


def test_recompute_preemption_frees_blocks_and_readmission_hits_the_prefix() -> None:
    m = make(4)
    m.allocate("old", toks(0, 6), max_new_tokens=6, arrival_s=1.0)
    m.allocate("new", toks(100, 6), max_new_tokens=6, arrival_s=2.0)
    m.append_slots("new", [106, 107])
    assert m.append_slots("old", [6, 7, 8]) is None
    victim = m.choose_preemption_victim(m.sequences())
    assert victim == "new"
    p = m.preempt(victim)
    assert not p.swapped and p.copies == () and "new" not in m
    assert m.append_slots("old", [6, 7, 8]) == AppendResult(new_blocks=(3,))
    m.free("old")
    again = m.allocate("new", toks(100, 8), max_new_tokens=4, arrival_s=2.0)
    assert again is not None and again.num_cached_tokens == 4
    m.check_invariants()


def test_swap_out_and_back_in_when_host_blocks_are_configured() -> None:
    m = make(4, num_host_blocks=3)
    m.allocate("a", toks(0, 6), max_new_tokens=2)
    m.allocate("b", toks(50, 8), max_new_tokens=0)
    p = m.preempt("a")
    assert p.swapped and p.copies == (CopyOp(0, 0), CopyOp(1, 1))
    assert m.is_swapped("a") and m.num_host_free_blocks == 1 and m.num_free_blocks == 2
    with pytest.raises(ValueError):
        m.append_slots("a", [6])
    assert m.num_tokens("a") == 6
    m.allocate("c", toks(70, 5), max_new_tokens=0)  # takes the two freed blocks
    assert m.swap_in("a") is None and m.is_swapped("a")
    m.check_invariants()
    m.free("c")
    copies = m.swap_in("a")
    assert copies is not None and [c.src for c in copies] == [0, 1]
    assert m.block_table("a") == tuple(c.dst for c in copies)
    assert m.num_host_free_blocks == 3 and m.append_slots("a", [6, 7]) == AppendResult()
    # Too big for the host space left: falls back to recompute.
    m.allocate("d", toks(90, 1), max_new_tokens=0)
    m.preempt("a")
    assert not m.preempt("b").swapped and "b" not in m
    m.free("a")  # dropping a swapped sequence gives its host blocks back
    assert m.num_host_free_blocks == 3
    m.check_invariants()


# -- resize ----------------------------------------------------------------------------------


def test_resize_grow_makes_room() -> None:
    m = make(3)
    m.allocate("a", toks(0, 8), max_new_tokens=4)
    m.allocate("b", toks(100, 2), max_new_tokens=0)
    assert m.append_slots("a", [8]) is None
    r = m.resize(4)
    assert (r.num_blocks, r.moves, r.evicted_cached, r.must_release) == (4, (), 0, 0)
    assert m.append_slots("a", [8]) == AppendResult(new_blocks=(3,))
    m.check_invariants()


def test_resize_shrink_evicts_cached_blocks_first_and_moves_used_ones() -> None:
    m = make(8)
    m.allocate("a", toks(0, 8), max_new_tokens=0)  # blocks 0, 1, then cached-free
    m.allocate("keep", toks(300, 4), max_new_tokens=0)  # block 2
    m.free("a")
    r = m.resize(2)
    assert r.moves == (CopyOp(src=2, dst=1),) and r.evicted_cached == 1
    assert r.must_release == 0 and r.too_long == ()
    assert m.block_table("keep") == (1,) and m.num_free_blocks == 1
    assert m.pool.eviction_order() == [0]
    m.check_invariants()


def test_resize_shrink_below_used_reports_blocks_to_release() -> None:
    m = make(8)
    m.allocate("a", toks(0, 12), max_new_tokens=4)  # 0, 1, 2
    m.allocate("b", toks(100, 12), max_new_tokens=8)  # 3, 4, 5; may reach 5 blocks
    r = m.resize(4)
    assert r.moves == () and r.must_release == 2 and r.too_long == ("b",)
    assert m.num_free_blocks == 0 and m.pool.pending_release == 2
    assert m.allocate("c", toks(900, 1), max_new_tokens=0) is None
    m.check_invariants()
    m.preempt("a")  # its three full blocks become cached-free, below the new size
    r = m.resize(4)
    assert r.moves == (CopyOp(4, 2), CopyOp(5, 1)) and r.evicted_cached == 2
    assert r.must_release == 0 and m.block_table("b") == (3, 2, 1)
    m.check_invariants()
    m.free("b")
    assert m.num_free_blocks == 4 and len(m.pool._ref) == 4
    m.check_invariants()


def test_releasing_a_block_above_a_shrunk_pool_drops_it() -> None:
    m = make(4)
    m.allocate("a", toks(0, 16), max_new_tokens=0)
    assert m.resize(2).must_release == 2
    m.free("a")
    assert m.num_free_blocks == 2 and m.pool.pending_release == 0
    m.check_invariants()
    r = m.resize(5)
    assert m.num_free_blocks == 5 and r.must_release == 0
    m.check_invariants()


# -- invariants under random operations ---------------------------------------------------------


class KVCacheMachine(RuleBasedStateMachine):
    """Random operations against a simulated executor: device and host memory hold real
    token ids per slot; every copy and write the manager asks for is carried out, and
    every sequence must read back exactly its own tokens."""

    BS = 4
    CACHING = True
    HOST_BLOCKS = 5

    def __init__(self) -> None:
        super().__init__()
        self.m = make(10, self.BS, enable_prefix_caching=self.CACHING,
                      num_host_blocks=self.HOST_BLOCKS)  # fmt: skip
        self.dev: Memory = {}
        self.host: Memory = {}
        self.tokens: dict[str, list[int]] = {}
        self.max_tokens: dict[str, int] = {}
        self.next_id = 0

    def _running(self) -> list[str]:
        return [s for s in self.tokens if s in self.m]

    def _copy(self, copies: tuple[CopyOp, ...], src: Memory, dst: Memory) -> None:
        for c in copies:
            dst[c.dst] = list(src.get(c.src, [None] * self.BS))

    def _write(self, sid: str, start: int) -> None:
        toks_ = self.tokens[sid]
        for i, slot in enumerate(self.m.slot_mapping(sid, start, len(toks_)), start):
            block, off = divmod(slot, self.BS)
            assert self.m.pool.refcount(block) == 1, "writing into a shared block"
            self.dev.setdefault(block, [None] * self.BS)[off] = toks_[i]

    @rule(data=st.data(), n=st.integers(1, 14), extra=st.integers(0, 12))
    def allocate(self, data: st.DataObject, n: int, extra: int) -> None:
        # A common stem and a tiny vocabulary make shared prefixes common.
        stem = data.draw(st.integers(0, n))
        rest = data.draw(st.lists(st.integers(0, 1), min_size=n - stem, max_size=n - stem))
        prompt = [7, 3, 5, 7, 1, 2, 4, 6, 8, 9, 3, 2, 1, 0][:stem] + rest
        sid = f"s{self.next_id}"
        self.next_id += 1
        if self.m.blocks_needed(n + extra) > self.m.num_blocks:
            with pytest.raises(SequenceTooLong):
                self.m.allocate(sid, prompt, extra)
            return
        free = self.m.num_free_blocks
        a = self.m.allocate(sid, prompt, extra)
        if a is None:
            assert self.m.num_free_blocks == free and sid not in self.m
            return
        self.tokens[sid], self.max_tokens[sid] = prompt, n + extra
        cached = [self.dev[b] for b in a.block_table[: a.num_cached_tokens // self.BS]]
        assert [t for blk in cached for t in blk] == prompt[: a.num_cached_tokens]
        self._write(sid, a.num_cached_tokens)

    @precondition(lambda self: self._running())
    @rule(data=st.data(), k=st.integers(1, 5))
    def append(self, data: st.DataObject, k: int) -> None:
        sid = data.draw(st.sampled_from(self._running()))
        new = data.draw(st.lists(st.integers(0, 1), min_size=k, max_size=k))
        start = len(self.tokens[sid])
        if start + k > self.max_tokens[sid]:
            with pytest.raises(ValueError):
                self.m.append_slots(sid, new)
            return
        r = self.m.append_slots(sid, new)
        if r is None:
            assert self.m.num_tokens(sid) == start
            return
        self._copy(r.copies, self.dev, self.dev)
        self.tokens[sid] = self.tokens[sid] + new
        self._write(sid, start)

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(self._running()))
        child = f"s{self.next_id}"
        self.next_id += 1
        self.m.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        self.max_tokens[child] = self.max_tokens[parent]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.m.free(sid, keep_cached=data.draw(st.booleans()))
        del self.tokens[sid]

    @precondition(lambda self: self._running())
    @rule()
    def preempt_victim(self) -> None:
        sid = self.m.choose_preemption_victim(self._running())
        assert isinstance(sid, str)
        p = self.m.preempt(sid)
        if p.swapped:
            self._copy(p.copies, self.dev, self.host)
        else:
            del self.tokens[sid]  # the engine would re-allocate it to recompute

    @precondition(lambda self: any(self.m.is_swapped(s) for s in self.tokens))
    @rule(data=st.data())
    def swap_in(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from([s for s in self.tokens if self.m.is_swapped(s)]))
        copies = self.m.swap_in(sid)
        if copies is not None:
            self._copy(copies, self.host, self.dev)

    @rule(n=st.integers(0, 16))
    def resize(self, n: int) -> None:
        used = self.m.pool.num_used
        r = self.m.resize(n)
        self._copy(r.moves, self.dev, self.dev)
        assert r.must_release == max(0, used - n) == self.m.pool.pending_release
        for sid in r.too_long:
            assert isinstance(sid, str)
            self.m.free(sid)
            del self.tokens[sid]

    @invariant()
    def books_balance(self) -> None:
        self.m.check_invariants()

    @invariant()
    def every_sequence_reads_its_own_tokens(self) -> None:
        for sid, want in self.tokens.items():
            mem = self.host if self.m.is_swapped(sid) else self.dev
            table = self.m._swapped[sid].table if self.m.is_swapped(sid) else (
                self.m.block_table(sid))  # fmt: skip
            got = [mem[b][i % self.BS] for i, b in
                   ((i, table[i // self.BS]) for i in range(len(want)))]  # fmt: skip
            assert got == want, f"{sid}: cache corrupted"


class KVCacheNoCachingMachine(KVCacheMachine):
    CACHING = False
    HOST_BLOCKS = 0


_settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
TestKVCacheStateful = KVCacheMachine.TestCase
TestKVCacheStateful.settings = _settings
TestKVCacheNoCachingStateful = KVCacheNoCachingMachine.TestCase
TestKVCacheNoCachingStateful.settings = _settings
