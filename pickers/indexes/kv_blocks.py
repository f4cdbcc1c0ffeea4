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

Compact (about 60 bytes per (endpoint, block) entry, bench/scale.py), with no Python object per entry
for the garbage collector to walk: keys are rows of a `BlockTable` (pickers.indexes.block_table) with
two holders inline (endpoint id and media); a block held by three or more (a shared system prompt) keeps
all its holders in a small dict, which a lookup compares with the previous block's (equal along most of
a shared prefix: one comparison in C per block, not a step per endpoint); each endpoint's engine hash
-> our key map is a `BlockTable` of its own keyed by the engine hash (vLLM's uint64 as it is, other
hashes by their xxh64 digest), its LRU order a uint32 stamp per row. Events change a few rows each, one
key at a time (numpy's per-call cost would exceed the work); lookups find a prompt's keys in a few array
calls. Endpoints are small integer ids inside; the API speaks addresses.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from operator import add
from typing import TypeVar

import numpy as np
import xxhash

from pickers.framework.histogram import Histogram
from pickers.indexes.block_table import BlockTable
from pickers.indexes.endpoint_ids import EndpointIds

DEFAULT_CAPACITY = 1_000_000  # blocks per endpoint; about 60 MB for one endpoint at the bound
ROOT_KEY = 0
GPU = "gpu"  # the medium of an event that names none (llm-d's default tier)
GPU_BIT = 1
UNNAMED_BIT = 2  # speculative entries (no medium, as llm-d's) and media past MAX_MEDIA: weight 1.0
# distinct medium names given bits of their own (events name a handful: GPU, CPU, ...): with gpu and
# the unnamed one, a block's media fit 8 bits (a byte per holder: vLLM's events name gpu, cpu, disk)
MAX_MEDIA = 6
_U64 = (1 << 64) - 1
_STAMPS = (1 << 32) - 1  # a uint32 stamp's limit: the stamps are renumbered there
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


# an endpoint's engine hash -> our key, and the row's LRU stamp (0: an unused row)
_ENGINE_COLUMNS = {"key": (np.uint64, 1, 0), "seq": (np.uint32, 1, 0)}
# a key's first two holders: endpoint id (-1: none) and the mask of media holding the block there; `more`:
# 1 where the key has more than two holders, all of them (these two first) in the index's `_more`
_HOLDER_COLUMNS = {"ep0": (np.int16, 1, -1), "ep1": (np.int16, 1, -1), "m0": (np.uint8, 1, 0), "m1": (np.uint8, 1, 0),
                   "more": (np.int8, 1, 0)}  # fmt: skip
_NO_ROWS = np.zeros(0, dtype=np.int32)
K = TypeVar("K")  # an endpoint in the walks: its id (or a speculative holder's address)
V = TypeVar("V")


def engine_key(block_hash: Hashable) -> int:
    """An engine's block hash as the uint64 it is kept under: vLLM's integers (uint64) as they are, other
    hashes (sha256 digests, ...) as their xxh64 digest (two of one endpoint's colliding: ~n^2 / 2^65)."""
    if type(block_hash) is int and 0 <= block_hash <= _U64:
        return block_hash
    if isinstance(block_hash, (bytes, bytearray)):
        return _xxh64(block_hash)
    return _xxh64(repr(block_hash).encode())


class _Column:
    """A memoryview of one flat column of a BlockTable (elements read and written as Python ints),
    renewed when the table grew its rows."""

    __slots__ = ("_view", "name", "table")

    def __init__(self, table: BlockTable, name: str) -> None:
        self.table, self.name = table, name
        self._view: memoryview | None = None

    def __call__(self) -> memoryview:
        col = self.table.columns[self.name]
        v = self._view
        if v is None or v.obj is not col:
            v = self._view = memoryview(col)
        return v


class _Recency:
    """Least recently touched rows of a BlockTable through its uint32 `seq` column: a touch stamps the row
    with the next count (an unused row's 0 means none). The oldest are found a batch at a time (the
    smallest stamps of all rows) and checked again when taken: a row touched or removed since is skipped,
    and every row stamped after the batch was found is newer than all of it, so the order is exact."""

    __slots__ = ("_at", "_queue", "_seq", "clock", "table")

    def __init__(self, table: BlockTable) -> None:
        self.table = table
        self.clock = 1
        self._seq = _Column(table, "seq")
        self._queue: list[tuple[int, int]] = []  # (row, its stamp then), oldest first
        self._at = 0

    def touch(self, row: int) -> None:
        self._seq()[row] = self.clock
        self.clock += 1
        if self.clock == _STAMPS:
            self._renumber()

    def oldest(self) -> int:
        """The least recently touched live row (the table has one)."""
        seq = self._seq()
        while True:
            queue = self._queue
            while self._at < len(queue):
                row, stamp = queue[self._at]
                self._at += 1
                if seq[row] == stamp:
                    return row
            self._refill()

    def _refill(self) -> None:
        col = self.table.columns["seq"]
        live = col.nonzero()[0]
        stamps = col[live]
        k = min(len(live), max(64, len(live) // 64))  # a 64th of the rows: the scan's cost shared by as many evictions
        part = np.argpartition(stamps, k - 1)[:k] if k < len(live) else np.arange(len(live))
        part = part[np.argsort(stamps[part])]
        self._queue = list(zip(live[part].tolist(), stamps[part].tolist()))
        self._at = 0

    def _renumber(self) -> None:
        col = self.table.columns["seq"]
        live = col.nonzero()[0]
        col[live[np.argsort(col[live])]] = np.arange(1, len(live) + 1, dtype=np.uint32)
        self.clock = len(live) + 1
        self._queue, self._at = [], 0


@dataclass(slots=True)
class EndpointBlocks:
    """One endpoint's blocks: engine hash -> our key, rows of a BlockTable in LRU order (`recency`)."""

    eid: int  # the endpoint's id in the index's holder columns
    table: BlockTable = field(default_factory=lambda: BlockTable(_ENGINE_COLUMNS))
    block_size: int | None = None
    orphans: int = 0  # stored blocks dropped because their parent was unknown (we joined late)
    gaps: int = 0  # times its event stream lost messages and the state was reset
    # the engine's global data-parallel rank, as its batches name it: known only under llm-d's rank-granular
    # identity (kvEventsConfig.servingPortBase), for p2p-source-producer's p2pPortBase
    global_dp_rank: int | None = None
    recency: _Recency = field(init=False)
    key: _Column = field(init=False)  # row -> our key

    def __post_init__(self) -> None:
        self.recency = _Recency(self.table)
        self.key = _Column(self.table, "key")

    @property
    def blocks(self) -> int:
        return self.table.used

    def clear(self) -> None:
        self.table = BlockTable(_ENGINE_COLUMNS)
        self.__post_init__()


@dataclass(slots=True)
class IndexMetrics:
    """What llm-d-kv-cache's instrumented index counts (its kvblock metrics), since the index was made."""

    admissions: int = 0  # blocks stored: by events (a block per key) and speculatively (a block per endpoint)
    evictions: int = 0  # blocks removed: by events and by speculative entries expiring
    lookups: int = 0  # scoring lookups
    hits: int = 0  # per lookup, the blocks of the longest leading chain one endpoint holds, summed
    latency: Histogram = field(default_factory=lambda: Histogram(LOOKUP_LATENCY_BUCKETS))  # seconds a lookup


class KVBlockIndex:
    """our key -> endpoints holding it (with the media), plus each endpoint's engine-hash map (for removals)."""

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
        columns = dict(_HOLDER_COLUMNS)
        if max_keys is not None:  # keys in the order last stored, for max_keys
            columns["seq"] = (np.uint32, 1, 0)
        self._k = BlockTable(columns)  # our key -> its holders
        self._recent = _Recency(self._k) if max_keys is not None else None
        # row -> endpoint id -> media of every holder (least recently stored first), for keys held by three or
        # more: the lookups' walks compare a row's dict with the previous row's whole (in C), where a shared
        # prefix's consecutive blocks have the same holders
        self._more: dict[int, dict[int, int]] = {}
        self._views()
        self._endpoints: dict[str, EndpointBlocks] = {}
        self._ids = EndpointIds("precise prefix index")
        self._addr = self._ids.addresses  # endpoint id -> address (None: free)
        self.lora_names: set[str] = set()  # adapters seen in events: their blocks chain from their name
        self._media: dict[str, int] = {GPU: GPU_BIT, "": UNNAMED_BIT}  # medium name -> its bit

    def _views(self) -> None:
        """memoryviews of the holder columns (again after the key table grew its rows)."""
        c = self._k.columns
        self._src = c["ep0"]
        self._ep0, self._ep1, self._m0, self._m1, self._flag = (memoryview(c[n]) for n in ("ep0", "ep1", "m0", "m1", "more"))

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

    # -- a key's holders ---------------------------------------------------------------------
    def _holders(self, row: int) -> list[tuple[int, int]]:
        """(endpoint id, media) of the key's holders, least recently stored first."""
        if self._flag[row]:
            return list(self._more[row].items())
        out: list[tuple[int, int]] = []
        e = self._ep0[row]
        if e >= 0:
            out.append((e, self._m0[row]))
            e = self._ep1[row]
            if e >= 0:
                out.append((e, self._m1[row]))
        return out

    def _set_holders(self, row: int, holders: list[tuple[int, int]]) -> None:
        n = len(holders)
        self._ep0[row], self._m0[row] = holders[0] if n else (-1, 0)
        self._ep1[row], self._m1[row] = holders[1] if n > 1 else (-1, 0)
        if n > 2:
            self._more[row] = dict(holders)
            self._flag[row] = 1
        elif self._flag[row]:
            del self._more[row]
            self._flag[row] = 0

    def _inline(self, row: int, holders: dict[int, int]) -> None:
        """The inline columns after a change to a shared key's dict (three holders or more): its first two."""
        it = iter(holders.items())
        self._ep0[row], self._m0[row] = next(it)
        self._ep1[row], self._m1[row] = next(it)

    def _hold(self, key: int, eid: int, bit: int) -> None:
        """Endpoint `eid` holds `key` on the medium of `bit` (too), most recently stored."""
        row = self._k.find_one(key)
        if row < 0:
            row = self._k.add_one(key)
            if self._k.columns["ep0"] is not self._src:
                self._views()
            self._ep0[row], self._m0[row] = eid, bit
        elif self._ep0[row] == eid and self._ep1[row] < 0:
            self._m0[row] |= bit
        elif self._flag[row]:  # a shared key: its dict changed in place
            d = self._more[row]
            mask = d.pop(eid, 0)
            d[eid] = mask | bit  # most recent last
            if self.pods_per_key is not None and len(d) > self.pods_per_key:  # (pods_per_key >= 3 here)
                del d[next(iter(d))]
            self._inline(row, d)
        else:
            holders = self._holders(row)
            for i, (e, mask) in enumerate(holders):
                if e == eid:
                    del holders[i]
                    holders.append((eid, mask | bit))  # most recent last
                    break
            else:
                holders.append((eid, bit))
                if self.pods_per_key is not None and len(holders) > self.pods_per_key:
                    del holders[0]
            self._set_holders(row, holders)
        if self._recent is not None:
            self._recent.touch(row)

    def _strip(self, row: int, eid: int, bit: int) -> bool:
        """Take the medium of `bit` from endpoint `eid`'s hold on the key; False where no other medium would
        be left (or it does not hold the key): the hold should go."""
        if self._flag[row]:
            more = self._more[row]
            mask = more.get(eid, 0) & ~bit
            if not mask:
                return False
            more[eid] = mask
            if self._ep0[row] == eid:
                self._m0[row] = mask
            elif self._ep1[row] == eid:
                self._m1[row] = mask
            return True
        if self._ep0[row] == eid:
            mask, view = self._m0[row], self._m0
        elif self._ep1[row] == eid:
            mask, view = self._m1[row], self._m1
        else:
            return False
        if not mask & ~bit:
            return False
        view[row] = mask & ~bit
        return True

    def _drop(self, key: int, eid: int) -> None:
        row = self._k.find_one(key)
        if row >= 0:
            self._drop_row(row, eid)

    def _drop_row(self, row: int, eid: int) -> None:
        if self._ep0[row] == eid and self._ep1[row] < 0:
            self._k.remove_one(row)
            return
        if self._flag[row]:
            d = self._more[row]
            if d.pop(eid, None) is not None:
                if len(d) > 2:
                    self._inline(row, d)
                else:
                    self._set_holders(row, list(d.items()))
            return
        holders = self._holders(row)
        kept = [h for h in holders if h[0] != eid]
        if len(kept) == len(holders):
            return
        if kept:
            self._set_holders(row, kept)
        else:
            self._remove_key(row)

    def _remove_key(self, row: int) -> None:
        if self._flag[row]:
            del self._more[row]
        self._k.remove_one(row)

    # -- events (the subscriber) ------------------------------------------------------------
    def _ep(self, address: str) -> EndpointBlocks:
        ep = self._endpoints.get(address)
        if ep is None:
            eid = self._ids.take(address)
            ep = self._endpoints[address] = EndpointBlocks(eid)
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
        table, eid = ep.table, ep.eid
        if not token_ids:  # the blocks are known by their hashes: now (also) on this medium
            known = 0
            for engine_hash in block_hashes:
                row = table.find_one(engine_key(engine_hash))
                if row >= 0:
                    ep.recency.touch(row)
                    self._hold(ep.key()[row], eid, bit)
                    known += 1
            self._trim(ep)
            if self.metrics is not None:
                self.metrics.admissions += known
            return known
        ep.block_size = block_size
        if parent_block_hash is None:
            parent = root_key(lora_name, self.hash_seed)
            if lora_name:
                self.lora_names.add(lora_name)
        else:
            found = table.find_one(engine_key(parent_block_hash))
            if found < 0:
                ep.orphans += len(block_hashes)
                return 0
            parent = ep.key()[found]
        stored = 0
        touch, find, add = ep.recency.touch, table.find_one, table.add_one
        for i, engine_hash in enumerate(block_hashes):
            tokens = token_ids[i * block_size : (i + 1) * block_size]
            if len(tokens) < block_size:
                break
            key = chain_key(parent, tokens)
            h = engine_key(engine_hash)
            row = find(h)
            if row < 0:
                row = add(h)
                ep.key()[row] = key
            else:
                keys = ep.key()
                old = keys[row]
                if old != key:
                    self._drop(old, eid)
                    keys[row] = key
            touch(row)
            self._hold(key, eid, bit)
            parent = key
            stored += 1
        self._trim(ep)
        if self.metrics is not None:
            self.metrics.admissions += stored
        return len(block_hashes)

    def _trim(self, ep: EndpointBlocks) -> None:
        """The bounds: `capacity` blocks per endpoint, `max_keys` keys (the least recently stored go)."""
        table = ep.table
        while table.used > self.capacity:
            row = ep.recency.oldest()
            key = ep.key()[row]
            table.remove_one(row)
            self._drop(key, ep.eid)
        if self._recent is not None and self.max_keys is not None:
            while self._k.used > self.max_keys:
                self._remove_key(self._recent.oldest())  # endpoints' maps keep the engine hash: resolving parents still works

    def block_removed(self, address: str, block_hashes: Iterable[Hashable], medium: str | None = None) -> None:
        """The engine dropped these blocks from `medium`; a block another medium still holds stays."""
        ep = self._endpoints.get(address)
        if ep is None:
            return
        bit = self.medium_bit(medium, register=False)
        if not bit:  # a medium no block was stored on
            return
        removed = 0
        table, eid = ep.table, ep.eid
        for engine_hash in block_hashes:
            row = table.find_one(engine_key(engine_hash))
            if row < 0:
                continue
            removed += 1
            key = ep.key()[row]
            held = self._k.find_one(key)
            if held >= 0 and self._strip(held, eid, bit):
                continue
            table.remove_one(row)
            if held >= 0:
                self._drop_row(held, eid)
        if self.metrics is not None:
            self.metrics.evictions += removed

    def clear_endpoint(self, address: str) -> None:
        """AllBlocksCleared, a restarted engine or a lost stream: the endpoint holds nothing we know of."""
        ep = self._endpoints.get(address)
        if ep is None or not ep.table.used:
            return
        cols = ep.table.columns
        keys = np.unique(cols["key"][cols["seq"].nonzero()[0]])  # every live row has a stamp
        rows = self._k.find(keys)
        rows = rows[rows >= 0]
        c = self._k.columns
        alone = (c["ep0"][rows] == ep.eid) & (c["ep1"][rows] < 0)  # its only holder: the key goes (in one call)
        self._k.remove(rows[alone])
        for row in rows[~alone].tolist():
            self._drop_row(row, ep.eid)
        ep.clear()

    def mark_gap(self, address: str) -> None:
        """Events were lost: what we know may be wrong both ways. Forget it all (no false hits);
        later events rebuild the state."""
        self.clear_endpoint(address)
        self._ep(address).gaps += 1

    def remove_endpoint(self, address: str) -> None:
        self.clear_endpoint(address)
        ep = self._endpoints.pop(address, None)
        if ep is not None:
            self._ids.release(ep.eid)

    # -- lookups (the scorer) ----------------------------------------------------------------
    def lookup(
        self, keys: Sequence[int], weights: Mapping[int, float] | None = None,
        extra: Mapping[int, Mapping[str, object]] | None = None,
    ) -> dict[str, int]:  # fmt: skip
        """A scoring lookup: leading blocks held per endpoint (`match`), or with `weights` llm-d's
        tier-weighted score truncated to whole blocks (`weighted_match`). Counted in `metrics`."""
        m = self.metrics
        if m is None:  # (no chain to count: a prompt nobody holds costs what the dict index's did)
            if weights is None:
                return self.match(keys, extra)
            return {a: int(score) for a, score in self._weighted(keys, weights, extra)[0].items()}
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

    def _rows(self, keys: Sequence[int], extra: Mapping[int, Mapping[str, object]] | None) -> np.ndarray | None:
        """The rows of the keys up to the first no endpoint holds, for the array walks (`_NO_ROWS` itself where
        it is the first); None where the walk goes key by key (speculative holders of these keys, a key that
        is not a uint64)."""
        if extra and any(k in extra for k in keys):
            return None
        first = keys[0]
        if type(first) is not int:
            return None
        if self._k.find_one(first) < 0:  # (most new prompts: no array call; an int past uint64 is in no row either)
            return _NO_ROWS
        try:  # packed in C, about 3x faster than numpy converting each int
            packed = np.frombuffer(struct.pack(f"<{len(keys)}Q", *keys), np.uint64)
        except struct.error:
            return None
        rows = self._k.find(packed)
        missing = (rows < 0).nonzero()[0]
        return rows[: missing[0]] if missing.size else rows

    def _shared(self, rows: np.ndarray) -> bool:
        """Whether any of these keys has more than two holders."""
        return bool(self._more) and bool(np.count_nonzero(self._k.columns["more"][rows]))

    def _maps(self, keys: Sequence[int], extra: Mapping[int, Mapping[str, object]] | None) -> Iterator[dict[int | str, int]]:
        """Each key's holders, key by key (endpoint id -> media), with its speculative holders (no medium:
        UNNAMED_BIT; an endpoint the index has no id for by its address)."""
        find, flag, more, endpoints = self._k.find_one, self._flag, self._more, self._endpoints
        for key in keys:
            row = find(key) if type(key) is int and 0 <= key <= _U64 else -1
            d: dict[int | str, int] = {} if row < 0 else more[row] if flag[row] else dict(self._holders(row))  # type: ignore[assignment]
            spec = extra.get(key) if extra else None
            if spec:
                d = dict(d)  # (a shared key's dict is the index's own)
                for a in spec:
                    ep = endpoints.get(a)
                    e = a if ep is None else ep.eid
                    d[e] = d.get(e, 0) | UNNAMED_BIT
            yield d

    def _row_maps(self, rows: np.ndarray) -> Iterator[dict[int, int]]:
        """Each row's holders (endpoint id -> media): a key held by three or more, its own dict (the walks
        only read it), else one made of the inline two."""
        c, more = self._k.columns, self._more
        for r, e0, m0, e1, m1, f in zip(rows.tolist(), *(c[n][rows].tolist() for n in ("ep0", "m0", "ep1", "m1", "more"))):
            if f:
                yield more[r]
            elif e1 < 0:
                yield {e0: m0}
            else:
                yield {e0: m0, e1: m1}

    def _named(self, by_id: Mapping[int, V] | Mapping[int | str, V]) -> dict[str, V]:
        """The walks' endpoint ids (and addresses of speculative holders without one) as addresses."""
        addr = self._addr
        return {addr[e] if type(e) is int else e: v for e, v in by_id.items()}  # type: ignore[misc]

    def _runs(self, rows: np.ndarray, bit: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """(endpoint id, leading blocks it holds, where among them it is the second holder) of each holder
        of the first key, where no key has more than two holders; with `bit`, only blocks held on that
        medium count. (The media columns are read only where needed: each gather is a random read of a
        large table.)"""
        c = self._k.columns
        e0, e1 = c["ep0"][rows], c["ep1"][rows]
        if bit:
            on0, on1 = (c["m0"][rows] & bit) != 0, (c["m1"][rows] & bit) != 0
        n = len(rows)
        for e in {int(e0[0]), int(e1[0])} - {-1}:
            in0, in1 = e0 == e, e1 == e
            if bit:
                in0 &= on0
                in1 &= on1
            has = in0 | in1
            run = n if np.count_nonzero(has) == n else int(np.argmin(has))
            if run:
                yield e, run, in1[:run]

    def _run_media(self, rows: np.ndarray, second: np.ndarray) -> list[int]:
        """The media of an endpoint's leading blocks (`rows`), from the second holder's column where it is that."""
        c = self._k.columns
        media = c["m0"][rows]
        if second.any():
            media = np.where(second, c["m1"][rows], media)
        return media.tolist()  # type: ignore[no-any-return]

    def match(self, keys: Sequence[int], extra: Mapping[int, Mapping[str, object]] | None = None) -> dict[str, int]:
        """Leading blocks held per endpoint; the walk stops at the first block nobody holds. `extra`:
        more holders per key (speculative entries), counted as if stored."""
        if not keys:
            return {}
        rows = self._rows(keys, extra)
        if rows is _NO_ROWS:
            return {}
        if rows is None:
            return self._named(_match_walk(self._maps(keys, extra)))
        if self._shared(rows):
            return self._named(_match_walk(self._row_maps(rows)))
        addr = self._addr
        return {addr[e]: run for e, run, _ in self._runs(rows)}  # type: ignore[misc]

    def medium_match(self, keys: Sequence[int], medium: str) -> dict[str, int]:
        """Leading blocks each endpoint holds on `medium` (lower-cased), up to the first it lacks there;
        speculative entries hold no medium, so they never count."""
        bit = self._media.get(medium.lower())
        if not bit or not keys:
            return {}
        rows = self._rows(keys, None)
        if rows is _NO_ROWS:
            return {}
        if rows is None:
            return self._named(_medium_walk(self._maps(keys, None), bit))
        if self._shared(rows):
            return self._named(_medium_walk(self._row_maps(rows), bit))
        addr = self._addr
        return {addr[e]: run for e, run, _ in self._runs(rows, bit)}  # type: ignore[misc]

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
        if not keys:
            return {}, 0
        rows = self._rows(keys, extra)
        if rows is _NO_ROWS:
            return {}, 0
        if rows is None or self._shared(rows):
            by_id, chain = _weighted_walk(self._maps(keys, extra) if rows is None else self._row_maps(rows), weights)
            return self._named(by_id), chain
        scores: dict[str, float] = {}
        chain = 0
        addr, weight = self._addr, weights.__getitem__
        for e, run, second in self._runs(rows):
            # added one by one, in order: the reference's sums to the last bit (sum() compensates its
            # rounding from Python 3.12 on, which a plain sequence of additions does not)
            scores[addr[e]] = reduce(add, map(weight, self._run_media(rows[:run], second)), 0.0)  # type: ignore[index]
            chain = max(chain, run)
        return scores, chain

    def block_sizes(self) -> set[int]:
        return {ep.block_size for ep in self._endpoints.values() if ep.block_size}

    def block_size_of(self, address: str) -> int | None:
        ep = self._endpoints.get(address)
        return ep.block_size if ep else None

    def blocks_of(self, address: str) -> int:
        ep = self._endpoints.get(address)
        return ep.table.used if ep else 0

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
        return sum(ep.table.used for ep in self._endpoints.values())

    def keys_held(self) -> int:
        """Distinct keys some endpoint holds (max_keys bounds it)."""
        return self._k.used

    def memory_bytes(self) -> int:
        """The arrays' bytes, plus ~100 bytes per holder of a key held by three or more (its dict's entries)."""
        shared = sum(len(d) for d in self._more.values())
        return self._k.nbytes() + sum(ep.table.nbytes() for ep in self._endpoints.values()) + 100 * shared + 200 * len(self._more)


# The walks over each key's holders (endpoint -> media, endpoints by id), up to the first key
# nobody holds. A shared prefix's consecutive blocks mostly have the same holders: such a key costs one
# comparison of two dicts (in C), not a step per endpoint.


def _match_walk(maps: Iterable[Mapping[K, int]]) -> dict[K, int]:
    """`match`: the leading keys each holder of the first key holds."""
    counts: dict[K, int] = {}
    it = iter(maps)
    first = next(it, None)
    if not first:
        return counts
    active, prev = set(first), first
    n = 1  # keys every endpoint in `active` holds; each holds `prev`
    for holders in it:
        if holders != prev and not holders.keys() >= active:  # (the first test is the quicker)
            gone = active.difference(holders)
            for e in gone:
                counts[e] = n
            active -= gone
            if not active:
                return counts
        prev = holders
        n += 1
    for e in active:
        counts[e] = n
    return counts


def _medium_walk(maps: Iterable[Mapping[K, int]], bit: int) -> dict[K, int]:
    """`medium_match`: the leading keys each endpoint holds on the medium of `bit`."""
    counts: dict[K, int] = {}
    it = iter(maps)
    prev = next(it, None)
    if not prev:
        return counts
    active = [e for e, mask in prev.items() if mask & bit]
    n = 1  # keys every endpoint in `active` holds there; each holds `prev` there
    for holders in it:
        if not active:
            return counts
        if holders != prev:
            kept = [e for e in active if holders.get(e, 0) & bit]
            if len(kept) < len(active):
                for e in set(active).difference(kept):
                    counts[e] = n
                active = kept
            prev = holders
        n += 1
    for e in active:
        counts[e] = n
    return counts


def _weighted_walk(maps: Iterable[Mapping[K, int]], weights: Mapping[int, float]) -> tuple[dict[K, float], int]:
    """`weighted_match` and the longest leading chain: per endpoint the weights of its leading keys' media,
    added one key at a time in key order (the reference's sums, to the last bit)."""
    scores: dict[K, float] = {}
    it = iter(maps)
    prev = next(it, None)
    if not prev:
        return scores, 0
    for e, mask in prev.items():
        scores[e] = weights[mask]
    active = list(scores)
    chain = 1
    same = 0  # keys since `prev` with the same holders and media, their weights not added yet
    for holders in it:
        if holders == prev:
            same += 1
            chain += 1
            continue
        if same:
            _add_repeated(scores, active, prev, weights, same)
            same = 0
        left = False
        for e in active:
            mask = holders.get(e)
            if mask:
                scores[e] += weights[mask]
            else:
                left = True
        if left:  # allocates only when an endpoint's match ends
            active = [e for e in active if holders.get(e)]
            if not active:
                break
        chain += 1
        prev = holders
    if same:
        _add_repeated(scores, active, prev, weights, same)
    return scores, chain


def _add_repeated(scores: dict[K, float], active: list[K], media: Mapping[K, int], weights: Mapping[int, float], times: int) -> None:
    """Each active endpoint's score plus its weight in `media`, `times` times over, one addition at a time;
    computed once per distinct (score, media) (endpoints that held the same keys the same way share both)."""
    done: dict[tuple[float, int], float] = {}
    for e in active:
        start = (scores[e], media[e])
        total = done.get(start)
        if total is None:
            total, w = start[0], weights[start[1]]
            for _ in range(times):
                total += w
            done[start] = total
        scores[e] = total


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
