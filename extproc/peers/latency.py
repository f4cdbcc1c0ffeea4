"""The latency model of a replica that shares: every response's lesson goes to the peers too, so each
replica's fits learn from the whole fleet's traffic, not from the share Envoy sends it.

What is shared is what the fits take (pickers.latency.model): per endpoint, a TTFT observation (the
prefill tokens queued ahead + the request's uncached ones, the running batch, the seconds) or a TPOT one
(the batch, seconds per token). The features are fleet-wide already (peers' in-flight load is applied to
the datastore, extproc.peers.load), so a peer's observation means on this replica what it meant there.
Only observations of this replica's own responses are logged (a numbered ring, extproc.peers.ring,
bounded by count: a few windows of the fits); a peer's are counted into the fits with `apply_peer` and
never passed on. The receiver counts each one once, also when a reconnect replays the ring, so a
restarted replica starts warm and a healed partition double-counts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from extproc.peers.ring import NumberedRing
from pickers.framework.endpoint import Endpoint
from pickers.latency.model import LatencyModel, LatencySettings

DEFAULT_OBSERVATIONS = 8_192  # observations held for the peers (~1 MB); the fits' window is 200 per endpoint
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


def new_observation_log(size: int = DEFAULT_OBSERVATIONS) -> NumberedRing[Observation]:
    """A ring of this replica's `size` most recent observations, each numbered."""
    return NumberedRing(size, what="observation log size")


class SharedLatencyModel(LatencyModel):
    """The latency model whose own observations are logged for the peers, and that counts theirs."""

    def __init__(self, settings: LatencySettings | None = None, *, log_size: int = DEFAULT_OBSERVATIONS) -> None:
        super().__init__(settings)
        self.log = new_observation_log(log_size)
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
