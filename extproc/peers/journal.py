"""The prefix index of a replica that shares: the approximate index, plus a bounded journal of the
blocks this replica's own picks recorded, which the peer pushers read from.

Only local picks are journalled (a block heard from a peer is applied with `apply_peer` and never
passed on): every pair of replicas talks directly, so nothing loops. The journal is a ring bounded by
blocks, not records; each pusher holds a cursor into it, and a peer that falls behind the ring (a
partition longer than the ring holds) skips what was overwritten and is told how much.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from pickers.indexes.prefix import ApproxPrefixIndex

DEFAULT_JOURNAL_BLOCKS = 65_536  # ~0.5 MB of hashes on the wire; a few MB of Python objects at most


@dataclass(slots=True, frozen=True)
class JournalEntry:
    seq: int
    address: str
    hashes: Sequence[int]  # the pick's own list, kept by reference (no copy)
    capacity: int  # 0: the receiver's default


@dataclass(slots=True, frozen=True)
class JournalRead:
    entries: list[JournalEntry]
    cursor: int  # the next sequence number to read
    dropped: int  # entries overwritten before this reader got them


class Journal:
    """A ring of recent local records, at most `max_blocks` hashes in all (the newest record always fits)."""

    def __init__(self, max_blocks: int = DEFAULT_JOURNAL_BLOCKS) -> None:
        if max_blocks < 1:
            raise ValueError(f"journal size: expected at least 1 block, got {max_blocks}")
        self.max_blocks = max_blocks
        self._ring: deque[JournalEntry] = deque()
        self._blocks = 0
        self.next_seq = 0  # the sequence number the next record gets
        self.overwritten = 0  # records dropped from the ring to make room
        self.on_append: Callable[[], None] | None = None  # wakes the pushers

    def append(self, address: str, hashes: Sequence[int], capacity: int) -> None:
        ring = self._ring
        ring.append(JournalEntry(self.next_seq, address, hashes, capacity))
        self.next_seq += 1
        self._blocks += len(hashes)
        while self._blocks > self.max_blocks and len(ring) > 1:
            self._blocks -= len(ring.popleft().hashes)
            self.overwritten += 1
        if self.on_append is not None:
            self.on_append()

    @property
    def first_seq(self) -> int:
        return self._ring[0].seq if self._ring else self.next_seq

    def read(self, cursor: int, max_blocks: int) -> JournalRead:
        """Entries from `cursor` on, up to about `max_blocks` hashes (at least one entry when any)."""
        first = self.first_seq
        dropped = max(0, first - cursor)
        start = max(cursor, first)
        out: list[JournalEntry] = []
        blocks = 0
        for entry in islice(self._ring, start - first, None):
            if out and blocks + len(entry.hashes) > max_blocks:
                break
            out.append(entry)
            blocks += len(entry.hashes)
        return JournalRead(out, start + len(out), dropped)

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def blocks(self) -> int:
        """Hashes held (the journal's memory, in blocks)."""
        return self._blocks


class SharedPrefixIndex(ApproxPrefixIndex):
    """The approximate prefix index whose local records are journalled for the peers."""

    def __init__(self, *args: Any, journal_blocks: int = DEFAULT_JOURNAL_BLOCKS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.journal = Journal(journal_blocks)
        self.peer_records = 0  # records applied from peers

    def record(self, address: str, hashes: list[int], capacity: int | None = None, now: float | None = None) -> None:
        super().record(address, hashes, capacity, now)
        if hashes:
            self.journal.append(address, hashes, capacity or 0)

    def apply_peer(self, address: str, hashes: list[int], capacity: int) -> None:
        """A peer's pick: the endpoint holds these blocks (not journalled: peers hear it from its picker).
        What came over the wire is made distinct first: the index takes each block once."""
        if len(set(hashes)) != len(hashes):
            hashes = list(dict.fromkeys(hashes))
        super().record(address, hashes, capacity or None)
        self.peer_records += 1
