"""The approximate prefix index (as GIE's prefix-cache-scorer keeps it): which endpoint probably holds which prompt blocks.

A block is 64 bytes of prompt text (~16 tokens) unless the config says otherwise. Hashes chain so a
block's key depends on every block before it. Each endpoint keeps an LRU of the blocks routed to it,
sized like its KV cache, so memory is bounded by the pool's total cache size in blocks. Each lookup's
hit ratio (the share of the prompt's blocks the best endpoint holds) goes into a histogram the EPP's
metrics expose. A whole 100k-token prompt costs about a millisecond here (bench/prompt_cost.py), so
hashing, matching and recording stay tight loops: one encoded buffer hashed through memoryview slices,
a match that follows one endpoint without set arithmetic, a record that reuses the match's hashes.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import xxhash

from pickers.framework.histogram import Histogram
from pickers.framework.request import CHARS_PER_TOKEN

BLOCK_TOKENS = 16
BLOCK_CHARS = BLOCK_TOKENS * CHARS_PER_TOKEN  # 64 characters of prompt
MAX_BLOCKS = 256
MAX_FANOUT = 64  # distinct continuations counted after a block; more count as this many
DEFAULT_CAPACITY = 31_250  # blocks per endpoint when the server does not report its cache size
HIT_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

_xxh64 = xxhash.xxh64_intdigest


def block_hashes(
    model: str,
    prompt: str,
    cache_salt: str = "",
    max_blocks: int = MAX_BLOCKS,
    block_chars: int = BLOCK_CHARS,
    *,
    partial: bool = False,
) -> list[int]:
    """Hashes of the prompt's full blocks, in order: h0 = xxh64(model + salt), h_i = xxh64(b_i, seed=h_{i-1}).
    `partial`: a last, shorter block counts too (within max_blocks), as llm-d's prefixhash cuts token
    blocks, so equal hashes mean equal prompts (burst-prefix-cache-producer's identity)."""
    data = memoryview(prompt.encode("utf-8", "surrogatepass"))  # JSON may carry lone surrogates
    full = min(len(data) // block_chars, max_blocks)
    end = full * block_chars
    prev = _xxh64((model + cache_salt).encode())
    out = []
    append = out.append
    for start in range(0, end, block_chars):  # a memoryview slice copies nothing; the seed chains the blocks
        prev = _xxh64(data[start : start + block_chars], prev)
        append(prev)
    if partial and full < max_blocks and end < len(data):
        append(_xxh64(data[end : end + block_chars], prev))
    return out


class ApproxPrefixIndex:
    """block hash -> endpoints that hold it, plus one LRU of hashes per endpoint (each with the time it
    was last recorded there), plus the fan-out of shared prefixes: for a block where prompts went on
    differently, the distinct blocks that followed it (a system prompt many conversations continue)."""

    def __init__(self, default_capacity: int = DEFAULT_CAPACITY) -> None:
        self.default_capacity = default_capacity
        self._holders: dict[int, set[str]] = {}
        self._lru: dict[str, OrderedDict[int, float]] = {}
        self._capacity: dict[str, int] = {}
        # block -> the blocks recorded right after it where a prompt first left what the pool held:
        # one int until a second distinct one comes, then a set (capped at MAX_FANOUT)
        self._next: dict[int, int | set[int]] = {}
        self.hit_ratio = Histogram(HIT_RATIO_BUCKETS)  # one observation per lookup of a prompt of >= 1 block

    def match(self, hashes: list[int]) -> dict[str, int]:
        """Leading blocks held per endpoint; the walk stops at the first block none of the leaders holds."""
        counts: dict[str, int] = {}
        n = len(hashes)
        if not n:
            return counts
        get = self._holders.get
        first = get(hashes[0])
        if not first:
            self.hit_ratio.observe(0.0)
            return counts
        active = set(first)  # the endpoints holding every block so far
        i = 1
        while i < n and len(active) > 1:
            holders = get(hashes[i])
            if not holders:
                break
            if not active <= holders:
                for addr in active - holders:  # they held blocks 0..i-1
                    counts[addr] = i
                active &= holders
                if not active:
                    break
            i += 1
        if len(active) == 1 and i < n:  # one endpoint left: follow it, a membership test per block
            (addr,) = active
            empty: frozenset[str] = frozenset()
            while i < n and addr in get(hashes[i], empty):
                i += 1
        for addr in active:
            counts[addr] = i
        self.hit_ratio.observe(i / n)
        return counts

    def record(self, address: str, hashes: list[int], capacity: int | None = None, now: float | None = None) -> None:
        """The endpoint now holds these blocks. The first block is made the most recent, as vLLM frees a
        request's blocks tail first: a full LRU evicts a prompt's tail before its head, so what stays
        still matches as a prefix. Where the prompt leaves what the pool held, the block it continues
        from counts one more distinct continuation (hashes chain, so that is the only new one)."""
        lru = self._lru.get(address)
        if lru is None:
            lru = self._lru[address] = OrderedDict()
        if capacity:
            self._capacity[address] = capacity
        cap = self._capacity.get(address, self.default_capacity)
        t = time.monotonic() if now is None else now
        holders = self._holders
        move = lru.move_to_end
        frontier = -1
        for i in range(len(hashes) - 1, -1, -1):
            h = hashes[i]
            if h in lru:
                move(h)
                lru[h] = t
            else:
                lru[h] = t
                s = holders.get(h)
                if s is None:
                    holders[h] = {address}
                    frontier = i
                else:
                    s.add(address)
        if frontier > 0:
            self._continued(hashes[frontier - 1], hashes[frontier])
        over = len(lru) - cap
        if over > 0:
            pop = lru.popitem
            for _ in range(over):
                old, _ = pop(last=False)
                s = holders[old]
                s.discard(address)
                if not s:
                    del holders[old]
                    self._next.pop(old, None)

    def _continued(self, block: int, after: int) -> None:
        seen = self._next.get(block)
        if seen is None:
            self._next[block] = after
        elif isinstance(seen, int):
            if seen != after:
                self._next[block] = {seen, after}
        elif len(seen) < MAX_FANOUT:
            seen.add(after)

    def shared_prefix(self, hashes: list[int], upto: int) -> tuple[int, int]:
        """(blocks, fan-out): the longest prefix of these blocks, within the first `upto`, after which
        prompts went on in more than one way, and how many ways (0, 1 when there is none): the part
        of a prompt that other conversations share (a system prompt), not its own history."""
        nxt = self._next
        for i in range(min(upto, len(hashes)) - 1, -1, -1):
            seen = nxt.get(hashes[i])
            if seen is not None and not isinstance(seen, int):
                return i + 1, len(seen)
        return 0, 1

    def room(self, address: str, blocks: int, now: float, horizon: float) -> bool:
        """Whether `blocks` new blocks fit on the endpoint without evicting a block used within the last
        `horizon` seconds (its LRU has space, or its least recent block is older than that)."""
        lru = self._lru.get(address)
        if lru is None:
            return True
        cap = self._capacity.get(address, self.default_capacity)
        if len(lru) + blocks <= cap:
            return True
        return now - next(iter(lru.values())) > horizon

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
                self._next.pop(h, None)

    def size(self) -> int:
        """Total (endpoint, block) entries held: the bound is the sum of the capacities."""
        return sum(len(lru) for lru in self._lru.values())

    def bound(self) -> int:
        """The most entries `size` can reach with the endpoints known now (the sum of their capacities)."""
        return sum(self._capacity.get(a, self.default_capacity) for a in self._lru)

    def blocks_of(self, address: str) -> int:
        lru = self._lru.get(address)
        return len(lru) if lru else 0
