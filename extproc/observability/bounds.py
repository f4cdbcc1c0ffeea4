"""The bounds on what a client's strings may add to the EPP's own state: metric labels, the decisions
behind /debug/decisions, log lines and span attributes (docs/operating.md, "Bounds").

A request is routed with its real model name and keeps its real headers; only what the EPP stores or
exports goes through these functions. Each cuts a string to its cap (the last character then `…`) and
replaces what could break a line-based format or a UTF-8 encoder (control and format characters, line
separators, unpaired surrogates) with U+FFFD. The work is O(cap), whatever the input's length.
"""

from __future__ import annotations

MODEL_MAX = 128  # model names, requested and rewritten: labels, decisions, logs, spans
REQUEST_ID_MAX = 128  # x-request-id (a UUID is 36)
FAIRNESS_ID_MAX = 128  # x-gateway-inference-fairness-id: the flow-control queue it names, labels, views
OBJECTIVE_MAX = 253  # x-gateway-inference-objective (a Kubernetes object name's limit)
MESSAGE_MAX = 512  # an error message in a log line or a span status
LOG_FIELD_MAX = 1024  # any string field of a log line (a backstop: fields are bounded where they are made)

MAX_MODELS = 200  # distinct (model_name, target_model_name) pairs in the metrics; the rest count as OVERFLOW
MAX_FLOWS = 100  # distinct (fairness_id, priority) pairs in the flow-control metrics; the rest count as OVERFLOW
OVERFLOW = "other"  # as llm-d's EPP names its overflow label

CUT = "\u2026"  # `…`: this string was longer
REPLACEMENT = "\ufffd"


def bounded(value: str, limit: int) -> str:
    """`value` cut to `limit` characters with what is not printable replaced (see the module's doc)."""
    if len(value) <= limit:
        return value if value.isprintable() else _printable(value)
    head = value[: limit - 1]
    return (head if head.isprintable() else _printable(head)) + CUT


def _printable(value: str) -> str:
    # str.isprintable() is False for Cc, Cf, Cs, Co, Cn, Zl, Zp and every space but " "
    return "".join(c if c.isprintable() else REPLACEMENT for c in value)


def model_name(value: str) -> str:
    return bounded(value, MODEL_MAX)


def request_id(value: str) -> str:
    return bounded(value, REQUEST_ID_MAX)


def fairness_id(value: str) -> str:
    return bounded(value, FAIRNESS_ID_MAX)


def objective(value: str) -> str:
    return bounded(value, OBJECTIVE_MAX)


def message(value: str) -> str:
    return bounded(value, MESSAGE_MAX)
