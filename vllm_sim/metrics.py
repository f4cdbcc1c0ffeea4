"""vLLM-named Prometheus metrics for one simulator, in a registry of its own.

Each engine owns its CollectorRegistry so many can share a process. Gauges are read from the
engine at scrape time (never stale); counters and histograms are fed by engine callbacks. The
`engine` label is the engine's global data-parallel rank, as vLLM's v1/metrics/loggers.py labels
each engine's series (engine="0" without DP); render_merged() serves several ranks on one port.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from vllm_sim.config import SimConfig
from vllm_sim.engine import Engine, EngineRequest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's own bucket boundaries, so dashboards and scorers see the same resolution.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

_LABELS = ("model_name", "engine")


class SimMetrics:
    """Implements the engine observer protocol; render() gives the /metrics body."""

    def __init__(self, config: SimConfig, engine: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": config.served_model, "engine": str(engine)}
        r = self.registry

        self._running = Gauge("vllm:num_requests_running", "Requests in the running batch.",
                              _LABELS, registry=r).labels(**labels)
        self._waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.",
                              _LABELS, registry=r).labels(**labels)
        self._kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent.",
                               _LABELS, registry=r).labels(**labels)
        Gauge("vllm:cache_config_info", "Information of the cache config.",
              ("block_size", "num_gpu_blocks", "enable_prefix_caching", "engine"), registry=r).labels(
            block_size=str(config.block_size), num_gpu_blocks=str(config.num_gpu_blocks),
            enable_prefix_caching="True", engine=str(engine),
        ).set(1)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prefix-cache queries, in tokens.",
                                      _LABELS, registry=r).labels(**labels)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens.",
                                   _LABELS, registry=r).labels(**labels)
        # vLLM's names for tokens a KV connector supplied (P/D decode legs here).
        self.external_queries = Counter("vllm:external_prefix_cache_queries",
                                        "External prefix-cache queries, in tokens.", _LABELS, registry=r).labels(**labels)
        self.external_hits = Counter("vllm:external_prefix_cache_hits",
                                     "External prefix-cache hits, in tokens.", _LABELS, registry=r).labels(**labels)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.",
                                     _LABELS, registry=r).labels(**labels)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.",
                                         _LABELS, registry=r).labels(**labels)
        success = Counter("vllm:request_success", "Successfully processed requests.",
                          (*_LABELS, "finished_reason"), registry=r)
        # Generation always runs to max_tokens ("length"); a pooling request (embedding) ends "stop".
        self.request_success = success.labels(**labels, finished_reason="length")
        self.pooling_success = success.labels(**labels, finished_reason="stop")
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.",
                              _LABELS, buckets=TTFT_BUCKETS, registry=r).labels(**labels)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.",
                             _LABELS, buckets=ITL_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                             _LABELS, buckets=E2E_BUCKETS, registry=r).labels(**labels)

    def watch(self, engine: Engine) -> None:
        """Read the load gauges from the engine at scrape time."""
        self._running.set_function(lambda: engine.num_running)
        self._waiting.set_function(lambda: engine.num_waiting)
        self._kv_usage.set_function(lambda: engine.cache.usage)

    def render(self, names: Iterable[str] = ()) -> bytes:
        """The exposition; with `names`, only those series (the `name[]` query vLLM's prometheus_client honours)."""
        return generate_latest(_Restricted(self.registry, names) if names else self.registry)  # type: ignore[arg-type]

    @staticmethod
    def render_merged(all_metrics: Sequence[SimMetrics], names: Iterable[str] = ()) -> bytes:
        """One exposition of several engines' series (internal-LB data parallel: one API port)."""
        if len(all_metrics) == 1:
            return all_metrics[0].render(names)
        merged = _Merged([m.registry for m in all_metrics])
        return generate_latest(_Restricted(merged, names) if names else merged)  # type: ignore[arg-type]

    # EngineObserver
    def on_scheduled(self, request: EngineRequest, now: float) -> None:
        prompt = len(request.prompt_token_ids)
        self.prefix_queries.inc(prompt)
        self.prefix_hits.inc(request.num_cached_tokens - request.num_external_tokens)
        if request.num_external_tokens:
            self.external_queries.inc(request.num_external_tokens)
            self.external_hits.inc(request.num_external_tokens)
        self.prompt_tokens.inc(prompt)

    def on_token(self, request: EngineRequest, now: float, previous: float | None) -> None:
        self.generation_tokens.inc()
        if previous is None:
            self.ttft.observe(now - request.arrival_time)
        else:
            self.itl.observe(now - previous)

    def on_finished(self, request: EngineRequest, now: float) -> None:
        if request.max_tokens == 0:
            # vLLM records a pooling request's first (and only) output as its time to first token.
            self.ttft.observe(now - request.arrival_time)
            self.pooling_success.inc()
        else:
            self.request_success.inc()
        self.e2e.observe(now - request.arrival_time)


class _Merged:
    """A collector view of several registries: each metric family once, with every engine's samples."""

    def __init__(self, registries: Iterable[CollectorRegistry]) -> None:
        self._registries = tuple(registries)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for registry in self._registries:
            for family in registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                merged.samples.extend(family.samples)
        return iter(families.values())


class _Restricted:
    """Only the samples named (prometheus_client's restricted registry, as `/metrics?name[]=...` serves
    it): a family with none of them is left out."""

    def __init__(self, source: CollectorRegistry | _Merged, names: Iterable[str]) -> None:
        self._source = source
        self._names = frozenset(names)

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            samples = [s for s in family.samples if s.name in self._names]
            if samples:
                kept = Metric(family.name, family.documentation, family.type, family.unit)
                kept.samples = samples
                yield kept
