"""topology-affinity-filter and topology-affinity-scorer (llm-d): in the prefill profile of a P/D
request, keep (filter) or prefer (scorer) the candidates near the decode pick, so that the KV cache
moves over NVLink (same host) rather than the network (same rack, zone or region).

The decode pick is the cycle's peer (CycleState.peer, set by disagg-profile-handler and
pd-profile-handler before they run the prefill profile); each endpoint's Topology comes from the
topology-extractor that `topologyProducerName` names (default: the config's one named
topology-extractor, else its only one), compared level by level as that module says (host, rack,
zone, region; an empty value never matches).

The filter keeps the candidates at `minAffinity` (host) or tighter and drops those without a topology;
it fails open, returning every candidate, when there is no peer topology or no candidate is close
enough: locality is a preference and must never make a request unroutable. The scorer follows llm-d's
fixed curve, shaped by KV-transfer bandwidth: host 1, rack 0.2, zone 0.05, region 0.02, none 0; every
candidate scores 0 without a peer topology, and a candidate without a topology scores 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, PeerPublisher, SchedulingProfile
from pickers.plugins.base import Plugin, PluginContext, configured_plugin
from pickers.plugins.datalayer.topology import (
    LEVELS,
    Level,
    Topology,
    TopologyExtractor,
)

# indexed by Level: same host 5x same rack, 20x same zone (llm-d's curve, not configurable there either)
LEVEL_SCORES = (1.0, 0.2, 0.05, 0.02, 0.0)


class _TopologyAffinity(Plugin):
    """What the filter and the scorer share: the extractor they read, and the peer's topology."""

    without_peer: ClassVar[str]  # what the plugin does when there is no peer topology

    def __init__(self, name: str) -> None:
        self.name = name
        self.producer_name: str | None = None
        self.extractor: TopologyExtractor | None = None
        self.bound: dict[str, str] = {}
        self.bind_warnings: list[str] = []  # for the loader

    def read_producer_name(self, p: Params) -> None:
        self.producer_name = p.string("topologyProducerName")

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, SchedulingProfile], handler: object) -> None:
        self.extractor = configured_plugin(plugins, self.producer_name, TopologyExtractor, "topologyProducerName")
        self.bound = {}
        self.bind_warnings = []
        if self.extractor is None:
            self.bind_warnings.append(
                f"the config has no {TopologyExtractor.type}, so no endpoint has a topology: {self.without_peer} "
                "(llm-d loads it with the same warning)"
            )
        else:
            self.bound["topologyProducerName"] = self.extractor.name
        with_peer = handler.peer_profiles() if isinstance(handler, PeerPublisher) else ()
        idle = [n for n, prof in profiles.items() if n not in with_peer and any(q is self for q in prof.plugins())]
        if idle:
            where = ", ".join(shown(n) for n in idle)
            self.bind_warnings.append(
                f"in profile {where} no earlier pick is a peer to compare with (only the prefill profile of a "
                f"disagg-profile-handler or pd-profile-handler runs with one, the decode pick): {self.without_peer} there"
            )

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, **self.bound}

    def peer_topology(self, cycle: CycleState) -> tuple[TopologyExtractor, Topology] | None:
        """The extractor and the peer's topology; None when either is missing."""
        extractor, peer = self.extractor, cycle.peer
        if extractor is None or peer is None:
            return None
        found = extractor.topology(peer)
        return None if found is None else (extractor, found)


class TopologyAffinityFilter(_TopologyAffinity):
    type = "topology-affinity-filter"
    without_peer = "it passes every candidate"

    def __init__(self, name: str = "topology-affinity-filter", min_affinity: Level = Level.HOST) -> None:
        super().__init__(name)
        self.min_affinity = min_affinity

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> TopologyAffinityFilter:
        raw = p.string("minAffinity", "host") or "host"  # "" is llm-d's default too
        level = LEVELS.get(raw)
        if level is None:
            raise ParameterError("minAffinity", f"expected one of {', '.join(LEVELS)}, got {shown(raw)}")
        p.effective["minAffinity"] = raw
        f = cls(name, level)
        f.read_producer_name(p)
        return f

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        found = self.peer_topology(cycle)
        if found is None:
            return endpoints
        extractor, peer = found
        floor = self.min_affinity
        kept = []
        for ep in endpoints:
            level = extractor.level(peer, ep)
            if level is not None and level <= floor:
                kept.append(ep)
        return kept or endpoints


class TopologyAffinityScorer(_TopologyAffinity):
    type = "topology-affinity-scorer"
    category = "affinity"
    without_peer = "it scores every candidate 0"

    def __init__(self, name: str = "topology-affinity-scorer") -> None:
        super().__init__(name)

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> TopologyAffinityScorer:
        s = cls(name)
        s.read_producer_name(p)
        return s

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        found = self.peer_topology(cycle)
        if found is None:
            return [0.0] * len(endpoints)
        extractor, peer = found
        out = []
        for ep in endpoints:
            level = extractor.level(peer, ep)
            out.append(0.0 if level is None else LEVEL_SCORES[level])
        return out
