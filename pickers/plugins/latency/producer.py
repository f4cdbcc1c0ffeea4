"""predicted-latency-producer (llm-d): each candidate's predicted TTFT and TPOT and their headroom
under the request's SLO headers, for latency-scorer, slo-headroom-tier-filter and latency-slo-admitter.

llm-d trains XGBoost models in a sidecar and asks it for predictions; here they come from the latency
model the EPP fits online (pickers.latency.model): TTFT from the prefill tokens queued ahead on the
endpoint, the request's uncached tokens there (its prefix match) and the running batch; TPOT from the
running batch. Per candidate, as llm-d's LatencyPredictionInfo (milliseconds):

    ttft_headroom = x-llm-d-slo-ttft-ms - predicted TTFT          (0 without the header: negative)
    tpot_headroom = min(x-llm-d-slo-tpot-ms, tightest TPOT SLO of the requests running there)
                    x sloBufferFactor - predicted TPOT            (streamingMode only)

valid = headroom >= 0 (strictly: predicted < SLO). Without `streamingMode`, and on endpoints whose
`endpointRoleLabel` is `prefill`, TPOT is neutralized (valid, headroom 0), as in llm-d. One difference:
llm-d's "TTFT" without streamingMode is the end-to-end latency (it trains on the last byte); here TTFT
is always the time to the first token, as the model learns TPOT from streamed responses anyway.

The uncached tokens come from the prefix match `prefixMatchInfoProducerName` names (as token-load-
scorer's producer reads it), the in-flight counts from the inflight-load-producer
`inFlightLoadProducerName` names (else the config's, else one with llm-d's defaults, as llm-d creates
one): after the pick this producer has it charge the chosen endpoints (the prefill tokens the next
prediction sees queued) and record the prompt's blocks, once per request whichever plugins ask.
Predictions are made once per cycle (cached in the cycle state) and shown by --explain-scores.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pickers.framework.columns import EndpointColumns, filled
from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import CHARS_PER_TOKEN, InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.latency.model import LatencyModel, batch_of
from pickers.plugins.base import Plugin, PluginContext, PrefixMatchSource, configured_plugin
from pickers.plugins.scorer.affinity.prefix import (
    ApproxPrefixCacheProducer,
    MatchSettings,
    bind_match,
    prefix_match,
    uncached_per_endpoint,
)
from pickers.plugins.scorer.load.token_load import InFlightLoadProducer, bound_names, find_load_producer

TTFT_SLO_HEADER = "x-llm-d-slo-ttft-ms"
TPOT_SLO_HEADER = "x-llm-d-slo-tpot-ms"
_OLD_HEADERS = {TTFT_SLO_HEADER: "x-slo-ttft-ms", TPOT_SLO_HEADER: "x-slo-tpot-ms"}  # llm-d's deprecated aliases
NO_SIDECAR = "llm-epp fits its latency model online from the responses it sees; there is no XGBoost sidecar"
# The environment llm-d's chart gives the EPP for its prediction and training sidecars.
SIDECAR_ENV = ("PREDICTION_SERVER_URL", "TRAINING_SERVER_URL")
_TPOT_SLO_COUNTED = "tpot-slo-counted"  # request.attributes key: this request's TPOT SLO is on its endpoint


def slo_ms(headers: Mapping[str, str], header: str) -> float:
    """An SLO header's milliseconds; 0 when absent or not a non-negative number (llm-d: no SLO)."""
    raw = headers.get(header) or headers.get(_OLD_HEADERS[header])
    if not raw:
        return 0.0
    try:
        v = float(raw)
    except ValueError:
        return 0.0
    return v if math.isfinite(v) and v > 0.0 else 0.0


@dataclass(slots=True, frozen=True)
class LatencyPrediction:
    """llm-d's LatencyPredictionInfo for one endpoint (milliseconds)."""

    ttft_ms: float
    tpot_ms: float
    ttft_valid: bool
    tpot_valid: bool
    ttft_headroom_ms: float
    tpot_headroom_ms: float
    dispatched: int  # requests this EPP has in flight there
    uncached_tokens: int  # the request's prompt tokens the endpoint probably has to compute

    @property
    def valid(self) -> bool:
        return self.ttft_valid and self.tpot_valid


@dataclass(slots=True)
class PredictionColumns:
    """LatencyPrediction for many endpoints at once: arrays aligned with `endpoints` (milliseconds)."""

    endpoints: Sequence[Endpoint]
    ttft_s: np.ndarray  # predicted TTFT in seconds, as the cost scorer reads it (milliseconds: `ttft_ms`)
    ttft_slo_ms: float  # the request's (0: none); validity and headroom are worked out when asked
    tpot_bound: tuple[np.ndarray, np.ndarray] | None  # streamingMode: (valid, headroom); None: neutralized
    uncached: np.ndarray  # the request's prompt tokens each endpoint probably has to compute
    position: dict[str, int]  # address -> column (the EndpointColumns')
    # what the predictions were made from, for the cost scorer in the same cycle (nothing changes an
    # endpoint's load between the cycle's producers and its picks): the model's coefficient rows, the
    # batch each endpoint runs, the prefill tokens queued on it
    coefficients: np.ndarray
    batch: np.ndarray
    queued: np.ndarray
    materialized: bool = False  # put in the cycle's predictions dict already

    @property
    def ttft_ms(self) -> np.ndarray:
        return self.ttft_s * 1000.0

    @property
    def tpot_ms(self) -> np.ndarray:
        """Predicted TPOT (ms): made when asked, as the cost scorer does not read it."""
        c = self.coefficients
        return (c[3] + c[4] * self.batch) * 1000.0

    @property
    def ttft_valid(self) -> np.ndarray:
        return self.ttft_ms < self.ttft_slo_ms

    @property
    def ttft_headroom_ms(self) -> np.ndarray:
        return self.ttft_slo_ms - self.ttft_ms

    @property
    def tpot_valid(self) -> np.ndarray:
        return np.ones(len(self.ttft_s), dtype=bool) if self.tpot_bound is None else self.tpot_bound[0]

    @property
    def tpot_headroom_ms(self) -> np.ndarray:
        return np.zeros(len(self.ttft_s)) if self.tpot_bound is None else self.tpot_bound[1]

    def uncached_of(self, endpoint: Endpoint) -> int | None:
        """This endpoint's uncached tokens; None when it is not one of `endpoints`."""
        i = self.position.get(endpoint.address)
        return None if i is None or self.endpoints[i] is not endpoint else int(self.uncached[i])


class PredictedLatencyProducer(Plugin):
    type = "predicted-latency-producer"

    def __init__(
        self,
        model: LatencyModel,
        index: ApproxPrefixIndex,
        name: str = "predicted-latency-producer",
        *,
        slo_buffer: float = 1.0,
        streaming: bool = False,
        role_label: str = "",
        predict: bool = True,
        track_tpot_slo: bool = True,
    ) -> None:
        self.name = name
        self.model = model
        self.index = index
        self.slo_buffer = slo_buffer
        self.streaming = streaming
        self.role_label = role_label
        self.predict = predict
        self.track_tpot_slo = track_tpot_slo  # streamingMode: put the request's TPOT SLO on its endpoint
        self.prefix_producer_name: str | None = None
        self.load_producer_name: str | None = None
        self.source: MatchSettings = ApproxPrefixCacheProducer()  # llm-d's defaults until bound
        self.precise: PrefixMatchSource | None = None
        self.load = InFlightLoadProducer(index)
        self.bound: dict[str, str] = {}
        self._key = f"predicted-latency/{name}"
        self._columns_key = f"predicted-latency-columns/{name}"
        self._counted = (_TPOT_SLO_COUNTED, name)

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> PredictedLatencyProducer:
        buffer = p.number("sloBufferFactor", 1.0)
        if not (buffer > 0 and math.isfinite(buffer)):
            raise ParameterError("sloBufferFactor", f"must be > 0, got {buffer:g}")  # llm-d's check
        for key in ("samplingMean", "maxDecodeTokenSamplesForPrediction"):
            p.deprecated(key, "llm-d removed mid-stream TPOT predictions and ignores it too")
        if p.given("contextTTL"):
            p.duration("contextTTL")
            p.warnings.append(
                "parameter contextTTL has no effect: llm-d expires its per-request latency contexts after it; "
                "llm-epp keeps a request's latency record on the request until its response ends"
            )
        p.refused("useEncoderCacheFeatures", f"multimodal encoder-cache features feed llm-d's trained predictor; {NO_SIDECAR}",
                  allowed=lambda v: v is False)  # fmt: skip
        p.refused("encoderCacheMatchInfoProducerName", f"encoder-cache matches feed llm-d's trained predictor; {NO_SIDECAR}")
        plugin = cls(
            ctx.latency, ctx.prefix_index, name,
            slo_buffer=buffer, streaming=p.flag("streamingMode", False),
            role_label=p.string("endpointRoleLabel", "") or "", predict=p.flag("predictInProduce", True),
        )  # fmt: skip
        plugin.prefix_producer_name = p.string("prefixMatchInfoProducerName")
        plugin.load_producer_name = p.string("inFlightLoadProducerName")
        found = [k for k in SIDECAR_ENV if os.environ.get(k)]
        if found:
            p.warnings.append(f"{', '.join(found)} set in the environment but not used: {NO_SIDECAR}")
        return plugin

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        self.precise, source = bind_match(plugins, self.prefix_producer_name)
        if self.precise is None:
            self.source = source
        self.load = find_load_producer(plugins, self.load_producer_name, self.index)
        match: object = self.precise if self.precise is not None else self.source
        self.bound = bound_names(plugins, {"prefixMatchInfoProducerName": match, "inFlightLoadProducerName": self.load})

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, **self.bound}

    # -- predictions ---------------------------------------------------------------------------
    def uncached(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[int]:
        """The request's uncached prompt tokens on each endpoint (llm-d's UncachedRequestTokens)."""
        return uncached_per_endpoint(request, cycle, self.precise, self.index, self.source, endpoints)

    def predictions(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, LatencyPrediction]:
        """Each endpoint's prediction by address, made once per cycle (empty with predictInProduce off)."""
        if self.predict:
            self._computed(request, cycle, endpoints)
        return self._materialize(cycle)

    def _materialize(self, cycle: CycleState) -> dict[str, LatencyPrediction]:
        """The cycle's prediction columns as LatencyPrediction objects by address (made when asked)."""
        found = cycle.data.get(self._key)
        if not isinstance(found, dict):
            found = cycle.data[self._key] = {}
        made = cycle.data.get(self._columns_key)
        for pc in made if isinstance(made, list) else ():
            if pc.materialized:
                continue
            pc.materialized = True
            ttft, tpot = pc.ttft_ms.tolist(), pc.tpot_ms.tolist()
            t_ok, p_ok = pc.ttft_valid.tolist(), pc.tpot_valid.tolist()
            t_room, p_room = pc.ttft_headroom_ms.tolist(), pc.tpot_headroom_ms.tolist()
            uncached = pc.uncached.tolist()
            for i, ep in enumerate(pc.endpoints):
                if ep.address not in found:
                    found[ep.address] = LatencyPrediction(ttft[i], tpot[i], t_ok[i], p_ok[i], t_room[i], p_room[i], ep.in_flight, int(uncached[i]))
        return found

    def prediction_columns(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> PredictionColumns | None:
        """The predictions of these endpoints as arrays aligned with them, made once per cycle for the
        cycle's candidates; None with predictInProduce off."""
        if not self.predict:
            return None
        columns = cycle.columns(endpoints)
        for pc in self._computed(request, cycle, endpoints):
            if pc.endpoints is columns.endpoints:
                return pc
        raise AssertionError("unreachable: _computed covers the endpoints asked for")

    def _computed(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[PredictionColumns]:
        """The prediction columns of this cycle, with those of `endpoints` made if they were not."""
        made = cycle.data.get(self._columns_key)
        if not isinstance(made, list):
            made = cycle.data[self._columns_key] = []
        columns = cycle.columns(endpoints)
        if all(pc.endpoints is not columns.endpoints for pc in made):
            made.append(self._predict(request, cycle, columns))
        return made

    def _predict(self, request: InferenceRequest, cycle: CycleState, columns: EndpointColumns) -> PredictionColumns:
        endpoints = columns.endpoints
        headers = request.headers
        ttft_slo, tpot_slo = slo_ms(headers, TTFT_SLO_HEADER), slo_ms(headers, TPOT_SLO_HEADER)
        c = self.model.coefficient_columns(endpoints)
        u = self.uncached_columns(request, cycle, columns)
        batch = np.maximum(columns.running(), columns.in_flight())  # batch_of
        queued = columns.in_flight_prefill_tokens()
        ttft_s = c[0] + c[1] * (queued + u) + c[2] * batch
        n = columns.size
        bound: tuple[np.ndarray, np.ndarray] | None = None  # neutralized, as llm-d does without streaming
        if self.streaming:
            buffer, role_label = self.slo_buffer, self.role_label
            tpot_ok, tpot_room = np.ones(n, dtype=bool), np.zeros(n)
            bound = (tpot_ok, tpot_room)
            tpot = (c[3] + c[4] * batch) * 1000.0
            for i, (ep, t) in enumerate(zip(endpoints, tpot.tolist())):
                if role_label and ep.labels.get(role_label) == "prefill":
                    continue  # neutralized on prefill endpoints, as llm-d does
                limit = tpot_slo * buffer
                tightest = ep.latency.min_tpot_slo
                if tightest > 0.0 and tightest * buffer < limit:
                    limit = tightest * buffer
                tpot_ok[i], tpot_room[i] = t < limit, limit - t
        return PredictionColumns(endpoints, ttft_s, ttft_slo, bound, u, columns.position, c, batch, queued)

    def uncached_columns(self, request: InferenceRequest, cycle: CycleState, columns: EndpointColumns) -> np.ndarray:
        """`uncached` as an array aligned with the columns' endpoints."""
        if self.precise is not None:
            return np.asarray(self.uncached(request, cycle, columns.endpoints), dtype=np.float64)
        src = self.source
        pm = prefix_match(request, cycle, self.index, src.block_chars, src.max_blocks)
        bt = src.block_chars // CHARS_PER_TOKEN
        indexed = len(pm.hashes) * bt  # uncached_tokens over the matched blocks' column
        whole = indexed + max(0, request.prompt_tokens - indexed)
        if not pm.matched:
            return filled(columns.size, float(whole))
        return whole - columns.scatter(pm.matched) * bt  # a match is at most the indexed blocks

    def produce(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        if self.predict:  # as columns; the LatencyPrediction objects are made when a plugin asks for them
            self._computed(request, cycle, endpoints)

    def explain(self, cycle: CycleState) -> dict[str, dict[str, float]]:
        found = self._materialize(cycle)
        if not found:
            return {}
        return {
            f"{self.name}/ttft_ms": {a: round(p.ttft_ms, 1) for a, p in found.items()},
            f"{self.name}/tpot_ms": {a: round(p.tpot_ms, 2) for a, p in found.items()},
        }

    # -- the request's life ----------------------------------------------------------------------
    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        """The chosen endpoints' uncached tokens for request control's latency record, the in-flight
        charges (the bound inflight-load-producer's) and, in streaming mode, the request's TPOT SLO on
        its endpoint."""
        if not result.endpoints:
            return
        primary = result.endpoints[0]
        chosen = [primary]
        if result.profile_results is not None:
            chosen += [eps[0] for eps in result.profile_results.values() if eps and all(eps[0] is not c for c in chosen)]
        known: dict[str, int] = {}  # what this cycle's predictions found
        made = cycle.data.get(self._columns_key)
        for pc in made if isinstance(made, list) else ():
            for ep in chosen:
                u = pc.uncached_of(ep)
                if u is not None:
                    known.setdefault(ep.address, u)
        uncached = result.uncached if result.uncached is not None else {}
        todo = [ep for ep in chosen if ep.address not in uncached and ep.address not in known]
        for ep, u in zip(todo, self.uncached(request, cycle, todo) if todo else ()):
            uncached[ep.address] = u
        for ep in chosen:
            if ep.address not in uncached:
                uncached[ep.address] = known[ep.address]
        result.uncached = uncached
        self.load.pre_request(request, cycle, result)
        if self.streaming and self.track_tpot_slo and self._counted not in request.attributes:
            slo = slo_ms(request.headers, TPOT_SLO_HEADER)
            if slo > 0.0:
                primary.latency.add_tpot_slo(slo)
                request.attributes[self._counted] = repr(slo)

    def response_complete(
        self, request: InferenceRequest, endpoint: Endpoint, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        counted = request.attributes.pop(self._counted, None)
        if counted is not None:
            endpoint.latency.remove_tpot_slo(float(counted))


def find_latency_producer(plugins: Mapping[str, object], name: str | None, ctx: PluginContext) -> PredictedLatencyProducer:
    """The predicted-latency-producer `latencyPredictionInfoProducerName` names, else the config's one
    named like its type or its only one, else one with llm-d's defaults (llm-d creates it when a
    config that needs it lists none), bound to the config's prefix and load producers."""
    found = configured_plugin(plugins, name, PredictedLatencyProducer, "latencyPredictionInfoProducerName")
    if found is not None:
        return found
    implied = PredictedLatencyProducer(ctx.latency, ctx.prefix_index)
    implied.bind_config(plugins, {}, None)
    return implied


class LatencyConsumer(Plugin):
    """What the latency plugins share: the producer they read (`latencyPredictionInfoProducerName`),
    bound once names are resolved. A producer the config does not list is made with llm-d's defaults
    (llm-d creates one too) and told of the request's pick and end through this plugin."""

    def __init__(self, ctx: PluginContext, name: str | None = None) -> None:
        super().__init__(name)
        self.ctx = ctx
        self.producer_name: str | None = None
        self.producer: PredictedLatencyProducer = PredictedLatencyProducer(ctx.latency, ctx.prefix_index)
        self.implied = True  # the producer is not one of the config's plugins
        self.bound: dict[str, str] = {}

    def read_producer_name(self, p: Params) -> None:
        self.producer_name = p.string("latencyPredictionInfoProducerName")

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        self.producer = find_latency_producer(plugins, self.producer_name, self.ctx)
        self.implied = all(q is not self.producer for q in plugins.values())
        self.bound = bound_names(plugins, {"latencyPredictionInfoProducerName": self.producer})

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, **self.bound}

    def predictions(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, LatencyPrediction]:
        return self.producer.predictions(request, cycle, endpoints)

    def prediction_columns(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> PredictionColumns | None:
        return self.producer.prediction_columns(request, cycle, endpoints)

    def explain(self, cycle: CycleState) -> dict[str, dict[str, float]]:
        return self.producer.explain(cycle) if self.implied else {}

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        if self.implied:
            self.producer.pre_request(request, cycle, result)

    def response_complete(
        self, request: InferenceRequest, endpoint: Endpoint, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        if self.implied:
            self.producer.response_complete(request, endpoint, prompt_tokens, completion_tokens)
