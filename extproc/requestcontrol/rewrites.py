"""Model rewrite: the model a client asks for is sent upstream as another one, and the reply says the
name the client asked for again.

The target comes from the header `x-gateway-model-name-rewrite` (llm-d: `x-llm-d-model-name-rewrite`)
when a client sets it, else from InferenceModelRewrite rules (`rules[] {matches[].model{type: Exact,
value}, targets[] {modelRewrite, weight}}`, the Gateway API Inference Extension's v1alpha2 CRD): a weighted random choice among the targets
of the first rule that matches the model exactly; a rule without `matches` applies to models no rule
names. Rules come from `--model-rewrites FILE` and from the InferenceModelRewrites of our pool watched
from the API server (oldest first, then by name); file rules come first.

The body is rewritten, and the reply's name restored, by extproc.handlers.model_name.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pickers.config import safe_yaml
from pickers.framework.errors import ConfigError, shown

REWRITE_HEADERS = ("x-gateway-model-name-rewrite", "x-llm-d-model-name-rewrite")


@dataclass(slots=True, frozen=True)
class Target:
    model: str
    weight: int = 1


@dataclass(slots=True, frozen=True)
class Rule:
    models: tuple[str, ...]  # exact names; empty: every model no other rule names
    targets: tuple[Target, ...]


@dataclass(slots=True, frozen=True)
class _Choice:
    models: tuple[str, ...]
    cum_weights: tuple[int, ...] | None  # None: one target, or all weights 0 (uniform)


def _choice(targets: Sequence[Target]) -> _Choice | None:
    if not targets:
        return None
    models = tuple(t.model for t in targets)
    weights = [max(0, t.weight) for t in targets]
    if len(models) == 1 or not any(weights):
        return _Choice(models, None)
    return _Choice(models, tuple(itertools.accumulate(weights)))


class RewriteStore:
    """Rules from a file and from the API server, indexed by model name for one lookup per request."""

    def __init__(self, static: Sequence[Rule] = (), rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self._static = tuple(static)
        self._watched: dict[str, tuple[tuple[str, str], tuple[Rule, ...]]] = {}  # name -> (order key, rules)
        self._index: dict[str, _Choice] = {}
        self._fallback: _Choice | None = None
        self._rebuild()

    def target(self, model: str, header: str = "") -> str:
        """The model to send upstream for `model`: the header's, a rule's pick, else `model` itself."""
        if header:
            return header
        choice = self._index.get(model, self._fallback)
        if choice is None:
            return model
        if choice.cum_weights is None:
            return choice.models[0] if len(choice.models) == 1 else self.rng.choice(choice.models)
        return self.rng.choices(choice.models, cum_weights=choice.cum_weights)[0]

    @property
    def rules(self) -> tuple[Rule, ...]:
        """Every rule in the order they apply."""
        watched = sorted(self._watched.values())
        return self._static + tuple(r for _, rules in watched for r in rules)

    # -- the watch (extproc.kubernetes.objective_watches) --------------------------------------------------------
    def replace_watched(self, objects: Mapping[str, tuple[str, Sequence[Rule]]]) -> None:
        """name -> (creationTimestamp, rules), the whole set."""
        self._watched = {name: ((created, name), tuple(rules)) for name, (created, rules) in objects.items()}
        self._rebuild()

    def put_watched(self, name: str, created: str, rules: Sequence[Rule]) -> None:
        self._watched[name] = ((created, name), tuple(rules))
        self._rebuild()

    def delete_watched(self, name: str) -> None:
        if self._watched.pop(name, None) is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        index: dict[str, _Choice] = {}
        fallback: _Choice | None = None
        for rule in self.rules:
            choice = _choice(rule.targets)
            if choice is None:
                continue
            if not rule.models:
                fallback = fallback or choice
            for m in rule.models:
                index.setdefault(m, choice)
        self._index, self._fallback = index, fallback  # swapped whole: a reader never sees half


def rewrite_header(headers: Mapping[str, str]) -> str:
    for key in REWRITE_HEADERS:
        value = headers.get(key)
        if value:
            return value.strip()
    return ""


# -- rules from YAML ---------------------------------------------------------------------------------


def parse_rules(raw: object, *, source: str, path: str = "rules") -> list[Rule]:
    """InferenceModelRewrite `spec.rules` as plain YAML/JSON data. Raises ConfigError naming the field."""

    def fail(where: str, message: str) -> ConfigError:
        return ConfigError(message, source=source, field=where)

    if raw is None:
        return []
    if not isinstance(raw, list):
        raise fail(path, "expected a list of rules")
    rules: list[Rule] = []
    for i, item in enumerate(raw):
        where = f"{path}[{i}]"
        if not isinstance(item, dict) or set(item) - {"matches", "targets"}:
            raise fail(where, "expected a mapping with `matches` and `targets`")
        models: list[str] = []
        matches = item.get("matches") or []
        if not isinstance(matches, list):
            raise fail(f"{where}.matches", "expected a list")
        for j, match in enumerate(matches):
            model = match.get("model") if isinstance(match, dict) else None
            if not isinstance(model, dict):
                raise fail(f"{where}.matches[{j}]", "expected a mapping with `model: {type: Exact, value}`")
            if model.get("type", "Exact") != "Exact":
                raise fail(f"{where}.matches[{j}].model.type", f"only Exact is supported, got {shown(model.get('type'))}")
            value = model.get("value")
            if not isinstance(value, str) or not value:
                raise fail(f"{where}.matches[{j}].model.value", f"expected a non-empty string, got {shown(value)}")
            models.append(value)
        targets = item.get("targets")
        if not isinstance(targets, list) or not targets:
            raise fail(f"{where}.targets", "expected a non-empty list of {modelRewrite, weight}")
        parsed: list[Target] = []
        for j, t in enumerate(targets):
            name = t.get("modelRewrite") if isinstance(t, dict) else None
            if not isinstance(name, str) or not name:
                raise fail(f"{where}.targets[{j}].modelRewrite", f"expected a non-empty string, got {shown(name)}")
            weight = t.get("weight", 1)
            if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
                raise fail(f"{where}.targets[{j}].weight", f"expected an integer >= 0, got {shown(weight)}")
            parsed.append(Target(name, weight))
        rules.append(Rule(tuple(models), tuple(parsed)))
    return rules


def load_rewrites_file(path: str | Path) -> list[Rule]:
    """`--model-rewrites FILE`: a list of rules as in InferenceModelRewrite `spec.rules` (or a mapping
    with `rules`, or whole InferenceModelRewrite objects, one per YAML document)."""
    source = str(path)
    docs = safe_yaml.load_all(path, what="model rewrites file")
    rules: list[Rule] = []
    for n, doc in enumerate(docs):
        prefix = f"documents[{n}]." if len(docs) > 1 else ""
        if isinstance(doc, list):
            rules += parse_rules(doc, source=source, path=f"{prefix}rules")
        elif isinstance(doc, dict) and isinstance(doc.get("spec"), dict):
            rules += parse_rules(doc["spec"].get("rules"), source=source, path=f"{prefix}spec.rules")
        elif isinstance(doc, dict) and "rules" in doc:
            rules += parse_rules(doc["rules"], source=source, path=f"{prefix}rules")
        else:
            raise ConfigError("expected a list of rules (InferenceModelRewrite spec.rules)", source=source)
    return rules
