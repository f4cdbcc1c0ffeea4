"""The approximate prefix index as it was before the compact one (dicts, sets and an OrderedDict per
endpoint), kept as the reference the compact index must agree with (tests/unit/test_prefix_index_compact.py)."""

from __future__ import annotations

import time
from collections import OrderedDict

MAX_FANOUT = 64
DEFAULT_CAPACITY = 31_250


class ReferencePrefixIndex:
    """block hash -> endpoints that hold it, plus one LRU of hashes per endpoint (each with the time it
    was last recorded there), plus the fan-out of shared prefixes: for a block where prompts went on
    differently, the distinct blocks that followed it (a system prompt many conversations continue)."""

    def __init__(self, default_capacity: int = DEFAULT_CAPACITY) -> None:
        self.default_capacity = default_capacity
        self._holders: dict[int, set[str]] = {}
        self._lru: dict[str, OrderedDict[int, float]] = {}
        self._capacity: dict[str, int] = {}
        # block -> the blocks recorded right after it: one int until a prompt leaves what the pool
        # held right after this block in a second way, then a set (capped at MAX_FANOUT)
        self._next: dict[int, int | set[int]] = {}

    def match(self, hashes: list[int]) -> dict[str, int]:
        """Leading blocks held per endpoint; the walk stops at the first block none of the leaders holds."""
        counts: dict[str, int] = {}
        n = len(hashes)
        if not n:
            return counts
        get = self._holders.get
        first = get(hashes[0])
        if not first:
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
        nxt = self._next
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
                    if i + 1 < len(hashes):
                        nxt[h] = hashes[i + 1]  # new to the pool: its one continuation so far
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
