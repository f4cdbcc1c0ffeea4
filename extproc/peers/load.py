"""Peers' in-flight load, applied to this replica's datastore.

Every scorer that reads an endpoint's in-flight requests or tokens (active-request, token-load, ...)
then sees the whole fleet's load, not one replica's share. A peer reports only its own counts (full
snapshots, so a lost update is repaired by the next); they are added to the endpoints through the
datastore's own acquire/release, and what was added is remembered per endpoint object, so this
replica's own share is always the endpoint's count minus that. A peer that goes quiet (`ttl`) or whose
stream ends is forgotten: its share comes off at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from extproc.datalayer.datastore import Datastore
from pickers.framework.endpoint import Endpoint

DEFAULT_TTL = 2.0  # seconds without an update before a peer's load is dropped (it updates every 0.5 s at least)


@dataclass(slots=True)
class _Applied:
    endpoint: Endpoint  # the object the counts were added to (a rejoined endpoint is a new object)
    requests: int = 0
    tokens: int = 0


@dataclass(slots=True)
class _Peer:
    heard: float
    load: dict[str, tuple[int, int]] = field(default_factory=dict)  # address -> (requests, tokens)


class PeerLoad:
    def __init__(self, datastore: Datastore, ttl: float = DEFAULT_TTL) -> None:
        self.datastore = datastore
        self.ttl = ttl
        self._peers: dict[str, _Peer] = {}
        self._applied: dict[str, _Applied] = {}

    def own(self) -> list[tuple[str, int, int]]:
        """This replica's own (address, requests, tokens) for every endpoint it has load on."""
        out = []
        applied = self._applied
        for ep in self.datastore.candidates():
            requests, tokens = ep.in_flight, ep.in_flight_tokens
            a = applied.get(ep.address)
            if a is not None and a.endpoint is ep:
                requests, tokens = requests - a.requests, tokens - a.tokens
            if requests > 0 or tokens > 0:
                out.append((ep.address, max(0, requests), max(0, tokens)))
        return out

    def update(self, peer: str, load: dict[str, tuple[int, int]], now: float | None = None) -> None:
        """Peer `peer`'s full snapshot: what it does not list it has no load on."""
        now = time.monotonic() if now is None else now
        old = self._peers.get(peer)
        self._peers[peer] = _Peer(now, load)
        self._reconcile({*load, *(old.load if old else ())})

    def heard(self, peer: str, now: float | None = None) -> None:
        """Peer `peer` is alive (an update without a load snapshot)."""
        p = self._peers.get(peer)
        if p is not None:
            p.heard = time.monotonic() if now is None else now

    def forget(self, peer: str) -> None:
        old = self._peers.pop(peer, None)
        if old is not None:
            self._reconcile(set(old.load))

    def expire(self, now: float | None = None) -> list[str]:
        """Forget peers not heard from within `ttl`; returns their ids."""
        now = time.monotonic() if now is None else now
        gone = [p for p, state in self._peers.items() if now - state.heard > self.ttl]
        for p in gone:
            self.forget(p)
        return gone

    def reconcile_all(self) -> None:
        """After a membership change: counts move onto rejoined endpoints, departed ones are dropped."""
        self._reconcile({a for p in self._peers.values() for a in p.load} | set(self._applied))

    def _reconcile(self, addresses: set[str]) -> None:
        ds = self.datastore
        for address in addresses:
            want_r = want_t = 0
            for p in self._peers.values():
                r, t = p.load.get(address, (0, 0))
                want_r += r
                want_t += t
            ep = ds.get(address)
            a = self._applied.get(address)
            if a is not None and a.endpoint is not ep:  # the counted object left the pool: its counts went with it
                del self._applied[address]
                a = None
            if ep is None:
                continue
            if a is None:
                a = self._applied[address] = _Applied(ep)
            dr, dt = want_r - a.requests, want_t - a.tokens
            if dr > 0 or dt > 0:
                ds.acquire(ep, max(0, dt), requests=max(0, dr))
            if dr < 0 or dt < 0:
                ds.release(ep, max(0, -dt), requests=max(0, -dr))
            a.requests, a.tokens = want_r, want_t
            if not want_r and not want_t:
                del self._applied[address]

    @property
    def peers(self) -> int:
        return len(self._peers)

    def entries(self) -> int:
        """(peer, endpoint) load entries held."""
        return sum(len(p.load) for p in self._peers.values())

    def total(self) -> tuple[int, int]:
        """Requests and tokens of the peers' load applied now."""
        return sum(a.requests for a in self._applied.values()), sum(a.tokens for a in self._applied.values())
