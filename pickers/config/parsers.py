"""The request parsers a config names: `requestHandler.parsers` (llm-d's) and the older top-level
`parser` (GIE's, deprecated in llm-d), resolved to a tuple of ParserSpec the server runs.

Parser plugins are declared under `plugins:` like any plugin and referenced by name, as llm-d does.
A reference to a parser type no plugin declares makes one of that type under that name (llm-d
registers it the same way). With no list, llm-d's default: openai, anthropic, vllmhttp, then
passthrough as the fallback. An explicit list is used as given, with llm-d's two rules (each skipped
entry loads with a warning, as llm-d logs it): a second parser of a type already listed is skipped,
and so is every parser after one that claims no paths (the fallback takes all remaining traffic).

A parser plugin's `parameters` load with a warning naming each one: llm-d's parser factories read none
(the loader, with Params.done(llmd_ignores=True)).

Which paths each type claims, and what it reads, is the server's (extproc.handlers.parsers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pickers.framework.errors import ConfigError, shown

# Parser types llm-epp runs. passthrough-parser claims no paths: it is a fallback.
PARSER_TYPES = ("openai-parser", "anthropic-parser", "vllmhttp-parser", "sglanghttp-parser", "passthrough-parser")
FALLBACK_TYPES = frozenset({"passthrough-parser"})
REFUSED_PARSER_TYPES = MappingProxyType(
    {
        "vllmgrpc-parser": "llm-epp speaks HTTP/JSON to model servers, not vLLM's gRPC API (protobuf bodies "
        "over h2c); use openai-parser with vLLM's OpenAI-compatible HTTP server",
        "vertexai-parser": "llm-epp does not read Vertex AI's gRPC PredictionService envelopes (protobuf "
        "HttpBody around OpenAI JSON); send the OpenAI JSON over HTTP to openai-parser instead",
    }
)
# llm-d's list when no parsers are configured (pkg/epp/config/loader/defaults.go), fallback last
DEFAULT_PARSER_TYPES = ("openai-parser", "anthropic-parser", "vllmhttp-parser", "passthrough-parser")


@dataclass(slots=True, frozen=True)
class ParserSpec:
    name: str  # the plugin's name, as requestHandler.parsers references it
    type: str  # one of PARSER_TYPES


DEFAULT_PARSERS = tuple(ParserSpec(t, t) for t in DEFAULT_PARSER_TYPES)
_HANDLER_KEYS = ("parsers",)
_REF_KEYS = ("pluginRef",)


def is_parser_type(type_name: str) -> bool:
    return type_name in PARSER_TYPES or type_name in REFUSED_PARSER_TYPES


def resolve_parsers(
    doc: Mapping[str, Any],
    declared: Mapping[str, str],
    other_plugins: Mapping[str, str],
    error: Callable[[str, str], ConfigError],
    warnings: list[str],
) -> tuple[tuple[ParserSpec, ...], bool]:
    """The parsers in effect, and whether they are the default list.

    `declared`: parser plugins by name -> type; `other_plugins`: the config's other plugins by name ->
    type (a reference to one is refused). `error(field, message)` builds the loader's ConfigError.
    """
    refs, where = _references(doc, error, warnings)
    explicit = bool(refs)
    if not explicit:
        refs = [(f"default parser {t}", t) for t in DEFAULT_PARSER_TYPES]
    specs: list[ParserSpec] = []
    used: set[str] = set()
    fallback: str | None = None
    for path, ref in refs:
        type_name = declared.get(ref)
        if type_name is None:
            if ref in other_plugins:
                raise error(path, f"plugin {shown(ref)} ({other_plugins[ref]}) is not a request parser; parser types: {', '.join(PARSER_TYPES)}")
            if ref in REFUSED_PARSER_TYPES:
                raise error(path, f"{ref} is not supported: {REFUSED_PARSER_TYPES[ref]}")
            if ref not in PARSER_TYPES:
                known = ", ".join(declared) or "none"
                raise error(
                    path,
                    f"no parser plugin named {shown(ref)}; declared parsers: {known}; a parser type "
                    f"({', '.join(PARSER_TYPES)}) may also be referenced without declaring it",
                )
            type_name = ref  # llm-d makes a parser of that type, named after it
        used.add(ref)
        if fallback is not None:
            warnings.append(f"{path}: parser {ref!r} is skipped: it comes after the fallback parser {fallback!r}, which takes all remaining paths")
            continue
        twin = next((s for s in specs if s.type == type_name), None)
        if twin is not None:
            warnings.append(f"{path}: parser {ref!r} is skipped: a parser of type {type_name} ({twin.name!r}) is already listed")
            continue
        specs.append(ParserSpec(ref, type_name))
        if type_name in FALLBACK_TYPES:
            fallback = ref
    for name, type_name in declared.items():
        if name not in used:
            listed = f"not in {where}" if explicit else "not one of the default parsers (add a requestHandler.parsers list)"
            warnings.append(f"parser plugin {name!r} ({type_name}) is {listed}: it parses nothing")
    return tuple(specs), not explicit


def _references(
    doc: Mapping[str, Any], error: Callable[[str, str], ConfigError], warnings: list[str]
) -> tuple[list[tuple[str, str]], str]:
    """(field path, pluginRef) as written: requestHandler.parsers, else the deprecated top-level parser."""
    refs: list[tuple[str, str]] = []
    handler = doc.get("requestHandler")
    if handler is not None:
        if not isinstance(handler, dict):
            raise error("requestHandler", f"expected a mapping, got {shown(handler)}")
        for k in handler:
            if k == "parser":  # llm-d's deprecation notice names this field, which does not exist
                raise error("requestHandler.parser", "unknown field; the list of parsers is requestHandler.parsers")
            if k not in _HANDLER_KEYS:
                raise error(f"requestHandler.{k}", f"unknown field; expected one of {', '.join(_HANDLER_KEYS)}")
        items = handler.get("parsers")
        if items is not None and not isinstance(items, list):
            raise error("requestHandler.parsers", f"expected a list of {{pluginRef: NAME}}, got {shown(items)}")
        for i, item in enumerate(items or ()):
            refs.append((f"requestHandler.parsers[{i}]", _ref(item, f"requestHandler.parsers[{i}]", error)))
    old = doc.get("parser")
    if old is None:
        return refs, "requestHandler.parsers"
    ref = _ref(old, "parser", error)
    if refs:
        warnings.append("DEPRECATION: top-level parser is deprecated, use requestHandler.parsers instead; "
                        f"both are set, so requestHandler.parsers is used and parser ({ref!r}) is not")
        return refs, "requestHandler.parsers"
    warnings.append("DEPRECATION: top-level parser is deprecated, use requestHandler.parsers instead")
    return [("parser.pluginRef", ref)], "parser"


def _ref(item: object, path: str, error: Callable[[str, str], ConfigError]) -> str:
    if not isinstance(item, dict):
        raise error(path, f"expected a mapping {{pluginRef: NAME}}, got {shown(item)}")
    for k in item:
        if k not in _REF_KEYS:
            raise error(f"{path}.{k}", f"unknown field; expected one of {', '.join(_REF_KEYS)}")
    ref = item.get("pluginRef")
    if not isinstance(ref, str) or not ref:
        raise error(f"{path}.pluginRef", f"expected a non-empty string, got {shown(ref)}")
    return ref
