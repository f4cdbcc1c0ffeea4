"""The precise (KV-event) index as it was before the compact one (a dict of holder dicts per key and an
OrderedDict per endpoint), kept as the reference the compact index must agree with
(tests/unit/test_kv_index_compact.py)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pickers.indexes.kv_blocks import (
    DEFAULT_CAPACITY,
    GPU,
    GPU_BIT,
    MAX_MEDIA,
    UNNAMED_BIT,
    IndexMetrics,
    chain_key,
    root_key,
)


@dataclass(slots=True)
class EndpointBlocks:
    """One endpoint's blocks: engine hash -> our key, oldest first."""

    blocks: OrderedDict[Hashable, int]
    block_size: int | None = None
    orphans: int = 0  # stored blocks dropped because their parent was unknown (we joined late)
    gaps: int = 0  # times its event stream lost messages and the state was reset
    # the engine's global data-parallel rank, as its batches name it: known only under llm-d's rank-granular
    # identity (kvEventsConfig.servingPortBase), for p2p-source-producer's p2pPortBase
    global_dp_rank: int | None = None


class ReferenceKVIndex:
    """our key -> endpoints holding it (dicts), plus each endpoint's engine-hash map (an OrderedDict)."""

    def __init__(
        self,
        capacity_per_endpoint: int = DEFAULT_CAPACITY,
        *,
        max_keys: int | None = None,
        pods_per_key: int | None = None,
        hash_seed: str = "",
        metrics: IndexMetrics | None = None,
    ) -> None:
        self.capacity = capacity_per_endpoint
        self.metrics = metrics  # None: nothing counted (llm-d's enableMetrics: false)
        self.max_keys = max_keys
        self.pods_per_key = pods_per_key
        self.hash_seed = hash_seed
        # key -> endpoints holding it, least recently stored first (a dict used as an ordered set)
        self._holders: dict[int, dict[str, int]] = {}  # ... -> the mask of media holding it there
        # keys, least recently stored first: kept only with max_keys
        self._recent: OrderedDict[int, None] | None = OrderedDict() if max_keys is not None else None
        self._endpoints: dict[str, EndpointBlocks] = {}
        self.lora_names: set[str] = set()  # adapters seen in events: their blocks chain from their name
        self._media: dict[str, int] = {GPU: GPU_BIT, "": UNNAMED_BIT}  # medium name -> its bit

    def medium_bit(self, medium: str | None, *, register: bool = True) -> int:
        """The bit of an event's medium (lower-cased; none is gpu). A new name gets the next bit, past
        MAX_MEDIA names the unnamed one; unless `register`, a new name is 0 (nothing is stored there)."""
        name = medium.lower() if medium else GPU
        bit = self._media.get(name)
        if bit is not None:
            return bit
        full = len(self._media) >= MAX_MEDIA + 2
        if not register:
            return UNNAMED_BIT if full else 0
        if full:
            return UNNAMED_BIT
        bit = self._media[name] = 1 << len(self._media)
        return bit

    def media_of(self, mask: int) -> list[str]:
        """The medium names of a mask ("" for speculative entries and unnamed media)."""
        return [name for name, bit in self._media.items() if mask & bit]

    # -- events (the subscriber) ------------------------------------------------------------
    def _ep(self, address: str) -> EndpointBlocks:
        ep = self._endpoints.get(address)
        if ep is None:
            ep = self._endpoints[address] = EndpointBlocks(OrderedDict())
        return ep

    def block_stored(
        self,
        address: str,
        block_hashes: Sequence[Hashable],
        parent_block_hash: Hashable | None,
        token_ids: Sequence[int],
        block_size: int,
        lora_name: str | None = None,
        medium: str | None = None,
    ) -> int:
        """Index blocks the engine stored on `medium`. Returns how many were indexed."""
        ep = self._ep(address)
        bit = self.medium_bit(medium)
        if not token_ids:  # the blocks are known by their hashes: now (also) on this medium
            known = 0
            for engine_hash in block_hashes:
                key = ep.blocks.get(engine_hash)
                if key is not None:
                    ep.blocks.move_to_end(engine_hash)
                    self._hold(key, address, bit)
                    known += 1
            self._trim(ep, address)
            if self.metrics is not None:
                self.metrics.admissions += known
            return known
        ep.block_size = block_size
        if parent_block_hash is None:
            parent = root_key(lora_name, self.hash_seed)
            if lora_name:
                self.lora_names.add(lora_name)
        else:
            found = ep.blocks.get(parent_block_hash)
            if found is None:
                ep.orphans += len(block_hashes)
                return 0
            parent = found
        blocks = ep.blocks
        stored = 0
        for i, engine_hash in enumerate(block_hashes):
            tokens = token_ids[i * block_size : (i + 1) * block_size]
            if len(tokens) < block_size:
                break
            key = chain_key(parent, tokens)
            old = blocks.get(engine_hash)
            if old is not None and old != key:
                self._drop(old, address)
            blocks[engine_hash] = key
            blocks.move_to_end(engine_hash)
            self._hold(key, address, bit)
            parent = key
            stored += 1
        self._trim(ep, address)
        if self.metrics is not None:
            self.metrics.admissions += stored
        return len(block_hashes)

    def _trim(self, ep: EndpointBlocks, address: str) -> None:
        """The bounds: `capacity` blocks per endpoint, `max_keys` keys (the least recently stored go)."""
        blocks, holders, recent = ep.blocks, self._holders, self._recent
        while len(blocks) > self.capacity:
            _, key = blocks.popitem(last=False)
            self._drop(key, address)
        if recent is not None and self.max_keys is not None:
            while len(holders) > self.max_keys:
                old, _ = recent.popitem(last=False)
                holders.pop(old, None)  # endpoints' maps keep the engine hash: resolving parents still works

    def _hold(self, key: int, address: str, bit: int) -> None:
        """`address` holds `key` on the medium of `bit` (too), most recently stored."""
        s = self._holders.get(key)
        if s is None:
            self._holders[key] = {address: bit}
        else:
            mask = s.pop(address, 0)
            s[address] = mask | bit  # most recent last
            if self.pods_per_key is not None and len(s) > self.pods_per_key:
                del s[next(iter(s))]
        if self._recent is not None:
            self._recent[key] = None
            self._recent.move_to_end(key)

    def block_removed(self, address: str, block_hashes: Iterable[Hashable], medium: str | None = None) -> None:
        """The engine dropped these blocks from `medium`; a block another medium still holds stays."""
        ep = self._endpoints.get(address)
        if ep is None:
            return
        bit = self.medium_bit(medium, register=False)
        if not bit:  # a medium no block was stored on
            return
        removed = 0
        for engine_hash in block_hashes:
            key = ep.blocks.get(engine_hash)
            if key is None:
                continue
            removed += 1
            s = self._holders.get(key)
            mask = s.get(address) if s is not None else None
            if s is not None and mask is not None and mask & ~bit:
                s[address] = mask & ~bit
                continue
            del ep.blocks[engine_hash]
            self._drop(key, address)
        if self.metrics is not None:
            self.metrics.evictions += removed

    def clear_endpoint(self, address: str) -> None:
        """AllBlocksCleared, a restarted engine or a lost stream: the endpoint holds nothing we know of."""
        ep = self._endpoints.get(address)
        if ep is None:
            return
        for key in ep.blocks.values():
            self._drop(key, address)
        ep.blocks.clear()

    def mark_gap(self, address: str) -> None:
        """Events were lost: what we know may be wrong both ways. Forget it all (no false hits);
        later events rebuild the state."""
        self.clear_endpoint(address)
        self._ep(address).gaps += 1

    def remove_endpoint(self, address: str) -> None:
        self.clear_endpoint(address)
        self._endpoints.pop(address, None)

    def _drop(self, key: int, address: str) -> None:
        s = self._holders.get(key)
        if s is not None:
            s.pop(address, None)
            if not s:
                del self._holders[key]
                if self._recent is not None:
                    self._recent.pop(key, None)

    # -- lookups (the scorer) ----------------------------------------------------------------
    def lookup(
        self, keys: Sequence[int], weights: Mapping[int, float] | None = None,
        extra: Mapping[int, Mapping[str, object]] | None = None,
    ) -> dict[str, int]:  # fmt: skip
        """A scoring lookup: leading blocks held per endpoint (`match`), or with `weights` llm-d's
        tier-weighted score truncated to whole blocks (`weighted_match`). Counted in `metrics`."""
        m = self.metrics
        if m is None:
            return self._lookup(keys, weights, extra)[0]
        start = time.perf_counter()
        held, chain = self._lookup(keys, weights, extra)
        m.latency.observe(time.perf_counter() - start)
        m.lookups += 1
        m.hits += chain
        return held

    def _lookup(
        self, keys: Sequence[int], weights: Mapping[int, float] | None, extra: Mapping[int, Mapping[str, object]] | None
    ) -> tuple[dict[str, int], int]:
        if weights is None:
            held = self.match(keys, extra)
            return held, max(held.values(), default=0)
        scores, chain = self._weighted(keys, weights, extra)
        return {a: int(score) for a, score in scores.items()}, chain

    def match(self, keys: Sequence[int], extra: Mapping[int, Mapping[str, object]] | None = None) -> dict[str, int]:
        """Leading blocks held per endpoint; the walk stops at the first block nobody holds. `extra`:
        more holders per key (speculative entries), counted as if stored."""
        counts: dict[str, int] = {}
        if not keys:
            return counts
        holders_of: Mapping[int, Mapping[str, object]] = self._holders
        if extra:
            holders_of = _Union(self._holders, extra)
        first = holders_of.get(keys[0])
        if not first:
            return counts
        active = set(first)
        for i, key in enumerate(keys):
            holders = holders_of.get(key)
            if not holders:
                break
            active.intersection_update(holders)
            if not active:
                break
            for address in active:
                counts[address] = i + 1
        return counts

    def medium_match(self, keys: Sequence[int], medium: str) -> dict[str, int]:
        """Leading blocks each endpoint holds on `medium` (lower-cased), up to the first it lacks there;
        speculative entries hold no medium, so they never count."""
        bit = self._media.get(medium.lower())
        counts: dict[str, int] = {}
        if not bit or not keys:
            return counts
        holders_of = self._holders
        active = [a for a, mask in holders_of.get(keys[0], {}).items() if mask & bit]
        for i, key in enumerate(keys):
            holders = holders_of.get(key)
            if not holders:
                break
            active = [a for a in active if holders.get(a, 0) & bit]
            if not active:
                break
            for address in active:
                counts[address] = i + 1
        return counts

    def weighted_match(
        self, keys: Sequence[int], weights: Mapping[int, float], extra: Mapping[int, Mapping[str, object]] | None = None
    ) -> dict[str, float]:
        """llm-d's longest-prefix score per endpoint: over its leading blocks (up to the first it holds
        on no medium), the sum of `weights[mask of the media holding the block]`. `extra`: speculative
        holders, with no medium (UNNAMED_BIT)."""
        return self._weighted(keys, weights, extra)[0]

    def _weighted(
        self, keys: Sequence[int], weights: Mapping[int, float], extra: Mapping[int, Mapping[str, object]] | None
    ) -> tuple[dict[str, float], int]:
        """`weighted_match`, and the blocks of the longest leading chain one endpoint holds."""
        scores: dict[str, float] = {}
        if not keys:
            return scores, 0
        holders_of: Mapping[int, Mapping[str, int]] = self._holders
        if extra:
            holders_of = _MaskUnion(self._holders, extra)
        first = holders_of.get(keys[0])
        if not first:
            return scores, 0
        for address, mask in first.items():
            scores[address] = weights[mask]
        active = list(scores)
        chain = 1
        for i in range(1, len(keys)):
            holders = holders_of.get(keys[i])
            if not holders:
                break
            left = False
            for address in active:
                mask = holders.get(address)
                if mask:
                    scores[address] += weights[mask]
                else:
                    left = True
            if left:  # allocates only when an endpoint's match ends
                active = [a for a in active if holders.get(a)]
                if not active:
                    break
            chain = i + 1
        return scores, chain

    def block_sizes(self) -> set[int]:
        return {ep.block_size for ep in self._endpoints.values() if ep.block_size}

    def block_size_of(self, address: str) -> int | None:
        ep = self._endpoints.get(address)
        return ep.block_size if ep else None

    def blocks_of(self, address: str) -> int:
        ep = self._endpoints.get(address)
        return len(ep.blocks) if ep else 0

    def set_global_dp_rank(self, address: str, rank: int) -> None:
        self._ep(address).global_dp_rank = rank

    def global_dp_rank(self, address: str) -> int | None:
        """The global DP rank the endpoint's events were attributed by (None: not known)."""
        ep = self._endpoints.get(address)
        return ep.global_dp_rank if ep else None

    def stats(self, address: str) -> EndpointBlocks | None:
        return self._endpoints.get(address)

    def size(self) -> int:
        """(endpoint, block) entries held; bounded by capacity x endpoints."""
        return sum(len(ep.blocks) for ep in self._endpoints.values())

    def memory_bytes(self) -> int:
        """A rough estimate: ~100 bytes per map entry and ~250 per distinct key's holder set."""
        return self.size() * 100 + len(self._holders) * 250


class _MaskUnion:
    """The index's key -> {endpoint: media} and the speculative key -> endpoints read as one."""

    __slots__ = ("a", "b")

    def __init__(self, a: Mapping[int, Mapping[str, int]], b: Mapping[int, Mapping[str, object]]) -> None:
        self.a, self.b = a, b

    def get(self, key: int) -> Mapping[str, int] | None:
        x, y = self.a.get(key), self.b.get(key)
        if not y:
            return x
        out = dict.fromkeys(y, UNNAMED_BIT)
        if x:
            for address, mask in x.items():
                out[address] = mask | out.get(address, 0)
        return out


class _Union:
    """Two key -> holders maps read as one (only `get`, what `match` needs)."""

    __slots__ = ("a", "b")

    def __init__(self, a: Mapping[int, Mapping[str, object]], b: Mapping[int, Mapping[str, object]]) -> None:
        self.a, self.b = a, b

    def get(self, key: int) -> Mapping[str, object] | set[str] | None:
        x, y = self.a.get(key), self.b.get(key)
        if x and y:
            return x.keys() | y.keys()
        return x or y
