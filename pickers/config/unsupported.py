"""The llm-d router's plugin types that llm-epp does not implement, each with the reason.

A config naming one is refused with that reason (not just "unknown plugin type"), so a user moving a
config over learns what is missing and why; docs/configuration.md#what-llm-epp-refuses lists them.
A type leaves this table when it is implemented (the registry refuses a type in both places).
"""

from __future__ import annotations

from types import MappingProxyType

_TOPOLOGY = "topology-aware routing needs the topology attributes llm-d reads from nodes; llm-epp does not collect them"
_DCGM = "llm-epp does not scrape DCGM GPU telemetry"
_MULTIMODAL = "llm-epp does not track multimodal (image) embedding caches; multimodal parts of a prompt are hashed as text"

UNSUPPORTED_TYPES = MappingProxyType(
    {
        # topology and GPU telemetry
        "topology-extractor": _TOPOLOGY,
        "topology-affinity-filter": _TOPOLOGY,
        "topology-affinity-scorer": _TOPOLOGY,
        "dcgm-data-source": _DCGM,
        "dcgm-extractor": _DCGM,
        # multimodal
        "mm-embeddings-cache-producer": _MULTIMODAL,
        "mm-embeddings-cache-scorer": _MULTIMODAL,
        # others
        "request-attribute-reporter": "llm-epp does not evaluate CEL expressions over response usage; "
        "it reports usage in its own metrics (docs/operating.md)",
        "disaggregatedset-rollout-screener": "rollouts of llm-d's DisaggregatedSet are not supported",
        "disaggregatedset-rollout-pod-extractor": "rollouts of llm-d's DisaggregatedSet are not supported",
        "burst-prefix-cache-producer": "joint placement of request bursts is not implemented; "
        "llm-epp's prefix index records each pick at once, so a burst's later requests follow the first",
        "endpoint-attribute-filter": "it reads custom metrics of core-metrics-extractor (customMetrics), which llm-epp "
        "does not collect",
        "endpoint-attribute-scorer": "it reads custom metrics of core-metrics-extractor (customMetrics), which llm-epp "
        "does not collect",
        "header-based-testing-filter": "a test-only plugin of the llm-d router",
        "destination-endpoint-served-verifier": "a test-only plugin of the llm-d router",
    }
)
