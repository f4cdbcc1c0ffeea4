"""An endpoint as plugins see it: where it is, its labels, the model server's last scraped metrics and
the EPP's own in-flight counts. The datastore (extproc.datalayer) owns the live objects; plugins only read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

ROLE_LABEL = "llm-d.ai/role"


@dataclass(slots=True, frozen=True)
class EndpointSpec:
    """What discovery knows about an endpoint: where it is and how it is labelled."""

    name: str
    host: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_port: int | None = None  # default: the serving port
    metrics_path: str = "/metrics"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port or self.port}{self.metrics_path}"


@dataclass(slots=True)
class Metrics:
    """Model-server metrics from the last successful scrape (vLLM's metric names)."""

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
    updated_at: float = 0.0  # time.monotonic() of the scrape; 0 = never scraped


@dataclass(slots=True, eq=False)
class Endpoint:
    """One serving endpoint (`ip:port`) and everything the picker knows about it."""

    spec: EndpointSpec
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = 0
    in_flight_tokens: int = 0
    in_flight_prefill_tokens: int = 0  # uncached prompt tokens of requests not past their first byte
    # estimated output tokens of requests in flight (inflight-load-producer's addEstimatedOutputTokens)
    in_flight_output_tokens: int = 0
    scrape_error: str | None = None

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
