"""token-load-scorer and inflight-load-producer (llm-d): in-flight prompt work per endpoint.

llm-d's inflight-load-producer counts, per endpoint, the uncached prompt tokens of the requests sent
there until their first response chunk (prefill is done then); the current request's own uncached
tokens on each endpoint come with it. Here the EPP's datastore keeps that count
(`Endpoint.in_flight_prefill_tokens`, from the pick to the first response byte): the producer says how
a request's uncached tokens are counted (prompt tokens at 4 characters a token, less the leading blocks
the endpoint holds in the approximate prefix index) and, after the pick, puts the primary's count in
the scheduling result for the datastore to add. Its `prefixMatchInfoProducerName` names the
approx-prefix-cache-producer whose match it discounts; without a producer in the config the consumers
use one with llm-d's defaults, as llm-d creates one.

token-load-scorer: 1 - min(1, (in-flight tokens + this request's uncached tokens) / queueThresholdTokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import CHARS_PER_TOKEN, InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.scorer.prefix import (
    ApproxPrefixCacheProducer,
    MatchSettings,
    match_source,
    prefix_match,
    record_pick,
    uncached_tokens,
)

DEFAULT_THRESHOLD_TOKENS = 4_194_304  # 128 requests of 32K tokens
DEFAULT_OUTPUT_RATIO = 1.5


class InFlightLoadProducer(Plugin):
    type = "inflight-load-producer"

    def __init__(self, index: ApproxPrefixIndex, name: str = "inflight-load-producer") -> None:
        self.name = name
        self.index = index
        self.prefix_producer_name: str | None = None
        self.source: MatchSettings = ApproxPrefixCacheProducer()  # llm-d's default until bound
        self.bound: dict[str, str] = {}

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> InFlightLoadProducer:
        if p.flag("addEstimatedOutputTokens", False):
            raise ParameterError(
                "addEstimatedOutputTokens",
                "true is not supported by llm-epp yet: its in-flight load is the uncached prompt tokens of requests "
                "that have not produced a first byte (llm-d's default, false)",
            )
        # Both only size the estimated output, which is never counted here (nor in llm-d) while
        # addEstimatedOutputTokens is false; checked as llm-d checks them.
        p.number("outputRatio", DEFAULT_OUTPUT_RATIO, minimum=0)
        if p.given("maxEstimatedOutputTokens"):
            p.integer("maxEstimatedOutputTokens", 0, minimum=0)
        else:
            p.effective["maxEstimatedOutputTokens"] = None  # no cap
        for key in ("outputRatio", "maxEstimatedOutputTokens"):
            if p.given(key):
                p.warnings.append(f"parameter {key} has no effect without addEstimatedOutputTokens: true (as in llm-d)")
        # true (the default) syncs with other EPP replicas only where a cross-replica syncer is set up,
        # which llm-epp has not (its dataLayer peer discovery is refused); false is what it does anyway.
        if p.flag("syncCrossReplicaState", True) and p.given("syncCrossReplicaState"):
            p.warnings.append("parameter syncCrossReplicaState has no effect: llm-epp shares no in-flight load between EPP replicas")
        producer = cls(ctx.prefix_index, name)
        producer.prefix_producer_name = p.string("prefixMatchInfoProducerName")
        return producer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        self.source = match_source(plugins, self.prefix_producer_name)
        self.bound = bound_names(plugins, {"prefixMatchInfoProducerName": self.source})

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, **self.bound}

    def request_tokens(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[int]:
        """This request's uncached prompt tokens on each endpoint (llm-d's UncachedRequestTokens)."""
        s = self.source
        m = prefix_match(request, cycle, self.index, s.block_chars, s.max_blocks)
        prompt, total, bt, matched = request.prompt_tokens, len(m.hashes), s.block_chars // CHARS_PER_TOKEN, m.matched
        return [uncached_tokens(prompt, matched.get(ep.address, 0), total, bt) for ep in endpoints]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        """Count the primary's uncached tokens (unless a plugin already did) and record the prompt's
        blocks for it, as llm-d's producers do after the pick."""
        if not result.endpoints:
            return
        if not result.prefill_tokens:
            result.prefill_tokens = self.request_tokens(request, cycle, result.endpoints[:1])[0]
        record_pick(request, cycle, self.index, result, self.source)


def find_load_producer(plugins: Mapping[str, object], name: str | None, index: ApproxPrefixIndex) -> InFlightLoadProducer:
    """The inflight-load-producer `inFlightLoadProducerName` names, else the config's one named like its
    type or its only one, else one with llm-d's defaults (llm-d creates it when a config lists none)."""
    if name is not None:
        found = plugins.get(name)
        if not isinstance(found, InFlightLoadProducer):
            what = "no plugin" if found is None else f"{getattr(found, 'type', '?')}, not an {InFlightLoadProducer.type}"
            raise ParameterError("inFlightLoadProducerName", f"{shown(name)}: {what}")
        return found
    producers = {n: q for n, q in plugins.items() if isinstance(q, InFlightLoadProducer)}
    if InFlightLoadProducer.type in producers:
        return producers[InFlightLoadProducer.type]
    if len(producers) == 1:
        return next(iter(producers.values()))
    if producers:
        raise ParameterError("inFlightLoadProducerName", f"{len(producers)} {InFlightLoadProducer.type} plugins ({', '.join(producers)}); name the one this plugin reads")
    implied = InFlightLoadProducer(index)
    implied.bind_config(plugins, {}, None)
    return implied


def bound_names(plugins: Mapping[str, object], bound: Mapping[str, object]) -> dict[str, str]:
    """parameter -> the name of the config's plugin it resolved to (for `epp check-config`); a default
    producer made because the config lists none is left out (shown as unset)."""
    names = {id(q): n for n, q in plugins.items()}
    return {key: names[id(q)] for key, q in bound.items() if id(q) in names}


class TokenLoadScorer(Plugin):
    type = "token-load-scorer"
    category = "distribution"

    def __init__(self, index: ApproxPrefixIndex, threshold_tokens: int = DEFAULT_THRESHOLD_TOKENS, name: str = "token-load-scorer") -> None:
        self.name = name
        self.index = index
        self.threshold_tokens = threshold_tokens
        self.producer_name: str | None = None
        self.producer = InFlightLoadProducer(index)  # llm-d's default until bound
        self.bound: dict[str, str] = {}

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> TokenLoadScorer:
        if p.given("peakPrefillThroughput"):
            raise ParameterError(
                "peakPrefillThroughput",
                "not a token-load-scorer parameter (llm-d refuses it here too): it is prefix-cache-affinity-filter's, "
                "where it turns in-flight tokens into a TTFT estimate; set it there",
            )
        threshold = p.integer("queueThresholdTokens", DEFAULT_THRESHOLD_TOKENS)
        if threshold <= 0:
            p.warnings.append(f"queueThresholdTokens {threshold} is not positive; using {DEFAULT_THRESHOLD_TOKENS} (as llm-d)")
            threshold = p.effective["queueThresholdTokens"] = DEFAULT_THRESHOLD_TOKENS
        scorer = cls(ctx.prefix_index, threshold, name)
        scorer.producer_name = p.string("inFlightLoadProducerName")
        return scorer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        self.producer = find_load_producer(plugins, self.producer_name, self.index)
        self.bound = bound_names(plugins, {"inFlightLoadProducerName": self.producer})

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, **self.bound}

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        t = self.threshold_tokens
        own = self.producer.request_tokens(request, cycle, endpoints)
        return [1.0 - min(t, ep.in_flight_prefill_tokens + u) / t for ep, u in zip(endpoints, own)]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        self.producer.pre_request(request, cycle, result)
