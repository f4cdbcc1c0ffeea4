"""The leg rules on their own: header parsing and what each leg's body carries."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pd_sidecar import legs


@pytest.mark.parametrize(("value", "expected"), [
    ("10.0.0.1:8000", ["10.0.0.1:8000"]),
    ("prefill-0.ns.svc:8000", ["prefill-0.ns.svc:8000"]),
    ("[fd00::1]:8000", ["[fd00::1]:8000"]),
    ("fd00::1:8000", ["[fd00::1]:8000"]),
    (" a:1 , b:2 ", ["a:1", "b:2"]),
])
def test_prefiller_header_accepts_host_port_lists(value: str, expected: list[str]) -> None:
    assert legs.parse_prefillers(value) == expected


@pytest.mark.parametrize("value", ["", "host", "host:", ":80", "host:0", "host:70000", "a b:1", "[::1:80",
                                   "evil.com/x:80", "user@host:80", "[nothost]:80"])
def test_prefiller_header_rejects_anything_else(value: str) -> None:
    with pytest.raises(legs.BadPrefillerHeader):
        legs.parse_prefillers(value)


@given(st.text())
def test_prefiller_header_parsing_never_fails_otherwise(value: str) -> None:
    try:
        hosts = legs.parse_prefillers(value)
    except legs.BadPrefillerHeader:
        return
    assert hosts and all(h.rsplit(":", 1)[1].isdigit() for h in hosts)


def test_prefill_body_asks_for_one_unstreamed_token_and_keeps_the_rest() -> None:
    doc = {"prompt": "p", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 9,
           "min_tokens": 2, "seed": 1}
    assert msgspec.json.decode(legs.prefill_body(doc)) == {
        "prompt": "p", "stream": False, "max_tokens": 1, "seed": 1,
        "kv_transfer_params": legs.PREFILL_KV_TRANSFER_PARAMS}
    assert doc["max_tokens"] == 9  # the client's request is not touched


def test_decode_body_is_the_clients_plus_the_returned_params() -> None:
    doc = {"prompt": "p", "stream": True, "max_tokens": 9}
    assert msgspec.json.decode(legs.decode_body(doc, {"do_remote_prefill": True})) == {
        **doc, "kv_transfer_params": {"do_remote_prefill": True}}


@pytest.mark.parametrize("body", [b"", b"nope", b"[]", b'{"kv_transfer_params": null}',
                                  b'{"kv_transfer_params": {}}', b'{"kv_transfer_params": [1]}'])
def test_a_prefill_answer_without_usable_params_has_none(body: bytes) -> None:
    assert legs.returned_kv_transfer_params(body) is None


def test_hop_by_hop_and_prefiller_headers_are_dropped() -> None:
    kept = legs.request_headers([("Host", "x"), ("Connection", "keep-alive"), ("X-Prefiller-Host-Port", "a:1"),
                                 ("Content-Length", "3"), ("Authorization", "t"), ("x-request-id", "r")])
    assert kept == [("Authorization", "t"), ("x-request-id", "r")]
