"""The prefix index of a replica that shares: the approximate index, plus a bounded journal of the
blocks this replica's own picks recorded, which the peer pushers read from.

Only local picks are journalled (a block heard from a peer is applied with `apply_peer` and never
passed on): every pair of replicas talks directly, so nothing loops. The journal is a numbered ring
(extproc.peers.ring) bounded by blocks, not records; each pusher holds a cursor into it, and a peer that
falls behind the ring (a partition longer than the ring holds) skips what was overwritten and is told
how much.

For the exchange's blind-pick count (extproc.peers.sync) the index also remembers, per prompt's first
block, the latest local pick's endpoint and time: a peer's pick that arrives after a local pick on the
same prefix made since the peer's shows a pick this replica made without knowing the peer's.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from extproc.peers.ring import NumberedRing
from pickers.indexes.prefix import ApproxPrefixIndex

DEFAULT_JOURNAL_BLOCKS = 65_536  # ~0.5 MB of hashes on the wire; a few MB of Python objects at most
RECENT_PICKS = 4_096  # prompts' first blocks whose latest local pick is remembered (~0.5 MB)


@dataclass(slots=True, frozen=True)
class JournalEntry:
    address: str
    hashes: Sequence[int]  # the pick's own list, kept by reference (no copy)
    capacity: int  # 0: the receiver's default
    at: float = 0.0  # time.monotonic() of the pick (its age goes with it to the peers)


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
        self._recent: OrderedDict[int, tuple[str, float]] = OrderedDict()  # first block -> latest local pick

    def record(self, address: str, hashes: list[int], capacity: int | None = None, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        super().record(address, hashes, capacity, t)
        if hashes:
            self.journal.append(JournalEntry(address, hashes, capacity or 0, t))
            recent = self._recent
            recent[hashes[0]] = (address, t)
            recent.move_to_end(hashes[0])
            if len(recent) > RECENT_PICKS:
                recent.popitem(last=False)

    def latest_local(self, first_block: int) -> tuple[str, float] | None:
        """The endpoint and time of this replica's latest pick of a prompt starting with this block (if
        it is among the RECENT_PICKS newest prefixes)."""
        return self._recent.get(first_block)

    def apply_peer(self, address: str, hashes: list[int], capacity: int) -> None:
        """A peer's pick: the endpoint holds these blocks (not journalled: peers hear it from its picker).
        What came over the wire is made distinct first: the index takes each block once."""
        if len(set(hashes)) != len(hashes):
            hashes = list(dict.fromkeys(hashes))
        super().record(address, hashes, capacity or None)
        self.peer_records += 1
