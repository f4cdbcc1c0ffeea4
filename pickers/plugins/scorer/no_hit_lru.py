"""no-hit-lru-scorer (llm-d): on a cold request (no endpoint holds any of its prefix) prefer the endpoint
that took a cold request least recently, so new prefixes spread over the pool instead of all landing
where the load scorers point. Warm requests score every endpoint 0.5 (no opinion).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.scorer.prefix import prefix_match

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

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> NoHitLRUScorer:
        # The prefix match is shared through the cycle state whatever the prefix plugin is called.
        p.ignore("prefixPluginName", "prefixPluginType")
        return cls(ctx.prefix_index, name, p.integer("lruSize", DEFAULT_LRU_SIZE, minimum=1))

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        if not prefix_match(request, cycle, self.index).cold:
            return [NEUTRAL] * len(endpoints)
        rank = {addr: i for i, addr in enumerate(self._cold_picks)}  # 0 = least recent
        used = sorted((rank[ep.address] for ep in endpoints if ep.address in rank))
        k = len(used)
        pos = {r: i for i, r in enumerate(used)}
        # never used: 1; used: (k - i) / (k + 1) by recency, so the most recent is lowest
        return [1.0 if ep.address not in rank else (k - pos[rank[ep.address]]) / (k + 1) for ep in endpoints]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        if not result.endpoints or not prefix_match(request, cycle, self.index).cold:
            return
        addr = result.endpoints[0].address
        self._cold_picks[addr] = None
        self._cold_picks.move_to_end(addr)
        while len(self._cold_picks) > self.lru_size:
            self._cold_picks.popitem(last=False)
