"""llm-d's endpoint attributes: `customMetrics` of core-metrics-extractor, dcgm-data-source + dcgm-extractor
(GPUUtilization), and the endpoint-attribute-filter and -scorer that read them: their formulas and
policies, their config (llm-d's parameters, refused where wrong), the DCGM reading, and the scrapers
filling the attributes from real HTTP servers for a pick to use."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.cli import main as cli
from extproc.datalayer.datastore import Datastore
from extproc.datalayer.dcgm import DcgmScraper, parse_gpu_utilization
from extproc.datalayer.endpoints_file import parse_endpoints_yaml
from extproc.datalayer.scraper import (
    MetricsParser,
    MetricsScraper,
    ScrapeError,
    source_url,
)
from extproc.devstack.ports import reserve_port
from extproc.kubernetes.objects import Pod
from extproc.kubernetes.pool_discovery import endpoints_for_pod
from extproc.server.admin import endpoints_view
from pickers.config.loader import load_config
from pickers.framework.endpoint import AttributeKey, Endpoint, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState
from pickers.plugins.datalayer.extractors import (
    BUILTIN_ENGINES,
    CustomMetric,
    MetricSpec,
)
from pickers.plugins.datalayer.sources import DEFAULT_DCGM_SOURCE, HttpSource
from tests.unit.test_datalayer import endpoint, eventually, run, servers  # noqa: F401 - run and servers are fixtures
from tests.unit.test_plugins import plugin, req
from vllm_sim import SimConfig, SimServer
from vllm_sim.dcgm import BusyMeter, DcgmConfig

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
GPU = AttributeKey("GPUUtilization", "dcgm-extractor")
DEPTH = AttributeKey("custom.queue_depth", "core-metrics-extractor")


def ep(i: int, **attributes: float) -> Endpoint:
    """An endpoint with fresh metrics and these attributes (by name; `gpu` is GPUUtilization)."""
    e = Endpoint(EndpointSpec(f"pod-{i}", f"10.0.0.{i}", 8000), Metrics(updated_at=1e12))
    keys = {"gpu": GPU, "depth": DEPTH}
    e.attributes = {keys[k]: v for k, v in attributes.items()}
    return e


def kept(endpoints: list[Endpoint], **parameters: object) -> list[str]:
    f = plugin("endpoint-attribute-filter", **parameters)
    return [e.name for e in f.filter(req(), CycleState(), endpoints)]


def gpu_filter(op: str, value: float, **more: object) -> dict[str, object]:
    return {"attribute": "GPUUtilization", "producer": "dcgm-extractor",
            "algorithm": {"type": "threshold", "threshold": {"operator": op, "value": value}}, **more}  # fmt: skip


def scored(endpoints: list[Endpoint], algorithm: str, normalization: dict[str, object] | None = None) -> list[float]:
    params: dict[str, object] = {"attributeKey": "custom.queue_depth", "algorithm": {"type": algorithm}}
    if normalization is not None:
        params["algorithm"] = {"type": algorithm, "normalization": normalization}
    return list(plugin("endpoint-attribute-scorer", **params).score(req(), CycleState(), endpoints))


def error_of(plugin_yaml: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(HEADER + "plugins:\n" + plugin_yaml, "a.yaml")
    return str(e.value)


# -- endpoint-attribute-filter ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("LessThan", ["pod-1"]),
        ("LessThanOrEqual", ["pod-1", "pod-2"]),
        ("GreaterThan", ["pod-3"]),
        ("GreaterThanOrEqual", ["pod-2", "pod-3"]),
        ("Equal", ["pod-2"]),
        ("NotEqual", ["pod-1", "pod-3"]),
    ],
)
def test_filter_keeps_endpoints_whose_value_compares_true_against_the_threshold(op, expected):
    pool = [ep(1, gpu=0.5), ep(2, gpu=0.9), ep(3, gpu=0.95)]
    assert kept(pool, **gpu_filter(op, 0.9)) == expected


def test_filter_keeps_endpoints_without_the_attribute_by_default_and_drops_them_with_on_missing_fail():
    pool = [ep(1, gpu=0.5), ep(2), ep(3, gpu=0.99)]
    assert kept(pool, **gpu_filter("LessThan", 0.9)) == ["pod-1", "pod-2"]
    assert kept(pool, **gpu_filter("LessThan", 0.9, onMissing="Pass")) == ["pod-1", "pod-2"]
    assert kept(pool, **gpu_filter("LessThan", 0.9, onMissing="Fail")) == ["pod-1"]


def test_filter_returns_the_candidates_when_all_are_dropped_only_with_fallback_on_empty():
    pool = [ep(1, gpu=0.95), ep(2, gpu=0.97)]
    assert kept(pool, **gpu_filter("LessThanOrEqual", 0.9)) == []
    assert kept(pool, **gpu_filter("LessThanOrEqual", 0.9, fallbackOnEmpty=True)) == ["pod-1", "pod-2"]
    missing = [ep(1), ep(2)]
    assert kept(missing, **gpu_filter("LessThan", 0.9, onMissing="Fail", fallbackOnEmpty=True)) == ["pod-1", "pod-2"]


def test_filter_reads_the_attribute_of_its_producer_only():
    e = ep(1)
    e.attributes = {AttributeKey("GPUUtilization", "core-metrics-extractor"): 0.99, AttributeKey("GPUUtilization", ""): 0.99}
    # dcgm-extractor's GPUUtilization is missing: the core extractor's and the producer-agnostic one are others
    assert kept([e], **gpu_filter("LessThan", 0.5, onMissing="Fail")) == []
    core = {"attribute": "GPUUtilization", "algorithm": {"type": "threshold", "threshold": {"operator": "GreaterThan", "value": 0.5}}}
    assert kept([e], **core, onMissing="Fail") == ["pod-1"]  # producer left out: the core metrics extractor
    assert kept([e], **core, producer="", onMissing="Fail") == ["pod-1"]  # "": producer-agnostic


def test_filter_threshold_value_left_out_is_zero_as_in_llm_d_with_a_warning():
    cfg = load_config(HEADER + """plugins:
- type: endpoint-attribute-filter
  parameters: {attribute: a, algorithm: {type: threshold, threshold: {operator: GreaterThan}}}
""", "a.yaml")  # fmt: skip
    f = cfg.plugins["endpoint-attribute-filter"]
    assert f.value == 0.0
    assert any("threshold.value is left out: it is 0" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ("{algorithm: {type: threshold, threshold: {operator: LessThan, value: 1}}}", "attribute", "is required"),
        ("{attribute: '', algorithm: {type: threshold, threshold: {operator: LessThan, value: 1}}}", "attribute", "non-empty"),
        ("{attribute: a, onMissing: pass, algorithm: {type: threshold, threshold: {operator: LessThan, value: 1}}}", "onMissing", "Pass or Fail"),
        ("{attribute: a}", "algorithm.type", "expected threshold"),
        ("{attribute: a, algorithm: {type: percentile}}", "algorithm.type", "expected threshold"),
        ("{attribute: a, algorithm: {type: threshold}}", "algorithm.threshold", "is required"),
        ("{attribute: a, algorithm: {type: threshold, threshold: {value: 1}}}", "algorithm.threshold.operator", "expected one of LessThan"),
        ("{attribute: a, algorithm: {type: threshold, threshold: {operator: '<', value: 1}}}", "algorithm.threshold.operator", "expected one of"),
        ("{attribute: a, algorithm: {type: threshold, threshold: {operator: LessThan, value: high}}}", "algorithm.threshold.value", "expected a number"),
        ("{attribute: a, algorithm: {type: threshold, threshold: {operator: LessThan, value: 1, unit: pct}}}", "algorithm.threshold.unit", "unknown parameter"),
        ("{attribute: a, algorithm: {type: threshold, threshold: {operator: LessThan, value: 1}, topK: 3}}", "algorithm.topK", "unknown parameter"),
        ("{attribute: a, fallback: true, algorithm: {type: threshold, threshold: {operator: LessThan, value: 1}}}", "fallback", "unknown parameter"),
        ("{attribute: GPUUtilization/dcgm-extractor, algorithm: {type: threshold, threshold: {operator: LessThan, value: 1}}}", "attribute",
         "write attribute: 'GPUUtilization' and producer: 'dcgm-extractor'"),
    ],
)  # fmt: skip
def test_filter_bad_parameters_name_the_field(params, field, says):
    msg = error_of(f"- type: endpoint-attribute-filter\n  parameters: {params}\n")
    assert f"a.yaml: plugins[0].parameters.{field}: endpoint-attribute-filter:" in msg and says in msg


def test_an_attribute_with_a_slash_loads_when_its_producer_is_set():
    f = plugin("endpoint-attribute-filter", attribute="llm-d.ai/queue", producer="",
               algorithm={"type": "threshold", "threshold": {"operator": "LessThan", "value": 1}})  # fmt: skip
    assert f.reads_attribute == AttributeKey("llm-d.ai/queue", "")


# -- endpoint-attribute-scorer ----------------------------------------------------------------------


def test_scorer_adaptive_range_is_min_max_of_the_candidates_with_the_attribute():
    pool = [ep(1, depth=2), ep(2, depth=4), ep(3, depth=10), ep(4)]
    assert scored(pool, "linear_higher_is_better") == [0.0, 0.25, 1.0, 0.0]
    assert scored(pool, "linear_lower_is_better") == [1.0, 0.75, 0.0, 0.0]  # missing: 0 either way
    assert scored(pool, "linear_lower_is_better", {"adaptiveRange": {}}) == [1.0, 0.75, 0.0, 0.0]


def test_scorer_adaptive_range_gives_a_neutral_one_when_every_value_is_equal():
    assert scored([ep(1, depth=3), ep(2, depth=3), ep(3)], "linear_lower_is_better") == [1.0, 1.0, 0.0]
    assert scored([ep(1, depth=3)], "linear_higher_is_better") == [1.0]
    assert scored([ep(1), ep(2)], "linear_higher_is_better") == [0.0, 0.0]


def test_scorer_fixed_range_normalizes_against_the_bounds_and_clamps():
    pool = [ep(1, depth=-5), ep(2, depth=25), ep(3, depth=50), ep(4, depth=200), ep(5)]
    fixed = {"fixedRange": {"min": 0, "max": 100}}
    assert scored(pool, "linear_higher_is_better", fixed) == [0.0, 0.25, 0.5, 1.0, 0.0]
    assert scored(pool, "linear_lower_is_better", fixed) == [1.0, 0.75, 0.5, 0.0, 0.0]
    # one endpoint alone is still scored against the bounds, not neutrally
    assert scored([ep(1, depth=25)], "linear_lower_is_better", fixed) == [0.75]


def test_scorer_fixed_range_with_only_max_starts_at_zero_as_in_llm_d():
    assert scored([ep(1, depth=1)], "linear_higher_is_better", {"fixedRange": {"max": 4}}) == [0.25]


def test_scorer_is_a_distribution_scorer():
    assert plugin("endpoint-attribute-scorer", attributeKey="k", algorithm={"type": "linear_lower_is_better"}).category == "distribution"


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ("{algorithm: {type: linear_lower_is_better}}", "attributeKey", "is required"),
        ("{attribute: k, algorithm: {type: linear_lower_is_better}}", "attributeKey", "is required"),
        ("{attributeKey: k}", "algorithm.type", "linear_lower_is_better or linear_higher_is_better"),
        ("{attributeKey: k, algorithm: {type: lower}}", "algorithm.type", "got 'lower'"),
        ("{attributeKey: k, algorithm: {type: linear_lower_is_better, normalization: {fixedRange: {min: 0, max: 1}, adaptiveRange: {}}}}",
         "algorithm.normalization", "not both"),
        ("{attributeKey: k, algorithm: {type: linear_lower_is_better, normalization: {fixedRange: {min: 1, max: 1}}}}",
         "algorithm.normalization.fixedRange", "min < max"),
        ("{attributeKey: k, algorithm: {type: linear_lower_is_better, normalization: {fixedRange: {}}}}",
         "algorithm.normalization.fixedRange", "min 0, max 0"),
        ("{attributeKey: k, algorithm: {type: linear_lower_is_better, normalization: {fixedRange: {min: 0, max: .inf}}}}",
         "algorithm.normalization.fixedRange", "finite"),
        ("{attributeKey: k, algorithm: {type: linear_lower_is_better, normalization: {fixedRange: {min: 0, max: 1, step: 2}}}}",
         "algorithm.normalization.fixedRange.step", "unknown parameter"),
        ("{attributeKey: k, algorithm: {type: linear_lower_is_better, normalization: {adaptiveRange: {window: 3}}}}",
         "algorithm.normalization.adaptiveRange.window", "unknown parameter"),
        ("{attributeKey: k, algorithm: {type: linear_lower_is_better, normalization: {zscore: {}}}}",
         "algorithm.normalization.zscore", "unknown parameter"),
        ("{attributeKey: a/b, algorithm: {type: linear_lower_is_better}}", "attributeKey", "no producer is set"),
    ],
)  # fmt: skip
def test_scorer_bad_parameters_name_the_field(params, field, says):
    msg = error_of(f"- type: endpoint-attribute-scorer\n  parameters: {params}\n")
    assert f"a.yaml: plugins[0].parameters.{field}: endpoint-attribute-scorer:" in msg and says in msg


# -- customMetrics of core-metrics-extractor ----------------------------------------------------------


def custom_parser(*custom: tuple[str, str]) -> MetricsParser:
    from dataclasses import replace

    engine = replace(BUILTIN_ENGINES["vllm"], custom=tuple(CustomMetric(k, MetricSpec.parse(s)) for k, s in custom))  # type: ignore[arg-type]
    return MetricsParser(engine)


VLLM_BASE = "vllm:num_requests_waiting 2\nvllm:num_requests_running 3\nvllm:kv_cache_usage_perc 0.5\n"


def test_custom_metrics_are_read_by_their_selectors():
    parser = custom_parser(("custom.queue_depth", "custom_queue_depth{tier=gold}"), ("running", "vllm:num_requests_running"))
    body = VLLM_BASE + 'custom_queue_depth{tier="silver"} 9\ncustom_queue_depth{tier="gold",zone="a"} 4\n'
    metrics, custom = parser.parse_with_attributes(body)
    assert custom == {"custom.queue_depth": 4.0, "running": 3.0}
    assert (metrics.waiting, metrics.running) == (2, 3)  # a series read twice still counts once


def test_a_custom_metric_is_one_series_the_newest_by_timestamp_else_the_first():
    parser = custom_parser(("depth", "depth"))
    assert parser.parse_with_attributes(VLLM_BASE + 'depth{a="1"} 5\ndepth{a="2"} 7\n')[1] == {"depth": 5.0}
    stamped = VLLM_BASE + 'depth{a="1"} 5 1700000000000\ndepth{a="2"} 7 1700000005000\ndepth{a="3"} 9 1700000001000\n'
    assert parser.parse_with_attributes(stamped)[1] == {"depth": 7.0}


def test_a_custom_metric_that_is_absent_or_not_a_number_is_left_out():
    parser = custom_parser(("depth", "depth{tier=gold}"), ("other", "other"))
    assert parser.parse_with_attributes(VLLM_BASE + 'depth{tier="silver"} 1\nother NaN\n')[1] == {}


def test_custom_metric_names_sharing_a_prefix_with_the_engines_are_told_apart():
    parser = custom_parser(("w", "vllm:num_requests_waiting_by_reason"))
    body = VLLM_BASE + 'vllm:num_requests_waiting_by_reason{reason="capacity"} 6\n'
    metrics, custom = parser.parse_with_attributes(body)
    assert custom == {"w": 6.0} and metrics.waiting == 2


def test_custom_metrics_config_is_typed_and_check_config_lists_them(tmp_path, capsys):
    cfg = load_config(CUSTOM_CONFIG, "c.yaml")
    engine = cfg.data_layer.extraction.engines["vllm"]
    assert engine.custom == (CustomMetric("num_requests_running", MetricSpec("vllm:num_requests_running")),)
    assert engine.queued == BUILTIN_ENGINES["vllm"].queued  # the built-in mapping, plus the custom metric
    assert cfg.data_layer.attributes() == {AttributeKey("num_requests_running", "core-metrics-extractor")}
    assert cfg.warnings == ()
    path = tmp_path / "c.yaml"
    path.write_text(CUSTOM_CONFIG)
    assert cli.main(["check-config", str(path)]) == 0
    assert "custom metrics (attributes of core-metrics-extractor): num_requests_running" in capsys.readouterr().out


CUSTOM_CONFIG = HEADER + """\
plugins:
- type: core-metrics-extractor
  parameters:
    engineConfigs:
    - name: vllm
      queuedRequestsSpec: vllm:num_requests_waiting
      runningRequestsSpec: vllm:num_requests_running
      kvUsageSpec: vllm:kv_cache_usage_perc
      loraSpec: vllm:lora_requests_info
      cacheInfoSpec: vllm:cache_config_info
      customMetrics:
      - {attributeKey: num_requests_running, metricSpec: vllm:num_requests_running}
- type: endpoint-attribute-filter
  name: drop-loaded-endpoints
  parameters:
    attribute: num_requests_running
    onMissing: Pass
    fallbackOnEmpty: true
    algorithm: {type: threshold, threshold: {operator: LessThan, value: 10}}
- type: queue-scorer
"""


async def test_the_metrics_scraper_puts_custom_metrics_on_the_endpoint_and_keeps_one_that_goes_missing(servers, run):  # noqa: F811 - the fixtures
    from tests.unit.test_datalayer import Server

    body = VLLM_BASE + 'custom_queue_depth{tier="gold"} 4\n'
    server: Server = await servers({"/metrics": body})
    cfg = load_config(HEADER + """plugins:
- type: core-metrics-extractor
  parameters:
    engineConfigs:
    - {name: vllm, queuedRequestsSpec: vllm:num_requests_waiting, runningRequestsSpec: vllm:num_requests_running,
       kvUsageSpec: vllm:kv_cache_usage_perc, customMetrics: [{attributeKey: custom.queue_depth, metricSpec: 'custom_queue_depth{tier=gold}'}]}
- type: queue-scorer
""", "c.yaml")  # fmt: skip
    ds = Datastore()
    ds.set_endpoints([server.spec()])
    run(MetricsScraper(ds, interval=0.02, timeout=0.5, extraction=cfg.data_layer.extraction).run)
    e = endpoint(ds, server.spec())
    await eventually(lambda: e.attributes.get(DEPTH) == 4.0)
    assert "core-metrics-extractor" in e.attributes_updated_at
    server.routes["/metrics"] = VLLM_BASE  # the custom series goes away: its last value stays, as in llm-d
    scraped = e.metrics.updated_at
    await eventually(lambda: e.metrics.updated_at > scraped + 0.05)
    assert e.attributes[DEPTH] == 4.0 and e.scrape_error is None


# -- DCGM ----------------------------------------------------------------------------------------------


def dcgm_body(*samples: str) -> str:
    return "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).\n# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n" + "".join(
        f"DCGM_FI_DEV_GPU_UTIL{s}\n" for s in samples
    )


def test_dcgm_gpu_utilization_is_the_busiest_of_the_pods_gpus_over_100():
    body = dcgm_body('{gpu="0",pod="vllm-a"} 37', '{gpu="1",pod="vllm-a"} 82', '{gpu="2",pod="vllm-b"} 99')
    assert parse_gpu_utilization(body, "vllm-a") == pytest.approx(0.82)
    assert parse_gpu_utilization(body, "vllm-b") == pytest.approx(0.99)


def test_dcgm_samples_without_a_pod_label_belong_to_every_pod_and_an_empty_pod_label_to_none():
    body = dcgm_body('{gpu="0"} 40', '{gpu="1",pod=""} 100', '{gpu="2",pod="other"} 100')
    assert parse_gpu_utilization(body, "vllm-a") == pytest.approx(0.4)  # a sidecar's unlabelled GPU is kept
    assert parse_gpu_utilization(dcgm_body('{gpu="0",pod="x"} 10', '{gpu="1",pod="y"} 60'), "") == pytest.approx(0.6)


def test_dcgm_values_are_not_clamped_and_a_negative_one_counts_as_zero():
    assert parse_gpu_utilization(dcgm_body('{gpu="0"} 150'), "p") == pytest.approx(1.5)  # as llm-d: only /100
    assert parse_gpu_utilization(dcgm_body('{gpu="0"} -3'), "p") == 0.0
    assert parse_gpu_utilization(dcgm_body('{gpu="0"} NaN', '{gpu="1"} 20'), "p") == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("DCGM_FI_DEV_FB_USED{gpu=\"0\"} 1000\n", "no DCGM_FI_DEV_GPU_UTIL sample for pod 'vllm-a'"),
        (dcgm_body('{gpu="0",pod="vllm-b"} 50'), "no DCGM_FI_DEV_GPU_UTIL sample for pod 'vllm-a'"),
        (dcgm_body('{gpu="0"} NaN'), "no DCGM_FI_DEV_GPU_UTIL sample"),
        ("", "no DCGM_FI_DEV_GPU_UTIL sample"),
    ],
)
def test_dcgm_without_the_pods_samples_is_an_error(body, says):
    with pytest.raises(ScrapeError, match=says):
        parse_gpu_utilization(body, "vllm-a")


@given(st.text(max_size=400), st.text(max_size=20))
@settings(max_examples=200, deadline=None)
def test_dcgm_reading_raises_only_scrape_error(text, pod):
    try:
        value = parse_gpu_utilization(dcgm_body() + text, pod)
    except ScrapeError:
        return
    assert value >= 0.0 and not math.isnan(value)


def test_dcgm_is_scraped_at_the_pod_ip_on_its_port_or_at_the_node_with_use_node_address():
    e = Endpoint(EndpointSpec("vllm-a-rank-0", "10.0.0.7", 8000, metrics_port=8001, metrics_path="/m", node_address="192.168.1.4"))
    assert source_url(DEFAULT_DCGM_SOURCE, e) == "http://10.0.0.7:9400/metrics"  # metricsPort/Path are the model server's
    node = HttpSource("dcgm", "/metrics", port=9400, endpoint_overrides=False, use_node_address=True)
    assert source_url(node, e) == "http://192.168.1.4:9400/metrics"
    unknown_node = Endpoint(EndpointSpec("a", "10.0.0.8", 8000))  # file discovery: no node known
    assert source_url(node, unknown_node) == "http://10.0.0.8:9400/metrics"


def test_kubernetes_endpoints_carry_the_pod_name_and_the_node_ip():
    import msgspec

    pod = msgspec.json.decode(
        b'{"metadata": {"name": "vllm-a", "namespace": "ns"}, "status": {"podIP": "10.0.0.7", "hostIP": "192.168.1.4",'
        b' "conditions": [{"type": "Ready", "status": "True"}]}}',
        type=Pod,
    )
    specs = endpoints_for_pod(pod, (8000, 8001))
    assert [(s.name, s.pod_name, s.node_address) for s in specs] == [
        ("vllm-a-rank-0", "vllm-a", "192.168.1.4"), ("vllm-a-rank-1", "vllm-a", "192.168.1.4"),
    ]  # fmt: skip


def test_the_endpoints_file_takes_a_pod_name_and_a_node_address():
    (a, b) = parse_endpoints_yaml(
        "endpoints:\n- {name: vllm-a-rank-1, pod: vllm-a, address: 10.0.0.7, port: 8001, nodeAddress: 192.168.1.4}\n"
        "- {name: vllm-b, address: 10.0.0.8, port: 8000}\n"
    )
    assert (a.pod_name, a.node_address, b.pod_name, b.node_address) == ("vllm-a", "192.168.1.4", "vllm-b", "")
    with pytest.raises(ConfigError, match=r"endpoints\[0\].nodeAddress: expected the node's host name or IP address \(no port\)"):
        parse_endpoints_yaml("endpoints:\n- {address: 10.0.0.7, port: 8000, nodeAddress: '192.168.1.4:9400'}\n")
    with pytest.raises(ConfigError, match=r"endpoints\[0\].pod: expected the pod's name"):
        parse_endpoints_yaml("endpoints:\n- {address: 10.0.0.7, port: 8000, pod: 3}\n")


DCGM_PLUGINS = """\
- type: dcgm-data-source
  name: dcgm-source
  parameters: {params}
- type: dcgm-extractor
- type: queue-scorer
dataLayer:
  sources:
  - pluginRef: dcgm-source
    extractors: [{{pluginRef: dcgm-extractor}}]
"""


def test_dcgm_source_defaults_are_llm_ds():
    cfg = load_config(HEADER + "plugins:\n" + DCGM_PLUGINS.format(params="{}"), "d.yaml")
    dcgm = cfg.data_layer.dcgm
    assert dcgm is not None
    assert (dcgm.scheme, dcgm.path, dcgm.port, dcgm.insecure_skip_verify, dcgm.use_node_address, dcgm.interval) == (
        "http", "/metrics", 9400, True, False, None,
    )  # fmt: skip
    assert cfg.data_layer.metrics is not None  # the default metrics source is still added, as in llm-d
    assert cfg.data_layer.attributes() == {GPU}


def test_dcgm_source_parameters_are_typed():
    params = "{scheme: https, path: /dcgm, port: 9500, insecureSkipVerify: false, useNodeAddress: true, interval: 2s}"
    dcgm = load_config(HEADER + "plugins:\n" + DCGM_PLUGINS.format(params=params), "d.yaml").data_layer.dcgm
    assert dcgm is not None
    assert (dcgm.scheme, dcgm.path, dcgm.port, dcgm.insecure_skip_verify, dcgm.use_node_address, dcgm.interval) == (
        "https", "/dcgm", 9500, False, True, 2.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ("{scheme: grpc}", "scheme", "expected http or https"),
        ("{port: 0}", "port", "expected a port 1-65535"),
        ("{port: '9400'}", "port", "expected a port"),
        ("{path: metrics}", "path", "starting with '/'"),
        ("{interval: soon}", "interval", "expected a duration"),
        ("{useNodeAddress: 'yes'}", "useNodeAddress", "expected true or false"),
        ("{caCertPath: /ca.pem}", "caCertPath", "unknown parameter"),  # llm-d's dcgm source takes none
        ("{clientCertPath: /c.pem, clientKeyPath: /k.pem}", "clientCertPath", "unknown parameter"),
    ],
)
def test_bad_dcgm_source_parameters_are_refused(params, field, says):
    msg = error_of(DCGM_PLUGINS.format(params=params))
    assert f"a.yaml: plugins[0].parameters.{field}: dcgm-data-source:" in msg and says in msg


def test_dcgm_extractor_parameters_load_with_a_warning_as_llm_d_ignores_them():
    """llm-d's DCGMExtractorFactory reads no parameters: a `metric` changes nothing there, nor here."""
    cfg = load_config(HEADER + "plugins:\n- type: dcgm-extractor\n  parameters: {metric: DCGM_FI_DEV_FB_USED}\n- type: queue-scorer\n", "a.yaml")
    assert any(w.startswith("plugins[0] (dcgm-extractor): parameter metric has no effect") for w in cfg.warnings)


@pytest.mark.parametrize(
    ("sources", "says"),
    [
        ("  - {pluginRef: dcgm-source, extractors: [{pluginRef: core-metrics-extractor}]}\n", "expected a dcgm-extractor"),
        ("  - {pluginRef: metrics-data-source, extractors: [{pluginRef: dcgm-extractor}]}\n", "expected a core-metrics-extractor"),
        (("  - {pluginRef: dcgm-source, extractors: [{pluginRef: dcgm-extractor}]}\n"
          "  - {pluginRef: dcgm-2, extractors: [{pluginRef: dcgm-extractor}]}\n"), "a second dcgm-data-source"),
    ],
)  # fmt: skip
def test_dcgm_pairing_is_checked(sources, says):
    plugins = ("- {type: dcgm-data-source, name: dcgm-source}\n- {type: dcgm-data-source, name: dcgm-2}\n- type: dcgm-extractor\n"
               "- type: metrics-data-source\n- type: core-metrics-extractor\n- type: queue-scorer\n")  # fmt: skip
    msg = error_of(plugins + "dataLayer:\n  sources:\n" + sources)
    assert says in msg


@pytest.mark.parametrize(
    ("plugins", "says"),
    [
        (("- type: endpoint-attribute-filter\n  parameters: {attribute: GPUUtilization, producer: dcgm-extractor,"
          " algorithm: {type: threshold, threshold: {operator: LessThan, value: 0.9}}}\n"),
         ("reads the endpoint attribute GPUUtilization (dcgm-extractor), which nothing in the data layer publishes "
          "(list a dcgm-data-source with a dcgm-extractor in dataLayer.sources")),
        ("- type: endpoint-attribute-scorer\n  parameters: {attributeKey: custom.depth, algorithm: {type: linear_lower_is_better}}\n",
         ("custom.depth (core-metrics-extractor), which nothing in the data layer publishes (add it to a "
          "core-metrics-extractor engine's customMetrics")),
        ("- type: endpoint-attribute-scorer\n  parameters: {attributeKey: q, producer: '', algorithm: {type: linear_lower_is_better}}\n",
         "q (any producer), which nothing in the data layer publishes (no llm-epp plugin publishes producer-agnostic"),
    ],
)  # fmt: skip
def test_reading_an_attribute_nothing_publishes_loads_with_a_warning(plugins, says):
    cfg = load_config(HEADER + "plugins:\n" + plugins, "w.yaml")
    assert any(says in w for w in cfg.warnings), cfg.warnings


async def test_the_dcgm_scraper_writes_each_endpoints_pod_share_and_keeps_it_when_a_scrape_fails(servers, run):  # noqa: F811 - the fixtures
    exporter = await servers({"/metrics": dcgm_body('{gpu="0",pod="vllm-a"} 30', '{gpu="1",pod="vllm-b"} 70')})
    ds = Datastore()
    a = EndpointSpec("vllm-a-rank-0", "127.0.0.2", 8000, pod="vllm-a", node_address="127.0.0.1")
    b = EndpointSpec("vllm-b-rank-0", "127.0.0.3", 8000, pod="vllm-b", node_address="127.0.0.1")
    ds.set_endpoints([a, b])
    source = HttpSource("dcgm", "/metrics", port=exporter.port, endpoint_overrides=False, use_node_address=True)  # a DaemonSet
    run(DcgmScraper(ds, interval=0.02, timeout=0.5, source=source).run)
    ea, eb = endpoint(ds, a), endpoint(ds, b)
    await eventually(lambda: GPU in ea.attributes and GPU in eb.attributes)
    assert (ea.attributes[GPU], eb.attributes[GPU]) == (pytest.approx(0.3), pytest.approx(0.7))
    exporter.routes.pop("/metrics")  # 404 from now on
    hits = exporter.hits["/metrics"]
    await eventually(lambda: exporter.hits["/metrics"] > hits + 2)
    assert ea.attributes[GPU] == pytest.approx(0.3)  # kept, as in llm-d
    assert ea.scrape_error is None and ea.metrics.updated_at == 0.0  # the model server's state is not touched


# -- the simulator's DCGM stand-in ---------------------------------------------------------------------


def test_busy_meter_is_the_share_of_the_last_second_in_steps():
    m = BusyMeter()
    m.add(10.0, 10.25)
    m.add(10.5, 10.75)
    assert m.utilization(11.0) == pytest.approx(0.5)
    assert m.utilization(11.6) == pytest.approx(0.15)  # 10.6-10.75 still inside the window
    assert m.utilization(20.0) == 0.0


async def test_the_simulators_dcgm_listener_reports_its_engines_busy_share_or_a_fixed_value():
    import aiohttp

    config = SimConfig.from_profile("gpu", port=0, time_scale=0.1, dcgm=DcgmConfig(0, None, "vllm-a"))
    async with SimServer(config) as sim, aiohttp.ClientSession() as http:
        assert sim.dcgm_port and sim.dcgm_port != sim.port
        async with http.get(f"http://127.0.0.1:{sim.dcgm_port}/metrics") as r:
            idle = await r.text()
        assert parse_gpu_utilization(idle, "vllm-a") == 0.0 and 'pod="vllm-a"' in idle
        async with http.post(f"{sim.url}/v1/completions", json={"model": "sim-model", "prompt": "x " * 50, "max_tokens": 40}) as r:
            assert r.status == 200
        async with http.get(f"http://127.0.0.1:{sim.dcgm_port}/metrics") as r:
            busy = parse_gpu_utilization(await r.text(), "vllm-a")
        assert busy > 0.0
    fixed_config = SimConfig.from_profile("gpu", port=0, dcgm=DcgmConfig(0, 87.0, ""))
    async with SimServer(fixed_config) as fixed, aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{fixed.dcgm_port}/metrics") as r:
        text = await r.text()
    assert parse_gpu_utilization(text, "anything") == pytest.approx(0.87) and "pod=" not in text


@pytest.mark.parametrize(
    ("dcgm", "says"),
    [
        (DcgmConfig(70000), "dcgm_port: must be in 0..65535"),
        (DcgmConfig(0, 120.0), "dcgm_gpu_util: a percent"),
        (DcgmConfig(0, None, 'a"b'), "dcgm_pod: a pod name"),
    ],
)
def test_bad_dcgm_simulator_settings_are_refused(dcgm, says):
    from vllm_sim.config import ConfigError as SimConfigError

    with pytest.raises(SimConfigError, match=says):
        SimConfig.from_profile("gpu", dcgm=dcgm)


def test_the_simulators_dcgm_flags_need_the_port():
    from vllm_sim.cli import build_parser, config_from_args
    from vllm_sim.config import ConfigError as SimConfigError

    cfg = config_from_args(build_parser().parse_args(["--dcgm-port", "9400", "--dcgm-gpu-util", "55", "--dcgm-pod", "p"]))
    assert cfg.dcgm == DcgmConfig(9400, 55.0, "p")
    assert config_from_args(build_parser().parse_args([])).dcgm is None
    with pytest.raises(SimConfigError, match="only with --dcgm-port"):
        config_from_args(build_parser().parse_args(["--dcgm-gpu-util", "55"]))


# -- end to end: simulators' DCGM listeners -> the DCGM scraper -> filter and scorer -> the pick -------


GPU_CONFIG = (__import__("pathlib").Path(__file__).parent / "configs" / "guides" / "gpu-utilization.yaml").read_text()


async def test_gpu_utilization_routing_end_to_end_from_the_simulators_dcgm_listeners():
    """Three simulators, each on its own loopback address (as pods have their own IPs) with a DCGM
    stand-in on one shared port, reporting 95%, 50% and 20%: the config in the shape of llm-d's
    sim-epp-gpu-config.yaml drops the 95% one (above 0.90) and prefers the least busy."""
    held = reserve_port()  # held on 127.0.0.1 for the test; the simulators bind it on their own addresses
    port = held.port
    hosts = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    sims = [
        SimServer(SimConfig.from_profile("gpu", host=h, port=0, time_scale=0.1, dcgm=DcgmConfig(port, util, "")))
        for h, util in zip(hosts, (95.0, 50.0, 20.0), strict=True)
    ]
    for s in sims:
        await s.start()
    try:
        cfg = load_config(GPU_CONFIG.replace("port: 9400", f"port: {port}"), "gpu.yaml")
        assert cfg.warnings == ()
        dcgm = cfg.data_layer.dcgm
        assert dcgm is not None and cfg.data_layer.metrics is not None
        ds = Datastore()
        ds.set_endpoints(EndpointSpec(f"vllm-{i}", h, s.port) for i, (h, s) in enumerate(zip(hosts, sims, strict=True)))
        scrapers = [
            MetricsScraper(ds, interval=0.02, timeout=0.5, source=cfg.data_layer.metrics, extraction=cfg.data_layer.extraction),
            DcgmScraper(ds, interval=0.02, timeout=0.5, source=dcgm),
        ]
        tasks = [asyncio.ensure_future(s.run()) for s in scrapers]
        try:
            eps = ds.candidates()
            await eventually(lambda: all(GPU in e.attributes and e.metrics.updated_at > 0 for e in eps), timeout=5)
            assert [round(e.attributes[GPU], 2) for e in eps] == [0.95, 0.5, 0.2]
            gpu_filter_plugin = cfg.plugins["gpu-utilization-filter"]
            assert [e.name for e in gpu_filter_plugin.filter(req(), CycleState(), eps)] == ["vllm-1", "vllm-2"]
            result = Scheduler(cfg.profile, explain=True).schedule(req(), eps)
            assert result.endpoints[0].name == "vllm-2"
            assert result.scores is not None
            gpu_scores = result.scores["gpu-utilization-scorer"]
            assert gpu_scores == {eps[1].address: pytest.approx(0.5), eps[2].address: pytest.approx(0.8)}
            view = {v["name"]: v["attributes"] for v in endpoints_view(ds, None)}
            assert view["vllm-2"] == [{"attribute": "GPUUtilization", "producer": "dcgm-extractor", "value": pytest.approx(0.2),
                                       "age_s": view["vllm-2"][0]["age_s"]}]  # fmt: skip
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for s in sims:
            await s.stop()
        held.close()


def test_the_gpu_config_checks_clean_with_epp_check_config(capsys):
    path = __import__("pathlib").Path(__file__).parent / "configs" / "guides" / "gpu-utilization.yaml"
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "GPU utilization: dcgm-source http://<endpoint>:9400/metrics every 1s -> GPUUtilization (dcgm-extractor)" in out
    assert "gpu-utilization-filter (endpoint-attribute-filter): attribute=GPUUtilization, producer=dcgm-extractor, onMissing=Pass" in out
