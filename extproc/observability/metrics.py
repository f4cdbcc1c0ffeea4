"""The EPP's own Prometheus metrics, with the Gateway API Inference Extension names (docs/operating.md lists them).

One registry per EPP instance (no process globals), served on `--metrics-port`. The request path
only bumps plain counters and lock-free histograms (pickers.framework.histogram) kept per model; one
collector turns them into Prometheus families at scrape time, and computes the pool gauges from
the datastore and the prefix index then, so they cost nothing per request. Model names come from
clients, so the label set is capped: past `MAX_MODELS` distinct names they count as "other".
Everything here runs on the event loop's thread (requests and scrapes alike).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from extproc.handlers.usage import Usage
from pickers.framework.histogram import Histogram

if TYPE_CHECKING:
    from extproc.datalayer.datastore import Datastore
    from extproc.handlers.request_stream import Outcome
    from pickers.framework.types import SchedulingProfile
    from pickers.indexes.prefix import ApproxPrefixIndex

MAX_MODELS = 200
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
SCHED_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
PLUGIN_BUCKETS = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
# the reference picker's buckets for request latencies
DURATION_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60,
                    120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)  # fmt: skip
TTFT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10, 20, 40, 80, 160, 640)
TPOT_BUCKETS = (0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)  # fmt: skip

MODEL_SERVER_ERROR = "ModelServerError"  # the reference picker's code for an upstream status >= 400


def llm_epp_version() -> str:
    try:
        return metadata.version("llm-epp")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "dev"


class _ModelSeries:
    """Everything counted for one model name."""

    __slots__ = ("requests", "running", "errors", "duration", "ttft", "tpot", "input_tokens", "output_tokens", "cached_tokens")

    def __init__(self) -> None:
        self.requests = 0
        self.running = 0
        self.errors: dict[str, int] = {}
        self.duration = Histogram(DURATION_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.input_tokens = Histogram(TOKEN_BUCKETS)
        self.output_tokens = Histogram(TOKEN_BUCKETS)
        self.cached_tokens = Histogram(TOKEN_BUCKETS)


class EppMetrics:
    def __init__(
        self,
        pool_name: str = "",
        version: str | None = None,
        *,
        datastore: Datastore | None = None,
        prefix_index: ApproxPrefixIndex | None = None,
    ) -> None:
        self.pool_name = pool_name
        self.version = llm_epp_version() if version is None else version
        self.datastore = datastore
        self.prefix_index = prefix_index
        self.precise: dict[str, Any] = {}  # plugin name -> precise-prefix-cache-scorer (attach_precise)
        self._series: dict[tuple[str, str], _ModelSeries] = {}  # (model, target model)
        self.scheduler_e2e = Histogram(SCHED_BUCKETS)
        self.plugin_durations: dict[tuple[str, str, str], Histogram] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def attach_precise(self, profiles: Iterable[SchedulingProfile]) -> None:
        """Export the size of each precise-prefix-cache-scorer's index in these profiles (and how often
        an endpoint's entries were dropped), read at scrape time."""
        from pickers.plugins.scorer.precise_prefix import precise_scorers

        self.precise = precise_scorers(profiles)

    def attach(self, datastore: Datastore, prefix_index: ApproxPrefixIndex | None = None) -> None:
        """Read the pool gauges from this datastore (and the prefix gauges from this index) at scrape time."""
        self.datastore = datastore
        self.prefix_index = prefix_index

    def _model(self, model: str, target: str) -> _ModelSeries:
        key = (model, target or model)
        s = self._series.get(key)
        if s is None:
            if len(self._series) >= MAX_MODELS:
                key = ("other", "other")
                s = self._series.get(key)
            if s is None:
                s = self._series[key] = _ModelSeries()
        return s

    # -- the request path ----------------------------------------------------------------------
    # `target` is the model sent upstream when a rewrite changed it (label target_model_name).
    def scheduled(self, model: str, seconds: float, target: str = "") -> None:
        s = self._model(model, target)
        s.requests += 1
        s.running += 1
        self.scheduler_e2e.observe(seconds)

    def request_error(self, model: str, code: str, target: str = "") -> None:
        errors = self._model(model, target).errors
        errors[code] = errors.get(code, 0) + 1

    def completed(self, model: str, outcome: Outcome, usage: Usage | None, target: str = "") -> None:
        s = self._model(model, target)
        s.running -= 1
        status = outcome.status
        if status is not None and status >= 400:
            s.errors[MODEL_SERVER_ERROR] = s.errors.get(MODEL_SERVER_ERROR, 0) + 1
        elif status is not None and not outcome.aborted:
            s.duration.observe(outcome.duration)
        first = outcome.first_byte
        if outcome.streaming and first is not None:
            s.ttft.observe(first)
            if usage is not None and usage.completion_tokens > 1 and not outcome.aborted:
                s.tpot.observe((outcome.duration - first) / (usage.completion_tokens - 1))
        if usage is not None:
            s.input_tokens.observe(usage.prompt_tokens)
            s.output_tokens.observe(usage.completion_tokens)
            s.cached_tokens.observe(usage.cached_tokens)

    # -- per-plugin latency --------------------------------------------------------------------
    def plugin_timer(self, point: str, plugin: object) -> Histogram:
        """The histogram of one plugin's call durations (a `PluginTimer` for the Scheduler)."""
        key = (point, str(getattr(plugin, "type", type(plugin).__name__)), str(getattr(plugin, "name", "")))
        h = self.plugin_durations.get(key)
        if h is None:
            h = self.plugin_durations[key] = Histogram(PLUGIN_BUCKETS)
        return h

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def names(self) -> set[str]:
        """Every sample name the registry exposes now (e.g. ..._bucket, ..._total), for checks."""
        return {s.name for fam in self.registry.collect() for s in fam.samples}


def _histogram_family(name: str, doc: str, labels: Sequence[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=list(labels))


def _add(family: HistogramMetricFamily, labels: Sequence[str], h: Histogram) -> None:
    family.add_metric(list(labels), [(floatToGoString(b), float(n)) for b, n in h.cumulative()], h.sum)


class _Collector:
    """Builds every family from the counters at scrape time."""

    def __init__(self, m: EppMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
        mt = ["model_name", "target_model_name"]
        requests = CounterMetricFamily("inference_objective_request", "Requests scheduled, by model", labels=mt)
        errors = CounterMetricFamily(
            "inference_objective_request_error", "Requests refused by the EPP or failed upstream, by error code", labels=[*mt, "error_code"]
        )
        running = GaugeMetricFamily("inference_objective_running_requests", "Requests in flight through the EPP", labels=["model_name"])
        hists = {
            "duration": _histogram_family(
                "inference_objective_request_duration_seconds", "End-to-end time of successful requests, at the gateway", mt
            ),
            "ttft": _histogram_family(
                "inference_objective_request_ttft_seconds", "Streamed requests: request at the EPP to the first response byte", mt
            ),
            "tpot": _histogram_family(
                "inference_objective_request_tpot_seconds", "Streamed requests: time per output token after the first", mt
            ),
            "input_tokens": _histogram_family("inference_objective_input_tokens", "Prompt tokens per request (from usage)", mt),
            "output_tokens": _histogram_family("inference_objective_output_tokens", "Completion tokens per request (from usage)", mt),
            "cached_tokens": _histogram_family(
                "inference_objective_prompt_cached_tokens", "Prompt tokens served from the prefix cache (from usage)", mt
            ),
        }
        running_by_model: dict[str, int] = {}
        for (model, target), s in m._series.items():
            labels = [model, target]
            requests.add_metric(labels, s.requests)
            running_by_model[model] = running_by_model.get(model, 0) + s.running
            for code, n in s.errors.items():
                errors.add_metric([*labels, code], n)
            for attr, fam in hists.items():
                _add(fam, labels, getattr(s, attr))
        for model, n in running_by_model.items():
            running.add_metric([model], n)
        yield requests
        yield errors
        yield running
        yield from hists.values()

        sched = _histogram_family("inference_extension_scheduler_e2e_duration_seconds", "Time to schedule one request", ())
        _add(sched, (), m.scheduler_e2e)
        yield sched
        plugins = _histogram_family(
            "inference_extension_plugin_duration_seconds", "Time in each scheduling plugin per call",
            ("extension_point", "plugin_type", "plugin_name"),
        )  # fmt: skip
        for key, h in m.plugin_durations.items():
            _add(plugins, key, h)
        yield plugins
        info = GaugeMetricFamily("inference_extension_info", "llm-epp build info", labels=["commit", "build_ref"])
        info.add_metric(["", m.version], 1)
        yield info
        yield from self._pool()
        yield from self._prefix()
        yield from self._precise()

    def _pool(self) -> Iterator[Metric]:
        ds = self.m.datastore
        if ds is None:
            return
        name = self.m.pool_name
        endpoints = ds.candidates()
        n = len(endpoints)
        ready = GaugeMetricFamily("inference_pool_ready_pods", "Endpoints in the pool", labels=["name"])
        ready.add_metric([name], n)
        kv = GaugeMetricFamily(
            "inference_pool_average_kv_cache_utilization", "Mean KV-cache use (0-1) over the pool's endpoints", labels=["name"]
        )
        kv.add_metric([name], sum(ep.metrics.kv_usage for ep in endpoints) / n if n else 0.0)
        queue = GaugeMetricFamily("inference_pool_average_queue_size", "Mean waiting requests over the pool's endpoints", labels=["name"])
        queue.add_metric([name], sum(ep.metrics.waiting for ep in endpoints) / n if n else 0.0)
        per_pod = GaugeMetricFamily(
            "inference_pool_per_pod_queue_size", "Waiting requests on each endpoint", labels=["name", "model_server_pod"]
        )
        for ep in endpoints:
            per_pod.add_metric([name, ep.name or ep.address], ep.metrics.waiting)
        yield from (ready, kv, queue, per_pod)

    def _prefix(self) -> Iterator[Metric]:
        index = self.m.prefix_index
        if index is None:
            return
        size = GaugeMetricFamily("inference_extension_prefix_indexer_size", "(endpoint, block) entries in the prefix index")
        size.add_metric([], index.size())
        yield size
        ratio = _histogram_family(
            "inference_extension_prefix_indexer_hit_ratio", "Per lookup: the share of the prompt's blocks the best endpoint holds", ()
        )
        _add(ratio, (), index.hit_ratio)
        yield ratio

    def _precise(self) -> Iterator[Metric]:
        # Not a GIE series: the approximate index keeps inference_extension_prefix_indexer_size (no
        # labels, its meaning unchanged); the precise index gets its own gauge, one series per plugin.
        if not self.m.precise:
            return
        size = GaugeMetricFamily(
            "inference_extension_precise_prefix_indexer_size",
            "(endpoint, block) entries in the precise prefix index, learned from the servers' KV events",
            labels=["plugin_name"],
        )
        resets = CounterMetricFamily(
            "inference_extension_precise_prefix_indexer_resets",
            "Times an endpoint's precise-index entries were dropped because its cache may have changed unseen",
            labels=["plugin_name", "reason"],
        )
        for name, plugin in self.m.precise.items():
            size.add_metric([name], plugin.index.size())
            sub = getattr(plugin, "subscriber", None)
            for reason, n in (getattr(sub, "resets", None) or {}).items():
                resets.add_metric([name, reason], n)
        yield size
        yield resets
