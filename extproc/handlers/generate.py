"""vllmhttp-parser and sglanghttp-parser: the generate APIs that take a prompt the client has already
tokenized, vLLM's `/inference/v1/generate` (`token_ids`) and SGLang's native `/generate` (`input_ids`),
read as llm-d reads them.

The token ids are kept as `prompt_token_ids` (a precise prefix scorer uses them as they are), and the
prompt text is 4 ASCII characters per token (the base64 of its low 3 bytes: vocabularies stay below
2**24 ids), so the approximate prefix index, which hashes blocks of UTF-8 bytes, cuts them on token
boundaries. vLLM's responses report usage as OpenAI's do;
SGLang's in `meta_info` (extproc.handlers.usage.SGLANG).
"""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any

from extproc.handlers.request_body import decode_object, read_model, read_options
from pickers.framework.errors import BAD_REQUEST, RequestError
from pickers.framework.request import CHARS_PER_TOKEN, InferenceRequest, mm_hashes

_TOKEN = "I"  # an unsigned 32-bit token id
assert array(_TOKEN).itemsize == 4 and CHARS_PER_TOKEN == 4  # 3 bytes of base64 are 4 characters


def parse_vllm_generate(req: InferenceRequest, raw: bytes | bytearray, required_field: str) -> None:
    """vLLM's generate body: `token_ids` (required), `model`, `sampling_params.max_tokens`, `stream`,
    `cache_salt`, and the multimodal items' hashes in `features.mm_hashes` (the encoder-cache index's
    keys). Raises RequestError(400) with a message a person understands."""
    body = decode_object(raw, req.api, required_field)
    model = read_model(body)
    _take_tokens(req, body, "token_ids")
    req.body = body
    req.model = model
    features = body.get("features")
    if isinstance(features, dict):
        req.media_hashes = mm_hashes(features.get("mm_hashes"))
    params = body.get("sampling_params")
    if params is not None and not isinstance(params, dict):
        raise RequestError(BAD_REQUEST, "field 'sampling_params' must be an object")
    read_options(req, body, params.get("max_tokens") if params else None, "sampling_params.max_tokens")


def parse_sglang_generate(req: InferenceRequest, raw: bytes | bytearray, required_field: str) -> None:
    """SGLang's generate body: `input_ids` (required: like llm-d's, this parser reads pre-tokenized
    prompts only, one per request), `extra_key` (the cache salt), `sampling_params.max_new_tokens`,
    `stream`. The body names no model. Raises RequestError(400) with a message a person understands."""
    body = decode_object(raw, req.api, required_field, model=False)
    if body.get("input_ids") is None:
        hint = " (a 'text' prompt is not read: send input_ids, or use SGLang's OpenAI API)" if "text" in body else ""
        raise RequestError(BAD_REQUEST, f"field 'input_ids' is required for generate{hint}")
    _take_tokens(req, body, "input_ids")
    salt = body.get("extra_key")
    if salt is not None and not isinstance(salt, str):
        raise RequestError(BAD_REQUEST, "field 'extra_key' must be a string (one key per request)")
    req.body = body
    params = body.get("sampling_params")
    cap = params.get("max_new_tokens") if isinstance(params, dict) else None
    # as llm-d: a cap that is not a non-negative integer is left for SGLang to refuse
    req.max_tokens = cap if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0 else None
    read_options(req, body, None, "")
    req.cache_salt = salt or ""  # SGLang's extra_key, not vLLM's cache_salt


def _take_tokens(req: InferenceRequest, body: dict[str, Any], name: str) -> None:
    ids = _token_ids(body.get(name), name)
    req.prompt_token_ids = ids
    req.prompt_text = _packed(ids)


def _packed(ids: array[int]) -> str:
    """Each id as 4 ASCII characters, all in C: its 3 low bytes, then base64 (3 bytes -> 4 characters)."""
    raw = ids.tobytes()
    first = 0 if sys.byteorder == "little" else 1  # where the 3 low bytes of each 4 start
    low = bytearray(len(ids) * 3)
    low[0::3] = raw[first::4]
    low[1::3] = raw[first + 1 :: 4]
    low[2::3] = raw[first + 2 :: 4]
    return base64.b64encode(low).decode("ascii")


def _token_ids(value: Any, name: str) -> array[int]:
    if value is None:
        raise RequestError(BAD_REQUEST, f"field '{name}' is required for generate")
    if not isinstance(value, list):
        raise RequestError(BAD_REQUEST, f"field '{name}' must be a list of token ids, got {_kind(value)}")
    if not value:
        raise RequestError(BAD_REQUEST, f"field '{name}' must not be empty")
    try:
        return array(_TOKEN, value)  # checks every id in C: an integer from 0 to 2**32 - 1
    except (TypeError, OverflowError):
        batch = " (one prompt per request: batches are not supported)" if isinstance(value[0], list) else ""
        raise RequestError(BAD_REQUEST, f"field '{name}' must be a list of token ids, integers from 0 to 4294967295{batch}") from None


def _kind(value: Any) -> str:
    return {dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
