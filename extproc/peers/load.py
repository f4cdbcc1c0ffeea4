"""Peers' in-flight load, applied to this replica's datastore.

Every scorer that reads an endpoint's in-flight counts (active-request, token-load, the latency model's
prefill queue, ...) then sees the whole fleet's load, not one replica's share. A peer reports only its
own counts (full snapshots, so a lost update is repaired by the next); they are added to the endpoints
through the datastore's own acquire/release, and what was added is remembered per endpoint object, so
this replica's own share is always the endpoint's count minus that. A peer that goes quiet (`ttl`) or
whose stream ends is forgotten: its share comes off at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

from extproc.datalayer.datastore import Datastore
from pickers.framework.endpoint import Endpoint

DEFAULT_TTL = 2.0  # seconds without an update before a peer's load is dropped (it updates every 0.5 s at least)


class Load(NamedTuple):
    """One endpoint's in-flight counts, as the datastore keeps them."""

    requests: int = 0
    tokens: int = 0
    prefill_tokens: int = 0
    output_tokens: int = 0

    def __bool__(self) -> bool:
        return any(self)


NO_LOAD = Load()


def load_of(ep: Endpoint) -> Load:
    return Load(ep.in_flight, ep.in_flight_tokens, ep.in_flight_prefill_tokens, ep.in_flight_output_tokens)


@dataclass(slots=True)
class _Applied:
    endpoint: Endpoint  # the object the counts were added to (a rejoined endpoint is a new object)
    load: Load = NO_LOAD


@dataclass(slots=True)
class _Peer:
    heard: float
    load: dict[str, Load] = field(default_factory=dict)


class PeerLoad:
    def __init__(self, datastore: Datastore, ttl: float = DEFAULT_TTL) -> None:
        self.datastore = datastore
        self.ttl = ttl
        self._peers: dict[str, _Peer] = {}
        self._applied: dict[str, _Applied] = {}

    def own(self) -> list[tuple[str, Load]]:
        """This replica's own load on every endpoint it has load on."""
        out = []
        applied = self._applied
        for ep in self.datastore.candidates():
            mine = load_of(ep)
            a = applied.get(ep.address)
            if a is not None and a.endpoint is ep:
                mine = Load(*(max(0, m - p) for m, p in zip(mine, a.load, strict=True)))
            if mine:
                out.append((ep.address, mine))
        return out

    def update(self, peer: str, load: dict[str, Load], now: float | None = None) -> None:
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
            want = [0, 0, 0, 0]
            for p in self._peers.values():
                got = p.load.get(address)
                if got:
                    for i, v in enumerate(got):
                        want[i] += v
            ep = ds.get(address)
            a = self._applied.get(address)
            if a is not None and a.endpoint is not ep:  # the counted object left the pool: its counts went with it
                del self._applied[address]
                a = None
            if ep is None:
                continue
            if a is None:
                a = self._applied[address] = _Applied(ep)
            up = [max(0, w - h) for w, h in zip(want, a.load, strict=True)]
            down = [max(0, h - w) for w, h in zip(want, a.load, strict=True)]
            if any(up):
                ds.acquire(ep, up[1], up[2], requests=up[0], output_tokens=up[3])
            if down[2]:
                ds.prefill_done(ep, down[2])
            if down[0] or down[1] or down[3]:
                ds.release(ep, down[1], requests=down[0], output_tokens=down[3])
            a.load = Load(*want)
            if not a.load:
                del self._applied[address]

    @property
    def peers(self) -> int:
        return len(self._peers)

    def entries(self) -> int:
        """(peer, endpoint) load entries held."""
        return sum(len(p.load) for p in self._peers.values())

    def total(self) -> Load:
        """The peers' load applied now, over all endpoints."""
        return Load(*(sum(col) for col in zip(*(a.load for a in self._applied.values()), strict=False))) if self._applied else NO_LOAD
