"""The prefix index of a replica that shares: the approximate index, plus a bounded journal of the
blocks this replica's own picks recorded, which the peer pushers read from.

Only local picks are journalled (a block heard from a peer is applied with `apply_peer` and never
passed on): every pair of replicas talks directly, so nothing loops. The journal is a numbered ring
(extproc.peers.ring) bounded by blocks, not records; each pusher holds a cursor into it, and a peer that
falls behind the ring (a partition longer than the ring holds) skips what was overwritten and is told
how much.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from extproc.peers.ring import NumberedRing
from pickers.indexes.prefix import ApproxPrefixIndex

DEFAULT_JOURNAL_BLOCKS = 65_536  # ~0.5 MB of hashes on the wire; a few MB of Python objects at most


@dataclass(slots=True, frozen=True)
class JournalEntry:
    address: str
    hashes: Sequence[int]  # the pick's own list, kept by reference (no copy)
    capacity: int  # 0: the receiver's default


def new_journal(max_blocks: int = DEFAULT_JOURNAL_BLOCKS) -> NumberedRing[JournalEntry]:
    """A ring of recent local picks, at most `max_blocks` hashes in all (the newest pick always fits)."""
    return NumberedRing(max_blocks, _blocks, what="journal size in blocks")


def _blocks(entry: JournalEntry) -> int:
    return len(entry.hashes)


class SharedPrefixIndex(ApproxPrefixIndex):
    """The approximate prefix index whose local records are journalled for the peers."""

    def __init__(self, *args: Any, journal_blocks: int = DEFAULT_JOURNAL_BLOCKS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.journal = new_journal(journal_blocks)
        self.peer_records = 0  # records applied from peers

    def record(self, address: str, hashes: list[int], capacity: int | None = None, now: float | None = None) -> None:
        super().record(address, hashes, capacity, now)
        if hashes:
            self.journal.append(JournalEntry(address, hashes, capacity or 0))

    def apply_peer(self, address: str, hashes: list[int], capacity: int) -> None:
        """A peer's pick: the endpoint holds these blocks (not journalled: peers hear it from its picker)."""
        super().record(address, hashes, capacity or None)
        self.peer_records += 1
