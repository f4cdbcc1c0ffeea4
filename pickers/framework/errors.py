"""Errors a user can act on: request errors map to one HTTP status each (one table), config
errors name the file and field and repeat at most a short piece of the value they refuse."""

from __future__ import annotations

from dataclasses import dataclass

ECHO_LIMIT = 100  # characters of a refused value an error message repeats
_FIELD_LIMIT = 200  # a field path holds user-written keys, which can be long
_MESSAGE_LIMIT = 4_000  # a net; the longest real message lists the known plugin types (~2,300 characters)


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)` for an error message, cut to `limit` characters without ever building the whole
    repr: a value from a YAML alias bomb prints as gigabytes, and a long list as megabytes."""
    text = _bounded_repr(value, limit, depth=3)
    return _clip(text, limit)


def _bounded_repr(value: object, limit: int, depth: int) -> str:
    if isinstance(value, str):
        return repr(value[: limit + 1])
    if isinstance(value, (list, tuple, dict)):
        if isinstance(value, dict):
            opening, closing = "{", "}"
        else:
            opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")")
        if not value:
            return repr(value)
        if depth == 0:
            return f"{opening}...{closing}"
        parts: list[str] = []
        size = 0
        items = value.items() if isinstance(value, dict) else value
        for item in items:
            if size > limit:
                parts.append("...")
                break
            if isinstance(value, dict):
                k, v = item
                part = f"{_bounded_repr(k, limit, depth - 1)}: {_bounded_repr(v, limit, depth - 1)}"
            else:
                part = _bounded_repr(item, limit, depth - 1)
            parts.append(part)
            size += len(part) + 2
        return opening + ", ".join(parts) + closing
    try:
        return repr(value)
    except Exception:  # a repr that raises must not replace the error being reported
        return f"<{type(value).__name__}>"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConfigError(Exception):
    """A configuration file or flag is wrong. Says where and what was expected."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = _clip(field, _FIELD_LIMIT) if field else field
        message = _clip(message, _MESSAGE_LIMIT)  # a net: values in messages go through shown()
        where = ": ".join(p for p in (source, self.field) if p)
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
PROTOCOL = ErrorKind("Internal", 500)
# Flow control's outcomes (llm-d's admission mapping): 429 while the pool has capacity but is
# contended, 503 while it has none. A full queue is SATURATED (429, rejected-saturated).
TTL_EXPIRED = ErrorKind("InferencePoolResourceExhausted", 429, "rejected-ttl-expired")
SHUTTING_DOWN = ErrorKind("ServiceUnavailable", 503, "rejected-shutting-down")
EVICTED = ErrorKind("InferencePoolResourceExhausted", 429, "evicted")  # in flight, ended for a higher priority
# An admission plugin refused the request (latency-slo-admitter): llm-d answers 500 (its Internal code)
NOT_ADMITTED = ErrorKind("Internal", 500)
# Guardrails (pickers.plugins.admission, docs/guardrails.md): a request outside the limits its objective
# or model has (too long a prompt, too many max_tokens) is 400; one naming a model, adapter or path it
# may not use is 403; a prompt matching a content rule is 400 or 403, as the rule says.
LIMIT_EXCEEDED = ErrorKind("BadRequest", 400, "rejected-request-limits")
NOT_ALLOWED = ErrorKind("Forbidden", 403, "rejected-request-limits")
CONTENT_BAD_REQUEST = ErrorKind("BadRequest", 400, "rejected-content-check")
CONTENT_FORBIDDEN = ErrorKind("Forbidden", 403, "rejected-content-check")


class RequestError(Exception):
    """A request the EPP refuses; becomes an ImmediateResponse. `rule`: the admission rule that refused
    it (`plugin/rule`, or the admitter's name), for the audit record and the admission metric."""

    def __init__(self, kind: ErrorKind, message: str, *, rule: str = ""):
        self.kind = kind
        self.message = message
        self.rule = rule
        super().__init__(f"{kind.code} - {message}")

    @property
    def body(self) -> bytes:
        return f"inference error: {self.kind.code} - {self.message}".encode()
