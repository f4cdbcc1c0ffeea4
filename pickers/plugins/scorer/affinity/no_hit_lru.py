"""no-hit-lru-scorer (llm-d): on a cold request (no endpoint holds any of its prefix) prefer the endpoint
that took a cold request least recently, so new prefixes spread over the pool instead of all landing
where the load scorers point. Warm requests score every endpoint 0.5 (no opinion).

Cold means no endpoint holds the first block, matched with the block settings of the prefix match it
reads: the `approx-prefix-cache-producer` named in `prefixMatchInfoProducerName` (llm-d's parameter),
else the config's prefix-cache-scorer (its producer's settings, or its own), else the defaults. Named
there, a precise-prefix-cache-producer decides instead: cold when no candidate holds the first block.
`prefixPluginName` / `prefixPluginType` are deprecated in llm-d and were never used there: accepted
with a warning.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import BLOCK_CHARS, MAX_BLOCKS, ApproxPrefixIndex
from pickers.plugins.base import Plugin, PluginContext, PrefixMatchSource
from pickers.plugins.scorer.affinity.prefix import ApproxPrefixCacheProducer, PrefixCacheScorer, prefix_match

DEFAULT_LRU_SIZE = 1024
NEUTRAL = 0.5


class NoHitLRUScorer(Plugin):
    type = "no-hit-lru-scorer"
    category = "distribution"

    def __init__(self, index: ApproxPrefixIndex, name: str = "no-hit-lru-scorer", lru_size: int = DEFAULT_LRU_SIZE):
        self.name = name
        self.index = index
        self.lru_size = lru_size
        self._cold_picks: OrderedDict[str, None] = OrderedDict()  # address, least recent first
        self.producer_name: str | None = None
        self.block_chars = BLOCK_CHARS
        self.max_blocks = MAX_BLOCKS
        self.precise: PrefixMatchSource | None = None  # a precise-prefix-cache-producer, when named
        self._cold_key = f"no-hit-lru/cold/{name}"  # this cycle's verdict, for pre_request

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> NoHitLRUScorer:
        unused = "llm-d never read it either; the prefix match is found through prefixMatchInfoProducerName"
        p.deprecated("prefixPluginName", unused)
        p.deprecated("prefixPluginType", unused)
        scorer = cls(ctx.prefix_index, name, p.integer("lruSize", DEFAULT_LRU_SIZE, minimum=1))
        scorer.producer_name = p.string("prefixMatchInfoProducerName")
        return scorer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        """Match with the same block settings as the prefix match this scorer reads (see the module doc)."""
        source: object | None = None
        if self.producer_name is not None:
            source = plugins.get(self.producer_name)
            if isinstance(source, PrefixMatchSource) and not isinstance(source, (ApproxPrefixCacheProducer, PrefixCacheScorer)):
                self.precise = source
                return
            if not isinstance(source, ApproxPrefixCacheProducer):
                what = "no plugin" if source is None else f"{getattr(source, 'type', '?')}, not an {ApproxPrefixCacheProducer.type}"
                raise ParameterError("prefixMatchInfoProducerName", f"{shown(self.producer_name)}: {what}")
        else:
            source = next((q for q in plugins.values() if isinstance(q, PrefixCacheScorer)), None)
            if source is None:
                source = next((q for q in plugins.values() if isinstance(q, ApproxPrefixCacheProducer)), None)
        if source is not None:
            self.block_chars = source.block_chars  # type: ignore[attr-defined]
            self.max_blocks = source.max_blocks  # type: ignore[attr-defined]

    def _cold(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> bool:
        if self.precise is not None:
            return not any(held for held, _, _ in self.precise.prefix_matches(request, cycle, endpoints).values())
        return prefix_match(request, cycle, self.index, self.block_chars, self.max_blocks).cold

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        if not self._cold(request, cycle, endpoints):
            cycle.data[self._cold_key] = False
            return [NEUTRAL] * len(endpoints)
        cycle.data[self._cold_key] = True
        rank = {addr: i for i, addr in enumerate(self._cold_picks)}  # 0 = least recent
        used = sorted((rank[ep.address] for ep in endpoints if ep.address in rank))
        k = len(used)
        pos = {r: i for i, r in enumerate(used)}
        # never used: 1; used: (k - i) / (k + 1) by recency, so the most recent is lowest
        return [1.0 if ep.address not in rank else (k - pos[rank[ep.address]]) / (k + 1) for ep in endpoints]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        cold = cycle.data.get(self._cold_key)
        if cold is None:
            cold = self._cold(request, cycle, result.endpoints)
        if not result.endpoints or not cold:
            return
        addr = result.endpoints[0].address
        self._cold_picks[addr] = None
        self._cold_picks.move_to_end(addr)
        while len(self._cold_picks) > self.lru_size:
            self._cold_picks.popitem(last=False)
