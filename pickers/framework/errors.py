"""Errors a user can act on: request errors map to one HTTP status each (one table), config
errors name the file and field."""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(Exception):
    """A configuration file or flag is wrong. Says where and what was expected."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        where = ": ".join(p for p in (source, field) if p)
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(slots=True, frozen=True)
class ErrorKind:
    code: str  # the <Code> in `inference error: <Code> - <message>`
    status: int
    dropped_reason: str | None = None  # llm-d's x-llm-d-request-dropped-reason


# The one table of request errors (statuses as in GIE's endpoint-picker protocol).
BAD_REQUEST = ErrorKind("BadRequest", 400)
REQUEST_TIMEOUT = ErrorKind("RequestTimeout", 408)
PAYLOAD_TOO_LARGE = ErrorKind("PayloadTooLarge", 413)
UNSUPPORTED_MEDIA_TYPE = ErrorKind("UnsupportedMediaType", 415)
HEADERS_TOO_LARGE = ErrorKind("RequestHeaderFieldsTooLarge", 431)
NO_ENDPOINTS = ErrorKind("ServiceUnavailable", 503, "rejected-no-endpoints")
ALL_FILTERED = ErrorKind("InferencePoolResourceExhausted", 429, "rejected-all-filtered")
SATURATED = ErrorKind("InferencePoolResourceExhausted", 429, "rejected-saturated")
TTL_EXPIRED = ErrorKind("InferencePoolResourceExhausted", 429, "rejected-ttl-expired")
PROTOCOL = ErrorKind("Internal", 500)


class RequestError(Exception):
    """A request the EPP refuses; becomes an ImmediateResponse."""

    def __init__(self, kind: ErrorKind, message: str):
        self.kind = kind
        self.message = message
        super().__init__(f"{kind.code} - {message}")

    @property
    def body(self) -> bytes:
        return f"inference error: {self.kind.code} - {self.message}".encode()
