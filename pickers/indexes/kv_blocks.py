"""The precise prefix index: which endpoint holds which KV block, learned from the engines' KV events.

Keys are ours, not the engine's: a block's key chains the key of its parent with the block's token
ids (`k_i = xxh64(tokens_i as le32, seed=k_{i-1})`, `k_{-1}` from the LoRA name, or 0). BlockStored
carries the token ids, so the engine's hash algorithm (sha256 in vLLM 0.32, anything in others) never
needs reproducing: we keep, per endpoint, engine hash -> our key, and resolve a stored block's
parent through that map. A request's keys are computed the same way from its own tokens.

Memory is bounded: each endpoint keeps at most `capacity` blocks in LRU order (the engine's own
removals normally keep it far below that; the bound covers lost BlockRemoved events). Two bounds of
llm-d's in-memory index apply when given (precise-prefix-cache-producer): `max_keys` distinct keys
(the least recently stored goes first) and `pods_per_key` endpoints per key (the least recently
stored goes first). A `hash_seed` seeds every chain, as llm-d's `hashSeed` does.

KV-cache tiers: each (key, endpoint) keeps the media holding the block (vLLM's `medium`, lower-cased;
none is "gpu", as in llm-d) as a bit mask. A BlockStored without token ids (an offloading connector's:
blocks the endpoint already has, now also on another medium) adds that medium to the blocks it
resolves; a BlockRemoved takes its medium away, and the block goes when no medium holds it.
`weighted_match` scores as llm-d-kv-cache's LongestPrefixScorer: per leading block the largest weight
among the media holding it (`TierWeights`).

With `metrics` (llm-d's `enableMetrics`), the index counts what llm-d-kv-cache's instrumented index
counts: blocks admitted and evicted, lookups, the blocks of the longest chain one endpoint holds per
lookup, and each lookup's time. Plain integers; the EPP exports them when Prometheus scrapes.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import xxhash

from pickers.framework.histogram import Histogram

DEFAULT_CAPACITY = 1_000_000  # blocks per endpoint; about 200 MB for one endpoint at the bound
ROOT_KEY = 0
GPU = "gpu"  # the medium of an event that names none (llm-d's default tier)
GPU_BIT = 1
UNNAMED_BIT = 2  # speculative entries (no medium, as llm-d's) and media past MAX_MEDIA: weight 1.0
MAX_MEDIA = 16  # distinct medium names given bits of their own (events name a handful: GPU, CPU, ...)
_xxh64 = xxhash.xxh64_intdigest
# Prometheus' default buckets (seconds), which llm-d-kv-cache's lookup latency histogram uses
LOOKUP_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


def root_key(lora_name: str | None, hash_seed: str = "") -> int:
    base = _xxh64(hash_seed.encode()) if hash_seed else ROOT_KEY
    if not lora_name:
        return base
    return _xxh64(lora_name.encode(), seed=base) if hash_seed else _xxh64(lora_name.encode())


def chain_key(parent: int, token_ids: Sequence[int]) -> int:
    return _xxh64(struct.pack(f"<{len(token_ids)}I", *(t & 0xFFFFFFFF for t in token_ids)), seed=parent)


def request_keys(
    token_ids: Sequence[int], block_size: int, max_blocks: int, lora_name: str | None = None, hash_seed: str = ""
) -> list[int]:
    """Our keys of the request's leading full blocks (a trailing partial block has none)."""
    keys: list[int] = []
    parent = root_key(lora_name, hash_seed)
    n = min(len(token_ids) // block_size, max_blocks)
    for i in range(n):
        parent = chain_key(parent, token_ids[i * block_size : (i + 1) * block_size])
        keys.append(parent)
    return keys


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


@dataclass(slots=True)
class IndexMetrics:
    """What llm-d-kv-cache's instrumented index counts (its kvblock metrics), since the index was made."""

    admissions: int = 0  # blocks stored: by events (a block per key) and speculatively (a block per endpoint)
    evictions: int = 0  # blocks removed: by events and by speculative entries expiring
    lookups: int = 0  # scoring lookups
    hits: int = 0  # per lookup, the blocks of the longest leading chain one endpoint holds, summed
    latency: Histogram = field(default_factory=lambda: Histogram(LOOKUP_LATENCY_BUCKETS))  # seconds a lookup


class KVBlockIndex:
    """our key -> endpoints holding it, plus each endpoint's engine-hash map (for removals)."""

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


class TierWeights(dict[int, float]):
    """mask of media -> what a block held on them counts: the largest weight among its media, a medium
    not configured (and a speculative entry) counting 1.0, as in llm-d-kv-cache. Filled on first use."""

    def __init__(self, index: KVBlockIndex, by_name: Mapping[str, float]) -> None:
        super().__init__()
        self.index = index
        self.by_name = dict(by_name)

    def __missing__(self, mask: int) -> float:
        w = self[mask] = max((self.by_name.get(name, 1.0) for name in self.index.media_of(mask)), default=1.0)
        return w


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
