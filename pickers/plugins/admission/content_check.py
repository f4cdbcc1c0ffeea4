"""content-check-admitter (llm-epp's): refuse or flag requests whose prompt matches a pattern.

Each rule names a `preset` (pickers.plugins.admission.patterns: card-number, us-ssn, email-address,
aws-access-key-id, private-key, openai-api-key, github-token, bearer-token) or a `pattern` (a Python
regular expression), applies to the requests its `objectives` and `models` name (empty: all), and
either refuses the request (`action: refuse`, the default: `status` 403 or 400, `rejected-content-check`)
with a message naming the rule and never the matched text, or lets it through with the rule named in
its audit record and the admission metric (`action: flag`). The text checked is the prompt as the
request parser read it: chat messages' text content, a completion's prompt, a responses API's input.
Rules run in order: a flagging rule that matches is noted and the check goes on; the first refusing
rule that matches ends it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import CONTENT_BAD_REQUEST, CONTENT_FORBIDDEN, ErrorKind, RequestError, shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.plugins.admission.patterns import PRESETS, Pattern, Text
from pickers.plugins.admission.scope import Scope, read_rules
from pickers.plugins.base import Plugin, PluginContext

_KINDS = {"400": CONTENT_BAD_REQUEST, "403": CONTENT_FORBIDDEN}


@dataclass(slots=True, frozen=True)
class ContentRule:
    name: str
    label: str  # `plugin/rule`: how records, metrics and excerpts name it
    pattern: Pattern
    scope: Scope
    refuse: bool
    kind: ErrorKind


def _read_rule(plugin: str) -> Callable[[str, Params], ContentRule]:
    def build(name: str, p: Params) -> ContentRule:
        preset = p.string("preset")
        text = p.string("pattern")
        if (preset is None) == (text is None):
            raise ParameterError(p.path("pattern"), f"rule {name!r} needs exactly one of preset and pattern")
        if preset is not None:
            pattern = PRESETS.get(preset)
            if pattern is None:
                raise ParameterError(p.path("preset"), f"unknown preset {shown(preset)}; known: {', '.join(sorted(PRESETS))}")
        else:
            assert text is not None
            if not text:
                raise ParameterError(p.path("pattern"), "expected a non-empty regular expression")
            try:
                pattern = Pattern(re.compile(text))
            except re.error as e:
                raise ParameterError(p.path("pattern"), f"not a valid regular expression ({e}): {shown(text)}") from None
        action = p.choice("action", "refuse", ("refuse", "flag"))
        status = p.integer("status", 403)
        if str(status) not in _KINDS:
            raise ParameterError(p.path("status"), f"expected 400 or 403, got {status}")
        return ContentRule(name, f"{plugin}/{name}", pattern, Scope.read(p), action == "refuse", _KINDS[str(status)])

    return build


class ContentCheckAdmitter(Plugin):
    type = "content-check-admitter"

    def __init__(self, name: str, rules: Sequence[ContentRule]) -> None:
        super().__init__(name)
        self.rules = tuple(rules)

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> ContentCheckAdmitter:
        return cls(name, read_rules(p, _read_rule(name)))

    def patterns(self) -> list[tuple[str, Pattern]]:
        """(label, pattern) of every rule: what an audit excerpt masks."""
        return [(r.label, r.pattern) for r in self.rules]

    def admit_request(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        if not request.prompt_text:
            return
        text = Text(request.prompt_text)
        for rule in self.rules:
            if not rule.scope.applies(request) or not rule.pattern.search(text):
                continue
            if rule.refuse:
                raise RequestError(
                    rule.kind, f"{self.type} {self.name!r} rule {rule.name!r}: the prompt matches a pattern this gateway refuses",
                    rule=rule.label,
                )  # fmt: skip
            if request.flags is None:
                request.flags = [rule.label]
            elif rule.label not in request.flags:
                request.flags.append(rule.label)
