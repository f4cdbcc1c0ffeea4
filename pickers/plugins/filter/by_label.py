"""Label filters: `by-label` keeps endpoints whose `label` has one of `validValues` (and, with
`allowsNoLabel`, those without the label); `label-selector-filter` keeps endpoints carrying every
`matchLabels` pair.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin, PluginContext


class ByLabelFilter(Plugin):
    type = "by-label"

    def __init__(self, label: str, valid_values: Sequence[str], allows_no_label: bool = False, name: str = "by-label"):
        self.name = name
        self.label = label
        self.valid_values = frozenset(valid_values)
        self.allows_no_label = allows_no_label

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> ByLabelFilter:
        label = p.string("label", required=True)
        assert label is not None
        values = p.strings("validValues")
        allows_no_label = p.flag("allowsNoLabel", False)
        if not values and not allows_no_label:
            raise ParameterError("validValues", "expected at least one value (or allowsNoLabel: true)")
        return cls(label, values, allows_no_label, name)

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        out = []
        for ep in endpoints:
            value = ep.labels.get(self.label)
            if (value is None and self.allows_no_label) or value in self.valid_values:
                out.append(ep)
        return out


class LabelSelectorFilter(Plugin):
    type = "label-selector-filter"

    def __init__(self, match_labels: dict[str, str], name: str = "label-selector-filter"):
        self.name = name
        self.match_labels = dict(match_labels)

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> LabelSelectorFilter:
        return cls(p.string_map("matchLabels", required=True), name)

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        want = self.match_labels.items()
        return [ep for ep in endpoints if all(ep.labels.get(k) == v for k, v in want)]
