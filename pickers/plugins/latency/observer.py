"""latency-observer-producer-hub (llm-d-router PR #2371, newer than v0.10; Alpha): a black-box record of
each endpoint's time to first token under load, for latency-observation-scorer-hub. Nothing is
scraped: it watches the requests it routes.

Per request: before the pick it pins every candidate's requests in flight (this EPP's count); after it,
the primary pick, that count and the time; at the response's first body chunk the TTFT (from the
pick) joins that endpoint's window with the in-flight count it was dispatched at. A response whose
first chunk is its last (not streamed) is dropped: its latency is end to end.

Per endpoint, recomputed at most every `intervalDuration` (1s; in llm-d the data layer's tick calls
it, so it must be listed under `dataLayer.sources`; here it is computed when the scorer reads it, and
only when so listed, else every endpoint stays cold, as in llm-d):
- the short window: the newest `maxRequests` (100) observations no older than `maxObservationAge`
  (3m), out of a ring of `windowSize` (5000); its P10 (`WindowFloorTTFT`), the TTFT at `lowPercentile`
  (25) and `typicalPercentile` (50), and the mean in-flight count in the +-10 percentile band around each;
- the floor: every `bucketDuration` (1m) the P10 of that bucket's observations joins a history of at
  most `bucketHistorySize` (1000) values, trimmed by dropping its largest; the floor is the history's
  P10 (until the first bucket closes, the window's P10 stands in);
- `minRequests` (10): below that many observations in all the floor reads 0 (the endpoint is cold),
  below that many in the short window the load anchors are not trusted (the scorer predicts the floor).

Percentiles interpolate linearly between the sorted values, as llm-d's. `inFlightLoadProducerName`
names the inflight-load-producer whose charges keep the counts (else the config's, else one with
llm-d's defaults); the counts are the EPP's requests in flight per endpoint.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.scorer.load.token_load import InFlightLoadProducer, bound_names, find_load_producer

_DISPATCH = "dispatch"  # request.attributes[(name, _DISPATCH)]: "address|in-flight|monotonic seconds"
FLOOR_PERCENTILE = 0.10
BAND = 0.10


@dataclass(slots=True, frozen=True)
class TTFTPercentiles:
    """llm-d's TTFTPercentiles: one endpoint's published anchors (seconds)."""

    floor_ttft: float = 0.0  # the bucket history's P10
    window_floor_ttft: float = 0.0  # the short window's P10
    low_load_ttft: float = 0.0
    typical_load_ttft: float = 0.0
    inflight_at_low_load: float = 0.0
    inflight_at_typical_load: float = 0.0
    recent_request_count: int = 0
    observations: int = 0
    calibration_threshold: int = 0

    def floor(self) -> float:
        """The service floor; 0 (cold) with fewer observations than the calibration threshold."""
        if self.observations < self.calibration_threshold:
            return 0.0
        return self.floor_ttft if self.floor_ttft > 0 else self.window_floor_ttft


COLD = TTFTPercentiles()


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """llm-d's: linear interpolation at index p x (n - 1) of ascending values; 0 for none."""
    n = len(sorted_values)
    if n == 0:
        return 0.0
    idx = p * (n - 1)
    lo = int(idx)
    if lo + 1 >= n:
        return sorted_values[lo]
    return sorted_values[lo] + (idx - lo) * (sorted_values[lo + 1] - sorted_values[lo])


def band_inflight(window: Sequence[tuple[float, int, float]], p: float) -> float:
    """The mean in-flight count over the [p - 0.1, p + 0.1] band of a TTFT-sorted window."""
    n = len(window)
    if n == 0:
        return 0.0
    lo = max(int((p - BAND) * (n - 1)), 0)
    hi = min(int((p + BAND) * (n - 1)), n - 1)
    return sum(w[1] for w in window[lo : hi + 1]) / (hi - lo + 1)


@dataclass(slots=True)
class _EndpointWindow:
    ring: deque[tuple[float, int, float]]  # (TTFT seconds, in flight at dispatch, time), oldest first
    observations: int = 0
    bucket_start: float | None = None
    bucket_p10s: list[float] = field(default_factory=list)  # ascending
    floor: float = 0.0
    published: TTFTPercentiles = COLD
    flushed_at: float | None = None

    def window(self, now: float, max_age: float, max_n: int) -> list[tuple[float, int, float]]:
        """The newest observations no older than max_age (at most max_n, 0: all), by TTFT."""
        cutoff = now - max_age
        out: list[tuple[float, int, float]] = []
        for obs in reversed(self.ring):
            if obs[2] < cutoff:
                break
            out.append(obs)
            if max_n and len(out) == max_n:
                break
        out.sort(key=lambda o: o[0])
        return out


class LatencyObserverProducer(Plugin):
    type = "latency-observer-producer-hub"

    def __init__(
        self,
        ctx: PluginContext,
        name: str = "latency-observer-producer-hub",
        *,
        interval: float = 1.0,
        window_size: int = 5000,
        max_age: float = 180.0,
        max_requests: int = 100,
        min_requests: int = 10,
        low: float = 0.25,
        typical: float = 0.50,
        bucket: float = 60.0,
        history: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name)
        self.index = ctx.prefix_index
        self.interval, self.window_size, self.max_age = interval, window_size, max_age
        self.max_requests, self.min_requests, self.low, self.typical = max_requests, min_requests, low, typical
        self.bucket, self.history = bucket, history
        self.clock = clock
        self.dispatched = False  # listed under dataLayer.sources: only then is anything published
        self.load_producer_name: str | None = None
        self.load = InFlightLoadProducer(ctx.prefix_index)
        self.bound: dict[str, str] = {}
        self._windows: dict[str, _EndpointWindow] = {}
        self._pinned = f"{self.type}/{name}/in-flight"

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> LatencyObserverProducer:
        interval = _positive_duration(p, "intervalDuration", "1s")
        max_age = _positive_duration(p, "maxObservationAge", "3m")
        bucket = _positive_duration(p, "bucketDuration", "1m")
        window_size = _positive_int(p, "windowSize", 5000)
        max_requests = _positive_int(p, "maxRequests", 100)
        if max_requests > window_size:
            raise ParameterError("maxRequests", f"({max_requests}) must be <= windowSize ({window_size})")
        min_requests = _positive_int(p, "minRequests", 10)
        history = p.integer("bucketHistorySize", 1000)
        if history < 2:
            raise ParameterError("bucketHistorySize", f"must be >= 2, got {history}")
        low, typical = p.integer("lowPercentile", 25), p.integer("typicalPercentile", 50)
        if not (0 < low < typical < 100):
            raise ParameterError("lowPercentile", f"percentiles must satisfy 0 < lowPercentile ({low}) < typicalPercentile ({typical}) < 100")
        observer = cls(
            ctx, name, interval=interval, window_size=window_size, max_age=max_age, max_requests=max_requests,
            min_requests=min_requests, low=low / 100, typical=typical / 100, bucket=bucket, history=history,
        )  # fmt: skip
        observer.load_producer_name = p.string("inFlightLoadProducerName")
        return observer

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        self.load = find_load_producer(plugins, self.load_producer_name, self.index)
        self.bound = bound_names(plugins, {"inFlightLoadProducerName": self.load})

    def effective_parameters(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**given, **self.bound}

    def set_dispatched(self, listed: bool) -> None:
        """Whether it is listed under dataLayer.sources (llm-d's PollingDispatcher): only then are its
        snapshots published."""
        self.dispatched = listed

    # -- the request's life --------------------------------------------------------------------------
    def produce(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        cycle.data[self._pinned] = {ep.address: ep.in_flight for ep in endpoints}  # before this request joins

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        self.load.pre_request(request, cycle, result)
        if not result.endpoints:
            return
        primary = result.endpoints[0]
        pinned = cycle.data.get(self._pinned)
        inflight = pinned.get(primary.address, 0) if isinstance(pinned, dict) else 0
        request.attributes[(self.name, _DISPATCH)] = f"{primary.address}|{inflight}|{self.clock()!r}"

    def response_started(self, request: InferenceRequest, endpoint: Endpoint, end_of_stream: bool) -> None:
        raw = request.attributes.pop((self.name, _DISPATCH), None)
        if raw is None or end_of_stream:  # not dispatched by this observer, or not streamed: no TTFT
            return
        address, inflight, at = raw.split("|")
        now = self.clock()
        self.record(address, now - float(at), int(inflight), now)

    def response_complete(
        self, request: InferenceRequest, endpoint: Endpoint, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        request.attributes.pop((self.name, _DISPATCH), None)  # no first chunk came

    def remove_endpoint(self, address: str) -> None:
        self._windows.pop(address, None)

    # -- the windows ---------------------------------------------------------------------------------
    def _state(self, address: str) -> _EndpointWindow:
        st = self._windows.get(address)
        if st is None:
            st = self._windows[address] = _EndpointWindow(deque(maxlen=self.window_size))
        return st

    def record(self, address: str, ttft: float, inflight: int, now: float) -> None:
        st = self._state(address)
        st.ring.append((ttft, inflight, now))
        st.observations += 1

    def snapshot(self, address: str, now: float | None = None) -> TTFTPercentiles:
        """The endpoint's published anchors, recomputed when the last are `intervalDuration` old; cold
        (all 0) when the observer is not listed under dataLayer.sources."""
        if not self.dispatched:
            return COLD
        now = self.clock() if now is None else now
        st = self._state(address)
        if st.flushed_at is None or now - st.flushed_at >= self.interval:
            st.published = self._flush(st, now)
            st.flushed_at = now
        return st.published

    def _flush(self, st: _EndpointWindow, now: float) -> TTFTPercentiles:
        short = st.window(now, self.max_age, self.max_requests)
        values = [o[0] for o in short]
        self._roll_bucket(st, now)
        if not short:
            return TTFTPercentiles(floor_ttft=st.floor, observations=st.observations, calibration_threshold=self.min_requests)
        return TTFTPercentiles(
            floor_ttft=st.floor,
            window_floor_ttft=percentile(values, FLOOR_PERCENTILE),
            low_load_ttft=percentile(values, self.low),
            typical_load_ttft=percentile(values, self.typical),
            inflight_at_low_load=band_inflight(short, self.low),
            inflight_at_typical_load=band_inflight(short, self.typical),
            recent_request_count=len(short),
            observations=st.observations,
            calibration_threshold=self.min_requests,
        )

    def _roll_bucket(self, st: _EndpointWindow, now: float) -> None:
        if st.bucket_start is None:
            st.bucket_start = now
            return
        if now - st.bucket_start < self.bucket:
            return
        bucket = st.window(now, self.bucket, 0)
        if bucket:
            st.bucket_p10s.append(percentile([o[0] for o in bucket], FLOOR_PERCENTILE))
            st.bucket_p10s.sort()
            if len(st.bucket_p10s) > self.history:
                st.bucket_p10s.pop()  # the slowest bucket goes, not the oldest
            st.floor = percentile(st.bucket_p10s, FLOOR_PERCENTILE)
        st.bucket_start = now


def _positive_duration(p: Params, key: str, default: str) -> float:
    seconds = p.duration_or(key, default)
    if seconds <= 0:
        raise ParameterError(key, f"must be > 0, got {p.effective[key]!r}")
    return seconds


def _positive_int(p: Params, key: str, default: int) -> int:
    v = p.integer(key, default)
    if v <= 0:
        raise ParameterError(key, f"must be > 0, got {v}")
    return v
