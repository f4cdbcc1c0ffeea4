"""Parse an OpenAI-style request body into the InferenceRequest scheduling reads, decoded once here.

The API is chosen by path suffix, as the Gateway API Inference Extension's endpoint-picker protocol
does it (docs/configuration.md). Paths we do not know pass through unparsed.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pickers.framework.errors import BAD_REQUEST, RequestError
from pickers.framework.request import InferenceRequest

# path suffix -> (api name, field that must be present)
_APIS: tuple[tuple[str, str, str], ...] = (
    ("/chat/completions", "chat", "messages"),
    ("/completions", "completions", "prompt"),
    ("/responses", "responses", "input"),
    ("/embeddings", "embeddings", "input"),
    ("/conversations", "conversations", "items"),
)

_json_decoder = msgspec.json.Decoder()

# No served model is named by more than a file path (vLLM names a model by its path unless
# --served-model-name says otherwise; Linux's PATH_MAX is 4,096): a longer name is refused.
MAX_MODEL_CHARS = 4096


def api_for_path(path: str) -> tuple[str, str] | None:
    """(api name, required field) for an OpenAI path, else None. Query strings are ignored."""
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, api, required in _APIS:
        if path.endswith(suffix):
            return api, required
    return None


def empty_body_error(api: str | None, required_field: str) -> RequestError:
    return RequestError(BAD_REQUEST, f"request body is empty: {api} needs a JSON object with 'model' and '{required_field}'")


def parse_body(req: InferenceRequest, raw: bytes | bytearray, required_field: str) -> None:
    """Fill `req` from the JSON body. Raises RequestError(400) with a message a person understands."""
    if not raw or raw.isspace():  # isspace stops at the first other byte: no copy of a big body
        raise empty_body_error(req.api, required_field)
    try:
        body = _json_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise RequestError(BAD_REQUEST, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(BAD_REQUEST, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError(BAD_REQUEST, "request body must be a JSON object")
    model = body.get("model")
    if model is None or model == "":
        raise RequestError(BAD_REQUEST, "model not found in request body")
    if not isinstance(model, str):
        raise RequestError(BAD_REQUEST, "field 'model' must be a string")
    if len(model) > MAX_MODEL_CHARS:
        raise RequestError(BAD_REQUEST, f"field 'model' is {len(model)} characters long; at most {MAX_MODEL_CHARS} are accepted")
    if required_field not in body:
        raise RequestError(BAD_REQUEST, f"field '{required_field}' is required for {req.api}")
    req.body = body
    req.model = model
    req.prompt_text = _prompt_text(req.api, body[required_field], required_field)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(BAD_REQUEST, "field 'stream' must be a boolean")
    req.stream = stream
    opts = body.get("stream_options")
    if isinstance(opts, dict):
        req.include_usage = bool(opts.get("include_usage", False))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise RequestError(BAD_REQUEST, "field 'max_tokens' must be a non-negative integer")
        req.max_tokens = max_tokens


# APIs whose required field holds the prompt itself: empty ("" or []) it asks the model for nothing,
# which vLLM refuses with 400 too (the conversations API may create an empty conversation).
_NOT_EMPTY = frozenset({"chat", "completions", "responses", "embeddings"})


def _prompt_text(api: str | None, value: Any, name: str) -> str:
    if api in _NOT_EMPTY and (value == "" or value == []):
        raise RequestError(BAD_REQUEST, f"field '{name}' must not be empty")
    if api == "chat":
        if not isinstance(value, list):
            raise RequestError(BAD_REQUEST, "field 'messages' must be a list")
        parts: list[str] = []
        for i, msg in enumerate(value):
            if not isinstance(msg, dict):
                raise RequestError(BAD_REQUEST, f"messages[{i}] must be an object")
            role = msg.get("role", "")
            parts.append(f"<|{role}|>\n{_content_text(msg.get('content'))}\n")
        return "".join(parts)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if api in ("completions", "embeddings"):  # a batch: each entry is a prompt of its own
            for i, v in enumerate(value):
                if v == "" or v == []:
                    raise RequestError(BAD_REQUEST, f"{name}[{i}] must not be empty")
        # list of strings, token ids, or structured items: hash their text form in order
        return "".join(v if isinstance(v, str) else _content_text(v) for v in value)
    if value is None:
        raise RequestError(BAD_REQUEST, f"field '{name}' must not be null")
    return str(value)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                out.append(text if isinstance(text, str) else msgspec.json.encode(part).decode())
            else:
                out.append(str(part))
        return "".join(out)
    if isinstance(content, dict):
        return msgspec.json.encode(content).decode()
    return str(content)
