"""The joint placement of one burst-prefix-cache-producer batch: which replica each request of a window
goes to, so that requests sharing a prompt share a replica (llm-d's burstprefix assign). Pure: entries
in, `assigned` set on them; no clock, no I/O.

The rules, as llm-d's:
- Requests with the same blocks (the same prompt) form a group. A group of two or more is a unit; a
  lone request is a unit only when `min_colocate_blocks` > 0 and it shares that many leading blocks
  with another request of the batch. Other requests get no replica (no affinity).
- Groups are placed first, then the lone units; within each tier the longer prompt first, so shorter
  prompts meet the richest set of placed blocks.
- A unit's first replica: with `min_colocate_blocks` > 0, the replica already given the longest
  shared prefix (at least that many blocks) that is under its fair share of the batch and has room
  for the group; else the least loaded. A group fills a replica up to `max_per_replica` (-1: no cap)
  and spills the rest to the least loaded replicas, one run at a time.
- Load is counted in the batch only: requests, or (`by_tokens`) prompt blocks, a unit's blocks
  charged once per replica it lands on, less the leading blocks that replica already holds. Ties go to
  fewer running requests (the replica's metrics), then the lower address.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pickers.framework.endpoint import Endpoint

UNLIMITED = -1  # max_per_replica: a whole group to one replica


@dataclass(slots=True, eq=False)
class BurstEntry:
    """One request waiting in a batch: its prompt's block hashes, the candidates it may go to, and
    (when the batch is sealed) the replica it is steered to; None: no affinity."""

    hashes: Sequence[int]
    candidates: Sequence[Endpoint]
    assigned: Endpoint | None = None


# A prompt's identity: its block count and last block hash (the hashes chain, so the last one stands
# for every block before it).
_Key = tuple[int, int]


def assign(
    entries: Sequence[BurstEntry], max_per_replica: int = UNLIMITED, min_colocate_blocks: int = 0, by_tokens: bool = False
) -> None:
    """Set `assigned` on the entries that get a replica; the replicas are the first such entry's candidates."""
    groups: dict[_Key, list[BurstEntry]] = {}
    replicas: Sequence[Endpoint] = ()
    for e in entries:
        if not e.hashes:
            continue
        groups.setdefault((len(e.hashes), e.hashes[-1]), []).append(e)
        if not replicas:
            replicas = e.candidates
    if not replicas:
        return
    sharing = _sharing(groups, min_colocate_blocks)
    whole = [k for k, members in groups.items() if len(members) > 1]
    lone = [k for k, members in groups.items() if len(members) == 1 and k in sharing]
    if not whole and not lone:
        return
    whole.sort(key=lambda k: -k[0])  # stable: arrival order among prompts of one length
    lone.sort(key=lambda k: -k[0])
    total = sum(k[0] if by_tokens else len(groups[k]) for k in (*whole, *lone))
    fair_share = -(-total // len(replicas))
    placed = _Placed(replicas, max_per_replica, min_colocate_blocks, fair_share, by_tokens)
    for key in (*whole, *lone):
        placed.place(groups[key])


def _sharing(groups: dict[_Key, list[BurstEntry]], min_blocks: int) -> set[_Key]:
    """The prompts that share at least `min_blocks` leading blocks with another request of the batch."""
    if min_blocks <= 0:
        return set()
    requests: dict[int, int] = {}  # hash of block min_blocks - 1 (it stands for the leading blocks) -> requests
    signature: dict[_Key, int] = {}
    for key, members in groups.items():
        if key[0] >= min_blocks:
            sig = signature[key] = members[0].hashes[min_blocks - 1]
            requests[sig] = requests.get(sig, 0) + len(members)
    return {key for key, sig in signature.items() if requests[sig] >= 2}


class _Placed:
    """The batch's placement so far: each replica's load and which replicas hold which blocks."""

    def __init__(self, replicas: Sequence[Endpoint], k: int, min_blocks: int, fair_share: int, by_tokens: bool) -> None:
        self.replicas = replicas
        self.k = k
        self.min_blocks = min_blocks
        self.fair_share = fair_share
        self.by_tokens = by_tokens
        self.load: dict[str, int] = {}
        self.holders: dict[int, set[str]] = {}  # block hash -> replicas given it in this batch

    def place(self, members: list[BurstEntry]) -> None:
        """One unit: its first replica by shared prefix (bounded by the fair share), the rest by load."""
        hashes = members[0].hashes
        prefer = self.min_blocks > 0
        held = self._held(hashes) if prefer or self.by_tokens else {}
        here: dict[str, int] = {}  # this unit's requests per replica
        load = self.load
        i = 0
        while i < len(members):
            target = (self._by_prefix(here, held) if prefer else None) or self._least_loaded(here)
            addr = target.address
            run = len(members) - i
            if self.k != UNLIMITED:
                run = min(run, max(1, self.k - here.get(addr, 0)))  # every replica full: one more, then rebalance
            for m in members[i : i + run]:
                m.assigned = target
            first = addr not in here
            here[addr] = here.get(addr, 0) + run
            if not self.by_tokens:
                load[addr] = load.get(addr, 0) + run
            elif first:  # the prompt is prefilled once per replica, less what that replica holds
                load[addr] = load.get(addr, 0) + max(0, len(hashes) - held.get(addr, 0))
            i += run
            prefer = False  # only the first replica follows the shared prefix
        holders = self.holders
        for h in hashes:
            s = holders.get(h)
            if s is None:
                holders[h] = set(here)
            else:
                s.update(here)

    def _held(self, hashes: Sequence[int]) -> dict[str, int]:
        """Leading blocks of this prompt each replica was given in the batch (a prompt is added whole,
        so holding block i means holding every block before it)."""
        out: dict[str, int] = {}
        for h in hashes:
            holders = self.holders.get(h)
            if not holders:
                break
            for addr in holders:
                out[addr] = out.get(addr, 0) + 1
        return out

    def _has_room(self, here: dict[str, int], addr: str) -> bool:
        return self.k == UNLIMITED or here.get(addr, 0) < self.k

    def _rank(self, ep: Endpoint) -> tuple[int, int, str]:
        return self.load.get(ep.address, 0), ep.metrics.running, ep.address

    def _by_prefix(self, here: dict[str, int], held: dict[str, int]) -> Endpoint | None:
        """The replica holding the longest shared prefix (>= min_blocks) still under its fair share."""
        best: Endpoint | None = None
        best_key: tuple[int, tuple[int, int, str]] | None = None
        for ep in self.replicas:
            addr = ep.address
            blocks = held.get(addr, 0)
            if blocks < self.min_blocks or not self._has_room(here, addr) or self.load.get(addr, 0) >= self.fair_share:
                continue
            key = (-blocks, self._rank(ep))
            if best_key is None or key < best_key:
                best, best_key = ep, key
        return best

    def _least_loaded(self, here: dict[str, int]) -> Endpoint:
        """The least loaded replica with room for more of this unit, else the least loaded of all."""
        roomy = [ep for ep in self.replicas if self._has_room(here, ep.address)]
        return min(roomy or self.replicas, key=self._rank)
