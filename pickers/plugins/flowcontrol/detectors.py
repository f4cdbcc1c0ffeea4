"""Saturation detectors (llm-d's): how full the pool is (>= 1.0: saturated, stop dispatching), and a
filter that keeps endpoints under a burst limit when a scheduling profile lists them.

concurrency-detector reads the EPP's own in-flight counts (`Endpoint.in_flight`; tokens: the
inflight-load-producer's `in_flight_load_tokens`). `requests` mode: sum(in flight) / (endpoints x
maxConcurrency); `tokens`: the same in tokens over maxTokenConcurrency; `hybrid`: the average over
endpoints of max(requests ratio, tokens ratio). Filter: keep an endpoint under int(capacity x
(1 + headroom)) (hybrid: under both).
utilization-detector (the default) reads the scraped metrics: per endpoint max(waiting /
queueDepthThreshold, kv_usage / kvCacheUtilThreshold), an endpoint with metrics older than
metricsStalenessThreshold (or never scraped) scores 1.0 (fail closed); the pool's is the average.
Filter: drop stale endpoints and keep waiting < queueDepthThreshold x (1 + headroom) and kv_usage <
kvCacheUtilThreshold x (1 + headroom); when that drops every endpoint, all are kept.
No endpoints: saturation 1.0 for both.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin, PluginContext

INFLIGHT_PRODUCER_TYPE = "inflight-load-producer"
MODES = ("requests", "tokens", "hybrid")
DEFAULT_QUEUE_DEPTH = 5
DEFAULT_KV_CACHE_UTIL = 0.8
DEFAULT_STALENESS = "200ms"


def _ratio(load: int, capacity: int) -> float:
    return 1.0 if capacity == 0 else load / capacity


class ConcurrencyDetector(Plugin):
    type = "concurrency-detector"

    def __init__(
        self,
        name: str = "concurrency-detector",
        *,
        mode: str = "requests",
        max_concurrency: int = 100,
        max_token_concurrency: int = 1_000_000,
        headroom: float = 0.0,
    ) -> None:
        self.name = name
        self.mode = mode
        self.max_concurrency = max_concurrency
        self.max_token_concurrency = max_token_concurrency
        self.headroom = headroom
        self.request_limit = int(max_concurrency * (1.0 + headroom))
        self.token_limit = int(max_token_concurrency * (1.0 + headroom))
        self.producer_name: str | None = None

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> ConcurrencyDetector:
        mode = p.choice("concurrencyMode", "requests", MODES)
        d = cls(
            name,
            mode=mode,
            max_concurrency=p.integer("maxConcurrency", 100, minimum=1),
            max_token_concurrency=p.integer("maxTokenConcurrency", 1_000_000, minimum=1),
            headroom=p.number("headroom", 0.0, minimum=0.0),
        )
        d.producer_name = p.string("inFlightLoadProducerName")
        return d

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        """`inFlightLoadProducerName` must name an inflight-load-producer: the EPP keeps one set of counts."""
        _check_producer(plugins, self.producer_name)

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        n = len(endpoints)
        if self.mode == "requests":
            return _ratio(sum(ep.in_flight for ep in endpoints), n * self.max_concurrency)
        if self.mode == "tokens":
            return _ratio(sum(ep.in_flight_load_tokens for ep in endpoints), n * self.max_token_concurrency)
        mc, mt = self.max_concurrency, self.max_token_concurrency
        return sum(max(_ratio(ep.in_flight, mc), _ratio(ep.in_flight_load_tokens, mt)) for ep in endpoints) / n

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        rl, tl = self.request_limit, self.token_limit
        if self.mode == "requests":
            return [ep for ep in endpoints if ep.in_flight < rl]
        if self.mode == "tokens":
            return [ep for ep in endpoints if ep.in_flight_load_tokens < tl]
        return [ep for ep in endpoints if ep.in_flight < rl and ep.in_flight_load_tokens < tl]


def _check_producer(plugins: Mapping[str, object], name: str | None) -> None:
    if name is None:
        return
    found = plugins.get(name)
    if found is None:
        raise ParameterError("inFlightLoadProducerName", f"no plugin named {shown(name)}; defined: {', '.join(plugins)}")
    if getattr(found, "type", None) != INFLIGHT_PRODUCER_TYPE:
        raise ParameterError(
            "inFlightLoadProducerName", f"plugin {shown(name)} ({getattr(found, 'type', '?')}) is not an {INFLIGHT_PRODUCER_TYPE}"
        )


class UtilizationDetector(Plugin):
    type = "utilization-detector"

    def __init__(
        self,
        name: str = "utilization-detector",
        *,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        kv_cache_util: float = DEFAULT_KV_CACHE_UTIL,
        staleness: float = 0.2,
        headroom: float = 0.0,
    ) -> None:
        self.name = name
        self.queue_depth = queue_depth
        self.kv_cache_util = kv_cache_util
        self.staleness = staleness  # seconds
        self.headroom = headroom
        self.given: frozenset[str] = frozenset()  # parameters the config set (the rest may be adopted)
        self.stale_endpoints = 0  # at the last saturation() call (llm-d's flow_control_stale_endpoints)

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> UtilizationDetector:
        keys = ("queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThreshold", "headroom")
        given = frozenset(k for k in keys if p.given(k))
        kv = p.number("kvCacheUtilThreshold", DEFAULT_KV_CACHE_UTIL)
        if not 0.0 < kv <= 1.0:
            raise ParameterError(p.path("kvCacheUtilThreshold"), f"expected a number in (0.0, 1.0], got {kv:g}")
        staleness = p.duration_or("metricsStalenessThreshold", DEFAULT_STALENESS)
        if staleness <= 0:
            raise ParameterError(p.path("metricsStalenessThreshold"), "expected a positive duration such as \"200ms\"")
        d = cls(
            name,
            queue_depth=p.integer("queueDepthThreshold", DEFAULT_QUEUE_DEPTH, minimum=1),
            kv_cache_util=kv,
            staleness=staleness,
            headroom=p.number("headroom", 0.0, minimum=0.0),
        )
        d.given = given
        return d

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            self.stale_endpoints = 0
            return 1.0
        now = time.monotonic()
        total, stale = 0.0, 0
        for ep in endpoints:
            if ep.metrics_age(now) > self.staleness:
                stale += 1
                total += 1.0
            else:
                m = ep.metrics
                total += max(m.waiting / self.queue_depth, m.kv_usage / self.kv_cache_util)
        self.stale_endpoints = stale
        return total / len(endpoints)

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        now = time.monotonic()
        q_limit = self.queue_depth * (1.0 + self.headroom)
        kv_limit = self.kv_cache_util * (1.0 + self.headroom)  # llm-d's code; its README caps it at 1.0
        kept = [
            ep for ep in endpoints
            if ep.metrics_age(now) <= self.staleness and ep.metrics.waiting < q_limit and ep.metrics.kv_usage < kv_limit
        ]  # fmt: skip
        return kept or endpoints
