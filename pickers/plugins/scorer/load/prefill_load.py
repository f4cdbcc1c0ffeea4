"""prefill-load-scorer (llm-epp): prefer the endpoint where this request's prompt would be computed
soonest, counting the prefill work already waiting there.

TTFT is mostly prefill: the uncached part of this prompt plus the uncached prompts queued ahead of it
on the same endpoint. The EPP knows both between scrapes: the approximate prefix index says how much
of this prompt each endpoint holds, and `Endpoint.in_flight_prefill_tokens` counts the uncached prompt
tokens of requests the EPP sent there that have not produced their first byte yet. The endpoint with
the least total work scores 1, one whole prompt's prefill more (or worse) 0, so cache affinity holds
as long as it saves more prefill than the queue ahead costs.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import CHARS_PER_TOKEN, InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import BLOCK_CHARS, MAX_BLOCKS, ApproxPrefixIndex
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.scorer.affinity.prefix import prefix_match

_UNCACHED = "prefill-load-scorer/uncached"


class PrefillLoadScorer(Plugin):
    type = "prefill-load-scorer"
    category = "distribution"

    def __init__(self, index: ApproxPrefixIndex, name: str = "prefill-load-scorer", block_chars: int = BLOCK_CHARS) -> None:
        self.name = name
        self.index = index
        self.block_chars = block_chars
        self.block_tokens = max(1, block_chars // CHARS_PER_TOKEN)

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> PrefillLoadScorer:
        return cls(ctx.prefix_index, name, p.integer("blockSize", BLOCK_CHARS, minimum=1))

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        m = prefix_match(request, cycle, self.index, self.block_chars, MAX_BLOCKS)
        prompt = request.prompt_tokens
        bt = self.block_tokens
        matched = m.matched
        uncached = [max(0, prompt - matched.get(ep.address, 0) * bt) for ep in endpoints]
        cycle.data[_UNCACHED] = dict(zip((ep.address for ep in endpoints), uncached))
        work = [ep.in_flight_prefill_tokens + u for ep, u in zip(endpoints, uncached)]
        lo = min(work, default=0)
        # Scaled by this prompt's own full prefill: an endpoint one whole prompt's work behind the
        # best scores 0, and small differences stay small (a min-max scale would make 8 tokens of
        # difference a full point and break affinity at the first request in flight).
        scale = max(prompt, bt)
        return [max(0.0, 1.0 - (w - lo) / scale) for w in work]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        uncached = cycle.data.get(_UNCACHED)
        if isinstance(uncached, dict) and result.endpoints:
            result.prefill_tokens = uncached.get(result.endpoints[0].address, request.prompt_tokens)
