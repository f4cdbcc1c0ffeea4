"""openai-parser: an OpenAI-style request body into the InferenceRequest scheduling reads, decoded once
here, and the checks every JSON body parser shares (an object, a model, `stream`, a token cap).

Which API a path is, and which parser reads it, is extproc.handlers.parsers' (docs/configuration.md).
"""

from __future__ import annotations

from typing import Any

import msgspec

from pickers.framework.errors import BAD_REQUEST, RequestError
from pickers.framework.request import InferenceRequest, MediaPart

_json_decoder = msgspec.json.Decoder()

# No served model is named by more than a file path (vLLM names a model by its path unless
# --served-model-name says otherwise; Linux's PATH_MAX is 4,096): a longer name is refused.
MAX_MODEL_CHARS = 4096


def empty_body_error(api: str | None, required_field: str, *, model: bool = True) -> RequestError:
    needs = f"'model' and '{required_field}'" if model else f"'{required_field}'"
    return RequestError(BAD_REQUEST, f"request body is empty: {api} needs a JSON object with {needs}")


def decode_object(raw: bytes | bytearray, api: str | None, required_field: str, *, model: bool = True) -> dict[str, Any]:
    """The body as a JSON object, or RequestError(400) saying what is wrong with it."""
    if not raw or raw.isspace():  # isspace stops at the first other byte: no copy of a big body
        raise empty_body_error(api, required_field, model=model)
    try:
        body = _json_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise RequestError(BAD_REQUEST, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(BAD_REQUEST, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError(BAD_REQUEST, "request body must be a JSON object")
    return body


def read_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None or model == "":
        raise RequestError(BAD_REQUEST, "model not found in request body")
    if not isinstance(model, str):
        raise RequestError(BAD_REQUEST, "field 'model' must be a string")
    if len(model) > MAX_MODEL_CHARS:
        raise RequestError(BAD_REQUEST, f"field 'model' is {len(model)} characters long; at most {MAX_MODEL_CHARS} are accepted")
    return model


def read_options(req: InferenceRequest, body: dict[str, Any], cap: Any, cap_name: str) -> None:
    """`stream`, the output token cap (`cap`, read from the field `cap_name`) and `cache_salt`."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(BAD_REQUEST, "field 'stream' must be a boolean")
    req.stream = stream
    if cap is not None:
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
            raise RequestError(BAD_REQUEST, f"field '{cap_name}' must be a non-negative integer")
        req.max_tokens = cap
    if "cache_salt" in body:
        salt = body["cache_salt"]
        req.cache_salt = salt if isinstance(salt, str) else ""


def parse_body(req: InferenceRequest, raw: bytes | bytearray, required_field: str) -> None:
    """Fill `req` from the JSON body. Raises RequestError(400) with a message a person understands."""
    body = decode_object(raw, req.api, required_field)
    model = read_model(body)
    if required_field not in body:
        raise RequestError(BAD_REQUEST, f"field '{required_field}' is required for {req.api}")
    req.body = body
    req.model = model
    req.prompt_text = _prompt_text(req, body[required_field], required_field)
    read_options(req, body, body.get("max_completion_tokens", body.get("max_tokens")), "max_tokens")
    opts = body.get("stream_options")
    if isinstance(opts, dict):
        req.include_usage = bool(opts.get("include_usage", False))


# APIs whose required field holds the prompt itself: empty ("" or []) it asks the model for nothing,
# which vLLM refuses with 400 too (the conversations API may create an empty conversation).
_NOT_EMPTY = frozenset({"chat", "completions", "responses", "embeddings", "images"})


# Chat content parts an encoder works on (llm-d's: its token estimate and its sidecar's encoder legs).
MULTIMODAL_PARTS = frozenset({"image_url", "video_url", "input_audio", "audio_url"})


def _prompt_text(req: InferenceRequest, value: Any, name: str) -> str:
    api = req.api
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
            parts.append(f"<|{role}|>\n{content_text(msg.get('content'), req)}\n")
        return "".join(parts)
    if isinstance(value, str):
        return value
    if api == "images":  # the image's description: one string
        raise RequestError(BAD_REQUEST, f"field '{name}' must be a string")
    if isinstance(value, list):
        if api in ("completions", "embeddings"):  # a batch: each entry is a prompt of its own
            for i, v in enumerate(value):
                if v == "" or v == []:
                    raise RequestError(BAD_REQUEST, f"{name}[{i}] must not be empty")
        # list of strings, token ids, or structured items: hash their text form in order
        return "".join(v if isinstance(v, str) else content_text(v) for v in value)
    if value is None:
        raise RequestError(BAD_REQUEST, f"field '{name}' must not be null")
    return str(value)


def note_media(req: InferenceRequest, part: MediaPart) -> None:
    """A media part met while building the prompt text: the request is multimodal, and the part is kept
    for a token-producer's estimate."""
    req.multimodal = True
    if req.media is None:
        req.media = [part]
    else:
        req.media.append(part)


def chat_media(part: dict[str, Any], text_chars: int) -> MediaPart:
    """An OpenAI chat content part (`image_url`, `video_url`, `input_audio`, `audio_url`) as a MediaPart."""
    kind = part.get("type")
    if kind == "input_audio" or kind == "audio_url":
        audio = part.get("input_audio")  # llm-d reads input_audio's data and format, for audio_url too
        data = fmt = ""
        if isinstance(audio, dict):
            d, f = audio.get("data"), audio.get("format")
            data, fmt = (d if isinstance(d, str) else ""), (f if isinstance(f, str) else "")
        if kind == "audio_url":  # named by its URL (the encoder-cache index's key)
            ref = part.get("audio_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            return MediaPart("audio", url if isinstance(url, str) else "", size=len(data) + len(fmt), text_chars=text_chars)
        return MediaPart("audio", data, inline=True, media_type=fmt, size=len(data) + len(fmt), text_chars=text_chars)
    ref = part.get(kind)  # type: ignore[arg-type]
    url = ref.get("url") if isinstance(ref, dict) else ref
    return MediaPart("image" if kind == "image_url" else "video", url if isinstance(url, str) else "", text_chars=text_chars)


def content_text(content: Any, req: InferenceRequest | None = None) -> str:
    """The text form of message content; with `req`, a media part is noted on it (`note_media`)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)
                    continue
                encoded = msgspec.json.encode(part).decode()
                if req is not None and part.get("type") in MULTIMODAL_PARTS:
                    note_media(req, chat_media(part, len(encoded)))
                out.append(encoded)
            else:
                out.append(str(part))
        return "".join(out)
    if isinstance(content, dict):
        encoded = msgspec.json.encode(content).decode()
        if req is not None and content.get("type") in MULTIMODAL_PARTS:
            note_media(req, chat_media(content, len(encoded)))
        return encoded
    return str(content)
