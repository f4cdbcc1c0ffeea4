"""request-attribute-reporter (llm-d's): a number computed from the response's token usage by a CEL
expression, handed back to the gateway as ext_proc dynamic metadata (`key.namespace`, default
envoy.lb, then `key.name`) on the message that ends the response body, for Envoy's later filters,
rate limits and access log. As llm-d's plugin:

- `attributes`: exactly one entry, `{key: {namespace, name}, expression, condition}`; `name` and
  `expression` are required, `condition` optional.
- The CEL variable `usage` is a google.protobuf.Struct holding the response's usage as llm-d reads it:
  prompt_tokens, completion_tokens and total_tokens always (0 when the response carried none), and
  prompt_tokens_details.cached_tokens when the server sent details. A Struct's numbers are doubles:
  `usage.prompt_tokens + 1` fails (double + int) where `int(usage.prompt_tokens) + 1` works, and
  comparisons mix the two freely. Both expressions compile once, at load, against that declaration:
  a syntax or type error refuses the config, naming the attribute.
- Per response: the condition, when set, must be `true` (false, another type or an error: nothing
  is reported); the expression's value, an int or a double truncated toward zero, is reported unless
  it is 0 or -1 (llm-d skips both); an evaluation error or another type reports nothing.

Ours: an expression whose checked type can never be a number (a string, a list...) and a condition
that can never be a bool are refused at load; llm-d loads them and never reports anything. What
each response came to is counted in `outcomes` (llm_epp_request_attribute_reports_total) and each
kind of failure is logged once.

The CEL runtime is Google's C++ one (cel-expr-python, the optional extra `llm-epp[cel]`), imported
only when a config uses this plugin: about 5 microseconds a response for a condition and an expression.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from pickers.framework.errors import ConfigError, shown
from pickers.framework.params import ParameterError, Params
from pickers.plugins.base import Plugin, PluginContext

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "envoy.lb"
CEL_EXTRA = "pip install 'llm-epp[cel]'"
_INT64_LIMIT = 2.0**63
_ERROR_LIMIT = 600  # characters of a CEL compiler message repeated in a config error
_LOGGED_LIMIT = 32  # distinct failure reasons logged per plugin; later ones are only counted

# outcomes of one response, the `result` label of llm_epp_request_attribute_reports_total
REPORTED = "reported"
CONDITION_FALSE = "condition_false"  # the condition was false or not a bool
SKIPPED = "skipped"  # the value was 0 or -1, which llm-d does not report
FAILED = "failed"  # the condition or expression failed to evaluate, or the value was no number


def cel_runtime() -> ModuleType:
    """The CEL runtime module, or a ConfigError that says how to install it."""
    try:
        from cel_expr_python import cel
    except ImportError:
        raise ConfigError(
            f"{RequestAttributeReporter.type} needs the CEL runtime, which is not installed: {CEL_EXTRA} "
            "(the cel-expr-python package)"
        ) from None
    return cel


def _compiler_message(err: Exception) -> str:
    """The CEL compiler's findings on one line: `1:24: Syntax error: ...; ...` (its source excerpts dropped)."""
    text = str(err).removeprefix("INVALID_ARGUMENT: ")
    found = [line.split("<input>:", 1)[-1].strip() for line in text.splitlines() if line.startswith("ERROR:")]
    message = "; ".join(found) if found else text
    return message if len(message) <= _ERROR_LIMIT else message[: _ERROR_LIMIT - 3] + "..."


def _struct_values(usage: Mapping[str, Any]) -> dict[str, Any]:
    """The usage object as a google.protobuf.Struct holds it: every number a double."""
    return {k: float(v) if type(v) is int else _struct_values(v) if isinstance(v, Mapping) else v for k, v in usage.items()}


class RequestAttributeReporter(Plugin):
    type = "request-attribute-reporter"

    def __init__(self, key_name: str, expression: str, condition: str = "", namespace: str = DEFAULT_NAMESPACE,
                 name: str | None = None) -> None:  # fmt: skip
        super().__init__(name)
        self.namespace = namespace or DEFAULT_NAMESPACE
        self.key_name = key_name
        self.expression = expression
        self.condition = condition
        cel = cel_runtime()
        self._int, self._error = cel.Type.INT, cel.Type.ERROR
        self._env = env = cel.NewEnv(variables={"usage": cel.Type("google.protobuf.Struct")})
        numbers, booleans = (cel.Type.INT, cel.Type.DOUBLE, cel.Type.DYN), (cel.Type.BOOL, cel.Type.DYN)
        self._expression = self._compile(env, expression, "attributes[0].expression", numbers, "a number")
        self._int_typed = self._expression.return_type() == cel.Type.INT  # its ints are CEL ints, never uints
        self._condition = self._compile(env, condition, "attributes[0].condition", booleans, "a bool") if condition else None
        self.outcomes: Counter[str] = Counter()
        self._logged: set[str] = set()

    def _compile(self, env: Any, source: str, param: str, allowed: tuple[Any, ...], what: str) -> Any:
        try:
            compiled = env.compile(source)
        except Exception as e:  # noqa: BLE001 - the runtime raises RuntimeError with the compiler's findings
            raise ParameterError(param, f"{self._named(source)} does not compile: {_compiler_message(e)}") from None
        returns = compiled.return_type()
        if not any(returns == t for t in allowed):
            raise ParameterError(param, f"{self._named(source)} returns {returns.name().lower()}; it must return {what}")
        return compiled

    def _named(self, source: str) -> str:
        return f"attribute {shown(self.key_name)}: {shown(source, 80)}"

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> RequestAttributeReporter:
        attributes = p.mappings("attributes")
        if len(attributes) != 1:
            raise ParameterError("attributes", f"expected exactly one attribute (as llm-d), got {len(attributes)}")
        a = Params(attributes[0], prefix="attributes[0].", warnings=p.warnings)
        key = a.section("key")
        namespace = key.string("namespace", DEFAULT_NAMESPACE) or DEFAULT_NAMESPACE
        key.effective["namespace"] = namespace
        key_name = key.string("name", required=True)
        expression = a.string("expression", required=True)
        condition = a.string("condition", "") or ""
        a.effective["condition"] = condition or None
        a.done()
        assert key_name is not None and expression is not None
        p.effective["attributes"] = [a.effective]
        if namespace != DEFAULT_NAMESPACE:
            p.warnings.append(
                f"attributes[0].key.namespace {shown(namespace)}: Envoy keeps dynamic metadata only in the namespaces its "
                "ext_proc filter lists in metadata_options.receiving_namespaces (envoy/llm-gateway.yaml lists envoy.lb): "
                "add it there"
            )
        return cls(key_name, expression, condition, namespace, name)

    def report_response(self, usage: Mapping[str, Any], metadata: dict[str, dict[str, float]]) -> None:
        """Evaluate over this response's usage and, when there is a value to report, put it in `metadata`.
        A result's Python value tells its CEL type apart in all but two cases (an error and a string are
        both str, an int and a uint both int), so `type()` is asked only then."""
        data = {"usage": _struct_values(usage)}
        if self._condition is not None:
            activation = self._env.Activation(data)  # one conversion of the usage for both programs
            met = self._evaluate(self._condition, activation, "condition")
            if met is None:
                return
            if met.value() is not True:
                if met.type() == self._error:
                    self._failed("condition", str(met.value()))
                else:
                    self.outcomes[CONDITION_FALSE] += 1
                return
            result = self._evaluate(self._expression, activation, "expression")
        else:
            result = self._evaluate(self._expression, None, "expression", data)
        if result is None:
            return
        v = result.value()
        value: int
        if type(v) is float and math.isfinite(v) and abs(v) < _INT64_LIMIT:
            value = int(v)  # toward zero, as llm-d's int64(float64)
        elif type(v) is int and (self._int_typed or result.type() == self._int):
            value = v
        else:
            kind = result.type()
            if kind == self._error:
                self._failed("expression", str(v))
            else:
                self._failed("expression", f"returned {kind.name().lower()} {shown(v, 60)}, not a number")
            return
        if value in (0, -1):
            self.outcomes[SKIPPED] += 1
            return
        metadata.setdefault(self.namespace, {})[self.key_name] = float(value)
        self.outcomes[REPORTED] += 1

    def _evaluate(self, program: Any, activation: Any, part: str, data: Mapping[str, Any] | None = None) -> Any:
        try:
            return program.eval(activation) if data is None else program.eval(data=data)
        except Exception as e:  # noqa: BLE001 - an evaluation that raises reports nothing, as an error value does
            self._failed(part, str(e) or type(e).__name__)
            return None

    def _failed(self, part: str, detail: str) -> None:
        self.outcomes[FAILED] += 1
        reason = f"{part}: {detail}"
        if reason in self._logged or len(self._logged) >= _LOGGED_LIMIT:
            return
        self._logged.add(reason)
        source = self.condition if part == "condition" else self.expression
        log.warning("%s %s: the %s %s failed: %s; nothing is reported for such responses "
                    "(counted in llm_epp_request_attribute_reports_total, logged once per reason)",
                    self.type, self.name, part, shown(source, 80), shown(detail, 200))  # fmt: skip
