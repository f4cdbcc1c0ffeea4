"""Prefix cache of fixed-size KV blocks, modelled on vLLM's block pool.

Only full prompt blocks are hashed (chain hash: parent hash + the block's token ids), so a
block hit implies the whole prefix before it is cached too. Blocks held by running requests are
refcounted; once free they stay cached but are evictable in LRU order. Listeners get
BlockStored / BlockRemoved / AllBlocksCleared so a KV-event publisher can mirror the cache.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import xxhash

# The hash of the (absent) parent of a request's first block.
ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack(f"<Q{len(token_ids)}q", parent_hash, *token_ids))


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chain hashes of every full block of token_ids; a trailing partial block has none."""
    hashes: list[int] = []
    parent = ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


CacheEvent = BlockStored | BlockRemoved | AllBlocksCleared
CacheListener = Callable[[CacheEvent], None]


@dataclass(slots=True, eq=False)
class Block:
    block_hash: int
    refcount: int = 0
    cached: bool = True  # False once reset dropped it from the index while still held


@dataclass(slots=True)
class Allocation:
    """What one request holds: its hashed prompt blocks (in order) and unhashed blocks."""

    blocks: list[Block] = field(default_factory=list)
    anonymous: int = 0
    hit_blocks: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks) + self.anonymous


class PrefixCache:
    """Capacity is num_blocks; every block is either held (refcount > 0 or anonymous),
    free-but-cached (evictable, LRU) or empty."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._index: dict[int, Block] = {}
        self._evictable: OrderedDict[int, Block] = OrderedDict()  # oldest first
        self._used = 0
        self._listeners: list[CacheListener] = []

    def subscribe(self, listener: CacheListener) -> None:
        self._listeners.append(listener)

    @property
    def used_blocks(self) -> int:
        return self._used

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running requests, as vllm:kv_cache_usage_perc."""
        return self._used / self.num_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._index)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def count_hits(self, hashes: Sequence[int], num_prompt_tokens: int) -> int:
        """Leading cached blocks; like vLLM at least one prompt token is always recomputed."""
        limit = min(len(hashes), (num_prompt_tokens - 1) // self.block_size)
        hits = 0
        while hits < limit and hashes[hits] in self._index:
            hits += 1
        return hits

    def allocate(self, token_ids: Sequence[int], hashes: Sequence[int], total_tokens: int) -> Allocation | None:
        """Hold blocks for a request of total_tokens (prompt + output), or None if they don't fit.

        Full prompt blocks are looked up and the missing ones stored; the rest (partial prompt
        block and output room) are unhashed. Nothing changes when it does not fit.
        """
        hits = self.count_hits(hashes, len(token_ids))
        hit_blocks = [self._index[h] for h in hashes[:hits]]
        new_hashed = list(hashes[hits:])
        # A hash in new_hashed may already be cached (a hit beyond the recompute limit): reuse it.
        reused = [self._index[h] for h in new_hashed if h in self._index]
        anonymous = max(0, self.blocks_needed(total_tokens) - len(hashes))
        fresh = len(new_hashed) - len(reused) + anonymous
        revived = sum(1 for b in (*hit_blocks, *reused) if b.refcount == 0)
        empty = self.num_blocks - self._used - len(self._evictable)
        if fresh + revived > empty + len(self._evictable):
            return None
        # Claim the blocks we hit first, so eviction below cannot take them.
        for held in (*hit_blocks, *reused):
            self._hold(held)
        blocks = list(hit_blocks)
        for i, h in enumerate(new_hashed, start=hits):
            block = self._index.get(h)
            if block is None:
                self._take_empty()
                block = Block(h, refcount=1)
                self._index[h] = block
                start = i * self.block_size
                self._emit(
                    BlockStored(
                        block_hashes=(h,),
                        parent_block_hash=hashes[i - 1] if i else None,
                        token_ids=tuple(token_ids[start : start + self.block_size]),
                        block_size=self.block_size,
                    )
                )
            blocks.append(block)
        for _ in range(anonymous):
            self._take_empty()
        return Allocation(blocks=blocks, anonymous=anonymous, hit_blocks=hits)

    def free(self, allocation: Allocation) -> None:
        """Release a request's blocks; cached ones become evictable, tail blocks first (as vLLM)."""
        self._used -= allocation.anonymous
        allocation.anonymous = 0
        for block in reversed(allocation.blocks):
            block.refcount -= 1
            if block.refcount == 0:
                self._used -= 1
                if block.cached:
                    self._evictable[block.block_hash] = block
        allocation.blocks.clear()

    def reset(self) -> None:
        """Forget every cached prefix. Blocks still held stay allocated but can no longer hit."""
        for block in self._index.values():
            block.cached = False
        self._index.clear()
        self._evictable.clear()
        self._emit(AllBlocksCleared())

    def _hold(self, block: Block) -> None:
        if block.refcount == 0:
            self._evictable.pop(block.block_hash, None)
            self._used += 1
        block.refcount += 1

    def _take_empty(self) -> None:
        if self.num_blocks - self._used - len(self._evictable) <= 0:
            _, victim = self._evictable.popitem(last=False)
            del self._index[victim.block_hash]
            self._emit(BlockRemoved(block_hashes=(victim.block_hash,)))
        self._used += 1

    def _emit(self, event: CacheEvent) -> None:
        for listener in self._listeners:
            listener(event)
