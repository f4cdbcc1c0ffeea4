"""The latency model of a replica that shares: every response's lesson goes to the peers too, so each
replica's fits learn from the whole fleet's traffic, not from the share Envoy sends it.

What is shared is what the fits take (pickers.latency.model): per endpoint, a TTFT observation (the
prefill tokens queued ahead + the request's uncached ones, the running batch, the seconds) or a TPOT one
(the batch, seconds per token). The features are fleet-wide already (peers' in-flight load is applied to
the datastore, extproc.peers.load), so a peer's observation means on this replica what it meant there.
Only observations of this replica's own responses are logged (`ObservationLog`, a ring bounded by count:
a few windows of the fits); a peer's are counted into the fits with `apply_peer` and never passed on.
Each observation has a sequence number; the receiver counts each one once, also when a reconnect
replays the ring (`ObservationDedup`), so a restarted replica starts warm and a healed partition
double-counts nothing.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import IntEnum
from itertools import islice

from pickers.framework.endpoint import Endpoint
from pickers.latency.model import LatencyModel, LatencySettings

DEFAULT_OBSERVATIONS = 8_192  # observations held for the peers (~1 MB); the fits' window is 200 per endpoint
DEDUP_PEERS = 256  # peer ids whose next observation number a replica remembers (restarted peers come back anew)
_INF = float("inf")


class Kind(IntEnum):
    TTFT = 0  # peer.proto's Observation.Kind
    TPOT = 1


@dataclass(slots=True, frozen=True)
class Observation:
    kind: Kind
    address: str
    prefill_tokens: int  # TTFT: queued ahead + uncached; TPOT: 0
    batch: int
    seconds: float  # TTFT seconds, or TPOT seconds per token


@dataclass(slots=True, frozen=True)
class ObservationRead:
    items: list[Observation]
    first_seq: int  # the sequence number of items[0]
    cursor: int  # the next sequence number to read
    dropped: int  # observations overwritten before this reader got them


class ObservationLog:
    """A ring of this replica's most recent observations, each numbered; readers hold a cursor."""

    def __init__(self, size: int = DEFAULT_OBSERVATIONS) -> None:
        if size < 1:
            raise ValueError(f"observation log size: expected at least 1, got {size}")
        self._ring: deque[Observation] = deque(maxlen=size)
        self.next_seq = 0

    def append(self, obs: Observation) -> None:
        self._ring.append(obs)
        self.next_seq += 1

    @property
    def first_seq(self) -> int:
        return self.next_seq - len(self._ring)

    def read(self, cursor: int, limit: int) -> ObservationRead:
        first = self.first_seq
        start = max(cursor, first)
        items = list(islice(self._ring, start - first, start - first + limit))
        return ObservationRead(items, start, start + len(items), max(0, first - cursor))

    def __len__(self) -> int:
        return len(self._ring)


class ObservationDedup:
    """Per peer id, the number of its next observation not yet counted; the oldest ids forgotten first."""

    def __init__(self, peers: int = DEDUP_PEERS) -> None:
        self.peers = peers
        self._next: OrderedDict[str, int] = OrderedDict()

    def new(self, peer: str, first_seq: int, count: int) -> int:
        """How many of the `count` observations from `first_seq` on are already counted (skip them)."""
        upto = self._next.get(peer, 0)
        skip = min(count, max(0, upto - first_seq))
        end = first_seq + count
        if end > upto:
            self._next[peer] = end
        self._next.move_to_end(peer)
        while len(self._next) > self.peers:
            self._next.popitem(last=False)
        return skip

    def heard(self) -> dict[str, int]:
        return dict(self._next)


class SharedLatencyModel(LatencyModel):
    """The latency model whose own observations are logged for the peers, and that counts theirs."""

    def __init__(self, settings: LatencySettings | None = None, *, log_size: int = DEFAULT_OBSERVATIONS) -> None:
        super().__init__(settings)
        self.log = ObservationLog(log_size)
        self.peer_observations = 0  # counted from peers

    def observe_ttft(self, ep: Endpoint, prefill_tokens: int, batch: int, seconds: float, predicted: float | None = None) -> None:  # type: ignore[override]
        super().observe_ttft(ep, prefill_tokens, batch, seconds, predicted)
        if 0.0 < seconds < _INF:
            self.log.append(Observation(Kind.TTFT, ep.address, prefill_tokens, batch, seconds))

    def observe_tpot(self, ep: Endpoint, batch: int, seconds_per_token: float) -> None:  # type: ignore[override]
        super().observe_tpot(ep, batch, seconds_per_token)
        if 0.0 < seconds_per_token < _INF:
            self.log.append(Observation(Kind.TPOT, ep.address, 0, batch, seconds_per_token))

    def apply_peer(self, ep: Endpoint, obs: Observation) -> None:
        """A peer's observation on `ep`, counted into this replica's fit (not logged: the peer tells each)."""
        if obs.kind is Kind.TTFT:
            super().observe_ttft(ep, obs.prefill_tokens, obs.batch, obs.seconds)
        else:
            super().observe_tpot(ep, obs.batch, obs.seconds)
        self.peer_observations += 1
