"""The numbered ring a replica keeps of what it learned itself, for its peers, and the receiver's side of
it: how much of one sender's numbering has been applied.

A sender numbers every item it appends (0, 1, 2, ... from process start) and keeps the newest, bounded
by a total weight (the journal: prefix blocks; the observation log: one per observation). Each pusher
reads from its own cursor; one that fell behind the ring is told how many it missed. On (re)connecting a
pusher replays the whole ring, so a receiver holds, per sender, the number of the next item it has not
applied (`Applied`) and skips what a replay repeats. Numbers mean something only within one process of
the sender: its hello carries an incarnation (a random number per process), and a receiver starts a
sender's count afresh when that changes (extproc.peers.sync).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True, frozen=True)
class RingRead(Generic[T]):
    items: list[T]
    first_seq: int  # the number of items[0]
    cursor: int  # the next number to read
    dropped: int  # items overwritten before this reader got them


class NumberedRing(Generic[T]):
    """The newest items, at most `max_weight` in all (the newest item always fits), each numbered."""

    def __init__(self, max_weight: int, weight: Callable[[T], int] | None = None, *, what: str = "ring size") -> None:
        if max_weight < 1:
            raise ValueError(f"{what}: expected at least 1, got {max_weight}")
        self.max_weight = max_weight
        self._weight = weight
        self._ring: deque[tuple[T, int]] = deque()
        self.weight = 0  # the weight held now
        self.next_seq = 0  # the number the next item gets
        self.overwritten = 0  # items dropped to make room
        self.on_append: Callable[[], None] | None = None  # wakes the pushers

    def append(self, item: T) -> None:
        w = 1 if self._weight is None else self._weight(item)
        ring = self._ring
        ring.append((item, w))
        self.next_seq += 1
        self.weight += w
        while self.weight > self.max_weight and len(ring) > 1:
            self.weight -= ring.popleft()[1]
            self.overwritten += 1
        if self.on_append is not None:
            self.on_append()

    @property
    def first_seq(self) -> int:
        return self.next_seq - len(self._ring)

    def read(self, cursor: int, budget: int) -> RingRead[T]:
        """Items from `cursor` on, up to `budget` of weight (at least one item when any)."""
        first = self.first_seq
        start = max(cursor, first)
        out: list[T] = []
        spent = 0
        for item, w in islice(self._ring, start - first, None):
            if out and spent + w > budget:
                break
            out.append(item)
            spent += w
        return RingRead(out, start, start + len(out), max(0, first - cursor))

    def __len__(self) -> int:
        return len(self._ring)


@dataclass(slots=True)
class Applied:
    """The receiver's side of one sender's ring: the number of the next item not yet applied."""

    next_seq: int = 0

    def new(self, first_seq: int, count: int) -> int:
        """How many of the `count` consecutive items from `first_seq` on were applied already (skip them)."""
        skip = min(count, max(0, self.next_seq - first_seq))
        self.next_seq = max(self.next_seq, first_seq + count)
        return skip
