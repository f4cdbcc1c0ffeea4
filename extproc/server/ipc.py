"""The messages between `epp serve --workers N`'s worker processes and the parent that holds the
scheduling state (docs/scaling.md): msgspec msgpack frames, each a 4-byte big-endian length and a
tagged Struct, over one unix socket per worker.

A worker sends `Pick` for each parsed request and gets `Picked` or `Refused`; it reports the
response's first byte (`FirstByte`), its end (`Finish`), a refusal it answered itself (`Rejected`) and,
when the config has response reporters, asks for the end-of-body metadata (`Report` -> `Metadata`).
The parent sends `Setup` (the config's request parsers, whether it reads bodies: at the start and after each reload) and
`Evict` (flow control ended a routed request). Ids are the worker's, unique per connection.

The metrics scraping is shared out too (extproc.server.scrape_shares): the parent sends each worker
`Scrapes` (the metrics source, its extraction and the worker's share of the endpoints) whenever that
share changes; the worker sends what its scraper read (`Scraped`, `ScrapedAttributes`) or the error
(`ScrapeFailed`).
"""

from __future__ import annotations

import asyncio
import struct
import types
from collections.abc import Callable, Mapping, Sequence

import msgspec

from extproc.handlers.usage import Usage
from pickers.framework.endpoint import EndpointSpec, Metrics
from pickers.framework.errors import ErrorKind, RequestError
from pickers.plugins.datalayer.extractors import MetricsExtraction
from pickers.plugins.datalayer.sources import HttpSource
from pickers.framework.request import InferenceRequest, MediaPart

_LEN = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024  # a request body may be large (the gRPC limit is the same)


class Media(msgspec.Struct, array_like=True):
    kind: str
    source: str
    inline: bool
    media_type: str
    size: int
    text_chars: int


# -- worker -> parent -------------------------------------------------------------------------
class Pick(msgspec.Struct, tag=True, array_like=True):
    id: int
    request_id: str
    path: str
    headers: dict[str, str]
    api: str | None
    model: str
    prompt_text: str
    prompt_token_ids: list[int] | None
    cache_salt: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    multimodal: bool
    media: list[Media] | None
    media_hashes: dict[str, list[str]] | None
    media_tokens: int | None
    body: bytes | None  # the raw JSON body, only when a plugin of the parent's reads `body` (Setup.send_body)
    subset: list[str] | None
    body_bytes: int


class FirstByte(msgspec.Struct, tag=True, array_like=True):
    id: int
    end_of_stream: bool


class Finish(msgspec.Struct, tag=True, array_like=True):
    id: int
    status: int | None
    streaming: bool
    usage: Usage | None
    aborted: bool
    served: str | None
    duration: float
    first_byte: float | None
    body_chunks: int
    # the EPP refused the routed request after its pick (431, evicted): (code, status, dropped reason,
    # message, admission rule), as `error_of` takes them
    error: tuple[str, int, str | None, str, str] | None = None
    response: str | None = None  # the response body's SHA-256 or head (Outcome.response)


class Rejected(msgspec.Struct, tag=True, array_like=True):
    """A refusal the worker answered itself (a bad body, or one after the pick: `routed`); the parent's
    own refusals of a pick it was asked for are recorded where it made them."""

    request_id: str
    model: str
    target_model: str
    code: str
    status: int
    dropped_reason: str | None
    message: str
    routed: bool = False
    rule: str = ""


class Abandoned(msgspec.Struct, tag=True, array_like=True):
    """The client left before the worker asked for a pick (its body was still coming)."""

    request_id: str
    model: str
    target_model: str


class Report(msgspec.Struct, tag=True, array_like=True):
    id: int
    usage: Usage | None


class Scraped(msgspec.Struct, tag=True, array_like=True):
    """One endpoint's metrics, as the worker's scraper read them (`updated_at` on the shared monotonic clock)."""

    address: str
    metrics: Metrics


class ScrapedAttributes(msgspec.Struct, tag=True, array_like=True):
    """The custom metrics (customMetrics) the same scrape read: Datastore.update_attributes's arguments."""

    address: str
    producer: str
    values: dict[str, float]
    at: float


class ScrapeFailed(msgspec.Struct, tag=True, array_like=True):
    address: str
    error: str


# -- parent -> worker -------------------------------------------------------------------------
class Picked(msgspec.Struct, tag=True, array_like=True):
    id: int
    destination: str
    scores: str | None
    request_headers: dict[str, str]
    response_headers: dict[str, str]
    profile: str
    request_id: str
    target_model: str
    objective: str
    priority: int
    reports: bool  # the scheduler has response reporters: ask for `Metadata` at the end of the body
    capture: tuple[str, int] | None = None  # the audit trail's response capture (Routing.capture)


class Refused(msgspec.Struct, tag=True, array_like=True):
    id: int
    code: str
    status: int
    dropped_reason: str | None
    message: str


class Evict(msgspec.Struct, tag=True, array_like=True):
    id: int


class Metadata(msgspec.Struct, tag=True, array_like=True):
    id: int
    metadata: dict[str, dict[str, float]] | None


class Setup(msgspec.Struct, tag=True, array_like=True):
    """What the config serving asks of the workers: at the start and after each reload."""

    specs: list[tuple[str, str]]  # (name, type) of each requestHandler.parsers entry, in order
    send_body: bool  # a plugin reads request.body (token-producers, precise indexes): send `Pick.body`


class Scrapes(msgspec.Struct, tag=True, array_like=True):
    """The worker's share of the metrics scraping, whole (it replaces the last): how the parent's
    metrics scraper is set up, and the endpoints this worker scrapes (none: it scrapes nothing)."""

    interval: float
    timeout: float
    max_rate: float | None
    source: HttpSource
    extraction: MetricsExtraction
    endpoints: list[EndpointSpec]


ToParent = Pick | FirstByte | Finish | Rejected | Report | Abandoned | Scraped | ScrapedAttributes | ScrapeFailed
ToWorker = Picked | Refused | Evict | Metadata | Setup | Scrapes


def _encode_other(obj: object) -> object:
    if isinstance(obj, types.MappingProxyType):  # the built-in engine mappings (read-only dicts)
        return dict(obj)
    raise NotImplementedError(f"cannot send a {type(obj).__name__} to another process")


_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_other)


def encode(msg: msgspec.Struct) -> bytes:
    """One frame: length, then the message."""
    payload = _encoder.encode(msg)
    return _LEN.pack(len(payload)) + payload


class FrameProtocol(asyncio.Protocol):
    """Frames over a stream socket without a task per read: each complete frame in what arrives is handed
    to `on_frame` at once, in order; what `send` is given within one turn of the event loop goes out
    in one write (a response's first byte and end, several picks)."""

    def __init__(self, on_frame: Callable[[bytes], None], on_lost: Callable[[], None]) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start, n = 0, len(buf)
        while n - start >= 4:
            (size,) = _LEN.unpack_from(buf, start)
            if size > MAX_FRAME:
                self.close()
                raise ValueError(f"IPC frame of {size} bytes, over the {MAX_FRAME} limit")
            end = start + 4 + size
            if end > n:
                break
            self._on_frame(bytes(buf[start + 4 : end]))
            start = end
        if start:
            del buf[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        self._on_lost()

    def send(self, msg: msgspec.Struct) -> None:
        self.send_frame(encode(msg))

    def send_frame(self, frame: bytes) -> None:
        if self._transport is None:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(frame)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and out:
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def encode_hello(index: int, pid: int) -> bytes:
    """A worker's first frame: its index and pid."""
    payload = f"{index} {pid}".encode()
    return _LEN.pack(len(payload)) + payload


parent_decoder = msgspec.msgpack.Decoder(ToParent)
worker_decoder = msgspec.msgpack.Decoder(ToWorker)


def pick_of(ticket: int, req: InferenceRequest, raw: bytes | None, subset: list[str] | None, body_bytes: int) -> Pick:
    media = None
    if req.media:
        media = [Media(m.kind, m.source, m.inline, m.media_type, m.size, m.text_chars) for m in req.media]
    hashes = {k: list(v) for k, v in req.media_hashes.items()} if req.media_hashes is not None else None
    ids = list(req.prompt_token_ids) if req.prompt_token_ids is not None else None
    return Pick(
        ticket, req.request_id, req.path, req.headers, req.api, req.model, req.prompt_text, ids, req.cache_salt,  # type: ignore[arg-type]
        req.stream, req.include_usage, req.max_tokens, req.multimodal, media, hashes, req.media_tokens, raw, subset, body_bytes,
    )  # fmt: skip


def request_of(p: Pick, body: Mapping[str, object]) -> InferenceRequest:
    media = [MediaPart(m.kind, m.source, m.inline, m.media_type, m.size, m.text_chars) for m in p.media] if p.media else None
    return InferenceRequest(
        request_id=p.request_id, path=p.path, headers=p.headers, api=p.api, model=p.model, prompt_text=p.prompt_text,
        prompt_token_ids=p.prompt_token_ids, cache_salt=p.cache_salt, stream=p.stream, include_usage=p.include_usage,
        max_tokens=p.max_tokens, multimodal=p.multimodal, media=media, media_hashes=p.media_hashes,
        media_tokens=p.media_tokens, body=body,
    )  # fmt: skip


def error_of(code: str, status: int, dropped_reason: str | None, message: str, rule: str = "") -> RequestError:
    return RequestError(ErrorKind(code, status, dropped_reason), message, rule=rule)


def error_fields(e: RequestError) -> tuple[str, int, str | None, str, str]:
    """`error_of`'s arguments for this error (Finish.error)."""
    return (e.kind.code, e.kind.status, e.kind.dropped_reason, e.message, e.rule)


def parser_specs(specs: Sequence[object]) -> list[tuple[str, str]]:
    return [(s.name, s.type) for s in specs]  # type: ignore[attr-defined]
