"""p2p-source-producer (llm-d): name a peer to pull the prompt's cached KV blocks from, in the upstream
header `x-kv-cache-source-host-port`, for llm-d's routing sidecar and vLLM's P2P connector.

Before the pick (produce) it reads the prefix match of `prefixMatchInfoProducerName` (an
approx-prefix-cache-producer, or a precise-prefix-cache-producer; default: the config's approximate one)
for every candidate and chooses a source among those caching within one block of the most prompt
tokens, with probability proportional to 1/(1 + waiting queue); the sampling coordinate is an FNV-1a
hash of the request id, as llm-d's (deterministic per request, spread across requests). From the
precise producer only blocks held on the CPU tier count for a source (pulls are served from there),
as llm-d's. After the pick (pre_request) the header is set when that peer holds at least
`minCachedTokenDelta` more cached tokens than the pod computing the prefix: the pick of the
`prefillProfileName` profile when it ran, else the primary. llm-epp's own pd_sidecar pulls nothing
over P2P (docs/prefill-decode.md).

`p2pPortBase` (newer llm-d; 0: off): each data-parallel rank's P2P tier binds `p2pPortBase` + its GLOBAL
rank, so with the header the producer also sets `x-kv-cache-source-p2p-port` to that port when the
source's global rank is known: only a precise-prefix-cache-producer with `kvEventsConfig.servingPortBase`
learns it (from its KV events), as in llm-d; otherwise the sidecar uses its own `--p2p-connector-port`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.scorer.affinity.precise_prefix import PrecisePrefixCacheProducer
from pickers.plugins.scorer.affinity.prefix import approx_matches, bind_match
from pickers.plugins.scorer.load.token_load import bound_names

KV_CACHE_SOURCE_HEADER = "x-kv-cache-source-host-port"
KV_CACHE_SOURCE_P2P_PORT_HEADER = "x-kv-cache-source-p2p-port"  # the source rank's P2P tier port
DEFAULT_PREFILL_PROFILE = "prefill"
_FNV_OFFSET, _FNV_PRIME = 0x811C9DC5, 0x01000193


@dataclass(slots=True, frozen=True)
class _Source:
    address: str  # the chosen peer
    tokens: int  # the cached tokens it can serve a pull from
    cached: Mapping[str, int]  # address -> cached prompt tokens (all tiers): what a computing pod has
    global_dp_rank: int | None = None  # the peer engine's global DP rank, when its KV events named it


class P2PSourceProducer(Plugin):
    type = "p2p-source-producer"

    def __init__(
        self,
        index: ApproxPrefixIndex,
        name: str = "p2p-source-producer",
        *,
        min_delta: int = 1,
        prefill_profile: str = DEFAULT_PREFILL_PROFILE,
        p2p_port_base: int = 0,
    ) -> None:
        self.name = name
        self.index = index
        self.min_delta = min_delta
        self.prefill_profile = prefill_profile
        self.p2p_port_base = p2p_port_base  # 0: no x-kv-cache-source-p2p-port
        self.bind_warnings: list[str] = []  # for the loader
        self.producer_name: str | None = None
        self.precise: PrecisePrefixCacheProducer | None = None  # when named
        self.source = bind_match({}, None)[1]  # llm-d's default approximate producer until bound
        self.bound: dict[str, str] = {}
        self.key = f"p2p-source/{name}"

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> P2PSourceProducer:
        delta = p.integer("minCachedTokenDelta", 1, minimum=1)
        profile = p.string("prefillProfileName") or DEFAULT_PREFILL_PROFILE  # empty: the default, as llm-d
        p.effective["prefillProfileName"] = profile
        base = p.integer("p2pPortBase", 0, minimum=0)
        if base > 65535:
            raise ParameterError("p2pPortBase", f"expected a port 0-65535 (0: off), got {base}")
        producer = cls(ctx.prefix_index, name, min_delta=delta, prefill_profile=profile, p2p_port_base=base)
        producer.producer_name = p.string("prefixMatchInfoProducerName") or None
        return producer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        precise, self.source = bind_match(plugins, self.producer_name)
        if precise is not None and not isinstance(precise, PrecisePrefixCacheProducer):
            raise ParameterError("prefixMatchInfoProducerName", f"{shown(precise.name)} gives no per-tier prefix match")
        self.precise = precise
        used: object = self.precise if self.precise is not None else self.source
        self.bound = bound_names(plugins, {"prefixMatchInfoProducerName": used})
        self.bind_warnings = []
        if self.p2p_port_base and (precise is None or not precise.serving_port_base):
            self.bind_warnings.append(
                "p2pPortBase has no effect here: only a precise-prefix-cache-producer with kvEventsConfig.servingPortBase "
                "learns a peer's global data-parallel rank (as in llm-d), so x-kv-cache-source-p2p-port is never set and "
                "the sidecar pulls at its own --p2p-connector-port"
            )

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, **self.bound}

    def tokens(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, tuple[int, int, int]]:
        """address -> (tokens it can serve a pull from, cached tokens on all tiers, tokens a block)."""
        if self.precise is not None:
            return self.precise.pull_matches(request, cycle, endpoints)
        s = self.source
        m = approx_matches(request, cycle, self.index, s.block_chars, s.max_blocks, endpoints)
        return {a: (held * bt, held * bt, bt) for a, (held, _, bt) in m.items()}

    def produce(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        matches = self.tokens(request, cycle, endpoints)
        top = max((pull for pull, _, _ in matches.values()), default=0)
        if top <= 0:
            return
        # the band: within one block of the most; 1/(1 + waiting) spreads pulls over equal peers and
        # spares deeply queued ones (a one-block shortfall costs the puller one block of recompute)
        band: list[tuple[str, int, float]] = []
        total = 0.0
        for ep in endpoints:
            pull, _, bt = matches.get(ep.address, (0, 0, 0))
            if pull <= 0 or pull + bt < top:
                continue
            w = 1.0 / (1.0 + ep.metrics.waiting)
            band.append((ep.address, pull, w))
            total += w
        target = spread_fraction(request.request_id) * total
        address, pull, _ = band[-1]
        for a, t, w in band:
            if target < w:
                address, pull = a, t
                break
            target -= w
        rank = self.precise.global_dp_rank(address) if self.precise is not None and self.p2p_port_base else None
        cycle.data[self.key] = _Source(address, pull, {a: c for a, (_, c, _) in matches.items()}, rank)

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        best = cycle.data.get(self.key)
        if not isinstance(best, _Source) or not result.endpoints:
            return
        computing = result.endpoints[0]
        if result.profile_results is not None:
            prefill = result.profile_results.get(self.prefill_profile)
            if prefill:
                computing = prefill[0]
        if best.address == computing.address:
            return  # never pull from the pod itself (a delta of 0 already says so while the floor is 1)
        if best.tokens - best.cached.get(computing.address, 0) < self.min_delta:
            return
        result.request_headers[KV_CACHE_SOURCE_HEADER] = best.address
        if self.p2p_port_base and best.global_dp_rank is not None:
            result.request_headers[KV_CACHE_SOURCE_P2P_PORT_HEADER] = str(self.p2p_port_base + best.global_dp_rank)


def spread_fraction(request_id: str) -> float:
    """The request id's FNV-1a (32 bit) hash in [0, 1): the sampling coordinate, as llm-d's."""
    h = _FNV_OFFSET
    for b in request_id.encode():
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFF
    return h / 2**32
