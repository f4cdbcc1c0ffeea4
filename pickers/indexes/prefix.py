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

import struct
import time
from collections.abc import Sequence

import numpy as np
import xxhash

from pickers.framework.histogram import Histogram
from pickers.framework.request import CHARS_PER_TOKEN
from pickers.indexes.block_table import BlockTable
from pickers.indexes.endpoint_ids import EndpointIds

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


class _Lru:
    """One endpoint's blocks in recency order without an object per block: a queue of rows (oldest at
    `head`) with the time each was recorded. Recording a held block again appends it anew; the row's
    holder slot keeps the queue position of its latest element, so older ones are skipped as stale."""

    __slots__ = ("capacity", "eid", "head", "live", "moved", "read", "rows", "tail", "times", "write")

    def __init__(self, eid: int) -> None:
        self.eid = eid
        self.rows = np.zeros(64, dtype=np.int32)
        self.times = np.zeros(64, dtype=np.float32)  # seconds since the index's epoch
        self.head = self.tail = 0
        self.live = 0  # blocks held (valid elements between head and tail)
        self.capacity = 0  # 0: the index's default
        # a compaction under way (read < 0: none): valid elements from `read` on are being moved down to
        # `write` (from the array's start), a slice per record; once some are (`moved`), the queue is
        # head..write then read..tail, and between the two lies only garbage (elements whose row's holder
        # slot points elsewhere), which every reader of the queue sees as stale elements
        self.write = self.read = -1
        self.moved = False


# the per-block columns: two holders inline (endpoint id and its queue position), the block that
# followed it when it was new and how many distinct ones did (0: none, 1: `nxt`, 2: a set in _fanout)
# (fan's bit 4, _SHARED: the block has holders past the inline two, in _more)
_COLUMNS = {"ep": (np.int16, 2, -1), "pos": (np.int32, 2, -1), "nxt": (np.uint64, 1, 0), "fan": (np.int8, 1, 0)}
_SHARED = 4


def _keys(hashes: Sequence[int]) -> np.ndarray:
    try:  # packed in C, about 3x faster than numpy converting each int
        return np.frombuffer(struct.pack(f"<{len(hashes)}Q", *hashes), np.uint64)
    except struct.error:  # a negative or wider int (not a block hash): its low 64 bits
        return np.array([h & 0xFFFFFFFFFFFFFFFF for h in hashes], dtype=np.uint64)


_COMPACT_MIN = 512  # queue elements a compaction moves per record at least

_WORD = 64  # endpoint ids below this: a block's holders fit one uint64 (the small pools' walk)
_ONE_BIT = np.array([1 << i for i in range(_WORD)] + [0], dtype=np.uint64)  # id -> its bit; -1 (the last) -> 0


def _nonzero(mask: np.ndarray) -> np.ndarray:
    return mask.nonzero()[0]  # (np.flatnonzero's wrapper costs more than the work on a prompt's blocks)


def _take(column: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """column[rows] of a 2-D column: np.take's path, several times faster than numpy's 2-D fancy indexing
    (~10x over a queue's tens of thousands of rows); the method, without np.take's Python wrapper."""
    return column.take(rows, 0)


def _bit_ids(bits: int) -> list[int]:
    out = []
    while bits:
        low = bits & -bits
        out.append(low.bit_length() - 1)
        bits ^= low
    return out


class ApproxPrefixIndex:
    """block hash -> endpoints that hold it, plus one LRU of hashes per endpoint (each with the time it
    was last recorded there), plus the fan-out of shared prefixes: for a block where prompts went on
    differently, the distinct blocks that followed it (a system prompt many conversations continue).

    Compact: blocks are rows of numpy columns (pickers.indexes.block_table) holding up to two holders
    inline; a block held by more endpoints keeps the others in a small dict (and their bitset), which
    only shared prefixes need. About 40 bytes per (endpoint, block) entry (bench/scale.py), none of
    them Python objects the garbage collector walks. Endpoints are small integer ids inside; the API
    speaks addresses."""

    def __init__(self, default_capacity: int = DEFAULT_CAPACITY) -> None:
        self.default_capacity = default_capacity
        self._t = BlockTable(_COLUMNS)
        self._columns()
        self._lru: dict[str, _Lru] = {}
        self._ids = EndpointIds("prefix index")
        self._addr = self._ids.addresses  # endpoint id -> address (None: free)
        # row -> {endpoint id: queue position} of holders past the two inline ones, and their bitset
        self._more: dict[int, dict[int, int]] = {}
        self._more_bits: dict[int, int] = {}
        self._fanout: dict[int, set[int]] = {}  # row -> distinct continuations (fan == 2)
        self._epoch: float | None = None
        self._last: tuple[Sequence[int], int, int, np.ndarray, np.ndarray] | None = None  # see _find
        # room_columns' per-endpoint rows (blocks free before the capacity, oldest block's time; float64)
        # by endpoint id, one matrix so one gather reads both; the default capacity they were made with;
        # and the endpoints recorded since they were last brought up to date
        self._state = np.zeros((2, 0))
        self._state_default = default_capacity
        self._changed: set[str] = set()
        self._ids_cache: tuple[Sequence[str], int, np.ndarray] | None = None  # endpoint_ids' last answer
        self._ids_version = 0  # bumped when an endpoint id is given out or freed
        self.hit_ratio = Histogram(HIT_RATIO_BUCKETS)  # one observation per lookup of a prompt of >= 1 block

    def _columns(self) -> None:
        """The holder columns, and views of their inline slots (a strided 1-D view is written and read at
        about half the cost of a 2-D `a[rows, k]`), again after the table grew its rows."""
        ep, pos = self._ep, self._pos = self._t.columns["ep"], self._t.columns["pos"]
        self._ep0, self._ep1, self._pos0, self._pos1 = ep[:, 0], ep[:, 1], pos[:, 0], pos[:, 1]

    # -- lookups -------------------------------------------------------------------------------
    def _walk(self, hashes: Sequence[int]) -> tuple[dict[int, int], int]:
        """(endpoint id -> leading blocks it holds, where the walk stopped): the walk stops at the first
        block none of the endpoints holding every block so far holds."""
        _, rows = self._find(hashes)
        missing = _nonzero(rows < 0)
        m = int(missing[0]) if missing.size else len(rows)
        if not m:
            return {}, 0
        rows = rows[:m]
        held = _take(self._ep, rows)
        shared = self._t.columns["fan"][rows] & _SHARED
        if len(self._addr) <= _WORD:  # ids fit one word: every block's holders as a bitset, and their running AND
            return self._walk_bits(rows, held, shared, m)
        if not np.count_nonzero(shared):  # at most two holders a block: each one's leading run in array ops
            counts = {}
            for e in {int(x) for x in held[0] if x >= 0}:
                has = (held[:, 0] == e) | (held[:, 1] == e)
                counts[e] = m if np.count_nonzero(has) == m else int(np.argmin(has))
            return counts, max(counts.values())
        more = self._more_bits
        holders = held.tolist()
        flags = shared.tolist()
        last_shared = int(shared.nonzero()[0][-1])
        counts = {}
        active = 0
        for i in range(m):
            a, b = holders[i]
            bits = (1 << a if a >= 0 else 0) | (1 << b if b >= 0 else 0)
            if flags[i]:
                bits |= more.get(int(rows[i]), 0)
            if i == 0:
                active = bits
                continue
            dropped = active & ~bits
            if dropped:
                for e in _bit_ids(dropped):  # they held blocks 0..i-1
                    counts[e] = i
                active &= bits
                if not active:
                    return counts, i
            if i > last_shared and not active & (active - 1):
                # one endpoint left and no shared block ahead: follow it in array ops
                e = active.bit_length() - 1
                has = (held[i:, 0] == e) | (held[i:, 1] == e)
                counts[e] = m if np.count_nonzero(has) == m - i else i + int(np.argmin(has))
                return counts, counts[e]
        for e in _bit_ids(active):
            counts[e] = m
        return counts, m

    def _walk_bits(self, rows: np.ndarray, held: np.ndarray, shared: np.ndarray, m: int) -> tuple[dict[int, int], int]:
        """`_walk` when every endpoint id is below 64: block i's holders as one uint64 (inline holders through
        a table of single bits, -1 reading 0; shared blocks OR their extra holders), then the running AND
        says who held every block so far; an endpoint's run ends where its bit leaves it. A few array
        calls and one Python step per endpoint that drops out, whatever the number of blocks."""
        one = _ONE_BIT[held]  # (indexing with the whole block, not its strided int16 columns: ~3x less)
        bits = one[:, 0] | one[:, 1]
        extra = _nonzero(shared)
        if extra.size:
            get = self._more_bits.get
            bits[extra] |= np.array([get(r, 0) for r in rows[extra].tolist()], dtype=np.uint64)
        acc = np.bitwise_and.accumulate(bits)
        counts: dict[int, int] = {}
        active = int(acc[0])
        for j in _nonzero(acc[1:] != acc[:-1]).tolist():
            now = int(acc[j + 1])
            for e in _bit_ids(active & ~now):  # they held blocks 0..j
                counts[e] = j + 1
            active = now
        for e in _bit_ids(active):
            counts[e] = m
        return counts, max(counts.values(), default=0)

    def _find(self, hashes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of these hashes; the last lookup's again when it was of the same list and the
        table has not changed since (a pick records the blocks its match looked up)."""
        last = self._last
        if last is not None and last[0] is hashes and last[1] == self._t.version and last[2] == len(hashes):
            return last[3], last[4].copy()
        keys = _keys(hashes)
        rows = self._t.find(keys)
        self._last = (hashes, self._t.version, len(hashes), keys, rows)
        return keys, rows.copy()

    def match(self, hashes: list[int]) -> dict[str, int]:
        """Leading blocks held per endpoint; the walk stops at the first block none of the leaders holds."""
        n = len(hashes)
        if not n:
            return {}
        counts, walked = self._walk(hashes)
        self.hit_ratio.observe(walked / n)
        addr = self._addr
        return {addr[e]: c for e, c in counts.items()}  # type: ignore[misc]

    def endpoint_ids(self, addresses: Sequence[str]) -> np.ndarray:
        """The index's ids of these endpoints (-1: holds nothing), for `match_lengths`; valid until an
        endpoint is added or removed (`ids_version` changes)."""
        last = self._ids_cache
        if last is not None and last[0] is addresses and last[1] == self._ids_version:
            return last[2]
        get = self._lru.get
        ids = np.fromiter(((lru.eid if (lru := get(a)) is not None else -1) for a in addresses), np.intp, len(addresses))
        self._ids_cache = (addresses, self._ids_version, ids)
        return ids

    @property
    def ids_version(self) -> int:
        return self._ids_version

    def match_lengths(self, hashes: list[int], ids: np.ndarray | None = None) -> np.ndarray:
        """`match` for every endpoint at once: the leading blocks each holds, indexed by endpoint id
        (`ids`: these endpoints' ids from `endpoint_ids`, in their order; -1 reads 0)."""
        lengths = np.zeros(len(self._addr) + 1, dtype=np.int64)  # the last one: ids of -1
        n = len(hashes)
        if n:
            counts, walked = self._walk(hashes)
            self.hit_ratio.observe(walked / n)
            if counts:
                lengths[list(counts)] = list(counts.values())
        return lengths[:-1] if ids is None else lengths.take(ids)

    def holds(self, address: str, h: int) -> bool:
        """Whether the endpoint holds this block."""
        lru = self._lru.get(address)
        row = int(self._t.find(_keys([h]))[0])
        if lru is None or row < 0:
            return False
        e = lru.eid
        return e in self._ep[row].tolist() or e in self._more.get(row, ())

    # -- recording -----------------------------------------------------------------------------
    def _endpoint(self, address: str) -> _Lru:
        lru = self._lru.get(address)
        if lru is None:
            eid = self._ids.take(address)
            lru = self._lru[address] = _Lru(eid)
            self._ids_version += 1
        return lru

    def record(self, address: str, hashes: list[int], capacity: int | None = None, now: float | None = None) -> None:
        """The endpoint now holds these blocks. The first block is made the most recent, as vLLM frees a
        request's blocks tail first: a full LRU evicts a prompt's tail before its head, so what stays
        still matches as a prefix. Where the prompt leaves what the pool held, the block it continues
        from counts one more distinct continuation (hashes chain, so that is the only new one). `hashes`
        must be distinct, as a prompt's chained block hashes are."""
        lru = self._endpoint(address)
        if capacity:
            lru.capacity = capacity
        t = time.monotonic() if now is None else now
        if self._epoch is None:
            self._epoch = t
        if hashes:  # chained block hashes never repeat (a caller with other keys makes them distinct)
            self._record(lru, hashes, t - self._epoch)
        over = lru.live - (lru.capacity or self.default_capacity)
        if over > 0:
            self._evict(lru, over)
        self._changed.add(address)

    def _record(self, lru: _Lru, hashes: Sequence[int], t: float) -> None:
        n = len(hashes)
        table = self._t
        keys, rows = self._find(hashes)
        new = _nonzero(rows < 0)
        if new.size:
            rows[new] = table.add(keys[new])
            if self._ep is not table.columns["ep"]:  # the table grew its rows
                self._columns()
            cols = table.columns
            followed = new[new + 1 < n]  # new to the pool: its one continuation so far
            cols["nxt"][rows[followed]] = keys[followed + 1]
            cols["fan"][rows[followed]] = 1
            frontier = int(new[0])
            if frontier > 0:
                self._continued(int(rows[frontier - 1]), int(keys[frontier]))
        self._make_room(lru, n)
        # appended last block first, so the first block is the most recent
        base = lru.tail
        lru.rows[base : base + n] = rows[::-1]
        lru.times[base : base + n] = t
        lru.tail += n
        pos = (base + n - 1) - np.arange(n, dtype=np.int32)
        e = lru.eid
        ep0, ep1, ps0, ps1 = self._ep0, self._ep1, self._pos0, self._pos1
        held = _take(self._ep, rows)
        in0, in1 = held[:, 0] == e, held[:, 1] == e
        ps0[rows[in0]] = pos[in0]
        ps1[rows[in1]] = pos[in1]
        rest = _nonzero(~(in0 | in1))
        if not rest.size:
            return
        more = self._more
        if more:  # held past the inline slots: a new position there
            todo = []
            top = base + n - 1  # pos[i], without a numpy scalar each
            get = more.get
            for i, r in zip(rest.tolist(), rows[rest].tolist()):
                extra = get(r)
                if extra is not None and e in extra:
                    extra[e] = top - i
                else:
                    todo.append(i)
            rest = np.array(todo, dtype=np.intp)
        lru.live += len(rest)
        r = rows[rest]
        free0 = ep0[r] < 0
        if np.count_nonzero(free0) == len(r):  # the common case: each takes a first inline slot (blocks new to the pool)
            ep0[r] = e
            ps0[r] = pos[rest]
            return
        ep0[r[free0]] = e
        ps0[r[free0]] = pos[rest[free0]]
        rest, r = rest[~free0], r[~free0]
        free1 = ep1[r] < 0
        ep1[r[free1]] = e
        ps1[r[free1]] = pos[rest[free1]]
        rest, r = rest[~free1], r[~free1]
        if rest.size:
            self._t.columns["fan"][r] |= _SHARED
        for i, row in zip(rest.tolist(), r.tolist()):  # a third holder or more: a shared prefix
            more.setdefault(row, {})[e] = int(pos[i])
            self._more_bits[row] = self._more_bits.get(row, 0) | (1 << e)

    def _continued(self, row: int, after: int) -> None:
        cols = self._t.columns
        fan = cols["fan"]
        f = int(fan[row])
        if f & 3 == 0:
            cols["nxt"][row] = after
            fan[row] = f | 1
        elif f & 3 == 1:
            if int(cols["nxt"][row]) != after:
                self._fanout[row] = {int(cols["nxt"][row]), after}
                fan[row] = (f & _SHARED) | 2
        else:
            seen = self._fanout[row]
            if len(seen) < MAX_FANOUT:
                seen.add(after)

    # -- the queues ----------------------------------------------------------------------------
    def _valid(self, lru: _Lru, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the queue elements start..stop: (valid, in inline slot 0, in inline slot 1)."""
        rows = lru.rows[start:stop]
        at = np.arange(start, stop, dtype=np.int32)
        e = lru.eid
        held, pos = _take(self._ep, rows), _take(self._pos, rows)
        v0 = (held[:, 0] == e) & (pos[:, 0] == at)
        v1 = (held[:, 1] == e) & (pos[:, 1] == at)
        valid = v0 | v1
        more = self._more
        if more:  # held past the inline slots: only shared blocks can be (a queue's many stale elements are not)
            maybe = _nonzero(~valid & (self._t.columns["fan"][rows] & _SHARED != 0))
            if maybe.size:
                get, none = more.get, {}
                at_more = [get(r, none).get(e, -1) for r in rows[maybe].tolist()]
                valid[maybe] = np.array(at_more, dtype=np.int64) == maybe + start
        return valid, v0, v1

    def _make_room(self, lru: _Lru, n: int) -> None:
        """Room for n more queue elements. Stale elements are dropped by a compaction that starts when
        the queue is 3/4 full and moves a bounded slice per record (so no one pick pays for the whole
        queue); the queue grows (in place: positions stay) when a finished compaction leaves it over
        half full. A record that still finds no room finishes the compaction at once."""
        size = len(lru.rows)
        if lru.read >= 0:
            room = size - lru.tail
            left = lru.tail - lru.read
            # enough per record that the pass ends before the appends reach the end (at n a record)
            step = max(_COMPACT_MIN, 2 * left * n // max(room - n, 1))
            self._compact(lru, step)
        elif lru.tail + n > size * 3 // 4:
            lru.write, lru.read, lru.moved = 0, lru.head, False  # what lies before head is garbage
            self._compact(lru, _COMPACT_MIN)
        if lru.tail + n <= len(lru.rows):
            return
        if lru.read >= 0:
            self._compact(lru, lru.tail - lru.read)
        if lru.tail + n > len(lru.rows):
            self._grow(lru, max(64, (lru.tail + n) * 2))

    def _compact(self, lru: _Lru, step: int) -> None:
        """Move the valid elements among the next `step` from `read` down to `write`; at the tail the
        queue ends at `write` (and grows when that leaves it over half full)."""
        if lru.head > lru.read:  # eviction went past what was moved and into the rest: go on in place from head
            lru.write = lru.read = lru.head
            lru.moved = True
        elif lru.moved and lru.head > lru.write:  # it took every moved element
            lru.write = lru.head
        start, stop = lru.read, min(lru.tail, lru.read + step)
        if stop > start:
            valid, v0, v1 = self._valid(lru, start, stop)
            keep_rows = lru.rows[start:stop][valid]
            keep_times = lru.times[start:stop][valid]
            slot0, slot1 = v0[valid], v1[valid]
            w, live = lru.write, len(keep_rows)
            lru.rows[w : w + live] = keep_rows
            lru.times[w : w + live] = keep_times
            at = np.arange(w, w + live, dtype=np.int32)
            self._pos0[keep_rows[slot0]] = at[slot0]
            self._pos1[keep_rows[slot1]] = at[slot1]
            if self._more:
                e, more = lru.eid, self._more
                extra = _nonzero(~(slot0 | slot1))
                for r, i in zip(keep_rows[extra].tolist(), extra.tolist()):
                    more[r][e] = w + i
            lru.write = w + live
            if live and not lru.moved:
                lru.head, lru.moved = w, True
            lru.read = stop
        if lru.read >= lru.tail:
            if lru.moved:
                lru.tail = lru.write
            else:  # none was valid: the queue is empty
                lru.head = lru.tail = 0
            lru.write = lru.read = -1
            if lru.tail - lru.head > len(lru.rows) // 2:
                self._grow(lru, max(64, (lru.tail - lru.head) * 2))

    @staticmethod
    def _skip_gap(lru: _Lru) -> None:
        """A queue being compacted whose moved elements are all gone: its head past the garbage."""
        if lru.moved and lru.read >= 0 and lru.write <= lru.head < lru.read:
            lru.head = lru.read

    @staticmethod
    def _grow(lru: _Lru, size: int) -> None:
        """A longer queue, its elements where they were (positions stay valid)."""
        old = len(lru.rows)
        if size <= old:
            return
        rows = np.zeros(size, dtype=np.int32)
        times = np.zeros(size, dtype=np.float32)
        rows[:old] = lru.rows
        times[:old] = lru.times
        lru.rows, lru.times = rows, times

    def _evict(self, lru: _Lru, over: int) -> None:
        """Drop the `over` least recent blocks of the endpoint."""
        while over > 0 and lru.head < lru.tail:
            self._skip_gap(lru)
            stop = min(lru.tail, lru.head + max(2 * over, 64))
            valid, v0, v1 = self._valid(lru, lru.head, stop)
            take = _nonzero(valid)[:over]
            consumed = int(take[-1]) + 1 if len(take) == over else stop - lru.head
            rows = lru.rows[lru.head : lru.head + consumed][take]
            self._drop_rows(lru.eid, rows, v0[take], v1[take])
            lru.head += consumed
            lru.live -= len(take)
            over -= len(take)

    def _drop_rows(self, e: int, rows: np.ndarray, in0: np.ndarray, in1: np.ndarray) -> None:
        """Endpoint `e` no longer holds these blocks (distinct rows); blocks no one holds leave."""
        r0, r1 = rows[in0], rows[in1]
        self._ep0[r0] = -1
        self._pos0[r0] = -1
        self._ep1[r1] = -1
        self._pos1[r1] = -1
        more = self._more
        if more:
            for r in rows[~(in0 | in1)].tolist():
                extra = more[r]
                del extra[e]
                bits = self._more_bits[r] & ~(1 << e)
                if extra:
                    self._more_bits[r] = bits
                else:
                    del more[r], self._more_bits[r]
                    self._t.columns["fan"][r] &= ~_SHARED
        held = _take(self._ep, rows)
        empty = rows[(held[:, 0] < 0) & (held[:, 1] < 0)]
        if more and empty.size:
            empty = np.array([r for r in empty.tolist() if r not in more], dtype=np.int32)
        if empty.size:
            fan = self._t.columns["fan"]
            if self._fanout:
                for r in empty[fan[empty] & 3 == 2].tolist():
                    del self._fanout[r]
            self._t.remove(empty)

    def _oldest(self, lru: _Lru) -> float:
        """The time the endpoint's least recent block was recorded (stale queue heads skipped)."""
        while lru.head < lru.tail:
            self._skip_gap(lru)
            stop = min(lru.tail, lru.head + 64)
            valid, _, _ = self._valid(lru, lru.head, stop)
            first = _nonzero(valid)
            if first.size:
                lru.head += int(first[0])
                return float(lru.times[lru.head]) + (self._epoch or 0.0)
            lru.head = stop
        return float("inf")

    # -- what the scorers and the views read ---------------------------------------------------
    def shared_prefix(self, hashes: list[int], upto: int) -> tuple[int, int]:
        """(blocks, fan-out): the longest prefix of these blocks, within the first `upto`, after which
        prompts went on in more than one way, and how many ways (0, 1 when there is none): the part
        of a prompt that other conversations share (a system prompt), not its own history."""
        k = min(upto, len(hashes))
        if k <= 0 or not self._fanout:
            return 0, 1
        rows = self._t.find(_keys(hashes[:k]))
        fan = self._t.columns["fan"]
        branched = _nonzero((rows >= 0) & (fan[np.maximum(rows, 0)] & 3 == 2))
        if not branched.size:
            return 0, 1
        i = int(branched[-1])
        return i + 1, len(self._fanout[int(rows[i])])

    def room(self, address: str, blocks: int, now: float, horizon: float) -> bool:
        """Whether `blocks` new blocks fit on the endpoint without evicting a block used within the last
        `horizon` seconds (its LRU has space, or its least recent block is older than that)."""
        lru = self._lru.get(address)
        if lru is None:
            return True
        if lru.live + blocks <= (lru.capacity or self.default_capacity):
            return True
        return now - self._oldest(lru) > horizon

    def room_columns(self, ids: np.ndarray, blocks: np.ndarray, now: float, horizon: float) -> np.ndarray:
        """`room` for many endpoints at once (`ids` from `endpoint_ids`, -1: not known here, so room)."""
        self._refresh_state()
        rows = self._state.take(ids, axis=1)  # ids of -1 read the last column: no limit
        return (blocks <= rows[0]) | (now - rows[1] > horizon)

    def _refresh_state(self) -> None:
        """The per-endpoint rows room_columns reads (blocks free before the capacity, the oldest block's
        time), for the endpoints recorded since the last call."""
        size = len(self._addr) + 1  # the last entry: ids of -1 (nothing held, no limit)
        if self._state_default != self.default_capacity:  # every endpoint without a capacity of its own
            self._state_default = self.default_capacity
            self._changed.update(self._lru)
        if self._state.shape[1] < size:
            old = self._state
            grown = np.zeros((2, size + 16))
            grown[1] = np.inf
            kept = max(0, old.shape[1] - 1)  # the old last column was the -1 entry's
            grown[:, :kept] = old[:, :kept]
            grown[:, -1] = float(1 << 62), np.inf
            self._state = grown
        if not self._changed:
            return
        free, oldest = self._state
        lrus = self._lru
        for address in self._changed:
            lru = lrus.get(address)
            if lru is not None:
                e = lru.eid
                free[e] = (lru.capacity or self.default_capacity) - lru.live
                oldest[e] = self._oldest(lru) if lru.live else np.inf
        self._changed.clear()

    def remove_endpoint(self, address: str) -> None:
        lru = self._lru.pop(address, None)
        if lru is None:
            return
        if lru.live:
            valid, v0, v1 = self._valid(lru, lru.head, lru.tail)
            rows = lru.rows[lru.head : lru.tail][valid]
            self._drop_rows(lru.eid, rows, v0[valid], v1[valid])
        self._ids.release(lru.eid)
        free, oldest = self._state
        if lru.eid < len(free) - 1:
            free[lru.eid], oldest[lru.eid] = self.default_capacity, np.inf
        self._changed.discard(address)
        self._ids_version += 1

    def size(self) -> int:
        """Total (endpoint, block) entries held: the bound is the sum of the capacities."""
        return sum(lru.live for lru in self._lru.values())

    def bound(self) -> int:
        """The most entries `size` can reach with the endpoints known now (the sum of their capacities)."""
        return sum(lru.capacity or self.default_capacity for lru in self._lru.values())

    def blocks_of(self, address: str) -> int:
        lru = self._lru.get(address)
        return lru.live if lru else 0

    def nbytes(self) -> int:
        """The index's arrays (what it holds beyond a few Python objects per endpoint and per shared block)."""
        return self._t.nbytes() + sum(lru.rows.nbytes + lru.times.nbytes for lru in self._lru.values())
