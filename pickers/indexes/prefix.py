"""The approximate prefix index (as GIE's prefix-cache-scorer keeps it): which endpoint probably holds which prompt blocks.

A block is 64 bytes of prompt text (~16 tokens). Hashes chain so a block's key depends on every
block before it. Each endpoint keeps an LRU of the blocks routed to it, sized like its KV cache, so
memory is bounded by the pool's total cache size in blocks. Each lookup's hit ratio (the share of
the prompt's blocks the best endpoint holds) goes into a histogram the EPP's metrics expose.
"""

from __future__ import annotations

from collections import OrderedDict

import xxhash

from pickers.framework.histogram import Histogram
from pickers.framework.request import CHARS_PER_TOKEN

BLOCK_TOKENS = 16
BLOCK_CHARS = BLOCK_TOKENS * CHARS_PER_TOKEN  # 64 characters of prompt
MAX_BLOCKS = 256
DEFAULT_CAPACITY = 31_250  # blocks per endpoint when the server does not report its cache size
HIT_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

_xxh64 = xxhash.xxh64_intdigest


def block_hashes(
    model: str, prompt: str, cache_salt: str = "", max_blocks: int = MAX_BLOCKS, block_chars: int = BLOCK_CHARS
) -> list[int]:
    """Hashes of the prompt's full blocks, in order: h0 = xxh64(model + salt), h_i = xxh64(b_i + le64(h_{i-1}))."""
    data = prompt.encode("utf-8", "surrogatepass")  # JSON may carry lone surrogates
    n = min(len(data) // block_chars, max_blocks)
    prev = _xxh64((model + cache_salt).encode())
    out = []
    for i in range(n):
        start = i * block_chars
        prev = _xxh64(data[start : start + block_chars] + prev.to_bytes(8, "little"))
        out.append(prev)
    return out


class ApproxPrefixIndex:
    """block hash -> endpoints that hold it, plus one LRU of hashes per endpoint."""

    def __init__(self, default_capacity: int = DEFAULT_CAPACITY) -> None:
        self.default_capacity = default_capacity
        self._holders: dict[int, set[str]] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}
        self.hit_ratio = Histogram(HIT_RATIO_BUCKETS)  # one observation per lookup of a prompt of >= 1 block

    def match(self, hashes: list[int]) -> dict[str, int]:
        """Leading blocks held per endpoint; the walk stops at the first block nobody holds."""
        counts: dict[str, int] = {}
        if not hashes:
            return counts
        active = self._holders.get(hashes[0])
        if not active:
            self.hit_ratio.observe(0.0)
            return counts
        active = set(active)
        best = 0
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            active &= holders
            if not active:
                break
            best = i + 1
            for addr in active:
                counts[addr] = best
        self.hit_ratio.observe(best / len(hashes))
        return counts

    def record(self, address: str, hashes: list[int], capacity: int | None = None) -> None:
        """The endpoint now holds these blocks (most recent use last)."""
        lru = self._lru.get(address)
        if lru is None:
            lru = self._lru[address] = OrderedDict()
        if capacity:
            self._capacity[address] = capacity
        cap = self._capacity.get(address, self.default_capacity)
        holders = self._holders
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                s = holders.get(h)
                if s is None:
                    holders[h] = {address}
                else:
                    s.add(address)
        while len(lru) > cap:
            old, _ = lru.popitem(last=False)
            self._drop(old, address)

    def remove_endpoint(self, address: str) -> None:
        lru = self._lru.pop(address, None)
        self._capacity.pop(address, None)
        if lru:
            for h in lru:
                self._drop(h, address)

    def _drop(self, h: int, address: str) -> None:
        s = self._holders.get(h)
        if s is not None:
            s.discard(address)
            if not s:
                del self._holders[h]

    def size(self) -> int:
        """Total (endpoint, block) entries held: the bound is the sum of the capacities."""
        return sum(len(lru) for lru in self._lru.values())

    def bound(self) -> int:
        """The most entries `size` can reach with the endpoints known now (the sum of their capacities)."""
        return sum(self._capacity.get(a, self.default_capacity) for a in self._lru)

    def blocks_of(self, address: str) -> int:
        lru = self._lru.get(address)
        return len(lru) if lru else 0
