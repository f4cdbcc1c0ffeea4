"""header-label-affinity-scorer (llm-d): 1 for endpoints whose label `labelKey` equals the request's
header `headerName`, 0 for the others (and for every endpoint when the header is missing or empty).
A soft preference: one instance per header-to-label mapping, each with its own weight.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin, PluginContext


class HeaderLabelAffinityScorer(Plugin):
    type = "header-label-affinity-scorer"
    category = "affinity"

    def __init__(self, name: str, header: str, label: str) -> None:
        self.name = name
        self.header = header.lower()  # Envoy hands the EPP lowercase header names
        self.label = label

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> HeaderLabelAffinityScorer:
        header = p.string("headerName", required=True)
        label = p.string("labelKey", required=True)
        assert header is not None and label is not None
        return cls(name, header, label)

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        wanted = request.headers.get(self.header)
        if not wanted:
            return [0.0] * len(endpoints)
        return [1.0 if ep.labels.get(self.label) == wanted else 0.0 for ep in endpoints]
