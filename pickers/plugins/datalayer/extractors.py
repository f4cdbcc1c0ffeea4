"""Data-layer extractors: what a source's payload becomes on the endpoint.

`core-metrics-extractor` says which Prometheus series are an engine's queue, running requests, KV-cache
usage, LoRA adapters and cache layout (llm-d's built-in engine mappings: vLLM, SGLang, trtllm-serve,
Triton with TensorRT-LLM, Triton), and picks an endpoint's engine by its `llm-d.ai/engine-type` label;
an engine's `customMetrics` become scalar endpoint attributes (pickers.plugins.datalayer.attributes).
`multicluster-metrics-extractor` reads a peer cluster's pool aggregates instead (its EPP's mean KV-cache
use and waiting queue). `dcgm-extractor` turns a DCGM exporter's `DCGM_FI_DEV_GPU_UTIL` into the
`GPUUtilization` attribute. `models-data-extractor` keeps the models and LoRA adapters an endpoint's
`/v1/models` lists. The scrapers in extproc.datalayer apply them; here they are validated and typed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from pickers.framework.endpoint import AttributeKey
from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.datalayer.attributes import CORE_METRICS_PRODUCER

ENGINE_LABEL = "llm-d.ai/engine-type"
LEGACY_ENGINE_LABEL = "inference.networking.k8s.io/engine-type"  # GIE's, read when ENGINE_LABEL is absent
DEFAULT_ENGINE = "vllm"
RESERVED_ENGINE = "default"  # llm-d's name for the fallback mapping

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_SELECTOR = re.compile(r"\s*([^\s{]+)\s*(?:\{([^}]*)\})?\s*")
_LABEL_PAIR = re.compile(r'\s*([^\s=]+)\s*=\s*(?:"([^"]*)"|([^",}\s]+))\s*')


@dataclass(slots=True, frozen=True)
class MetricSpec:
    """One series selector, PromQL instant-vector style: `name` or `name{label=value,...}`."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MetricSpec | None:
        """None for "" (the metric is not read); ValueError for anything that is not a selector."""
        if not text:
            return None
        m = _SELECTOR.fullmatch(text)
        if m is None or not _METRIC_NAME.fullmatch(m.group(1)):
            raise ValueError(f"not a metric selector like name or name{{label=value}}: {shown(text)}")
        labels: list[tuple[str, str]] = []
        block = (m.group(2) or "").strip()
        if block:
            for pair in block.split(","):
                lm = _LABEL_PAIR.fullmatch(pair)
                if lm is None or not _LABEL_NAME.fullmatch(lm.group(1)):
                    raise ValueError(f"invalid label matcher {shown(pair)} in {shown(text)}")
                labels.append((lm.group(1), lm.group(2) if lm.group(2) is not None else lm.group(3)))
        return cls(m.group(1), tuple(labels))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels)

    def __str__(self) -> str:
        if not self.labels:
            return self.name
        return self.name + "{" + ",".join(f'{k}="{v}"' for k, v in self.labels) + "}"


@dataclass(slots=True, frozen=True)
class CustomMetric:
    """One `customMetrics` entry: the series whose value becomes the attribute `attribute_key`."""

    attribute_key: str
    spec: MetricSpec


@dataclass(slots=True, frozen=True)
class EngineMetrics:
    """Where one engine reports what the scheduler reads. A None spec is not read."""

    name: str
    queued: MetricSpec | None = None
    running: MetricSpec | None = None
    kv_usage: MetricSpec | None = None
    lora: MetricSpec | None = None  # vLLM's info gauge: running/waiting adapters and max_lora as labels
    cache_info: MetricSpec | None = None  # an info gauge with the block size and block count as labels
    cache_block_size_label: str = "block_size"
    cache_num_blocks_label: str = "num_gpu_blocks"
    cache_block_size: MetricSpec | None = None  # the same as plain gauges (Triton TensorRT-LLM)
    cache_num_blocks: MetricSpec | None = None
    # llm-epp's additions to the built-in vllm mapping (not configurable): the pre-V1 name of the KV
    # usage gauge, read when the current one is absent, and the prefix-cache counters
    kv_usage_fallback: MetricSpec | None = None
    prefix_cache_hits: MetricSpec | None = None
    prefix_cache_queries: MetricSpec | None = None
    custom: tuple[CustomMetric, ...] = ()  # customMetrics: attributes of the core metrics extractor

    def specs(self) -> tuple[MetricSpec, ...]:
        found = (
            self.queued, self.running, self.kv_usage, self.lora, self.cache_info, self.cache_block_size,
            self.cache_num_blocks, self.kv_usage_fallback, self.prefix_cache_hits, self.prefix_cache_queries,
        )  # fmt: skip
        return tuple(s for s in found if s is not None)


def _spec(text: str) -> MetricSpec | None:
    return MetricSpec.parse(text)


# llm-d's core-metrics-extractor defaults (its factories.go), engine by engine
BUILTIN_ENGINES: Mapping[str, EngineMetrics] = MappingProxyType(
    {
        "vllm": EngineMetrics(
            "vllm",
            queued=_spec("vllm:num_requests_waiting"),
            running=_spec("vllm:num_requests_running"),
            kv_usage=_spec("vllm:kv_cache_usage_perc"),
            lora=_spec("vllm:lora_requests_info"),
            cache_info=_spec("vllm:cache_config_info"),
            kv_usage_fallback=_spec("vllm:gpu_cache_usage_perc"),
            prefix_cache_hits=_spec("vllm:prefix_cache_hits_total"),
            prefix_cache_queries=_spec("vllm:prefix_cache_queries_total"),
        ),
        "sglang": EngineMetrics(
            "sglang",
            queued=_spec("sglang:num_queue_reqs"),
            running=_spec("sglang:num_running_reqs"),
            kv_usage=_spec("sglang:token_usage"),
            cache_info=_spec("sglang:cache_config_info"),
            cache_block_size_label="page_size",
            cache_num_blocks_label="num_pages",
        ),
        "trtllm-serve": EngineMetrics(
            "trtllm-serve",
            queued=_spec("trtllm_num_requests_waiting"),
            running=_spec("trtllm_num_requests_running"),
            kv_usage=_spec("trtllm_kv_cache_utilization"),
            cache_block_size=_spec("trtllm_kv_cache_tokens_per_block"),
            cache_num_blocks=_spec("trtllm_kv_cache_max_blocks"),
        ),
        "triton-tensorrt-llm": EngineMetrics(
            "triton-tensorrt-llm",
            queued=_spec("nv_trt_llm_request_metrics{request_type=waiting}"),
            running=_spec("nv_trt_llm_request_metrics{request_type=scheduled}"),
            kv_usage=_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"),
            cache_block_size=_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}"),
            cache_num_blocks=_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}"),
        ),
        # Triton Inference Server for non-LLM models: a queue, no KV cache
        "triton": EngineMetrics(
            "triton",
            queued=_spec("nv_inference_pending_request_count"),
            running=_spec("nv_inference_exec_count"),
        ),
    }
)

# engineConfigs[] keys -> EngineMetrics fields
_ENGINE_SPECS = {
    "queuedRequestsSpec": "queued",
    "runningRequestsSpec": "running",
    "kvUsageSpec": "kv_usage",
    "loraSpec": "lora",
    "cacheInfoSpec": "cache_info",
    "cacheBlockSizeSpec": "cache_block_size",
    "cacheNumBlocksSpec": "cache_num_blocks",
}
_ENGINE_LABELS = {"cacheBlockSizeLabelName": "cache_block_size_label", "cacheNumBlocksLabelName": "cache_num_blocks_label"}


@dataclass(slots=True, frozen=True)
class MetricsExtraction:
    """What `core-metrics-extractor` configures: the engine mappings and how an endpoint's engine is found."""

    engines: Mapping[str, EngineMetrics] = field(default_factory=lambda: BUILTIN_ENGINES)
    default_engine: str = DEFAULT_ENGINE
    engine_label_key: str = ENGINE_LABEL

    def engine_for(self, labels: Mapping[str, str]) -> EngineMetrics:
        """The endpoint's engine by its label (llm-d's, then GIE's), else the default engine."""
        name = labels.get(self.engine_label_key) or labels.get(LEGACY_ENGINE_LABEL)
        engine = self.engines.get(name) if name else None
        return engine if engine is not None else self.engines[self.default_engine]

    def attributes(self) -> frozenset[AttributeKey]:
        """The attributes some engine's customMetrics publish."""
        return frozenset(AttributeKey(c.attribute_key, CORE_METRICS_PRODUCER) for e in self.engines.values() for c in e.custom)


DEFAULT_EXTRACTION = MetricsExtraction()


class DataExtractor(Plugin):
    """An extractor of a `dataLayer.sources` entry; `input` names the source output it reads."""

    input: ClassVar[str]


class CoreMetricsExtractor(DataExtractor):
    """Paired with a `metrics-data-source` in `dataLayer.sources`."""

    type = "core-metrics-extractor"
    input = "prometheus"  # what it reads: a metrics-data-source's payload

    def __init__(self, name: str | None = None, extraction: MetricsExtraction = DEFAULT_EXTRACTION) -> None:
        super().__init__(name)
        self.extraction = extraction

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> CoreMetricsExtractor:
        label_key = p.string("engineLabelKey", ENGINE_LABEL) or ENGINE_LABEL
        default = p.string("defaultEngine", DEFAULT_ENGINE) or DEFAULT_ENGINE
        engines: dict[str, EngineMetrics] = {}
        for i, raw in enumerate(p.mappings("engineConfigs")):
            engine = _engine(raw, f"engineConfigs[{i}]")
            if engine.name in engines:
                raise ParameterError(f"engineConfigs[{i}].name", f"duplicate engine {shown(engine.name)}")
            engines[engine.name] = engine
        for builtin, mapping in BUILTIN_ENGINES.items():  # a configured engine replaces the built-in one
            engines.setdefault(builtin, mapping)
        if default not in engines:
            raise ParameterError("defaultEngine", f"{shown(default)} is not an engine; known: {', '.join(engines)}")
        return cls(name, MetricsExtraction(MappingProxyType(engines), default, label_key))


def _engine(raw: Mapping[str, Any], where: str) -> EngineMetrics:
    """One engineConfigs entry; a spec left out is not read, as in llm-d."""
    p = Params(raw)
    try:
        name = p.string("name", required=True)
        assert name is not None
        if name == RESERVED_ENGINE:
            raise ParameterError("name", f"{RESERVED_ENGINE!r} is reserved (llm-d's fallback mapping); use another name")
        fields: dict[str, Any] = {}
        for key, attr in _ENGINE_SPECS.items():
            text = p.string(key, "")
            try:
                fields[attr] = MetricSpec.parse(text or "")
            except ValueError as e:
                raise ParameterError(key, str(e)) from None
        for key, attr in _ENGINE_LABELS.items():
            label = p.string(key, "") or ""
            if label and not _LABEL_NAME.fullmatch(label):
                raise ParameterError(key, f"expected a Prometheus label name, got {shown(label)}")
            if label:
                fields[attr] = label
        fields["custom"] = _custom_metrics(p.mappings("customMetrics"))
        p.done()
    except ParameterError as e:
        raise ParameterError(f"{where}.{e.param}" if e.param else where, e.detail) from None
    return EngineMetrics(name, **fields)


# the pool gauges an llm-d EPP exports (its docs/metrics.md; llm-epp exports them too)
POOL_KV_CACHE_METRIC = "llm_d_epp_average_kv_cache_utilization"
POOL_QUEUE_METRIC = "llm_d_epp_average_queue_size"


@dataclass(slots=True, frozen=True)
class PoolMetricsExtraction:
    """What `multicluster-metrics-extractor` reads from each peer cluster: two gauges of its EPP."""

    kv_usage: MetricSpec = MetricSpec(POOL_KV_CACHE_METRIC)
    queue: MetricSpec = MetricSpec(POOL_QUEUE_METRIC)

    def attributes(self) -> frozenset[AttributeKey]:
        """None: a peer cluster's aggregates are metrics, not endpoint attributes."""
        return frozenset()


class MulticlusterMetricsExtractor(DataExtractor):
    """Paired with a `multicluster-metrics-data-source`: a peer cluster's mean KV-cache utilization and
    mean waiting queue, the pool aggregates its EPP exports (`kvCacheUtilizationMetric`,
    `queueSizeMetric`: a name or `name{label=value}`), for the multicluster scorers."""

    type = "multicluster-metrics-extractor"
    input = "prometheus"

    def __init__(self, name: str | None = None, extraction: PoolMetricsExtraction = PoolMetricsExtraction()) -> None:
        super().__init__(name)
        self.extraction = extraction

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> MulticlusterMetricsExtractor:
        specs: list[MetricSpec] = []
        for key, default in (("kvCacheUtilizationMetric", POOL_KV_CACHE_METRIC), ("queueSizeMetric", POOL_QUEUE_METRIC)):
            text = p.string(key, default) or default  # "" is llm-d's default too
            try:
                spec = MetricSpec.parse(text)
            except ValueError as e:
                raise ParameterError(key, str(e)) from None
            assert spec is not None
            specs.append(spec)
        return cls(name, PoolMetricsExtraction(*specs))


def _custom_metrics(entries: list[Mapping[str, Any]]) -> tuple[CustomMetric, ...]:
    """customMetrics: `{attributeKey, metricSpec}` each, keys unique within the engine, as llm-d checks."""
    out: list[CustomMetric] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(entries):
        where = f"customMetrics[{i}]"
        unknown = sorted(str(k) for k in raw if k not in ("attributeKey", "metricSpec"))
        if unknown:
            raise ParameterError(f"{where}.{unknown[0]}", "unknown field; expected attributeKey, metricSpec")
        key, text = raw.get("attributeKey"), raw.get("metricSpec")
        if not isinstance(key, str) or not key:
            raise ParameterError(f"{where}.attributeKey", f"expected the attribute's name (a non-empty string), got {shown(key)}")
        if key in seen:
            raise ParameterError(f"{where}.attributeKey", f"{shown(key)} is also customMetrics[{seen[key]}]")
        if not isinstance(text, str) or not text:
            raise ParameterError(f"{where}.metricSpec", f"expected a metric selector like name or name{{label=value}}, got {shown(text)}")
        try:
            spec = MetricSpec.parse(text)
        except ValueError as e:
            raise ParameterError(f"{where}.metricSpec", str(e)) from None
        assert spec is not None
        seen[key] = i
        out.append(CustomMetric(key, spec))
    return tuple(out)


class DcgmExtractor(DataExtractor):
    """Paired with a `dcgm-data-source`: the endpoint's GPU utilization, 0-1, as the attribute
    `GPUUtilization` of producer `dcgm-extractor` (the highest of its pod's GPUs; read by
    extproc.datalayer.dcgm). No parameters."""

    type = "dcgm-extractor"
    input = "dcgm"


class ModelsDataExtractor(DataExtractor):
    """Paired with a `models-data-source`: keeps each endpoint's /v1/models list (ids and LoRA parents)."""

    type = "models-data-extractor"
    input = "models"
