"""The `dataLayer` section (docs/configuration.md, Data layer): which data sources and extractors run,
and where the pool's endpoints come from, resolved against the config's plugins into one typed
`DataLayerConfig` that the server (extproc.server.runner) applies.

What llm-epp runs: one `metrics-data-source` + `core-metrics-extractor` (the metrics scraper), at most
one `models-data-source` + `models-data-extractor` (the /v1/models poller), at most one
`dcgm-data-source` + `dcgm-extractor` (the GPU utilization scraper), `file-discovery`, and
`endpoint-notification-source` for the plugins llm-d feeds endpoint events (they follow the pool's
membership here anyway). A cluster-scoped EPP runs their multi-cluster variants instead
(`multicluster-file-discovery`, a `multicluster-metrics-data-source` + `multicluster-metrics-extractor`
whose pool aggregates the multicluster scorers read). As in llm-d, the default
metrics source and extractor are added unless `injectDefaults: false` or a metrics source is listed; a
plugin named `metrics-data-source` / `core-metrics-extractor` is the one added. What llm-epp cannot
honour is refused naming the field and why; a plugin reading an endpoint attribute no listed extractor
publishes loads with a warning (every endpoint lacks it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pickers.framework.endpoint import AttributeKey
from pickers.framework.errors import ConfigError, shown
from pickers.plugins.datalayer.attributes import GPU_UTILIZATION
from pickers.plugins.datalayer.discovery import FileDiscovery, FileDiscoveryConfig
from pickers.plugins.datalayer.extractors import (
    DEFAULT_EXTRACTION,
    CoreMetricsExtractor,
    DataExtractor,
    MetricsExtraction,
    MulticlusterMetricsExtractor,
    PoolMetricsExtraction,
)
from pickers.plugins.datalayer.sources import (
    DEFAULT_METRICS_SOURCE,
    DataSource,
    DcgmDataSource,
    HttpSource,
    K8sNotificationSource,
    MetricsDataSource,
    ModelsDataSource,
)
from pickers.plugins.latency.observer import LatencyObserverProducer

_KEYS = ("injectDefaults", "sources", "discovery", "peerDiscovery", "crossReplicaSyncerPluginRef", "crossReplicaSyncInterval")
_SOURCE_KEYS = ("pluginRef", "extractors")
_REF_KEYS = ("pluginRef",)
# llm-d-router PR #2434's consolidated form, `discovery: {endpoints: {pluginRef}, peers: {pluginRef}}`,
# beside v0.10's `discovery: {pluginRef}`
_DISCOVERY_KEYS = ("pluginRef", "endpoints", "peers")
ACTIVE_ACTIVE_REFUSED = (
    "active-active EPP replicas (peer discovery, cross-replica sync) are not implemented in llm-epp; "
    "run one replica, or several with --ha-enable-leader-election (one serves)"
)
REFUSED = MappingProxyType(
    {
        "peerDiscovery": ACTIVE_ACTIVE_REFUSED,
        "crossReplicaSyncerPluginRef": ACTIVE_ACTIVE_REFUSED,
        "crossReplicaSyncInterval": ACTIVE_ACTIVE_REFUSED,
    }
)
# llm-d's endpoint extractors: plugins that act on endpoint add/remove events (the precise producer
# subscribes to each endpoint's KV events, and so does the deprecated precise-prefix-cache-scorer, which
# is one by delegation in llm-d; the encoder-cache producer drops a leaving endpoint's LRU).
# In llm-epp such a plugin follows the datastore's membership itself, so wiring it to
# endpoint-notification-source is what happens anyway. Matched by type name, so this module needs none
# of theirs.
ENDPOINT_EXTRACTOR_TYPES = frozenset({"precise-prefix-cache-producer", "precise-prefix-cache-scorer", "mm-embeddings-cache-producer"})
K8S_NOTIFICATIONS_REFUSED = (
    "its events go to notification extractors, which in llm-d are Go plugins of your own (llm-d ships "
    "none) and llm-epp has none; llm-epp's own Kubernetes watch already follows the pool's Pods (membership, "
    "labels), InferenceObjectives and InferenceModelRewrites"
)


@dataclass(slots=True, frozen=True)
class DataLayerConfig:
    """What the data layer runs. The default is llm-d's: the metrics source and extractor, nothing else."""

    metrics: HttpSource | None = DEFAULT_METRICS_SOURCE  # None: no metrics scraping (injectDefaults: false)
    # an engine mapping per endpoint, or a peer cluster's pool aggregates (multicluster-metrics-extractor)
    extraction: MetricsExtraction | PoolMetricsExtraction = DEFAULT_EXTRACTION
    models: HttpSource | None = None  # the /v1/models poller, when a models-data-source is listed
    discovery: FileDiscoveryConfig | None = None  # None: epp serve's flags say where endpoints come from
    endpoint_listeners: tuple[str, ...] = ()  # wired to endpoint-notification-source; they follow membership anyway
    dcgm: HttpSource | None = None  # the DCGM exporter scraper, when a dcgm-data-source is listed
    dispatchers: tuple[str, ...] = ()  # latency-observer-producer-hub plugins listed as sources: they publish

    def attributes(self) -> frozenset[AttributeKey]:
        """The endpoint attributes the data layer publishes."""
        produced = self.extraction.attributes() if self.metrics is not None else frozenset()
        return produced | {GPU_UTILIZATION} if self.dcgm is not None else produced

    def summary(self) -> list[str]:
        """One line per part, for `epp check-config`."""
        lines = []
        if self.metrics is None:
            lines.append("metrics: off (injectDefaults: false and no metrics-data-source)")
        elif isinstance(self.extraction, PoolMetricsExtraction):
            ex = self.extraction
            lines.append(
                f"metrics: {self.metrics.name} {_url(self.metrics)}{_every(self.metrics)}; each peer cluster's pool "
                f"aggregates {ex.kv_usage} and {ex.queue}"
            )
        else:
            engines = self.extraction
            lines.append(
                f"metrics: {self.metrics.name} {_url(self.metrics)}{_every(self.metrics)}; engines by label "
                f"{engines.engine_label_key} ({', '.join(engines.engines)}; default {engines.default_engine})"
            )
        if self.models is not None:
            lines.append(f"models: {self.models.name} {_url(self.models)}{_every(self.models)}")
        if self.dcgm is not None:
            lines.append(f"GPU utilization: {self.dcgm.name} {_url(self.dcgm)}{_every(self.dcgm)} -> {GPU_UTILIZATION}")
        custom = sorted(k.name for k in self.extraction.attributes()) if self.metrics is not None else []
        if custom:
            lines.append(f"custom metrics (attributes of core-metrics-extractor): {', '.join(custom)}")
        if self.discovery is not None:
            watch = ", re-read when it changes" if self.discovery.watch_file else ", read once"
            what = "peer clusters from file" if self.discovery.peer_clusters else "file"
            lines.append(f"discovery: {what} {self.discovery.path}{watch}")
        if self.endpoint_listeners:
            lines.append(f"endpoint notifications: {', '.join(self.endpoint_listeners)}")
        if self.dispatchers:
            lines.append(f"observed TTFT published by: {', '.join(self.dispatchers)}")
        return lines


DEFAULT_DATA_LAYER = DataLayerConfig()


def _url(s: HttpSource) -> str:
    host = "<node or endpoint>" if s.use_node_address else "<endpoint>"
    return f"{s.scheme}://{host}:{s.port or '<port>'}{s.path}"


POOL_METRICS_NEEDED = (
    "reads each peer cluster's pool aggregates: list a multicluster-metrics-data-source with a "
    "multicluster-metrics-extractor in dataLayer.sources (llm-d refuses this config too)"
)


def _every(s: HttpSource) -> str:
    return f" every {s.interval:g}s" if s.interval else ""


Fail = Callable[[str, str], ConfigError]


def build_data_layer(
    raw: object,
    plugins: Mapping[str, object],
    plugin_path: Callable[[str], str],
    fail: Fail,
    warnings: list[str],
) -> DataLayerConfig:
    """`raw` is the section (None when absent); `plugin_path(name)` is the field path of a plugin
    (`plugins[3]`), `fail(field, message)` makes the loader's error. Raises ConfigError."""
    section = _mapping(raw, "dataLayer", _KEYS, fail) if raw is not None else {}
    for key, why in REFUSED.items():
        if section.get(key) not in (None, "", {}):
            raise fail(f"dataLayer.{key}", f"not supported: {why}")
    inject = section.get("injectDefaults")
    if inject is not None and not isinstance(inject, bool):
        raise fail("dataLayer.injectDefaults", f"expected true or false, got {shown(inject)}")

    used: set[str] = set()
    metrics: HttpSource | None = None
    extraction: MetricsExtraction | PoolMetricsExtraction = DEFAULT_EXTRACTION
    models: HttpSource | None = None
    dcgm: HttpSource | None = None
    listeners: list[str] = []
    sources = section.get("sources")
    if sources is not None and not isinstance(sources, list):
        raise fail("dataLayer.sources", f"expected a list, got {shown(sources)}")
    seen_sources: dict[str, int] = {}
    dispatched: set[str] = set()
    for i, item in enumerate(sources or ()):
        path = f"dataLayer.sources[{i}]"
        spec = _mapping(item, path, _SOURCE_KEYS, fail)
        name = _ref(spec, path, plugins, fail)
        if name in seen_sources:
            raise fail(f"{path}.pluginRef", f"source {shown(name)} is already listed (dataLayer.sources[{seen_sources[name]}])")
        seen_sources[name] = i
        source = plugins[name]
        if isinstance(source, LatencyObserverProducer):  # llm-d's PollingDispatcher: listed, it publishes
            if spec.get("extractors") not in (None, []):
                raise fail(f"{path}.extractors", f"{source.type} takes no extractors: it publishes its own observations (llm-d refuses them too)")
            dispatched.add(name)
            used.add(name)
            continue
        if not isinstance(source, DataSource):
            raise fail(f"{path}.pluginRef", f"plugin {shown(name)} ({getattr(source, 'type', '?')}) is not a data source")
        if isinstance(source, K8sNotificationSource):
            raise fail(f"{path}.pluginRef", f"k8s-notification-source is not supported: {K8S_NOTIFICATIONS_REFUSED}")
        extractors = _extractors(spec.get("extractors"), path, plugins, fail)
        used.add(name)
        used.update(extractors)
        if isinstance(source, MetricsDataSource):
            if metrics is not None:
                raise fail(f"{path}.pluginRef", f"a second metrics-data-source; llm-epp scrapes each endpoint's metrics once ({metrics.name})")
            metrics = source.source
        elif isinstance(source, ModelsDataSource):
            if models is not None:
                raise fail(f"{path}.pluginRef", f"a second models-data-source; llm-epp fetches each endpoint's models once ({models.name})")
            models = source.source
        elif isinstance(source, DcgmDataSource):
            if dcgm is not None:
                raise fail(f"{path}.pluginRef", f"a second dcgm-data-source; llm-epp scrapes each endpoint's GPUs once ({dcgm.name})")
            dcgm = source.source
        for j, ext_name in enumerate(extractors):
            ext = plugins[ext_name]
            ext_path = f"{path}.extractors[{j}].pluginRef"
            if source.output == "endpoint-notifications":
                if getattr(ext, "type", None) not in ENDPOINT_EXTRACTOR_TYPES:
                    raise fail(
                        ext_path,
                        f"plugin {shown(ext_name)} ({getattr(ext, 'type', '?')}) takes no endpoint events; endpoint "
                        f"extractors are: {', '.join(sorted(ENDPOINT_EXTRACTOR_TYPES))}",
                    )
                listeners.append(ext_name)
            elif not isinstance(ext, DataExtractor) or ext.input != source.output:
                wanted = {
                    "prometheus": "a core-metrics-extractor or multicluster-metrics-extractor",
                    "models": "a models-data-extractor", "dcgm": "a dcgm-extractor",
                }.get(source.output, "?")  # fmt: skip
                raise fail(
                    ext_path,
                    f"plugin {shown(ext_name)} ({getattr(ext, 'type', '?')}) cannot read what {getattr(source, 'type', '?')} "
                    f"fetches; expected {wanted}",
                )
            elif isinstance(ext, (CoreMetricsExtractor, MulticlusterMetricsExtractor)):
                other = next((n for n in extractors[:j] if isinstance(plugins[n], (CoreMetricsExtractor, MulticlusterMetricsExtractor))), None)
                if other is not None:
                    raise fail(
                        ext_path,
                        f"{getattr(ext, 'type', '?')} and {getattr(plugins[other], 'type', '?')} ({shown(other)}) on one "
                        "source: an endpoint is either a model server (core-metrics-extractor) or a peer cluster "
                        "(multicluster-metrics-extractor)",
                    )
                extraction = ext.extraction

    if metrics is None and inject is not False:
        # llm-d's default injection: its metrics source and extractor, the configured ones of those names if any
        source = plugins.get(DEFAULT_METRICS_SOURCE.name)
        ext = plugins.get(CoreMetricsExtractor.type)
        for default_name, obj, cls in ((DEFAULT_METRICS_SOURCE.name, source, MetricsDataSource), (CoreMetricsExtractor.type, ext, CoreMetricsExtractor)):
            if obj is not None and not isinstance(obj, cls):
                raise fail(
                    f"{plugin_path(default_name)}.name",
                    f"{shown(default_name)} is the name of the default {cls.type} llm-d adds; give this {getattr(obj, 'type', '?')} another name",
                )
        metrics = source.source if isinstance(source, MetricsDataSource) else DEFAULT_METRICS_SOURCE
        extraction = ext.extraction if isinstance(ext, CoreMetricsExtractor) else DEFAULT_EXTRACTION
        used.update(n for n in (DEFAULT_METRICS_SOURCE.name, CoreMetricsExtractor.type) if n in plugins)
    elif metrics is None:
        warnings.append(
            "dataLayer: injectDefaults is false and no metrics-data-source is listed: model-server metrics "
            "are not scraped (scorers that read them see zeros; the saturation detector counts every endpoint "
            "as saturated, so sheddable requests are refused, as in llm-d)"
        )

    for name, plugin in plugins.items():
        if isinstance(plugin, LatencyObserverProducer):
            plugin.set_dispatched(name in dispatched)  # a reload's copy of a previous one is told afresh
            if name not in dispatched:
                warnings.append(
                    f"{plugin_path(name)} ({plugin.type}) is not listed in dataLayer.sources: it publishes nothing "
                    "(as in llm-d, whose data layer dispatches it from there), so every endpoint reads cold"
                )

    discovery = None
    raw_discovery = section.get("discovery")
    if raw_discovery is not None:
        spec, where = _discovery_ref(raw_discovery, fail)
        name = _ref(spec, where, plugins, fail)
        plugin = plugins[name]
        if not isinstance(plugin, FileDiscovery):
            raise fail(
                f"{where}.pluginRef",
                f"plugin {shown(name)} ({getattr(plugin, 'type', '?')}) is not an endpoint discovery plugin; expected "
                "file-discovery or multicluster-file-discovery",
            )
        discovery = plugin.config
        used.add(name)

    if discovery is not None and discovery.peer_clusters and not isinstance(extraction, PoolMetricsExtraction) and metrics is not None:
        warnings.append(
            "dataLayer: multicluster-file-discovery lists peer clusters, but their metrics are read as a model "
            "server's (core-metrics-extractor); a cluster's pool aggregates are read by a "
            "multicluster-metrics-extractor on a multicluster-metrics-data-source"
        )
    built = DataLayerConfig(metrics, extraction, models, discovery, tuple(listeners), dcgm, tuple(n for n in seen_sources if n in dispatched))
    produced = built.attributes()
    for name, plugin in plugins.items():
        if getattr(plugin, "reads_pool_metrics", False) and not isinstance(extraction, PoolMetricsExtraction):
            raise fail(f"{plugin_path(name)}.type", f"{getattr(plugin, 'type', '?')} {POOL_METRICS_NEEDED}")
        key = getattr(plugin, "reads_attribute", None)
        if isinstance(key, AttributeKey) and key not in produced:
            warnings.append(f"{plugin_path(name)} ({getattr(plugin, 'type', '?')}): {_unpublished(key, produced)}")
        if getattr(plugin, "reads_served_models", False) and models is None:
            raise fail(
                f"{plugin_path(name)}.type",
                f"{getattr(plugin, 'type', '?')} reads each endpoint's /v1/models list: list a models-data-source with "
                "a models-data-extractor in dataLayer.sources",
            )
        if _is_data_layer(plugin) and name not in used:
            warnings.append(
                f"{plugin_path(name)} ({getattr(plugin, 'type', '?')}) is not used: list it in dataLayer."
                f"{'discovery' if isinstance(plugin, FileDiscovery) else 'sources'} (it does nothing otherwise, as in llm-d)"
            )
    return built


def _discovery_ref(raw: object, fail: Fail) -> tuple[Mapping[str, Any], str]:
    """The endpoint discovery reference, v0.10's `discovery.pluginRef` or PR #2434's
    `discovery.endpoints.pluginRef` (both naming one plugin is fine; `peers` is peer discovery, refused)."""
    spec = _mapping(raw, "dataLayer.discovery", _DISCOVERY_KEYS, fail)
    if spec.get("peers") not in (None, "", {}):
        raise fail("dataLayer.discovery.peers", f"not supported: {ACTIVE_ACTIVE_REFUSED}")
    endpoints = spec.get("endpoints")
    if endpoints is None:
        if "pluginRef" not in spec:
            raise fail("dataLayer.discovery", "expected pluginRef or endpoints.pluginRef: the endpoint discovery plugin")
        return spec, "dataLayer.discovery"
    inner = _mapping(endpoints, "dataLayer.discovery.endpoints", _REF_KEYS, fail)
    old = spec.get("pluginRef")
    if old is not None and old != inner.get("pluginRef"):
        raise fail(
            "dataLayer.discovery.pluginRef",
            f"{shown(old)} differs from endpoints.pluginRef {shown(inner.get('pluginRef'))}; set one (pluginRef is the older form)",
        )
    return inner, "dataLayer.discovery.endpoints"


def _unpublished(key: AttributeKey, produced: frozenset[AttributeKey]) -> str:
    """Why no endpoint will have the attribute `key`, and what would publish it."""
    if key == GPU_UTILIZATION:
        hint = "list a dcgm-data-source with a dcgm-extractor in dataLayer.sources"
    elif key.producer == CoreMetricsExtractor.type:
        hint = "add it to a core-metrics-extractor engine's customMetrics (attributeKey)"
    else:
        hint = f"no llm-epp plugin publishes attributes as {key.producer!r}" if key.producer else "no llm-epp plugin publishes producer-agnostic attributes"
    known = ", ".join(sorted(map(str, produced))) or "none"
    return f"reads the endpoint attribute {key}, which nothing in the data layer publishes ({hint}; published: {known}), so every endpoint lacks it"


def _is_data_layer(plugin: object) -> bool:
    return isinstance(plugin, (DataSource, DataExtractor, FileDiscovery))


def _mapping(value: object, path: str, keys: tuple[str, ...], fail: Fail) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(path, f"expected a mapping, got {shown(value)}")
    for k in value:
        if k not in keys:
            raise fail(f"{path}.{k}", f"unknown field; expected one of {', '.join(keys)}")
    return value


def _ref(spec: Mapping[str, Any], path: str, plugins: Mapping[str, object], fail: Fail) -> str:
    name = spec.get("pluginRef")
    if not isinstance(name, str) or not name:
        raise fail(f"{path}.pluginRef", f"expected the name of a plugin, got {shown(name)}")
    if name not in plugins:
        raise fail(f"{path}.pluginRef", f"no plugin named {shown(name)}; defined: {', '.join(plugins) or 'none'}")
    return name


def _extractors(raw: object, path: str, plugins: Mapping[str, object], fail: Fail) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise fail(f"{path}.extractors", f"expected a non-empty list of {{pluginRef: ...}}, got {shown(raw)}")
    names: list[str] = []
    types: dict[str, int] = {}
    for j, item in enumerate(raw):
        ref_path = f"{path}.extractors[{j}]"
        name = _ref(_mapping(item, ref_path, _REF_KEYS, fail), ref_path, plugins, fail)
        type_name = getattr(plugins[name], "type", name)
        if type_name in types:
            raise fail(f"{ref_path}.pluginRef", f"a second {type_name} on this source ({path}.extractors[{types[type_name]}])")
        types[type_name] = j
        names.append(name)
    return names
