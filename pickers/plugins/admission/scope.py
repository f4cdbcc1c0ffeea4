"""What the guardrail plugins share: which requests a rule applies to (its `objectives` and `models`,
each empty: any) and reading the `rules` list, each rule a mapping checked like a plugin's parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest

R = TypeVar("R")


@dataclass(slots=True, frozen=True)
class Scope:
    objectives: frozenset[str] = frozenset()  # the request's x-gateway-inference-objective; empty: any
    models: frozenset[str] = frozenset()  # the model the client named; empty: any

    @classmethod
    def read(cls, p: Params) -> Scope:
        return cls(frozenset(p.strings("objectives")), frozenset(p.strings("models")))

    def applies(self, request: InferenceRequest) -> bool:
        if self.objectives and request.objective not in self.objectives:
            return False
        return not self.models or request.model in self.models


def read_rules(p: Params, build: Callable[[str, Params], R]) -> list[R]:
    """`rules`: a non-empty list of mappings, each with a unique `name`; `build(name, params)` reads the
    rest of one (errors name `rules[2].pattern`), and a parameter it did not read is refused."""
    raw = p.mappings("rules")
    if not raw:
        raise ParameterError(p.path("rules"), "is required: a list of rules, each a mapping with a name")
    rules: list[R] = []
    effective: list[dict[str, object]] = []
    seen: set[str] = set()
    for i, spec in enumerate(raw):
        rp = Params(spec, prefix=f"{p.path('rules')}[{i}].", warnings=p.warnings)
        name = rp.string("name", required=True)
        assert name is not None
        if "/" in name:
            raise ParameterError(rp.path("name"), f"expected a name without '/', got {shown(name)}")
        if name in seen:
            raise ParameterError(rp.path("name"), f"another rule is already named {shown(name)}")
        seen.add(name)
        rules.append(build(name, rp))
        rp.done()
        effective.append(rp.effective)
    p.effective["rules"] = effective  # each rule with the defaults it runs with (epp check-config)
    return rules
