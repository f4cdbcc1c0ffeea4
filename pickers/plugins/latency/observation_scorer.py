"""latency-observation-scorer-hub (llm-d-router PR #2371, newer than v0.10; Alpha): each endpoint's
predicted time to first token at the load it carries now, from the anchors its
latency-observer-producer-hub measured (observer.py), lowest first.

The curve through A (0, floor), B (in flight at low load, low-load TTFT), C (in flight at typical
load, typical-load TTFT), at the endpoint's requests in flight now (this EPP's count):
- B is used when C is at least `minInflightGap` (2) requests further, slower than B, B slower than
  the floor and B's in-flight count > 0; then A->B below B, B->C (extended) from it;
- otherwise the chord A->C, extended; never below the floor.

An endpoint is trusted with a floor, at least the calibration threshold of recent observations, C's
in-flight > 0 and C above the floor (the curve); with a floor only, it is predicted at the floor; cold
(no floor) it is seeded at the best prediction. Predictions are rounded to `roundTTFTStep` seconds (0:
not), then `score = (max - pred) / (max - min)`, 1 for all when equal or when every endpoint is cold.
`explorationRate` (0.1): each endpoint that is not trusted scores 1 with that probability (a probe)
and otherwise 0 when some endpoint is trusted. `ttftPercentilesProducerName` names the observer (else
the config's; with none, llm-d creates one that is never dispatched: every endpoint stays cold, which
loads here with a warning), `inFlightLoadProducerName` the inflight-load-producer (else the config's,
else one with llm-d's defaults).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.plugins.base import Plugin, PluginContext, configured_plugin
from pickers.plugins.latency.observer import LatencyObserverProducer, TTFTPercentiles
from pickers.plugins.scorer.load.token_load import InFlightLoadProducer, bound_names, find_load_producer


def predict(m: TTFTPercentiles, floor: float, inflight: float, min_gap: float) -> float:
    """llm-d's piecewise-linear TTFT at `inflight` requests (seconds)."""
    use_low = (
        m.inflight_at_typical_load - m.inflight_at_low_load >= min_gap
        and m.typical_load_ttft > m.low_load_ttft
        and m.low_load_ttft > floor
        and m.inflight_at_low_load > 0
    )
    if use_low and inflight < m.inflight_at_low_load:
        pred = floor + inflight * (m.low_load_ttft - floor) / m.inflight_at_low_load
    elif use_low:
        pred = m.low_load_ttft + (inflight - m.inflight_at_low_load) * (m.typical_load_ttft - m.low_load_ttft) / (
            m.inflight_at_typical_load - m.inflight_at_low_load
        )
    else:
        pred = floor + inflight * (m.typical_load_ttft - floor) / m.inflight_at_typical_load
    return max(pred, floor)


def _go_round(x: float) -> float:
    return math.floor(x + 0.5) if x >= 0 else -math.floor(-x + 0.5)


class LatencyObservationScorer(Plugin):
    type = "latency-observation-scorer-hub"
    category = "distribution"

    def __init__(
        self, ctx: PluginContext, name: str = "latency-observation-scorer-hub", *, exploration: float = 0.1,
        min_gap: float = 2.0, round_step: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(name)
        self.ctx = ctx
        self.rng = ctx.rng
        self.exploration, self.min_gap, self.round_step = exploration, min_gap, round_step
        self.observer_name: str | None = None
        self.load_producer_name: str | None = None
        self.observer = LatencyObserverProducer(ctx)  # llm-d's auto-created one: never dispatched
        self.load = InFlightLoadProducer(ctx.prefix_index)
        self.bound: dict[str, str] = {}
        self.bind_warnings: list[str] = []

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> LatencyObservationScorer:
        exploration = p.number("explorationRate", 0.1)
        if not 0.0 <= exploration <= 1.0:
            raise ParameterError("explorationRate", f"must be in [0, 1], got {exploration:g}")
        min_gap = p.number("minInflightGap", 2.0)
        if not (min_gap > 0 and math.isfinite(min_gap)):
            raise ParameterError("minInflightGap", f"must be > 0, got {min_gap:g}")
        step = p.number("roundTTFTStep", 0.0)
        if not (step >= 0 and math.isfinite(step)):
            raise ParameterError("roundTTFTStep", f"must be >= 0, got {step:g}")
        scorer = cls(ctx, name, exploration=exploration, min_gap=min_gap, round_step=step)
        scorer.observer_name = p.string("ttftPercentilesProducerName")
        scorer.load_producer_name = p.string("inFlightLoadProducerName")
        return scorer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        found = configured_plugin(plugins, self.observer_name, LatencyObserverProducer, "ttftPercentilesProducerName")
        self.bind_warnings = []
        if found is None:
            found = LatencyObserverProducer(self.ctx)
            self.bind_warnings.append(
                f"no {LatencyObserverProducer.type} in the config: llm-d creates one that nothing dispatches, so every "
                "endpoint reads cold and scores 1; list one under plugins and dataLayer.sources"
            )
        self.observer = found
        self.load = find_load_producer(plugins, self.load_producer_name, self.ctx.prefix_index)
        self.bound = bound_names(plugins, {"ttftPercentilesProducerName": self.observer, "inFlightLoadProducerName": self.load})

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, **self.bound}

    def predictions(self, endpoints: Sequence[Endpoint]) -> list[tuple[float, bool, bool]]:
        """(predicted TTFT seconds, trusted, has a floor) per endpoint; cold ones at 0."""
        now = self.observer.clock()
        out = []
        for ep in endpoints:
            m = self.observer.snapshot(ep.address, now)
            floor = m.floor()
            has_floor = floor > 0
            trusted = has_floor and m.recent_request_count >= m.calibration_threshold and m.inflight_at_typical_load > 0 and m.typical_load_ttft > floor
            pred = predict(m, floor, float(ep.in_flight), self.min_gap) if trusted else floor
            if self.round_step > 0:
                pred = _go_round(pred / self.round_step) * self.round_step
            out.append((pred, trusted, has_floor))
        return out

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        evals = self.predictions(endpoints)
        observed = [pred for pred, _, has_floor in evals if has_floor]
        if not observed:
            return [1.0] * len(endpoints)
        lo, hi = min(observed), max(observed)
        any_trusted = any(trusted for _, trusted, _ in evals)
        scores = []
        for pred, trusted, has_floor in evals:
            if not has_floor:
                pred = lo  # an optimistic seed for a cold endpoint
            s = 1.0 if hi == lo else (hi - pred) / (hi - lo)
            if self.exploration > 0 and not trusted:
                if self.rng.random() < self.exploration:
                    s = 1.0
                elif any_trusted:
                    s = 0.0
            scores.append(s)
        return scores

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        self.load.pre_request(request, cycle, result)
