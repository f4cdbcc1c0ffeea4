"""slo-request-tracker and slo-scorer: the SLO-aware routing of GIE's `slo-prediction-experimental`
branch (never in a GIE or llm-d release; llm-d's first latency guides ran an image built from it).
With slo-aware-profile-handler (profile/slo_aware.py) their configs load here unchanged, on
llm-epp's online latency model instead of the branch's XGBoost sidecars. Neither takes parameters;
slo-scorer reads the environment variables the branch's EPP read at start-up.

slo-request-tracker: the books of a request's life the scorer reads: after the pick the request's TPOT
SLO (`x-slo-tpot-ms`) is put on its endpoint until the response ends, so the next request's TPOT is
checked against the tightest SLO running there. (The branch also fed its sidecars' training here;
request control feeds llm-epp's model for every request anyway.) Listed in a profile, as the branch's
configs list it, it does the same.

slo-scorer, for a request with `x-prediction-based-scheduling: true` only (no opinion otherwise):
predicted TTFT and TPOT per candidate (ms), `ttft_headroom = x-slo-ttft-ms - TTFT`,
`tpot_headroom = min(x-slo-tpot-ms, tightest running TPOT SLO) x SLO_BUFFER_FACTOR - TPOT` (no header:
SLO 0); candidates with both headrooms > 0 are the positive tier. It chooses ONE endpoint and scores
it 1: from the positive tier (the negative one with probability 0.01 when both exist), by blended
headroom (`HEADROOM_TTFT_WEIGHT` 0.8, `HEADROOM_TPOT_WEIGHT` 0.2, `HEADROOM_SELECTION_STRATEGY` `least`
or `most`); from the negative tier idle endpoints first, then by GIE's hierarchy of deficits
(`NEG_HEADROOM_TTFT_WEIGHT` 0.8, `NEG_HEADROOM_TPOT_WEIGHT` 0.2). A sheddable request (priority < 0)
for which no candidate meets its SLOs and every one has requests in flight is dropped (429, the
branch's "system saturated, sheddable request dropped"). An SLO header that is not a number is a 400,
as the branch's director answered.

An environment variable that does not parse (or a negative weight) is ignored as the branch ignored it,
with a warning naming it. Differences: the running requests are those this EPP has in flight on the
endpoint (the branch counted the tracker's queue, so without a tracker it saw none); a running request
without a TPOT SLO does not hide the others' (the branch's queue put its 0 first).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import BAD_REQUEST, SATURATED, RequestError, shown
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.latency.producer import TPOT_SLO_HEADER, LatencyConsumer, PredictedLatencyProducer, slo_ms
from pickers.plugins.latency.selection import Candidate, draw, idle_first, negative_choices, positive_weights, split_by_headroom

PREDICTION_HEADER = "x-prediction-based-scheduling"
BRANCH_TTFT_HEADER, BRANCH_TPOT_HEADER = "x-slo-ttft-ms", "x-slo-tpot-ms"
_TRACKED = "slo-request-tracker"  # request.attributes key: the TPOT SLO this request put on its endpoint


def parse_bool(value: str) -> bool | None:
    """Go's strconv.ParseBool; None when it is not a bool."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def prediction_based(request: InferenceRequest) -> bool:
    """The branch's `x-prediction-based-scheduling` header: absent false, not a bool a 400."""
    raw = request.headers.get(PREDICTION_HEADER)
    if raw is None:
        return False
    on = parse_bool(raw)
    if on is None:
        raise RequestError(BAD_REQUEST, f"{PREDICTION_HEADER} must be a bool, got {shown(raw)}")
    return on


def check_slo_headers(request: InferenceRequest) -> None:
    """The branch's director refused an SLO header that is not a float (Go's strconv.ParseFloat)."""
    for header in (BRANCH_TTFT_HEADER, BRANCH_TPOT_HEADER):
        raw = request.headers.get(header)
        if raw is not None and not _go_float(raw):
            raise RequestError(BAD_REQUEST, f"{header} must be a float, got {shown(raw)}")


def _go_float(raw: str) -> bool:
    if not raw or raw != raw.strip() or "_" in raw:  # Python's float() takes these, Go's ParseFloat does not
        return False
    try:
        float(raw)
    except ValueError:
        return False
    return True


class SloRequestTracker(Plugin):
    type = "slo-request-tracker"

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        if not result.endpoints or _TRACKED in request.attributes:
            return
        slo = slo_ms(request.headers, TPOT_SLO_HEADER)
        if slo > 0.0:
            result.endpoints[0].latency.add_tpot_slo(slo)
            request.attributes[_TRACKED] = repr(slo)

    def response_complete(
        self, request: InferenceRequest, endpoint: Endpoint, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        slo = request.attributes.pop(_TRACKED, None)
        if slo is not None:
            endpoint.latency.remove_tpot_slo(float(slo))


def _env_number(name: str, default: float, warnings: list[str], *, non_negative: bool) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if math.isnan(v) or math.isinf(v) or (non_negative and v < 0):
        warnings.append(f"environment variable {name}={shown(raw)} is ignored (as the GIE branch ignored it); using {default:g}")
        return default
    return v


class SloScorer(LatencyConsumer):
    type = "slo-scorer"
    category = "distribution"

    def __init__(self, ctx: PluginContext, name: str = "slo-scorer", **settings: Any) -> None:
        super().__init__(ctx, name)
        self.rng = ctx.rng
        self.weights: tuple[float, float] = settings.get("weights", (0.8, 0.2))
        self.neg_weights: tuple[float, float] = settings.get("neg_weights", (0.8, 0.2))
        self.most: bool = settings.get("most", False)
        self.in_profile = False
        self.bind_warnings: list[str] = []  # for the loader
        # TPOT always checked (the branch had no streamingMode); the tracker keeps the running SLOs
        self.producer = PredictedLatencyProducer(
            ctx.latency, ctx.prefix_index, name, slo_buffer=settings.get("slo_buffer", 1.0), streaming=True, track_tpot_slo=False
        )

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> SloScorer:
        w = p.warnings
        strategy = os.environ.get("HEADROOM_SELECTION_STRATEGY")
        most = False
        if strategy is not None:
            if strategy.lower() in ("least", "most"):
                most = strategy.lower() == "most"
            else:
                w.append(f"environment variable HEADROOM_SELECTION_STRATEGY={shown(strategy)} is ignored (as the GIE branch "
                         "ignored it); using least")  # fmt: skip
        scorer = cls(
            ctx, name, most=most,
            slo_buffer=_env_number("SLO_BUFFER_FACTOR", 1.0, w, non_negative=False),
            weights=(_env_number("HEADROOM_TTFT_WEIGHT", 0.8, w, non_negative=True),
                     _env_number("HEADROOM_TPOT_WEIGHT", 0.2, w, non_negative=True)),
            neg_weights=(_env_number("NEG_HEADROOM_TTFT_WEIGHT", 0.8, w, non_negative=True),
                         _env_number("NEG_HEADROOM_TPOT_WEIGHT", 0.2, w, non_negative=True)),
        )  # fmt: skip
        p.warnings.append(
            f"plugin type {cls.type} is from GIE's unreleased slo-prediction-experimental branch; llm-epp runs its "
            "selection on its own latency model (GIE's released stack is predicted-latency-producer + latency-scorer)"
        )
        return scorer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        self.producer.bind_config(plugins, profiles, handler)
        self.implied = True
        self.in_profile = any(ws.scorer is self for prof in profiles.values() for ws in getattr(prof, "scorers", ()))
        self.bind_warnings = []
        if self.in_profile and not any(isinstance(q, SloRequestTracker) for q in plugins.values()):
            self.bind_warnings = [
                (
                    f"no {SloRequestTracker.type} in the config: running requests' TPOT SLOs are not tracked, so TPOT is "
                    "checked against the request's own SLO only (in the GIE branch the scorer read the tracker's queue)"
                )
            ]

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return given

    def candidates(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[Candidate]:
        found = self.predictions(request, cycle, endpoints)
        return [Candidate(ep, found[ep.address]) for ep in endpoints]

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        if not endpoints or not prediction_based(request):
            return [0.0] * len(endpoints)
        positive, negative = split_by_headroom(self.candidates(request, cycle, endpoints), strict=True)
        chosen: Candidate | None
        if positive and negative:
            chosen = self._negative(negative) if self.rng.random() < 0.01 else self._positive(positive)
        elif positive:
            chosen = self._positive(positive)
        else:
            chosen = self._negative(negative)
        return [1.0 if chosen is not None and ep is chosen.endpoint else 0.0 for ep in endpoints]

    def _positive(self, cands: list[Candidate]) -> Candidate | None:
        if len(cands) == 1:
            return cands[0]
        return draw(list(zip(cands, positive_weights(cands, *self.weights, most=self.most))), self.rng)

    def _negative(self, cands: list[Candidate]) -> Candidate | None:
        cands = idle_first(cands)
        if len(cands) == 1:
            return cands[0]
        return draw(negative_choices(cands, *self.neg_weights), self.rng)

    def admit_cycle(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        """The branch's director: SLO headers must be numbers; a sheddable request no candidate is predicted
        to serve within its SLOs, on a pool where every candidate is busy, is dropped."""
        check_slo_headers(request)
        if not self.in_profile or request.priority >= 0 or not endpoints or not prediction_based(request):
            return
        cands = self.candidates(request, cycle, endpoints)
        if any(c.prediction.valid for c in cands) or any(c.prediction.dispatched == 0 for c in cands):
            return
        raise RequestError(SATURATED, "system saturated, sheddable request dropped")
