"""The EPP's own Prometheus metrics, with the Gateway API Inference Extension names (SPEC section 6).

One registry per EPP instance (no process globals), served on `--metrics-port`. Model names come
from clients, so the label set is capped: past `MAX_MODELS` distinct names they count as "other".
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from extproc.usage import Usage

MAX_MODELS = 200
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_SCHED_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class EppMetrics:
    def __init__(self, pool_name: str = "", version: str = "") -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.pool_name = pool_name
        self._models: set[str] = set()
        labels = ["model_name", "target_model_name"]
        self.requests = Counter("inference_objective_request", "Requests scheduled, by model", labels, registry=r)
        self.errors = Counter(
            "inference_objective_request_error", "Requests refused or failed, by error code", [*labels, "error_code"], registry=r
        )
        self.running = Gauge("inference_objective_running_requests", "Requests in flight through the EPP", ["model_name"], registry=r)
        self.input_tokens = Histogram(
            "inference_objective_input_tokens", "Prompt tokens per request (from usage)", labels, buckets=_TOKEN_BUCKETS, registry=r
        )
        self.output_tokens = Histogram(
            "inference_objective_output_tokens", "Completion tokens per request (from usage)", labels, buckets=_TOKEN_BUCKETS, registry=r
        )
        self.cached_tokens = Histogram(
            "inference_objective_prompt_cached_tokens", "Prompt tokens served from the prefix cache (from usage)", labels,
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.scheduler_duration = Histogram(
            "inference_extension_scheduler_e2e_duration_seconds", "Time to schedule one request", buckets=_SCHED_BUCKETS, registry=r
        )
        self.ready_pods = Gauge("inference_pool_ready_pods", "Endpoints in the pool", ["name"], registry=r)
        self.info = Gauge("inference_extension_info", "llm-epp build info", ["commit", "build_ref"], registry=r)
        self.info.labels(commit="", build_ref=version).set(1)

    def _model(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODELS:
            return "other"
        self._models.add(model)
        return model

    def scheduled(self, model: str, seconds: float) -> None:
        m = self._model(model)
        self.requests.labels(m, m).inc()
        self.running.labels(m).inc()
        self.scheduler_duration.observe(seconds)

    def request_error(self, model: str, code: str) -> None:
        m = self._model(model)
        self.errors.labels(m, m, code).inc()

    def completed(self, model: str, status: int | None, usage: Usage | None, aborted: bool) -> None:
        m = self._model(model)
        self.running.labels(m).dec()
        if status is not None and status >= 400:
            self.errors.labels(m, m, "ModelServerError").inc()
        if usage is not None:
            self.input_tokens.labels(m, m).observe(usage.prompt_tokens)
            self.output_tokens.labels(m, m).observe(usage.completion_tokens)
            self.cached_tokens.labels(m, m).observe(usage.cached_tokens)

    def set_ready_pods(self, n: int) -> None:
        self.ready_pods.labels(self.pool_name).set(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
