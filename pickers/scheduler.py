"""One scheduling cycle: filter, score (sum of weight * clamp(score, 0, 1)), pick.

A profile is filters + weighted scorers + one picker. Plugins that also implement PreRequest or
ResponseComplete are told about the pick and the finished response.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from extproc.datastore import Datastore, Endpoint
from extproc.errors import ALL_FILTERED, NO_ENDPOINTS, RequestError
from extproc.inference_request import InferenceRequest
from pickers.types import CycleState, Filter, Picker, PreRequest, ResponseComplete, SchedulingResult, ScoredEndpoint, Scorer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float = 1.0


@dataclass(slots=True)
class SchedulingProfile:
    name: str
    picker: Picker
    scorers: list[WeightedScorer] = field(default_factory=list)
    filters: list[Filter] = field(default_factory=list)

    def plugins(self) -> list[object]:
        return [*self.filters, *(w.scorer for w in self.scorers), self.picker]


class Scheduler:
    def __init__(self, profile: SchedulingProfile, datastore: Datastore, *, explain: bool = False) -> None:
        self.profile = profile
        self.datastore = datastore
        self.explain = explain
        plugins = profile.plugins()
        self._pre_request = [p for p in plugins if isinstance(p, PreRequest)]
        self._complete = [p for p in plugins if isinstance(p, ResponseComplete)]

    def schedule(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        """Choose endpoints for the request; raises RequestError (503/429) when none can serve."""
        if not candidates:
            raise RequestError(NO_ENDPOINTS, "no endpoints available to serve the request")
        candidates = self._drop_unreachable(candidates)
        cycle = CycleState()
        profile = self.profile
        for f in profile.filters:
            candidates = f.filter(request, cycle, candidates)
            if not candidates:
                raise RequestError(ALL_FILTERED, f"every endpoint was filtered out by {f.name}")
        totals = [0.0] * len(candidates)
        explained: dict[str, dict[str, float]] | None = {} if self.explain else None
        for ws in profile.scorers:
            scores = ws.scorer.score(request, cycle, candidates)
            w = ws.weight
            for i, s in enumerate(scores):
                totals[i] += w * (0.0 if s < 0.0 else 1.0 if s > 1.0 else s)
            if explained is not None:
                explained[ws.scorer.name] = {ep.address: float(s) for ep, s in zip(candidates, scores)}
        scored = [ScoredEndpoint(ep, t) for ep, t in zip(candidates, totals)]
        chosen = profile.picker.pick(request, scored)
        if not chosen:
            raise RequestError(NO_ENDPOINTS, "the picker chose no endpoint")
        result = SchedulingResult(chosen, profile.name, explained)
        if explained is not None:
            explained["total"] = {s.endpoint.address: s.score for s in scored}
            log.debug("request %s -> %s scores=%s", request.request_id, chosen[0].address, explained)
        for p in self._pre_request:
            p.pre_request(request, cycle, result)
        return result

    def response_complete(
        self, request: InferenceRequest, endpoint: Endpoint, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        for p in self._complete:
            p.response_complete(request, endpoint, prompt_tokens, completion_tokens)

    def _drop_unreachable(self, candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
        # An endpoint whose scrapes fail and whose metrics went stale is probably down: skip it
        # while any other endpoint remains, so one dead pod does not eat a share of the traffic.
        ds = self.datastore
        if not any(ep.scrape_error is not None for ep in candidates):
            return candidates
        healthy = [ep for ep in candidates if ep.scrape_error is None or not ds.is_stale(ep)]
        return healthy or candidates
