"""The vLLM metrics parser and the per-endpoint scraper (real HTTP servers on loopback ports)."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.scraper import MetricsParseError, MetricsParser, MetricsScraper, SampleFinder, _SAMPLE_TAIL, labels_of, parse_vllm_metrics
from extproc.devstack.ports import reserve_port
from pickers.framework.endpoint import EndpointSpec
from pickers.plugins.datalayer.extractors import DEFAULT_EXTRACTION
from pickers.plugins.datalayer.sources import HttpSource

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _histogram(name: str, help_: str, buckets: list[str], engines: int = 2) -> str:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    for engine in range(engines):
        labels = f'engine="{engine}",model_name="{MODEL}"'
        for i, le in enumerate(buckets):
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {float(i * 3)}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {float(len(buckets) * 3)}')
        lines.append(f"{name}_count{{{labels}}} {float(len(buckets) * 3)}")
        lines.append(f"{name}_sum{{{labels}}} 12.345")
    lines.append(f"# HELP {name}_created {help_}")
    lines.append(f"# TYPE {name}_created gauge")
    for engine in range(engines):
        lines.append(f'{name}_created{{engine="{engine}",model_name="{MODEL}"}} 1.7318e+09')
    return "\n".join(lines)


_SECONDS = ["0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5",
            "0.75", "1.0", "2.5", "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "160.0",
            "640.0", "2560.0"]
_TOKENS = ["1.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0", "512.0", "1024.0", "2048.0",
           "4096.0", "8192.0", "16384.0"]

VLLM_METRICS = "\n".join(
    [
        "# HELP python_gc_objects_collected_total Objects collected during gc",
        "# TYPE python_gc_objects_collected_total counter",
        'python_gc_objects_collected_total{generation="0"} 18236.0',
        'python_gc_objects_collected_total{generation="1"} 2377.0',
        "# HELP process_resident_memory_bytes Resident memory size in bytes.",
        "# TYPE process_resident_memory_bytes gauge",
        "process_resident_memory_bytes 2.147483648e+09",
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 3.0',
        f'vllm:num_requests_running{{engine="1",model_name="{MODEL}"}} 2.0',
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f'vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 4.0',
        f'vllm:num_requests_waiting{{engine="1",model_name="{MODEL}"}} 1.0',
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f'vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}} 0.5',
        f'vllm:kv_cache_usage_perc{{engine="1",model_name="{MODEL}"}} 0.25',
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
        "# TYPE vllm:prefix_cache_queries_total counter",
        f'vllm:prefix_cache_queries_total{{engine="0",model_name="{MODEL}"}} 12000.0',
        f'vllm:prefix_cache_queries_total{{engine="1",model_name="{MODEL}"}} 8000.0',
        "# HELP vllm:prefix_cache_queries_created Prefix cache queries, in terms of number of queried tokens.",
        "# TYPE vllm:prefix_cache_queries_created gauge",
        f'vllm:prefix_cache_queries_created{{engine="0",model_name="{MODEL}"}} 1.7318e+09',
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
        "# TYPE vllm:prefix_cache_hits_total counter",
        f'vllm:prefix_cache_hits_total{{engine="0",model_name="{MODEL}"}} 3000.0',
        f'vllm:prefix_cache_hits_total{{engine="1",model_name="{MODEL}"}} 1000.0',
        "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
        "# TYPE vllm:num_preemptions_total counter",
        f'vllm:num_preemptions_total{{engine="0",model_name="{MODEL}"}} 0.0',
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f'vllm:prompt_tokens_total{{engine="0",model_name="{MODEL}"}} 523421.0',
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
        f'vllm:request_success_total{{engine="0",finished_reason="stop",model_name="{MODEL}"}} 310.0',
        f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{MODEL}"}} 12.0',
        "# HELP vllm:lora_requests_info Running stats on lora requests.",
        "# TYPE vllm:lora_requests_info gauge",
        # Two series: the newest timestamp (value) wins, whatever the order.
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora,tweet-lora",'
        'waiting_lora_adapters=""} 1.7318e+09',
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora, tweet-lora,chat-lora",'
        'waiting_lora_adapters="summ-lora"} 1.7319e+09',
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
        'vllm:cache_config_info{block_size="16",cache_dtype="auto",calculate_kv_scales="False",'
        'cpu_offload_gb="0",enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",'
        'is_attention_free="False",num_cpu_blocks="None",num_gpu_blocks="27834",'
        'num_gpu_blocks_override="None",prefix_caching_hash_algo="builtin",sliding_window="None",'
        'swap_space="4",swap_space_bytes="4294967296"} 1.0',
        'vllm:cache_config_info{block_size="16",cache_dtype="auto",calculate_kv_scales="False",'
        'cpu_offload_gb="0",enable_prefix_caching="True",engine="1",gpu_memory_utilization="0.9",'
        'is_attention_free="False",num_cpu_blocks="None",num_gpu_blocks="27834",'
        'num_gpu_blocks_override="None",prefix_caching_hash_algo="builtin",sliding_window="None",'
        'swap_space="4",swap_space_bytes="4294967296"} 1.0',
        _histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", _SECONDS),
        _histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _SECONDS),
        _histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", _SECONDS),
        _histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", _SECONDS),
        _histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", _TOKENS),
        _histogram("vllm:request_generation_tokens", "Number of generation tokens processed.", _TOKENS),
        _histogram("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", _TOKENS),
        "",
    ]
)

MINIMAL = (
    "vllm:num_requests_waiting 2\n"
    "vllm:num_requests_running 1\n"
    "vllm:kv_cache_usage_perc 0.5\n"
)


# -- parser -----------------------------------------------------------------------------------


def test_parses_a_realistic_vllm_body() -> None:
    m = parse_vllm_metrics(VLLM_METRICS)
    assert (m.waiting, m.running) == (5, 5)  # summed over engine ranks
    assert m.kv_usage == pytest.approx(0.375)  # averaged over engine ranks
    assert m.block_size == 16
    assert m.num_gpu_blocks == 2 * 27834
    assert m.prefix_cache_hits == 4000.0
    assert m.prefix_cache_queries == 20000.0
    assert m.updated_at == 0.0


def test_newest_lora_series_wins_whatever_the_order() -> None:
    lines = VLLM_METRICS.split("\n")
    lora = [i for i, line in enumerate(lines) if line.startswith("vllm:lora_requests_info")]
    lines[lora[0]], lines[lora[1]] = lines[lora[1]], lines[lora[0]]
    for text in (VLLM_METRICS, "\n".join(lines)):
        m = parse_vllm_metrics(text)
        assert m.running_lora_adapters == {"sql-lora", "tweet-lora", "chat-lora"}
        assert m.waiting_lora_adapters == {"summ-lora"}
        assert m.max_lora == 4


def test_no_lora_info_means_no_adapters() -> None:
    m = parse_vllm_metrics(MINIMAL)
    assert m.running_lora_adapters == frozenset() and m.max_lora is None
    assert m.block_size is None and m.num_gpu_blocks is None


def test_old_kv_metric_name_is_read() -> None:
    text = MINIMAL.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    assert parse_vllm_metrics(text).kv_usage == 0.5


def test_new_kv_name_wins_over_old() -> None:
    assert parse_vllm_metrics(MINIMAL + "vllm:gpu_cache_usage_perc 0.9\n").kv_usage == 0.5


def test_timestamps_after_the_value_are_ignored() -> None:
    text = (
        "vllm:num_requests_waiting 7 1700000000000\n"
        'vllm:num_requests_running{model_name="m"} 3.0 1700000000000\n'
        "vllm:kv_cache_usage_perc 0.25\t1700000000000\r\n"
    )
    m = parse_vllm_metrics(text)
    assert (m.waiting, m.running, m.kv_usage) == (7, 3, 0.25)


def test_escaped_label_values_are_decoded() -> None:
    text = MINIMAL + (
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a\\"b,c}d,e\\\\f",'
        'waiting_lora_adapters="x\\ny"} 1.0\n'
    )
    m = parse_vllm_metrics(text)
    assert m.running_lora_adapters == {'a"b', "c}d", "e\\f"}
    assert m.waiting_lora_adapters == {"x\ny"}


def test_nan_and_inf_samples_are_skipped() -> None:
    text = MINIMAL + (
        'vllm:num_requests_waiting{engine="1"} NaN\n'
        'vllm:num_requests_running{engine="1"} +Inf\n'
        'vllm:kv_cache_usage_perc{engine="1"} -Inf\n'
    )
    m = parse_vllm_metrics(text)
    assert (m.waiting, m.running, m.kv_usage) == (2, 1, 0.5)


def test_garbage_lines_are_skipped() -> None:
    text = (
        "<html>oops</html>\n"
        "vllm:num_requests_waiting{unterminated=\"x} 5\n"
        "vllm:num_requests_waiting abc\n"
        "vllm:num_requests_waitingfoo 9\n"
        "vllm:num_requests_waiting_total 9\n"
        "# vllm:num_requests_waiting 100\n"
        "xvllm:num_requests_running 100\n"
        "\x00\xff{}}} = ,,\n" + MINIMAL
    )
    m = parse_vllm_metrics(text)
    assert (m.waiting, m.running, m.kv_usage) == (2, 1, 0.5)


def test_kv_usage_is_clamped_to_one() -> None:
    assert parse_vllm_metrics(MINIMAL.replace("0.5", "1.7")).kv_usage == 1.0


@pytest.mark.parametrize(
    "missing", ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"]
)
def test_a_missing_required_gauge_is_an_error(missing: str) -> None:
    text = "\n".join(line for line in MINIMAL.splitlines() if not line.startswith(missing))
    with pytest.raises(MetricsParseError, match=missing):
        parse_vllm_metrics(text)


@pytest.mark.parametrize("body", ["", "# HELP nothing\n", "<html><body>502</body></html>", "not metrics"])
def test_a_body_without_the_gauges_is_an_error(body: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_vllm_metrics(body)


_TOKENS_ALPHABET = st.sampled_from(
    [
        "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc", "vllm:cache_config_info", "vllm:lora_requests_info",
        "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "{", "}", '"', "\\",
        ",", "=", " ", "\t", "\n", "\r", "#", "NaN", "+Inf", "-Inf", "1e308", "-5", "0.5", "7",
        'num_gpu_blocks="', 'block_size="', 'max_lora="', 'running_lora_adapters="', "1e999",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(_TOKENS_ALPHABET, max_size=60).map("".join)))
def test_parser_raises_only_metrics_parse_error(text: str) -> None:
    try:
        m = parse_vllm_metrics(text)
    except MetricsParseError:
        return
    assert m.waiting >= 0 and m.running >= 0
    assert 0.0 <= m.kv_usage <= 1.0 and not math.isnan(m.kv_usage)


# The sample pattern as it was written first, with backtracking quantifiers: the possessive ones in
# extproc.datalayer.scraper (2.5x faster on vLLM's long cache-config labels) must find the same samples
_BACKTRACKING_TAIL = (
    r"[ \t]*(?:\{((?:[^\"}\n]|\"(?:[^\"\\\n]|\\.)*\")*)\})?[ \t]*[ \t]([^ \t\r\n]+)(?:[ \t]+([^ \t\r\n#]+))?"
)
_BACKTRACKING_LABEL = re.compile(r"[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*\"((?:[^\"\\\n]|\\.)*)\"[ \t]*,?")


_SOUP = st.lists(_TOKENS_ALPHABET | st.sampled_from(["a", "b=", '="x"', '\\"', "} 1", "{a=\"1\"}", " 1", "\t2 3"]), max_size=12)
_LINES = st.lists(st.tuples(st.sampled_from(["vllm:num_requests_waiting", "vllm:cache_config_info", " ", ""]), _SOUP), max_size=8)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_SOUP.map("".join), _LINES.map(lambda lines: "\n".join(name + "".join(soup) for name, soup in lines))))
def test_the_sample_pattern_finds_what_the_backtracking_one_finds(text: str) -> None:
    finder = SampleFinder(["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:cache_config_info"])
    assert finder._pattern is not None
    assert finder._pattern.pattern.endswith(_SAMPLE_TAIL)
    old = re.compile(finder._pattern.pattern.removesuffix(_SAMPLE_TAIL) + _BACKTRACKING_TAIL)
    assert [m.groups() for m in finder.samples(text)] == [m.groups() for m in old.finditer("\n" + text)]
    for m in finder.samples(text):
        if m.group(2):
            assert labels_of(m.group(2)) == {k: _unescaped(v) for k, v in _BACKTRACKING_LABEL.findall(m.group(2))}


def _unescaped(value: str) -> str:
    return re.sub(r"\\(.)", lambda e: {"n": "\n", "\\": "\\", '"': '"'}.get(e.group(1), "\\" + e.group(1)), value)


def test_each_cache_config_is_read_from_its_own_labels() -> None:
    """The cache-info labels are read once per distinct text: a server whose config changes (or another
    endpoint's) gets its own numbers, and a text too long to keep is read every time."""
    parser = MetricsParser(DEFAULT_EXTRACTION.engines["vllm"])

    def body(blocks: int, size: int, pad: int = 0) -> str:
        info = f'vllm:cache_config_info{{block_size="{size}",num_gpu_blocks="{blocks}",x="{"y" * pad}"}} 1.0\n'
        return MINIMAL + "\n" + info

    assert (parser.parse(body(100, 16)).num_gpu_blocks, parser.parse(body(100, 16)).block_size) == (100, 16)
    assert (parser.parse(body(200, 32)).num_gpu_blocks, parser.parse(body(200, 32)).block_size) == (200, 32)
    assert parser.parse(body(100, 16)).num_gpu_blocks == 100
    assert parser.parse(body(300, 64, pad=20_000)).num_gpu_blocks == 300
    assert parser.parse(body(400, 64, pad=20_000)).num_gpu_blocks == 400
    assert all(len(text) < 20_000 for text in parser._cache_infos)


# -- scraper against real HTTP servers ------------------------------------------------------


class FakeVllm:
    """A /metrics server on a free loopback port whose answer a test can change."""

    def __init__(self) -> None:
        self.body = MINIMAL
        self.status = 200
        self.hang = False
        self.hits = 0
        self.port = 0
        self.gets: list[tuple[str, list[str]]] = []  # each GET's path and name[] values
        self.filtered: tuple[int, str] | None = None  # the answer to GET /metrics/, when set
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.gets.append((request.path, request.query.getall("name[]", [])))
        if self.hang:
            await asyncio.Event().wait()
        if request.path == "/metrics/" and self.filtered is not None:
            return web.Response(status=self.filtered[0], text=self.filtered[1])
        return web.Response(status=self.status, text=self.body)

    async def start(self, slash: bool = True) -> None:
        """slash: also serve /metrics/ (where vLLM honours the series filter); the same page here."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        if slash:
            app.router.add_get("/metrics/", self._metrics)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def spec(self, name: str | None = None) -> EndpointSpec:
        return EndpointSpec(name=name or f"sim-{self.port}", host="127.0.0.1", port=self.port)


@pytest.fixture
async def servers() -> AsyncIterator[Callable[[], asyncio.Future[FakeVllm]]]:
    started: list[FakeVllm] = []

    async def make(slash: bool = True) -> FakeVllm:
        server = FakeVllm()
        await server.start(slash)
        started.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in started:
        await server.stop()


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@pytest.fixture
async def running_scraper() -> AsyncIterator[Callable[..., MetricsScraper]]:
    tasks: list[asyncio.Task[None]] = []

    def start(ds: Datastore, **kwargs: float) -> MetricsScraper:
        kwargs.setdefault("interval", 0.01)
        kwargs.setdefault("timeout", 0.5)
        scraper = MetricsScraper(ds, **kwargs)  # type: ignore[arg-type]
        tasks.append(asyncio.create_task(scraper.run()))
        return scraper

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_scraper_writes_metrics_of_endpoints_present_at_start(servers, running_scraper) -> None:
    sim = await servers()
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    before = time.monotonic()
    running_scraper(ds)
    ep = ds.get(sim.spec().address)
    assert ep is not None
    await eventually(lambda: ep.metrics.updated_at > 0)
    assert (ep.metrics.waiting, ep.metrics.running, ep.metrics.kv_usage) == (2, 1, 0.5)
    assert ep.metrics.updated_at >= before
    assert not ds.is_stale(ep)


async def test_scraper_keeps_metrics_fresh(servers, running_scraper) -> None:
    sim = await servers()
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    running_scraper(ds)
    ep = ds.get(sim.spec().address)
    assert ep is not None
    await eventually(lambda: ep.metrics.waiting == 2)
    sim.body = MINIMAL.replace("waiting 2", "waiting 9")
    await eventually(lambda: ep.metrics.waiting == 9)


async def test_http_500_records_an_error_and_keeps_old_metrics(servers, running_scraper) -> None:
    sim = await servers()
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    running_scraper(ds)
    ep = ds.get(sim.spec().address)
    assert ep is not None
    await eventually(lambda: ep.metrics.updated_at > 0)
    sim.status = 500
    await eventually(lambda: ep.scrape_error is not None)
    assert "HTTP 500" in (ep.scrape_error or "")
    assert ep.metrics.waiting == 2  # the last good metrics stay; staleness is judged by age
    sim.status = 200
    await eventually(lambda: ep.scrape_error is None)


async def test_unparsable_body_records_an_error(servers, running_scraper) -> None:
    sim = await servers()
    sim.body = "<html>hello</html>"
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    running_scraper(ds)
    ep = ds.get(sim.spec().address)
    assert ep is not None
    await eventually(lambda: ep.scrape_error is not None)
    assert "vllm:num_requests_waiting" in (ep.scrape_error or "")
    assert ep.metrics.updated_at == 0.0 and ds.is_stale(ep)


async def test_an_unchanged_body_is_not_parsed_again_but_its_metrics_are_fresh(servers, running_scraper, monkeypatch) -> None:
    parsed: list[str] = []
    real = MetricsParser.parse_with_attributes

    def counting(self: MetricsParser, text: str):  # type: ignore[no-untyped-def]
        parsed.append(text)
        return real(self, text)

    monkeypatch.setattr(MetricsParser, "parse_with_attributes", counting)
    sim = await servers()
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    running_scraper(ds)
    ep = ds.get(sim.spec().address)
    assert ep is not None
    await eventually(lambda: sim.hits >= 5)
    first = ep.metrics
    assert len(parsed) == 1 and first.waiting == 2  # five scrapes of the same bytes, one parse
    await eventually(lambda: ep.metrics.updated_at > first.updated_at)  # each scrape still refreshes the time
    assert ep.metrics is not first and ep.metrics.waiting == 2  # a new object: a pick may hold the old one
    sim.body = MINIMAL.replace("waiting 2", "waiting 7")
    await eventually(lambda: ep.metrics.waiting == 7)
    assert len(parsed) == 2
    sim.body = MINIMAL  # back to the first bytes: parsed again (only the last body is remembered)
    await eventually(lambda: ep.metrics.waiting == 2)
    assert len(parsed) == 3


VLLM_NAMES = sorted({
    "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
    "vllm:cache_config_info", "vllm:lora_requests_info", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
})  # fmt: skip


async def test_the_scraper_asks_for_only_the_series_its_parser_reads(servers, running_scraper) -> None:
    sim = await servers()
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    running_scraper(ds)
    await eventually(lambda: ds.candidates()[0].metrics.updated_at > 0 and sim.hits >= 3)
    assert all(get == ("/metrics/", VLLM_NAMES) for get in sim.gets), sim.gets[:3]  # every GET, not just the first
    assert ds.candidates()[0].scrape_error is None


@pytest.mark.parametrize(
    "answer",
    [(400, "bad request"), (404, "not found"), (307, ""), (200, ""), (200, "# an old prometheus_client in multiprocess mode\n"), None],
    ids=["400", "404", "redirect", "empty", "no gauges", "no /metrics/ route"],
)  # fmt: skip
async def test_a_server_that_cannot_filter_is_asked_for_its_whole_page(servers, running_scraper, answer) -> None:
    """A 3xx or 4xx, or a page without the gauges, to the filtered GET: the same scrape fetches the whole
    page at the source's URL, no error is recorded, and that endpoint is asked for its whole page from
    then on."""
    sim = await servers(slash=answer is not None)
    sim.filtered = answer
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    failures: list[str] = []
    ds.on_scrape_failure(lambda ep, error: failures.append(error))
    running_scraper(ds)
    await eventually(lambda: sim.hits >= 5)
    ep = ds.candidates()[0]
    assert ep.metrics.running == 1 and ep.scrape_error is None and not failures
    filtered = [("/metrics/", VLLM_NAMES)] if answer is not None else []  # aiohttp answers the 404 itself
    assert sim.gets[: len(filtered)] == filtered and all(get == ("/metrics", []) for get in sim.gets[len(filtered) :])


async def test_when_the_whole_page_fails_too_the_filter_is_kept(servers, running_scraper) -> None:
    """A server whose pages both lack the gauges (starting, say): the whole page's error is recorded and
    the next scrape asks with the filter again; once the pages carry them, the filtered one is read."""
    sim = await servers()
    sim.body = "# no gauges yet\n"
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    running_scraper(ds)
    await eventually(lambda: sim.hits >= 6)
    ep = ds.candidates()[0]
    assert ep.scrape_error is not None and "no usable sample" in ep.scrape_error
    assert sim.gets[:4] == [("/metrics/", VLLM_NAMES), ("/metrics", []), ("/metrics/", VLLM_NAMES), ("/metrics", [])]
    sim.body = MINIMAL
    await eventually(lambda: ds.candidates()[0].scrape_error is None)
    sim.gets.clear()
    await eventually(lambda: len(sim.gets) >= 2)
    assert all(get == ("/metrics/", VLLM_NAMES) for get in sim.gets)


async def test_a_server_error_to_the_filtered_get_is_the_servers_not_the_filters(servers, running_scraper) -> None:
    sim = await servers()
    sim.filtered = (503, "starting")
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    running_scraper(ds)
    await eventually(lambda: sim.hits >= 3)
    assert ds.candidates()[0].scrape_error == f"HTTP 503 from http://{sim.spec().address}/metrics"
    assert all(get == ("/metrics/", VLLM_NAMES) for get in sim.gets)  # still filtered: a 5xx says nothing of the query
    sim.filtered = None
    await eventually(lambda: ds.candidates()[0].scrape_error is None)


async def test_series_filter_off_fetches_the_whole_page(servers, running_scraper) -> None:
    sim = await servers()
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    running_scraper(ds, source=HttpSource("metrics-data-source", "/metrics"))
    await eventually(lambda: sim.hits >= 3)
    assert all(get == ("/metrics", []) for get in sim.gets)


async def test_the_filter_joins_a_configured_query(servers, running_scraper) -> None:
    sim = await servers()
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    scraper = running_scraper(ds, source=HttpSource("metrics-data-source", "/metrics?x=1", series_filter=True))
    await eventually(lambda: sim.hits >= 2)
    assert scraper.url(ds.candidates()[0]).startswith(f"http://{sim.spec().address}/metrics/?x=1&name%5B%5D=")
    assert sim.gets[0] == ("/metrics/", VLLM_NAMES)


async def test_a_redirect_is_an_error_with_its_status_not_followed(servers, running_scraper) -> None:
    sim = await servers()
    sim.status = 302
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    running_scraper(ds)
    ep = ds.get(sim.spec().address)
    assert ep is not None
    await eventually(lambda: ep.scrape_error is not None)
    assert ep.scrape_error == f"HTTP 302 from http://{sim.spec().address}/metrics"


async def test_a_body_over_the_sources_cap_is_an_error(servers, running_scraper) -> None:
    sim = await servers()
    sim.body = MINIMAL + "# padding\n" * 200
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    running_scraper(ds, source=HttpSource("m", "/metrics", max_bytes=1000))
    ep = ds.get(sim.spec().address)
    assert ep is not None
    await eventually(lambda: ep.scrape_error is not None)
    assert ep.scrape_error == f"answer of {len(sim.body)} bytes; at most 1000 are read"
    assert ds.is_stale(ep)


async def test_connection_refused_records_an_error(running_scraper) -> None:
    ds = Datastore()
    with reserve_port() as dead:  # held and never listened on: it refuses, and nothing else takes it
        spec = EndpointSpec(name="dead", host="127.0.0.1", port=dead.port)
        ds.set_endpoints([spec])
        running_scraper(ds)
        ep = ds.get(spec.address)
        assert ep is not None
        await eventually(lambda: ep.scrape_error is not None)
        assert ds.is_stale(ep)


async def test_timeout_records_an_error(servers, running_scraper) -> None:
    sim = await servers()
    sim.hang = True
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    running_scraper(ds, timeout=0.1)
    ep = ds.get(sim.spec().address)
    assert ep is not None
    await eventually(lambda: ep.scrape_error is not None)
    assert "timed out" in (ep.scrape_error or "")


async def test_hanging_endpoint_does_not_delay_another(servers, running_scraper) -> None:
    stuck, healthy = await servers(), await servers()
    stuck.hang = True
    ds = Datastore()
    ds.set_endpoints([stuck.spec(), healthy.spec()])
    running_scraper(ds, timeout=5.0)
    ep = ds.get(healthy.spec().address)
    assert ep is not None
    await eventually(lambda: stuck.hits >= 1 and ep.metrics.updated_at > 0)
    first = ep.metrics.updated_at
    hits = healthy.hits
    await asyncio.sleep(0.2)  # the stuck scrape is still pending all along
    assert healthy.hits >= hits + 5
    assert ep.metrics.updated_at > first


async def test_scraper_follows_membership_changes(servers, running_scraper) -> None:
    a, b = await servers(), await servers()
    ds = Datastore()
    ds.set_endpoints([a.spec()])
    scraper = running_scraper(ds)
    await eventually(lambda: a.hits > 0)
    ds.set_endpoints([a.spec(), b.spec()])
    ep_b = ds.get(b.spec().address)
    assert ep_b is not None
    await eventually(lambda: ep_b.metrics.updated_at > 0)
    assert scraper.polling == {a.spec().address, b.spec().address}

    ds.set_endpoints([b.spec()])
    await eventually(lambda: scraper.polling == {b.spec().address})
    await asyncio.sleep(0.02)  # a scrape already on the wire may still land
    hits = a.hits
    await asyncio.sleep(0.1)
    assert a.hits == hits


async def test_metrics_port_and_path_changes_apply_in_place(servers, running_scraper) -> None:
    serving, metrics = await servers(), await servers()
    metrics.body = MINIMAL.replace("waiting 2", "waiting 4")
    ds = Datastore()
    spec = serving.spec("sim")
    ds.set_endpoints([spec])
    running_scraper(ds)
    ep = ds.get(spec.address)
    assert ep is not None
    await eventually(lambda: ep.metrics.waiting == 2)
    ds.set_endpoints([EndpointSpec(name="sim", host="127.0.0.1", port=serving.port, metrics_port=metrics.port)])
    await eventually(lambda: ep.metrics.waiting == 4)


async def test_restarted_scraper_polls_each_endpoint_once(servers) -> None:
    sim = await servers()
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    scraper = MetricsScraper(ds, interval=0.05, timeout=0.5)
    for _ in range(2):  # as the supervisor would after a failure
        task = asyncio.create_task(scraper.run())
        await eventually(lambda: scraper.polling == {sim.spec().address})
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert scraper.polling == frozenset()
    task = asyncio.create_task(scraper.run())
    try:
        await eventually(lambda: sim.hits > 0)
        hits = sim.hits
        await asyncio.sleep(0.25)
        assert sim.hits - hits <= 7  # one poller at 20/s, not several
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_session_factory_is_used_and_closed(servers) -> None:
    sim = await servers()
    ds = Datastore()
    ds.set_endpoints([sim.spec()])
    sessions: list[aiohttp.ClientSession] = []

    def factory() -> aiohttp.ClientSession:
        sessions.append(aiohttp.ClientSession())
        return sessions[-1]

    scraper = MetricsScraper(ds, interval=0.01, session_factory=factory)
    task = asyncio.create_task(scraper.run())
    await eventually(lambda: sim.hits > 0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert len(sessions) == 1 and sessions[0].closed


def test_parses_what_prometheus_client_renders() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    r = CollectorRegistry()
    labels = ("model_name", "engine")
    for name, values in (("vllm:num_requests_waiting", (3, 4)), ("vllm:num_requests_running", (1, 1)),
                         ("vllm:kv_cache_usage_perc", (0.2, 0.4))):
        gauge = Gauge(name, "help", labels, registry=r)
        for engine, value in enumerate(values):
            gauge.labels(model_name='m "quoted"', engine=str(engine)).set(value)
    Counter("vllm:prefix_cache_hits", "help", labels, registry=r).labels("m", "0").inc(5)
    Counter("vllm:prefix_cache_queries", "help", labels, registry=r).labels("m", "0").inc(9)
    m = parse_vllm_metrics(generate_latest(r).decode())
    assert (m.waiting, m.running) == (7, 2)
    assert m.kv_usage == pytest.approx(0.3)
    assert (m.prefix_cache_hits, m.prefix_cache_queries) == (5.0, 9.0)
