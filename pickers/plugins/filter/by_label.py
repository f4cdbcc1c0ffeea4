"""Label filters: `by-label` keeps endpoints whose `label` has one of `validValues` (and, with
`allowsNoLabel`, those without the label); `label-selector-filter` keeps the endpoints a Kubernetes
label selector matches: every `matchLabels` pair and every `matchExpressions` requirement (`In`,
`NotIn`, `Exists`, `DoesNotExist`; `NotIn` and `DoesNotExist` also match an endpoint without the key).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import shown
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


OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(slots=True, frozen=True)
class Requirement:
    """One `matchExpressions` entry, as Kubernetes' LabelSelectorRequirement."""

    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "In":
            return value in self.values
        if self.operator == "NotIn":
            return value not in self.values
        return (value is not None) == (self.operator == "Exists")

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str) -> Requirement:
        unknown = sorted(set(raw) - {"key", "operator", "values"})
        if unknown:
            raise ParameterError(f"{where}.{unknown[0]}", "unknown field; expected key, operator, values")
        key, op, values = raw.get("key"), raw.get("operator"), raw.get("values")
        if not isinstance(key, str) or not key:
            raise ParameterError(f"{where}.key", "is required (a non-empty string)")
        if op not in OPERATORS:
            raise ParameterError(f"{where}.operator", f"expected one of {', '.join(OPERATORS)}, got {shown(op)}")
        if values is not None and (not isinstance(values, list) or not all(isinstance(v, str) for v in values)):
            raise ParameterError(f"{where}.values", f"expected a list of strings, got {shown(values)}")
        if op in ("In", "NotIn") and not values:
            raise ParameterError(f"{where}.values", f"{op} needs at least one value")
        if op in ("Exists", "DoesNotExist") and values:
            raise ParameterError(f"{where}.values", f"{op} takes no values")
        return cls(key, op, frozenset(values or ()))


class LabelSelectorFilter(Plugin):
    type = "label-selector-filter"

    def __init__(self, match_labels: Mapping[str, str], name: str = "label-selector-filter",
                 match_expressions: Sequence[Requirement] = ()) -> None:  # fmt: skip
        self.name = name
        self.match_labels = dict(match_labels)
        self.match_expressions = tuple(match_expressions)

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> LabelSelectorFilter:
        labels = p.string_map("matchLabels")
        expressions = [Requirement.parse(raw, f"matchExpressions[{i}]") for i, raw in enumerate(p.mappings("matchExpressions"))]
        if not labels and not expressions:
            # an empty selector would keep every endpoint: almost surely a mistake in a filter
            raise ParameterError("matchLabels", "expected matchLabels or matchExpressions (a selector that selects something)")
        return cls(labels, name, expressions)

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        want = self.match_labels.items()
        exprs = self.match_expressions
        return [
            ep for ep in endpoints
            if all(ep.labels.get(k) == v for k, v in want) and all(r.matches(ep.labels) for r in exprs)
        ]  # fmt: skip


class ByLabelSelectorFilter(LabelSelectorFilter):
    """`by-label-selector`: llm-d's deprecated name of label-selector-filter (deprecated in v0.9, removed in
    v0.11); the same selector, loaded with llm-d's deprecation warning."""

    type = "by-label-selector"

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> LabelSelectorFilter:
        built = super().from_config(name, p, ctx)
        p.warnings.append(f"plugin type {cls.type} is deprecated, use {LabelSelectorFilter.type} instead")
        return built
