"""token-load-scorer and inflight-load-producer (llm-d): in-flight work per endpoint.

llm-d's inflight-load-producer counts what each request adds to the endpoints it goes to: the request
itself, its uncached prompt tokens there (prefill work, until the first response chunk) and, with
`addEstimatedOutputTokens`, `min(round(prompt x outputRatio), max_tokens, maxEstimatedOutputTokens)`
estimated output tokens until the response ends (ratio 1.5; the client's max_tokens and the cap only
when given). Every chosen endpoint counts: the primary (decode) and, with P/D, the prefill endpoint,
whose whole share comes off at the first byte. Here the EPP's datastore keeps the counts
(`Endpoint.in_flight`, `in_flight_prefill_tokens`, `in_flight_output_tokens`): after the pick the
producer puts its charges (InFlightCharge) in the scheduling result and the Director applies and
releases them. Uncached = the prompt's tokens (the token-producer's count, else 4 characters a token)
less the leading blocks the endpoint holds in the prefix match of `prefixMatchInfoProducerName`: an
approx-prefix-cache-producer or a precise-prefix-cache-producer (default: the config's approximate
one). Without a producer in the config the consumers use one with llm-d's defaults, as llm-d creates one.

token-load-scorer: 1 - min(1, (in-flight tokens + this request's uncached tokens) / queueThresholdTokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import (
    ENDPOINT_NOTIFICATION_SOURCE,
    CycleState,
    InFlightCharge,
    SchedulingResult,
)
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import Plugin, PluginContext, PrefixMatchSource, configured_plugin
from pickers.plugins.scorer.affinity.prefix import (
    ApproxPrefixCacheProducer,
    MatchSettings,
    bind_match,
    record_pick,
    uncached_per_endpoint,
)

DEFAULT_THRESHOLD_TOKENS = 4_194_304  # 128 requests of 32K tokens
DEFAULT_OUTPUT_RATIO = 1.5


class InFlightLoadProducer(Plugin):
    type = "inflight-load-producer"

    def __init__(
        self,
        index: ApproxPrefixIndex,
        name: str = "inflight-load-producer",
        *,
        add_output: bool = False,
        output_ratio: float = DEFAULT_OUTPUT_RATIO,
        max_output: int | None = None,
    ) -> None:
        self.name = name
        self.index = index
        self.add_output = add_output
        self.output_ratio = output_ratio
        self.max_output = max_output
        self.prefix_producer_name: str | None = None
        self.source: MatchSettings = ApproxPrefixCacheProducer()  # llm-d's default until bound
        self.precise: PrefixMatchSource | None = None  # a precise-prefix-cache-producer, when named
        self.bound: dict[str, str] = {}

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> InFlightLoadProducer:
        add = p.flag("addEstimatedOutputTokens", False)
        ratio = p.number("outputRatio", DEFAULT_OUTPUT_RATIO, minimum=0)
        cap: int | None = None
        if p.given("maxEstimatedOutputTokens"):
            cap = p.integer("maxEstimatedOutputTokens", 0, minimum=0)
        else:
            p.effective["maxEstimatedOutputTokens"] = None  # no cap
        if not add:
            for key in ("outputRatio", "maxEstimatedOutputTokens"):
                if p.given(key):
                    p.warnings.append(f"parameter {key} has no effect without addEstimatedOutputTokens: true (as in llm-d)")
        # true (the default) syncs with other EPP replicas only where a cross-replica syncer is set up,
        # which llm-epp has not (its dataLayer peer discovery is refused); false is what it does anyway.
        if p.flag("syncCrossReplicaState", True) and p.given("syncCrossReplicaState"):
            p.warnings.append("parameter syncCrossReplicaState has no effect: llm-epp shares no in-flight load between EPP replicas")
        producer = cls(ctx.prefix_index, name, add_output=add, output_ratio=ratio, max_output=cap)
        producer.prefix_producer_name = p.string("prefixMatchInfoProducerName")
        return producer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        self.precise, source = bind_match(plugins, self.prefix_producer_name)
        if self.precise is not None:  # the KV-event match
            self.bound = {"prefixMatchInfoProducerName": self.precise.name}
            return
        self.source = source
        self.bound = bound_names(plugins, {"prefixMatchInfoProducerName": self.source})

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, **self.bound}

    def extracts(self, source_type: str) -> bool:
        """An extractor of an endpoint-notification-source, as in llm-d: the counts of an endpoint that
        leaves go with it (they live on its Endpoint in the datastore)."""
        return source_type == ENDPOINT_NOTIFICATION_SOURCE

    def estimate_output(self, prompt_tokens: int, client_max: int | None) -> int:
        """llm-d's SimpleTokenEstimator: round(prompt x outputRatio), capped by max_tokens and the limit."""
        if prompt_tokens <= 0:
            return 0
        est = round(prompt_tokens * self.output_ratio)
        if client_max is not None and client_max < est:
            est = client_max
        if self.max_output is not None and self.max_output < est:
            est = self.max_output
        return est

    def request_tokens(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[int]:
        """This request's uncached prompt tokens on each endpoint (llm-d's UncachedRequestTokens)."""
        return uncached_per_endpoint(request, cycle, self.precise, self.index, self.source, endpoints)

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        """Charge each chosen endpoint (once per request, whichever plugins ask) and record the prompt's
        blocks for it in the approximate index, as llm-d's producers do after the pick."""
        if not result.endpoints:
            return
        if result.in_flight is None:
            primary = result.endpoints[0]
            chosen = [primary]
            if result.profile_results is not None:
                chosen += [eps[0] for eps in result.profile_results.values() if eps and all(eps[0] is not c for c in chosen)]
            uncached = self.request_tokens(request, cycle, chosen)
            if result.prefill_tokens:  # a plugin counted the primary's prefill already (prefill-load-scorer)
                uncached[0] = result.prefill_tokens
            result.prefill_tokens = uncached[0]
            output = self.estimate_output(request.prompt_tokens, request.max_tokens) if self.add_output else 0
            result.in_flight = [InFlightCharge(primary, tokens=output, early_tokens=uncached[0])] + [
                InFlightCharge(ep, early_tokens=u, early_request=True) for ep, u in zip(chosen[1:], uncached[1:])
            ]
        if self.precise is None:
            record_pick(request, cycle, self.index, result, self.source)


def find_load_producer(plugins: Mapping[str, object], name: str | None, index: ApproxPrefixIndex) -> InFlightLoadProducer:
    """The inflight-load-producer `inFlightLoadProducerName` names, else the config's one named like its
    type or its only one, else one with llm-d's defaults (llm-d creates it when a config lists none)."""
    found = configured_plugin(plugins, name, InFlightLoadProducer, "inFlightLoadProducerName")
    if found is not None:
        return found
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
        return [1.0 - min(t, ep.in_flight_load_tokens + u) / t for ep, u in zip(endpoints, own)]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        self.producer.pre_request(request, cycle, result)
