"""utilization-filter (llm-d): keep the endpoints under every configured cap.

Each condition caps one metric: `active-requests` (the EPP's own in-flight count, pick to response
end), `running-requests`, `waiting-queue` (scraped) or `kv-cache-utilization` (scraped, 0-1). An
endpoint passes when no metric exceeds its `maxValue`; one never scraped reads 0, as in llm-d. When
every endpoint is dropped, `fallbackOnEmpty: true` returns the candidates unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin, PluginContext

INFLIGHT_PRODUCER_TYPE = "inflight-load-producer"

_METRICS: Mapping[str, Callable[[Endpoint], float]] = {
    "active-requests": lambda ep: ep.in_flight,
    "running-requests": lambda ep: ep.metrics.running,
    "waiting-queue": lambda ep: ep.metrics.waiting,
    "kv-cache-utilization": lambda ep: ep.metrics.kv_usage,
}


class UtilizationFilter(Plugin):
    type = "utilization-filter"

    def __init__(self, name: str, conditions: Sequence[tuple[str, float]], fallback_on_empty: bool = False) -> None:
        self.name = name
        self.conditions = tuple((_METRICS[m], cap) for m, cap in conditions)
        self.fallback_on_empty = fallback_on_empty
        self.producer_name: str | None = None

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> UtilizationFilter:
        raw = p.mappings("conditions")
        if not raw:
            raise ParameterError("conditions", "is required: a list of {metric, maxValue}, at least one")
        conditions = [_condition(i, c) for i, c in enumerate(raw)]
        f = cls(name, conditions, p.flag("fallbackOnEmpty", False))
        f.producer_name = p.string("inFlightLoadProducerName")
        return f

    def bind_config(self, plugins: Mapping[str, object], profiles: Mapping[str, Any], handler: object) -> None:
        """`inFlightLoadProducerName` must name an inflight-load-producer: the EPP keeps one in-flight count."""
        if self.producer_name is None:
            return
        found = plugins.get(self.producer_name)
        if found is None:
            raise ParameterError(
                "inFlightLoadProducerName", f"no plugin named {shown(self.producer_name)}; defined: {', '.join(plugins)}"
            )
        if getattr(found, "type", None) != INFLIGHT_PRODUCER_TYPE:
            raise ParameterError(
                "inFlightLoadProducerName",
                f"plugin {shown(self.producer_name)} ({getattr(found, 'type', '?')}) is not an {INFLIGHT_PRODUCER_TYPE}",
            )

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        kept = [ep for ep in endpoints if all(read(ep) <= cap for read, cap in self.conditions)]
        if not kept and self.fallback_on_empty:
            return list(endpoints)
        return kept


def _condition(i: int, c: Mapping[str, Any]) -> tuple[str, float]:
    where = f"conditions[{i}]"
    unknown = sorted(set(c) - {"metric", "maxValue"})
    if unknown:
        raise ParameterError(f"{where}.{unknown[0]}", "unknown field; expected metric, maxValue")
    metric = c.get("metric")
    if metric not in _METRICS:
        raise ParameterError(f"{where}.metric", f"expected one of {', '.join(_METRICS)}, got {shown(metric)}")
    cap = c.get("maxValue")
    if cap is None:
        raise ParameterError(f"{where}.maxValue", f"is required for {metric}")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 <= cap < math.inf:
        raise ParameterError(f"{where}.maxValue", f"expected a finite number >= 0, got {shown(cap)}")
    if metric == "kv-cache-utilization" and cap > 1:
        raise ParameterError(f"{where}.maxValue", f"kv-cache-utilization is a fraction; expected at most 1, got {cap}")
    return metric, float(cap)
