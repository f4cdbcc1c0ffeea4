"""The OpenAI wire format as vLLM speaks it: request structs decoded once, errors, response shapes.

Parsing turns a body into a ParsedRequest (prompts as token ids) or raises ApiError; nothing
past this module touches raw request dicts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from vllm_sim import tokens
from vllm_sim.config import SimConfig
from vllm_sim.engine import PdLeg

DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """An error response; its class decides the HTTP status and vLLM error type."""

    status = 500
    error_type = "InternalServerError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"object": "error", "message": self.message, "type": self.error_type,
                "param": None, "code": self.status}


class BadRequest(ApiError):
    status = 400
    error_type = "BadRequestError"


class ModelNotFound(ApiError):
    status = 404
    error_type = "NotFoundError"


class Unavailable(ApiError):
    status = 503
    error_type = "ServiceUnavailableError"


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class KvTransferParams(msgspec.Struct, kw_only=True):
    """vLLM's `kv_transfer_params` as NixlConnector reads them; unknown keys are ignored."""

    do_remote_decode: bool | None = False
    do_remote_prefill: bool | None = False
    remote_engine_id: str | None = None
    remote_block_ids: list[int] | None = None
    remote_host: str | None = None
    remote_port: int | None = None


def pd_leg(params: KvTransferParams | None) -> PdLeg:
    """do_remote_decode -> prefill leg; do_remote_prefill with a source -> decode leg.

    Like NixlConnector, a decode leg that does not say where the KV is (engine id, host, port)
    is served with a local prefill instead of failing.
    """
    if params is None:
        return PdLeg.NONE
    if params.do_remote_decode and params.do_remote_prefill:
        raise BadRequest("kv_transfer_params: do_remote_decode and do_remote_prefill cannot both be true")
    if params.do_remote_decode:
        return PdLeg.PREFILL
    if params.do_remote_prefill and None not in (params.remote_engine_id, params.remote_host, params.remote_port):
        return PdLeg.DECODE
    return PdLeg.NONE


class _Common(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1  # accepted; only one choice per prompt is produced
    ignore_eos: bool | None = False  # output always runs to max_tokens anyway
    seed: int | None = None
    kv_transfer_params: KvTransferParams | None = None


class CompletionRequest(_Common, kw_only=True):
    # str | list: msgspec cannot tell list[str] from list[int] in a union, so the list is checked below.
    prompt: str | list[Any]


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    add_generation_prompt: bool | None = True


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    chat: bool
    model: str
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    stream: bool
    include_usage: bool
    seed: int | None
    pd_leg: PdLeg = PdLeg.NONE


def _decode(body: bytes, kind: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError subclass
        raise BadRequest(str(e) if isinstance(e, msgspec.ValidationError) else f"Invalid JSON: {e}") from None


def _model(requested: str | None, config: SimConfig) -> str:
    if requested is None or requested == "":
        return config.models[0]
    if requested not in config.models:
        raise ModelNotFound(f"The model `{requested}` does not exist.")
    return requested


def _completion_prompts(prompt: str | list[Any]) -> list[tuple[int, ...]]:
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise BadRequest("prompt must not be an empty list")
    elif all(_is_token_id(t) for t in prompt):
        items = [prompt]
    else:
        items = prompt
    out: list[tuple[int, ...]] = []
    for item in items:
        if isinstance(item, str):
            ids = tuple(tokens.encode(item))
        elif isinstance(item, list) and item and all(_is_token_id(t) for t in item):
            ids = tuple(item)
        else:
            raise BadRequest("prompt must be a string, a list of strings, a list of token ids "
                             "or a list of lists of token ids")
        if not ids:
            raise BadRequest("prompt must not be empty")
        out.append(ids)
    return out


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value


def _chat_prompt(request: ChatRequest) -> tuple[int, ...]:
    messages: list[tuple[str, str]] = []
    for message in request.messages:
        content = message.content
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            parts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise BadRequest(f"unsupported content part type {part.type!r}; only 'text' parts are supported")
                parts.append(part.text)
            text = "\n".join(parts)
        messages.append((message.role, text))
    text = tokens.apply_chat_template(messages, bool(request.add_generation_prompt))
    return tuple(tokens.encode(text))


def _max_tokens(value: int | None, prompts: Sequence[tuple[int, ...]], config: SimConfig) -> int:
    max_tokens = DEFAULT_MAX_TOKENS if value is None else value
    if max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}.")
    for prompt in prompts:
        if len(prompt) + max_tokens > config.max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {config.max_model_len} tokens. However, you "
                f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or completion."
            )
    return max_tokens


def parse_completion(body: bytes, config: SimConfig) -> ParsedRequest:
    request: CompletionRequest = _decode(body, CompletionRequest)
    model = _model(request.model, config)
    prompts = _completion_prompts(request.prompt)
    return _parsed(False, model, prompts, request.max_tokens, request, config)


def parse_chat(body: bytes, config: SimConfig) -> ParsedRequest:
    request: ChatRequest = _decode(body, ChatRequest)
    model = _model(request.model, config)
    prompts = [_chat_prompt(request)]
    limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return _parsed(True, model, prompts, limit, request, config)


def _parsed(chat: bool, model: str, prompts: list[tuple[int, ...]], limit: int | None,
            request: _Common, config: SimConfig) -> ParsedRequest:
    leg = pd_leg(request.kv_transfer_params)
    if leg is not PdLeg.NONE and len(prompts) != 1:
        raise BadRequest("kv_transfer_params: a disaggregated request must have exactly one prompt")
    return ParsedRequest(
        chat=chat,
        model=model,
        prompts=tuple(prompts),
        max_tokens=_max_tokens(limit, prompts, config),
        stream=bool(request.stream),
        include_usage=bool(request.stream and request.stream_options and request.stream_options.include_usage),
        seed=request.seed,
        pd_leg=leg,
    )


# ---- responses -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ResponseHeader:
    """What every body or chunk of one response repeats."""

    id: str
    created: int
    model: str
    chat: bool

    @classmethod
    def new(cls, parsed: ParsedRequest) -> ResponseHeader:
        prefix = "chatcmpl" if parsed.chat else "cmpl"
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), parsed.model, parsed.chat)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def produced_kv_transfer_params(block_ids: Sequence[int], engine_id: str, host: str, port: int,
                                request_id: str) -> dict[str, Any]:
    """What a prefill leg's response carries for the decode leg, shaped like NixlConnector's."""
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": list(block_ids),
            "remote_engine_id": engine_id, "remote_request_id": request_id, "remote_host": host,
            "remote_port": port, "tp_size": 1}


def full_response(head: ResponseHeader, texts: Sequence[str], usage_: dict[str, Any]) -> dict[str, Any]:
    if head.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text, "tool_calls": []},
                    "logprobs": None, "finish_reason": "length", "stop_reason": None}
                   for i, text in enumerate(texts)]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": "length",
                    "stop_reason": None, "prompt_logprobs": None}
                   for i, text in enumerate(texts)]
        obj = "text_completion"
    return {"id": head.id, "object": obj, "created": head.created, "model": head.model,
            "choices": choices, "usage": usage_}


def chunk(head: ResponseHeader, index: int, text: str, finished: bool, role: bool = False) -> dict[str, Any]:
    """One streamed chunk; with role=True the chat 'role' opener that vLLM sends first."""
    reason = "length" if finished else None
    if head.chat:
        delta = {"role": "assistant", "content": ""} if role else {"content": text}
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None}
        obj = "text_completion"
    return {"id": head.id, "object": obj, "created": head.created, "model": head.model, "choices": [choice]}


def usage_chunk(head: ResponseHeader, usage_: dict[str, Any]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if head.chat else "text_completion"
    return {"id": head.id, "object": obj, "created": head.created, "model": head.model,
            "choices": [], "usage": usage_}


def models_list(config: SimConfig, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": created, "owned_by": "vllm", "root": m,
         "parent": None, "max_model_len": config.max_model_len, "permission": []}
        for m in config.models
    ]}
