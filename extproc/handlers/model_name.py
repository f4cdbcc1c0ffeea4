"""The model name in the bodies of a rewritten request: the request body with the target model, and
the response bytes with the name the client asked for written back as they stream past.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec


def rewrite_body(body: Mapping[str, Any], target: str) -> bytes:
    """The request body with `model` set to `target`; the one place a request body is re-encoded."""
    return msgspec.json.encode({**body, "model": target})


_WS = b" \t\r\n"
_MAX_WS = 8  # whitespace allowed around the colon of `"model": "..."`


class ModelNameRestorer:
    """Replaces `"model":"<target>"` with `"model":"<original>"` in response bytes (SSE or JSON).

    A chunk that ends inside a possible match keeps that tail back until the next chunk (or the end),
    so a name split across chunks is still replaced; nothing else is held back, so streamed tokens are
    not delayed.
    """

    def __init__(self, original: str, target: str) -> None:
        self.original_json = msgspec.json.encode(original)
        self.target_json = msgspec.json.encode(target)
        ws = b"[ \\t\\r\\n]{0,%d}" % _MAX_WS
        self._pattern = re.compile(b'("model"' + ws + b":" + ws + b")" + re.escape(self.target_json))
        self._template = b"\\1" + self.original_json.replace(b"\\", b"\\\\")
        # vLLM writes `"model":"<name>"` with no spaces: a plain bytes replace handles it, the regex the rest
        self._compact = (b'"model":' + self.target_json, b'"model":' + self.original_json)
        self._longest = len(b'"model"') + 2 * _MAX_WS + 1 + len(self.target_json)
        self._carry = b""

    @property
    def pending(self) -> bytes:
        return self._carry

    def feed(self, chunk: bytes, end: bool) -> bytes:
        data = self._carry + chunk if self._carry else chunk
        self._carry = b""
        if self.target_json in data:
            data = data.replace(*self._compact)
            if self.target_json in data:
                data = self._pattern.sub(self._template, data)
        if end or not data:
            return data
        cut = self._partial_start(data)
        if cut < 0:
            return data
        self._carry = data[cut:]
        return data[:cut]

    def flush(self) -> bytes:
        data, self._carry = self._carry, b""
        return data

    def _partial_start(self, data: bytes) -> int:
        """Where the earliest unfinished match starts in the tail of `data`, or -1."""
        n = len(data)
        lo = max(0, n - self._longest + 1)
        i = data.find(b'"model"', lo)  # a key followed by an unfinished value
        while i >= 0:
            if self._could_start(data, i):
                return i
            i = data.find(b'"model"', i + 1)
        i = data.find(b'"', max(lo, n - 6))  # a key cut short at the very end
        while i >= 0:
            if b'"model"'.startswith(data[i:]):
                return i
            i = data.find(b'"', i + 1)
        return -1

    def _could_start(self, data: bytes, i: int) -> bool:
        key = b'"model"'
        rest = data[i:]
        if len(rest) <= len(key):
            return key.startswith(rest)
        if not rest.startswith(key):
            return False
        j = len(key)
        for expect_colon in (True, False):
            spaces = 0
            while j < len(rest) and rest[j] in _WS and spaces < _MAX_WS:
                j += 1
                spaces += 1
            if j == len(rest):
                return True
            if expect_colon:
                if rest[j] != ord(":"):
                    return False
                j += 1
                if j == len(rest):
                    return True
        tail = rest[j:]
        return len(tail) < len(self.target_json) and self.target_json.startswith(tail)

