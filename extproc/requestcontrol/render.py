"""The token-producer's `vllm` backend: the model server tokenizes the request for us, through vLLM's
render endpoints (`vllm serve` and the GPU-less `vllm launch render` serve them).

POST {url}/v1/completions/render answers a list of GenerateRequest (one per prompt), POST
{url}/v1/chat/completions/render one; each carries the prompt's `token_ids`, and a chat's its multimodal
items' hashes (`features.mm_hashes`, what vLLM's encoder cache keys them by). The body is the client's,
re-encoded once with `model` set to the producer's `modelName` (the render server knows the base
model by that name). Each call has its own timeout; any failure raises RenderError, which the
producer counts and answers with the estimate.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from pickers.framework.request import InferenceRequest, mm_hashes
from pickers.plugins.producer.tokens import Rendered

COMPLETIONS_RENDER = "/v1/completions/render"
CHAT_RENDER = "/v1/chat/completions/render"
_ERROR_SNIPPET = 512  # bytes of an error body kept in the message


class RenderError(Exception):
    """The render endpoint did not give token ids (refused, unreachable, or answered something else)."""


class _Rendered(msgspec.Struct):
    token_ids: list[int]
    features: msgspec.Raw = msgspec.Raw(b"null")  # read only for its mm_hashes, and only for a chat


class _Features(msgspec.Struct):
    mm_hashes: Any = None  # the rest (placeholders, kwargs_data) is skipped, never decoded


_one = msgspec.json.Decoder(_Rendered)
_many = msgspec.json.Decoder(list[_Rendered])
_features = msgspec.json.Decoder(_Features | None)


class VllmRenderClient:
    """One keep-alive HTTP/1.1 connection pool to the render server, opened on first use."""

    def __init__(self, url: str, *, max_connections: int = 16) -> None:
        self.url = url.rstrip("/")
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self.calls = 0

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit_per_host=self.max_connections, keepalive_timeout=90.0),
                json_serialize=lambda o: msgspec.json.encode(o).decode(),
            )
        return self._session

    async def render(self, request: InferenceRequest, model: str, timeout: float) -> Rendered:
        chat = request.api == "chat"
        body: dict[str, Any] = {**request.body, "model": model}
        payload = msgspec.json.encode(body)
        self.calls += 1
        try:
            async with self._client().post(
                self.url + (CHAT_RENDER if chat else COMPLETIONS_RENDER),
                data=payload,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                data = await resp.read()
                if resp.status != 200:
                    snippet = data[:_ERROR_SNIPPET].decode("utf-8", "replace")
                    raise RenderError(f"render answered {resp.status}: {snippet}")
        except TimeoutError:  # aiohttp's own (before OSError: TimeoutError is one)
            raise TimeoutError(f"no render answer within {timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise RenderError(f"render call failed: {e}") from None
        try:
            if chat:
                one = _one.decode(data)
                return Rendered(one.token_ids, _media_hashes(one.features))
            rendered = _many.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise RenderError(f"render answered something else than token ids: {e}") from None
        if not rendered:
            raise RenderError("render answered no prompt")
        return Rendered(rendered[0].token_ids if len(rendered) == 1 else [t for r in rendered for t in r.token_ids])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _media_hashes(raw: msgspec.Raw) -> dict[str, list[str]] | None:
    """A chat's `features.mm_hashes` ({} when it has no features); None when they do not parse, so the
    tokens still count and the items are hashed from the request as sent."""
    try:
        features = _features.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return mm_hashes(features.mm_hashes if features is not None else None)
