"""Logging set-up (`--log-format text|json`, `-v`) and the one line per request (`--log-requests`).

A log call may carry structured fields as `extra={"fields": {...}}`: the JSON format puts them in the
object, the text format appends them as key=value (quoted when a value has a space, `=` or `"`).
String fields are cut to `LOG_FIELD_MAX` characters with control characters replaced
(extproc.observability.bounds), so no value can start a line of its own; a backstop, since callers
bound what they take from clients. Per-request lines are off unless asked for, so the hot path logs
nothing by default. Request headers are never logged: they carry credentials.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from extproc.observability.bounds import LOG_FIELD_MAX, bounded

REQUEST_LOGGER = "llm_epp.requests"
LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out.update((k, bounded(v, LOG_FIELD_MAX) if isinstance(v, str) else v) for k, v in fields.items())
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping) and fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return line


def _text_value(v: object) -> str:
    if isinstance(v, str):
        v = bounded(v, LOG_FIELD_MAX)  # also replaces what could end the line
        return v if v and not any(c in v for c in ' ="') else json.dumps(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def setup_logging(verbosity: int = 0, fmt: str = "text", stream: Any = None) -> None:
    """-v 0: INFO; -v 1 and up: DEBUG. Replaces any handlers the root logger had."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    for noisy in ("asyncio", "aiohttp.access", "kubernetes_asyncio"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbosity < 3 else logging.DEBUG)
