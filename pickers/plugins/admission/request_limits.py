"""request-limits-admitter (llm-epp's): what a request of an objective or model may ask for.

Each rule applies to the requests its `objectives` and `models` name (empty: all) and may set the
longest prompt (`maxPromptTokens`: counted when a token-producer gave the ids, else estimated at 4
characters a token), the largest `max_tokens` (`maxOutputTokens`; `requireMaxTokens` refuses a request
that sets none), and allow lists of models, LoRA adapters and paths. Every rule that applies is checked,
in order; the first one broken refuses the request: 400 `rejected-request-limits` for a limit, 403 for
an allow list, with a message naming the plugin, the rule and the parameter.

A model is a LoRA adapter when the pool says so: an endpoint's /v1/models lists it with a parent
(models-data-source) or vLLM's lora_requests_info names it running or waiting. An adapter must be in
`allowedLoraAdapters` when that is set (else in `allowedModels`, when that is); any other model must be
in `allowedModels` when that is set. Paths are matched without their query; an entry ending in `*` is
a prefix. A request whose body is not parsed (a passthrough path) names no model: only the paths apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import LIMIT_EXCEEDED, NOT_ALLOWED, RequestError
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.plugins.admission.scope import Scope, read_rules
from pickers.plugins.base import Plugin, PluginContext


@dataclass(slots=True, frozen=True)
class LimitsRule:
    name: str
    scope: Scope
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    require_max_tokens: bool = False
    allowed_models: frozenset[str] | None = None  # None: any
    allowed_adapters: frozenset[str] | None = None
    allowed_paths: frozenset[str] | None = None  # exact paths
    allowed_path_prefixes: tuple[str, ...] = ()  # the entries that ended in `*`


def _optional_limit(p: Params, key: str) -> int | None:
    v = p.integer(key, 0, minimum=0)
    return v or None


def _allow_list(p: Params, key: str) -> frozenset[str] | None:
    if not p.given(key):
        p.strings(key)  # read (null is as left out)
        p.effective.pop(key, None)  # left out: any, not shown as an empty list (which would allow none)
        return None
    values = p.strings(key)
    if not values:
        raise ParameterError(p.path(key), "expected at least one entry (leave it out to allow any)")
    return frozenset(values)


def _read_rule(name: str, p: Params) -> LimitsRule:
    paths = _allow_list(p, "allowedPaths")
    exact = prefixes = None
    if paths is not None:
        for path in paths:
            if not path.startswith("/"):
                raise ParameterError(p.path("allowedPaths"), f"expected paths starting with '/', got {path!r}")
        exact = frozenset(x for x in paths if not x.endswith("*"))
        prefixes = tuple(sorted(x[:-1] for x in paths if x.endswith("*")))
    rule = LimitsRule(
        name,
        Scope.read(p),
        max_prompt_tokens=_optional_limit(p, "maxPromptTokens"),
        max_output_tokens=_optional_limit(p, "maxOutputTokens"),
        require_max_tokens=p.flag("requireMaxTokens", False),
        allowed_models=_allow_list(p, "allowedModels"),
        allowed_adapters=_allow_list(p, "allowedLoraAdapters"),
        allowed_paths=exact,
        allowed_path_prefixes=prefixes or (),
    )
    if not any((rule.max_prompt_tokens, rule.max_output_tokens, rule.require_max_tokens, rule.allowed_models is not None,
                rule.allowed_adapters is not None, paths is not None)):  # fmt: skip
        raise ParameterError(
            p.path("name"), f"rule {name!r} sets no limit: give maxPromptTokens, maxOutputTokens, requireMaxTokens, "
            "allowedModels, allowedLoraAdapters or allowedPaths"
        )  # fmt: skip
    return rule


def is_adapter(model: str, endpoints: Sequence[Endpoint]) -> bool:
    """Whether the pool knows `model` as a LoRA adapter (O(endpoints))."""
    for ep in endpoints:
        m = ep.metrics
        if model in m.running_lora_adapters or model in m.waiting_lora_adapters:
            return True
        served = ep.served_models
        if served is not None and model in served.ids:
            for entry in served.models:
                if entry.id == model:
                    if entry.parent:
                        return True
                    break
    return False


class RequestLimitsAdmitter(Plugin):
    type = "request-limits-admitter"

    def __init__(self, name: str, rules: Sequence[LimitsRule]) -> None:
        super().__init__(name)
        self.rules = tuple(rules)

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> RequestLimitsAdmitter:
        return cls(name, read_rules(p, _read_rule))

    def admit_request(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        for rule in self.rules:
            if rule.scope.applies(request):
                self._check(rule, request, endpoints)

    def _refuse(self, rule: LimitsRule, kind_forbidden: bool, param: str, what: str) -> RequestError:
        return RequestError(
            NOT_ALLOWED if kind_forbidden else LIMIT_EXCEEDED,
            f"{self.type} {self.name!r} rule {rule.name!r} ({param}): {what}",
            rule=f"{self.name}/{rule.name}",
        )

    def _check(self, rule: LimitsRule, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        if rule.allowed_paths is not None:
            path = request.path.partition("?")[0]
            if path not in rule.allowed_paths and not any(path.startswith(x) for x in rule.allowed_path_prefixes):
                raise self._refuse(rule, True, "allowedPaths", f"path {path[:200]!r} is not allowed")
        if request.api is None:  # no body read: nothing else to check
            return
        model = request.model
        if rule.allowed_adapters is not None and is_adapter(model, endpoints):
            if model not in rule.allowed_adapters:
                raise self._refuse(rule, True, "allowedLoraAdapters", f"LoRA adapter {model[:200]!r} is not allowed")
        elif rule.allowed_models is not None and model not in rule.allowed_models:
            raise self._refuse(rule, True, "allowedModels", f"model {model[:200]!r} is not allowed")
        if rule.max_output_tokens is not None or rule.require_max_tokens:
            asked = request.max_tokens
            if asked is None:
                if rule.require_max_tokens:
                    raise self._refuse(rule, False, "requireMaxTokens", "the request must set max_tokens")
            elif rule.max_output_tokens is not None and asked > rule.max_output_tokens:
                raise self._refuse(rule, False, "maxOutputTokens", f"max_tokens {asked} is over the {rule.max_output_tokens} allowed")
        if rule.max_prompt_tokens is not None:
            tokens = request.prompt_tokens
            if tokens > rule.max_prompt_tokens:
                counted = "" if request.prompt_token_ids is not None else "about "
                raise self._refuse(rule, False, "maxPromptTokens",
                                   f"the prompt is {counted}{tokens} tokens, over the {rule.max_prompt_tokens} allowed")  # fmt: skip
