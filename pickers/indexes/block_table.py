"""Rows keyed by 64-bit block hashes, in numpy arrays: the compact store under the prefix indexes.

An open-addressing hash table (linear probing, Fibonacci hashing) whose slots hold int32 row numbers
(-1 empty, -2 deleted); a row's key is kept in the `key` column, so a slot costs 4 bytes. Rows are
dense, reused through a free stack, and carry the columns the owner declares (say the endpoints
holding a block). Lookups, inserts and deletes take whole arrays of keys and probe them together,
so a prompt's blocks cost a few numpy calls, not a Python loop each; nothing allocates a Python
object per row (the cyclic GC has nothing here to walk).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

_EMPTY, _DELETED = -1, -2
_FIB = np.uint64(0x9E3779B97F4A7C15)
_FIB_INT, _U64 = int(_FIB), (1 << 64) - 1  # the same hashing in Python ints (one key at a time)
_MIN_BITS = 6
# (live + deleted) / slots before the table is rebuilt: linear probing's chains grow fast past this,
# and a batch of keys takes as many rounds as its longest chain (stragglers go one by one)
MAX_LOAD = 0.55
_REBUILT_LOAD = 0.45  # the most a rebuild leaves (a power of two of slots): room before the next one
_SCALAR_PLACE = 64  # inserts of up to this many keys go one by one
_SCALAR_TAIL = 4  # keys left probing past the first rounds: followed one by one
_SCALAR_PROBE = 64  # lookups with up to this many keys away from home follow them one by one from the start
_SCALAR_FEW = 8  # lookups with up to this many keys not at home (away or absent) follow them from home: fewer calls


class BlockTable:
    """uint64 key -> row, and per-row columns (`columns[name]`: an array of `rows_capacity` rows)."""

    def __init__(self, columns: Mapping[str, tuple[type, int, int]]) -> None:
        """`columns`: name -> (numpy dtype, width (1: a flat column), value of an unused row)."""
        self._spec = dict(columns)
        self._bits = _MIN_BITS
        self._shift = 64 - self._bits  # a key's home slot: the top `_bits` bits of key * _FIB
        self.slots = np.full(1 << self._bits, _EMPTY, dtype=np.int32)
        self.filled = 0  # live + deleted slots
        self.used = 0  # live rows
        self.version = 0  # changes with every add and remove: rows found before stay valid until then
        rows = 64
        self.key = np.zeros(rows, dtype=np.uint64)
        self.columns: dict[str, np.ndarray] = {name: self._column(name, rows) for name in self._spec}
        self._free = np.zeros(16, dtype=np.int32)  # a stack of freed rows
        self._nfree = 0
        self._high = 0  # rows ever handed out (the rest of the arrays is unused)
        self._mv: tuple[memoryview, memoryview] | None = None  # see _views; None again when either array is replaced

    def _column(self, name: str, rows: int) -> np.ndarray:
        dtype, width, fill = self._spec[name]
        return np.full((rows, width) if width > 1 else rows, fill, dtype=dtype)

    def nbytes(self) -> int:
        return self.slots.nbytes + self.key.nbytes + self._free.nbytes + sum(c.nbytes for c in self.columns.values())

    # -- lookups -------------------------------------------------------------------------------
    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * _FIB) >> np.uint64(self._shift)).astype(np.intp)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key, -1 where absent."""
        rows, _ = self._probe(keys)
        return rows

    def _probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, slot) of each key; -1 for both where absent."""
        n = len(keys)
        if not n or not self.used:
            return np.full(n, -1, dtype=np.int32), np.full(n, -1, dtype=np.intp)
        slots, key, mask = self.slots, self.key, len(self.slots) - 1
        s = self._home(keys)
        r = slots[s]
        hit = key[r] == keys  # (a row of -1 reads the last row's key: masked out next)
        hit &= r >= 0
        if np.count_nonzero(hit) == n:  # every key at its home slot
            return r, s
        idx = np.flatnonzero(~hit)
        if idx.size <= _SCALAR_FEW:  # a held prompt's few stragglers: each followed from its home slot
            self._follow(r, s, idx.tolist(), s[idx].tolist(), keys[idx].tolist())
            return r, s
        more = r != _EMPTY  # a deleted slot or another key: probe on
        more &= ~hit
        idx = more.nonzero()[0]
        if idx.size <= _SCALAR_PROBE:  # a prompt's stragglers (the rest are absent): one by one, no array rounds
            nxt = ((s[idx] + 1) & mask).tolist()
            miss = ~hit
            r[miss] = -1
            s[miss] = -1
            self._follow(r, s, idx.tolist(), nxt, keys[idx].tolist())
            return r, s
        rows = np.full(n, -1, dtype=np.int32)
        where = np.full(n, -1, dtype=np.intp)
        rows[hit], where[hit] = r[hit], s[hit]
        s, k = (s[idx] + 1) & mask, keys[idx]
        while idx.size > _SCALAR_TAIL:
            r = slots[s]
            hit = r >= 0
            hit[hit] = key[r[hit]] == k[hit]
            if np.count_nonzero(hit):
                rows[idx[hit]] = r[hit]
                where[idx[hit]] = s[hit]
            more = (r != _EMPTY) & ~hit  # a deleted slot or another key: probe on
            idx, s, k = idx[more], (s[more] + 1) & mask, k[more]
        self._follow(rows, where, idx.tolist(), s.tolist(), k.tolist())
        return rows, where

    def _follow(self, rows: np.ndarray, where: np.ndarray, idx: list[int], at: list[int], want: list[int]) -> None:
        """Key `want[j]` probed on from slot `at[j]`: its row and slot into rows/where[idx[j]], -1 for both
        where absent. (memoryviews: reading an element as a Python int costs a third of a numpy scalar's.)"""
        slots, key = self._mv or self._views()
        mask = len(slots) - 1
        for i, a, w in zip(idx, at, want):
            r, at_ = -1, -1
            while True:
                r0 = slots[a]
                if r0 == _EMPTY:
                    break
                if r0 >= 0 and key[r0] == w:
                    r, at_ = r0, a
                    break
                a = (a + 1) & mask
            rows[i], where[i] = r, at_

    # -- changes -------------------------------------------------------------------------------
    def add(self, keys: np.ndarray) -> np.ndarray:
        """Rows for keys that are not in the table (distinct); their columns hold the unused values."""
        m = len(keys)
        self.version += 1
        if (self.filled + m) > MAX_LOAD * len(self.slots):
            self._rehash(self.used + m)
        rows = self._alloc(m)
        self.key[rows] = keys
        self._place(keys, rows)
        self.used += m
        return rows

    def remove(self, rows: np.ndarray) -> None:
        """Delete these (live, distinct) rows; their columns go back to the unused values."""
        if not len(rows):
            return
        self.version += 1
        _, where = self._probe(self.key[rows])
        self.slots[where] = _DELETED
        self.used -= len(rows)
        for name, (_, _, fill) in self._spec.items():
            self.columns[name][rows] = fill
        self.key[rows] = 0
        need = self._nfree + len(rows)
        if need > len(self._free):
            self._free = np.concatenate([self._free[: self._nfree], np.zeros(max(need, 2 * len(self._free)) - self._nfree, np.int32)])
        self._free[self._nfree : need] = rows
        self._nfree = need

    def _alloc(self, m: int) -> np.ndarray:
        take = min(m, self._nfree)
        reused = self._free[self._nfree - take : self._nfree].copy()
        self._nfree -= take
        fresh = m - take
        if self._high + fresh > len(self.key):
            self._grow_rows(self._high + fresh)
        rows = np.concatenate([reused, np.arange(self._high, self._high + fresh, dtype=np.int32)]) if fresh else reused
        self._high += fresh
        return rows

    def _grow_rows(self, need: int) -> None:
        size = max(need, len(self.key) * 5 // 4 + 64)  # 1.25x: the slack stays a quarter at most
        old = len(self.key)
        self.key = np.concatenate([self.key, np.zeros(size - old, dtype=np.uint64)])
        self._mv = None
        for name in self._spec:
            col = self.columns[name]
            self.columns[name] = np.concatenate([col, self._column(name, size - old)])

    def _place(self, keys: np.ndarray, rows: np.ndarray) -> None:
        slots, mask = self.slots, len(self.slots) - 1
        s = self._home(keys)
        if len(keys) <= _SCALAR_PLACE:  # a prompt's new blocks: one by one costs less than rounds of array calls
            idx = np.arange(0)
        else:
            idx = np.arange(len(keys))
        while idx.size > _SCALAR_TAIL:
            cur = slots[s]
            free = (cur < 0).nonzero()[0]
            keep = np.ones(idx.size, dtype=bool)
            if free.size:
                targets, first = np.unique(s[free], return_index=True)  # one key per slot in this round
                win = free[first]
                self.filled += int(np.count_nonzero(slots[targets] == _EMPTY))
                slots[targets] = rows[idx[win]]
                keep[win] = False
            idx, s = idx[keep], (s[keep] + 1) & mask
        view, filled = memoryview(slots), 0
        for row, at in zip((rows if len(keys) <= _SCALAR_PLACE else rows[idx]).tolist(), s.tolist()):
            while view[at] >= 0:
                at = (at + 1) & mask
            if view[at] == _EMPTY:
                filled += 1
            view[at] = row
        self.filled += filled

    def _rehash(self, live: int) -> None:
        bits = _MIN_BITS
        while (1 << bits) * _REBUILT_LOAD < live:
            bits += 1
        old = self.slots
        rows = old[old >= 0]
        self._bits, self._shift = bits, 64 - bits
        self.slots = np.full(1 << bits, _EMPTY, dtype=np.int32)
        self._mv = None
        self.filled = 0
        self._place(self.key[rows], rows)

    # -- one key at a time (event paths: a few keys each, where a numpy call costs more than the work) --
    def _views(self) -> tuple[memoryview, memoryview]:
        """memoryviews of the slots and the keys (an element read as a Python int), made again after either
        array was replaced (`self._mv or self._views()`: no call while they hold)."""
        v = self._mv = (memoryview(self.slots), memoryview(self.key))
        return v

    def find_one(self, key: int) -> int:
        """The row of one key (a uint64 as a Python int), -1 where absent."""
        slots, keys = self._mv or self._views()
        a = ((key * _FIB_INT) & _U64) >> self._shift
        while True:
            r = slots[a]
            if r == _EMPTY:
                return -1
            if r >= 0 and keys[r] == key:
                return r
            a = (a + 1) & (len(slots) - 1)

    def add_one(self, key: int) -> int:
        """A row for one key that is not in the table; its columns hold the unused values."""
        self.version += 1
        if self.filled + 1 > MAX_LOAD * len(self.slots):
            self._rehash(self.used + 1)
        if self._nfree:
            self._nfree -= 1
            row = int(self._free[self._nfree])
        else:
            if self._high + 1 > len(self.key):
                self._grow_rows(self._high + 1)
            row, self._high = self._high, self._high + 1
        slots, keys = self._mv or self._views()
        keys[row] = key
        mask, a = len(slots) - 1, ((key * _FIB_INT) & _U64) >> self._shift
        while slots[a] >= 0:
            a = (a + 1) & mask
        if slots[a] == _EMPTY:
            self.filled += 1
        slots[a] = row
        self.used += 1
        return row

    def remove_one(self, row: int) -> None:
        """Delete one live row; its columns go back to the unused values."""
        self.version += 1
        slots, keys = self._mv or self._views()
        mask, a = len(slots) - 1, ((keys[row] * _FIB_INT) & _U64) >> self._shift
        while slots[a] != row:
            a = (a + 1) & mask
        slots[a] = _DELETED
        self.used -= 1
        for name, (_, _, fill) in self._spec.items():
            self.columns[name][row] = fill
        keys[row] = 0
        if self._nfree == len(self._free):
            self._free = np.concatenate([self._free, np.zeros(len(self._free), np.int32)])
        self._free[self._nfree] = row
        self._nfree += 1
