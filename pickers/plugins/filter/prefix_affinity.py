"""prefix-cache-affinity-filter (llm-d): keep only the cache-warm ("sticky") endpoints, unless keeping
them costs more time to first token than their cache saves.

Warm: the share of the prompt's blocks the endpoint holds in the approximate prefix match (matched /
total blocks, 0 for a prompt shorter than a block) is at least `affinityThreshold`. With no warm
endpoint, or one candidate, or `affinityThreshold` <= 0, every candidate is kept; with probability
`explorationProbability` too (so other endpoints warm up). The TTFT gate: each endpoint's TTFT is
estimated as in-flight tokens / `peakPrefillThroughput` * 1000 ms (in-flight tokens as
inflight-load-producer counts them, see scorer/load/token_load.py); when the best warm endpoint's estimate
exceeds the best cold one's by more than `maxTTFTPenaltyMs` (0 = never), every candidate is kept.

The match comes from the approx-prefix-cache-producer `prefixMatchInfoProducerName` names (else the
config's, else its prefix-cache-scorer's settings, else llm-d's defaults) or the precise-prefix-cache-
producer it names (the KV-event index; nothing is then recorded in the approximate one), the load from the
inflight-load-producer `inFlightLoadProducerName` names (else the config's, else a default one). After
the pick the filter records the prompt's blocks for the chosen endpoint and counts its prefill tokens,
as llm-d's producers do, once per request whichever plugins ask. llm-d's other TTFT source, the latency
predictor (`ttftSource: latencyPredictor`), is not wired to llm-epp's latency model yet and is refused.
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
NO_PREDICTOR = "this filter's TTFT gate does not read llm-epp's latency model yet (predicted-latency-producer does)"


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
    ) -> None:
        self.name = name
        self.index = index
        self.rng = rng
        self.threshold = threshold
        self.exploration = exploration
        self.max_penalty_ms = max_penalty_ms
        self.peak_throughput = peak_throughput
        self.prefix_producer_name: str | None = None
        self.load_producer_name: str | None = None
        # llm-d's defaults until bound to the config's producers
        self.source: MatchSettings = ApproxPrefixCacheProducer()
        self.precise: PrefixMatchSource | None = None  # a precise-prefix-cache-producer, when named
        self.load = InFlightLoadProducer(index)
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
        if penalty > 0 and source == LATENCY_PREDICTOR:
            raise ParameterError("ttftSource", f"{LATENCY_PREDICTOR} is not supported: {NO_PREDICTOR}; use {THROUGHPUT}")
        if penalty > 0 and peak == 0:
            raise ParameterError("peakPrefillThroughput", f"must be > 0 when ttftSource is {THROUGHPUT} and maxTTFTPenaltyMs > 0")
        if penalty == 0:
            for key in ("ttftSource", "peakPrefillThroughput"):
                if p.given(key):
                    p.warnings.append(f"parameter {key} has no effect with maxTTFTPenaltyMs 0 (the TTFT gate is off, as in llm-d)")
        if p.given("latencyPredictionInfoProducerName"):
            p.string("latencyPredictionInfoProducerName")
            p.warnings.append(f"parameter latencyPredictionInfoProducerName has no effect: {NO_PREDICTOR}")
        f = cls(ctx.prefix_index, ctx.rng, name, threshold=threshold, exploration=exploration, max_penalty_ms=penalty,
                peak_throughput=peak)  # fmt: skip
        f.prefix_producer_name = p.string("prefixMatchInfoProducerName")
        f.load_producer_name = p.string("inFlightLoadProducerName")
        return f

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        self.precise, source = bind_match(plugins, self.prefix_producer_name)
        if self.precise is None:
            self.source = source
        self.load = find_load_producer(plugins, self.load_producer_name, self.index)
        match: object = self.precise if self.precise is not None else self.source
        self.bound = bound_names(plugins, {"prefixMatchInfoProducerName": match, "inFlightLoadProducerName": self.load})

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
            # ms = tokens / (tokens/s) * 1000; the lowest in-flight load gives the best TTFT in each set
            peak = self.peak_throughput
            best_sticky = min(ep.in_flight_load_tokens for ep in sticky) / peak * 1000
            best_cold = min(ep.in_flight_load_tokens for ep in cold) / peak * 1000
            if best_sticky - best_cold > self.max_penalty_ms:
                return endpoints
        return sticky

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        self.load.pre_request(request, cycle, result)
        if self.precise is None:
            record_pick(request, cycle, self.index, result, self.source)  # a no-op when the load's match is this one
