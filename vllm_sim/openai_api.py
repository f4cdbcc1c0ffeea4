"""The OpenAI wire format as vLLM speaks it: request structs decoded once, errors, response shapes.

Parsing turns a body into a ParsedRequest or ParsedEmbedding (prompts as token ids) or raises
ApiError; nothing past this module touches raw request dicts. Validation follows vLLM's: a body
that is not a JSON object, a field of the wrong type (coerced leniently, as pydantic does), or a
sampling parameter out of range is a 400 BadRequestError; an unknown model is a 404.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from vllm_sim import embeddings, tokens
from vllm_sim.config import SimConfig
from vllm_sim.engine import PdLeg

DEFAULT_MAX_TOKENS = 16
MAX_N = 16384  # vLLM's VLLM_MAX_N_SEQUENCES default


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
    # UNSET tells "stream_options": {} (allowed without stream, as in vLLM) from a given option.
    include_usage: bool | None | msgspec.UnsetType = msgspec.UNSET
    continuous_usage_stats: bool | None | msgspec.UnsetType = msgspec.UNSET

    @property
    def given(self) -> bool:
        return self.include_usage is not msgspec.UNSET or self.continuous_usage_stats is not msgspec.UNSET


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
    n: int | None = 1
    ignore_eos: bool | None = False  # output always runs to max_tokens anyway
    seed: int | None = None
    kv_transfer_params: KvTransferParams | None = None
    user: str | None = None
    # Sampling knobs: they do not change the filler text, but are type- and range-checked as vLLM does.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = 0
    stop: str | list[str] | None = None


class CompletionRequest(_Common, kw_only=True):
    # str | list: msgspec cannot tell list[str] from list[int] in a union, so the list is checked below.
    prompt: str | list[Any] | None = None
    logprobs: int | None = None


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
    logprobs: bool | None = False
    top_logprobs: int | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """vLLM's EmbeddingCompletionRequest (`input`) or EmbeddingChatRequest (`messages`)."""

    model: str | None = None
    input: str | list[Any] | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool | None = False  # chat form: vLLM's default for embeddings
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None
    user: str | None = None


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
    n: int = 1  # choices per prompt


@dataclass(frozen=True, slots=True)
class ParsedEmbedding:
    model: str
    prompts: tuple[tuple[int, ...], ...]
    encoding_format: str
    dimensions: int | None
    normalize: bool


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _decode(body: bytes, kind: type[msgspec.Struct]) -> Any:
    stripped = body.strip(b" \t\r\n")
    if not stripped:
        raise BadRequest("The request body is empty; expected a JSON object.")
    if not stripped.startswith(b"{"):
        try:
            doc = msgspec.json.decode(stripped)
        except msgspec.DecodeError as e:
            raise BadRequest(f"Invalid JSON: {e}") from None
        raise BadRequest(f"The request body must be a JSON object, got {_JSON_TYPES.get(type(doc), 'something else')}.")
    try:
        # strict=False: "5" or 5.0 for an int, 1 or "true" for a bool, as pydantic's lax mode allows.
        return msgspec.json.decode(body, type=kind, strict=False)
    except msgspec.ValidationError as e:
        # msgspec validates while it parses, so a schema error can come before a syntax error later on.
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError as syntax:
            raise BadRequest(f"Invalid JSON: {syntax}") from None
        raise BadRequest(str(e)) from None
    except msgspec.DecodeError as e:
        raise BadRequest(f"Invalid JSON: {e}") from None


def _model(requested: str | None, config: SimConfig) -> str:
    if requested is None or requested == "":
        return config.models[0]
    if requested not in config.servable:
        raise ModelNotFound(f"The model `{requested}` does not exist.")
    return requested


def _completion_prompts(prompt: str | list[Any] | None, name: str = "prompt") -> list[tuple[int, ...]]:
    if prompt is None or prompt == "":
        raise BadRequest("Either prompt or prompt_embeds must be provided and non-empty." if name == "prompt"
                         else f"{name} must be provided and non-empty.")
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise BadRequest(f"{name} must not be an empty list")
    elif all(_is_token_id(t) for t in prompt):
        items = [prompt]
    else:
        items = prompt
    out: list[tuple[int, ...]] = []
    for item in items:
        if isinstance(item, str):
            ids = tuple(tokens.encode(item))
        elif isinstance(item, list) and all(_is_token_id(t) for t in item):  # [] is caught as empty below
            ids = tuple(item)
        else:
            raise BadRequest(f"{name} must be a string, a list of strings, a list of token ids "
                             "or a list of lists of token ids")
        if not ids:
            raise BadRequest(f"{name} must not be empty")
        out.append(ids)
    return out


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value


def _chat_prompt(chat_messages: list[ChatMessage], add_generation_prompt: bool) -> tuple[int, ...]:
    if not chat_messages:
        raise BadRequest("messages must contain at least one message")
    messages: list[tuple[str, str]] = []
    for message in chat_messages:
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
    text = tokens.apply_chat_template(messages, add_generation_prompt)
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


def _check_sampling(request: _Common, max_tokens: int) -> int:
    """vLLM's SamplingParams checks, same messages; returns n."""
    n = 1 if request.n is None else request.n
    if n < 1:
        raise BadRequest(f"n must be at least 1, got {n}.")
    if n > MAX_N:
        raise BadRequest(f"n must be at most {MAX_N}, got {n}. To increase this limit, set the "
                         "VLLM_MAX_N_SEQUENCES environment variable.")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise BadRequest(f"{name} must be in [-2, 2], got {value}.")
    if request.repetition_penalty is not None and not request.repetition_penalty > 0.0:
        raise BadRequest(f"repetition_penalty must be greater than zero, got {request.repetition_penalty}.")
    if request.temperature is not None and request.temperature < 0.0:
        raise BadRequest(f"temperature must be non-negative, got {request.temperature}.")
    if request.top_p is not None and not 0.0 < request.top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {request.top_p}.")
    if request.top_k is not None and request.top_k < -1:
        raise BadRequest(f"top_k must be 0 (disable), or at least 1, got {request.top_k}.")
    if request.min_p is not None and not 0.0 <= request.min_p <= 1.0:
        raise BadRequest(f"min_p must be in [0, 1], got {request.min_p}.")
    min_tokens = request.min_tokens or 0
    if min_tokens < 0:
        raise BadRequest(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if min_tokens > max_tokens:
        raise BadRequest(f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if any(not s for s in stops):
        raise BadRequest("stop cannot contain an empty string.")
    if n > 1 and request.temperature is not None and request.temperature < 1e-5:
        raise BadRequest(f"n must be 1 when using greedy sampling, got {n}.")
    return n


def _check_stream_options(request: _Common) -> None:
    if request.stream_options is not None and request.stream_options.given and not request.stream:
        raise BadRequest("Stream options can only be defined when `stream=True`.")


def parse_completion(body: bytes, config: SimConfig) -> ParsedRequest:
    request: CompletionRequest = _decode(body, CompletionRequest)
    _check_stream_options(request)
    if request.logprobs is not None and request.logprobs < 0 and request.logprobs != -1:
        raise BadRequest("`logprobs` must be a positive value or -1.")
    model = _model(request.model, config)
    prompts = _completion_prompts(request.prompt)
    return _parsed(False, model, prompts, request.max_tokens, request, config)


def parse_chat(body: bytes, config: SimConfig) -> ParsedRequest:
    request: ChatRequest = _decode(body, ChatRequest)
    _check_stream_options(request)
    if request.top_logprobs is not None:
        if request.top_logprobs < 0 and request.top_logprobs != -1:
            raise BadRequest("`top_logprobs` must be a positive value or -1.")
        if request.top_logprobs != 0 and not request.logprobs:
            raise BadRequest("when using `top_logprobs`, `logprobs` must be set to true.")
    model = _model(request.model, config)
    prompts = [_chat_prompt(request.messages, bool(request.add_generation_prompt))]
    limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return _parsed(True, model, prompts, limit, request, config)


def _parsed(chat: bool, model: str, prompts: list[tuple[int, ...]], limit: int | None,
            request: _Common, config: SimConfig) -> ParsedRequest:
    leg = pd_leg(request.kv_transfer_params)
    if leg is not PdLeg.NONE and len(prompts) != 1:
        raise BadRequest("kv_transfer_params: a disaggregated request must have exactly one prompt")
    max_tokens = _max_tokens(limit, prompts, config)
    n = _check_sampling(request, max_tokens)
    if leg is not PdLeg.NONE and n != 1:
        raise BadRequest(f"kv_transfer_params: a disaggregated request must have n=1, got n={n}")
    return ParsedRequest(
        chat=chat,
        model=model,
        prompts=tuple(prompts),
        max_tokens=max_tokens,
        stream=bool(request.stream),
        include_usage=bool(request.stream and request.stream_options and request.stream_options.include_usage),
        seed=request.seed,
        pd_leg=leg,
        n=n,
    )


def parse_embedding(body: bytes, config: SimConfig) -> ParsedEmbedding:
    request: EmbeddingRequest = _decode(body, EmbeddingRequest)
    if request.messages is not None and request.input is not None:
        raise BadRequest("give either input or messages, not both")
    model = _model(request.model, config)
    if request.messages is not None:
        prompts = [_chat_prompt(request.messages, bool(request.add_generation_prompt))]
    else:
        prompts = _completion_prompts(request.input, name="input")
    for prompt in prompts:
        if len(prompt) > config.max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {config.max_model_len} tokens. However, you "
                f"requested {len(prompt)} tokens in the input for embedding generation. Please reduce "
                "the length of the input."
            )
    dimensions = request.dimensions
    if dimensions is not None:
        if dimensions < 1:
            raise BadRequest("Dimensions must be greater than 0")
        if dimensions > config.embedding_dim:
            raise BadRequest(f"Model \"{model}\" produces {config.embedding_dim}-dimensional embeddings; "
                             f"dimensions must be between 1 and {config.embedding_dim}, got {dimensions}.")
    return ParsedEmbedding(
        model=model,
        prompts=tuple(prompts),
        encoding_format=request.encoding_format,
        dimensions=dimensions,
        normalize=request.normalize is not False,
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
    """vLLM's /v1/models: the served model names, then each LoRA adapter with its base as `parent`."""
    models = [
        {"id": m, "object": "model", "created": created, "owned_by": "vllm", "root": m,
         "parent": None, "max_model_len": config.max_model_len, "permission": []}
        for m in config.models
    ]
    adapters = [
        {"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": path,
         "parent": config.served_model, "max_model_len": None, "permission": []}
        for name, path in config.lora_modules
    ]
    return {"object": "list", "data": models + adapters}


def embedding_response(parsed: ParsedEmbedding, config: SimConfig, response_id: str, created: int) -> dict[str, Any]:
    """vLLM's EmbeddingResponse; its usage is a UsageInfo with no completion and no details."""
    data = []
    for i, prompt in enumerate(parsed.prompts):
        vector = embeddings.embed(prompt, config.embedding_dim, parsed.dimensions, parsed.normalize)
        embedding: list[float] | str = (embeddings.encode_base64(vector) if parsed.encoding_format == "base64"
                                         else vector)
        data.append({"index": i, "object": "embedding", "embedding": embedding})
    prompt_tokens = sum(len(p) for p in parsed.prompts)
    return {"id": response_id, "object": "list", "created": created, "model": parsed.model,
            "data": data, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                                    "completion_tokens": 0, "prompt_tokens_details": None}}
