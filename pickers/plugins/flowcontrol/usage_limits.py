"""Usage limit policies (llm-d's): per-band ceilings on pool saturation; a band dispatches while
saturation < its ceiling. `priorities` come highest first; ceilings never rise down the list.

static-usage-limit-policy (the default): `threshold` (default 1.0, in (0, 1]) for every band.
priority-holdback-policy: from `maxCeiling` (default 1.0, in (0, 1]) for the highest priority down to
`minCeiling` (required, in [0, 1), below maxCeiling) for the lowest, linearly by rank
(`domain: rank`: c_i = max - i (max - min) / (N - 1)) or by value (`domain: value`:
c_i = min + (p_i - p_min) / (p_max - p_min) (max - min)); one band alone gets maxCeiling.
soft-reflective-ceiling-policy: band i's reflective ceiling is 1 - i s / (N - 1) (s = saturation); a
band under it is open (1.0); at s >= 1 the bands below the first are shut (0.0); otherwise, once
s >= 1 - s, every band past its ceiling opens together on one call in round(s / (1 - s)), counted by
one tick over calls (the runtime calls ceilings() once per dispatch cycle).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pickers.framework.params import ParameterError, Params
from pickers.plugins.base import Plugin, PluginContext


class StaticUsageLimit(Plugin):
    type = "static-usage-limit-policy"

    def __init__(self, name: str = "static-usage-limit-policy", threshold: float = 1.0) -> None:
        self.name = name
        self.threshold = threshold

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> StaticUsageLimit:
        threshold = p.number("threshold", 1.0)
        if not 0.0 < threshold <= 1.0:
            raise ParameterError("threshold", f"expected a number in (0.0, 1.0], got {threshold:g}")
        return cls(name, threshold)

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        return [self.threshold] * len(priorities)


class PriorityHoldback(Plugin):
    type = "priority-holdback-policy"

    def __init__(self, name: str, min_ceiling: float, max_ceiling: float = 1.0, domain: str = "rank") -> None:
        self.name = name
        self.min_ceiling = min_ceiling
        self.max_ceiling = max_ceiling
        self.domain = domain

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> PriorityHoldback:
        p.choice("shape", "linear", ("linear",))
        domain = p.choice("domain", "rank", ("rank", "value"))
        if not p.given("minCeiling"):
            raise ParameterError("minCeiling", "is required (a number in [0.0, 1.0)): the ceiling of the lowest priority")
        low = p.number("minCeiling", 0.0)
        high = p.number("maxCeiling", 1.0)
        if not 0.0 <= low < 1.0:
            raise ParameterError("minCeiling", f"expected a number in [0.0, 1.0), got {low:g}")
        if not 0.0 < high <= 1.0:
            raise ParameterError("maxCeiling", f"expected a number in (0.0, 1.0], got {high:g}")
        if low >= high:
            raise ParameterError("minCeiling", f"must be below maxCeiling ({high:g}), got {low:g}")
        return cls(name, low, high, domain)

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        n = len(priorities)
        hi, lo = self.max_ceiling, self.min_ceiling
        if n <= 1:
            return [hi] * n
        if self.domain == "rank":
            return [hi - i * (hi - lo) / (n - 1) for i in range(n)]
        p_max, p_min = priorities[0], priorities[-1]
        if p_max == p_min:
            return [hi] * n
        return [lo + (p - p_min) / (p_max - p_min) * (hi - lo) for p in priorities]


class SoftReflectiveCeiling(Plugin):
    type = "soft-reflective-ceiling-policy"

    def __init__(self, name: str = "soft-reflective-ceiling-policy") -> None:
        self.name = name
        self.tick = 0  # calls in the alternating regime; shared by all bands so they open together

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        n = len(priorities)
        if n <= 1:
            return [1.0] * n
        s = saturation
        is_open = False
        if 1.0 - s <= s < 1.0:
            period = max(1, math.floor(s / (1.0 - s + 1e-9) + 0.5))  # Go's math.Round; 1e-9: round-off near 1.0
            self.tick += 1
            is_open = self.tick % period == 0
        out = [1.0]
        for i in range(1, n):
            if s < 1.0 - i * s / (n - 1):
                out.append(1.0)
            elif s >= 1.0:
                out.append(0.0)
            else:
                out.append(1.0 if is_open else 0.0)
        return out
