"""llm-d's multi-cluster plugin variants: a cluster-scoped EPP whose endpoints are peer clusters.

Discovery of clusters by gateway host (metricsAddress/metricsPort labels, bad entries refused), the
pool-aggregate source and extractor, the scorers' formulas, the delegating variants, the Alpha flag,
the config in the shape of llm-d's example, and two "clusters" (HTTP servers serving an llm-epp's
own pool metrics) of which the cluster-scoped picker prefers the less loaded one.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from extproc.cli import main as cli
from extproc.datalayer.datastore import Datastore
from extproc.datalayer.endpoints_file import StaticFileDiscovery, parse_endpoints_yaml
from extproc.datalayer.scraper import (
    MetricsParseError,
    MetricsScraper,
    PoolMetricsParser,
    source_url,
)
from extproc.observability.metrics import EppMetrics
from extproc.server.tls import self_signed, write_certificate
from pickers.config.loader import load_config, load_config_file
from pickers.config.registry import ALPHA_TYPES, known_types
from pickers.config.unsupported import UNSUPPORTED_TYPES
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState
from pickers.plugins.datalayer.extractors import MetricSpec, PoolMetricsExtraction
from pickers.plugins.datalayer.sources import PEER_METRICS_MAX_BYTES, HttpSource
from pickers.plugins.scorer.affinity.prefix import PrefixCacheScorer
from pickers.plugins.scorer.affinity.session_affinity import session_token
from tests.unit.test_plugins import req

EXAMPLE = Path(__file__).parent / "configs" / "multicluster.yaml"
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
MC_TYPES = (
    "multicluster-file-discovery", "multicluster-metrics-data-source", "multicluster-metrics-extractor",
    "multicluster-kv-cache-utilization-scorer", "multicluster-queue-scorer", "multicluster-session-affinity-filter",
    "multicluster-prefix-cache-scorer", "multicluster-approx-prefix-cache-producer",
)  # fmt: skip
MC_DATA_LAYER = """\
- {name: metrics-source, type: multicluster-metrics-data-source, parameters: {scheme: http}}
- {name: metrics-extractor, type: multicluster-metrics-extractor}
dataLayer:
  sources:
  - {pluginRef: metrics-source, extractors: [{pluginRef: metrics-extractor}]}
"""


def load(body: str, **kw):  # type: ignore[no-untyped-def]
    return load_config(HEADER + body, "t.yaml", allow_experimental=True, **kw)


def error_of(body: str, *, allow_experimental: bool = True) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(HEADER + body, "t.yaml", allow_experimental=allow_experimental)
    return str(e.value)


def clusters(text: str) -> list[EndpointSpec]:
    return parse_endpoints_yaml(text, source="clusters.yaml", peer_clusters=True)


def cluster_error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        clusters(text)
    return str(e.value)


def cluster(name: str, *, kv: float | None = None, queue: float | None = None) -> Endpoint:
    metrics = Metrics(pool_kv_usage=kv, pool_queue=queue, updated_at=time.monotonic())
    return Endpoint(EndpointSpec(name, f"gw.{name}.example.com", 443), metrics)


def scores(plugin, endpoints) -> list[float]:  # type: ignore[no-untyped-def]
    return list(plugin.score(req(), CycleState(), endpoints))


# -- the types are ours now -----------------------------------------------------------------------


def test_every_multicluster_type_is_registered_alpha_and_no_longer_refused():
    assert set(MC_TYPES) <= set(known_types())
    assert set(MC_TYPES) == {t for t in ALPHA_TYPES if t.startswith("multicluster-")}
    assert not any(t.startswith("multicluster-") for t in UNSUPPORTED_TYPES)


# -- discovery: peer clusters by gateway host -------------------------------------------------------


def test_clusters_are_reached_by_host_name_or_ip():
    specs = clusters(
        "endpoints:\n"
        "- {name: a, address: gw.cluster-a.example.com, port: '443'}\n"
        "- {name: b, address: 10.1.2.3, port: '8080'}\n"
        "- {name: c, address: 'fd00::7', port: '443'}\n"
    )
    assert [s.address for s in specs] == ["gw.cluster-a.example.com:443", "10.1.2.3:8080", "[fd00::7]:443"]
    assert all(s.metrics_host is None for s in specs)  # metrics at the gateway's own address
    assert source_url(HttpSource("m", "/metrics", "https"), Endpoint(specs[0])) == "https://gw.cluster-a.example.com:443/metrics"


def test_metrics_address_and_port_labels_say_where_a_clusters_pool_metrics_are():
    a, b = clusters(
        "endpoints:\n"
        "- {name: a, address: gw.a.example.com, port: '443', labels: {metricsAddress: epp.a.example.com, metricsPort: '9090'}}\n"
        "- {name: b, address: gw.b.example.com, port: '443', labels: {metricsAddress: 10.9.9.9}}\n"
    )
    assert (a.metrics_host, a.metrics_port) == ("epp.a.example.com", 9090)
    assert (b.metrics_host, b.metrics_port) == ("10.9.9.9", 443)  # metricsPort defaults to the entry's port
    assert a.address == "gw.a.example.com:443"  # requests still go to the gateway
    source = HttpSource("m", "/metrics", "https")
    assert source_url(source, Endpoint(a)) == "https://epp.a.example.com:9090/metrics"
    assert source_url(source, Endpoint(b)) == "https://10.9.9.9:443/metrics"
    assert a.labels["metricsAddress"] == "epp.a.example.com"  # kept as a label too, as in llm-d


def test_the_pod_file_discovery_does_not_read_cluster_labels():
    (spec,) = parse_endpoints_yaml("endpoints:\n- {address: 10.0.0.1, port: '8000', labels: {metricsAddress: 10.0.0.2}}\n")
    assert spec.metrics_host is None


@pytest.mark.parametrize(
    ("entry", "field", "says"),
    [
        ("{address: Gw.Example.com, port: '443'}", "endpoints[0].address", "IP address or DNS name (RFC 1123"),
        ("{address: gw_a.example.com, port: '443'}", "endpoints[0].address", "RFC 1123"),
        ("{address: '-gw.example.com', port: '443'}", "endpoints[0].address", "RFC 1123"),
        ("{host: 'gw..example.com', port: '443'}", "endpoints[0].host", "RFC 1123"),
        ("{address: gw.example.com, port: '443', labels: {metricsAddress: 'epp:9090'}}", "endpoints[0].labels.metricsAddress",
         "without a port"),
        ("{address: gw.example.com, port: '443', labels: {metricsAddress: 'EPP!'}}", "endpoints[0].labels.metricsAddress",
         "IP address or DNS name"),
        ("{address: gw.example.com, port: '443', labels: {metricsAddress: ''}}", "endpoints[0].labels.metricsAddress",
         "IP address or DNS name"),
        ("{address: gw.example.com, port: '443', labels: {metricsAddress: epp, metricsPort: '99999'}}",
         "endpoints[0].labels.metricsPort", "integer 1-65535"),
        ("{address: gw.example.com, port: '443', labels: {metricsPort: '9090'}}", "endpoints[0].labels.metricsPort",
         "needs a metricsAddress label"),
        ("{address: gw.example.com, port: '443', metricsPort: 9090, labels: {metricsAddress: epp, metricsPort: '9091'}}",
         "endpoints[0].labels.metricsPort", "give one"),
        ("{address: gw.example.com, port: '443', rank: 1}", "endpoints[0].rank", "a peer cluster's entry has none"),
        ("{address: gw.example.com, port: '443', dpGroup: g}", "endpoints[0].dpGroup", "a peer cluster's entry has none"),
        ("{address: gw.example.com, port: '443', pod: vllm-0}", "endpoints[0].pod", "a peer cluster's entry has none"),
        ("{address: gw.example.com, port: '443', nodeAddress: 10.0.0.1}", "endpoints[0].nodeAddress",
         "a peer cluster's entry has none"),
    ],
)  # fmt: skip
def test_a_bad_cluster_entry_is_refused_naming_the_file_and_field(entry: str, field: str, says: str):
    msg = cluster_error(f"endpoints:\n- {entry}\n")
    assert msg.startswith(f"clusters.yaml: {field}: ") and says in msg


def test_a_253_character_name_is_the_longest_accepted():
    label = "a" * 61
    longest = ".".join([label] * 4) + "." + "b" * 5  # 4 * 62 + 5 = 253
    assert len(longest) == 253
    assert clusters(f"- {{address: {longest}, port: '443'}}\n")[0].host == longest
    assert "RFC 1123" in cluster_error(f"- {{address: {longest}c, port: '443'}}\n")


def test_static_discovery_reads_clusters_and_refuses_a_bad_file(tmp_path):
    path = tmp_path / "clusters.yaml"
    path.write_text("endpoints:\n- {name: a, address: gw.a.example.com, port: '443'}\n")
    ds = Datastore()
    StaticFileDiscovery(path, ds, peer_clusters=True).load()
    assert [ep.address for ep in ds.candidates()] == ["gw.a.example.com:443"]
    path.write_text("endpoints:\n- {name: a, address: GW.A, port: '443'}\n")
    with pytest.raises(ConfigError, match="RFC 1123"):
        StaticFileDiscovery(path, Datastore(), peer_clusters=True).load()
    StaticFileDiscovery(path, Datastore()).load()  # the pod discovery takes any host name


# -- the pool-aggregate source and extractor ----------------------------------------------------------


def test_the_cluster_source_verifies_https_by_default_and_caps_the_answer():
    cfg = load(f"plugins:\n- type: multicluster-queue-scorer\n{MC_DATA_LAYER}".replace("parameters: {scheme: http}", ""))
    source = cfg.data_layer.metrics
    assert source is not None and source.name == "metrics-source"
    assert (source.scheme, source.insecure_skip_verify, source.path) == ("https", False, "/metrics")
    assert source.max_bytes == PEER_METRICS_MAX_BYTES == 8 << 20
    assert cfg.data_layer.extraction == PoolMetricsExtraction(
        MetricSpec("llm_d_epp_average_kv_cache_utilization"), MetricSpec("llm_d_epp_average_queue_size")
    )


def test_the_cluster_source_refuses_a_port():
    body = f"plugins:\n- type: multicluster-queue-scorer\n{MC_DATA_LAYER}".replace("{scheme: http}", "{port: 9090}")
    msg = error_of(body)
    assert "plugins[1].parameters.port" in msg and "metricsPort label" in msg


def test_the_extractor_takes_other_series_and_refuses_a_bad_selector():
    body = f"plugins:\n- type: multicluster-queue-scorer\n{MC_DATA_LAYER}".replace(
        "type: multicluster-metrics-extractor}",
        "type: multicluster-metrics-extractor, parameters: {kvCacheUtilizationMetric: 'inference_pool_average_kv_cache_utilization"
        "{name=\"pool-a\"}', queueSizeMetric: inference_pool_average_queue_size}}",
    )
    ex = load(body).data_layer.extraction
    assert ex == PoolMetricsExtraction(
        MetricSpec("inference_pool_average_kv_cache_utilization", (("name", "pool-a"),)), MetricSpec("inference_pool_average_queue_size")
    )
    bad = body.replace("queueSizeMetric: inference_pool_average_queue_size", "queueSizeMetric: '1bad name'")
    assert "plugins[2].parameters.queueSizeMetric: multicluster-metrics-extractor: not a metric selector" in error_of(bad)


POOL = (
    "# HELP llm_d_epp_average_kv_cache_utilization x\n# TYPE llm_d_epp_average_kv_cache_utilization gauge\n"
    'llm_d_epp_average_kv_cache_utilization{name="pool-a"} 0.25\n'
    "# TYPE llm_d_epp_average_queue_size gauge\n"
    'llm_d_epp_average_queue_size{name="pool-a"} 2.4\n'
    'inference_pool_average_queue_size{name="pool-a"} 99\n'
)


def test_the_parser_reads_the_pool_aggregates_as_floats_and_the_stock_fields_rounded():
    m = PoolMetricsParser(PoolMetricsExtraction()).parse(POOL)
    assert (m.pool_kv_usage, m.pool_queue) == (0.25, 2.4)
    assert (m.kv_usage, m.waiting) == (0.25, 2)  # for the saturation detector and the views


def test_the_series_filter_asks_a_peer_for_its_two_pool_gauges_only_where_the_source_says_so():
    """multicluster-metrics-data-source fetches the whole page (llm-d's; it has no seriesFilter), a
    metrics-data-source with the pool extractor asks for the two gauges as it does for an engine's."""
    ds = Datastore()
    ds.set_endpoints([EndpointSpec(name="peer", host="10.0.0.9", port=443)])
    ep = ds.candidates()[0]
    peer = MetricsScraper(ds, source=HttpSource("multicluster-metrics-data-source", "/metrics", "https"), extraction=PoolMetricsExtraction())
    assert peer.url(ep) == "https://10.0.0.9:443/metrics"
    filtered = MetricsScraper(ds, source=HttpSource("m", "/metrics", series_filter=True), extraction=PoolMetricsExtraction())
    assert filtered.url(ep) == ("http://10.0.0.9:443/metrics/?name%5B%5D=llm_d_epp_average_kv_cache_utilization"
                                "&name%5B%5D=llm_d_epp_average_queue_size")  # fmt: skip


def test_the_parser_averages_several_series_unless_a_label_selects_one():
    text = POOL + 'llm_d_epp_average_queue_size{name="pool-b"} 5.6\nllm_d_epp_average_kv_cache_utilization{name="pool-b"} 0.75\n'
    assert PoolMetricsParser(PoolMetricsExtraction()).parse(text).pool_queue == pytest.approx(4.0)
    one = PoolMetricsExtraction(MetricSpec("llm_d_epp_average_kv_cache_utilization", (("name", "pool-b"),)),
                                MetricSpec("llm_d_epp_average_queue_size", (("name", "pool-b"),)))  # fmt: skip
    m = PoolMetricsParser(one).parse(text)
    assert (m.pool_kv_usage, m.pool_queue) == (0.75, 5.6)


@pytest.mark.parametrize("missing", ["llm_d_epp_average_kv_cache_utilization", "llm_d_epp_average_queue_size"])
def test_a_cluster_without_a_series_fails_its_scrape_naming_it(missing: str):
    text = "\n".join(line for line in POOL.splitlines() if not line.startswith(missing))
    with pytest.raises(MetricsParseError, match=missing):
        PoolMetricsParser(PoolMetricsExtraction()).parse(text)


def test_the_parser_clamps_and_skips_unusable_samples():
    text = "llm_d_epp_average_kv_cache_utilization 1.7\nllm_d_epp_average_queue_size NaN\nllm_d_epp_average_queue_size -3\n"
    m = PoolMetricsParser(PoolMetricsExtraction()).parse(text)
    assert (m.pool_kv_usage, m.pool_queue, m.waiting) == (1.0, 0.0, 0)


# -- the scorers --------------------------------------------------------------------------------------


def built(type_name: str):  # type: ignore[no-untyped-def]
    return load(f"plugins:\n- type: {type_name}\n{MC_DATA_LAYER}").plugins[type_name]


def test_kv_cache_scorer_is_one_minus_the_clusters_mean_utilization():
    scorer = built("multicluster-kv-cache-utilization-scorer")
    eps = [cluster("a", kv=0.2), cluster("b", kv=0.9), cluster("c")]
    assert scores(scorer, eps) == pytest.approx([0.8, 0.1, 0.0])  # c not scraped yet: unscored


def test_queue_scorer_is_min_max_over_the_clusters_mean_queues():
    scorer = built("multicluster-queue-scorer")
    eps = [cluster("a", queue=1.0), cluster("b", queue=3.0), cluster("c", queue=2.2), cluster("d")]
    assert scores(scorer, eps) == pytest.approx([1.0, 0.0, 0.4, 0.0])
    assert scores(scorer, [cluster("a", queue=2.0), cluster("b", queue=2.0)]) == [1.0, 1.0]  # equal: neutral 1


def test_the_metric_scorers_need_the_cluster_extractor():
    for type_name in ("multicluster-kv-cache-utilization-scorer", "multicluster-queue-scorer"):
        msg = error_of(f"plugins:\n- type: {type_name}\n")
        assert msg.startswith(f"t.yaml: plugins[0].type: {type_name} reads each peer cluster's pool aggregates: list a "
                              "multicluster-metrics-data-source with a multicluster-metrics-extractor")  # fmt: skip


def test_a_model_server_extractor_beside_the_cluster_one_is_refused():
    body = (
        "plugins:\n- type: multicluster-queue-scorer\n- type: multicluster-metrics-data-source\n"
        "- type: multicluster-metrics-extractor\n- type: core-metrics-extractor\n"
        "dataLayer:\n  sources:\n  - pluginRef: multicluster-metrics-data-source\n"
        "    extractors: [{pluginRef: multicluster-metrics-extractor}, {pluginRef: core-metrics-extractor}]\n"
    )
    assert "dataLayer.sources[0].extractors[1].pluginRef: core-metrics-extractor and multicluster-metrics-extractor" in error_of(body)


def test_cluster_discovery_with_a_model_server_extractor_loads_with_a_warning():
    cfg = load(
        "plugins:\n- type: queue-scorer\n- {name: d, type: multicluster-file-discovery, parameters: {path: c.yaml}}\n"
        "dataLayer:\n  discovery: {pluginRef: d}\n"
    )
    assert cfg.data_layer.discovery is not None and cfg.data_layer.discovery.peer_clusters
    assert any("multicluster-file-discovery lists peer clusters" in w for w in cfg.warnings)


def test_a_cluster_publishes_no_endpoint_attributes_so_an_attribute_reader_loads_with_a_warning():
    cfg = load(
        "plugins:\n- type: multicluster-queue-scorer\n"
        "- {type: endpoint-attribute-scorer, parameters: {attributeKey: custom.depth, algorithm: {type: linear_lower_is_better}}}\n"
        + MC_DATA_LAYER
    )
    assert cfg.data_layer.attributes() == frozenset()
    assert any("plugins[1] (endpoint-attribute-scorer)" in w and "nothing in the data layer publishes" in w for w in cfg.warnings)


# -- the delegating variants -----------------------------------------------------------------------------


def test_the_session_affinity_filter_pins_a_session_to_its_cluster():
    f = built("multicluster-session-affinity-filter")
    a, b = cluster("a"), cluster("b")
    pinned = req(headers={"x-session-token": session_token(b.address)})
    assert f.filter(pinned, CycleState(), [a, b]) == [b]
    assert f.filter(req(), CycleState(), [a, b]) == [a, b]


def test_the_prefix_scorer_binds_to_the_cluster_producer_and_sends_a_prefix_back():
    cfg = load(
        "plugins:\n- {type: multicluster-approx-prefix-cache-producer, parameters: {blockSizeTokens: 64}}\n"
        f"- type: multicluster-prefix-cache-scorer\n{MC_DATA_LAYER}"
    )
    scorer = cfg.plugins["multicluster-prefix-cache-scorer"]
    assert isinstance(scorer, PrefixCacheScorer)
    assert scorer.producer is cfg.plugins["multicluster-approx-prefix-cache-producer"]
    assert cfg.plugin_parameters["multicluster-prefix-cache-scorer"]["prefixMatchInfoProducerName"] == (
        "multicluster-approx-prefix-cache-producer"
    )
    scheduler = Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)
    a, b = cluster("a", kv=0.0, queue=0.0), cluster("b", kv=0.0, queue=0.0)
    prompt = "a shared system prompt of some length " * 40
    first = scheduler.schedule(req(prompt), [a, b]).endpoints[0]
    assert all(scheduler.schedule(req(prompt), [a, b]).endpoints[0] is first for _ in range(5))


# -- the Alpha rule, the example config and check-config -----------------------------------------------


def test_the_example_config_loads_with_the_experimental_flag():
    cfg = load_config_file(EXAMPLE, allow_experimental=True)
    assert {cfg.plugin_types[n] for n in cfg.plugin_types} >= set(MC_TYPES)
    dl = cfg.data_layer
    assert dl.discovery is not None and (dl.discovery.path, dl.discovery.peer_clusters, dl.discovery.watch_file) == (
        "/etc/epp/clusters.yaml", True, True,
    )  # fmt: skip
    assert dl.metrics is not None and (dl.metrics.scheme, dl.metrics.ca_cert_path, dl.metrics.interval) == ("https", "/etc/epp/tls/ca.crt", 1.0)
    assert isinstance(dl.extraction, PoolMetricsExtraction)
    profile = cfg.profile
    assert [f.name for f in profile.filters] == ["session-affinity"]
    assert [(w.scorer.name, w.weight) for w in profile.scorers] == [("kv-cache", 2.0), ("queue", 2.0), ("prefix", 3.0)]
    assert cfg.warnings == ()


def test_without_the_flag_an_alpha_plugin_is_refused_naming_the_flag():
    with pytest.raises(ConfigError) as e:
        load_config_file(EXAMPLE)
    msg = str(e.value)
    assert msg.startswith(f"{EXAMPLE}: plugins[0].type: plugin 'discovery' (type multicluster-file-discovery) has Alpha stability")
    assert "--allow-experimental-plugins" in msg and "queue (multicluster-queue-scorer)" in msg


def test_check_config_takes_the_flag_as_epp_serve_does(capsys):
    assert cli.main(["check-config", str(EXAMPLE)]) == 2
    assert "--allow-experimental-plugins is not set" in capsys.readouterr().err
    assert cli.main(["check-config", "--allow-experimental-plugins", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert f"{EXAMPLE}: valid (llm-d.ai/v1alpha1)" in out
    assert "discovery: peer clusters from file /etc/epp/clusters.yaml, re-read when it changes" in out
    assert "each peer cluster's pool aggregates llm_d_epp_average_kv_cache_utilization and llm_d_epp_average_queue_size" in out
    assert "scorers: kv-cache x2, queue x2, prefix x3" in out


def test_epp_serve_takes_the_flag():
    args = cli.build_parser().parse_args(["serve", "--allow-experimental-plugins"])
    assert args.allow_experimental_plugins is True
    assert cli.build_parser().parse_args(["serve", "--allow-experimental-plugins=false"]).allow_experimental_plugins is False
    assert cli.build_parser().parse_args(["serve"]).allow_experimental_plugins is False


# -- two clusters, each an llm-epp's pool metrics on an HTTP server ------------------------------------


class PeerCluster:
    """What a cluster-scoped EPP scrapes from a peer: the peer EPP's own /metrics (EppMetrics over its
    datastore), with `load()` setting the peer's pods' queues and KV-cache use."""

    def __init__(self, name: str, pods: int = 2) -> None:
        self.name = name
        self.datastore = Datastore()
        self.datastore.set_endpoints(EndpointSpec(f"{name}-pod-{i}", f"10.0.{i}.1", 8000) for i in range(pods))
        self.metrics = EppMetrics(pool_name=f"pool-{name}", datastore=self.datastore)
        self.port = 0
        self.answer: bytes | None = None  # instead of the metrics
        self._runner: web.AppRunner | None = None

    def load(self, waiting: int, kv: float) -> None:
        for ep in self.datastore.candidates():
            self.datastore.update_metrics(ep.address, Metrics(waiting=waiting, kv_usage=kv, updated_at=time.monotonic()))

    async def _serve(self, request: web.Request) -> web.Response:
        return web.Response(body=self.answer if self.answer is not None else self.metrics.exposition(), content_type="text/plain")

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def entry(self) -> str:
        return (f"- {{name: {self.name}, address: gw.{self.name}.example.com, port: '443', "
                f"labels: {{metricsAddress: 127.0.0.1, metricsPort: '{self.port}'}}}}\n")  # fmt: skip


@pytest.fixture
async def peers() -> AsyncIterator[Callable[..., asyncio.Future[PeerCluster]]]:
    started: list[PeerCluster] = []

    async def make(name: str, ssl_context: ssl.SSLContext | None = None) -> PeerCluster:
        peer = PeerCluster(name)
        await peer.start(ssl_context)
        started.append(peer)
        return peer

    yield make  # type: ignore[misc]
    for peer in started:
        await peer.stop()


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_the_cluster_scoped_picker_prefers_the_less_loaded_cluster(peers, tmp_path):
    a, b = await peers("cluster-a"), await peers("cluster-b")
    a.load(waiting=8, kv=0.9)
    b.load(waiting=1, kv=0.2)
    clusters_file = tmp_path / "clusters.yaml"
    clusters_file.write_text("endpoints:\n" + a.entry() + b.entry())
    text = EXAMPLE.read_text().replace("/etc/epp/clusters.yaml", str(clusters_file))
    text = text.replace("scheme: https\n      caCertPath: /etc/epp/tls/ca.crt", "scheme: http")
    cfg = load_config(text, "multicluster.yaml", allow_experimental=True)
    assert cfg.data_layer.discovery is not None
    ds = Datastore()
    StaticFileDiscovery(cfg.data_layer.discovery.path, ds, peer_clusters=True).load()
    assert cfg.data_layer.metrics is not None
    scraper = MetricsScraper(ds, interval=0.02, timeout=1.0, source=cfg.data_layer.metrics, extraction=cfg.data_layer.extraction)
    task = asyncio.create_task(scraper.run())
    try:
        ep_a, ep_b = ds.get("gw.cluster-a.example.com:443"), ds.get("gw.cluster-b.example.com:443")
        assert ep_a is not None and ep_b is not None
        await eventually(lambda: ep_a.metrics.pool_queue == 8 and ep_b.metrics.pool_queue == 1)
        assert (ep_a.metrics.pool_kv_usage, ep_b.metrics.pool_kv_usage) == pytest.approx((0.9, 0.2))
        scheduler = Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)
        picks = {scheduler.schedule(req(f"question {i}"), ds.candidates()).endpoints[0].name for i in range(5)}
        assert picks == {"cluster-b"}
        assert scheduler.schedule(req("q"), ds.candidates()).destination() == "gw.cluster-b.example.com:443"
        # the load moves: so do the picks
        a.load(waiting=0, kv=0.1)
        b.load(waiting=6, kv=0.8)
        await eventually(lambda: ep_a.metrics.pool_queue == 0 and ep_b.metrics.pool_queue == 6)
        assert {scheduler.schedule(req(f"other {i}"), ds.candidates()).endpoints[0].name for i in range(5)} == {"cluster-a"}
        # a peer whose pool has no live endpoint exports no means: its scrapes fail, it is not offered as idle
        a.datastore.set_endpoints([])
        await eventually(lambda: ep_a.scrape_error is not None)
        assert "no usable sample of llm_d_epp_average_kv_cache_utilization" in ep_a.scrape_error
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_answer_over_the_cap_fails_the_scrape(peers):
    peer = await peers("big")
    peer.load(waiting=1, kv=0.1)
    peer.answer = b"# padding\n" * (PEER_METRICS_MAX_BYTES // 10 + 1)
    ds = Datastore()
    ds.set_endpoints(clusters(peer.entry()))
    source = HttpSource("m", "/metrics", "http", max_bytes=PEER_METRICS_MAX_BYTES)
    scraper = MetricsScraper(ds, interval=0.05, timeout=2.0, source=source, extraction=PoolMetricsExtraction())
    task = asyncio.create_task(scraper.run())
    try:
        (ep,) = ds.candidates()
        await eventually(lambda: ep.scrape_error is not None)
        assert f"at most {PEER_METRICS_MAX_BYTES} are read" in ep.scrape_error
        assert ep.metrics.updated_at == 0.0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_https_is_verified_by_default_against_the_ca_given(peers, tmp_path):
    cert = self_signed()
    cert_dir = write_certificate(cert, tmp_path / "tls")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_dir / "tls.crt", cert_dir / "tls.key")
    peer = await peers("tls", server_ctx)
    peer.load(waiting=3, kv=0.3)
    entry = peer.entry().replace("metricsAddress: 127.0.0.1", "metricsAddress: localhost")

    async def scrape(parameters: str) -> Endpoint:
        cfg = load(f"plugins:\n- type: multicluster-queue-scorer\n{MC_DATA_LAYER}".replace("{scheme: http}", parameters))
        assert cfg.data_layer.metrics is not None
        ds = Datastore()
        ds.set_endpoints(clusters(entry))
        scraper = MetricsScraper(ds, interval=0.05, timeout=2.0, source=cfg.data_layer.metrics, extraction=cfg.data_layer.extraction)
        task = asyncio.create_task(scraper.run())
        try:
            (ep,) = ds.candidates()
            await eventually(lambda: ep.scrape_error is not None or ep.metrics.pool_queue is not None)
            return ep
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    refused = await scrape("{}")  # https, verified: the self-signed certificate is not trusted
    assert refused.scrape_error is not None and "certificate" in refused.scrape_error.lower()
    trusted = await scrape(f"{{caCertPath: '{cert_dir / 'tls.crt'}'}}")
    assert trusted.scrape_error is None and trusted.metrics.pool_queue == 3
    skipped = await scrape("{insecureSkipVerify: true}")
    assert skipped.scrape_error is None and skipped.metrics.pool_queue == 3


def test_epp_serve_applies_the_flag_at_start_and_on_a_reload(tmp_path):
    from extproc.server.runner import EppServer, ServeOptions

    config = tmp_path / "epp.yaml"
    config.write_text(EXAMPLE.read_text().replace("scheme: https\n      caCertPath: /etc/epp/tls/ca.crt", "scheme: http"))
    with pytest.raises(ConfigError, match="--allow-experimental-plugins is not set"):
        EppServer(ServeOptions(config_file=str(config), admin_port=0))
    server = EppServer(ServeOptions(config_file=str(config), admin_port=0, allow_experimental_plugins=True))
    assert server.config is not None and server.data_layer.discovery is not None and server.data_layer.discovery.peer_clusters
    again = server._load_again(config.read_text(), str(config), server.config)  # what the config reloader calls
    assert again.plugin_types["queue"] == "multicluster-queue-scorer"


def test_the_endpoints_view_shows_a_clusters_pool_means():
    from extproc.server.admin import endpoints_view

    ds = Datastore()
    ds.set_endpoints(clusters("- {name: a, address: gw.a.example.com, port: '443'}\n- {name: pod, address: 10.0.0.1, port: '8000'}\n"))
    ds.update_metrics("gw.a.example.com:443", PoolMetricsParser(PoolMetricsExtraction()).parse(POOL))
    a, pod = endpoints_view(ds, None)
    assert (a["pool_queue"], a["pool_kv_usage"], a["waiting"]) == (2.4, 0.25, 2)
    assert "pool_queue" not in pod
