"""latency-scorer (llm-d): score endpoints by the predicted latency headroom under the request's SLOs
(predicted-latency-producer's `LatencyPrediction`s), as llm-d scores them:

- with both signs present, only endpoints meeting both SLOs (headroom >= 0) are scored, the rest 0;
- all negative: idle endpoints (nothing in flight from this EPP) first; else the least severe bucket
  of (only TPOT missed, only TTFT missed, both missed);
- within the scored set, |headroom| is min-max normalized per dimension and blended
  `ttftWeight * nTTFT + tpotWeight * nTPOT` (weights normalized; a dimension with no spread gives all
  weight to the other), then `least` (default) scores 1 - blend, `most` the blend, in steps of 1/100
  from 0.01; negative headroom always uses `least` (closest to meeting the SLO);
- no predictions at all (predictInProduce off): llm-d's composite fallback, `compositeKVWeight *
  free KV + compositeQueueWeight * (max queue - queue) / max queue + compositePrefixWeight * prefix
  match share`, weights normalized.

Without SLO headers every headroom is 0 - predicted, so the scorer prefers the lowest predicted latency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import PluginContext, PrefixMatchSource
from pickers.plugins.latency.producer import LatencyConsumer, LatencyPrediction
from pickers.plugins.scorer.affinity.prefix import ApproxPrefixCacheProducer, MatchSettings, bind_match, prefix_match
from pickers.plugins.scorer.load.token_load import bound_names

LEAST, MOST = "least", "most"
_W_MAX = 100
_EPS = 1e-9


def _weight(p: Params, key: str, default: float) -> float:
    v = p.number(key, default, minimum=0.0)
    if v != v or v == float("inf"):
        raise ParameterError(key, f"expected a finite number >= 0, got {v}")
    return v


class LatencyScorer(LatencyConsumer):
    type = "latency-scorer"
    category = "distribution"  # llm-d's Balance

    def __init__(
        self,
        ctx: PluginContext,
        name: str = "latency-scorer",
        *,
        ttft_weight: float = 0.8,
        tpot_weight: float = 0.2,
        strategy: str = LEAST,
        kv_weight: float = 1.0,
        queue_weight: float = 1.0,
        prefix_weight: float = 1.0,
    ) -> None:
        super().__init__(ctx, name)
        self.ttft_weight, self.tpot_weight, self.strategy = ttft_weight, tpot_weight, strategy
        self.kv_weight, self.queue_weight, self.prefix_weight = kv_weight, queue_weight, prefix_weight
        self.prefix_producer_name: str | None = None
        self.source: MatchSettings = ApproxPrefixCacheProducer()
        self.precise: PrefixMatchSource | None = None

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> LatencyScorer:
        scorer = cls(
            ctx, name,
            ttft_weight=_weight(p, "ttftWeight", 0.8), tpot_weight=_weight(p, "tpotWeight", 0.2),
            strategy=p.choice("headroomSelectionStrategy", LEAST, (LEAST, MOST)),
            kv_weight=_weight(p, "compositeKVWeight", 1.0), queue_weight=_weight(p, "compositeQueueWeight", 1.0),
            prefix_weight=_weight(p, "compositePrefixWeight", 1.0),
        )  # fmt: skip
        scorer.read_producer_name(p)
        scorer.prefix_producer_name = p.string("prefixMatchInfoProducerName")
        return scorer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        super().bind_config(plugins, profiles, handler)
        self.precise, source = bind_match(plugins, self.prefix_producer_name)
        if self.precise is None:
            self.source = source
        match: object = self.precise if self.precise is not None else self.source
        self.bound.update(bound_names(plugins, {"prefixMatchInfoProducerName": match}))

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        found = self.predictions(request, cycle, endpoints)
        preds = [found.get(ep.address) for ep in endpoints]
        if not any(p is not None for p in preds):
            return self.composite(request, cycle, endpoints)
        scores = [0.0] * len(endpoints)
        positive = [i for i, p in enumerate(preds) if p is None or (p.ttft_headroom_ms >= 0 and p.tpot_headroom_ms >= 0)]
        if positive:
            self._score_bucket(positive, preds, scores, force_least=False)
            return scores
        idle = [i for i, p in enumerate(preds) if p is not None and p.dispatched == 0]
        if idle:
            self._score_bucket(idle, preds, scores, force_least=True)
            return scores
        tpot_only, ttft_only, both = [], [], []
        for i, p in enumerate(preds):
            assert p is not None  # every one is negative, so predicted
            ttft_neg, tpot_neg = p.ttft_headroom_ms < 0, p.tpot_headroom_ms < 0
            (both if ttft_neg and tpot_neg else ttft_only if ttft_neg else tpot_only if tpot_neg else both).append(i)
        bucket = tpot_only or ttft_only or both
        self._score_bucket(bucket, preds, scores, force_least=True)
        return scores

    def _score_bucket(self, bucket: list[int], preds: Sequence[LatencyPrediction | None], scores: list[float], *, force_least: bool) -> None:
        total = self.ttft_weight + self.tpot_weight
        alpha, beta = (self.ttft_weight / total, self.tpot_weight / total) if total > 0 else (1.0, 0.0)
        ttft = [abs(p.ttft_headroom_ms) if (p := preds[i]) is not None else 0.0 for i in bucket]
        tpot = [abs(p.tpot_headroom_ms) if (p := preds[i]) is not None else 0.0 for i in bucket]
        lo_t, lo_p = min(ttft), min(tpot)
        range_t, range_p = max(ttft) - lo_t, max(tpot) - lo_p
        if range_t <= _EPS < range_p:
            alpha, beta = 0.0, 1.0
        elif range_p <= _EPS < range_t:
            alpha, beta = 1.0, 0.0
        most = self.strategy == MOST and not force_least
        for i, h_t, h_p in zip(bucket, ttft, tpot):
            n_t = (h_t - lo_t) / range_t if range_t > _EPS else 0.5
            n_p = (h_p - lo_p) / range_p if range_p > _EPS else 0.5
            combined = alpha * n_t + beta * n_p
            w = int((combined if most else 1.0 - combined) * _W_MAX) + 1  # llm-d's steps: 1..101
            scores[i] = w / _W_MAX if w < _W_MAX else 1.0  # its 1.01 is clamped by the scheduler anyway

    def composite(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        """llm-d's fallback without predictions: free KV, relative queue and prefix match, blended."""
        wkv, wq, wpref = self.kv_weight, self.queue_weight, self.prefix_weight
        total = wkv + wq + wpref
        if total <= 0:
            wkv, wq, wpref, total = 1.0, 0.0, 0.0, 1.0
        wkv, wq, wpref = wkv / total, wq / total, wpref / total
        max_q = max((ep.metrics.waiting for ep in endpoints), default=0)
        shares = self._prefix_shares(request, cycle, endpoints) if wpref else [0.0] * len(endpoints)
        out = []
        for ep, share in zip(endpoints, shares):
            rel_queue = (max_q - ep.metrics.waiting) / max_q if max_q > 0 else 1.0
            composite = wkv * (1.0 - ep.metrics.kv_usage) + wq * rel_queue + wpref * share
            out.append(round(_W_MAX * composite) / _W_MAX)
        return out

    def _prefix_shares(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        if self.precise is not None:
            m = self.precise.prefix_matches(request, cycle, endpoints)
            return [held / total if total else 0.0 for held, total, _ in (m.get(ep.address, (0, 0, 0)) for ep in endpoints)]
        s = self.source
        pm = prefix_match(request, cycle, self.ctx.prefix_index, s.block_chars, s.max_blocks)
        total = len(pm.hashes)
        return [pm.matched.get(ep.address, 0) / total if total else 0.0 for ep in endpoints]
