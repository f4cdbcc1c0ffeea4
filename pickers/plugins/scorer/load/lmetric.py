"""lmetric-scorer (llm-d-router PR #2351, newer than v0.10): prefix locality and load in one cost,

    cost(e) = (prompt blocks - blocks e holds) x block tokens x (requests in flight on e + 1)
    score(e) = (max cost - cost(e)) / (max cost - min cost)        1 for all when the costs are equal

the uncached prefill work there times the batch it joins: an endpoint holding more of the prompt and
running fewer requests scores higher. The match is the one `prefixMatchInfoProducerName` names (a
precise-prefix-cache-producer, as in llm-d's guide, or the approximate one; default the config's
approximate match), the requests in flight those the EPP counts per endpoint, charged through the
inflight-load-producer `inFlightLoadProducerName` names (else the config's, else one with llm-d's
defaults, as llm-d creates one). A prompt shorter than one block has no match: every endpoint scores 0,
as in llm-d. An affinity scorer, as llm-d registers it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import CHARS_PER_TOKEN, InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.plugins.base import Plugin, PluginContext, PrefixMatchSource
from pickers.plugins.scorer.affinity.prefix import ApproxPrefixCacheProducer, MatchSettings, bind_match, prefix_match
from pickers.plugins.scorer.load.token_load import InFlightLoadProducer, bound_names, find_load_producer


class LMetricScorer(Plugin):
    type = "lmetric-scorer"
    category = "affinity"

    def __init__(self, ctx: PluginContext, name: str = "lmetric-scorer") -> None:
        super().__init__(name)
        self.index = ctx.prefix_index
        self.prefix_producer_name: str | None = None
        self.load_producer_name: str | None = None
        self.precise: PrefixMatchSource | None = None
        self.source: MatchSettings = ApproxPrefixCacheProducer()  # llm-d's defaults until bound
        self.load = InFlightLoadProducer(ctx.prefix_index)
        self.bound: dict[str, str] = {}

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> LMetricScorer:
        scorer = cls(ctx, name)
        scorer.prefix_producer_name = p.string("prefixMatchInfoProducerName")
        scorer.load_producer_name = p.string("inFlightLoadProducerName")
        return scorer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        self.precise, source = bind_match(plugins, self.prefix_producer_name)
        if self.precise is None:
            self.source = source
        self.load = find_load_producer(plugins, self.load_producer_name, self.index)
        match: object = self.precise if self.precise is not None else self.source
        self.bound = bound_names(plugins, {"prefixMatchInfoProducerName": match, "inFlightLoadProducerName": self.load})

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, **self.bound}

    def costs(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float | None]:
        """Each endpoint's cost in token-requests; None where the match has nothing for it."""
        if self.precise is not None:
            matches = self.precise.prefix_matches(request, cycle, endpoints)
            found = [matches.get(ep.address) for ep in endpoints]
        else:
            s = self.source
            pm = prefix_match(request, cycle, self.index, s.block_chars, s.max_blocks)
            total, block_tokens = len(pm.hashes), max(1, s.block_chars // CHARS_PER_TOKEN)
            found = [(pm.matched.get(ep.address, 0), total, block_tokens) for ep in endpoints]
        out: list[float | None] = []
        for ep, m in zip(endpoints, found):
            if m is None or m[1] <= 0:
                out.append(None)
                continue
            held, total, block_tokens = m
            uncached = (total - min(max(held, 0), total)) * max(block_tokens, 1)
            out.append(float(uncached * (max(ep.in_flight, 0) + 1)))
        return out

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        costs = self.costs(request, cycle, endpoints)
        known = [c for c in costs if c is not None]
        if not known:
            return [0.0] * len(endpoints)
        lo, hi = min(known), max(known)
        if hi <= lo:
            return [0.0 if c is None else 1.0 for c in costs]
        return [0.0 if c is None else (hi - c) / (hi - lo) for c in costs]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        # the in-flight charges (and the approximate index's record) of the producer it reads, once per request
        self.load.pre_request(request, cycle, result)
