"""The EPP's own Prometheus metrics, with the Gateway API Inference Extension names (docs/operating.md lists them).

One instance per EPP (no process globals), served on `--metrics-port`. The request path only bumps
plain counters and lock-free histograms (pickers.framework.histogram) kept per model; a scrape turns
them into the text format, and computes the pool gauges from the datastore and the prefix index
then, so they cost nothing per request. Model names come from clients, so their labels are bounded
(extproc.observability.bounds): cut to `MODEL_MAX` characters, and past `MAX_MODELS` distinct pairs
they count as "other"; the text is then at most ~32 MB, whatever clients send.

Requests write on the event loop's thread. `scrape()` builds the families whose size does not depend
on clients there (prometheus_client's; they read parts that are not thread-safe), then writes the
per-model families and joins the text on a worker thread, so the loop goes on serving requests. That
thread only reads: the dicts it walks (the series, the error counts) are replaced whole when a key is
added, never grown in place, so it walks the keys there were when the scrape began; counts it reads
as they are, and a histogram's count is its +Inf bucket (a sum may lag its buckets by one observation).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from extproc.handlers.usage import Usage
from extproc.observability.bounds import MAX_FLOWS, MAX_MODELS, OVERFLOW, model_name
from extproc.observability.bounds import fairness_id as bounded_fairness_id
from pickers.framework.flowcontrol import FlowKey
from pickers.framework.histogram import Histogram

if TYPE_CHECKING:
    from extproc.datalayer.datastore import Datastore
    from extproc.handlers.request_stream import Outcome
    from pickers.indexes.kv_blocks import IndexMetrics
    from pickers.indexes.prefix import ApproxPrefixIndex

TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
SCHED_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
PLUGIN_BUCKETS = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
# the reference picker's buckets for request latencies
DURATION_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60,
                    120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)  # fmt: skip
TTFT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10, 20, 40, 80, 160, 640)
TPOT_BUCKETS = (0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)  # fmt: skip

log = logging.getLogger(__name__)

# llm-d's buckets for the time in flow control
QUEUE_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

MODEL_SERVER_ERROR = "ModelServerError"  # the reference picker's code for an upstream status >= 400

# The pool means under GIE's names and under llm-d's current ones (llm-d exports both; a peer's
# multicluster-metrics-extractor reads llm-d's)
POOL_PREFIXES = ("inference_pool_", "llm_d_epp_")


def llm_epp_version() -> str:
    try:
        return metadata.version("llm-epp")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "dev"


class _ModelSeries:
    """Everything counted for one model name."""

    __slots__ = ("cached_tokens", "duration", "input_tokens", "output_tokens", "requests", "running", "tpot", "ttft")

    def __init__(self) -> None:
        self.requests = 0
        self.running = 0
        self.duration = Histogram(DURATION_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.input_tokens = Histogram(TOKEN_BUCKETS)
        self.output_tokens = Histogram(TOKEN_BUCKETS)
        self.cached_tokens = Histogram(TOKEN_BUCKETS)


class FlowControlMetrics:
    """What flow control counts, under llm-d's llm_d_epp_flow_control_* names. Fairness ids come from
    clients: past `MAX_FLOWS` distinct (fairness id, priority) pairs they count as "other". The queue
    gauges are read from `queues` (the controller's queue_stats) when Prometheus scrapes."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, int], int] = {}  # (outcome, priority) -> requests
        self.waits: dict[tuple[str, int, str], Histogram] = {}  # (fairness id label, priority, outcome)
        self._labels: set[tuple[str, int]] = set()
        self.revocations_by_priority: dict[int, int] = {}
        self.revocations: dict[str, int] = {}  # confirmed / timed_out
        self.pool_saturation = 0.0
        self.queues: Any = None  # () -> [(fairness id, priority, requests, bytes)]

    def flow_label(self, flow: FlowKey) -> str:
        fid = bounded_fairness_id(flow.id)
        pair = (fid, flow.priority)
        if pair in self._labels:
            return fid
        if len(self._labels) < MAX_FLOWS:
            self._labels.add(pair)
            return fid
        return OVERFLOW

    def outcome(self, flow: FlowKey, outcome: str, waited: float) -> None:
        key = (outcome, flow.priority)
        self.totals[key] = self.totals.get(key, 0) + 1
        wkey = (self.flow_label(flow), flow.priority, outcome)
        h = self.waits.get(wkey)
        if h is None:
            h = self.waits[wkey] = Histogram(QUEUE_WAIT_BUCKETS)
        h.observe(waited)

    def revocations_issued(self, priority: int, n: int) -> None:
        self.revocations_by_priority[priority] = self.revocations_by_priority.get(priority, 0) + n

    def revocation_done(self, outcome: str) -> None:
        self.revocations[outcome] = self.revocations.get(outcome, 0) + 1

    def collect(self, pool: str) -> Iterator[Metric]:
        p = "llm_d_epp_flow_control_"
        size = GaugeMetricFamily(p + "queue_size", "Requests held in the flow-control queues", labels=["fairness_id", "priority", "inference_pool"])
        nbytes = GaugeMetricFamily(p + "queue_bytes", "Bytes of the requests held in the flow-control queues",
                                   labels=["fairness_id", "priority", "inference_pool"])  # fmt: skip
        per: dict[tuple[str, int], list[int]] = {}
        for fid, priority, count, byte_size in self.queues() if self.queues is not None else ():
            row = per.setdefault((self.flow_label(FlowKey(priority, fid)), priority), [0, 0])
            row[0] += count
            row[1] += byte_size
        for (label, priority), (count, byte_size) in per.items():
            size.add_metric([label, str(priority), pool], count)
            nbytes.add_metric([label, str(priority), pool], byte_size)
        yield size
        yield nbytes
        total = CounterMetricFamily(p + "requests", "Requests through flow control, by outcome", labels=["outcome", "priority", "inference_pool"])
        for (outcome, priority), n in self.totals.items():
            total.add_metric([outcome, str(priority), pool], n)
        yield total
        waits = _histogram_family(p + "request_queue_duration_seconds", "Time in flow control, from enqueue to the outcome",
                                  ("fairness_id", "priority", "outcome", "inference_pool"))  # fmt: skip
        for (label, priority, outcome), h in self.waits.items():
            _add(waits, (label, str(priority), outcome, pool), h)
        yield waits
        sat = GaugeMetricFamily(p + "pool_saturation", "Pool saturation gating dispatch, at the last dispatch pass",
                                labels=["inference_pool", "stage"])  # fmt: skip
        sat.add_metric([pool, "effective"], self.pool_saturation)
        yield sat
        issued = CounterMetricFamily(p + "revocations_issued", "In-flight requests evicted, by the blocked band's priority",
                                     labels=["priority", "inference_pool"])  # fmt: skip
        for priority, n in self.revocations_by_priority.items():
            issued.add_metric([str(priority), pool], n)
        yield issued
        done = CounterMetricFamily(p + "revocations", "Evictions by how they ended (confirmed, timed_out)", labels=["outcome", "inference_pool"])
        for outcome, n in self.revocations.items():
            done.add_metric([outcome, pool], n)
        yield done


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
        self.precise: dict[str, Any] = {}  # plugin name -> precise prefix producer or scorer (attach_precise)
        self.token_producers: tuple[Any, ...] = ()  # token-producer plugins, for their fallback counts
        self.reporters: tuple[Any, ...] = ()  # request-attribute-reporter plugins, for their outcome counts
        self.burst_producers: tuple[Any, ...] = ()  # burst-prefix-cache-producer plugins, for their counts
        self.encoder_caches: dict[str, Any] = {}  # mm-embeddings-cache-producer name -> plugin (attach_precise)
        self.rollout_screeners: tuple[Any, ...] = ()  # disaggregatedset-rollout-screener plugins (attach_precise)
        self.flow_control: FlowControlMetrics | None = None  # set when flow control is on
        self._series: dict[tuple[str, str], _ModelSeries] = {}  # (model, target model) labels
        self._errors: dict[tuple[str, str, str], int] = {}  # (model, target model, error code)
        self.scheduler_e2e = Histogram(SCHED_BUCKETS)
        self.plugin_durations: dict[tuple[str, str, str], Histogram] = {}
        self.config_reloads = {"success": 0, "error": 0}  # reloads of --config-file (extproc.server.reload)
        self.config_loaded: tuple[str, str, float] | None = None  # (source, sha256, unix time) of the config serving
        # (admission rule as `plugin/rule`, "refused" or "flagged") -> requests; rules come from the config
        self.admissions: dict[tuple[str, str], int] = {}
        self.audit: Any = None  # the AuditLog (extproc.observability.audit), when the audit trail is on
        self._fixed = _FixedFamilies(self)
        self._building: asyncio.Future[bytes] | None = None

    def attach_precise(self, plugins: Iterable[object]) -> None:
        """Export the size of each precise prefix index among these plugins (precise-prefix-cache-
        producer, -scorer) and how often an endpoint's entries were dropped, each token-producer's
        fallbacks to the estimate, each burst-prefix-cache-producer's requests and what each
        request-attribute-reporter made of the responses and each encoder-cache producer's lookups, read at
        scrape time, and each rollout screener's revision shares and strict no-matches."""
        from pickers.plugins.producer.burst_prefix import BurstPrefixCacheProducer
        from pickers.plugins.producer.tokens import TokenProducer
        from pickers.plugins.requestcontrol.attribute_reporter import (
            RequestAttributeReporter,
        )
        from pickers.plugins.scorer.affinity.mm_embeddings import encoder_caches
        from pickers.plugins.scorer.affinity.precise_prefix import precise_indexes
        from pickers.plugins.screener.disaggregatedset_rollout import (
            DisaggregatedSetRolloutScreener,
        )

        plugins = tuple(plugins)
        self.precise = precise_indexes(plugins)
        self.token_producers = tuple(p for p in plugins if isinstance(p, TokenProducer))
        self.reporters = tuple(p for p in plugins if isinstance(p, RequestAttributeReporter))
        self.burst_producers = tuple(p for p in plugins if isinstance(p, BurstPrefixCacheProducer))
        self.encoder_caches = encoder_caches(plugins)
        self.rollout_screeners = tuple(p for p in plugins if isinstance(p, DisaggregatedSetRolloutScreener))

    def attach(self, datastore: Datastore, prefix_index: ApproxPrefixIndex | None = None) -> None:
        """Read the pool gauges from this datastore (and the prefix gauges from this index) at scrape time."""
        self.datastore = datastore
        self.prefix_index = prefix_index

    def _model(self, model: str, target: str) -> tuple[tuple[str, str], _ModelSeries]:
        label = model_name(model)
        key = (label, model_name(target) if target else label)
        s = self._series.get(key)
        if s is None:
            if len(self._series) >= MAX_MODELS:
                key = (OVERFLOW, OVERFLOW)
                s = self._series.get(key)
            if s is None:
                s = _ModelSeries()
                self._series = {**self._series, key: s}  # replaced whole: a scrape's thread may be reading it
        return key, s

    def _count_error(self, key: tuple[str, str], code: str) -> None:
        ekey = (*key, code)
        if ekey in self._errors:
            self._errors[ekey] += 1
        else:
            self._errors = {**self._errors, ekey: 1}  # a new key: replaced whole, like the series

    # -- the request path ----------------------------------------------------------------------
    # `target` is the model sent upstream when a rewrite changed it (label target_model_name).
    def scheduled(self, model: str, seconds: float, target: str = "") -> None:
        _, s = self._model(model, target)
        s.requests += 1
        s.running += 1
        self.scheduler_e2e.observe(seconds)

    def admission(self, flagged: Iterable[str], refused: str = "") -> None:
        """An admission plugin's decision on one request: the rules that flagged it, the one that refused it."""
        for rule in flagged:
            self._count_admission(rule, "flagged")
        if refused:
            self._count_admission(refused, "refused")

    def _count_admission(self, rule: str, decision: str) -> None:
        key = (rule, decision)
        if key in self.admissions:
            self.admissions[key] += 1
        else:
            self.admissions = {**self.admissions, key: 1}

    def request_error(self, model: str, code: str, target: str = "") -> None:
        self._count_error(self._model(model, target)[0], code)

    def completed(self, model: str, outcome: Outcome, usage: Usage | None, target: str = "") -> None:
        key, s = self._model(model, target)
        s.running -= 1
        status = outcome.status
        if status is not None and status >= 400:
            self._count_error(key, MODEL_SERVER_ERROR)
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
    def config_reload(self, ok: bool) -> None:
        self.config_reloads["success" if ok else "error"] += 1

    def plugin_timer(self, point: str, plugin: object) -> Histogram:
        """The histogram of one plugin's call durations (a `PluginTimer` for the Scheduler)."""
        key = (point, str(getattr(plugin, "type", type(plugin).__name__)), str(getattr(plugin, "name", "")))
        h = self.plugin_durations.get(key)
        if h is None:
            h = self.plugin_durations[key] = Histogram(PLUGIN_BUCKETS)
        return h

    def exposition(self) -> bytes:
        """The whole text, built here (on the caller's thread)."""
        return _render(self._series, self._errors, list(self._fixed.collect()))

    def scrape(self) -> asyncio.Future[bytes]:
        """The whole text, built off the event loop (see the module's doc). Scrapes that arrive while
        one is being built share it, so a flood of scrapes costs one build at a time. Await it
        through `asyncio.shield`: a scraper that hangs up must not cancel the others' answer."""
        building = self._building
        if building is None:
            fixed = list(self._fixed.collect())  # on the loop: small, and read from parts that are not thread-safe
            building = self._building = asyncio.ensure_future(asyncio.to_thread(_render, self._series, self._errors, fixed))
            building.add_done_callback(self._built)
        return building

    def _built(self, done: asyncio.Future[bytes]) -> None:
        if self._building is done:
            self._building = None
        if not done.cancelled():
            done.exception()  # retrieved here, raised again to each scraper that awaits it

    def names(self) -> set[str]:
        """Every sample name exposed now (e.g. ..._bucket, ..._total), for checks."""
        text = self.exposition().decode()
        return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def _histogram_family(name: str, doc: str, labels: Sequence[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=list(labels))


def _add(family: HistogramMetricFamily, labels: Sequence[str], h: Histogram) -> None:
    family.add_metric(list(labels), [(floatToGoString(b), float(n)) for b, n in h.cumulative()], h.sum)


class _FixedFamilies:
    """The families whose size does not depend on what clients send (the scheduler's and the
    plugins', the build info, the pool and the prefix indexes), as prometheus_client builds them."""

    def __init__(self, m: EppMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
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
        yield from self._token_producers()
        yield from self._reporters()
        yield from self._burst_producers()
        yield from self._encoder_caches()
        yield from self._rollout_screeners()
        if m.flow_control is not None:
            yield from m.flow_control.collect(m.pool_name)
        yield from self._config()
        yield from self._guardrails()

    def _guardrails(self) -> Iterator[Metric]:
        m = self.m
        if m.admissions:
            decisions = CounterMetricFamily(
                "llm_epp_admission_decisions", "Requests an admission rule refused or flagged (docs/guardrails.md)",
                labels=["plugin_name", "rule", "decision"],
            )  # fmt: skip
            for (rule, decision), n in m.admissions.items():
                plugin, _, name = rule.partition("/")
                decisions.add_metric([plugin, name, decision], n)
            yield decisions
        audit = m.audit
        if audit is not None:
            records = CounterMetricFamily(
                "llm_epp_audit_records", "Audit records: written to the sink, dropped (the queue was full) or "
                "failed (the sink refused the write)", labels=["result"],
            )  # fmt: skip
            records.add_metric(["written"], audit.written)
            records.add_metric(["dropped"], audit.dropped)
            records.add_metric(["failed"], audit.failed)
            yield records
            queued = GaugeMetricFamily("llm_epp_audit_queue_length", "Audit records waiting for the writer")
            queued.add_metric([], audit.queued)
            yield queued

    def _config(self) -> Iterator[Metric]:
        loaded = self.m.config_loaded
        if loaded is None:
            return
        reloads = CounterMetricFamily(
            "llm_epp_config_reloads", "Reloads of the config file: applied (success) or kept the last good config (error)",
            labels=["result"],
        )  # fmt: skip
        for result, n in self.m.config_reloads.items():
            reloads.add_metric([result], n)
        info = GaugeMetricFamily("llm_epp_config_info", "The config serving: its source and the sha256 of its text", labels=["source", "hash"])
        info.add_metric([loaded[0], loaded[1]], 1)
        at = GaugeMetricFamily("llm_epp_config_last_load_timestamp_seconds", "When the config serving was loaded (unix time)")
        at.add_metric([], loaded[2])
        yield from (reloads, info, at)

    def _pool(self) -> Iterator[Metric]:
        ds = self.m.datastore
        if ds is None:
            return
        name = self.m.pool_name
        endpoints = ds.candidates()
        ready = GaugeMetricFamily("inference_pool_ready_pods", "Endpoints in the pool", labels=["name"])
        ready.add_metric([name], len(endpoints))
        yield ready
        # The means are over the endpoints with fresh metrics, and have no sample when there are none
        # (as llm-d's): a cluster-scoped EPP scraping these (multicluster-metrics-extractor reads the
        # llm_d_epp_ names) must not take a pool with no live endpoint for an idle one.
        now = time.monotonic()
        fresh = [ep for ep in endpoints if not ds.is_stale(ep, now)]
        n = len(fresh)
        for prefix in POOL_PREFIXES:
            kv = GaugeMetricFamily(
                f"{prefix}average_kv_cache_utilization", "Mean KV-cache use (0-1) over the pool's endpoints with fresh metrics",
                labels=["name"],
            )  # fmt: skip
            queue = GaugeMetricFamily(
                f"{prefix}average_queue_size", "Mean waiting requests over the pool's endpoints with fresh metrics", labels=["name"]
            )
            if n:
                kv.add_metric([name], sum(ep.metrics.kv_usage for ep in fresh) / n)
                queue.add_metric([name], sum(ep.metrics.waiting for ep in fresh) / n)
            yield from (kv, queue)
        per_pod = GaugeMetricFamily(
            "inference_pool_per_pod_queue_size", "Waiting requests on each endpoint", labels=["name", "model_server_pod"]
        )
        for ep in endpoints:
            per_pod.add_metric([name, ep.name or ep.address], ep.metrics.waiting)
        yield per_pod

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
        yield from _kv_block_families([p.index.metrics for p in self.m.precise.values()])

    def _encoder_caches(self) -> Iterator[Metric]:
        # llm-d's names and labels (subsystem llm_d_epp); `pod` is the endpoint's name, else its address
        caches = self.m.encoder_caches
        if not caches:
            return
        ds = self.m.datastore
        names = {ep.address: ep.name or ep.address for ep in ds.candidates()} if ds is not None else {}
        labels = ["plugin_type", "plugin_name"]
        queries = CounterMetricFamily(
            "llm_d_epp_encoder_cache_queries", "Multimodal item hash lookups against the encoder-cache affinity LRU",
            labels=[*labels, "modality"],
        )  # fmt: skip
        hits = CounterMetricFamily(
            "llm_d_epp_encoder_cache_hits", "Multimodal item hash lookups that found the item in an endpoint's LRU, by endpoint",
            labels=[*labels, "pod", "modality"],
        )  # fmt: skip
        ratio = _histogram_family(
            "llm_d_epp_encoder_cache_hit_ratio", "Per lookup and endpoint: the share of the request's multimodal items it holds",
            tuple(labels),
        )  # fmt: skip
        for name, plugin in caches.items():
            stats = plugin.index.stats
            for modality, n in stats.queries.copy().items():
                queries.add_metric([plugin.type, name, modality], n)
            for (address, modality), n in stats.hits.copy().items():
                hits.add_metric([plugin.type, name, names.get(address, address), modality], n)
            _add(ratio, (plugin.type, name), stats.hit_ratio)
        yield from (queries, hits, ratio)

    def _token_producers(self) -> Iterator[Metric]:
        if not self.m.token_producers:
            return
        fallbacks = CounterMetricFamily(
            "llm_epp_token_producer_fallbacks",
            "Requests a token-producer could not tokenize (timeout, backend error) and that were scheduled on the estimate",
            labels=["plugin_name", "reason"],
        )
        for plugin in self.m.token_producers:
            for reason, n in plugin.fallbacks.items():
                fallbacks.add_metric([plugin.name, reason], n)
        yield fallbacks

    def _burst_producers(self) -> Iterator[Metric]:
        if not self.m.burst_producers:
            return
        requests = CounterMetricFamily(
            "llm_epp_burst_prefix_requests",
            "Requests a burst-prefix-cache-producer batched, by outcome: assigned (placed on a replica), unassigned "
            "(shared its prompt with no other request of the window), batch_full (maxBatchSize reached: not batched), "
            "cancelled (the client left while it waited)",
            labels=["plugin_name", "outcome"],
        )
        batches = CounterMetricFamily("llm_epp_burst_prefix_batches", "Windows a burst-prefix-cache-producer sealed and placed", labels=["plugin_name"])
        for plugin in self.m.burst_producers:
            counts = plugin.counts
            for outcome in ("assigned", "unassigned", "batch_full", "cancelled"):
                requests.add_metric([plugin.name, outcome], counts[outcome])
            batches.add_metric([plugin.name], counts["batches"])
        yield requests
        yield batches


    def _reporters(self) -> Iterator[Metric]:
        if not self.m.reporters:
            return
        reports = CounterMetricFamily(
            "llm_epp_request_attribute_reports",
            "Responses a request-attribute-reporter evaluated, by result: reported, condition_false, "
            "skipped (0 or -1, not reported), failed (an evaluation error or no number)",
            labels=["plugin_name", "result"],
        )
        for plugin in self.m.reporters:
            for result, n in plugin.outcomes.items():
                reports.add_metric([plugin.name, result], n)
        yield reports


    def _rollout_screeners(self) -> Iterator[Metric]:
        # llm-d's names: v0.10's strict header counter (label selector), the newer form's strict
        # revision counter (no selector label), and the share each revision seen in scope gets now
        # (computed from the pool at scrape time, 0 for an incomplete revision; a revision's series
        # goes when it leaves the pool). One family each, whichever plugins export into it.
        screeners = self.m.rollout_screeners
        if not screeners:
            return
        p = "llm_d_epp_disaggregatedset_"
        by_header = CounterMetricFamily(
            p + "strict_header_no_match", "Strict header selections that matched no endpoint and failed closed",
            labels=["plugin_type", "plugin_name", "selector"],
        )  # fmt: skip
        by_revision = CounterMetricFamily(
            p + "strict_revision_no_match", "Strict revision selections that matched no endpoint and failed closed",
            labels=["plugin_type", "plugin_name"],
        )  # fmt: skip
        share = GaugeMetricFamily(
            p + "revision_gating_share", "Current weighted revision gating share from 0 to 1; incomplete revisions have share 0",
            labels=["plugin_type", "plugin_name", "mode", "revision"],
        )  # fmt: skip
        ds = self.m.datastore
        pool = ds.candidates() if ds is not None else ()
        for s in screeners:
            for selector, n in s.no_match.items():
                if s.revision_header_form:
                    by_revision.add_metric([s.type, s.name], n)
                else:
                    by_header.add_metric([s.type, s.name, selector], n)
            for revision, value in s.revision_shares(pool).items():
                share.add_metric([s.type, s.name, s.mode, revision], value)
        if any(not s.revision_header_form for s in screeners):
            yield by_header
        if any(s.revision_header_form for s in screeners):
            yield by_revision
        yield share


# llm-d's kvblock index metrics (llm-d-kv-cache's, embedded in llm-d's EPP): (name, help, IndexMetrics
# field), exposed under llm-d's current llm_d_epp_kv_cache_index_* names and, as llm-d still does,
# under the deprecated kvcache_index_* ones. No labels: llm-d's are process-wide, so several precise
# indexes with enableMetrics add up.
KV_BLOCK_COUNTERS = (
    ("admissions", "KV blocks admitted to the precise index (stored by events or speculatively)", "admissions"),
    ("evictions", "KV blocks evicted from the precise index (removed by events, or speculative entries expired)", "evictions"),
    ("lookup_requests", "Lookups of a request's blocks in the precise index", "lookups"),
    ("lookup_hits", "Per lookup, the leading blocks of the longest chain one endpoint holds, summed", "hits"),
    ("max_pod_hit_count", "Per lookup, the longest leading chain of blocks one endpoint holds, summed", "hits"),
)
KV_BLOCK_PREFIXES = ("llm_d_epp_kv_cache_index_", "kvcache_index_")  # llm-d's current name, its deprecated alias


def kv_block_totals(metrics: Iterable[IndexMetrics | None]) -> tuple[dict[str, int], Histogram | None]:
    """The counts of these precise indexes' metrics (those with enableMetrics), added up, and their
    lookup latencies as one histogram (None: no index counts)."""
    counted = list({id(m): m for m in metrics if m is not None}.values())
    if not counted:
        return {}, None
    totals = {f: sum(getattr(m, f) for m in counted) for f in ("admissions", "evictions", "lookups", "hits")}
    latency = Histogram(counted[0].latency.bounds)
    for m in counted:
        latency.counts = [a + b for a, b in zip(latency.counts, m.latency.counts)]
        latency.sum += m.latency.sum
    return totals, latency


def _kv_block_families(metrics: Iterable[IndexMetrics | None]) -> Iterator[Metric]:
    totals, latency = kv_block_totals(metrics)
    if latency is None:
        return  # enableMetrics off everywhere: the families are absent, as in llm-d
    for prefix in KV_BLOCK_PREFIXES:
        for name, doc, field in KV_BLOCK_COUNTERS:
            family = CounterMetricFamily(prefix + name, doc)
            family.add_metric([], totals[field])
            yield family
        h = _histogram_family(prefix + "lookup_latency_seconds", "Time of a lookup in the precise index, in seconds", ())
        _add(h, (), latency)
        yield h


async def log_kv_block_metrics(
    name: str, current: Callable[[], IndexMetrics | None], interval: float,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:  # fmt: skip
    """llm-d's metricsLoggingInterval: every `interval` seconds, one line with the counts of the
    precise index of plugin `name` (`current()` reads them: a config reload may replace the plugin),
    the fields of llm-d-kv-cache's "metrics beat"."""
    while True:
        await sleep(interval)
        totals, latency = kv_block_totals([current()])
        if latency is None:
            continue
        count = latency.count
        log.info(
            "kv-block index metrics beat", extra={"fields": {
                "plugin": name, "admissions": totals["admissions"], "evictions": totals["evictions"],
                "lookups": totals["lookups"], "hits": totals["hits"], "max_pod_hit_count": totals["hits"],
                "latency_count": count, "latency_sum": latency.sum, "latency_avg": latency.sum / count if count else 0.0,
            }},
        )  # fmt: skip


# -- the per-model families, written as text ---------------------------------------------------------
# prometheus_client builds a Sample with its own label dict for each of the ~140 lines of a model and
# escapes the labels on every line; written here, a model's labels are escaped once, the whole costs
# about a tenth, and it comes in one chunk per family and model, so the scrape's thread never holds
# the GIL for long.


class _Family:
    """One per-model histogram family: its name, the _ModelSeries attribute it reads, and its `le`
    values and header, written once."""

    __slots__ = ("attr", "les", "name", "text")

    def __init__(self, name: str, doc: str, attr: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.attr = attr
        self.les = (*(floatToGoString(b) for b in buckets), "+Inf")
        self.text = f"# HELP {name} {doc}\n# TYPE {name} histogram\n".encode()


_HISTOGRAMS = (
    _Family("inference_objective_request_duration_seconds", "End-to-end time of successful requests, at the gateway", "duration",
            DURATION_BUCKETS),
    _Family("inference_objective_request_ttft_seconds", "Streamed requests: request at the EPP to the first response byte", "ttft",
            TTFT_BUCKETS),
    _Family("inference_objective_request_tpot_seconds", "Streamed requests: time per output token after the first", "tpot",
            TPOT_BUCKETS),
    _Family("inference_objective_input_tokens", "Prompt tokens per request (from usage)", "input_tokens", TOKEN_BUCKETS),
    _Family("inference_objective_output_tokens", "Completion tokens per request (from usage)", "output_tokens", TOKEN_BUCKETS),
    _Family("inference_objective_prompt_cached_tokens", "Prompt tokens served from the prefix cache (from usage)", "cached_tokens",
            TOKEN_BUCKETS),
)  # fmt: skip


def _escape(value: str) -> str:
    """A label value in the text format (bounds.py already replaced every other control character)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _header(name: str, kind: str, doc: str) -> str:
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def _render(
    series: Mapping[tuple[str, str], _ModelSeries], errors: Mapping[tuple[str, str, str], int], fixed: list[Metric]
) -> bytes:
    """The whole exposition: the per-model families, then the `fixed` ones."""
    chunks = list(_model_text(series, errors))
    chunks.append(generate_latest(_Families(fixed)))  # type: ignore[arg-type]
    return b"".join(chunks)


class _Families:
    """Already built families, as generate_latest reads a registry."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def _model_text(series: Mapping[tuple[str, str], _ModelSeries], errors: Mapping[tuple[str, str, str], int]) -> Iterator[bytes]:
    rows = [(f'model_name="{_escape(m)}",target_model_name="{_escape(t)}"', m, s) for (m, t), s in series.items()]
    name = "inference_objective_request_total"
    lines = [_header(name, "counter", "Requests scheduled, by model")]
    lines += [f"{name}{{{labels}}} {float(s.requests)!r}\n" for labels, _, s in rows]
    yield "".join(lines).encode()

    name = "inference_objective_request_error_total"
    lines = [_header(name, "counter", "Requests refused by the EPP or failed upstream, by error code")]
    lines += [
        f'{name}{{model_name="{_escape(m)}",target_model_name="{_escape(t)}",error_code="{code}"}} {float(n)!r}\n'
        for (m, t, code), n in errors.items()
    ]
    yield "".join(lines).encode()

    running: dict[str, int] = {}
    for _, model, s in rows:
        running[model] = running.get(model, 0) + s.running
    name = "inference_objective_running_requests"
    lines = [_header(name, "gauge", "Requests in flight through the EPP")]
    lines += [f'{name}{{model_name="{_escape(model)}"}} {float(n)!r}\n' for model, n in running.items()]
    yield "".join(lines).encode()

    for fam in _HISTOGRAMS:
        yield fam.text
        name = fam.name
        for labels, _, s in rows:
            h: Histogram = getattr(s, fam.attr)
            total = 0
            lines = []
            for le, n in zip(fam.les, h.counts):  # each bucket read once: the loop may be adding to them
                total += n
                lines.append(f'{name}_bucket{{{labels},le="{le}"}} {float(total)!r}\n')
            lines.append(f"{name}_count{{{labels}}} {float(total)!r}\n")  # the +Inf bucket, as prometheus_client does
            lines.append(f"{name}_sum{{{labels}}} {floatToGoString(h.sum)}\n")
            yield "".join(lines).encode()
