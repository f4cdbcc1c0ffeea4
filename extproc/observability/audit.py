"""The audit trail (`epp serve --audit-sink`, docs/guardrails.md): one structured record per request,
written off the request path to a JSON-lines file (rotated by size), stdout, or OpenTelemetry logs.

The request path only builds an `AuditRecord` (plain values, bounded like the EPP's other stores of a
client's strings: extproc.observability.bounds) and appends it to a bounded deque; it never waits, and
never fails a request. One writer thread wakes every `FLUSH_INTERVAL`, takes what is queued, encodes it
(msgspec) and hands it to the sink in one batch. When the queue is full (the sink is slow or stuck)
a record is dropped and counted (`dropped`); when the sink fails a write, that batch's records are
counted as failed. Both show in `llm_epp_audit_records_total`. Prompts are not recorded unless
`prompt` asks for their SHA-256 (`hash`, computed on the request path so the queue never holds a whole
prompt) or a redacted excerpt (`excerpt`: the first characters, every content-check pattern of the
config and every preset masked on the writer thread). Responses likewise, only when `response` asks:
the stream hashes the body's chunks as they pass, or keeps its first bytes (extproc.handlers.capture),
and never holds the body otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import msgspec

from extproc.observability import bounds
from pickers.framework.errors import ConfigError, RequestError
from pickers.framework.request import InferenceRequest
from pickers.plugins.admission.patterns import Pattern, redact

if TYPE_CHECKING:
    from extproc.handlers.request_stream import Outcome, Routing
    from extproc.handlers.usage import Usage

log = logging.getLogger(__name__)

SINKS = ("file", "stdout", "otel")
PROMPT_MODES = ("none", "hash", "excerpt")
FLUSH_INTERVAL = 0.1  # seconds between the writer's looks at the queue: records reach the sink this late at most
DEFAULT_QUEUE = 10_000
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_BACKUPS = 5
CLIENT_MAX = 256  # characters of the client identity header a record keeps
EXCERPT_MARGIN = 1024  # characters past an excerpt's length kept for redaction: a secret cut there is still masked

# what the `admission` field says
PASSED, FLAGGED, REFUSED = "passed", "flagged", "refused"


class AuditRecord(msgspec.Struct, gc=False):  # holds no cycles: the collector need not track it
    """One request, as the audit trail keeps it (docs/guardrails.md has the schema)."""

    time: str  # RFC 3339, UTC, to the millisecond: when the request ended
    request_id: str
    client: str | None
    path: str
    objective: str
    model: str
    target_model: str
    endpoints: list[str]
    profile: str
    admission: str  # passed, flagged or refused
    rules: list[str]  # the admission rules hit (`plugin/rule`): the one that refused, those that flagged
    status: int | None  # the HTTP status the client got (the EPP's own when it refused); None: none sent
    error: str | None  # the EPP's error code when it refused (BadRequest, Forbidden, ...)
    dropped_reason: str | None  # x-llm-d-request-dropped-reason, when the refusal had one
    message: str | None  # the refusal's message
    aborted: bool
    streaming: bool
    prompt_tokens: int | None  # from the response's usage
    completion_tokens: int | None
    cached_tokens: int | None
    duration_ms: float | None  # request headers at the EPP to the end of the response
    first_byte_ms: float | None  # to its first body byte (TTFT when streamed)
    prompt_sha256: str | None = None
    prompt_excerpt: str | None = None
    response_sha256: str | None = None  # of the response body as the client got it (SSE frames included)
    response_excerpt: str | None = None


@dataclass(slots=True, frozen=True)
class AuditOptions:
    sink: str = ""  # "" (off), file, stdout or otel
    path: str | None = None  # the file sink's
    max_bytes: int = DEFAULT_MAX_BYTES  # the file is rotated past this size
    backups: int = DEFAULT_BACKUPS  # rotated files kept: path.1 (newest) .. path.N
    client_header: str = ""  # the request header whose value names the client (never an API key's value)
    prompt: str = "none"  # none, hash or excerpt
    response: str = "none"  # none, hash or excerpt: of the response body
    excerpt_chars: int = 200
    queue_size: int = DEFAULT_QUEUE


class Sink(Protocol):
    def write(self, records: Sequence[AuditRecord], data: bytes) -> None:
        """Write a batch: its records, and the same as JSON lines (each ends with a newline); raise on failure."""
        ...

    def close(self) -> None: ...


class StreamSink:
    """JSON lines on a binary stream (stdout)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream

    def write(self, records: Sequence[AuditRecord], data: bytes) -> None:
        self.stream.write(data)
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class FileSink:
    """JSON lines appended to a file, rotated when it would pass `max_bytes`: path -> path.1 -> ... ->
    path.N (the oldest goes). Opened here, so a path that cannot be written is refused at start-up."""

    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> None:
        if max_bytes < 1:
            raise ConfigError(f"expected a size of at least 1 MiB, got {max_bytes} bytes", field="--audit-file-max-mb")
        if backups < 0:
            raise ConfigError(f"expected a count >= 0, got {backups}", field="--audit-file-backups")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        try:
            # unbuffered: each batch is one append (O_APPEND), whole lines even if another process appends too
            self._file: IO[bytes] = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open until close()
        except OSError as e:
            raise ConfigError(f"cannot open {path!r} for appending: {e.strerror}", field="--audit-file") from None
        try:
            self._size = self._file.tell()
        except OSError:  # a pipe (a named FIFO a collector reads): no size, never rotated
            self._size = 0
            self.max_bytes = sys.maxsize

    def write(self, records: Sequence[AuditRecord], data: bytes) -> None:
        if self._size + len(data) > self.max_bytes:  # rotate between lines (a line over the limit goes alone)
            chunk: list[bytes] = []
            for line in data.splitlines(keepends=True):
                if (self._size or chunk) and self._size + len(line) > self.max_bytes:
                    self._write(b"".join(chunk))
                    chunk = []
                    self._rotate()
                chunk.append(line)
                self._size += len(line)
            self._write(b"".join(chunk))
        else:
            self._write(data)
            self._size += len(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a raw file may take less than all of it
            view = view[self._file.write(view) or 0 :]

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        self._file.close()


class OtelSink:
    """Each record as an OpenTelemetry log record (event `llm_epp.audit`, the record as its body), exported
    by `exporter` (default: OTLP over gRPC, configured by the OTEL_EXPORTER_OTLP_* variables) on the
    writer thread, one batch per flush. A batch the exporter refuses counts as failed."""

    EVENT = "llm_epp.audit"

    def __init__(self, exporter: Any = None) -> None:
        try:
            from opentelemetry._logs import LogRecord
            from opentelemetry.sdk._logs import ReadableLogRecord
            from opentelemetry.sdk._logs.export import LogRecordExportResult
            from opentelemetry.sdk.resources import Resource
        except ImportError as e:
            raise ConfigError(
                f"needs OpenTelemetry's SDK with its logs API, which cannot load ({e}): pip install 'llm-epp[otel]'",
                field="--audit-sink",
            ) from None
        if exporter is None:
            try:
                from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
            except ImportError as e:
                raise ConfigError(
                    f"the OTLP logs exporter cannot load ({e}): pip install 'llm-epp[otel]' (and, if xds-protos "
                    "overwrote opentelemetry-proto's files, pip install --no-deps --force-reinstall opentelemetry-proto)",
                    field="--audit-sink",
                ) from None
            exporter = OTLPLogExporter()
        self.exporter = exporter
        self._record = LogRecord
        self._readable = ReadableLogRecord
        self._success = LogRecordExportResult.SUCCESS
        self._resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "llm-epp"})

    def write(self, records: Sequence[AuditRecord], data: bytes) -> None:
        now = time.time_ns()
        batch = [
            self._readable(
                self._record(
                    timestamp=now, observed_timestamp=now, event_name=self.EVENT, body=msgspec.to_builtins(r),
                    attributes={"llm_epp.request_id": r.request_id},
                ),
                self._resource,
            )
            for r in records
        ]  # fmt: skip
        if self.exporter.export(batch) != self._success:
            raise OSError("the OpenTelemetry exporter did not take the batch")

    def close(self) -> None:
        self.exporter.shutdown()


def open_sink(opts: AuditOptions) -> Sink:
    """The sink the options name; ConfigError naming the flag when they cannot work."""
    if opts.sink == "file":
        if not opts.path:
            raise ConfigError("the file sink needs a path: --audit-file PATH", field="--audit-sink")
        return FileSink(opts.path, opts.max_bytes, opts.backups)
    if opts.path:
        raise ConfigError(f"--audit-file is only used by the file sink, not {opts.sink!r}", field="--audit-file")
    if opts.sink == "stdout":
        return StreamSink(sys.stdout.buffer)
    if opts.sink == "otel":
        return OtelSink()
    raise ConfigError(f"expected one of {', '.join(SINKS)}, got {opts.sink!r}", field="--audit-sink")


class AuditLog:
    """The bounded queue and its writer thread. `record_*` run on the request path; `close` drains."""

    def __init__(
        self,
        sink: Sink,
        opts: AuditOptions = AuditOptions(),
        *,
        patterns: Callable[[], Iterable[tuple[str, Pattern]]] = tuple,
        interval: float = FLUSH_INTERVAL,
    ) -> None:
        if opts.prompt not in PROMPT_MODES:
            raise ConfigError(f"expected one of {', '.join(PROMPT_MODES)}, got {opts.prompt!r}", field="--audit-prompt")
        if opts.response not in PROMPT_MODES:
            raise ConfigError(f"expected one of {', '.join(PROMPT_MODES)}, got {opts.response!r}", field="--audit-response")
        if opts.queue_size < 1:
            raise ConfigError(f"expected a size >= 1, got {opts.queue_size}", field="--audit-queue-size")
        if opts.excerpt_chars < 1:
            raise ConfigError(f"expected a count >= 1, got {opts.excerpt_chars}", field="--audit-excerpt-chars")
        self.sink = sink
        self.opts = opts
        self.client_header = opts.client_header.lower()  # Envoy hands header names lower-cased
        self.patterns = patterns  # the config's content-check patterns, read when an excerpt is made
        self.interval = interval
        # what a routed request's stream keeps of its response body (Routing.capture); None: nothing
        self.response_capture = None if opts.response == "none" else (opts.response, opts.excerpt_chars + EXCERPT_MARGIN)
        self._queue: deque[tuple[Any, ...]] = deque()  # what `record_*` captured, for `_record`
        self.max_queue = opts.queue_size
        # counted on the request path (dropped) and on the writer thread (written, failed): each has one writer
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self._wake = threading.Event()
        self._closing = False
        self._encoder = msgspec.json.Encoder()
        self._second = -1  # the second `_stamp` formats (RFC 3339 to the second)
        self._stamp = ""
        self._thread = threading.Thread(target=self._run, name="llm-epp-audit", daemon=True)
        self._thread.start()

    # -- the request path ----------------------------------------------------------------------
    # It captures references to the values a record needs (strings, the usage struct) in a tuple, and the
    # prompt's hash or the head of it when asked (never the request: its body could be large); the
    # writer thread bounds, formats and encodes them.
    def _put(self, entry: tuple[Any, ...]) -> None:
        if len(self._queue) >= self.max_queue or self._closing:
            self.dropped += 1
            return
        self._queue.append(entry)

    def _prompt(self, request: InferenceRequest | None) -> str | None:
        mode = self.opts.prompt
        if mode == "none" or request is None:
            return None
        text = request.prompt_text
        if mode == "hash":
            return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        return text[: self.opts.excerpt_chars + EXCERPT_MARGIN]

    def record_routed(self, routing: Routing, outcome: Outcome, usage: Usage | None) -> None:
        """A request that was routed ended (served, aborted, or refused after the pick: `outcome.error`)."""
        r = routing.request
        error = outcome.error
        header = self.client_header
        self._put((
            time.time(), r.request_id, r.headers.get(header) if header else None, r.path, r.objective, r.model, r.target_model,
            routing.destination, routing.profile, r.flags, outcome.status, None if error is None else _error(error),
            outcome.aborted, outcome.streaming, usage, outcome.duration, outcome.first_byte, self._prompt(r),
            outcome.response,
        ))  # fmt: skip

    def record_refused(self, request: InferenceRequest | None, error: RequestError) -> None:
        """A request refused before it was routed (admission, parsing, no endpoint, flow control)."""
        r = request
        header = self.client_header
        if r is None:
            self._put((time.time(), "", None, "", "", "", "", "", "", None, None, _error(error), True, False, None, None, None, None, None))
            return
        self._put((
            time.time(), r.request_id, r.headers.get(header) if header else None, r.path, r.objective, r.model, r.target_model,
            "", "", r.flags, None, _error(error), True, False, None, None, None, self._prompt(r), None,
        ))  # fmt: skip

    def record_abandoned(self, request: InferenceRequest) -> None:
        """A request whose client left before it was routed or refused (while its body came, or queued)."""
        r = request
        header = self.client_header
        self._put((
            time.time(), r.request_id, r.headers.get(header) if header else None, r.path, r.objective, r.model, r.target_model,
            "", "", r.flags, None, None, True, False, None, None, None, self._prompt(r), None,
        ))  # fmt: skip

    # -- the writer thread ---------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            closing = self._closing
            self._flush()
            if closing:
                return

    def _flush(self) -> None:
        queue = self._queue
        while queue:
            batch: list[tuple[Any, ...]] = []
            while queue and len(batch) < 1000:
                batch.append(queue.popleft())
            try:
                records = [self._record(e) for e in batch]
                self.sink.write(records, self._encoder.encode_lines(records))
            except Exception as e:  # a sink failure costs its records, never the writer
                self.failed += len(batch)
                log.warning("audit sink failed, %d records lost: %s", len(batch), e)
            else:
                self.written += len(batch)

    def _time(self, t: float) -> str:
        sec = int(t)
        if sec != self._second:  # strftime once a second
            self._second, self._stamp = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return "%s.%03dZ" % (self._stamp, (t - sec) * 1000)

    def _record(self, e: tuple[Any, ...]) -> AuditRecord:
        (t, request_id, client, path, objective, model, target, destination, profile, flags, status, error, aborted,
         streaming, usage, duration, first_byte, prompt, response) = e  # fmt: skip
        rules = list(flags) if flags else []
        if error is not None:
            code, error_status, dropped, message, rule = error
            status = error_status
            message = bounds.message(message)
            if rule:
                rules.append(rule)
                admission = REFUSED
            else:
                admission = FLAGGED if flags else PASSED
        else:
            code = dropped = message = None
            admission = FLAGGED if flags else PASSED
        # Header values (the id, client, path, objective) are valid UTF-8 and the JSON escapes control
        # characters: cut to length. Model names come from the JSON body, which may hold lone surrogates.
        record = AuditRecord(
            self._time(t), request_id[: bounds.REQUEST_ID_MAX], None if client is None else client[:CLIENT_MAX],
            path[: bounds.LOG_FIELD_MAX], objective[: bounds.OBJECTIVE_MAX], bounds.model_name(model),
            model if target == model else bounds.model_name(target), destination.split(",") if destination else [],
            profile, admission, rules, status,
            code, dropped, message, aborted, streaming,
            None if usage is None else usage.prompt_tokens, None if usage is None else usage.completion_tokens,
            None if usage is None else usage.cached_tokens, None if duration is None else round(duration * 1000, 3),
            None if first_byte is None else round(first_byte * 1000, 3),
        )  # fmt: skip
        if prompt is not None:
            if self.opts.prompt == "hash":
                record.prompt_sha256 = prompt
            else:
                n = self.opts.excerpt_chars
                excerpt = redact(prompt, self.patterns())[:n]  # masked before it is cut: no half secret shows
                record.prompt_excerpt = bounds.bounded(excerpt, n)
        if response is not None:
            if self.opts.response == "hash":
                record.response_sha256 = response
            else:
                n = self.opts.excerpt_chars
                record.response_excerpt = bounds.bounded(redact(response, self.patterns())[:n], n)
        return record

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the writer, close the sink (records after this are dropped)."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            try:
                self.sink.close()
            except Exception as e:
                log.warning("closing the audit sink failed: %s", e)


def content_patterns(plugins: Iterable[object]) -> list[tuple[str, Pattern]]:
    """(label, pattern) of every content-check-admitter rule among `plugins`: what excerpts mask besides the presets."""
    from pickers.plugins.admission.content_check import ContentCheckAdmitter

    return [lp for p in plugins if isinstance(p, ContentCheckAdmitter) for lp in p.patterns()]


def _error(e: RequestError) -> tuple[str, int, str | None, str, str]:
    kind = e.kind
    return kind.code, kind.status, kind.dropped_reason, e.message, e.rule
