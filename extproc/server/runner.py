"""The EPP process: the ext_proc gRPC server, gRPC health, the metrics endpoint and the background
tasks (discovery, scraping), assembled from the datastore, the scheduler and the Director.

The servicer only moves messages between gRPC and `RequestStream`; all protocol logic is there.
With `--config-file`, a changed file is applied while serving (extproc.server.reload): each part that
takes config registers a reload hook here (`_watch_config`).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.dcgm import DcgmScraper
from extproc.datalayer.endpoints_file import StaticFileDiscovery
from extproc.datalayer.kv_events import KVEventSubscriber, RankAttribution
from extproc.datalayer.models import ModelsPoller
from extproc.datalayer.scraper import EndpointPoller, MetricsScraper, poll_intervals
from extproc.datalayer.supervisor import Supervisor
from extproc.handlers.parsers import DEFAULT as DEFAULT_PARSERS
from extproc.handlers.parsers import RequestParsers
from extproc.handlers.request_stream import (
    DEFAULT_BODY_IDLE_TIMEOUT,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_HEADERS_KB,
    ProtocolError,
    RequestLimits,
    RequestStream,
    State,
)
from extproc.observability import bounds
from extproc.observability.metrics import EppMetrics, log_kv_block_metrics
from extproc.requestcontrol.director import Director
from extproc.requestcontrol.objectives import ObjectiveStore, load_objectives_file
from extproc.requestcontrol.rewrites import RewriteStore, load_rewrites_file
from extproc.requestcontrol.saturation import SaturationConfig, SaturationDetector
from extproc.server.idle_watch import BodyIdleWatch
from extproc.server.memory import HeapTrimmer
from extproc.server.reload import DEFAULT_INTERVAL as RELOAD_INTERVAL
from extproc.server.reload import ConfigReloader
from pickers.config import safe_yaml
from pickers.config.datalayer import DEFAULT_DATA_LAYER, DataLayerConfig
from pickers.config.loader import EndpointPickerConfig, load_config
from pickers.config.strategies import DEFAULT_STRATEGY, strategy_config
from pickers.framework.errors import ConfigError
from pickers.framework.flowcontrol import FlowControlConfig
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import EndpointState, ProfileHandler, SchedulingProfile
from pickers.indexes.kv_blocks import IndexMetrics
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.latency.model import LatencyModel
from pickers.plugins.base import PluginContext
from pickers.plugins.datalayer.extractors import MetricsExtraction
from pickers.plugins.datalayer.sources import DEFAULT_MAX_SCRAPE_RATE
from pickers.plugins.producer.tokens import TokenProducer
from pickers.plugins.scorer.affinity.precise_prefix import precise_indexes

if TYPE_CHECKING:  # imported when used: the Kubernetes client costs half a second to import
    from opentelemetry.sdk.trace import TracerProvider

    from extproc.flowcontrol.controller import FlowController
    from extproc.kubernetes.runtime import KubernetesOptions, KubernetesRuntime
    from extproc.server.workers import PickService, WorkerPool
    from extproc.peers.sync import PeerOptions, PeerSync
    from extproc.observability.audit import AuditLog, AuditOptions

log = logging.getLogger(__name__)

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Streams that arrived but the event loop has not picked up yet: gRPC cancels them at random
    # above 1,000 (hard at 3,000), which a burst of ~2,000 new requests reaches (each a 500 or a
    # fail-open). Let bursts queue instead; Envoy's message_timeout still bounds the wait.
    ("grpc.server.max_pending_requests", 50_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
]


@dataclass(slots=True)
class ServeOptions:
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    bind_address: str = "0.0.0.0"
    endpoints_file: str | None = None
    strategy: str = DEFAULT_STRATEGY
    config_file: str | None = None  # an EndpointPickerConfig; replaces `strategy`
    config_text: str | None = None  # the same, inline (--config-text)
    config_reload_interval: float = RELOAD_INTERVAL  # seconds between looks at config_file for changes; 0: never reload
    max_endpoints: int = 1
    refresh_metrics_interval: float = 0.05
    max_scrape_rate: float = DEFAULT_MAX_SCRAPE_RATE  # fetches/s per HTTP data source over all endpoints; 0: no cap
    metrics_staleness_threshold: float = 2.0
    max_body_bytes: int = DEFAULT_MAX_BODY
    # The gateway's request header limits (Envoy's max_headers_count, max_request_headers_kb), or lower:
    # Envoy applies them after our header mutation too, so the EPP refuses (431) what would not fit.
    max_request_headers: int = DEFAULT_MAX_HEADERS
    max_request_headers_kb: int = DEFAULT_MAX_HEADERS_KB
    request_body_idle_timeout: float = DEFAULT_BODY_IDLE_TIMEOUT  # 408 after this long without a body chunk; 0: off
    explain_scores: bool = False
    log_requests: bool = False  # one log line per request (INFO); off: nothing per request at INFO
    admin_port: int = 9091  # /debug/endpoints, /debug/config, /debug/decisions; 0: off
    admin_address: str = "127.0.0.1"  # the live views show the pool: loopback unless asked
    grace_period: float = 30.0
    # On SIGTERM, report NOT_SERVING but keep taking streams this long, so Envoy's health check
    # (1 s in envoy/llm-gateway.yaml) stops sending before the port closes: no request meets a closed port.
    shutdown_delay: float = 0.0
    pool_name: str = ""
    secure_serving: bool = False  # ext_proc over TLS (the health and metrics ports stay plaintext for probes)
    cert_path: str | None = None  # directory with tls.crt and tls.key; None: a self-signed certificate
    kubernetes: KubernetesOptions | None = None  # discovery from the API server, leader election
    objectives_file: str | None = None  # YAML list of {name, priority}, for use without Kubernetes
    model_rewrites_file: str | None = None  # InferenceModelRewrite rules, for use without Kubernetes
    tracing: bool = False  # OpenTelemetry spans per request (the `otel` extra); off: OpenTelemetry is never imported
    tracing_sample_ratio: float = 1.0  # of requests arriving without a sampled traceparent
    allow_experimental_plugins: bool = False  # llm-d's Alpha plugin types load only with it (--allow-experimental-plugins)
    # worker processes serving ext_proc on grpc_port (SO_REUSEPORT), picks made here (extproc.server.workers,
    # docs/scaling.md); 1: this process serves ext_proc itself
    workers: int = 1
    log_verbosity: int = 0  # the workers' logging, as this process's (-v, --log-format)
    log_format: str = "text"
    peers: PeerOptions | None = None  # active-active: share picks and load with these replicas (extproc.peers)
    audit: AuditOptions | None = None  # one record per request to a sink (extproc.observability.audit); None: off


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(
        self, director: Director, limits: RequestLimits, heap: HeapTrimmer | None = None, parsers: RequestParsers = DEFAULT_PARSERS
    ) -> None:
        self.director = director
        self.limits = limits
        self.parsers = parsers
        self.heap = heap
        self.active_streams = 0
        self.idle_watch = BodyIdleWatch()  # the request-body idle timeout of every stream
        # the loop Process runs on, kept: asyncio.current_task() without it looks the loop up, a
        # getpid() per call on Python 3.11 (a few us a request in a container)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def Process(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> None:
        # context.read/write rather than an async generator: measurably less CPU per message.
        stream = RequestStream(self.director, parsers=self.parsers, limits=self.limits)
        self.active_streams += 1
        read, write, eof = context.read, context.write, grpc.aio.EOF
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        evicted = False

        def evict() -> None:  # flow control ends this in-flight request: the loop below answers it
            nonlocal evicted
            if stream.evictable and not evicted and task is not None:
                evicted = True
                task.cancel()

        try:
            await self._serve(stream, read, write, eof, evict, task)
        except asyncio.CancelledError:
            if not evicted or task is None:
                raise  # the client or Envoy went away
            task.uncancel()
            if stream.evictable:
                for resp in stream.evict():
                    await write(resp)
        finally:
            stream.close()
            self.active_streams -= 1
            if self.heap is not None:
                self.heap.after_stream(stream.request_body_bytes)

    async def _serve(
        self, stream: RequestStream, read: Any, write: Any, eof: object, evict: Callable[[], None], task: asyncio.Task[Any] | None
    ) -> None:
        """Messages in, the stream's answers out, until the stream is answered or ends."""
        watch = self.idle_watch
        while True:
            idle = stream.body_idle_timeout  # set only while the client's body is due
            if idle is None or task is None:
                msg = await read()
            else:
                watch.arm(task, idle)
                try:
                    msg = await read()
                except asyncio.CancelledError:
                    if not watch.take_expired(task):
                        raise  # the client or Envoy went away, or flow control evicts it
                    task.uncancel()
                    for resp in stream.body_timed_out():
                        await write(resp)
                    return
                finally:
                    watch.disarm(task)
            if msg is eof:
                break
            try:
                out = stream.handle(msg)
                if stream.needs_data:  # a token-producer's call, then flow control's queue, before the pick
                    for resp in out:
                        await write(resp)
                    assert stream.request is not None
                    await self.director.prepare(stream.request, stream.subset)
                    out = await self.director.admit(stream, evict)
            except ProtocolError as e:
                log.warning("request %s: %s", bounds.request_id(stream.request.request_id) if stream.request else "?", e)
                await write(stream.protocol_error_response(e))
                return
            except Exception as e:  # a bug must cost one request, not the stream's bookkeeping
                rid = bounds.request_id(stream.request.request_id) if stream.request else "?"
                log.exception("request %s: internal error", rid)
                await write(stream.protocol_error_response(ProtocolError(stream.state, f"internal error: {e}")))
                return
            if stream.report_due is not None:  # a worker: the end-of-body metadata is the parent's
                await stream.complete_report()
            for resp in out:
                await write(resp)
            if stream.state is State.REJECTED:
                return  # answered: read nothing more (the rest of a refused body is not ours to parse)


def _token_producers(producers: Iterable[object]) -> tuple[TokenProducer, ...]:
    """The token-producers among a config's producers, in the order they are asked (the config's, then
    those a plugin implies: the old precise scorer's tokenizer pool)."""
    return tuple(p for p in producers if isinstance(p, TokenProducer))


def _scheduled(cfg: EndpointPickerConfig) -> list[object]:
    """The plugins a Scheduler of this config runs (its profiles' and the producers), as Scheduler.plugins."""
    return [*(p for prof in cfg.profiles for p in prof.plugins()), *cfg.producers]


def _flow_control_on(fcc: FlowControlConfig | None) -> bool:
    return fcc is not None and fcc.enabled


def _subscribed(plugins: Any) -> dict[str, Any]:
    """The precise indexes among these plugins that KV events feed (subscriptions made at start-up)."""
    return {n: p for n, p in precise_indexes(plugins).items() if p.subscribe}


class EppServer:
    """Owns every part of one EPP process; `start`/`stop` bring them up and down in order."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.datastore = Datastore(metrics_stale_after=opts.metrics_staleness_threshold)
        self.metrics = EppMetrics(pool_name=opts.pool_name)
        self.prefix_index = self._prefix_index()
        # the latency model: its fits live on the datastore's endpoints, request control feeds it and
        # the latency plugins (predicted-latency-producer, ...) read it
        self.latency = self._latency_model()
        self.datastore.on_membership_change(self._on_membership_change)
        self._saturation_config = SaturationConfig()
        self._admission_detector: object | None = None  # flowControl.saturationDetector, gate off
        self.data_layer: DataLayerConfig = DEFAULT_DATA_LAYER
        self.parsers = DEFAULT_PARSERS  # the config's requestHandler.parsers, set by _build_profiles
        self.flow_control_config: FlowControlConfig | None = None  # the config's flowControl, set by _build_profiles
        self._plugin_ctx = PluginContext(self.prefix_index, random.Random(), opts.max_endpoints, self.latency)  # kept across reloads
        self.config: EndpointPickerConfig | None = None  # from --config-file / --config-text / --strategy
        self._config_text = ""
        profiles, handler, producers = self._build_profiles()
        self._profiles = profiles
        self._endpoints_file, self._watch_endpoints, self._kubernetes = self._discovery()
        self._data_pollers = self._pollers()  # a bad TLS file of a source stops start-up here
        self.scheduler = Scheduler(
            profiles, metrics_stale_after=opts.metrics_staleness_threshold, handler=handler, explain=opts.explain_scores,
            timer=self.metrics.plugin_timer, producers=producers,
        )
        self.metrics.attach(self.datastore, self.prefix_index)
        self.metrics.attach_precise(self.scheduler.plugins)
        # A token-producer's vllm backend calls the model server's render endpoints, its uds backend
        # llm-d's tokenizer sidecar: the clients are ours (the sidecar's is told the model at start).
        self.token_producers = _token_producers(producers)
        self._render_clients: dict[object, Any] = {}  # one per render server or sidecar (and model)
        self._render_inits: list[Callable[[], Awaitable[None]]] = []
        for tp in self.token_producers:
            self._wire_renderer(tp)
        self.objectives = ObjectiveStore(load_objectives_file(opts.objectives_file) if opts.objectives_file else None)
        self.rewrites = RewriteStore(load_rewrites_file(opts.model_rewrites_file) if opts.model_rewrites_file else ())
        self.saturation = SaturationDetector(self.datastore, self._saturation_config, self._admission_detector)
        self.tracer_provider: TracerProvider | None = None
        self.flow_control = self._flow_controller()
        self.audit = self._audit_log()
        director_kwargs: dict[str, Any] = dict(
            log_requests=opts.log_requests, objectives=self.objectives, rewrites=self.rewrites, saturation=self.saturation,
            token_producers=self.token_producers, flow_control=self.flow_control, latency=self.latency, audit=self.audit,
        )
        if opts.tracing:
            from extproc.requestcontrol.tracing import (  # ConfigError without the `otel` extra
                TracedDirector,
                build_provider,
            )

            self.tracer_provider = build_provider(opts.tracing_sample_ratio)
            tracer = self.tracer_provider.get_tracer("llm-epp", self.metrics.version)
            self.director: Director = TracedDirector(self.datastore, self.scheduler, self.metrics, tracer=tracer, **director_kwargs)
        else:
            self.director = Director(self.datastore, self.scheduler, self.metrics, **director_kwargs)
        limits = RequestLimits(
            max_body_bytes=opts.max_body_bytes,
            max_headers=opts.max_request_headers,
            max_headers_bytes=opts.max_request_headers_kb * 1024,
            body_idle_timeout=opts.request_body_idle_timeout or None,
        )
        self.heap = HeapTrimmer()
        self.servicer = ExtProcServicer(self.director, limits, self.heap, self.parsers)
        self.reloader = self._watch_config()
        self.health = health_aio.HealthServicer()
        self.supervisor = Supervisor()
        self.kubernetes: KubernetesRuntime | None = None
        self._ready: bool | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: grpc.aio.Server | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.peer_sync: PeerSync | None = None
        self._peer_api: Any = None  # the API client of peer discovery, when Kubernetes discovery has none
        self.admin_port = 0
        self.grpc_port = 0
        self.pick_service: PickService | None = None  # --workers N
        self.workers: WorkerPool | None = None
        self.health_port = 0
        self.metrics_port = 0

    def _latency_model(self) -> LatencyModel:
        """The latency model; with peers, one that shares its fits' observations with them (extproc.peers.latency)."""
        if self.opts.peers is None:
            return LatencyModel()
        from extproc.peers.latency import SharedLatencyModel

        return SharedLatencyModel()

    def _prefix_index(self) -> ApproxPrefixIndex:
        """The approximate prefix index; with peers, one that journals local picks for them (imported only then)."""
        peers = self.opts.peers
        if peers is None:
            return ApproxPrefixIndex()
        if self.opts.kubernetes is not None and self.opts.kubernetes.leader_election:
            raise ConfigError(
                "active-active peers (--peers) and leader election (--ha-enable-leader-election) exclude each other: "
                "with a leader only one replica serves; choose one (docs/high-availability.md)", field="--peers",
            )  # fmt: skip
        from extproc.peers.journal import SharedPrefixIndex

        return SharedPrefixIndex(journal_blocks=peers.journal_blocks)

    def _block_digest(self) -> str:
        """How this replica hashes prompt blocks (the block sizes its prefix plugins use): peers must agree."""
        from pickers.plugins.scorer.affinity.prefix import ApproxPrefixCacheProducer, PrefixCacheScorer

        sizes = sorted({p.block_chars for p in self.scheduler.plugins if isinstance(p, (PrefixCacheScorer, ApproxPrefixCacheProducer))})
        return "xxh64-chain/chars=" + ",".join(map(str, sizes))

    def _wire_renderer(self, tp: TokenProducer) -> None:
        """Give a vllm or uds token-producer its client, shared by those that ask one server for one
        model (the guides' token-producer and tokenizer pool: one channel, one InitializeTokenizer)."""
        if tp.token_backend == "vllm":
            from extproc.requestcontrol.render import VllmRenderClient

            key: object = ("vllm", tp.url)
            if key not in self._render_clients:
                self._render_clients[key] = VllmRenderClient(tp.url)
        elif tp.uds is not None:
            from extproc.requestcontrol.uds_tokenizer import UdsTokenizerClient

            key = tp.uds
            if key not in self._render_clients:
                uds = self._render_clients[key] = UdsTokenizerClient(tp.uds)
                self._render_inits.append(uds.initialize)
        else:
            return
        tp.renderer = self._render_clients[key]

    def _build_profiles(self) -> tuple[tuple[SchedulingProfile, ...], ProfileHandler | None, tuple[object, ...]]:
        """From --config-file / --config-text, else the named strategy (a config like any other, so its
        producers run and its latency plugins read this server's model): the profiles, their handler
        and the data producers. Raises ConfigError."""
        opts = self.opts
        ctx = self._plugin_ctx
        experimental = opts.allow_experimental_plugins
        if opts.config_file is None and opts.config_text is None:
            cfg = load_config(strategy_config(opts.strategy), f"--strategy {opts.strategy}", ctx, allow_experimental=experimental)
        elif opts.config_text is not None:
            cfg = load_config(opts.config_text, "--config-text", ctx, allow_experimental=experimental)
        else:
            assert opts.config_file is not None
            self._config_text = safe_yaml.read_text(opts.config_file, what="config file")
            cfg = load_config(self._config_text, opts.config_file, ctx, allow_experimental=experimental)
        self.config = cfg
        self._saturation_config = SaturationConfig.from_config(cfg.saturation_detector, cfg.source)
        self._admission_detector = cfg.admission_detector
        self.data_layer = cfg.data_layer
        self.parsers = RequestParsers(cfg.parsers)
        self.flow_control_config = cfg.flow_control
        return cfg.profiles, cfg.profile_handler, cfg.producers

    def _flow_controller(self) -> FlowController | None:
        """The flow controller when the config turns flow control on (imported only then); the dispatch
        passes run when room may have freed: an endpoint's new metrics, a change of membership, and
        (from the Director) a request's first byte or end."""
        fcc = self.flow_control_config
        if fcc is None or not _flow_control_on(fcc):
            return None
        from extproc.flowcontrol.controller import FlowController
        from extproc.observability.metrics import FlowControlMetrics

        fc = FlowController(fcc, self.datastore.candidates, metrics=FlowControlMetrics())
        fc.metrics.queues = fc.queue_stats
        self.metrics.flow_control = fc.metrics
        self.datastore.on_metrics_update(fc.kick)
        self.datastore.on_membership_change(lambda added, removed: fc.kick())
        return fc

    # -- config reload: one hook per part that takes config (extproc.server.reload) -----------------

    def _watch_config(self) -> ConfigReloader | None:
        opts = self.opts
        if self.config is None or opts.config_file is None or opts.config_reload_interval <= 0:
            return None
        reloader = ConfigReloader(
            opts.config_file, self.config, self._config_text, self._load_again, self.metrics, interval=opts.config_reload_interval
        )
        reloader.register("scheduling", self._apply_scheduling, self._check_scheduling)
        reloader.register("saturationDetector", self._apply_saturation, self._check_saturation)
        reloader.register("requestHandler.parsers", self._apply_parsers)
        reloader.register("dataLayer", lambda new: None, self._check_data_layer)
        reloader.register("flowControl", self._apply_flow_control, self._check_flow_control)
        return reloader

    def _load_again(self, text: str, source: str, previous: EndpointPickerConfig) -> EndpointPickerConfig:
        """On a worker thread: the same PluginContext (the shared prefix index), and the config serving
        so that unchanged plugins keep their state."""
        return load_config(text, source, self._plugin_ctx, previous=previous, allow_experimental=self.opts.allow_experimental_plugins)

    def _check_scheduling(self, old: EndpointPickerConfig, new: EndpointPickerConfig) -> str | None:
        """The profiles and plugins swap freely, but for what start-up wired to the outside: the
        token-producer (its backend client) and the KV-event subscriptions of precise indexes. Those
        must be carried over unchanged (same name, type and parameters)."""
        why = []
        tokens_old, tokens_new = _token_producers(old.producers), _token_producers(new.producers)
        # each carried over: a kept copy of the same plugin, or the very one a kept plugin implies
        carried = len(tokens_old) == len(tokens_new) and all(
            n is o or (n.name == o.name and n.name in new.kept) for o, n in zip(tokens_old, tokens_new, strict=True))
        if not carried:
            why.append("the token-producer (its tokenizer and backend are set up at start-up)")
        subscribed_old, subscribed_new = _subscribed(self.scheduler.plugins), _subscribed(_scheduled(new))
        if {n: id(p.index) for n, p in subscribed_old.items()} != {n: id(p.index) for n, p in subscribed_new.items()}:
            names = ", ".join(sorted({*subscribed_old, *subscribed_new}))
            why.append(f"the precise prefix-cache plugins fed by KV events ({names}: their subscriptions start with the EPP)")
        return "; ".join(why) or None

    def _apply_scheduling(self, new: EndpointPickerConfig) -> None:
        # Routed requests keep the scheduler that chose them (Routing.scheduler), told of their end.
        self.scheduler = self.director.scheduler = Scheduler(
            new.profiles, metrics_stale_after=self.opts.metrics_staleness_threshold, handler=new.profile_handler,
            explain=self.opts.explain_scores, timer=self.metrics.plugin_timer, producers=new.producers,
        )  # fmt: skip
        self.metrics.attach_precise(self.scheduler.plugins)
        self.director.token_producers = _token_producers(new.producers)  # the start-up ones, or their copies (checked)
        if self.pick_service is not None:
            self.pick_service.config_changed()  # whether the workers send request bodies

    def _check_saturation(self, old: EndpointPickerConfig, new: EndpointPickerConfig) -> str | None:
        SaturationConfig.from_config(new.saturation_detector, new.source)  # raises ConfigError
        return None

    def _apply_saturation(self, new: EndpointPickerConfig) -> None:
        self.saturation.config = self._saturation_config = SaturationConfig.from_config(new.saturation_detector, new.source)
        self.saturation.plugin = self._admission_detector = new.admission_detector

    def _apply_parsers(self, new: EndpointPickerConfig) -> None:
        self.parsers = self.servicer.parsers = RequestParsers(new.parsers)  # streams opened from now on
        if self.pick_service is not None:
            self.pick_service.config_changed()  # the workers' streams likewise

    def _check_flow_control(self, old: EndpointPickerConfig, new: EndpointPickerConfig) -> str | None:
        """Bounds, TTLs and policies change while serving (FlowController.reconfigure); turning flow
        control on or off does not: the queue, its metrics and the gateway's timeouts are set up with the EPP."""
        was, now = _flow_control_on(old.flow_control), _flow_control_on(new.flow_control)
        if was != now:
            return f"flowControl turned {'on' if now else 'off'} (the flowControl gate and section; the queue and the gateway's timeouts are set up at start-up)"
        return None

    def _apply_flow_control(self, new: EndpointPickerConfig) -> None:
        self.flow_control_config = new.flow_control
        if self.flow_control is not None and new.flow_control is not None:
            self.flow_control.reconfigure(new.flow_control)

    def _check_data_layer(self, old: EndpointPickerConfig, new: EndpointPickerConfig) -> str | None:
        if new.data_layer != old.data_layer:
            return "dataLayer (discovery and the data sources are started with the EPP)"
        return None

    def _discovery(self) -> tuple[str | None, bool, KubernetesOptions | None]:
        """Where the pool comes from: (endpoints file, re-read it?, Kubernetes options). `--endpoints` and
        the config's `dataLayer.discovery` are one file discovery set two ways: giving both is refused, and
        with either, `--pool-name` only names the pool (as in llm-d's file-discovery mode)."""
        opts, found = self.opts, self.data_layer.discovery
        if found is None:
            return opts.endpoints_file, True, opts.kubernetes
        where = f"{self.scheduling_source.removeprefix('config ')}: dataLayer.discovery"
        if opts.endpoints_file:
            raise ConfigError(
                f"{where} names the endpoints file ({found.path}) and so does --endpoints ({opts.endpoints_file}); give one",
                field="--endpoints",
            )
        k8s = opts.kubernetes
        if k8s is not None and k8s.endpoint_selector:
            raise ConfigError(f"{where} lists the endpoints; --endpoint-selector selects them from Kubernetes; give one", field="--endpoint-selector")
        if k8s is not None and k8s.pool_name:
            k8s = replace(k8s, pool_name="")
            k8s = k8s if k8s.leader_election else None
        return found.path, found.watch_file, k8s

    @property
    def scheduling_source(self) -> str:
        opts = self.opts
        if opts.config_text is not None:
            return "config --config-text"
        return f"config {opts.config_file}" if opts.config_file else f"strategy {opts.strategy}"

    def _on_membership_change(self, added: tuple, removed: tuple) -> None:  # type: ignore[type-arg]
        if removed:
            holders = [p for p in self.scheduler.plugins if isinstance(p, EndpointState)]
            for ep in removed:
                self.prefix_index.remove_endpoint(ep.address)
                self.latency.forget(ep)
                for plugin in holders:
                    plugin.remove_endpoint(ep.address)
        if added or removed:
            log.info(
                "endpoints: %d in pool (+%s -%s)",
                len(self.datastore),
                ",".join(e.address for e in added) or "0",
                ",".join(e.address for e in removed) or "0",
            )

    async def start(self) -> None:
        opts = self.opts
        if self._endpoints_file:
            # Load once up front so a bad file stops start-up with its error, then watch it.
            found = self.data_layer.discovery
            discovery = StaticFileDiscovery(
                self._endpoints_file, self.datastore, watch=self._watch_endpoints,
                peer_clusters=found is not None and found.peer_clusters,
            )  # fmt: skip
            discovery.load()
            if self._watch_endpoints:
                self.supervisor.start("static-discovery", discovery.run)
        k8s = self._kubernetes
        if k8s is not None and (k8s.discovers or k8s.leader_election):
            from extproc.kubernetes.runtime import KubernetesRuntime

            self.kubernetes = KubernetesRuntime(k8s, self.datastore, objectives=self.objectives, rewrites=self.rewrites)
            await self.kubernetes.start(self.supervisor)
        for name, poller in self._data_pollers.items():
            self.supervisor.start(name, poller.run)
        if self.reloader is not None:
            self.supervisor.start("config-reload", self.reloader.run)
        for i, init in enumerate(self._render_inits):
            self.supervisor.start("uds-tokenizer-init" + (f"-{i + 1}" if i else ""), init)
        # Each precise index (precise-prefix-cache-producer or -scorer) is fed by a KV-event subscriber
        # of ours (a scorer in several profiles gets one).
        for name, precise in precise_indexes(self.scheduler.plugins).items():
            if precise.subscribe:
                precise.subscriber = KVEventSubscriber(
                    self.datastore, precise.index, default_port=precise.kv_events_port or None,
                    per_endpoint=precise.discover_pods, topic_filter=precise.topic_filter, bind=precise.zmq_endpoint,
                    attribution=RankAttribution(precise.serving_port_base, precise.dp_size_local),
                    dp_size_total=precise.dp_size_total, engine=precise.engine,
                )  # fmt: skip
                self.supervisor.start(f"kv-events/{name}", precise.subscriber.run)
            # llm-d's metricsLoggingInterval (with enableMetrics): the index's counts, logged that often
            if precise.metrics_logging_interval:
                self.supervisor.start(f"kv-block-metrics-log/{name}", functools.partial(
                    log_kv_block_metrics, name, functools.partial(self._index_metrics, name), precise.metrics_logging_interval))  # fmt: skip

        if opts.peers is not None:
            from extproc.peers.journal import SharedPrefixIndex
            from extproc.peers.latency import SharedLatencyModel
            from extproc.peers.sync import PeerSync

            assert isinstance(self.prefix_index, SharedPrefixIndex)
            assert isinstance(self.latency, SharedLatencyModel)
            self.peer_sync = PeerSync(opts.peers, self.prefix_index, self.datastore, self._block_digest, self.latency)
            await self.peer_sync.start()
            self.supervisor.start("peer-sync", self.peer_sync.run)
            if opts.peers.service:
                await self._discover_peers(opts.peers, self.peer_sync)

        if opts.workers > 1:
            await self._start_workers()
        else:
            self._grpc = grpc.aio.server(options=_GRPC_OPTIONS)
            pb_grpc.add_ExternalProcessorServicer_to_server(self.servicer, self._grpc)
            self.grpc_port = self._add_ext_proc_port(self._grpc)
            await self._grpc.start()

        self._health_grpc = grpc.aio.server(options=_GRPC_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
        self.health_port = self._health_grpc.add_insecure_port(f"{opts.bind_address}:{opts.grpc_health_port}")
        await self._health_grpc.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("liveness", serving)
        await self._update_readiness()
        if self.kubernetes is not None:
            self.supervisor.start("readiness", self._track_readiness)

        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, opts.bind_address, opts.metrics_port)
        await site.start()
        self.metrics_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        await self._start_admin()
        log.info(
            "llm-epp serving ext_proc on :%d, health on :%d, metrics on :%d (%s, %d endpoints)",
            self.grpc_port, self.health_port, self.metrics_port, self.scheduling_source, len(self.datastore),
        )
        # start-up's objects (modules, config, plugins) leave the cyclic GC's generations: no full
        # collection under load walks them again (docs/operating.md#memory-and-gc-pauses)
        gc.freeze()

    async def _discover_peers(self, peers: PeerOptions, sync: PeerSync) -> None:
        """Peers from the EndpointSlices of a headless Service (the Kubernetes client imported only then)."""
        from extproc.kubernetes.client import default_namespace, make_api_client
        from extproc.peers.discovery import PeerServiceDiscovery

        api = self.kubernetes.api if self.kubernetes is not None and self.kubernetes.api is not None else None
        if api is None:
            api = self._peer_api = await make_api_client(peers.kubeconfig)
        found = PeerServiceDiscovery(api, sync.set_targets, namespace=peers.namespace or default_namespace(),
                                     service=peers.service, port=peers.port)  # fmt: skip
        self.supervisor.start("peer-discovery", found.run)
        log.info("discovering peers from the %s", found.what)

    def _index_metrics(self, name: str) -> IndexMetrics | None:
        """The metrics of precise plugin `name` serving now (after a reload too), if it counts them."""
        plugin = precise_indexes(self.scheduler.plugins).get(name)
        return plugin.index.metrics if plugin is not None else None

    def _pollers(self) -> dict[str, EndpointPoller]:
        """The data layer's HTTP sources (metrics scraper, /v1/models poller, DCGM scraper), on llm-d's clock: each
        source's `interval` rounded to a multiple of --refresh-metrics-interval. Raises ConfigError."""
        dl, opts = self.data_layer, self.opts
        sources = [s for s in (dl.metrics, dl.models, dl.dcgm) if s is not None]
        intervals = dict(zip((s.name for s in sources), poll_intervals(opts.refresh_metrics_interval, [s.interval for s in sources]), strict=True))
        for s in sources:
            if s.interval and abs(intervals[s.name] - s.interval) > 1e-9:
                log.info("%s: interval %gs rounded to %gs (a multiple of the base tick)", s.name, s.interval, intervals[s.name])
        timeout = max(0.5, opts.metrics_staleness_threshold / 2)
        rate = opts.max_scrape_rate or None
        pollers: dict[str, EndpointPoller] = {}
        if dl.metrics is not None:
            pollers["metrics-scraper"] = MetricsScraper(
                self.datastore, interval=intervals[dl.metrics.name], timeout=timeout, source=dl.metrics, extraction=dl.extraction,
                max_rate=rate,
            )  # fmt: skip
        if dl.models is not None:
            pollers["models-poller"] = ModelsPoller(
                self.datastore, interval=intervals[dl.models.name], timeout=timeout, source=dl.models, max_rate=rate
            )
        if dl.dcgm is not None:
            pollers["dcgm-scraper"] = DcgmScraper(
                self.datastore, interval=intervals[dl.dcgm.name], timeout=timeout, source=dl.dcgm, max_rate=rate
            )
        return pollers

    def _add_ext_proc_port(self, server: grpc.aio.Server) -> int:
        opts = self.opts
        address = f"{opts.bind_address}:{opts.grpc_port}"
        if not opts.secure_serving:
            return server.add_insecure_port(address)
        key_pem, cert_pem = self._certificate()
        return server.add_secure_port(address, grpc.ssl_server_credentials([(key_pem, cert_pem)]))

    def _certificate(self) -> tuple[bytes, bytes]:
        """The ext_proc server's (key, certificate) PEMs: --cert-path's, else a self-signed one made now."""
        from extproc.server.tls import load_certificate, self_signed

        opts = self.opts
        cert = load_certificate(opts.cert_path) if opts.cert_path else self_signed()
        log.info("ext_proc serves TLS with the %s certificate", "self-signed" if not opts.cert_path else f"{cert.source}/tls.crt")
        return cert.key_pem, cert.cert_pem

    # -- worker processes (--workers N): ext_proc there, every pick here ---------------------------

    def _worker_setup(self) -> Any:
        from extproc.server import ipc

        body_readers = bool(self.director.token_producers) or bool(precise_indexes(self.scheduler.plugins))
        return ipc.Setup(ipc.parser_specs(self.parsers.specs), body_readers)

    def _scrape_shares(self) -> Any:
        """The metrics scraping shared out over the workers (extproc.server.scrape_shares); None without a
        model-server metrics scraper (none configured, or the multicluster pool source, kept here)."""
        from extproc.server.scrape_shares import ScrapeShares

        scraper = self._data_pollers.get("metrics-scraper")
        if not isinstance(scraper, MetricsScraper) or not isinstance(scraper.extraction, MetricsExtraction):
            return None
        return ScrapeShares(self.datastore, scraper)

    async def _start_workers(self) -> None:
        """The pick service on its unix socket, then the N workers; returns once each listens on the port."""
        from extproc.server.workers import PickService, WorkerOptions, WorkerPool, socket_path

        opts = self.opts
        if opts.grpc_port == 0:
            raise ConfigError("--workers N needs a --grpc-port number: the workers share it (SO_REUSEPORT), port 0 would give each its own", field="--grpc-port")
        key_pem, cert_pem = self._certificate() if opts.secure_serving else (b"", b"")
        self.pick_service = service = PickService(self.director, socket_path(), self._worker_setup, self._scrape_shares())
        await service.start()
        limits = self.servicer.limits
        setup = self._worker_setup()
        self.workers = WorkerPool(opts.workers, lambda i: WorkerOptions(
            str(service.path), i, opts.grpc_port, opts.bind_address, limits.max_body_bytes, limits.max_headers,
            limits.max_headers_bytes, limits.body_idle_timeout, setup.specs, setup.send_body, opts.log_verbosity,
            opts.log_format, cert_pem, key_pem,
        ))  # fmt: skip
        self.workers.start()
        self.grpc_port = opts.grpc_port
        deadline = asyncio.get_running_loop().time() + 60
        while len(service.conns) < opts.workers:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{opts.workers - len(service.conns)} of {opts.workers} workers did not start within 60 s (see their log lines above)")
            await asyncio.sleep(0.02)
        log.info("ext_proc served by %d worker processes on :%d (SO_REUSEPORT), picks made in this process", opts.workers, opts.grpc_port)

    async def _start_admin(self) -> None:
        """The live views; a port already taken costs the views, not the EPP."""
        opts = self.opts
        if not opts.admin_port:
            return
        from extproc.server.admin import admin_app, options_view

        config = {
            "version": self.metrics.version, "scheduling_source": self.scheduling_source, "options": options_view(opts),
            "data_layer": self.data_layer.summary(),
        }  # fmt: skip
        runtime = self._runtime
        fc = self.flow_control
        app = admin_app(
            self.datastore, self.prefix_index, self.director, config, runtime,
            flow_control=fc.view if fc is not None else None, config_state=self.config_status, latency=self.latency,
        )  # fmt: skip
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, opts.admin_address, opts.admin_port)
        try:
            await site.start()
        except OSError as e:
            log.warning("admin views off: cannot listen on %s:%d (%s)", opts.admin_address, opts.admin_port, e)
            await runner.cleanup()
            return
        self._admin_runner = runner
        self.admin_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("admin views on http://%s:%d/debug/", opts.admin_address, self.admin_port)

    def _runtime(self) -> dict[str, Any]:
        """/debug/runtime's process numbers; with workers, the streams they hold and each one's share."""
        service = self.pick_service
        if service is None:
            out: dict[str, Any] = {"active_streams": self.servicer.active_streams, "heap_trims": self.heap.trims}
        else:
            view = service.view()
            out = {"active_streams": sum(w["in_flight"] for w in view), "heap_trims": self.heap.trims, "workers": view,
                   "worker_restarts": self.workers.restarts if self.workers is not None else []}  # fmt: skip
        if self.peer_sync is not None:
            out["peers"] = self.peer_sync.status()
        return out

    def config_status(self) -> dict[str, Any]:
        """What /debug/config and `epp status` say about the config serving."""
        if self.reloader is not None:
            return self.reloader.status()
        watch = "off" if self.opts.config_file else "n/a"
        return {"source": self.scheduling_source.removeprefix("config "), "watch": watch}

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        body = await asyncio.shield(self.metrics.scrape())  # built on a worker thread: requests go on meanwhile
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    def is_ready(self) -> bool:
        """Readiness: the pool is synced and, with leader election, this replica leads."""
        return self.kubernetes is None or self.kubernetes.ready()

    async def _update_readiness(self) -> None:
        ready = self.is_ready()
        if ready == self._ready:
            return
        self._ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "readiness", EXT_PROC_SERVICE):
            await self.health.set(service, status)
        if self.kubernetes is not None:
            log.info("readiness: %s", "SERVING" if ready else "NOT_SERVING")

    async def _track_readiness(self) -> None:
        # Synced and leader are plain flags set by their tasks; a short poll keeps them apart.
        while True:
            await self._update_readiness()
            await asyncio.sleep(0.1)

    def _audit_log(self) -> AuditLog | None:
        opts = self.opts.audit
        if opts is None:
            return None
        from extproc.observability.audit import AuditLog, content_patterns, open_sink

        # the serving config's content rules mask the excerpts too (read at each: a reload swaps the scheduler)
        audit = AuditLog(open_sink(opts), opts, patterns=lambda: content_patterns(self.director.scheduler.plugins))
        self.metrics.audit = audit
        return audit

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking new streams, let open ones finish (up to `grace` seconds), then stop tasks."""
        grace = self.opts.grace_period if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.opts.shutdown_delay > 0:
            await asyncio.sleep(self.opts.shutdown_delay)
        if self.flow_control is not None:
            self.flow_control.shutdown()  # queued requests get 503 now, not at the end of the grace period
        for producer in self.scheduler.async_producers:
            producer.close()  # an open burst window is placed now: its requests go on to their pick
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self.workers is not None:
            await self.workers.stop(grace)  # each drains its streams; their ends still reach the pick service
        if self.pick_service is not None:
            await self.pick_service.close()
        if self.peer_sync is not None:
            await self.peer_sync.stop()  # after the drain: the last picks reach the peers too
        await self.supervisor.stop()
        for client in self._render_clients.values():
            await client.close()
        for tp in self.token_producers:
            tp.close()
        if self.kubernetes is not None:
            await self.kubernetes.close()
        if self._peer_api is not None:
            await self._peer_api.close()
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self.tracer_provider is not None:
            await asyncio.to_thread(self.tracer_provider.shutdown)  # exports the spans still batched
        if self.audit is not None:
            await asyncio.to_thread(self.audit.close)  # writes the records still queued

    async def serve_forever(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: draining %d open streams (up to %.0fs)", self._runtime()["active_streams"], self.opts.grace_period)
        await self.stop()
