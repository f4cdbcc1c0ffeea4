"""data-parallel-balance-scorer (llm-epp): spread work over the ranks of each data-parallel group the way
a lockstep group pays for it.

The ranks of one DP group (vLLM wide expert parallelism) exchange tokens in every MoE layer, so they
step together: each step lasts as long as the slowest rank's batch, and a rank with nothing to do runs
dummy steps meanwhile. What a request costs its group is therefore not its own work but how much it
raises the group's maximum: a rank below the group's busiest rank takes one more sequence for free
(the step is as long anyway), while one more sequence on the busiest rank, or a prefill longer than
any the group is already doing, slows every rank of the group.

For a candidate rank r of group g (endpoints sharing `EndpointSpec.dp_group`), with the EPP's own
in-flight counts:
    cost(r) = |g| x ( max(0, requests(r) + 1 - max requests in g) x requestTokens
                      + max(0, prefill(r) + uncached(r) - max prefill in g) )
where requests are the requests in flight, prefill the uncached prompt tokens not yet past their first
byte (`Endpoint.in_flight_prefill_tokens`) and uncached(r) this prompt's tokens r lacks (the prefix
match of the in-flight load producer). `requestTokens` (256) converts one more sequence in a rank's
batch for its whole decode into prefill tokens of the same cost. The score is
1 - cost / (largest |g| x (requestTokens + this prompt's tokens)): 1 where the request raises nothing,
0 where it adds a whole sequence and its whole prompt beyond the group's busiest rank. Endpoints in no
group score 1, so the scorer changes nothing in a pool without DP groups. `prefill: false` drops the
prefill term (a P/D decode profile: its ranks pull the KV instead of computing it).

Which group is less loaded overall is the other load scorers' business (active-request-scorer):
this one only says where inside a group the next request is free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.scorer.load.token_load import InFlightLoadProducer, bound_names, find_load_producer

DEFAULT_REQUEST_TOKENS = 256
_UNCACHED = "data-parallel-balance-scorer/uncached"


class DataParallelBalanceScorer(Plugin):
    type = "data-parallel-balance-scorer"
    category = "distribution"

    def __init__(
        self,
        index: ApproxPrefixIndex,
        name: str = "data-parallel-balance-scorer",
        *,
        request_tokens: int = DEFAULT_REQUEST_TOKENS,
        prefill: bool = True,
    ) -> None:
        self.name = name
        self.index = index
        self.request_tokens = request_tokens
        self.prefill = prefill
        self.producer_name: str | None = None
        self.producer = InFlightLoadProducer(index)  # llm-d's defaults until bound to the config's
        self.bound: dict[str, str] = {}

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> DataParallelBalanceScorer:
        scorer = cls(
            ctx.prefix_index,
            name,
            request_tokens=p.integer("requestTokens", DEFAULT_REQUEST_TOKENS, minimum=1),
            prefill=p.flag("prefill", True),
        )
        scorer.producer_name = p.string("inFlightLoadProducerName")
        return scorer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        self.producer = find_load_producer(plugins, self.producer_name, self.index)
        self.bound = bound_names(plugins, {"inFlightLoadProducerName": self.producer})

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, **self.bound}

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        groups: dict[str, list[int]] = {}
        for i, ep in enumerate(endpoints):
            group = ep.spec.dp_group
            if group:
                groups.setdefault(group, []).append(i)
        if not groups:
            return [1.0] * len(endpoints)
        uncached = self.producer.request_tokens(request, cycle, endpoints) if self.prefill else [0] * len(endpoints)
        cycle.data[_UNCACHED] = {ep.address: u for ep, u in zip(endpoints, uncached)}
        widest = max(len(members) for members in groups.values())
        scale = widest * (self.request_tokens + (request.prompt_tokens if self.prefill else 0))
        scores = [1.0] * len(endpoints)
        for members in groups.values():
            top_requests = max(endpoints[i].in_flight for i in members)
            top_prefill = max(endpoints[i].in_flight_prefill_tokens for i in members)
            for i in members:
                ep = endpoints[i]
                raised = max(0, ep.in_flight + 1 - top_requests) * self.request_tokens
                if self.prefill:
                    raised += max(0, ep.in_flight_prefill_tokens + uncached[i] - top_prefill)
                scores[i] = max(0.0, 1.0 - len(members) * raised / scale)
        return scores

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        # The prefill term reads in_flight_prefill_tokens, so the pick charges the chosen rank with the
        # uncached tokens it will compute, unless another plugin already did (prefill-load-scorer).
        uncached = cycle.data.get(_UNCACHED)
        if isinstance(uncached, dict) and result.endpoints and not result.prefill_tokens and result.in_flight is None:
            result.prefill_tokens = uncached.get(result.endpoints[0].address, request.prompt_tokens)
