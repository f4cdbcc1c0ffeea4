"""topology-extractor (llm-d): where each endpoint sits (host, rack, zone, region), which the topology
affinity filter and scorer (pickers.plugins.scorer.affinity.topology_affinity) read.

Each field is the value of a pod label the extractor's parameters name (`hostname`, `rack`, `zone`,
`region`; Kubernetes' topology labels by default). When the hostname label is absent, the host is the
pod's `spec.hostname` (EndpointSpec.hostname, from the Kubernetes discovery; an endpoints file has
none, as llm-d's has none). Rack, zone and region have no fallback. An endpoint with none of the four
has no topology at all. llm-d stamps the attribute on endpoint and pod events; here it is read from the
endpoint's current spec, which the discovery replaces whenever the pod's labels change.

Two topologies share the tightest level at which both have the same non-empty value: host, then rack,
zone, region (the same host counts as host, whatever the other fields say). An empty value never
matches, not even an empty one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.plugins.base import Plugin, PluginContext

HOSTNAME_LABEL = "kubernetes.io/hostname"
RACK_LABEL = "topology.kubernetes.io/rack"
ZONE_LABEL = "topology.kubernetes.io/zone"
REGION_LABEL = "topology.kubernetes.io/region"


@dataclass(slots=True, frozen=True)
class Topology:
    """llm-d's Topology attribute: an endpoint's locality; "" where it is not known."""

    hostname: str = ""
    rack: str = ""
    zone: str = ""
    region: str = ""


class Level(IntEnum):
    """Topology tiers, tightest first; NONE: nothing in common."""

    HOST = 0
    RACK = 1
    ZONE = 2
    REGION = 3
    NONE = 4


LEVELS: Mapping[str, Level] = {"host": Level.HOST, "rack": Level.RACK, "zone": Level.ZONE, "region": Level.REGION}


def shared_level(peer: Topology, other: Topology) -> Level:
    """The tightest level at which both have the same non-empty value."""
    return _level(peer, other.hostname, other.rack, other.zone, other.region)


_HOST, _RACK, _ZONE, _REGION, _NONE = Level  # module globals: an enum member lookup costs more, per candidate


def _level(peer: Topology, hostname: str, rack: str, zone: str, region: str) -> Level:
    if peer.hostname and peer.hostname == hostname:
        return _HOST
    if peer.rack and peer.rack == rack:
        return _RACK
    if peer.zone and peer.zone == zone:
        return _ZONE
    if peer.region and peer.region == region:
        return _REGION
    return _NONE


class TopologyExtractor(Plugin):
    """Reads each endpoint's Topology from its labels (the label names are the parameters)."""

    type = "topology-extractor"

    def __init__(
        self,
        name: str | None = None,
        *,
        hostname_label: str = HOSTNAME_LABEL,
        rack_label: str = RACK_LABEL,
        zone_label: str = ZONE_LABEL,
        region_label: str = REGION_LABEL,
    ) -> None:
        super().__init__(name)
        self.hostname_label = hostname_label
        self.rack_label = rack_label
        self.zone_label = zone_label
        self.region_label = region_label

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> TopologyExtractor:
        def label(key: str, default: str) -> str:
            value = p.string(key, default) or default  # "" is llm-d's "the default label" too
            p.effective[key] = value
            return value

        return cls(
            name,
            hostname_label=label("hostname", HOSTNAME_LABEL),
            rack_label=label("rack", RACK_LABEL),
            zone_label=label("zone", ZONE_LABEL),
            region_label=label("region", REGION_LABEL),
        )

    def topology(self, endpoint: Endpoint) -> Topology | None:
        """The endpoint's Topology; None when not one field is known (llm-d sets no attribute then)."""
        fields = self._fields(endpoint)
        return Topology(*fields) if any(fields) else None

    def level(self, peer: Topology, endpoint: Endpoint) -> Level | None:
        """shared_level(peer, the endpoint's Topology) without building it (a pick asks this of every
        candidate); None when the endpoint has no topology."""
        fields = self._fields(endpoint)
        return _level(peer, *fields) if any(fields) else None

    def _fields(self, endpoint: Endpoint) -> tuple[str, str, str, str]:
        spec = endpoint.spec
        labels = spec.labels
        return (
            labels.get(self.hostname_label) or spec.hostname,
            labels.get(self.rack_label, ""),
            labels.get(self.zone_label, ""),
            labels.get(self.region_label, ""),
        )
