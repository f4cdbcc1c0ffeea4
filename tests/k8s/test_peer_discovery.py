"""Peer discovery from the EPP's headless Service (extproc.peers.discovery) against the API-server
stand-in with the real client: the peers follow the Service's EndpointSlices, ready addresses only."""

from __future__ import annotations

from typing import Any

import msgspec

from extproc.peers.discovery import EndpointSlice, PeerServiceDiscovery, slice_peers
from tests.k8s.conftest import eventually


def endpoint_slice(name: str, service: str, addresses: dict[str, bool], port: int | None = 9004) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [a], "conditions": {"ready": ready}} for a, ready in addresses.items()],
        "ports": [{"name": "peers", "port": port, "protocol": "TCP"}] if port else [],
    }


def test_ready_addresses_at_the_peers_port_or_the_default() -> None:
    s = EndpointSlice(endpoints=[], ports=[])
    assert slice_peers(s, 9004) == set()
    raw = msgspec.json.encode(endpoint_slice("s", "epp", {"10.0.0.1": True, "10.0.0.2": False, "fd00::1": True}, port=7000))
    assert slice_peers(msgspec.json.decode(raw, type=EndpointSlice), 9004) == {"10.0.0.1:7000", "[fd00::1]:7000"}
    raw = msgspec.json.encode(endpoint_slice("s", "epp", {"10.0.0.1": True}, port=None))
    assert slice_peers(msgspec.json.decode(raw, type=EndpointSlice), 9004) == {"10.0.0.1:9004"}


async def test_peers_follow_the_services_endpoint_slices(apiserver, api, tasks) -> None:
    seen: list[set[str]] = []
    apiserver.put("endpointslices", endpoint_slice("epp-peers-a", "epp-peers", {"10.0.0.1": True, "10.0.0.2": True}))
    apiserver.put("endpointslices", endpoint_slice("other", "something-else", {"10.9.9.9": True}))
    d = PeerServiceDiscovery(api, lambda peers: seen.append(set(peers)), namespace="default", service="epp-peers", port=9004,
                             watch_timeout=(30, 30))  # fmt: skip
    tasks(d.run())
    await eventually(lambda: bool(seen) and seen[-1] == {"10.0.0.1:9004", "10.0.0.2:9004"})
    # a rolling update: a new replica, the old one terminating (not ready)
    apiserver.put("endpointslices", endpoint_slice("epp-peers-a", "epp-peers", {"10.0.0.1": False, "10.0.0.2": True, "10.0.0.3": True}))
    await eventually(lambda: seen[-1] == {"10.0.0.2:9004", "10.0.0.3:9004"})
    apiserver.put("endpointslices", endpoint_slice("epp-peers-b", "epp-peers", {"10.0.0.4": True}))
    await eventually(lambda: seen[-1] == {"10.0.0.2:9004", "10.0.0.3:9004", "10.0.0.4:9004"})
    apiserver.delete("endpointslices", "epp-peers-a")
    await eventually(lambda: seen[-1] == {"10.0.0.4:9004"})


async def test_an_api_outage_keeps_the_peers_last_seen(apiserver, api, tasks) -> None:
    seen: list[set[str]] = []
    apiserver.put("endpointslices", endpoint_slice("epp-peers-a", "epp-peers", {"10.0.0.1": True}))
    d = PeerServiceDiscovery(api, lambda peers: seen.append(set(peers)), namespace="default", service="epp-peers", port=9004,
                             watch_timeout=(30, 30))  # fmt: skip
    tasks(d.run())
    await eventually(lambda: bool(seen))
    apiserver.drop_watches()
    apiserver.put("endpointslices", endpoint_slice("epp-peers-a", "epp-peers", {"10.0.0.1": True, "10.0.0.5": True}))
    await eventually(lambda: seen[-1] == {"10.0.0.1:9004", "10.0.0.5:9004"}, timeout=10)
    assert all(s for s in seen)  # never emptied on the way
