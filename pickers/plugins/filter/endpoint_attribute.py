"""endpoint-attribute-filter (llm-d): keep the endpoints whose scalar attribute passes a threshold.

The attribute is `attribute` of `producer` (default the core metrics extractor's customMetrics; e.g.
`GPUUtilization` of `dcgm-extractor`: pickers.plugins.datalayer.attributes). With the `threshold`
algorithm (llm-d's only one) an endpoint is kept when `value <operator> threshold.value`. An endpoint
without the attribute is kept (`onMissing: Pass`, the default) or dropped (`Fail`); when every endpoint
is dropped, `fallbackOnEmpty: true` returns the candidates unchanged.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence

from pickers.framework.endpoint import AttributeKey, Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.datalayer.attributes import read_attribute_key

OPERATORS: Mapping[str, Callable[[float, float], bool]] = {
    "LessThan": operator.lt,
    "LessThanOrEqual": operator.le,
    "GreaterThan": operator.gt,
    "GreaterThanOrEqual": operator.ge,
    "Equal": operator.eq,
    "NotEqual": operator.ne,
}
ON_MISSING = ("Pass", "Fail")
ALGORITHMS = ("threshold",)  # llm-d plans percentile, topK and range


class EndpointAttributeFilter(Plugin):
    type = "endpoint-attribute-filter"

    def __init__(
        self, name: str, reads_attribute: AttributeKey, op: str, value: float, *, pass_on_missing: bool = True,
        fallback_on_empty: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(name)
        self.reads_attribute = reads_attribute  # the data layer warns when nothing publishes it
        self.operator = op
        self.value = value
        self._compare = OPERATORS[op]
        self.pass_on_missing = pass_on_missing
        self.fallback_on_empty = fallback_on_empty

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> EndpointAttributeFilter:
        key = read_attribute_key(p, "attribute")
        on_missing = p.string("onMissing", "Pass") or "Pass"  # "" is llm-d's default too
        if on_missing not in ON_MISSING:
            raise ParameterError("onMissing", f"expected Pass or Fail, got {on_missing!r}")
        p.effective["onMissing"] = on_missing
        fallback = p.flag("fallbackOnEmpty", False)
        algorithm = p.section("algorithm")
        kind = algorithm.string("type", "")
        if kind not in ALGORITHMS:
            raise ParameterError("algorithm.type", f"expected threshold (llm-d's only algorithm), got {kind!r}")
        if not algorithm.given("threshold"):
            raise ParameterError("algorithm.threshold", "is required when algorithm.type is threshold: {operator, value}")
        threshold = algorithm.section("threshold")
        op = threshold.string("operator", "") or ""
        if op not in OPERATORS:
            raise ParameterError("algorithm.threshold.operator", f"expected one of {', '.join(OPERATORS)}, got {op!r}")
        if not threshold.given("value"):
            # llm-d reads a missing value as 0 (Go's zero value); it loads, but say so
            p.warnings.append("algorithm.threshold.value is left out: it is 0, as in llm-d")
        value = threshold.number("value", 0.0)
        return cls(name, key, op, value, pass_on_missing=on_missing == "Pass", fallback_on_empty=fallback)

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        key, compare, bound, pass_missing = self.reads_attribute, self._compare, self.value, self.pass_on_missing
        kept = []
        for ep in endpoints:
            value = ep.attributes.get(key)
            if value is None:
                if pass_missing:
                    kept.append(ep)
            elif compare(value, bound):
                kept.append(ep)
        if not kept and self.fallback_on_empty:
            return list(endpoints)
        return kept
