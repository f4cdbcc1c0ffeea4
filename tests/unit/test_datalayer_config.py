"""The `dataLayer` section: each source, extractor and discovery shape loads into the typed
DataLayerConfig, llm-d's defaults are injected, and what llm-epp cannot honour is refused naming the
field and why (wrong types, unknown fields, dangling or mismatched references)."""

from __future__ import annotations

import pytest

from pickers.config.datalayer import DEFAULT_DATA_LAYER, build_data_layer
from pickers.config.loader import load_config
from pickers.framework.errors import ConfigError
from pickers.plugins.datalayer.extractors import BUILTIN_ENGINES, MetricSpec
from pickers.plugins.datalayer.sources import (
    DEFAULT_METRICS_SOURCE,
    EndpointNotificationSource,
)

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
SCORER = "- type: queue-scorer\n"


def load(body: str):
    return load_config(HEADER + body, "t.yaml")


def error_of(body: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(body)
    return str(e.value)


def with_sources(plugins: str, sources: str, extra: str = "") -> str:
    return f"plugins:\n{SCORER}{plugins}dataLayer:\n  sources:\n{sources}{extra}"


METRICS_PAIR = "- type: metrics-data-source\n- type: core-metrics-extractor\n"
METRICS_SOURCE = "  - pluginRef: metrics-data-source\n    extractors: [{pluginRef: core-metrics-extractor}]\n"
MODELS_PAIR = "- type: models-data-source\n- type: models-data-extractor\n"
MODELS_SOURCE = "  - pluginRef: models-data-source\n    extractors: [{pluginRef: models-data-extractor}]\n"


# -- defaults ---------------------------------------------------------------------------------


def test_no_data_layer_section_is_llm_ds_default_metrics_source_and_extractor():
    dl = load(f"plugins:\n{SCORER}").data_layer
    assert dl == DEFAULT_DATA_LAYER
    assert dl.metrics == DEFAULT_METRICS_SOURCE and dl.metrics.path == "/metrics" and dl.metrics.scheme == "http"
    assert set(dl.extraction.engines) == {"vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm", "triton"}
    assert dl.extraction.default_engine == "vllm" and dl.extraction.engine_label_key == "llm-d.ai/engine-type"
    assert dl.models is None and dl.discovery is None


def test_a_metrics_source_named_by_its_type_is_the_one_injected_without_a_data_layer_section():
    # llm-d adds its default source under the name metrics-data-source: a plugin of that name is used
    cfg = load(f"plugins:\n{SCORER}- type: metrics-data-source\n  parameters: {{path: /stats, interval: 2s}}\n")
    assert cfg.data_layer.metrics is not None
    assert (cfg.data_layer.metrics.path, cfg.data_layer.metrics.interval) == ("/stats", 2.0)
    assert cfg.warnings == ()


def test_a_plugin_that_takes_the_default_sources_name_must_be_one():
    msg = error_of(f"plugins:\n{SCORER}- name: metrics-data-source\n  type: models-data-source\n")
    assert "t.yaml: plugins[1].name: 'metrics-data-source' is the name of the default metrics-data-source" in msg


def test_inject_defaults_false_without_a_metrics_source_turns_scraping_off_with_a_warning():
    cfg = load(f"plugins:\n{SCORER}dataLayer:\n  injectDefaults: false\n")
    assert cfg.data_layer.metrics is None
    assert any("model-server metrics are not scraped" in w for w in cfg.warnings)


def test_a_listed_metrics_source_of_any_name_replaces_the_default():
    cfg = load(with_sources(
        "- name: vllm-metrics\n  type: metrics-data-source\n  parameters: {port: 9400}\n"
        "- name: engines\n  type: core-metrics-extractor\n  parameters: {defaultEngine: sglang}\n",
        "  - pluginRef: vllm-metrics\n    extractors: [{pluginRef: engines}]\n",
    ))  # fmt: skip
    dl = cfg.data_layer
    assert dl.metrics is not None and (dl.metrics.name, dl.metrics.port) == ("vllm-metrics", 9400)
    assert dl.extraction.default_engine == "sglang"
    assert cfg.warnings == ()


# -- metrics-data-source ----------------------------------------------------------------------


def test_metrics_source_parameters_are_typed():
    cfg = load(with_sources(
        "- type: metrics-data-source\n  parameters: {scheme: https, path: /vllm/metrics, port: 8443, "
        "insecureSkipVerify: false, caCertPath: /ca.pem, clientCertPath: /c.pem, clientKeyPath: /k.pem, interval: 1m30s}\n"
        "- type: core-metrics-extractor\n",
        METRICS_SOURCE,
    ))  # fmt: skip
    m = cfg.data_layer.metrics
    assert m is not None
    assert (m.scheme, m.path, m.port, m.insecure_skip_verify) == ("https", "/vllm/metrics", 8443, False)
    assert (m.ca_cert_path, m.client_cert_path, m.client_key_path, m.interval) == ("/ca.pem", "/c.pem", "/k.pem", 90.0)
    assert cfg.plugin_parameters["metrics-data-source"]["interval"] == "1m30s"


def test_the_series_filter_is_on_unless_turned_off():
    assert DEFAULT_METRICS_SOURCE.series_filter
    on = load(with_sources("- type: metrics-data-source\n- type: core-metrics-extractor\n", METRICS_SOURCE))
    off = load(with_sources("- type: metrics-data-source\n  parameters: {seriesFilter: false}\n- type: core-metrics-extractor\n", METRICS_SOURCE))
    assert on.data_layer.metrics is not None and on.data_layer.metrics.series_filter
    assert off.data_layer.metrics is not None and not off.data_layer.metrics.series_filter
    assert off.warnings == ()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("{scheme: ftp}", "plugins[1].parameters.scheme: metrics-data-source: expected http or https, got 'ftp'"),
        ("{path: metrics}", "plugins[1].parameters.path: metrics-data-source: expected a path starting with '/'"),
        ("{port: 70000}", "plugins[1].parameters.port: metrics-data-source: expected a port 1-65535, got int 70000"),
        ("{port: '8000'}", "plugins[1].parameters.port: metrics-data-source: expected a port 1-65535, got str '8000'"),
        ("{interval: fast}", "plugins[1].parameters.interval: metrics-data-source: expected a duration like 500ms"),
        ("{interval: 5}", "plugins[1].parameters.interval: metrics-data-source: expected a duration like 500ms"),
        ("{interval: -1s}", "plugins[1].parameters.interval: metrics-data-source: expected a duration like 500ms"),
        ("{insecureSkipVerify: 'no'}", "plugins[1].parameters.insecureSkipVerify: metrics-data-source: expected true or false"),
        ("{seriesFilter: 1}", "plugins[1].parameters.seriesFilter: metrics-data-source: expected true or false"),
        ("{scheme: https, clientCertPath: /c.pem}", "plugins[1].parameters.clientKeyPath: metrics-data-source: clientCertPath and clientKeyPath go together"),
        ("{timeout: 1s}", "plugins[1].parameters.timeout: metrics-data-source: unknown parameter"),
    ],
)  # fmt: skip
def test_bad_metrics_source_parameters_are_refused(params, expected):
    msg = error_of(with_sources(f"- type: metrics-data-source\n  parameters: {params}\n- type: core-metrics-extractor\n", METRICS_SOURCE))
    assert msg.startswith(f"t.yaml: {expected}")


def test_tls_parameters_with_plain_http_load_with_a_warning():
    cfg = load(with_sources("- type: metrics-data-source\n  parameters: {scheme: http, insecureSkipVerify: true}\n- type: core-metrics-extractor\n", METRICS_SOURCE))
    assert any("insecureSkipVerify has no effect with scheme http" in w for w in cfg.warnings)


def test_a_ca_bundle_while_verification_is_off_loads_with_a_warning():
    cfg = load(with_sources("- type: metrics-data-source\n  parameters: {scheme: https, caCertPath: /ca.pem}\n- type: core-metrics-extractor\n", METRICS_SOURCE))
    assert any("caCertPath has no effect while insecureSkipVerify is true" in w for w in cfg.warnings)


def test_a_zero_interval_means_every_base_tick():
    cfg = load(with_sources("- type: metrics-data-source\n  parameters: {interval: 0s}\n- type: core-metrics-extractor\n", METRICS_SOURCE))
    assert cfg.data_layer.metrics is not None and cfg.data_layer.metrics.interval is None


# -- core-metrics-extractor -------------------------------------------------------------------


def test_a_configured_engine_is_added_to_the_built_in_ones():
    cfg = load(with_sources(
        "- type: metrics-data-source\n- type: core-metrics-extractor\n  parameters:\n    engineLabelKey: example.com/engine\n"
        "    defaultEngine: my-engine\n    engineConfigs:\n    - name: my-engine\n      queuedRequestsSpec: 'custom_queue_size{status=waiting}'\n"
        "      runningRequestsSpec: custom_running\n      kvUsageSpec: 'custom_cache{kind=\"gpu\"}'\n"
        "      cacheInfoSpec: custom_cache_info\n      cacheBlockSizeLabelName: page\n      cacheNumBlocksLabelName: pages\n",
        METRICS_SOURCE,
    ))  # fmt: skip
    ex = cfg.data_layer.extraction
    engine = ex.engines["my-engine"]
    assert engine.queued == MetricSpec("custom_queue_size", (("status", "waiting"),))
    assert engine.kv_usage == MetricSpec("custom_cache", (("kind", "gpu"),))
    assert (engine.cache_block_size_label, engine.cache_num_blocks_label) == ("page", "pages")
    assert engine.lora is None  # a spec left out is not read, as in llm-d
    assert ex.engines["sglang"] == BUILTIN_ENGINES["sglang"]
    assert ex.engine_for({}).name == "my-engine"
    assert ex.engine_for({"example.com/engine": "sglang"}).name == "sglang"


def test_a_configured_engine_replaces_the_built_in_one_of_its_name():
    cfg = load(with_sources(
        "- type: metrics-data-source\n- type: core-metrics-extractor\n  parameters:\n    engineConfigs:\n"
        "    - {name: vllm, queuedRequestsSpec: 'vllm:num_requests_waiting', runningRequestsSpec: 'vllm:num_requests_running'}\n",
        METRICS_SOURCE,
    ))  # fmt: skip
    vllm = cfg.data_layer.extraction.engines["vllm"]
    assert vllm.kv_usage is None and vllm.kv_usage_fallback is None


def test_engine_is_chosen_by_label_then_gies_legacy_label_then_the_default():
    ex = DEFAULT_DATA_LAYER.extraction
    assert ex.engine_for({"llm-d.ai/engine-type": "sglang"}).name == "sglang"
    assert ex.engine_for({"inference.networking.k8s.io/engine-type": "trtllm-serve"}).name == "trtllm-serve"
    assert ex.engine_for({"llm-d.ai/engine-type": "unknown-engine"}).name == "vllm"
    assert ex.engine_for({}).name == "vllm"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("{defaultEngine: nope}", "defaultEngine: core-metrics-extractor: 'nope' is not an engine; known: vllm, sglang"),
        ("{engineConfigs: [{queuedRequestsSpec: q}]}", "engineConfigs[0].name: core-metrics-extractor: is required"),
        ("{engineConfigs: [{name: default}]}", "engineConfigs[0].name: core-metrics-extractor: 'default' is reserved"),
        ("{engineConfigs: [{name: a}, {name: a}]}", "engineConfigs[1].name: core-metrics-extractor: duplicate engine 'a'"),
        ("{engineConfigs: [{name: a, kvUsageSpec: 'bad{x'}]}", "engineConfigs[0].kvUsageSpec: core-metrics-extractor: not a metric selector"),
        ("{engineConfigs: [{name: a, kvUsageSpec: '1abc'}]}", "engineConfigs[0].kvUsageSpec: core-metrics-extractor: not a metric selector"),
        ("{engineConfigs: [{name: a, kvUsageSpec: 'k{9x=y}'}]}", "engineConfigs[0].kvUsageSpec: core-metrics-extractor: invalid label matcher"),
        ("{engineConfigs: [{name: a, kvUsageSpec: 3}]}", "engineConfigs[0].kvUsageSpec: core-metrics-extractor: expected a non-empty string"),
        ("{engineConfigs: [{name: a, queueSpec: q}]}", "engineConfigs[0].queueSpec: core-metrics-extractor: unknown parameter"),
        ("{engineConfigs: [{name: a, cacheBlockSizeLabelName: 'a-b'}]}", "engineConfigs[0].cacheBlockSizeLabelName: core-metrics-extractor: expected a Prometheus label name"),
        ("{engineConfigs: [{name: a, customMetrics: [{attributeKey: k}]}]}", "engineConfigs[0].customMetrics[0].metricSpec: core-metrics-extractor: expected a metric selector"),
        ("{engineConfigs: [{name: a, customMetrics: [{metricSpec: m}]}]}", "engineConfigs[0].customMetrics[0].attributeKey: core-metrics-extractor: expected the attribute's name"),
        ("{engineConfigs: [{name: a, customMetrics: [{attributeKey: k, metricSpec: m}, {attributeKey: k, metricSpec: n}]}]}", "engineConfigs[0].customMetrics[1].attributeKey: core-metrics-extractor: 'k' is also customMetrics[0]"),
        ("{engineConfigs: [{name: a, customMetrics: [{attributeKey: k, metricSpec: 'm{'}]}]}", "engineConfigs[0].customMetrics[0].metricSpec: core-metrics-extractor: not a metric selector"),
        ("{engineConfigs: [{name: a, customMetrics: [{attributeKey: k, metricSpec: m, type: gauge}]}]}", "engineConfigs[0].customMetrics[0].type: core-metrics-extractor: unknown field"),
        ("{engineConfigs: [{name: a, customMetrics: {attributeKey: k}}]}", "engineConfigs[0].customMetrics: core-metrics-extractor: expected a list of mappings"),
        ("{engineConfigs: {name: a}}", "engineConfigs: core-metrics-extractor: expected a list of mappings"),
    ],
)  # fmt: skip
def test_bad_extractor_parameters_are_refused(params, expected):
    msg = error_of(with_sources(f"- type: metrics-data-source\n- type: core-metrics-extractor\n  parameters: {params}\n", METRICS_SOURCE))
    assert msg.startswith(f"t.yaml: plugins[2].parameters.{expected}")


# -- models-data-source / models-data-extractor -------------------------------------------------


def test_models_source_and_extractor_load():
    cfg = load(with_sources(MODELS_PAIR.replace("models-data-source\n", "models-data-source\n  parameters: {interval: 5s}\n", 1), MODELS_SOURCE))
    dl = cfg.data_layer
    assert dl.models is not None and (dl.models.path, dl.models.interval, dl.models.port) == ("/v1/models", 5.0, None)
    assert dl.metrics == DEFAULT_METRICS_SOURCE  # the default metrics source is still added
    assert cfg.warnings == ()


def test_models_source_takes_no_port():
    msg = error_of(with_sources("- type: models-data-source\n  parameters: {port: 8000}\n- type: models-data-extractor\n", MODELS_SOURCE))
    assert msg.startswith("t.yaml: plugins[1].parameters.port: models-data-source: unknown parameter")


def test_models_extractor_parameters_load_with_a_warning_as_llm_d_ignores_them():
    cfg = load(with_sources("- type: models-data-source\n- type: models-data-extractor\n  parameters: {x: 1}\n", MODELS_SOURCE))
    assert any(w.startswith("plugins[2] (models-data-extractor): parameter x has no effect") for w in cfg.warnings)


def test_served_model_filter_needs_a_models_source():
    msg = error_of(f"plugins:\n{SCORER}- type: served-model-filter\n")
    assert msg.startswith("t.yaml: plugins[1].type: served-model-filter reads each endpoint's /v1/models list")
    assert load(with_sources(MODELS_PAIR + "- type: served-model-filter\n", MODELS_SOURCE)).plugins["served-model-filter"]


# -- the section's shape ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_layer", "expected"),
    [
        ("dataLayer: []\n", "dataLayer: expected a mapping, got []"),
        ("dataLayer:\n  source: []\n", "dataLayer.source: unknown field; expected one of injectDefaults, sources, discovery"),
        ("dataLayer:\n  injectDefaults: 'no'\n", "dataLayer.injectDefaults: expected true or false, got 'no'"),
        ("dataLayer:\n  sources: {pluginRef: x}\n", "dataLayer.sources: expected a list"),
        ("dataLayer:\n  sources: [metrics-data-source]\n", "dataLayer.sources[0]: expected a mapping, got 'metrics-data-source'"),
        ("dataLayer:\n  sources:\n  - {pluginRef: metrics-data-source, extractor: []}\n", "dataLayer.sources[0].extractor: unknown field; expected one of pluginRef, extractors"),
        ("dataLayer:\n  sources:\n  - {pluginRef: metrics-data-source}\n", "dataLayer.sources[0].extractors: expected a non-empty list"),
        ("dataLayer:\n  sources:\n  - {pluginRef: metrics-data-source, extractors: []}\n", "dataLayer.sources[0].extractors: expected a non-empty list"),
        ("dataLayer:\n  sources:\n  - {pluginRef: metrics-data-source, extractors: [core-metrics-extractor]}\n", "dataLayer.sources[0].extractors[0]: expected a mapping"),
        ("dataLayer:\n  sources:\n  - {pluginRef: 7, extractors: [{pluginRef: core-metrics-extractor}]}\n", "dataLayer.sources[0].pluginRef: expected the name of a plugin, got 7"),
        ("dataLayer:\n  sources:\n  - {pluginRef: metrics-data-source, extractors: [{pluginRef: core-metrics-extractor, weight: 1}]}\n", "dataLayer.sources[0].extractors[0].weight: unknown field; expected one of pluginRef"),
        ("dataLayer:\n  discovery: file-discovery\n", "dataLayer.discovery: expected a mapping"),
    ],
)  # fmt: skip
def test_bad_section_shapes_are_refused(data_layer, expected):
    msg = error_of(f"plugins:\n{SCORER}{METRICS_PAIR}{data_layer}")
    assert msg.startswith(f"t.yaml: {expected}")


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ("  - pluginRef: metrics\n    extractors: [{pluginRef: core-metrics-extractor}]\n",
         "dataLayer.sources[0].pluginRef: no plugin named 'metrics'; defined: queue-scorer, metrics-data-source"),
        ("  - pluginRef: metrics-data-source\n    extractors: [{pluginRef: core-extractor}]\n",
         "dataLayer.sources[0].extractors[0].pluginRef: no plugin named 'core-extractor'"),
        ("  - pluginRef: queue-scorer\n    extractors: [{pluginRef: core-metrics-extractor}]\n",
         "dataLayer.sources[0].pluginRef: plugin 'queue-scorer' (queue-scorer) is not a data source"),
        ("  - pluginRef: metrics-data-source\n    extractors: [{pluginRef: queue-scorer}]\n",
         "dataLayer.sources[0].extractors[0].pluginRef: plugin 'queue-scorer' (queue-scorer) cannot read what metrics-data-source fetches; expected a core-metrics-extractor"),
        ("  - pluginRef: metrics-data-source\n    extractors: [{pluginRef: models-data-extractor}]\n",
         "dataLayer.sources[0].extractors[0].pluginRef: plugin 'models-data-extractor' (models-data-extractor) cannot read what metrics-data-source fetches"),
        ("  - pluginRef: models-data-source\n    extractors: [{pluginRef: core-metrics-extractor}]\n",
         "dataLayer.sources[0].extractors[0].pluginRef: plugin 'core-metrics-extractor' (core-metrics-extractor) cannot read what models-data-source fetches; expected a models-data-extractor"),
        (METRICS_SOURCE + METRICS_SOURCE,
         "dataLayer.sources[1].pluginRef: source 'metrics-data-source' is already listed (dataLayer.sources[0])"),
        ("  - pluginRef: metrics-data-source\n    extractors: [{pluginRef: core-metrics-extractor}, {pluginRef: core-metrics-extractor}]\n",
         "dataLayer.sources[0].extractors[1].pluginRef: a second core-metrics-extractor on this source"),
    ],
)  # fmt: skip
def test_dangling_and_mismatched_references_are_refused(sources, expected):
    msg = error_of(with_sources(METRICS_PAIR + MODELS_PAIR, sources))
    assert msg.startswith(f"t.yaml: {expected}")


def test_a_second_metrics_source_is_refused():
    msg = error_of(with_sources(
        METRICS_PAIR + "- {name: m2, type: metrics-data-source}\n- {name: e2, type: core-metrics-extractor}\n",
        METRICS_SOURCE + "  - pluginRef: m2\n    extractors: [{pluginRef: e2}]\n",
    ))  # fmt: skip
    assert msg.startswith("t.yaml: dataLayer.sources[1].pluginRef: a second metrics-data-source; llm-epp scrapes each endpoint's metrics once")


def test_a_data_layer_plugin_nothing_lists_loads_with_a_warning():
    cfg = load(f"plugins:\n{SCORER}{MODELS_PAIR}")
    assert cfg.data_layer.models is None
    assert any(w.startswith("plugins[1] (models-data-source) is not used: list it in dataLayer.sources") for w in cfg.warnings)


# -- refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("peerDiscovery", "{pluginRef: peers}"), ("crossReplicaSyncerPluginRef", "syncer"), ("crossReplicaSyncInterval", "1s")],
)
def test_active_active_fields_are_refused(field, value):
    msg = error_of(f"plugins:\n{SCORER}dataLayer:\n  {field}: {value}\n")
    assert msg.startswith(f"t.yaml: dataLayer.{field}: not supported: active-active EPP replicas")


def test_k8s_notification_source_loads_as_a_plugin_but_is_refused_as_a_source():
    plugin = "- type: k8s-notification-source\n  parameters: {group: '', version: v1, kind: Pod}\n"
    assert load(f"plugins:\n{SCORER}{plugin}").plugins["k8s-notification-source"].gvk == ("", "v1", "Pod")
    msg = error_of(with_sources(plugin, "  - pluginRef: k8s-notification-source\n    extractors: [{pluginRef: queue-scorer}]\n"))
    assert msg.startswith("t.yaml: dataLayer.sources[0].pluginRef: k8s-notification-source is not supported: its events go to notification extractors")


def test_k8s_notification_source_needs_version_and_kind():
    msg = error_of(f"plugins:\n{SCORER}- type: k8s-notification-source\n  parameters: {{version: v1}}\n")
    assert msg.startswith("t.yaml: plugins[1].parameters.kind: k8s-notification-source: is required")


def test_endpoint_notification_source_takes_only_llm_ds_endpoint_extractors():
    msg = error_of(with_sources("- type: endpoint-notification-source\n", "  - pluginRef: endpoint-notification-source\n    extractors: [{pluginRef: queue-scorer}]\n"))
    assert msg.startswith(
        "t.yaml: dataLayer.sources[0].extractors[0].pluginRef: plugin 'queue-scorer' (queue-scorer) takes no endpoint events; "
        "endpoint extractors are: mm-embeddings-cache-producer, precise-prefix-cache-producer, precise-prefix-cache-scorer"
    )


def test_the_precise_producer_as_an_endpoint_extractor_loads_as_llm_ds_guide_wires_it():
    # llm-d's precise-prefix-cache guide: the producer follows endpoints through an endpoint-notification-source.
    # The producer is another module's plugin; the data layer knows it by its type name only.
    class Producer:
        type = "precise-prefix-cache-producer"

    plugins = {"endpoint-notification-source": EndpointNotificationSource(), "precise-prefix-cache-producer": Producer()}
    raw = {"sources": [{"pluginRef": "endpoint-notification-source", "extractors": [{"pluginRef": "precise-prefix-cache-producer"}]}]}
    warnings: list[str] = []
    dl = build_data_layer(raw, plugins, lambda n: f"plugins[{list(plugins).index(n)}]", _fail, warnings)
    assert dl.endpoint_listeners == ("precise-prefix-cache-producer",)
    assert dl.metrics == DEFAULT_METRICS_SOURCE and warnings == []


def _fail(field: str, message: str) -> ConfigError:
    return ConfigError(message, source="t.yaml", field=field)


@pytest.mark.parametrize(
    ("type_name", "why"),
    [("disaggregatedset-rollout-pod-extractor", "Pod watch")],
)  # fmt: skip
def test_data_layer_plugins_llm_epp_lacks_are_refused_with_the_reason(type_name, why):
    msg = error_of(f"plugins:\n{SCORER}- type: {type_name}\n")
    assert msg.startswith(f"t.yaml: plugins[1].type: plugin type '{type_name}' (llm-d router) is not supported: ") and why in msg


# -- file-discovery -------------------------------------------------------------------------------


def test_file_discovery_loads_with_llm_ds_parameters():
    cfg = load(f"plugins:\n{SCORER}- name: files\n  type: file-discovery\n  parameters: {{path: /etc/epp/endpoints.yaml, watchFile: true}}\n"
               "dataLayer:\n  discovery: {pluginRef: files}\n")  # fmt: skip
    d = cfg.data_layer.discovery
    assert d is not None and (d.path, d.watch_file) == ("/etc/epp/endpoints.yaml", True)
    assert cfg.warnings == ()


def test_newer_llm_ds_discovery_endpoints_reference_is_the_same_discovery():
    """llm-d's no-kubernetes guide (after v0.10) writes `discovery: {endpoints: {pluginRef: ...}}`."""
    cfg = load(f"plugins:\n{SCORER}- name: files\n  type: file-discovery\n  parameters: {{path: /etc/epp/endpoints.yaml, watchFile: true}}\n"
               "dataLayer:\n  discovery:\n    endpoints: {pluginRef: files}\n")  # fmt: skip
    d = cfg.data_layer.discovery
    assert d is not None and (d.path, d.watch_file) == ("/etc/epp/endpoints.yaml", True)
    assert cfg.warnings == ()


def test_file_discovery_reads_once_by_default_as_in_llm_d():
    cfg = load(f"plugins:\n{SCORER}- type: file-discovery\n  parameters: {{path: e.yaml}}\ndataLayer:\n  discovery: {{pluginRef: file-discovery}}\n")
    assert cfg.data_layer.discovery is not None and cfg.data_layer.discovery.watch_file is False


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("- type: file-discovery\n", "plugins[1].parameters.path: file-discovery: is required"),
        ("- type: file-discovery\n  parameters: {path: e.yaml, watchFile: 'yes'}\n", "plugins[1].parameters.watchFile: file-discovery: expected true or false"),
        ("- type: file-discovery\n  parameters: {path: e.yaml, watch: true}\n", "plugins[1].parameters.watch: file-discovery: unknown parameter"),
    ],
)  # fmt: skip
def test_bad_file_discovery_parameters_are_refused(body, expected):
    assert error_of(f"plugins:\n{SCORER}{body}").startswith(f"t.yaml: {expected}")


@pytest.mark.parametrize(
    ("discovery", "expected"),
    [
        ("{pluginRef: nothing}", "dataLayer.discovery.pluginRef: no plugin named 'nothing'"),
        ("{pluginRef: metrics-data-source}", "dataLayer.discovery.pluginRef: plugin 'metrics-data-source' (metrics-data-source) is not an endpoint discovery plugin"),
        ("{pluginRef: file-discovery, watchFile: true}", "dataLayer.discovery.watchFile: unknown field; expected one of pluginRef, endpoints"),
        ("{endpoints: {pluginRef: nothing}}", "dataLayer.discovery.endpoints.pluginRef: no plugin named 'nothing'"),
        ("{endpoints: {pluginRef: metrics-data-source}}", ("dataLayer.discovery.endpoints.pluginRef: plugin 'metrics-data-source' "
                                                          "(metrics-data-source) is not an endpoint discovery plugin")),
        ("{endpoints: file-discovery}", "dataLayer.discovery.endpoints: expected a mapping"),
        ("{endpoints: {pluginRef: file-discovery, watch: true}}", "dataLayer.discovery.endpoints.watch: unknown field; expected one of pluginRef"),
    ],
)  # fmt: skip
def test_bad_discovery_references_are_refused(discovery, expected):
    body = f"plugins:\n{SCORER}- type: metrics-data-source\n- type: file-discovery\n  parameters: {{path: e.yaml}}\ndataLayer:\n  discovery: {discovery}\n"
    assert error_of(body).startswith(f"t.yaml: {expected}")


def test_discovery_endpoints_is_the_newer_spelling_of_discovery_plugin_ref():
    # llm-d-router PR #2434 groups discovery as endpoints (and peers); v0.10's pluginRef stays
    plugins = f"plugins:\n{SCORER}- type: file-discovery\n  parameters: {{path: e.yaml}}\n"
    new = load(plugins + "dataLayer:\n  discovery:\n    endpoints: {pluginRef: file-discovery}\n")
    old = load(plugins + "dataLayer:\n  discovery: {pluginRef: file-discovery}\n")
    assert new.data_layer.discovery == old.data_layer.discovery is not None
    assert new.warnings == ()
    both = load(plugins + "dataLayer:\n  discovery: {pluginRef: file-discovery, endpoints: {pluginRef: file-discovery}}\n")
    assert both.data_layer.discovery == old.data_layer.discovery


@pytest.mark.parametrize(
    ("discovery", "expected"),
    [
        ("{endpoints: {pluginRef: nothing}}", "dataLayer.discovery.endpoints.pluginRef: no plugin named 'nothing'"),
        ("{pluginRef: file-discovery, endpoints: {pluginRef: metrics-data-source}}", "dataLayer.discovery.pluginRef: 'file-discovery' differs from endpoints.pluginRef 'metrics-data-source'"),
        ("{endpoints: {pluginRef: file-discovery}, peers: {pluginRef: file-discovery}}", "dataLayer.discovery.peers: not supported: active-active"),
        ("{}", "dataLayer.discovery: expected pluginRef or endpoints.pluginRef"),
    ],
)  # fmt: skip
def test_bad_discovery_endpoints_references_are_refused(discovery, expected):
    body = f"plugins:\n{SCORER}- type: metrics-data-source\n- type: file-discovery\n  parameters: {{path: e.yaml}}\ndataLayer:\n  discovery: {discovery}\n"
    assert error_of(body).startswith(f"t.yaml: {expected}")


def test_a_discovery_plugin_nothing_names_loads_with_a_warning():
    cfg = load(f"plugins:\n{SCORER}- type: file-discovery\n  parameters: {{path: e.yaml}}\n")
    assert cfg.data_layer.discovery is None
    assert any("plugins[1] (file-discovery) is not used: list it in dataLayer.discovery" in w for w in cfg.warnings)


# -- a real llm-d shape -----------------------------------------------------------------------------


def test_llm_ds_documented_file_discovery_and_models_config_loads():
    cfg = load(
        "plugins:\n"
        "- {name: file-disc, type: file-discovery, parameters: {path: /etc/epp/endpoints.yaml, watchFile: true}}\n"
        "- {type: models-data-source, name: vllm-models-source, parameters: {scheme: https, insecureSkipVerify: false, interval: 5s}}\n"
        "- {type: models-data-extractor, name: vllm-models-extractor}\n"
        "- type: metrics-data-source\n- type: core-metrics-extractor\n- type: kv-cache-utilization-scorer\n"
        "schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: kv-cache-utilization-scorer\n"
        "dataLayer:\n  sources:\n"
        "  - pluginRef: metrics-data-source\n    extractors: [{pluginRef: core-metrics-extractor}]\n"
        "  - pluginRef: vllm-models-source\n    extractors: [{pluginRef: vllm-models-extractor}]\n"
        "  discovery: {pluginRef: file-disc}\n"
    )
    dl = cfg.data_layer
    assert dl.models is not None and dl.models.scheme == "https" and not dl.models.insecure_skip_verify
    assert dl.discovery is not None and dl.metrics == DEFAULT_METRICS_SOURCE
    assert cfg.warnings == ()
