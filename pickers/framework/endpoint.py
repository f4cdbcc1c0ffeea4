"""An endpoint as plugins see it: where it is, its labels, the model server's last scraped metrics,
its scalar attributes (custom metrics, GPU utilization), the EPP's own in-flight counts and its fitted
latency model. The datastore (extproc.datalayer) owns the live objects; plugins only read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from pickers.latency.model import EndpointLatency

ROLE_LABEL = "llm-d.ai/role"


class AttributeKey(NamedTuple):
    """llm-d's DataKey: an endpoint attribute is named by its name and the type of the plugin that
    publishes it (`GPUUtilization` of `dcgm-extractor`); "" as producer is a producer-agnostic name."""

    name: str
    producer: str

    def __str__(self) -> str:
        return f"{self.name} ({self.producer or 'any producer'})"


class PoolColumnsLike(Protocol):
    """What an endpoint writes its state into (pickers.framework.columns.PoolColumns)."""

    in_flight: Any  # float64 arrays, one row per endpoint
    in_flight_prefill_tokens: Any
    failing: int  # endpoints whose scrape_error is set

    def set_metrics(self, row: int, metrics: Metrics) -> None: ...


_NO_ATTRIBUTES: Mapping[AttributeKey, float] = MappingProxyType({})
_NO_TIMES: Mapping[str, float] = MappingProxyType({})


@dataclass(slots=True, frozen=True)
class EndpointSpec:
    """What discovery knows about an endpoint: where it is and how it is labelled."""

    name: str
    host: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_port: int | None = None  # default: the metrics source's port, else the serving port
    # default: `host`. A peer cluster (multicluster-file-discovery) may serve its pool metrics elsewhere
    # than its gateway: its `metricsAddress` label
    metrics_host: str | None = None
    metrics_path: str | None = None  # default: the metrics source's path (/metrics)
    namespace: str = ""  # the pod's, or the endpoints file's (llm-d's format); names are unique within one
    # The endpoint's index among its pod's serving ports (the InferencePool targetPorts index, llm-d's
    # RankIndex): its KV-event socket is the base port + rank, a P/D sidecar's rank port base + rank.
    rank: int = 0
    # Endpoints with the same non-empty dp_group are ranks of one data-parallel group: they step in
    # lockstep (each step lasts as long as the busiest rank's batch). "": not part of a group.
    dp_group: str = ""
    pod: str = ""  # the pod's name (llm-d's endpoint Name, which DCGM's `pod` label matches); "": `name`
    node_address: str = ""  # the node's IP (pod.status.hostIP), for exporters run per node; "": unknown
    # The pod's `spec.hostname` (Kubernetes discovery; "" when unset or from an endpoints file):
    # topology-extractor's host when its hostname label is absent.
    hostname: str = ""
    # `ip:port`, made once: plugins key their per-endpoint state by it on every pick
    address: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", f"{self.host}:{self.port}")

    @property
    def pod_name(self) -> str:
        return self.pod or self.name

    @property
    def metrics_url(self) -> str:
        """Where the default metrics source scrapes (the configured one: extproc.datalayer.scraper)."""
        return f"http://{self.metrics_host or self.host}:{self.metrics_port or self.port}{self.metrics_path or '/metrics'}"


@dataclass(slots=True, frozen=True)
class ServedModel:
    """One entry of an endpoint's OpenAI `/v1/models`: a model, or a LoRA adapter with its base `parent`."""

    id: str
    parent: str | None = None
    owned_by: str | None = None


@dataclass(slots=True, frozen=True)
class ServedModels:
    """An endpoint's /v1/models list, in its order, with the ids as a set for a pick's lookup."""

    models: tuple[ServedModel, ...] = ()
    ids: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", frozenset(m.id for m in self.models))

    def __contains__(self, model_id: object) -> bool:
        return model_id in self.ids


@dataclass(slots=True)
class Metrics:
    """Model-server metrics from the last successful scrape (the engine's series: vLLM's by default)."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    running_lora_adapters: frozenset[str] = frozenset()
    waiting_lora_adapters: frozenset[str] = frozenset()
    max_lora: int | None = None
    prefix_cache_hits: float = 0.0
    prefix_cache_queries: float = 0.0
    # A peer cluster's pool aggregates (multicluster-metrics-extractor: its EPP's mean KV-cache use and
    # mean waiting queue over its endpoints), read by the multicluster scorers; None on a model server.
    # `waiting` and `kv_usage` then hold the same numbers (the queue rounded), for the saturation
    # detector and the views.
    pool_kv_usage: float | None = None
    pool_queue: float | None = None
    updated_at: float = 0.0  # time.monotonic() of the scrape; 0 = never scraped


@dataclass(slots=True, eq=False, init=False)
class Endpoint:
    """One serving endpoint (`ip:port`) and everything the picker knows about it.

    `metrics`, `in_flight` and `in_flight_prefill_tokens` are also kept in the datastore's pool
    columns (pickers.framework.columns.PoolColumns) while the endpoint is in its pool: setting one
    writes its column too, so a pick over the whole pool reads whole arrays instead of gathering them
    (and setting `scrape_error` keeps the pool's count of failing endpoints).
    A Metrics object is never changed once it is set here (a new one replaces it)."""

    spec: EndpointSpec
    _metrics: Metrics
    _in_flight: int
    in_flight_tokens: int
    _in_flight_prefill_tokens: int  # uncached prompt tokens of requests not past their first byte
    # estimated output tokens of requests in flight (inflight-load-producer's addEstimatedOutputTokens)
    in_flight_output_tokens: int
    _scrape_error: str | None
    served_models: ServedModels | None  # from /v1/models (models-data-source); None: not fetched
    # scalar attributes by (name, producer), swapped whole by the datastore; a producer's values stay
    # until it publishes new ones (as in llm-d), `attributes_updated_at[producer]` says when that was
    attributes: Mapping[AttributeKey, float]
    attributes_updated_at: Mapping[str, float]  # producer -> time.monotonic()
    # the latency model's fits for this endpoint (pickers.latency.model), fed by request control
    latency: EndpointLatency
    # the pool columns this endpoint is row `_row` of (set by PoolColumns; None: in no pool's)
    _columns: PoolColumnsLike | None
    _row: int

    def __init__(
        self,
        spec: EndpointSpec,
        metrics: Metrics | None = None,
        in_flight: int = 0,
        in_flight_tokens: int = 0,
        in_flight_prefill_tokens: int = 0,
        in_flight_output_tokens: int = 0,
        scrape_error: str | None = None,
        served_models: ServedModels | None = None,
        attributes: Mapping[AttributeKey, float] = _NO_ATTRIBUTES,
        attributes_updated_at: Mapping[str, float] = _NO_TIMES,
        latency: EndpointLatency | None = None,
    ) -> None:
        self.spec = spec
        self._columns = None
        self._row = 0
        self._metrics = Metrics() if metrics is None else metrics
        self._in_flight = in_flight
        self.in_flight_tokens = in_flight_tokens
        self._in_flight_prefill_tokens = in_flight_prefill_tokens
        self.in_flight_output_tokens = in_flight_output_tokens
        self._scrape_error = scrape_error
        self.served_models = served_models
        self.attributes = attributes
        self.attributes_updated_at = attributes_updated_at
        self.latency = EndpointLatency() if latency is None else latency

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    @metrics.setter
    def metrics(self, value: Metrics) -> None:
        self._metrics = value
        columns = self._columns
        if columns is not None:
            columns.set_metrics(self._row, value)

    @property
    def scrape_error(self) -> str | None:
        """The last scrape's error; None once a scrape succeeds (or before any failed)."""
        return self._scrape_error

    @scrape_error.setter
    def scrape_error(self, value: str | None) -> None:
        was_failing = self._scrape_error is not None
        self._scrape_error = value
        columns = self._columns
        if columns is not None and was_failing != (value is not None):
            columns.failing += -1 if was_failing else 1

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._in_flight = value
        columns = self._columns
        if columns is not None:
            columns.in_flight[self._row] = value

    @property
    def in_flight_prefill_tokens(self) -> int:
        return self._in_flight_prefill_tokens

    @in_flight_prefill_tokens.setter
    def in_flight_prefill_tokens(self, value: int) -> None:
        self._in_flight_prefill_tokens = value
        columns = self._columns
        if columns is not None:
            columns.in_flight_prefill_tokens[self._row] = value

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def labels(self) -> Mapping[str, str]:
        return self.spec.labels

    @property
    def in_flight_load_tokens(self) -> int:
        """llm-d's in-flight tokens (InFlightLoad.Tokens): uncached prompts until their first byte, plus
        estimated outputs until their end."""
        return self.in_flight_prefill_tokens + self.in_flight_output_tokens

    def metrics_age(self, now: float | None = None) -> float:
        if self.metrics.updated_at == 0.0:
            return float("inf")
        return (time.monotonic() if now is None else now) - self.metrics.updated_at
