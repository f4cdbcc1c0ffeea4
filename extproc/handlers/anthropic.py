"""anthropic-parser: an Anthropic Messages request (`/v1/messages`, which vLLM serves too) into the
InferenceRequest scheduling reads. Its responses' usage is read by extproc.handlers.usage.ANTHROPIC.

The prompt text is the system prompt then each message, in the same `<|role|>` form as a chat
request's, so the prefix index sees a conversation grow the same way in both APIs. Content is a
string or a list of blocks: a block's `text` (`thinking` for thinking blocks) counts, any other block
(an image, a tool call or result) counts as its JSON.
"""

from __future__ import annotations

from typing import Any

import msgspec

from extproc.handlers.request_body import (
    decode_object,
    note_media,
    read_model,
    read_options,
)
from pickers.framework.errors import BAD_REQUEST, RequestError
from pickers.framework.request import InferenceRequest, MediaPart


def parse_messages(req: InferenceRequest, raw: bytes | bytearray, required_field: str) -> None:
    """Fill `req` from a Messages body. Raises RequestError(400) with a message a person understands."""
    body = decode_object(raw, req.api, required_field)
    model = read_model(body)
    messages = body.get("messages")
    if messages is None:
        raise RequestError(BAD_REQUEST, "field 'messages' is required for messages")
    if not isinstance(messages, list):
        raise RequestError(BAD_REQUEST, "field 'messages' must be a list")
    if not messages:
        raise RequestError(BAD_REQUEST, "field 'messages' must have at least one message")
    parts: list[str] = []
    system = body.get("system")
    if system is not None and system != "":
        parts.append(f"<|system|>\n{_content(system, 'system', req)}\n")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(BAD_REQUEST, f"messages[{i}] must be an object")
        role = msg.get("role", "")
        if not isinstance(role, str):
            raise RequestError(BAD_REQUEST, f"messages[{i}].role must be a string")
        parts.append(f"<|{role}|>\n{_content(msg.get('content'), f'messages[{i}].content', req)}\n")
    req.body = body
    req.model = model
    req.prompt_text = "".join(parts)
    read_options(req, body, body.get("max_tokens"), "max_tokens")


def _content(content: Any, name: str, req: InferenceRequest) -> str:
    """The text form of content blocks; an image block (also one inside a tool_result) is noted on `req`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(BAD_REQUEST, f"field '{name}' must be a string or a list of content blocks")
    out: list[str] = []
    for i, block in enumerate(content):
        if not isinstance(block, dict):
            raise RequestError(BAD_REQUEST, f"{name}[{i}] must be a content block (an object with a 'type')")
        kind = block.get("type")
        text = block.get("thinking") if kind == "thinking" else block.get("text") if kind == "text" else None
        if isinstance(text, str):
            out.append(text)
            continue
        encoded = msgspec.json.encode(block).decode()
        if kind == "image":
            _image(req, block.get("source"), len(encoded))
        elif kind == "tool_result" and isinstance(inner := block.get("content"), list):
            for b in inner:
                if isinstance(b, dict) and b.get("type") == "image":
                    _image(req, b.get("source"), None)
        out.append(encoded)
    return "".join(out)


def _image(req: InferenceRequest, source: Any, text_chars: int | None) -> None:
    """An image block: the request is multimodal; an image with a URL or base64 data is a media part
    (llm-d's estimate weighs no other). Inside a tool_result (`text_chars` None) the block's JSON is not
    measured on its own: its URL or data, the bulk of it, stands for it."""
    req.multimodal = True
    if not isinstance(source, dict):
        return
    url, data = source.get("url"), source.get("data")
    if isinstance(url, str) and url:
        part = MediaPart("image", url, text_chars=len(url) if text_chars is None else text_chars)
    elif isinstance(data, str) and data and source.get("type") != "url":
        media_type = source.get("media_type")
        part = MediaPart("image", data, inline=True, media_type=media_type if isinstance(media_type, str) else "",
                         text_chars=len(data) if text_chars is None else text_chars)  # fmt: skip
    else:
        return
    note_media(req, part)
