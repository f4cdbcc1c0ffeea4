"""Saturation (docs/configuration.md, `saturationDetector`): how full the pool is, from the model servers' own metrics.

Per endpoint `max(waiting / queueDepthThreshold, kv_usage / kvCacheUtilThreshold)`; an endpoint whose
metrics are older than `metricsStalenessThreshold` counts as saturated (1.0); the pool's saturation is
the average. At 1.0 and above the pool is saturated and sheddable requests (priority < 0) are refused.
Parameters come from the EndpointPickerConfig's `saturationDetector` section, under the reference's names.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.datalayer.datastore import Datastore
from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import ConfigError, shown

DEFAULT_QUEUE_DEPTH = 5
DEFAULT_KV_CACHE_UTIL = 0.8


@dataclass(slots=True, frozen=True)
class SaturationConfig:
    queue_depth_threshold: float = DEFAULT_QUEUE_DEPTH
    kv_cache_util_threshold: float = DEFAULT_KV_CACHE_UTIL
    metrics_staleness_threshold: float | None = None  # seconds; None: the datastore's (--metrics-staleness-threshold)

    @classmethod
    def from_config(cls, section: Mapping[str, Any], source: str) -> SaturationConfig:
        """From `saturationDetector`; raises ConfigError naming the field."""
        known = {
            "queueDepthThreshold": "queue_depth_threshold",
            "kvCacheUtilThreshold": "kv_cache_util_threshold",
            "metricsStalenessThreshold": "metrics_staleness_threshold",
        }
        values: dict[str, float] = {}
        for key, value in section.items():
            field = f"saturationDetector.{key}"
            if key not in known:
                raise ConfigError(f"unknown field; expected one of {', '.join(known)}", source=source, field=field)
            seconds = _seconds(value) if key == "metricsStalenessThreshold" else _number(value)
            if seconds is None or seconds <= 0:
                what = "a duration like 200ms or 2s" if key == "metricsStalenessThreshold" else "a positive number"
                raise ConfigError(f"expected {what}, got {shown(value)}", source=source, field=field)
            values[known[key]] = seconds
        return cls(**values)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _seconds(value: object) -> float | None:
    if isinstance(value, str):
        text = value.strip()
        for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
            if text.endswith(suffix):
                try:
                    return float(text[: -len(suffix)]) * scale
                except ValueError:
                    return None
        return None
    return _number(value)


class SaturationDetector:
    """Reads the datastore; holds no state of its own. O(endpoints), asked only for sheddable requests."""

    def __init__(self, datastore: Datastore, config: SaturationConfig | None = None, plugin: object | None = None) -> None:
        self.datastore = datastore
        self.config = config or SaturationConfig()
        # a detector plugin (flowControl.saturationDetector with the flowControl gate off) decides instead
        self.plugin = plugin

    @property
    def staleness(self) -> float:
        return self.config.metrics_staleness_threshold or self.datastore.metrics_stale_after

    def endpoint_saturation(self, ep: Endpoint, now: float) -> float:
        if ep.metrics_age(now) > self.staleness:
            return 1.0
        c = self.config
        m = ep.metrics
        return max(m.waiting / c.queue_depth_threshold, m.kv_usage / c.kv_cache_util_threshold)

    def saturation(self, endpoints: Sequence[Endpoint] | None = None) -> float:
        """The average over `endpoints` (default: the pool); 0.0 for none."""
        eps = self.datastore.candidates() if endpoints is None else endpoints
        if not eps:
            return 0.0
        if self.plugin is not None:
            return float(self.plugin.saturation(eps))  # type: ignore[attr-defined]
        now = time.monotonic()
        return sum(self.endpoint_saturation(ep, now) for ep in eps) / len(eps)

    def saturated(self, endpoints: Sequence[Endpoint] | None = None) -> bool:
        return self.saturation(endpoints) >= 1.0
