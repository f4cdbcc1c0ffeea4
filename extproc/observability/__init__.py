"""Observability: the EPP's Prometheus metrics, logging set-up and the per-request log line."""
