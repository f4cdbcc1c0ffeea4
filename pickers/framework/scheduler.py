"""One scheduling cycle: filter, score (sum of weight * clamp(score, 0, 1)), pick.

A profile is filters + weighted scorers + one picker. With one profile the scheduler runs it inline;
with several, a ProfileHandler picks which run (sharing one cycle state) and combines their results
(P/D: decode, then maybe prefill). Plugins that also implement PreRequest, ResponseStarted or
ResponseComplete are told about the combined result, the response's first chunk and the finished
response, once per request whatever profiles they are in;
ResponseReporters (request-attribute-reporter) compute the dynamic metadata of a response's end.
Screeners (disaggregatedset-rollout-screener) run first and narrow the candidates of every profile.
Data producers (token-producer, session-id-producer, ...) run next, in config order, over the
candidates; they are told about the result and the response the same way. Async data producers
(burst-prefix-cache-producer) are not run here: the Director awaits them before `schedule`. Cycle
admitters (latency-slo-admitter) run after the data producers, before any profile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from pickers.framework.columns import EndpointColumns, failing_in
from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import ALL_FILTERED, NO_ENDPOINTS, RequestError
from pickers.framework.request import InferenceRequest
from pickers.framework.types import (
    SINGLE_PROFILE_HANDLER,
    Admitter,
    ArrayPicker,
    AsyncDataProducer,
    CycleAdmitter,
    CycleState,
    DataProducer,
    DurationObserver,
    Explainer,
    PluginTimer,
    PreRequest,
    ProfileHandler,
    ProfileOutcome,
    ResponseComplete,
    ResponseReporter,
    ResponseStarted,
    SchedulingProfile,
    SchedulingResult,
    ScoredEndpoint,
    Screener,
)

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        profiles: SchedulingProfile | Sequence[SchedulingProfile],
        *,
        metrics_stale_after: float = 2.0,
        handler: ProfileHandler | None = None,
        explain: bool = False,
        timer: PluginTimer | None = None,
        producers: Sequence[object] = (),
    ) -> None:
        """One profile (handler None or single-profile-handler) or several run by `handler`; with
        `timer`, each filter, scorer and picker call is timed (one observer per plugin). `producers`:
        the config's plugins outside the profiles (data producers), in config order."""
        all_profiles = (profiles,) if isinstance(profiles, SchedulingProfile) else tuple(profiles)
        if not all_profiles:
            raise ValueError("a scheduler needs at least one profile")
        self.profiles = {p.name: p for p in all_profiles}
        self.profile = all_profiles[0]
        self.handler = None if handler is None or handler.type == SINGLE_PROFILE_HANDLER else handler
        if self.handler is None and len(all_profiles) != 1:
            raise ValueError(f"{len(all_profiles)} profiles need a profile handler")
        self.metrics_stale_after = metrics_stale_after
        self.explain = explain
        plugins = list({id(p): p for prof in all_profiles for p in prof.plugins()}.values())
        self._screeners = [p for p in producers if isinstance(p, Screener)]
        self._producers = [p for p in producers if isinstance(p, DataProducer)]
        # awaited by the Director before `schedule` (burst-prefix-cache-producer's window); empty for most configs
        self.async_producers: tuple[AsyncDataProducer, ...] = tuple(p for p in producers if isinstance(p, AsyncDataProducer))
        plugins += [p for p in producers if all(p is not q for q in plugins)]
        self.plugins: tuple[object, ...] = tuple(plugins)  # every plugin of the cycle, producers included
        self._pre_request = [p for p in plugins if isinstance(p, PreRequest)]
        self._complete = [p for p in plugins if isinstance(p, ResponseComplete)]
        self._started = [p for p in plugins if isinstance(p, ResponseStarted)]
        self.reporters: tuple[ResponseReporter, ...] = tuple(p for p in plugins if isinstance(p, ResponseReporter))
        self._admitters = [p for p in plugins if isinstance(p, Admitter)]
        self._cycle_admitters = [p for p in plugins if isinstance(p, CycleAdmitter)]
        self._explainers = [p for p in plugins if isinstance(p, Explainer)]
        # pickers that take the totals as an array (no ScoredEndpoint per candidate)
        self._array_pickers = {id(p.picker) for p in all_profiles if isinstance(p.picker, ArrayPicker)}
        # the columns of the last candidates tuple (the datastore's: the same object until membership changes)
        self._columns: EndpointColumns | None = None
        # id(plugin) -> its observer; empty when not timing, so the loop pays one truth test per call
        self._timers: dict[int, DurationObserver] = {}
        if timer is not None:
            for prof in all_profiles:
                for point, plugin in (*(("Filter", f) for f in prof.filters),
                                      *(("Scorer", w.scorer) for w in prof.scorers), ("Picker", prof.picker)):
                    if id(plugin) not in self._timers:
                        self._timers[id(plugin)] = timer(point, plugin)
            for screener in self._screeners:
                self._timers[id(screener)] = timer("Screener", screener)

    def admit(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> None:
        """The config's admitters, in config order; the first to refuse raises its RequestError."""
        for admitter in self._admitters:
            admitter.admit_request(request, candidates)

    def schedule(
        self, request: InferenceRequest, candidates: Sequence[Endpoint], pool: Sequence[Endpoint] | None = None
    ) -> SchedulingResult:
        """Choose endpoints for the request among `candidates` (the pool, or the part of it the proxy's
        subset hint names; `pool` is the whole of it, default `candidates`); raises RequestError
        (503/429) when none can serve."""
        if not candidates:
            raise RequestError(NO_ENDPOINTS, "no endpoints available to serve the request")
        if self._screeners:
            candidates = self._screen(request, candidates, candidates if pool is None else pool)
        candidates = self._drop_unreachable(candidates)
        columns = self._columns
        if columns is None or columns.endpoints is not candidates:
            columns = self._columns = EndpointColumns(candidates)
        cycle = CycleState(endpoint_columns=columns)
        for producer in self._producers:
            producer.produce(request, cycle, candidates)
        for admitter in self._cycle_admitters:
            admitter.admit_cycle(request, cycle, candidates)
        explained: dict[str, dict[str, float]] | None = {} if self.explain else None
        if self.handler is not None:
            result = self._schedule_profiles(self.handler, request, cycle, candidates, explained)
        else:
            profile = self.profile
            result = SchedulingResult(self._run_profile(profile, request, cycle, candidates, explained), profile.name, explained)
        if explained is not None:
            for explainer in self._explainers:
                for key, values in explainer.explain(cycle).items():
                    explained[key] = dict(values)
        for p in self._pre_request:
            p.pre_request(request, cycle, result)
        return result

    def _screen(self, request: InferenceRequest, candidates: Sequence[Endpoint], pool: Sequence[Endpoint]) -> Sequence[Endpoint]:
        timers = self._timers
        clock = time.perf_counter
        kept: Sequence[Endpoint] | None = None
        for screener in self._screeners:
            t = clock() if timers else 0.0
            mine = screener.screen(request, candidates, pool)
            if timers:
                timers[id(screener)].observe(clock() - t)
            if kept is None:
                kept = mine
            else:  # what every screener kept, in the candidates' order
                allowed = {id(ep) for ep in mine}
                kept = [ep for ep in kept if id(ep) in allowed]
        if not kept:
            raise RequestError(NO_ENDPOINTS, "screeners eliminated all endpoint candidates")
        return kept

    def _run_profile(
        self,
        profile: SchedulingProfile,
        request: InferenceRequest,
        cycle: CycleState,
        candidates: Sequence[Endpoint],
        explained: dict[str, dict[str, float]] | None,
    ) -> list[Endpoint]:
        timers = self._timers
        clock = time.perf_counter
        for f in profile.filters:
            t = clock() if timers else 0.0
            candidates = f.filter(request, cycle, candidates)
            if timers:
                timers[id(f)].observe(clock() - t)
            if not candidates:
                raise RequestError(ALL_FILTERED, f"every endpoint was filtered out by {f.name}")
        totals = np.zeros(len(candidates))
        for ws in profile.scorers:
            t = clock() if timers else 0.0
            scores = ws.scorer.score(request, cycle, candidates)
            if timers:
                timers[id(ws.scorer)].observe(clock() - t)
            column = np.asarray(scores, dtype=np.float64)
            if column.shape != totals.shape:
                raise ValueError(f"scorer {ws.scorer.name} returned {column.size} scores for {totals.size} endpoints")
            # clamped to [0, 1] (NaN stays NaN, as a comparison-based clamp leaves it), then weighted
            totals += ws.weight * np.minimum(np.maximum(column, 0.0), 1.0)
            if explained is not None:
                explained[self._explain_key(profile, ws.scorer.name)] = {ep.address: float(s) for ep, s in zip(candidates, column.tolist())}
        picker = profile.picker
        t = clock() if timers else 0.0
        chosen = picker.pick_totals(request, candidates, totals) if id(picker) in self._array_pickers else None  # type: ignore[attr-defined]
        if chosen is None:
            chosen = picker.pick(request, [ScoredEndpoint(ep, s) for ep, s in zip(candidates, totals.tolist())])
        if timers:
            timers[id(picker)].observe(clock() - t)
        if not chosen:
            raise RequestError(NO_ENDPOINTS, "the picker chose no endpoint")
        if explained is not None:
            explained[self._explain_key(profile, "total")] = {ep.address: s for ep, s in zip(candidates, totals.tolist())}
            log.debug("request %s [%s] -> %s scores=%s", request.request_id, profile.name, chosen[0].address, explained)
        return chosen

    def _explain_key(self, profile: SchedulingProfile, key: str) -> str:
        # one profile keeps the plain scorer names; several prefix them with the profile's name
        return key if self.handler is None else f"{profile.name}/{key}"

    def _schedule_profiles(
        self,
        handler: ProfileHandler,
        request: InferenceRequest,
        cycle: CycleState,
        candidates: Sequence[Endpoint],
        explained: dict[str, dict[str, float]] | None,
    ) -> SchedulingResult:
        results: dict[str, ProfileOutcome] = {}
        for _ in range(len(self.profiles) + 1):  # a handler that never stops is a bug; bound it
            todo = handler.pick(request, cycle, self.profiles, results)
            if not todo:
                break
            for profile in todo:
                try:
                    results[profile.name] = self._run_profile(profile, request, cycle, candidates, explained)
                except RequestError as e:
                    results[profile.name] = e
        result = handler.process_results(request, cycle, results)
        result.scores = explained
        return result

    def response_started(self, request: InferenceRequest, endpoint: Endpoint, end_of_stream: bool) -> None:
        for p in self._started:
            p.response_started(request, endpoint, end_of_stream)

    def response_complete(
        self, request: InferenceRequest, endpoint: Endpoint, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        for p in self._complete:
            p.response_complete(request, endpoint, prompt_tokens, completion_tokens)

    def response_metadata(self, usage: Mapping[str, object]) -> dict[str, dict[str, float]]:
        """What the reporters make of a response's usage: namespace -> key -> number (empty: nothing to report)."""
        metadata: dict[str, dict[str, float]] = {}
        for p in self.reporters:
            p.report_response(usage, metadata)
        return metadata

    def _drop_unreachable(self, candidates: Sequence[Endpoint]) -> Sequence[Endpoint]:
        # An endpoint whose scrapes fail and whose metrics went stale is probably down: skip it
        # while any other endpoint remains, so one dead pod does not eat a share of the traffic.
        if not failing_in(candidates):
            return candidates
        stale = self.metrics_stale_after
        healthy = [ep for ep in candidates if ep.scrape_error is None or ep.metrics_age() <= stale]
        return healthy or candidates
