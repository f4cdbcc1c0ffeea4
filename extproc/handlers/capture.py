"""What the audit trail keeps of a response body when `--audit-response` asks (extproc.observability.audit):
its SHA-256, fed chunk by chunk as the body passes, or its first bytes, kept up to a limit. Nothing
else of the body is held; with `--audit-response none` (the default) no capture exists."""

from __future__ import annotations

import hashlib


class ResponseCapture:
    __slots__ = ("mode", "limit", "_hash", "_head", "_kept")

    def __init__(self, mode: str, limit: int) -> None:
        self.mode = mode  # "hash" or "excerpt"
        self.limit = limit  # an excerpt's bytes kept (the excerpt's characters plus the redaction margin)
        self._hash = hashlib.sha256() if mode == "hash" else None
        self._head: list[bytes] = []
        self._kept = 0

    def feed(self, chunk: bytes) -> None:
        if self._hash is not None:
            self._hash.update(chunk)
        elif self._kept < self.limit and chunk:
            part = chunk[: self.limit - self._kept]
            self._head.append(part)
            self._kept += len(part)

    def result(self) -> str:
        """The hex digest, or the head as text (invalid UTF-8 replaced)."""
        if self._hash is not None:
            return self._hash.hexdigest()
        return b"".join(self._head).decode("utf-8", "replace")
