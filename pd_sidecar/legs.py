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
# llm-d's data-parallel routing (its data-parallel-profile-handler, and pd-profile-handler's primaryPort):
# the request reaches this sidecar's primary port and the header names the rank port (`podIP:port`)
# that should serve it. It is for this hop only and never goes upstream.
DATA_PARALLEL_HEADER = "x-data-parallel-host-port"

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
_REQUEST_DROP = _HOP_BY_HOP | {"host", "content-length", "content-encoding", PREFILLER_HEADER, ENCODERS_HEADER,
                               DATA_PARALLEL_HEADER}
_RESPONSE_DROP = _HOP_BY_HOP


_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


class BadRequestBody(ValueError):
    """The client's body cannot be split into legs (not JSON, or not a JSON object)."""


class BadPrefillerHeader(ValueError):
    """x-prefiller-host-port is not `host:port[,host:port...]`."""


class BadDataParallelHeader(ValueError):
    """x-data-parallel-host-port is not one `host:port`."""


def is_generation_path(path: str) -> bool:
    """Only completions can be disaggregated (vLLM's connectors serve nothing else)."""
    return path.endswith("/completions")


def parse_host_port(item: str, header: str, error: type[ValueError]) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port), the host lower-cased and an IPv6 address in its
    compressed form without brackets, so two spellings of one address compare equal."""
    host, sep, port = item.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise error(f"{header}: expected host:port, got {item!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    bare = host[1:-1] if bracketed else host
    if bracketed or ":" in bare:
        try:
            return str(ipaddress.IPv6Address(bare)), int(port)
        except ValueError:
            raise error(f"{header}: bad IPv6 address in {item!r}") from None
    if not _HOSTNAME.fullmatch(bare):
        raise error(f"{header}: bad host in {item!r}")
    return bare.lower(), int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_prefillers(value: str) -> list[str]:
    """`host:port`, `[v6]:port`, or a comma-separated list of them (tried in order on retries)."""
    out = [join_host_port(*parse_host_port(item.strip(), PREFILLER_HEADER, BadPrefillerHeader))
           for item in value.split(",") if item.strip()]
    if not out:
        raise BadPrefillerHeader(f"{PREFILLER_HEADER}: empty")
    return out


def parse_data_parallel_target(values: list[str]) -> tuple[str, int]:
    """The header's values (one expected) -> the (host, port) of the rank it names."""
    if len(values) != 1 or "," in values[0]:
        raise BadDataParallelHeader(
            f"{DATA_PARALLEL_HEADER}: expected one host:port, got {', '.join(values)!r}")
    value = values[0].strip()
    if not value:
        raise BadDataParallelHeader(f"{DATA_PARALLEL_HEADER}: empty")
    return parse_host_port(value, DATA_PARALLEL_HEADER, BadDataParallelHeader)


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
