"""context-length-aware (llm-d): route by prompt length to endpoints labelled with the range they serve.

Each endpoint may carry `label` (default `llm-d.ai/context-length-range`) = `"min-max"` tokens. The
request's context length is its prompt tokens (4 characters a token, llm-d's estimate; 0 for a request
without a prompt). As a scorer (always): in range -> in (0.3, 1], higher for narrower ranges and more
headroom; out of range -> below 0.3, higher the nearer the range; no label -> 0.5; a label that does not
parse -> 0. As a filter (`enableFiltering: true`): keeps unlabelled endpoints and those whose range holds
the length, drops the rest (unparsable labels included). One plugin, both roles, as in llm-d: a profile
that references it runs it as a filter and as a weighted scorer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin, PluginContext

DEFAULT_LABEL = "llm-d.ai/context-length-range"
NO_LABEL_SCORE = 0.5
MAX_FALLBACK_SCORE = 0.3  # out of range always scores below an in-range match
_INT = re.compile(r"[+-]?[0-9]+")  # what Go's strconv.Atoi takes
_INT64_MAX = 2**63 - 1


def parse_range(value: str) -> tuple[int, int] | None:
    """`"min-max"` (whitespace around each number allowed), min <= max; None when it does not parse."""
    parts = value.split("-")
    if len(parts) != 2:
        return None
    bounds = []
    for part in parts:
        part = part.strip()
        if not _INT.fullmatch(part) or abs(int(part)) > _INT64_MAX:
            return None
        bounds.append(int(part))
    lo, hi = bounds
    return (lo, hi) if lo <= hi else None


def range_score(length: int, lo: int, hi: int) -> float:
    """llm-d's score: in range, 0.3 + 0.7 * (0.7 * width score + 0.3 * headroom share), where the width
    score is 1 / (1 + width / 10000); out of range, 0.3 / (1 + distance to the range / 1000)."""
    if lo <= length <= hi:
        width = hi - lo
        if width == 0:
            return 1.0
        raw = 0.7 * (1.0 / (1.0 + width / 10000.0)) + 0.3 * ((hi - length) / width)
        return MAX_FALLBACK_SCORE + raw * (1.0 - MAX_FALLBACK_SCORE)
    distance = length - hi if length > hi else lo - length
    return MAX_FALLBACK_SCORE / (1.0 + distance / 1000.0)


class ContextLengthAware(Plugin):
    type = "context-length-aware"
    category = "affinity"

    def __init__(self, label: str = DEFAULT_LABEL, enable_filtering: bool = False, name: str = "context-length-aware") -> None:
        self.name = name
        self.label = label
        self.enable_filtering = enable_filtering

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> ContextLengthAware:
        label = p.string("label", DEFAULT_LABEL)
        if not label:
            raise ParameterError("label", "must be specified (a label key such as llm-d.ai/context-length-range)")
        return cls(label, p.flag("enableFiltering", False), name)

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if not self.enable_filtering:
            return endpoints
        length = request.prompt_tokens
        out = []
        for ep in endpoints:
            value = ep.labels.get(self.label)
            if value is None:
                out.append(ep)
                continue
            r = parse_range(value)
            if r is not None and r[0] <= length <= r[1]:
                out.append(ep)
        return out

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        length = request.prompt_tokens
        scores = []
        for ep in endpoints:
            value = ep.labels.get(self.label)
            if value is None:
                scores.append(NO_LABEL_SCORE)
                continue
            r = parse_range(value)
            scores.append(0.0 if r is None else range_score(length, *r))
        return scores
