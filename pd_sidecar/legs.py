"""The wire format of the two legs, as pure functions: header parsing, body and header rewrites.

Everything here is I/O-free so the rules (what the prefill leg may not carry, what never leaks
upstream) can be read and tested in one place.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

PREFILLER_HEADER = "x-prefiller-host-port"
# llm-d's routing sidecar pulls the prompt's KV blocks from this peer over vLLM's P2P connector; this
# sidecar does not (it counts and logs the header, and passes it on unchanged)
KV_CACHE_SOURCE_HEADER = "x-kv-cache-source-host-port"
# llm-d's E/P/D: the encoders the EPP chose for a multimodal request. This sidecar runs no encode leg
# (the decoder, or the prefill leg's server, encodes the media itself); it counts and drops the header.
ENCODERS_HEADER = "x-encoder-hosts-ports"
REQUEST_ID_HEADER = "x-request-id"

# Sent on a prefill leg: "prefill this and keep the KV for a remote decoder" (vLLM NixlConnector).
PREFILL_KV_TRANSFER_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

# Hop-by-hop (RFC 9110 7.6.1) or recomputed by the HTTP client; never copied to the next hop.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# The server decompresses request bodies and the client recomputes the length and host.
_REQUEST_DROP = _HOP_BY_HOP | {"host", "content-length", "content-encoding", PREFILLER_HEADER, ENCODERS_HEADER}
_RESPONSE_DROP = _HOP_BY_HOP


_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


class BadRequestBody(ValueError):
    """The client's body cannot be split into legs (not JSON, or not a JSON object)."""


class BadPrefillerHeader(ValueError):
    """x-prefiller-host-port is not `host:port[,host:port...]`."""


def is_generation_path(path: str) -> bool:
    """Only completions can be disaggregated (vLLM's connectors serve nothing else)."""
    return path.endswith("/completions")


def parse_prefillers(value: str) -> list[str]:
    """`host:port`, `[v6]:port`, or a comma-separated list of them (tried in order on retries)."""
    out: list[str] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            raise BadPrefillerHeader(f"{PREFILLER_HEADER}: expected host:port, got {item!r}")
        bracketed = host.startswith("[") and host.endswith("]")
        bare = host[1:-1] if bracketed else host
        if bracketed or ":" in bare:
            try:
                ipaddress.IPv6Address(bare)
            except ValueError:
                raise BadPrefillerHeader(f"{PREFILLER_HEADER}: bad IPv6 address in {item!r}") from None
            host = f"[{bare}]"
        elif not _HOSTNAME.fullmatch(bare):
            raise BadPrefillerHeader(f"{PREFILLER_HEADER}: bad host in {item!r}")
        out.append(f"{host}:{int(port)}")
    if not out:
        raise BadPrefillerHeader(f"{PREFILLER_HEADER}: empty")
    return out


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise BadRequestBody(f"Invalid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequestBody(f"the request body must be a JSON object, got {type(doc).__name__}")
    return doc


def prefill_body(doc: Mapping[str, Any]) -> bytes:
    """The prefill leg: same request, one token, no streaming, KV kept for a remote decoder."""
    leg = dict(doc)
    leg["kv_transfer_params"] = dict(PREFILL_KV_TRANSFER_PARAMS)
    leg["stream"] = False
    leg.pop("stream_options", None)
    leg["max_tokens"] = 1
    if "max_completion_tokens" in leg:
        leg["max_completion_tokens"] = 1
    leg.pop("min_tokens", None)  # vLLM rejects min_tokens > max_tokens
    return msgspec.json.encode(leg)


def decode_body(doc: Mapping[str, Any], kv_transfer_params: Mapping[str, Any]) -> bytes:
    """The decode leg: the client's request as sent, plus where to pull the prompt's KV from."""
    return msgspec.json.encode({**doc, "kv_transfer_params": kv_transfer_params})


def returned_kv_transfer_params(body: bytes) -> dict[str, Any] | None:
    """kv_transfer_params of a prefill leg's response, or None if it has none (or is not JSON)."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    params = doc.get("kv_transfer_params") if isinstance(doc, dict) else None
    return params if isinstance(params, dict) and params else None


def request_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's headers for the next hop, minus hop-by-hop ones and x-prefiller-host-port."""
    return [(k, v) for k, v in headers if k.lower() not in _REQUEST_DROP]


def prefill_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A prefill leg is its own request to its server: a fresh x-request-id."""
    out = [(k, v) for k, v in headers if k.lower() != REQUEST_ID_HEADER]
    out.append((REQUEST_ID_HEADER, str(uuid.uuid4())))
    return out


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in _RESPONSE_DROP]
