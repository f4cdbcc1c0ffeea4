"""The data layer as configured by `dataLayer` and by `epp serve`'s flags: engine metric mappings
(SGLang, TensorRT-LLM, Triton fixtures), the metrics source's path/port/TLS/interval, /v1/models
extraction, llm-d's endpoints-file format, and an EPP started with a dataLayer config using all of it."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.cli import main as cli
from extproc.datalayer.datastore import Datastore
from extproc.datalayer.endpoints_file import StaticFileDiscovery, parse_endpoints_yaml
from extproc.datalayer.models import ModelsPoller, parse_models
from extproc.datalayer.scraper import (
    MetricsParseError,
    MetricsParser,
    MetricsScraper,
    ScrapeError,
    poll_intervals,
)
from extproc.server.runner import EppServer, ServeOptions
from extproc.server.tls import self_signed
from pickers.config.loader import load_config
from pickers.framework.endpoint import Endpoint, EndpointSpec, ServedModel, ServedModels
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.datalayer.extractors import (
    BUILTIN_ENGINES,
    EngineMetrics,
    MetricSpec,
)
from pickers.plugins.datalayer.sources import DEFAULT_MAX_SCRAPE_RATE, HttpSource
from pickers.plugins.filter.served_model import ServedModelFilter

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
VLLM = "vllm:num_requests_waiting 2\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.5\n"
SGLANG = (FIXTURES / "sglang-metrics.txt").read_text()
TRTLLM = (FIXTURES / "trtllm-serve-metrics.txt").read_text()
TRITON = (FIXTURES / "triton-trtllm-metrics.txt").read_text()


# -- engine mappings -------------------------------------------------------------------------------


def test_sglang_metrics_are_read_with_llm_ds_sglang_mapping():
    m = MetricsParser(BUILTIN_ENGINES["sglang"]).parse(SGLANG)
    assert (m.waiting, m.running) == (5, 10)  # summed over the data-parallel ranks
    assert m.kv_usage == pytest.approx(0.2)  # sglang:token_usage, averaged
    assert (m.block_size, m.num_gpu_blocks) == (1, 360000)  # page_size, num_pages (both ranks)


def test_trtllm_serve_metrics_are_read_with_plain_gauges_for_the_cache():
    m = MetricsParser(BUILTIN_ENGINES["trtllm-serve"]).parse(TRTLLM)
    assert (m.waiting, m.running, m.kv_usage) == (11, 7, pytest.approx(0.64))
    assert (m.block_size, m.num_gpu_blocks) == (32, 12288)


def test_triton_tensorrt_llm_series_are_told_apart_by_their_labels():
    m = MetricsParser(BUILTIN_ENGINES["triton-tensorrt-llm"]).parse(TRITON)
    assert (m.waiting, m.running, m.kv_usage) == (4, 5, pytest.approx(0.4))
    assert (m.block_size, m.num_gpu_blocks) == (64, 2050)


def test_triton_without_a_kv_series_needs_only_its_queue_and_running_series():
    m = MetricsParser(BUILTIN_ENGINES["triton"]).parse("nv_inference_pending_request_count 3\nnv_inference_exec_count 8\n")
    assert (m.waiting, m.running, m.kv_usage) == (3, 8, 0.0)


def test_the_vllm_mapping_does_not_read_another_engines_body():
    with pytest.raises(MetricsParseError, match="vllm:num_requests_waiting"):
        MetricsParser(BUILTIN_ENGINES["vllm"]).parse(SGLANG)


def test_a_missing_sglang_series_is_named_in_the_error():
    body = "\n".join(line for line in SGLANG.splitlines() if not line.startswith("sglang:token_usage"))
    with pytest.raises(MetricsParseError, match="no usable sample of sglang:token_usage"):
        MetricsParser(BUILTIN_ENGINES["sglang"]).parse(body)


def test_a_missing_labelled_series_is_named_with_its_labels():
    body = TRITON.replace('request_type="waiting"', 'request_type="queued"')
    with pytest.raises(MetricsParseError, match='nv_trt_llm_request_metrics\\{request_type="waiting"\\}'):
        MetricsParser(BUILTIN_ENGINES["triton-tensorrt-llm"]).parse(body)


def test_a_configured_engine_reads_its_own_series():
    engine = EngineMetrics(
        "mine",
        queued=MetricSpec.parse("q{status=waiting}"),
        running=MetricSpec.parse("q{status=running}"),
        kv_usage=MetricSpec.parse("cache"),
        cache_info=MetricSpec.parse("info"),
        cache_block_size_label="bs",
        cache_num_blocks_label="n",
    )
    body = 'q{status="waiting"} 4\nq{status="running"} 2\nq{status="done"} 99\ncache 0.7\ninfo{bs="16",n="100"} 1\n'
    m = MetricsParser(engine).parse(body)
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_gpu_blocks) == (4, 2, pytest.approx(0.7), 16, 100)


def test_names_sharing_a_prefix_are_told_apart():
    engine = EngineMetrics("e", queued=MetricSpec.parse("w"), running=MetricSpec.parse("w_running"))
    m = MetricsParser(engine).parse("w_running 3\nw 1\nw_other 50\n")
    assert (m.waiting, m.running) == (1, 3)


_TRITON_TOKENS = st.sampled_from([
    "nv_trt_llm_request_metrics", "nv_trt_llm_kv_cache_block_metrics", "request_type", "kv_cache_block_type",
    "waiting", "scheduled", "fraction", "tokens_per", "max", "{", "}", '"', "\\", ",", "=", " ", "\n", "#",
    "NaN", "+Inf", "1e308", "-5", "0.5", "7", "1e999",
])  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(_TRITON_TOKENS, max_size=60).map("".join)))
def test_a_labelled_mapping_raises_only_metrics_parse_error(text: str) -> None:
    try:
        m = MetricsParser(BUILTIN_ENGINES["triton-tensorrt-llm"]).parse(text)
    except MetricsParseError:
        return
    assert m.waiting >= 0 and m.running >= 0 and 0.0 <= m.kv_usage <= 1.0
    assert m.block_size is None or m.block_size >= 1
    assert m.num_gpu_blocks is None or m.num_gpu_blocks >= 0


# -- the data layer's clock -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("refresh", "intervals", "expected"),
    [
        (0.05, [None], [0.05]),  # no interval: every base tick
        (0.05, [1.0, None], [1.0, 0.05]),
        (0.3, [1.0], [0.9]),  # rounded to the nearest multiple of the tick
        (1.0, [0.1, None], [0.1, 0.1]),  # a shorter interval lowers the tick for every source
        (1.0, [0.01], [0.05]),  # ... but not below 50 ms
        (0.01, [None], [0.01]),  # unless the flag itself is lower
        (0.05, [0.07], [0.05]),
    ],
)
def test_intervals_follow_llm_ds_base_tick(refresh, intervals, expected):
    assert poll_intervals(refresh, intervals) == pytest.approx(expected)


# -- servers ---------------------------------------------------------------------------------------


class Server:
    """An HTTP(S) server on a free loopback port answering fixed bodies by path; counts hits per path."""

    def __init__(self, routes: dict[str, str], ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.routes = routes
        self.ssl_ctx = ssl_ctx
        self.hits: dict[str, int] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _answer(self, request: web.Request) -> web.Response:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        body = self.routes.get(request.path)
        return web.Response(status=404) if body is None else web.Response(text=body)

    async def start(self) -> Server:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=self.ssl_ctx).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def spec(self, **kw: object) -> EndpointSpec:
        return EndpointSpec(name=f"s-{self.port}", host="127.0.0.1", port=self.port, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., asyncio.Future[Server]]]:
    started: list[Server] = []

    async def make(routes: dict[str, str], ssl_ctx: ssl.SSLContext | None = None) -> Server:
        server = await Server(routes, ssl_ctx).start()
        started.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in started:
        await server.stop()


@pytest.fixture
async def run() -> AsyncIterator[Callable[[Callable[[], object]], None]]:
    tasks: list[asyncio.Task[object]] = []

    def start(factory: Callable[[], object]) -> None:
        tasks.append(asyncio.ensure_future(factory()))  # type: ignore[arg-type]

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def endpoint(ds: Datastore, spec: EndpointSpec) -> Endpoint:
    ep = ds.get(spec.address)
    assert ep is not None
    return ep


# -- the metrics source ------------------------------------------------------------------------------


async def test_each_endpoint_is_scraped_with_its_engines_mapping(servers, run):
    vllm, sglang = await servers({"/metrics": VLLM}), await servers({"/metrics": SGLANG})
    ds = Datastore()
    ds.set_endpoints([vllm.spec(), sglang.spec(labels={"llm-d.ai/engine-type": "sglang"})])
    run(MetricsScraper(ds, interval=0.02, timeout=0.5).run)
    a, b = endpoint(ds, vllm.spec()), endpoint(ds, sglang.spec())
    await eventually(lambda: a.metrics.updated_at > 0 and b.metrics.updated_at > 0)
    assert (a.metrics.waiting, b.metrics.waiting, b.metrics.running) == (2, 5, 10)
    assert a.scrape_error is None and b.scrape_error is None


async def test_the_sources_path_and_port_are_scraped(servers, run):
    serving, metrics = await servers({}), await servers({"/stats/prometheus": VLLM})
    ds = Datastore()
    ds.set_endpoints([serving.spec()])
    source = HttpSource("metrics-data-source", "/stats/prometheus", port=metrics.port)
    run(MetricsScraper(ds, interval=0.02, timeout=0.5, source=source).run)
    ep = endpoint(ds, serving.spec())
    await eventually(lambda: ep.metrics.updated_at > 0)
    assert metrics.hits.get("/stats/prometheus", 0) > 0 and serving.hits == {}


async def test_the_endpoints_files_metrics_port_and_path_win_over_the_sources(servers, run):
    own = await servers({"/own": VLLM})
    ds = Datastore()
    spec = EndpointSpec(name="e", host="127.0.0.1", port=9, metrics_port=own.port, metrics_path="/own")
    ds.set_endpoints([spec])
    run(MetricsScraper(ds, interval=0.02, timeout=0.5, source=HttpSource("m", "/other", port=1)).run)
    await eventually(lambda: endpoint(ds, spec).metrics.updated_at > 0)


def _tls() -> tuple[ssl.SSLContext, bytes]:
    cert = self_signed()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    import tempfile

    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as c, tempfile.NamedTemporaryFile("wb", suffix=".pem") as k:
        c.write(cert.cert_pem)
        k.write(cert.key_pem)
        c.flush()
        k.flush()
        server.load_cert_chain(c.name, k.name)
    return server, cert.cert_pem


async def test_https_without_verification_is_llm_ds_default(servers, run):
    server_ctx, _ = _tls()
    secure = await servers({"/metrics": VLLM}, server_ctx)
    ds = Datastore()
    ds.set_endpoints([secure.spec()])
    run(MetricsScraper(ds, interval=0.02, timeout=0.5, source=HttpSource("m", "/metrics", scheme="https")).run)
    await eventually(lambda: endpoint(ds, secure.spec()).metrics.updated_at > 0)


async def test_https_with_verification_trusts_only_the_ca_bundle(servers, run, tmp_path):
    server_ctx, cert_pem = _tls()
    secure = await servers({"/metrics": VLLM}, server_ctx)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(cert_pem)
    trusted, untrusted = Datastore(), Datastore()
    for ds in (trusted, untrusted):
        ds.set_endpoints([secure.spec()])
    run(MetricsScraper(trusted, interval=0.02, timeout=0.5,
                       source=HttpSource("m", "/metrics", scheme="https", insecure_skip_verify=False, ca_cert_path=str(ca))).run)
    run(MetricsScraper(untrusted, interval=0.02, timeout=0.5,
                       source=HttpSource("m", "/metrics", scheme="https", insecure_skip_verify=False)).run)  # fmt: skip
    await eventually(lambda: endpoint(trusted, secure.spec()).metrics.updated_at > 0)
    await eventually(lambda: endpoint(untrusted, secure.spec()).scrape_error is not None)
    assert "certificate" in (endpoint(untrusted, secure.spec()).scrape_error or "").lower()


def test_an_unreadable_ca_bundle_stops_start_up_naming_the_parameter(tmp_path):
    source = HttpSource("my-metrics", "/metrics", scheme="https", insecure_skip_verify=False, ca_cert_path=str(tmp_path / "no.pem"))
    with pytest.raises(ConfigError, match="my-metrics parameters: caCertPath: cannot read the CA bundle"):
        MetricsScraper(Datastore(), source=source)


# -- models-data-source -------------------------------------------------------------------------------


def test_a_vllm_model_list_with_lora_adapters_is_read():
    body = (b'{"object": "list", "data": [{"id": "meta-llama/Llama-3.1-8B", "object": "model", "owned_by": "vllm",'
            b' "root": "/models/llama", "parent": null, "max_model_len": 8192},'
            b' {"id": "sql-lora", "object": "model", "owned_by": "vllm", "root": "/adapters/sql", "parent": "meta-llama/Llama-3.1-8B"}]}')  # fmt: skip
    models = parse_models(body)
    assert models.models == (
        ServedModel("meta-llama/Llama-3.1-8B", None, "vllm"),
        ServedModel("sql-lora", "meta-llama/Llama-3.1-8B", "vllm"),
    )
    assert "sql-lora" in models and "meta-llama/Llama-3.1-8B" in models and "other" not in models


@pytest.mark.parametrize("body", [b"", b"<html>", b"[]", b'{"data": {}}', b'{"data": [{"name": "x"}]}', b'{"data": [{"id": 3}]}'])
def test_a_body_that_is_no_model_list_is_an_error(body):
    with pytest.raises(ScrapeError, match="not an OpenAI model list"):
        parse_models(body)


async def test_the_simulator_lists_its_lora_adapters_and_the_poller_keeps_them(run):
    from vllm_sim.config import SimConfig
    from vllm_sim.server import SimServer

    config = SimConfig.from_profile("gpu", time_scale=0.01, models=("base",), lora_modules=(("sql-lora", "/a/sql"),))
    async with SimServer(config) as sim:
        ds = Datastore()
        spec = EndpointSpec("sim", "127.0.0.1", sim.port)
        ds.set_endpoints([spec])
        run(ModelsPoller(ds, interval=0.05).run)
        ep = endpoint(ds, spec)
        await eventually(lambda: ep.served_models is not None)
        assert ep.served_models is not None
        assert ep.served_models.models == (ServedModel("base", None, "vllm"), ServedModel("sql-lora", "base", "vllm"))
        assert ep.scrape_error is None  # the models poller never marks metrics as failing


async def test_a_failed_models_fetch_keeps_the_last_list(servers, run):
    server = await servers({"/v1/models": '{"data": [{"id": "m"}]}'})
    ds = Datastore()
    ds.set_endpoints([server.spec()])
    run(ModelsPoller(ds, interval=0.02).run)
    ep = endpoint(ds, server.spec())
    await eventually(lambda: ep.served_models is not None)
    server.routes.clear()  # 404 from now on
    hits = server.hits["/v1/models"]
    await eventually(lambda: server.hits["/v1/models"] > hits + 2)
    assert ep.served_models == ServedModels((ServedModel("m"),)) and ep.scrape_error is None


# -- served-model-filter --------------------------------------------------------------------------------


def _ep(port: int, models: tuple[str, ...] | None) -> Endpoint:
    ep = Endpoint(EndpointSpec(f"e{port}", "10.0.0.1", port))
    ep.served_models = None if models is None else ServedModels(tuple(ServedModel(m) for m in models))
    return ep


def _filter(model: str, endpoints: list[Endpoint], target: str = "") -> list[int]:
    req = InferenceRequest("r", "/v1/completions", {}, "completions", model, "p", target_model=target)
    return [ep.spec.port for ep in ServedModelFilter().filter(req, CycleState(), endpoints)]


def test_served_model_filter_keeps_endpoints_listing_the_model_and_those_not_fetched_yet():
    eps = [_ep(1, ("base", "sql-lora")), _ep(2, ("base",)), _ep(3, None)]
    assert _filter("sql-lora", eps) == [1, 3]
    assert _filter("base", eps) == [1, 2, 3]


def test_served_model_filter_reads_the_model_sent_upstream():
    assert _filter("alias", [_ep(1, ("v2",)), _ep(2, ("v1",))], target="v2") == [1]


def test_served_model_filter_keeps_everything_when_no_endpoint_lists_the_model():
    assert _filter("unknown", [_ep(1, ("base",)), _ep(2, ("base",))]) == [1, 2]


# -- file-discovery: llm-d's format -----------------------------------------------------------------------


LLM_D_FILE = """\
endpoints:
  - name: vllm-0
    address: "127.0.0.1"
    port: "{port}"
    labels:
      llm-d.ai/engine-type: sglang
  - name: vllm-0
    namespace: inference
    address: "127.0.0.2"
    port: "8000"
"""


def test_llm_ds_endpoints_file_format_is_read():
    specs = parse_endpoints_yaml(LLM_D_FILE.format(port=8000), source="e.yaml")
    assert [(s.name, s.namespace, s.address, dict(s.labels)) for s in specs] == [
        ("vllm-0", "", "127.0.0.1:8000", {"llm-d.ai/engine-type": "sglang"}),
        ("vllm-0", "inference", "127.0.0.2:8000", {}),  # names are unique within a namespace
    ]


def test_a_name_twice_in_one_namespace_is_refused():
    text = "endpoints:\n- {name: a, address: 10.0.0.1, port: '1'}\n- {name: a, namespace: default, address: 10.0.0.2, port: '1'}\n"
    with pytest.raises(ConfigError, match=r"endpoints\[1\].name: duplicate name 'a'"):
        parse_endpoints_yaml(text, source="e.yaml")


def test_a_json_endpoints_file_is_read():
    specs = parse_endpoints_yaml('{"endpoints": [{"name": "a", "address": "10.0.0.1", "port": "8000"}]}')
    assert specs[0].address == "10.0.0.1:8000"


async def test_file_discovery_without_watch_file_reads_once(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("endpoints:\n- {name: a, address: 10.0.0.1, port: '1'}\n")
    ds = Datastore()
    discovery = StaticFileDiscovery(path, ds, poll_interval=0.01, watch=False)
    discovery.load()
    path.write_text("endpoints:\n- {name: b, address: 10.0.0.2, port: '1'}\n")
    await asyncio.wait_for(discovery.run(), 1)  # returns: nothing watches the file
    assert [ep.address for ep in ds.candidates()] == ["10.0.0.1:1"]


# -- an EPP configured with dataLayer ----------------------------------------------------------------------


def _config(endpoints: Path, extra_plugins: str = "", watch: bool = True) -> str:
    return HEADER + (
        "plugins:\n- type: queue-scorer\n"
        f"- {{name: files, type: file-discovery, parameters: {{path: '{endpoints}', watchFile: {str(watch).lower()}}}}}\n"
        "- {name: scrape, type: metrics-data-source, parameters: {path: /engine/metrics, interval: 200ms}}\n"
        "- {name: engines, type: core-metrics-extractor, parameters: {defaultEngine: trtllm-serve}}\n"
        "- {type: models-data-source, parameters: {interval: 100ms}}\n- type: models-data-extractor\n"
        f"{extra_plugins}"
        "dataLayer:\n  discovery: {pluginRef: files}\n  sources:\n"
        "  - {pluginRef: scrape, extractors: [{pluginRef: engines}]}\n"
        "  - {pluginRef: models-data-source, extractors: [{pluginRef: models-data-extractor}]}\n"
    )


async def test_epp_serve_with_a_data_layer_config_uses_its_discovery_sources_and_intervals(servers, tmp_path):
    model = await servers({"/engine/metrics": TRTLLM, "/v1/models": '{"data": [{"id": "m"}, {"id": "lora-a", "parent": "m"}]}'})
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(f"endpoints:\n- {{name: trt-0, address: '127.0.0.1', port: '{model.port}'}}\n")
    config = tmp_path / "epp.yaml"
    config.write_text(_config(endpoints, "- type: served-model-filter\n"))
    server = EppServer(ServeOptions(grpc_port=0, grpc_health_port=0, metrics_port=0, admin_port=0,
                                    bind_address="127.0.0.1", config_file=str(config), refresh_metrics_interval=0.05))  # fmt: skip
    await server.start()
    try:
        assert [ep.name for ep in server.datastore.candidates()] == ["trt-0"]  # from dataLayer.discovery
        ep = server.datastore.candidates()[0]
        await eventually(lambda: ep.metrics.updated_at > 0 and ep.served_models is not None)
        assert (ep.metrics.waiting, ep.metrics.running, ep.metrics.block_size) == (11, 7, 32)  # trtllm-serve, the default engine
        assert ep.served_models is not None and [m.id for m in ep.served_models.models] == ["m", "lora-a"]
        assert model.hits.get("/metrics") is None  # only the configured path
        assert server._data_pollers["metrics-scraper"].interval == pytest.approx(0.2)  # 4 ticks of 50 ms
        started, hits = time.monotonic(), model.hits["/engine/metrics"]
        await asyncio.sleep(1.0)
        rate = (model.hits["/engine/metrics"] - hits) / (time.monotonic() - started)
        assert rate < 10  # every 200 ms, not every 50 ms tick (20/s)

        endpoints.write_text(f"endpoints:\n- {{name: trt-1, address: '127.0.0.1', port: '{model.port}'}}\n")
        await eventually(lambda: [e.name for e in server.datastore.candidates()] == ["trt-1"])  # watchFile: true
    finally:
        await server.stop(0)


def test_endpoints_flag_and_data_layer_discovery_together_are_refused(tmp_path):
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    with pytest.raises(ConfigError, match=r"--endpoints: --config-text: dataLayer.discovery names the endpoints file .* and so does --endpoints"):
        EppServer(ServeOptions(config_text=_config(endpoints), endpoints_file=str(endpoints)))


def test_with_data_layer_discovery_the_pool_name_only_names_the_pool(tmp_path):
    from extproc.kubernetes.runtime import KubernetesOptions

    endpoints = tmp_path / "endpoints.yaml"
    server = EppServer(ServeOptions(config_text=_config(endpoints), kubernetes=KubernetesOptions(pool_name="pool")))
    assert server._kubernetes is None and server._endpoints_file == str(endpoints)
    server = EppServer(ServeOptions(config_text=_config(endpoints), kubernetes=KubernetesOptions(pool_name="pool", leader_election=True)))
    assert server._kubernetes is not None and not server._kubernetes.discovers and server._kubernetes.leader_election


def test_with_data_layer_discovery_an_endpoint_selector_is_refused(tmp_path):
    from extproc.kubernetes.runtime import KubernetesOptions

    opts = KubernetesOptions(endpoint_selector="app=vllm", endpoint_target_ports="8000")
    with pytest.raises(ConfigError, match="--endpoint-selector: .*dataLayer.discovery lists the endpoints"):
        EppServer(ServeOptions(config_text=_config(tmp_path / "e.yaml"), kubernetes=opts))


def test_inject_defaults_false_starts_no_scraper():
    server = EppServer(ServeOptions(config_text=HEADER + "plugins:\n- type: queue-scorer\ndataLayer: {injectDefaults: false}\n"))
    assert server._data_pollers == {}


def test_without_a_config_the_flags_set_the_default_scraper():
    server = EppServer(ServeOptions(refresh_metrics_interval=0.25))
    scraper = server._data_pollers["metrics-scraper"]
    assert isinstance(scraper, MetricsScraper) and scraper.interval == 0.25 and scraper.source.path == "/metrics"


def test_check_config_prints_the_data_layer(tmp_path, capsys):
    path = tmp_path / "epp.yaml"
    path.write_text(_config(tmp_path / "endpoints.yaml", watch=False))
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  dataLayer:\n    metrics: scrape http://<endpoint>:<port>/engine/metrics every 0.2s; engines by label llm-d.ai/engine-type" in out
    assert "default trtllm-serve)\n    models: models-data-source http://<endpoint>:<port>/v1/models every 0.1s\n" in out
    assert f"    discovery: file {tmp_path / 'endpoints.yaml'}, read once\n" in out
    assert "    scrape (metrics-data-source): scheme=http, path=/engine/metrics, port=unset" in out


def test_the_default_data_layer_is_not_printed(tmp_path, capsys):
    path = tmp_path / "epp.yaml"
    path.write_text(HEADER + "plugins:\n- type: queue-scorer\n")
    assert cli.main(["check-config", str(path)]) == 0
    assert "dataLayer" not in capsys.readouterr().out


def test_loaded_config_keeps_the_typed_data_layer(tmp_path):
    cfg = load_config(_config(tmp_path / "e.yaml"), "t.yaml")
    assert cfg.data_layer.metrics is not None and cfg.data_layer.metrics.interval == pytest.approx(0.2)


def test_the_scrape_rate_cap_stretches_every_endpoints_period_past_it(caplog):
    """--max-scrape-rate: N endpoints every `interval` is N / interval fetches a second; past the cap each
    endpoint is polled every N / cap seconds, logged once when the cap starts binding and when it stops."""
    ds = Datastore()
    scraper = MetricsScraper(ds, interval=0.05, max_rate=100.0)
    scraper._pollers = {f"10.0.0.{i}:8000": None for i in range(4)}  # type: ignore[misc]  # 80 fetches/s: under the cap
    assert scraper.period() == 0.05
    scraper._pollers.update({f"10.0.1.{i}:8000": None for i in range(16)})  # type: ignore[misc]  # 20 endpoints: 400/s
    with caplog.at_level(logging.INFO, logger="extproc.datalayer.scraper"):
        assert scraper.period() == pytest.approx(0.2) and scraper.period() == pytest.approx(0.2)
        scraper._pollers = {"10.0.0.1:8000": None}  # type: ignore[misc]
        assert scraper.period() == 0.05
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "20 endpoints every 0.05s would be 400 fetches/s, over --max-scrape-rate 100: each endpoint every 0.2s" in messages[0]
    assert "every 0.05s again" in messages[1]
    assert MetricsScraper(ds, interval=0.05).period() == 0.05  # no cap


@pytest.mark.parametrize(("flag", "expected"), [(None, DEFAULT_MAX_SCRAPE_RATE), ("250", 250.0), ("0", None)])
def test_the_scrape_rate_flag_reaches_every_poller(flag, expected):
    args = cli.build_parser().parse_args(["serve", *(["--max-scrape-rate", flag] if flag else [])])
    server = EppServer(ServeOptions(max_scrape_rate=args.max_scrape_rate))
    assert server._data_pollers["metrics-scraper"].max_rate == expected


@pytest.mark.parametrize("flag", ["-1", "fast", "inf", "nan"])
def test_a_bad_scrape_rate_is_refused(flag, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--max-scrape-rate", flag])
    assert "--max-scrape-rate: expected fetches a second (a number, 0 for no cap)" in capsys.readouterr().err
