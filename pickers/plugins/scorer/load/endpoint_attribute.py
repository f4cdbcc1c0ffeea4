"""endpoint-attribute-scorer (llm-d): a score from one scalar endpoint attribute, linearly normalized.

The attribute is `attributeKey` of `producer` (as for endpoint-attribute-filter). `score = (value - min)
/ (max - min)`, inverted by `linear_lower_is_better`. The range is the candidates' own (`adaptiveRange`,
the default: all endpoints with the attribute equal -> 1.0 each) or `fixedRange: {min, max}` (values
outside clamped). An endpoint without the attribute scores 0 and, adaptive, is left out of the range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pickers.framework.endpoint import AttributeKey, Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.datalayer.attributes import read_attribute_key

ALGORITHMS = ("linear_lower_is_better", "linear_higher_is_better")


class EndpointAttributeScorer(Plugin):
    type = "endpoint-attribute-scorer"
    category = "distribution"

    def __init__(
        self, name: str, reads_attribute: AttributeKey, *, lower_is_better: bool, fixed_range: tuple[float, float] | None = None
    ) -> None:
        super().__init__(name)
        self.reads_attribute = reads_attribute  # the data layer warns when nothing publishes it
        self.lower_is_better = lower_is_better
        self.fixed_range = fixed_range  # None: adaptive

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> EndpointAttributeScorer:
        key = read_attribute_key(p, "attributeKey")
        algorithm = p.section("algorithm")
        kind = algorithm.string("type", "")
        if kind not in ALGORITHMS:
            raise ParameterError("algorithm.type", f"expected linear_lower_is_better or linear_higher_is_better, got {kind!r}")
        normalization = algorithm.section("normalization")
        fixed_given, adaptive_given = normalization.given("fixedRange"), normalization.given("adaptiveRange")
        if fixed_given and adaptive_given:
            raise ParameterError("algorithm.normalization", "at most one strategy: fixedRange or adaptiveRange, not both")
        fixed_range = None
        if not fixed_given:
            normalization.section("adaptiveRange")  # the default; it takes no fields (done() refuses any)
        else:
            bounds = normalization.section("fixedRange")
            lo, hi = bounds.number("min", 0.0), bounds.number("max", 0.0)  # llm-d: a left-out bound is 0
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ParameterError("algorithm.normalization.fixedRange", f"needs finite bounds, got min {lo:g}, max {hi:g}")
            if not lo < hi:
                raise ParameterError("algorithm.normalization.fixedRange", f"needs min < max, got min {lo:g}, max {hi:g}")
            fixed_range = (lo, hi)
        return cls(name, key, lower_is_better=kind == "linear_lower_is_better", fixed_range=fixed_range)

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        key = self.reads_attribute
        values = [ep.attributes.get(key) for ep in endpoints]
        if self.fixed_range is not None:
            lo, hi = self.fixed_range
        else:
            present = [v for v in values if v is not None]
            if not present:
                return [0.0] * len(endpoints)
            lo, hi = min(present), max(present)
            if lo == hi:  # every endpoint with the attribute alike: a neutral 1.0
                return [0.0 if v is None else 1.0 for v in values]
        width = hi - lo
        scores = []
        for v in values:
            if v is None:
                scores.append(0.0)
                continue
            s = min(1.0, max(0.0, (v - lo) / width))
            scores.append(1.0 - s if self.lower_is_better else s)
        return scores
