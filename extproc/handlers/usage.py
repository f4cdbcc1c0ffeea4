"""Read token `usage` from model-server responses as they stream past.

SSE bodies are scanned line by line for `data:` lines that carry a non-null `usage`
(needs `stream_options.include_usage`); JSON bodies are decoded once at the end. Bytes are never
changed here: the caller always passes them on.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class _WithUsage(msgspec.Struct):
    usage: Usage | None = None


_decoder = msgspec.json.Decoder(_WithUsage)


@dataclass(slots=True)
class UsageReader:
    """Feed response chunks; `usage` is set once seen. Malformed bodies just yield no usage."""

    streaming: bool
    usage: Usage | None = None
    chunks_seen: int = 0
    done: bool = False  # an SSE `data: [DONE]` went past: the reply is complete even if the stream is cut now
    _pending: bytes = b""
    _json_parts: list[bytes] | None = None
    _json_size: int = 0

    def feed(self, chunk: bytes, end: bool) -> None:
        if chunk:
            self.chunks_seen += 1
        if self.streaming:
            self._feed_sse(chunk, end)
        else:
            self._feed_json(chunk, end)

    def _feed_sse(self, chunk: bytes, end: bool) -> None:
        data = self._pending + chunk if self._pending else chunk
        if b"data: [DONE]" in data:
            self.done = True
        if b'"usage"' not in data:
            # keep only a tail long enough to hold a split `"usage"` marker and its line start
            cut = data.rfind(b"\n")
            self._pending = data[cut + 1 :] if cut >= 0 else data[-4096:]
            return
        lines = data.split(b"\n")
        self._pending = b"" if end else lines.pop()
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                self._take(line[5:].strip())

    def _feed_json(self, chunk: bytes, end: bool) -> None:
        if self._json_parts is None:
            self._json_parts = []
        if chunk and self._json_size <= MAX_JSON_BODY:
            self._json_parts.append(chunk)
            self._json_size += len(chunk)
        if end and self._json_size <= MAX_JSON_BODY:
            self._take(b"".join(self._json_parts))
            self._json_parts = None

    def _take(self, payload: bytes) -> None:
        try:
            parsed = _decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if parsed.usage is not None:
            self.usage = parsed.usage
