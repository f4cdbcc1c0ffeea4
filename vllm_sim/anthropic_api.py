"""Anthropic's Messages API as vLLM serves it (`POST /v1/messages`): the request decoded once into the
same ParsedRequest a chat completion makes, errors and response shapes in Anthropic's form.

The system prompt (a string or text blocks) is the chat's first message; each message's content is a
string or text blocks. `max_tokens` is required, as in Anthropic's API. Usage is `input_tokens`
(the whole prompt), `output_tokens` and `cache_read_input_tokens` (the prompt tokens found cached);
streamed, `message_start` carries the input's and `message_delta` the output's.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from vllm_sim import openai_api as api
from vllm_sim import tokens
from vllm_sim.config import SimConfig

_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error"}


class TextBlock(msgspec.Struct):
    type: str
    text: str | None = None


class Message(msgspec.Struct):
    role: str
    content: str | list[TextBlock]


class MessagesRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    messages: list[Message]
    max_tokens: int
    system: str | list[TextBlock] | None = None
    stream: bool | None = False
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None


def _text(content: str | list[TextBlock], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if block.type != "text" or block.text is None:
            raise api.BadRequest(f"{where}: unsupported content block type {block.type!r}; only 'text' blocks are supported")
        parts.append(block.text)
    return "\n".join(parts)


def parse_messages(body: bytes, config: SimConfig) -> api.ParsedRequest:
    request: MessagesRequest = api._decode(body, MessagesRequest)
    if not request.messages:
        raise api.BadRequest("messages: at least one message is required")
    if request.temperature is not None and not 0.0 <= request.temperature <= 1.0:
        raise api.BadRequest(f"temperature must be in [0, 1], got {request.temperature}.")
    model = api._model(request.model, config)
    chat: list[tuple[str, str]] = []
    if request.system:
        chat.append(("system", _text(request.system, "system")))
    chat += [(m.role, _text(m.content, f"messages[{i}].content")) for i, m in enumerate(request.messages)]
    prompt = tuple(tokens.encode(tokens.apply_chat_template(chat, True)))
    return api.ParsedRequest(
        chat=True,
        model=model,
        prompts=(prompt,),
        max_tokens=api._max_tokens(request.max_tokens, (prompt,), config),
        stream=bool(request.stream),
        include_usage=True,
        seed=None,
    )


def error_body(error: api.ApiError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(error.status, "api_error"), "message": error.message}}


def new_header(parsed: api.ParsedRequest) -> api.ResponseHeader:
    return api.ResponseHeader(f"msg_{uuid.uuid4().hex}", int(time.time()), parsed.model, True)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "output_tokens": completion_tokens, "cache_read_input_tokens": cached_tokens}


def message(head: api.ResponseHeader, text: str, usage_: dict[str, Any]) -> dict[str, Any]:
    """The whole reply (non-streamed); the simulator always runs to max_tokens."""
    return {"id": head.id, "type": "message", "role": "assistant", "model": head.model,
            "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens", "stop_sequence": None,
            "usage": usage_}


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def stream_start(head: api.ResponseHeader, input_tokens: int, cached_tokens: int) -> bytes:
    start = {"id": head.id, "type": "message", "role": "assistant", "model": head.model, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": usage(input_tokens, 0, cached_tokens)}
    return (event("message_start", {"type": "message_start", "message": start})
            + event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}}))


def stream_delta(text: str) -> bytes:
    return event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": text}})


def stream_end(output_tokens: int) -> bytes:
    return (event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                      "usage": {"output_tokens": output_tokens}})
            + event("message_stop", {"type": "message_stop"}))
