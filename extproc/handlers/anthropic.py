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

from extproc.handlers.request_body import decode_object, read_model, read_options
from pickers.framework.errors import BAD_REQUEST, RequestError
from pickers.framework.request import InferenceRequest


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
    """The text form of content blocks; an image block (also one inside a tool_result) sets `req.multimodal`."""
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
        if kind == "image" or (kind == "tool_result" and _has_image(block.get("content"))):
            req.multimodal = True
        out.append(msgspec.json.encode(block).decode())
    return "".join(out)


def _has_image(content: Any) -> bool:
    return isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "image" for b in content)
