"""Read token `usage` from model-server responses as they stream past, in the shape of the API the
request's parser read (its UsageFormat): OpenAI's `usage`; Anthropic's `usage` (input and output
tokens, split between `message_start` and `message_delta` when streamed); SGLang's `meta_info`.

SSE bodies are scanned line by line and only `data:` lines holding the format's marker are decoded
(OpenAI's carry usage only with `stream_options.include_usage`); JSON bodies are decoded once at the
end. Bytes are never changed here: the caller always passes them on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

MAX_JSON_BODY = 16 * 1024 * 1024  # beyond this we stop buffering a JSON response for its usage


class _UsageDetails(msgspec.Struct):
    cached_tokens: int | None = None


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: _UsageDetails | None = None

    @property
    def cached_tokens(self) -> int:
        d = self.prompt_tokens_details
        return d.cached_tokens or 0 if d is not None else 0


_NO_USAGE = Usage()


def usage_object(usage: Usage | None) -> dict[str, Any]:
    """The usage as llm-d's response plugins see it (its Usage struct as JSON): the three counts always,
    0 when the response had no usage; `prompt_tokens_details` only when the server sent details."""
    u = usage or _NO_USAGE
    out: dict[str, Any] = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}
    if u.prompt_tokens_details is not None:
        out["prompt_tokens_details"] = {"cached_tokens": u.prompt_tokens_details.cached_tokens or 0}
    return out


def _usage(prompt: int, completion: int, cached: int | None) -> Usage:
    details = _UsageDetails(cached) if cached is not None else None
    return Usage(prompt, completion, prompt + completion, details)


@dataclass(slots=True, frozen=True)
class UsageFormat:
    """How one API's responses carry usage. `event` and `body` take the decoded-to-be bytes and the
    usage seen so far, and return the usage now known; they may raise msgspec's errors (no usage)."""

    name: str
    marker: bytes  # an SSE data line is decoded only when it holds this
    done: bytes  # seen in an SSE stream: the reply is complete
    event: Callable[[bytes, Usage | None], Usage | None]
    body: Callable[[bytes, Usage | None], Usage | None]
    empty: bytes | None = None  # an SSE data line holding this has no usage: not decoded


# -- OpenAI (and vLLM's generate API, which reports usage the same way) ---------------------------
class _WithUsage(msgspec.Struct):
    usage: Usage | None = None


_openai = msgspec.json.Decoder(_WithUsage)


def _openai_usage(payload: bytes, seen: Usage | None) -> Usage | None:
    found = _openai.decode(payload).usage
    return found if found is not None else seen


# vLLM sends `"usage":null` in every chunk but the last when asked for usage (JSON escapes a quote in
# a string, so those bytes are never text)
OPENAI = UsageFormat("openai", b'"usage"', b"data: [DONE]", _openai_usage, _openai_usage, b'"usage":null')


# -- Anthropic Messages ---------------------------------------------------------------------------
class _AnthropicUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _AnthropicMessage(msgspec.Struct):
    usage: _AnthropicUsage | None = None


class _AnthropicEvent(msgspec.Struct):
    type: str = ""
    message: _AnthropicMessage | None = None
    usage: _AnthropicUsage | None = None


_anthropic_message = msgspec.json.Decoder(_AnthropicMessage)
_anthropic_event = msgspec.json.Decoder(_AnthropicEvent)


def _anthropic_body(payload: bytes, seen: Usage | None) -> Usage | None:
    u = _anthropic_message.decode(payload).usage
    if u is None:
        return seen
    return _usage(u.input_tokens or 0, u.output_tokens or 0, u.cache_read_input_tokens)


def _anthropic_stream(payload: bytes, seen: Usage | None) -> Usage | None:
    """message_start carries the prompt's tokens, message_delta the output's so far (as llm-d reads them)."""
    event = _anthropic_event.decode(payload)
    if event.type == "message_start" and event.message is not None and event.message.usage is not None:
        u = event.message.usage
        return _usage(u.input_tokens or 0, seen.completion_tokens if seen else 0, u.cache_read_input_tokens)
    if event.type == "message_delta" and event.usage is not None and event.usage.output_tokens is not None:
        prompt = seen.prompt_tokens if seen else 0
        details = seen.prompt_tokens_details if seen else None
        return _usage(prompt, event.usage.output_tokens, details.cached_tokens if details else None)
    return seen


# the last event: `event: message_stop` and its `"type":"message_stop"` both hold this
ANTHROPIC = UsageFormat("anthropic", b'"usage"', b"message_stop", _anthropic_stream, _anthropic_body)


# -- SGLang's native /generate ---------------------------------------------------------------------
class _MetaInfo(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: Any = None  # null until the last chunk of a stream, then an object


class _SGLangOutput(msgspec.Struct):
    meta_info: _MetaInfo | None = None


_sglang = msgspec.json.Decoder(_SGLangOutput)
_UNFINISHED = re.compile(rb'"finish_reason"\s*:\s*null')


def _sglang_usage(meta: _MetaInfo | None, seen: Usage | None) -> Usage | None:
    if meta is None or (meta.prompt_tokens is None and meta.completion_tokens is None):
        return seen
    return _usage(meta.prompt_tokens or 0, meta.completion_tokens or 0, meta.cached_tokens)


def _sglang_body(payload: bytes, seen: Usage | None) -> Usage | None:
    return _sglang_usage(_sglang.decode(payload).meta_info, seen)


def _sglang_stream(payload: bytes, seen: Usage | None) -> Usage | None:
    """Every chunk has meta_info; the counts are final only in the one whose finish_reason is set."""
    if _UNFINISHED.search(payload):
        return seen
    meta = _sglang.decode(payload).meta_info
    if meta is None or meta.finish_reason is None:
        return seen
    return _sglang_usage(meta, seen)


SGLANG = UsageFormat("sglang", b'"meta_info"', b"data: [DONE]", _sglang_stream, _sglang_body)


@dataclass(slots=True)
class UsageReader:
    """Feed response chunks; `usage` is set once seen. Malformed bodies just yield no usage.
    With no format (a request no parser read) chunks are only counted."""

    streaming: bool
    format: UsageFormat | None = OPENAI
    usage: Usage | None = None
    chunks_seen: int = 0
    done: bool = False  # the end of an SSE reply went past: it is complete even if the stream is cut now
    _pending: bytes = b""
    _json_parts: list[bytes] | None = None
    _json_size: int = 0

    def feed(self, chunk: bytes, end: bool) -> None:
        if chunk:
            self.chunks_seen += 1
        fmt = self.format
        if fmt is None:
            return
        if self.streaming:
            self._feed_sse(fmt, chunk, end)
        else:
            self._feed_json(fmt, chunk, end)

    def _feed_sse(self, fmt: UsageFormat, chunk: bytes, end: bool) -> None:
        data = self._pending + chunk if self._pending else chunk
        if fmt.done in data:
            self.done = True
        marker = fmt.marker
        if marker not in data:
            # keep only a tail long enough to hold a split marker and its line start
            cut = data.rfind(b"\n")
            self._pending = data[cut + 1 :] if cut >= 0 else data[-4096:]
            return
        lines = data.split(b"\n")
        self._pending = b"" if end else lines.pop()
        empty = fmt.empty
        for line in lines:
            if line.startswith(b"data:") and marker in line and (empty is None or empty not in line):
                self._take(fmt.event, line[5:].strip())

    def _feed_json(self, fmt: UsageFormat, chunk: bytes, end: bool) -> None:
        if self._json_parts is None:
            self._json_parts = []
        if chunk and self._json_size <= MAX_JSON_BODY:
            self._json_parts.append(chunk)
            self._json_size += len(chunk)
        if end and self._json_size <= MAX_JSON_BODY:
            self._take(fmt.body, b"".join(self._json_parts))
            self._json_parts = None

    def _take(self, read: Callable[[bytes, Usage | None], Usage | None], payload: bytes) -> None:
        try:
            self.usage = read(payload, self.usage)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
