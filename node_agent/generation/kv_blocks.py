"""The device block pool: reference counts, free lists and the prefix-hash index.

A block is an integer id; it holds `block_size` tokens of K and V for every layer.
The executor owns the tensors; this module only keeps the books, so it imports no torch.

Invariants (checked by `BlockPool.check_invariants`):
- every id below `num_blocks` is either free (refcount 0, in exactly one free list) or
  used (refcount > 0, in no free list); so free + used = total, where total counts the
  ids below `num_blocks` plus the used ids left above it by a shrink (`pending_release`);
- an id at or above `num_blocks` is never handed out; when its last reference goes it is
  dropped, not freed;
- plain-free blocks carry no hash; cached-free blocks carry one and the index maps it back;
- a hash maps to at most one block, a block carries at most one hash, and a hashed block
  is full and never written again (its contents are what the hash says).

Eviction order: allocation takes plain-free blocks first (most recently freed first) and
only then evicts cached-free blocks, least recently freed first. Reviving a cached-free
block (a prefix hit) takes it out of the eviction order; freeing it again puts it last.
Allocation, release and revival are O(1) per block: a list used as a stack for plain-free
blocks and an `OrderedDict` (a C doubly linked list) for cached-free ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import NamedTuple

BlockHash = tuple[int, int, tuple[int, ...]]
"""A full block's identity: (value, parent value, token ids), where value is
`hash((parent value, token ids))` and the first block's parent value is the manager's
root seed. The index is keyed by value, computed once per block; a hit is confirmed by
comparing the whole identity, so a false hit needs a 64-bit collision of the parent
*and* equal tokens, and a collision of values only costs a missed share."""


def block_hash(parent: int, token_ids: tuple[int, ...]) -> BlockHash:
    """The identity of a full block holding `token_ids` after the block valued `parent`."""
    return (hash((parent, token_ids)), parent, token_ids)


def chain_block_hashes(parent: int, token_ids: list[int], block_size: int) -> list[BlockHash]:
    """Identities of the full blocks of `token_ids`, chained from `parent`; a partial
    last block gets none."""
    out: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = tuple(token_ids[start : start + block_size])
        value = hash((parent, tokens))
        out.append((value, parent, tokens))
        parent = value
    return out


class CopyOp(NamedTuple):
    """Copy one block's contents (every layer's K and V) from `src` to `dst`."""

    src: int
    dst: int


class BlockPool:
    """Device blocks `0 .. num_blocks-1`: refcounts, free lists, prefix-hash index."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self._num_blocks = num_blocks
        self._ref: list[int] = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        # A stack: the lowest ids are handed out first on a fresh pool.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # Least recently freed first: the eviction order.
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self._index: dict[int, int] = {}
        """Hash value -> the block holding it (in use or cached-free)."""
        self._num_used = 0

    # -- counts ------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """The pool's size: ids below it may be handed out."""
        return self._num_blocks

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take now (plain-free plus cached-free)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached_free(self) -> int:
        return len(self._cached_free)

    @property
    def num_used(self) -> int:
        """Blocks with at least one reference (including any above `num_blocks`)."""
        return self._num_used

    @property
    def num_cached(self) -> int:
        """Blocks whose hash is indexed (in use or cached-free)."""
        return len(self._index)

    @property
    def pending_release(self) -> int:
        """Used blocks above `num_blocks`, left by a shrink that could not move them."""
        return sum(1 for b in range(self._num_blocks, len(self._ref)) if self._ref[b])

    def refcount(self, block: int) -> int:
        return self._ref[block]

    def block_hash(self, block: int) -> BlockHash | None:
        return self._hash[block]

    def eviction_order(self) -> list[int]:
        """Cached-free blocks, the next to be evicted first."""
        return list(self._cached_free)

    # -- allocation --------------------------------------------------------------------

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks with refcount 1 and no hash, or None (nothing changed) if fewer
        than `n` are free. Evicts cached-free blocks only when plain-free ones run out."""
        free = self._free
        if n > len(free) + len(self._cached_free):
            return None
        ref = self._ref
        k = min(n, len(free))
        if k:
            out = free[-k:]
            out.reverse()  # top of the stack first
            del free[-k:]
        else:
            out = []
        if n > k:
            popitem, index, hashes = self._cached_free.popitem, self._index, self._hash
            for _ in range(n - k):
                b = popitem(last=False)[0]
                h = hashes[b]
                assert h is not None and index.get(h[0]) == b, "cached-free block not indexed"
                del index[h[0]]
                hashes[b] = None
                out.append(b)
        for b in out:
            assert ref[b] == 0, "allocated a block that is in use"
            ref[b] = 1
        self._num_used += n
        return out

    def share(self, block: int) -> None:
        """Add a reference. A block with none left must be cached-free (found by
        `lookup`); sharing revives it out of the eviction order."""
        r = self._ref[block]
        if r == 0:
            assert self._hash[block] is not None, "revived a block that carries no hash"
            del self._cached_free[block]
            self._num_used += 1
        self._ref[block] = r + 1

    def release(self, blocks: Iterable[int], *, keep_cached: bool = True) -> None:
        """Drop one reference from each block, in order. A block left with none becomes
        cached-free if hashed (last in the eviction order) and `keep_cached`, plain-free
        otherwise (losing its hash), and is dropped if a shrink put it above `num_blocks`."""
        ref, hashes = self._ref, self._hash
        for b in blocks:
            r = ref[b] - 1
            assert r >= 0, f"block {b} released more often than referenced"
            ref[b] = r
            if r:
                continue
            self._num_used -= 1
            if b >= self._num_blocks:
                self._drop(b)
            elif hashes[b] is not None and keep_cached:
                self._cached_free[b] = None
            else:
                self._unregister(b)
                self._free.append(b)

    # -- prefix index ------------------------------------------------------------------

    def lookup(self, key: BlockHash) -> int | None:
        """The block holding `key`'s contents, in use or cached-free, or None."""
        b = self._index.get(key[0])
        return b if b is not None and self._hash[b] == key else None

    def register(self, block: int, key: BlockHash) -> bool:
        """Index a block that just became full (refcount 1, written by its one owner).
        Returns False, and leaves the block unhashed, if another block holds `key`."""
        assert self._ref[block] > 0, "registering a free block"
        assert self._hash[block] is None, "a block's hash is set once"
        if key[0] in self._index or block >= self._num_blocks:
            return False
        self._index[key[0]] = block
        self._hash[block] = key
        return True

    def register_many(self, blocks: list[int], keys: list[BlockHash]) -> None:
        """`register` each block with its key (pairs up to the shorter list)."""
        index, hashes, ref, n = self._index, self._hash, self._ref, self._num_blocks
        for block, key in zip(blocks, keys, strict=False):
            assert ref[block] > 0 and hashes[block] is None, "register a used, unhashed block"
            if key[0] not in index and block < n:
                index[key[0]] = block
                hashes[block] = key

    # -- resize ------------------------------------------------------------------------

    def resize(self, num_blocks: int) -> tuple[list[CopyOp], int]:
        """Grow or shrink to `num_blocks`; returns (moves, cached blocks evicted).

        Shrinking drops free blocks at or above the new size, then moves used blocks
        from there into free blocks below it (plain first, then evicting cached ones).
        The caller must apply each move (copy, then point its tables at `dst`) before
        the old ids go. Used blocks that found no room stay (`pending_release`) until
        released; call `resize` again after releasing blocks to move the rest.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        old = self._num_blocks
        self._num_blocks = num_blocks
        evicted = 0
        if num_blocks >= old:
            self._grow(old, num_blocks)
        else:
            self._free = [b for b in self._free if b < num_blocks]
            for b in [b for b in self._cached_free if b >= num_blocks]:
                del self._cached_free[b]
                self._unregister(b)
                evicted += 1
        moves: list[CopyOp] = []
        for src in range(num_blocks, len(self._ref)):
            if not self._ref[src]:
                continue
            if self.num_free == 0:
                self._unregister(src)  # never shared anew: it is on its way out
                continue
            evicted += 0 if self._free else 1
            got = self.allocate(1)
            assert got is not None
            dst = got[0]
            self._ref[dst], self._ref[src] = self._ref[src], 0
            self._num_used -= 1  # allocate() counted dst; src is no longer used
            h = self._hash[src]
            if h is not None:
                self._hash[src], self._hash[dst] = None, h
                self._index[h[0]] = dst
            moves.append(CopyOp(src, dst))
        self._trim()
        return moves, evicted

    def _grow(self, old: int, new: int) -> None:
        ref = self._ref
        if new > len(ref):
            extra = new - len(ref)
            ref.extend([0] * extra)
            self._hash.extend([None] * extra)
        # Pushed highest first, so the lowest new id is handed out first.
        self._free.extend(b for b in range(new - 1, old - 1, -1) if ref[b] == 0)

    def _drop(self, block: int) -> None:
        """Forget a block at or above `num_blocks` that has no reference left."""
        self._unregister(block)
        self._trim()

    def _unregister(self, block: int) -> None:
        h = self._hash[block]
        if h is not None:
            del self._index[h[0]]
            self._hash[block] = None

    def _trim(self) -> None:
        while len(self._ref) > self._num_blocks and self._ref[-1] == 0:
            self._ref.pop()
            self._hash.pop()

    # -- invariants --------------------------------------------------------------------

    def check_invariants(self, references: Mapping[int, int]) -> None:
        """Assert the module's invariants; `references` counts each block's occurrences
        in every block table (a block's refcount must equal it)."""
        n, ref, hashes = self._num_blocks, self._ref, self._hash
        free, cached = set(self._free), set(self._cached_free)
        assert len(free) == len(self._free), "a block is twice in the free list"
        assert not free & cached, "a block is both plain-free and cached-free"
        for b in range(len(ref)):
            assert ref[b] >= 0, f"negative refcount on block {b}"
            assert ref[b] == references.get(b, 0), (
                f"block {b}: refcount {ref[b]} != {references.get(b, 0)} table references"
            )
            in_free, in_cached = b in free, b in cached
            if b >= n:
                assert not in_free and not in_cached, f"block {b} above the pool is free"
                assert ref[b] > 0 or hashes[b] is None, f"dropped block {b} keeps a hash"
            elif ref[b] == 0:
                assert in_free != in_cached, f"free block {b} is in {in_free + in_cached} lists"
                assert (hashes[b] is not None) == in_cached, f"block {b}: hash vs free list"
            else:
                assert not in_free and not in_cached, f"used block {b} is in a free list"
        assert all(b < len(ref) for b in references), "a table references an unknown block"
        used = sum(1 for r in ref if r)
        assert used == self._num_used, "used-block counter drifted"
        assert self.num_free + used == n + self.pending_release, "free + used != total"
        for value, b in self._index.items():
            h = hashes[b]
            assert h is not None and h[0] == value, f"index maps {value} to block {b}"
        assert sum(h is not None for h in hashes) == len(self._index), "unindexed hash"
