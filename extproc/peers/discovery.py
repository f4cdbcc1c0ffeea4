"""Peers from Kubernetes: the ready addresses of the EPP's headless Service, from its EndpointSlices.

A list + watch (extproc.kubernetes.watch, as pod discovery) of the EndpointSlices labelled
`kubernetes.io/service-name=<service>`; every ready address becomes a peer at the slice's port named
`peers` (else --peer-port). The replica's own address is in the list too: the exchange recognises
itself (ALREADY_EXISTS) and stops dialling it. An API outage keeps the peers last seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import msgspec
from kubernetes_asyncio.client import ApiClient, DiscoveryV1Api

from extproc.kubernetes.objects import ObjectMeta
from extproc.kubernetes.watch import ListWatch

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PEER_PORT_NAME = "peers"


class EndpointConditions(msgspec.Struct, frozen=True):
    ready: bool | None = None  # the API: unset means ready


class SliceEndpoint(msgspec.Struct, frozen=True):
    addresses: list[str] = []
    conditions: EndpointConditions = EndpointConditions()


class SlicePort(msgspec.Struct, frozen=True):
    name: str | None = None
    port: int | None = None


class EndpointSlice(msgspec.Struct, rename="camel", frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    endpoints: list[SliceEndpoint] | None = None
    ports: list[SlicePort] | None = None


_decode = msgspec.json.Decoder(EndpointSlice).decode


def slice_peers(s: EndpointSlice, default_port: int) -> set[str]:
    """`ip:port` of each ready address of one slice."""
    port = next((p.port for p in s.ports or () if p.name == PEER_PORT_NAME and p.port), default_port)
    out = set()
    for ep in s.endpoints or ():
        if ep.conditions.ready is False:
            continue
        for address in ep.addresses:
            out.add(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
    return out


class _SliceHandler:
    def __init__(self, owner: PeerServiceDiscovery) -> None:
        self.owner = owner

    def replace(self, items: list[msgspec.Raw]) -> None:
        self.owner._slices = {}
        for raw in items:
            s = _decode(raw)
            self.owner._slices[s.metadata.name] = s
        self.owner._changed()

    def apply(self, event_type: str, obj: msgspec.Raw) -> None:
        s = _decode(obj)
        if event_type == "DELETED":
            self.owner._slices.pop(s.metadata.name, None)
        else:
            self.owner._slices[s.metadata.name] = s
        self.owner._changed()


class PeerServiceDiscovery:
    """Calls `on_peers(addresses)` whenever the Service's ready addresses change; `run()` never returns."""

    def __init__(
        self, api: ApiClient, on_peers: Callable[[Iterable[str]], None], *, namespace: str, service: str, port: int,
        watch_timeout: tuple[int, int] = (300, 600),
    ) -> None:  # fmt: skip
        self.api = api
        self.on_peers = on_peers
        self.namespace = namespace
        self.service = service
        self.port = port
        self.watch_timeout = watch_timeout
        self._slices: dict[str, EndpointSlice] = {}
        self.peers: frozenset[str] = frozenset()

    @property
    def what(self) -> str:
        return f"EndpointSlices of Service {self.namespace}/{self.service}"

    def _changed(self) -> None:
        peers = frozenset(p for s in self._slices.values() for p in slice_peers(s, self.port))
        if peers != self.peers:
            log.info("peers from %s: %s", self.what, ", ".join(sorted(peers)) or "none")
            self.peers = peers
            self.on_peers(peers)

    async def run(self) -> None:
        discovery = DiscoveryV1Api(self.api)

        async def list_slices(**kw: object) -> object:
            return await discovery.list_namespaced_endpoint_slice(self.namespace, **kw)

        watch = ListWatch(
            list_slices, _SliceHandler(self), what=self.what,
            label_selector=f"{SERVICE_NAME_LABEL}={self.service}", watch_timeout=self.watch_timeout,
        )  # fmt: skip
        await watch.run()
