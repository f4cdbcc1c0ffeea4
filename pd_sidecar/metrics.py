"""The sidecar's Prometheus metrics, one registry per data-parallel rank (each rank's port serves its
own), none global (tests run several sidecars in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

# Which way a request went: straight to the decoder, disaggregated, or disaggregation attempted
# and abandoned for a local prefill.
PATHS = ("proxy", "disaggregated", "fallback")
# Why a prefill leg was abandoned.
FALLBACK_REASONS = ("bad_header", "unreachable", "timeout", "error_status", "no_kv_transfer_params")
# What became of a request carrying x-data-parallel-host-port: sent to the rank it names, or refused (400).
DP_HEADER_OUTCOMES = ("routed", "bad_header", "unknown_rank")


class SidecarMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("pd_sidecar_requests", "Requests handled, by the path they took.",
                                ("path",), registry=r)
        self.fallbacks = Counter("pd_sidecar_prefill_fallback",
                                 "Prefill legs abandoned for a local prefill on the decoder.",
                                 ("reason",), registry=r)
        self.encoders_ignored = Counter(
            "pd_sidecar_encode_leg_skipped", "Requests that named encoders (x-encoder-hosts-ports) and were "
            "sent on without an encode leg: the decoder (or the prefill leg's server) encodes the media itself.",
            registry=r)
        self.retries = Counter("pd_sidecar_prefill_retries", "Prefill legs sent again after 502/503/504 "
                               "or a connection error.", registry=r)
        self.kv_source_ignored = Counter(
            "pd_sidecar_kv_cache_source_ignored", "Requests carrying x-kv-cache-source-host-port (an EPP's "
            "p2p-source-producer), which this sidecar does not act on: it pulls no KV blocks over P2P.", registry=r)
        self.prefill_seconds = Histogram(
            "pd_sidecar_prefill_duration_seconds", "Time from sending a prefill leg to its kv_transfer_params.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0), registry=r)
        self.dp_header = Counter(
            "pd_sidecar_data_parallel_header", "Requests that arrived on this rank's port with "
            "x-data-parallel-host-port, by outcome: routed to the rank it names, or refused with 400.",
            ("outcome",), registry=r)
        for outcome in DP_HEADER_OUTCOMES:
            self.dp_header.labels(outcome=outcome)
        for path in PATHS:  # export zeros so dashboards and tests see every series from the start
            self.requests.labels(path=path)
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason=reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)
