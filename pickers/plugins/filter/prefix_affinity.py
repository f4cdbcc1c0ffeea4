"""prefix-cache-affinity-filter (llm-d): keep only the cache-warm ("sticky") endpoints, unless keeping
them costs more time to first token than their cache saves.

Warm: the share of the prompt's blocks the endpoint holds in the approximate prefix match (matched /
total blocks, 0 for a prompt shorter than a block) is at least `affinityThreshold`. With no warm
endpoint, or one candidate, or `affinityThreshold` <= 0, every candidate is kept; with probability
`explorationProbability` too (so other endpoints warm up). The TTFT gate: when the best warm
endpoint's TTFT exceeds the best cold one's by more than `maxTTFTPenaltyMs` (0 = never), every
candidate is kept. Each endpoint's TTFT comes from `ttftSource`:
- `prefillThroughput` (default): in-flight tokens / `peakPrefillThroughput` * 1000 ms (in-flight
  tokens as inflight-load-producer counts them, see scorer/load/token_load.py);
- `latencyPredictor`: the predicted TTFT of the predicted-latency-producer
  `latencyPredictionInfoProducerName` names (else the config's, else one with llm-d's defaults):
  llm-epp's online latency model, so the queue ahead, this request's uncached tokens there and the
  endpoint's own fitted prefill rate all count. An endpoint without a prediction never counts as the
  fastest (llm-d's MaxFloat64); with none at all (predictInProduce off) the gate never opens.

The match comes from the approx-prefix-cache-producer `prefixMatchInfoProducerName` names (else the
config's, else its prefix-cache-scorer's settings, else llm-d's defaults) or the precise-prefix-cache-
producer it names (the KV-event index; nothing is then recorded in the approximate one), the load from the
inflight-load-producer `inFlightLoadProducerName` names (else the config's, else a default one). After
the pick the filter records the prompt's blocks for the chosen endpoint and counts its prefill tokens,
as llm-d's producers do, once per request whichever plugins ask.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import Plugin, PluginContext, PrefixMatchSource
from pickers.plugins.latency.producer import PredictedLatencyProducer, find_latency_producer
from pickers.plugins.scorer.affinity.prefix import (
    ApproxPrefixCacheProducer,
    MatchSettings,
    bind_match,
    prefix_match,
    record_pick,
)
from pickers.plugins.scorer.load.token_load import (
    InFlightLoadProducer,
    bound_names,
    find_load_producer,
)

THROUGHPUT = "prefillThroughput"
LATENCY_PREDICTOR = "latencyPredictor"
# llm-d's defaults; the throughput is calibrated for Qwen3-32B on 2 x H100 80GB (TP=2), vLLM 0.19
DEFAULT_THRESHOLD = 0.80
DEFAULT_MAX_TTFT_PENALTY_MS = 18_000.0
DEFAULT_PEAK_PREFILL_THROUGHPUT = 15_928.0  # tokens per second


def _finite(p: Params, key: str, default: float, *, minimum: float | None = None) -> float:
    v = p.number(key, default, minimum=minimum)
    if not math.isfinite(v):
        raise ParameterError(key, f"expected a finite number, got {v}")
    return v


class PrefixCacheAffinityFilter(Plugin):
    type = "prefix-cache-affinity-filter"

    def __init__(
        self,
        index: ApproxPrefixIndex,
        rng: random.Random,
        name: str = "prefix-cache-affinity-filter",
        *,
        threshold: float = DEFAULT_THRESHOLD,
        exploration: float = 0.0,
        max_penalty_ms: float = DEFAULT_MAX_TTFT_PENALTY_MS,
        peak_throughput: float = DEFAULT_PEAK_PREFILL_THROUGHPUT,
        ttft_source: str = THROUGHPUT,
        ctx: PluginContext | None = None,
    ) -> None:
        self.name = name
        self.index = index
        self.rng = rng
        self.threshold = threshold
        self.exploration = exploration
        self.max_penalty_ms = max_penalty_ms
        self.peak_throughput = peak_throughput
        self.ttft_source = ttft_source
        self.ctx = ctx
        self.prefix_producer_name: str | None = None
        self.load_producer_name: str | None = None
        # llm-d's defaults until bound to the config's producers
        self.source: MatchSettings = ApproxPrefixCacheProducer()
        self.precise: PrefixMatchSource | None = None  # a precise-prefix-cache-producer, when named
        self.load = InFlightLoadProducer(index)
        self.latency_producer_name: str | None = None
        # ttftSource latencyPredictor with the gate on: the producer whose predictions the gate reads,
        # and whether it is one made for this filter (not the config's), which this filter then drives
        self.latency: PredictedLatencyProducer | None = None
        self.latency_implied = False
        self.bound: dict[str, str] = {}

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> PrefixCacheAffinityFilter:
        threshold = _finite(p, "affinityThreshold", DEFAULT_THRESHOLD)
        if threshold > 1.0:
            raise ParameterError("affinityThreshold", f"expected a number <= 1.0, got {threshold}")
        exploration = _finite(p, "explorationProbability", 0.0, minimum=0)
        if exploration > 1.0:
            raise ParameterError("explorationProbability", f"expected a number in [0, 1], got {exploration}")
        penalty = _finite(p, "maxTTFTPenaltyMs", DEFAULT_MAX_TTFT_PENALTY_MS, minimum=0)
        source = p.string("ttftSource", THROUGHPUT)
        if source not in (THROUGHPUT, LATENCY_PREDICTOR):
            raise ParameterError("ttftSource", f"expected {THROUGHPUT} or {LATENCY_PREDICTOR}, got {source!r}")
        peak = _finite(p, "peakPrefillThroughput", DEFAULT_PEAK_PREFILL_THROUGHPUT, minimum=0)
        if p.given("maxTokensInFlightPenalty"):
            tokens = _finite(p, "maxTokensInFlightPenalty", 0.0, minimum=0)
            same = f" (here {tokens:g} / {peak:g} * 1000 = {tokens / peak * 1000:.0f})" if peak else ""
            raise ParameterError(
                "maxTokensInFlightPenalty",
                "removed from llm-d before v0.9 (its router refuses it too): the in-flight gate is now maxTTFTPenaltyMs "
                f"with peakPrefillThroughput; the same gate is maxTTFTPenaltyMs = maxTokensInFlightPenalty / "
                f"peakPrefillThroughput * 1000{same}",
            )
        if penalty > 0 and source == THROUGHPUT and peak == 0:
            raise ParameterError("peakPrefillThroughput", f"must be > 0 when ttftSource is {THROUGHPUT} and maxTTFTPenaltyMs > 0")
        reads_predictions = penalty > 0 and source == LATENCY_PREDICTOR
        key = "latencyPredictionInfoProducerName"  # shown (check-config) only where it can matter
        latency_name = p.string(key) if reads_predictions or p.given(key) else None
        if penalty == 0:
            for key in ("ttftSource", "peakPrefillThroughput", "latencyPredictionInfoProducerName"):
                if p.given(key):
                    p.warnings.append(f"parameter {key} has no effect with maxTTFTPenaltyMs 0 (the TTFT gate is off, as in llm-d)")
        elif source == LATENCY_PREDICTOR and p.given("peakPrefillThroughput"):
            p.warnings.append(f"parameter peakPrefillThroughput has no effect with ttftSource {LATENCY_PREDICTOR} (the latency model predicts TTFT)")
        elif source == THROUGHPUT and latency_name is not None:
            p.warnings.append(f"parameter latencyPredictionInfoProducerName has no effect with ttftSource {THROUGHPUT}")
        f = cls(ctx.prefix_index, ctx.rng, name, threshold=threshold, exploration=exploration, max_penalty_ms=penalty,
                peak_throughput=peak, ttft_source=source, ctx=ctx)  # fmt: skip
        f.prefix_producer_name = p.string("prefixMatchInfoProducerName")
        f.load_producer_name = p.string("inFlightLoadProducerName")
        f.latency_producer_name = latency_name
        return f

    @property
    def reads_predictions(self) -> bool:
        return self.max_penalty_ms > 0 and self.ttft_source == LATENCY_PREDICTOR

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        self.precise, source = bind_match(plugins, self.prefix_producer_name)
        if self.precise is None:
            self.source = source
        self.load = find_load_producer(plugins, self.load_producer_name, self.index)
        match: object = self.precise if self.precise is not None else self.source
        bound: dict[str, object] = {"prefixMatchInfoProducerName": match, "inFlightLoadProducerName": self.load}
        if self.reads_predictions:
            assert self.ctx is not None
            self.latency = find_latency_producer(plugins, self.latency_producer_name, self.ctx)
            self.latency_implied = all(q is not self.latency for q in plugins.values())
            bound["latencyPredictionInfoProducerName"] = self.latency
        self.bound = bound_names(plugins, bound)

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, **self.bound}

    def warm_shares(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        """Each endpoint's prefix cache score: matched / total blocks (0 with no full block)."""
        if self.precise is not None:
            m = self.precise.prefix_matches(request, cycle, endpoints)
            return [held / total if total else 0.0 for held, total, _ in (m[ep.address] for ep in endpoints)]
        s = self.source
        m = prefix_match(request, cycle, self.index, s.block_chars, s.max_blocks)
        total = len(m.hashes)
        if not total:
            return [0.0] * len(endpoints)
        return [m.matched.get(ep.address, 0) / total for ep in endpoints]

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if len(endpoints) <= 1 or self.threshold <= 0:
            return endpoints
        if self.exploration and self.rng.random() < self.exploration:
            return endpoints
        threshold = self.threshold
        sticky: list[Endpoint] = []
        cold: list[Endpoint] = []
        for ep, share in zip(endpoints, self.warm_shares(request, cycle, endpoints)):
            (sticky if share >= threshold else cold).append(ep)
        if not sticky:
            return endpoints
        if self.max_penalty_ms > 0 and cold:
            best_sticky, best_cold = self.best_ttft_ms(request, cycle, sticky), self.best_ttft_ms(request, cycle, cold)
            if best_sticky - best_cold > self.max_penalty_ms:  # inf - inf (no predictions) is nan: not more
                return endpoints
        return sticky

    def best_ttft_ms(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> float:
        """The lowest TTFT (ms) among the endpoints, from the configured source; inf when the latency
        predictor has no prediction for any of them."""
        if self.latency is not None:
            found = self.latency.predictions(request, cycle, endpoints)
            return min((p.ttft_ms for ep in endpoints if (p := found.get(ep.address)) is not None), default=math.inf)
        # ms = tokens / (tokens/s) * 1000; the lowest in-flight load gives the best TTFT
        return min(ep.in_flight_load_tokens for ep in endpoints) / self.peak_throughput * 1000

    def explain(self, cycle: CycleState) -> Mapping[str, Mapping[str, float]]:
        return self.latency.explain(cycle) if self.latency is not None and self.latency_implied else {}

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        if self.latency is not None and self.latency_implied:
            self.latency.pre_request(request, cycle, result)  # the uncached tokens for the model's record
        self.load.pre_request(request, cycle, result)
        if self.precise is None:
            record_pick(request, cycle, self.index, result, self.source)  # a no-op when the load's match is this one

    def response_complete(
        self, request: InferenceRequest, endpoint: Endpoint, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        if self.latency is not None and self.latency_implied:
            self.latency.response_complete(request, endpoint, prompt_tokens, completion_tokens)
