"""predicted-latency-scorer: GIE v1.x's one-plugin SLO-aware scorer, which GIE split into
predicted-latency-producer + prefix-cache-affinity-filter + slo-headroom-tier-filter + latency-scorer
(+ latency-slo-admitter) and then deleted (kubernetes-sigs/gateway-api-inference-extension#2667,
#2826, April 2026; no llm-d router release registers it). Its configs (llm-d's older latency guides)
load here with a deprecation warning and do what it did, on llm-epp's online latency model instead of
GIE's XGBoost sidecars.

Per profile run it chooses ONE endpoint and scores it 1, the others 0 (selection.py's weights):

1. predictions for every candidate (its own predicted-latency-producer, with its `sloBufferFactor`,
   `streamingMode` (GIE's default: true) and `endpointRoleLabel`), and the share of the prompt's blocks
   each holds in the config's approximate prefix match (GIE read the approx producer's);
2. the global affinity gate: keep the candidates holding at least `affinityGateTauGlobal` (0.99) of
   the prompt, unless none does, or with probability `epsilonExploreSticky` (0.01), or when the best
   of them is predicted more than `affinityMaxTTFTPenaltyMs` (5000) slower to the first token than
   the best of all;
3. `headroomSelectionStrategy` `composite-only`: a composite draw (below) over what the gate kept;
   otherwise the tiers: both SLOs met (headroom >= 0) or not; with both, the negative tier with
   probability `epsilonExploreNeg` (0.01);
4. positive tier: one endpoint is it; else the gate again with `affinityGateTau` (0.8); then
   `composite-least` / `composite-most` draw by the composite (`compositeKVWeight`,
   `compositeQueueWeight`, `compositePrefixWeight`); else by blended headroom (`headroomTTFTWeight`,
   `headroomTPOTWeight`; without streamingMode TTFT alone), `least` or `most`;
5. negative tier: idle endpoints (nothing in flight from this EPP) first; the gate with
   `affinityGateTau`; the composite strategies as above; else GIE's hierarchy of deficits
   (`negHeadroomTTFTWeight`, `negHeadroomTPOTWeight`; without streamingMode TTFT alone);
6. `selectionMode` `linear` draws by the weights, `max` takes the heaviest.

Admission, as GIE's: a sheddable request (priority < 0) with a TTFT SLO (and, in streamingMode, a
TPOT SLO) is refused with HTTP 500 when no candidate meets its SLOs, every one has requests in flight,
none is cold (KV cache under 2% used) and none passes the global affinity gate.

`samplingMean` and `maxSampledTokens` set how GIE sampled decode tokens for its TPOT training and
mid-stream predictions; `contextTTL` how long it kept a request's context: they load (checked as GIE
checked them) with a warning that they change nothing here. One difference: GIE's `composite-least`
inverted each weight but drew against the total of the uninverted ones (sometimes falling back to
the first candidate); here the draw is over the inverted weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import NOT_ADMITTED, RequestError
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import PluginContext
from pickers.plugins.latency.producer import (
    NO_SIDECAR,
    SIDECAR_ENV,
    TPOT_SLO_HEADER,
    TTFT_SLO_HEADER,
    LatencyConsumer,
    PredictedLatencyProducer,
    slo_ms,
)
from pickers.plugins.latency.selection import (
    Candidate,
    composite_weights,
    draw,
    idle_first,
    negative_choices,
    positive_weights,
    split_by_headroom,
)
from pickers.plugins.scorer.affinity.prefix import prefix_match

LEAST, MOST = "least", "most"
COMPOSITE_LEAST, COMPOSITE_MOST, COMPOSITE_ONLY = "composite-least", "composite-most", "composite-only"
STRATEGIES = (LEAST, MOST, COMPOSITE_LEAST, COMPOSITE_MOST, COMPOSITE_ONLY)
LINEAR, MAX = "linear", "max"
COLD_KV_USAGE = 0.02
REPLACEMENT = "predicted-latency-producer + slo-headroom-tier-filter + latency-scorer (+ latency-slo-admitter)"


def _finite(p: Params, key: str, default: float, *, lo: float = 0.0, hi: float = math.inf) -> float:
    v = p.number(key, default)
    if not (lo <= v <= hi) or math.isnan(v) or math.isinf(v):
        where = f"in [{lo:g}, {hi:g}]" if hi != math.inf else f">= {lo:g}"
        raise ParameterError(p.path(key), f"must be {where}, got {v:g}")  # GIE's checks
    return v


class PredictedLatencyScorer(LatencyConsumer):
    type = "predicted-latency-scorer"
    category = "distribution"  # GIE's Balance

    def __init__(self, ctx: PluginContext, name: str = "predicted-latency-scorer", **settings: Any) -> None:
        super().__init__(ctx, name)
        self.rng = ctx.rng
        self.strategy: str = settings.get("strategy", LEAST)
        self.selection: str = settings.get("selection", LINEAR)
        self.weights: tuple[float, float] = settings.get("weights", (0.8, 0.2))
        self.neg_weights: tuple[float, float] = settings.get("neg_weights", (0.8, 0.2))
        self.composite: tuple[float, float, float] = settings.get("composite", (1.0, 1.0, 1.0))
        self.epsilon_sticky: float = settings.get("epsilon_sticky", 0.01)
        self.epsilon_neg: float = settings.get("epsilon_neg", 0.01)
        self.tau: float = settings.get("tau", 0.8)
        self.tau_global: float = settings.get("tau_global", 0.99)
        self.max_penalty_ms: float = settings.get("max_penalty_ms", 5000.0)
        streaming = settings.get("streaming", True)
        # its own predictions, as GIE's monolith made them; bound to the config's prefix and load producers
        self.producer = PredictedLatencyProducer(
            ctx.latency, ctx.prefix_index, name, slo_buffer=settings.get("slo_buffer", 1.0), streaming=streaming,
            role_label=settings.get("role_label", ""),
        )  # fmt: skip
        self.streaming = streaming

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> PredictedLatencyScorer:
        sampling = _finite(p, "samplingMean", 1000.0)
        if sampling <= 0:
            raise ParameterError("samplingMean", f"must be > 0, got {sampling:g}")
        p.integer("maxSampledTokens", 0, minimum=0)
        buffer = _finite(p, "sloBufferFactor", 1.0)
        if buffer <= 0:
            raise ParameterError("sloBufferFactor", f"must be > 0, got {buffer:g}")
        p.nanos_or_duration("contextTTL")  # a Go time.Duration: integer nanoseconds (or a duration string)
        scorer = cls(
            ctx, name,
            slo_buffer=buffer, streaming=p.flag("streamingMode", True), role_label=p.string("endpointRoleLabel", "") or "",
            strategy=p.choice("headroomSelectionStrategy", LEAST, STRATEGIES),
            selection=p.choice("selectionMode", LINEAR, (LINEAR, MAX)),
            weights=(_finite(p, "headroomTTFTWeight", 0.8), _finite(p, "headroomTPOTWeight", 0.2)),
            neg_weights=(_finite(p, "negHeadroomTTFTWeight", 0.8), _finite(p, "negHeadroomTPOTWeight", 0.2)),
            composite=(_finite(p, "compositeKVWeight", 1.0), _finite(p, "compositeQueueWeight", 1.0),
                       _finite(p, "compositePrefixWeight", 1.0)),
            epsilon_sticky=_finite(p, "epsilonExploreSticky", 0.01, hi=1.0),
            epsilon_neg=_finite(p, "epsilonExploreNeg", 0.01, hi=1.0),
            tau=_finite(p, "affinityGateTau", 0.8, hi=1.0), tau_global=_finite(p, "affinityGateTauGlobal", 0.99, hi=1.0),
            max_penalty_ms=_finite(p, "affinityMaxTTFTPenaltyMs", 5000.0),
        )  # fmt: skip
        sampled = [k for k in ("samplingMean", "maxSampledTokens") if p.given(k)]
        if sampled:
            p.warnings.append(
                f"parameter {' and '.join(sampled)} has no effect: GIE sampled decode tokens by it for its sidecar's "
                "TPOT training and mid-stream predictions; llm-epp's model learns TPOT from every streamed response"
            )
        if p.given("contextTTL"):
            p.warnings.append(
                "parameter contextTTL has no effect: GIE expired its per-request contexts after it; llm-epp keeps a "
                "request's latency record on the request until its response ends"
            )
        p.warnings.append(
            f"plugin type {cls.type} was removed from GIE (gateway-api-inference-extension#2826) in favour of "
            f"{REPLACEMENT}; llm-epp runs its selection on its own latency model"
        )
        found = [k for k in SIDECAR_ENV if os.environ.get(k)]
        if found:
            p.warnings.append(f"{', '.join(found)} set in the environment but not used: {NO_SIDECAR}")
        return scorer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        self.producer.bind_config(plugins, profiles, handler)  # the config's prefix match and in-flight counts
        self.implied = True  # its own producer: told of the pick and the end through this plugin

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return given  # it names no other plugin

    # -- the cycle ------------------------------------------------------------------------------------
    def candidates(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[Candidate]:
        """Each endpoint's prediction and prefix share (the online model predicts every endpoint, so GIE's
        composite fallback for endpoints without a prediction never applies)."""
        found = self.predictions(request, cycle, endpoints)
        shares = self._prefix_shares(request, cycle, endpoints)
        return [Candidate(ep, found[ep.address], s) for ep, s in zip(endpoints, shares)]

    def _prefix_shares(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        producer = self.producer
        if producer.precise is not None:
            m = producer.precise.prefix_matches(request, cycle, endpoints)
            return [held / total if total else 0.0 for held, total, _ in (m.get(ep.address, (0, 0, 0)) for ep in endpoints)]
        s = producer.source
        pm = prefix_match(request, cycle, self.ctx.prefix_index, s.block_chars, s.max_blocks)
        total = len(pm.hashes)
        return [pm.matched.get(ep.address, 0) / total if total else 0.0 for ep in endpoints]

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        if not endpoints:
            return []
        cands, _ = self._gate(self.candidates(request, cycle, endpoints), self.tau_global)
        chosen = self._choose(cands)
        return [1.0 if chosen is not None and ep is chosen.endpoint else 0.0 for ep in endpoints]

    def _choose(self, cands: list[Candidate]) -> Candidate | None:
        if not cands:
            return None
        if self.strategy == COMPOSITE_ONLY:
            return self._composite(cands, least=False)
        positive, negative = split_by_headroom(cands)
        if positive and negative:
            if self.rng.random() < self.epsilon_neg:
                return self._negative(negative)
            return self._positive(positive)
        if positive:
            return self._positive(positive)
        return self._negative(negative)

    def _positive(self, cands: list[Candidate]) -> Candidate | None:
        if len(cands) == 1:
            return cands[0]
        cands, sticky = self._gate(cands, self.tau)
        if sticky and len(cands) == 1:
            return cands[0]
        if self.strategy in (COMPOSITE_LEAST, COMPOSITE_MOST):
            return self._composite(cands, least=self.strategy == COMPOSITE_LEAST)
        alpha, beta = self.weights if self.streaming else (1.0, 0.0)
        weights = positive_weights(cands, alpha, beta, most=self.strategy == MOST)
        return draw(list(zip(cands, weights)), self.rng, argmax=self.selection == MAX)

    def _negative(self, cands: list[Candidate]) -> Candidate | None:
        if len(cands) == 1:
            return cands[0]
        cands = idle_first(cands)
        if len(cands) == 1:
            return cands[0]
        cands, sticky = self._gate(cands, self.tau)
        if sticky and len(cands) == 1:
            return cands[0]
        if self.strategy in (COMPOSITE_LEAST, COMPOSITE_MOST):
            return self._composite(cands, least=self.strategy == COMPOSITE_LEAST)
        alpha, beta = self.neg_weights if self.streaming else (1.0, 0.0)
        return draw(negative_choices(cands, alpha, beta), self.rng, argmax=self.selection == MAX)

    def _composite(self, cands: list[Candidate], *, least: bool) -> Candidate | None:
        if not cands:
            return None
        weights = composite_weights(cands, *self.composite, least=least)
        return draw(list(zip(cands, weights)), self.rng, argmax=self.selection == MAX)

    def _gate(self, cands: list[Candidate], tau: float) -> tuple[list[Candidate], bool]:
        """GIE's epsilon-greedy affinity gate: (the candidates holding >= tau of the prompt, True), or
        (all, False) when the gate is off, none qualifies, it explores, or stickiness costs too much TTFT."""
        if tau <= 0:
            return cands, False
        eligible = [c for c in cands if c.prefix >= tau]
        if not eligible:
            return cands, False
        if self.rng.random() < self.epsilon_sticky:
            return cands, False
        if self.max_penalty_ms > 0:
            best_all = min((c.prediction.ttft_ms for c in cands if c.prediction.ttft_ms > 0), default=math.inf)
            best_sticky = min((c.prediction.ttft_ms for c in eligible if c.prediction.ttft_ms > 0), default=math.inf)
            if best_all < math.inf and best_sticky < math.inf and best_sticky - best_all > self.max_penalty_ms:
                return cands, False
        return eligible, True

    # -- admission (GIE's AdmitRequest) ----------------------------------------------------------------
    def admit_cycle(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        if request.priority >= 0 or not endpoints:
            return
        headers = request.headers
        if not (slo_ms(headers, TTFT_SLO_HEADER) > 0 and (slo_ms(headers, TPOT_SLO_HEADER) > 0 or not self.streaming)):
            return  # no SLO constraint to miss
        cands = self.candidates(request, cycle, endpoints)
        if any(c.prediction.valid for c in cands):
            return
        if any(c.prediction.dispatched == 0 for c in cands):
            return
        if any(c.endpoint.metrics.kv_usage < COLD_KV_USAGE for c in cands):
            return
        if self.tau_global > 0 and any(c.prefix >= self.tau_global for c in cands):
            return
        raise RequestError(NOT_ADMITTED, "request cannot be admitted: no valid endpoint available to serve the request")
