"""Label filters: `by-label` keeps endpoints whose `label` has one of `validValues` (and, with
`allowsNoLabel`, those without the label); `label-selector-filter` keeps the endpoints a Kubernetes
label selector matches: every `matchLabels` pair and every `matchExpressions` requirement (`In`,
`NotIn`, `Exists`, `DoesNotExist`; `NotIn` and `DoesNotExist` also match an endpoint without the key).
`parse_label_selector` reads the same selector written as a string (`a=b,c in (x,y),!d`), as
Kubernetes' labels.Parse does, for plugins that take one (disaggregatedset-rollout-screener's scope).
"""

from __future__ import annotations

import re
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


OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")  # matchExpressions' (a string selector adds Gt, Lt)


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
        if self.operator in ("Gt", "Lt"):  # both integers, else no match (as Kubernetes)
            bound = int(next(iter(self.values)))
            try:
                number = int(value) if value is not None else None
            except ValueError:
                return False
            return number is not None and (number > bound if self.operator == "Gt" else number < bound)
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


# Kubernetes' label syntax: a key is an optional DNS-subdomain prefix and a name; a value is empty or
# up to 63 characters of alphanumerics, '-', '_' and '.', starting and ending alphanumeric.
_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_KEY = re.compile(rf"(?:[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?/)?{_NAME}")
_VALUE = re.compile(rf"(?:{_NAME})?")
_SET = re.compile(r"(\S+)\s+(in|notin)\s*\((.*)\)", re.DOTALL)
_COMPARE = re.compile(r"([^=!<>\s]+)\s*(==|=|!=|>|<)\s*(\S*)")


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """A label selector string (`key=value`, `key==value`, `key!=value`, `key in (a,b)`, `key notin
    (a,b)`, `key`, `!key`, `key>1`, `key<9`; comma-separated, all must match). Raises ValueError
    saying what is wrong."""
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    out: list[Requirement] = []
    for raw in parts:
        part = raw.strip()
        if not part:
            raise ValueError(f"an empty requirement in {shown(text)}")
        out.append(_requirement(part))
    return tuple(out)


def _requirement(part: str) -> Requirement:
    def key(k: str) -> str:
        if len(k) > 316 or not _KEY.fullmatch(k) or len(k.rpartition("/")[2]) > 63:
            raise ValueError(f"{shown(k)} is not a label key")
        return k

    def value(v: str) -> str:
        if len(v) > 63 or not _VALUE.fullmatch(v):
            raise ValueError(f"{shown(v)} is not a label value")
        return v

    if part.startswith("!"):
        return Requirement(key(part[1:].strip()), "DoesNotExist")
    m = _SET.fullmatch(part)
    if m is not None:
        values = [v.strip() for v in m.group(3).split(",")]
        if values == [""]:
            raise ValueError(f"{shown(part)}: {m.group(2)} needs at least one value")
        return Requirement(key(m.group(1)), "In" if m.group(2) == "in" else "NotIn", frozenset(value(v) for v in values))
    m = _COMPARE.fullmatch(part)
    if m is not None:
        k, op, v = key(m.group(1)), m.group(2), m.group(3)
        if op in (">", "<"):
            if not re.fullmatch(r"-?[0-9]+", v):
                raise ValueError(f"{shown(part)}: {op} needs an integer")
            return Requirement(k, "Gt" if op == ">" else "Lt", frozenset((v,)))
        return Requirement(k, "NotIn" if op == "!=" else "In", frozenset((value(v),)))
    if not _KEY.fullmatch(part):
        raise ValueError(f"cannot read {shown(part)} as key, !key, key=value, key!=value, key in (...) or key notin (...)")
    return Requirement(key(part), "Exists")


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
