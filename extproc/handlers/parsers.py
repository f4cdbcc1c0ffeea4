"""The request parsers a config runs (requestHandler.parsers, resolved by pickers.config.parsers): which
parser reads a request, chosen by its path, and what it makes of the body and of the response's usage.

Each parser type claims path suffixes (CLAIMS). The longest claimed suffix the path ends with wins,
whatever the order of the list (llm-d's rule); the query string and a trailing slash are ignored, and
a suffix matches whole path segments. A path no parser claims goes to the fallback parser
(passthrough-parser, last in the default list); with no fallback, a request with a body there is
refused with 400. A request without a body is routed on load whatever its path, as llm-d routes one.

A Route with no `parse` is not read at all: the request is routed on its headers and its body streams
through unbuffered (passthrough-parser, Anthropic's count_tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from extproc.handlers.anthropic import parse_messages
from extproc.handlers.generate import parse_sglang_generate, parse_vllm_generate
from extproc.handlers.request_body import empty_body_error, parse_body
from extproc.handlers.usage import ANTHROPIC, OPENAI, SGLANG, UsageFormat
from pickers.config.parsers import DEFAULT_PARSERS, ParserSpec
from pickers.framework.errors import BAD_REQUEST, RequestError, shown
from pickers.framework.request import InferenceRequest

Parse = Callable[[InferenceRequest, bytes, str], None]


@dataclass(slots=True, frozen=True)
class Route:
    """What one parser makes of the requests on one of its paths."""

    parser: str  # the parser's name in the config
    api: str | None = None  # InferenceRequest.api; None with no `parse`
    required: str = ""  # the body field the API cannot do without
    parse: Parse | None = None  # fills the InferenceRequest from the whole body; None: the body is not read
    usage: UsageFormat | None = None  # how its responses report token usage; None: not read
    model: bool = True  # the body must name a model
    only_path: str | None = None  # the parser reads this exact path only (and refuses the others it claims)

    def empty_body_error(self) -> RequestError:
        return empty_body_error(self.api, self.required, model=self.model)

    def check_path(self, path: str) -> None:
        """Refuse (400) a claimed path this parser does not read (llm-d's sglanghttp-parser reads `/generate` only)."""
        if self.only_path is not None:
            clean = path.partition("?")[0].rstrip("/")
            if clean != self.only_path:
                raise RequestError(BAD_REQUEST, f"{self.parser} reads {self.only_path} only, not {shown(clean)}")


# openai-parser: path suffix -> (api, the field that must be present), as llm-d's openai parser claims them
_OPENAI_APIS = (
    ("/chat/completions", "chat", "messages"),
    ("/chat/completions/render", "chat", "messages"),  # vLLM's: the prompt the request would run, same body
    ("/completions", "completions", "prompt"),
    ("/completions/render", "completions", "prompt"),
    ("/responses", "responses", "input"),
    ("/embeddings", "embeddings", "input"),
    ("/conversations", "conversations", "items"),
    ("/images/generations", "images", "prompt"),
)

Claims = Callable[[str], tuple[tuple[str, Route], ...]]  # the parser's name -> (path suffix, route), ...

CLAIMS: Mapping[str, Claims] = MappingProxyType(
    {
        "openai-parser": lambda name: tuple(
            (suffix, Route(name, api, required, parse_body, OPENAI)) for suffix, api, required in _OPENAI_APIS
        ),
        "anthropic-parser": lambda name: (
            ("/messages", Route(name, "messages", "messages", parse_messages, ANTHROPIC)),
            ("/messages/count_tokens", Route(name)),  # a token count: llm-d forwards it unread
        ),
        "vllmhttp-parser": lambda name: (
            ("/inference/v1/generate", Route(name, "generate", "token_ids", parse_vllm_generate, OPENAI)),
        ),
        "sglanghttp-parser": lambda name: (
            ("/generate", Route(name, "generate", "input_ids", parse_sglang_generate, SGLANG, model=False, only_path="/generate")),
        ),
        "passthrough-parser": lambda name: (),  # claims nothing: the fallback
    }
)


def claimed_paths(type_name: str) -> tuple[str, ...]:
    """The path suffixes a parser type claims, for people: those it forwards unread say so."""
    return tuple(suffix if r.parse is not None else f"{suffix} (unread)" for suffix, r in CLAIMS[type_name](type_name))


class RequestParsers:
    """The parsers of one config, ready to pick a Route per request path. Immutable."""

    __slots__ = ("_by_segment", "_claims", "_fallback", "specs")

    def __init__(self, specs: Sequence[ParserSpec]) -> None:
        self.specs = tuple(specs)
        claims: list[tuple[str, Route]] = []
        fallback: Route | None = None
        for spec in self.specs:
            found = CLAIMS[spec.type](spec.name)
            if not found:
                fallback = Route(spec.name)
                break  # the loader already left out what follows a fallback
            claims.extend(found)
        # longest suffix first: the first that matches is the longest (sorted() keeps ties in list order)
        self._claims = tuple(sorted(claims, key=lambda c: -len(c[0])))
        # a suffix is whole segments, so only those ending in the path's last segment can match it
        by_segment: dict[str, list[tuple[str, Route]]] = {}
        for suffix, route in self._claims:
            by_segment.setdefault(suffix.rpartition("/")[2], []).append((suffix, route))
        self._by_segment = {k: tuple(v) for k, v in by_segment.items()}
        self._fallback = fallback

    def resolve(self, path: str) -> Route | None:
        """The route for a request path; None when no parser claims it and there is no fallback."""
        clean = path.partition("?")[0].rstrip("/")
        for suffix, route in self._by_segment.get(clean.rpartition("/")[2], ()):
            if clean.endswith(suffix):
                return route
        return self._fallback

    def unclaimed_error(self, path: str) -> RequestError:
        clean = path.partition("?")[0].rstrip("/")
        names = ", ".join(s.name for s in self.specs)
        suffixes = ", ".join(dict.fromkeys(suffix for suffix, _ in self._claims))
        return RequestError(
            BAD_REQUEST,
            f"no request parser claims the path {shown(clean)}: the configured parsers ({names}) read paths "
            f"ending in {suffixes}; add passthrough-parser last to requestHandler.parsers to forward other paths unread",
        )


DEFAULT = RequestParsers(DEFAULT_PARSERS)
