"""Requests the state machine refuses before they can hurt: too many headers for the gateway, bodies
it could never read (empty, compressed, an upgrade), too large, or stalled. Each gets one
ImmediateResponse with a readable message, and the books balance. Replies Envoy makes itself before
the routing pass through."""

from __future__ import annotations

import json

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.handlers.request_stream import RequestLimits, RequestStream, State
from tests.unit.test_protocol import (
    ADDRS,
    BUFFERED,
    FULL_DUPLEX,
    body_msg,
    completion_body,
    headers_msg,
    in_flight,
    make_director,
    response_body_msg,
    response_headers_msg,
    send_request,
    set_headers,
)

BASE_HEADERS = len(headers_msg().request_headers.headers.headers)  # :path, :method, :authority, content-type


def refusal(out: list[pb.ProcessingResponse]) -> tuple[int, str]:
    (resp,) = out
    return resp.immediate_response.status.code, resp.immediate_response.body.decode()


def padding(n: int, size: int = 1) -> dict[str, str]:
    return {f"x-pad-{i:03d}": "v" * size for i in range(n)}


# -- headers the gateway could not take after the EPP's mutation ---------------------------------


def test_headers_that_leave_no_room_for_the_destination_get_431_at_once():
    stream = RequestStream(make_director(), limits=RequestLimits(max_headers=20))
    status, body = refusal(stream.handle(headers_msg(extra=padding(20 - BASE_HEADERS))))
    assert status == 431
    assert body == (
        "inference error: RequestHeaderFieldsTooLarge - too many request headers: 21 with the gateway's own "
        "and the 1 it adds, over its limit of 20: send fewer headers"
    )
    assert stream.state is State.REJECTED


def test_headers_that_fit_with_everything_the_epp_adds_are_routed():
    # the EPP adds the destination, a generated x-request-id and content-length: 3 headers
    stream = RequestStream(make_director(), limits=RequestLimits(max_headers=20))
    out = send_request(stream, completion_body(), extra=padding(20 - BASE_HEADERS - 3))
    assert set_headers(out[0])["x-gateway-destination-endpoint"] in ADDRS


def test_a_mutation_that_would_pass_the_header_count_is_refused_with_431_not_sent():
    director = make_director()
    stream = RequestStream(director, limits=RequestLimits(max_headers=20))
    out = send_request(stream, completion_body(), extra=padding(20 - BASE_HEADERS - 2))  # room for 2 of the 3
    assert refusal(out)[0] == 431
    assert "too many request headers: 21 with the gateway's own and the 3 it adds" in refusal(out)[1]
    assert in_flight(director) == 0


def test_headers_whose_size_leaves_no_room_for_the_mutation_get_431():
    stream = RequestStream(make_director(), limits=RequestLimits(max_headers_bytes=4096))
    status, body = refusal(send_request(stream, completion_body(), extra=padding(1, 4000)))
    assert status == 431
    assert "request headers too large" in body


def test_header_bytes_are_counted_exactly_near_the_limit():
    extra = padding(1, 3000)
    have = sum(len(h.key) + len(h.raw_value) for h in headers_msg(extra=extra).request_headers.headers.headers)
    body = completion_body()

    def stream(limit: int) -> RequestStream:
        return RequestStream(make_director(), limits=RequestLimits(max_headers_bytes=limit), new_request_id=lambda: "id-1")

    added = sum(len(k) + len(v) for k, v in set_headers(send_request(stream(10**6), body, extra=extra)[0]).items())
    fits = send_request(stream(have + added), body, extra=extra)
    assert set_headers(fits[0])["x-gateway-destination-endpoint"] in ADDRS
    assert refusal(send_request(stream(have + added - 1), body, extra=extra))[0] == 431


def test_overwritten_headers_count_once():
    # x-request-id and content-length sent by the client are overwritten in place, not added
    limit = BASE_HEADERS + 2 + 1  # + the two sent + the destination
    stream = RequestStream(make_director(), limits=RequestLimits(max_headers=limit))
    body = completion_body()
    out = send_request(stream, body, extra={"x-request-id": "r-1", "content-length": str(len(body))})
    assert set_headers(out[0])["x-gateway-destination-endpoint"] in ADDRS


# -- bodies the EPP could never read ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/v1/completions", "completions needs a JSON object with 'model' and 'prompt'"),
        ("/v1/chat/completions", "chat needs a JSON object with 'model' and 'messages'"),
    ],
)
def test_post_without_a_body_to_an_inference_path_is_400(path, fragment):
    director = make_director()
    stream = RequestStream(director)
    status, body = refusal(stream.handle(headers_msg(path=path, eos=True)))
    assert status == 400
    assert body == f"inference error: BadRequest - request body is empty: {fragment}"
    assert director.in_flight == 0


@pytest.mark.parametrize("body", [b"", b"  \r\n\t "])
def test_empty_or_blank_body_chunks_are_400_as_an_empty_body(body):
    stream = RequestStream(make_director())
    stream.handle(headers_msg())
    status, text = refusal(stream.handle(body_msg(body, True)))
    assert status == 400
    assert "request body is empty" in text


def test_get_without_a_body_on_an_inference_path_is_still_routed_on_load():
    stream = RequestStream(make_director())
    out = stream.handle(headers_msg(path="/v1/chat/completions", method="GET", eos=True))
    assert set_headers(out[0])["x-gateway-destination-endpoint"] in ADDRS


@pytest.mark.parametrize(
    ("path", "doc", "fragment"),
    [
        ("/v1/chat/completions", {"messages": []}, "field 'messages' must not be empty"),
        ("/v1/completions", {"prompt": ""}, "field 'prompt' must not be empty"),
        ("/v1/completions", {"prompt": []}, "field 'prompt' must not be empty"),
        ("/v1/completions", {"prompt": ["fine", ""]}, "prompt[1] must not be empty"),
        ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt[1] must not be empty"),
        ("/v1/embeddings", {"input": []}, "field 'input' must not be empty"),
        ("/v1/embeddings", {"input": ""}, "field 'input' must not be empty"),
        ("/v1/responses", {"input": []}, "field 'input' must not be empty"),
    ],
)
def test_empty_prompt_fields_are_400(path, doc, fragment):
    body = json.dumps({"model": "m", **doc}).encode()
    status, text = refusal(send_request(RequestStream(make_director()), body, path=path)[-1:])
    assert status == 400
    assert text == f"inference error: BadRequest - {fragment}"


def test_a_conversation_may_start_empty():
    body = json.dumps({"model": "m", "items": []}).encode()
    out = send_request(RequestStream(make_director()), body, path="/v1/conversations")
    assert set_headers(out[0])["x-gateway-destination-endpoint"] in ADDRS


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_websocket_upgrade_on_an_inference_path_is_400_at_the_headers(method):
    stream = RequestStream(make_director())
    msg = headers_msg(path="/v1/chat/completions", method=method, extra={"connection": "upgrade", "upgrade": "websocket"})
    status, body = refusal(stream.handle(msg))
    assert status == 400
    assert body == "inference error: BadRequest - upgrading to 'websocket' is not supported on /v1/chat/completions: send a plain HTTP request"


def test_upgrade_on_other_paths_is_not_the_epps_business():
    stream = RequestStream(make_director())
    out = stream.handle(headers_msg(path="/v1/realtime", method="GET", extra={"upgrade": "websocket"}))
    assert set_headers(out[0])["x-gateway-destination-endpoint"] in ADDRS


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate, gzip", "ZSTD"])
def test_compressed_body_is_415_before_it_arrives(encoding):
    stream = RequestStream(make_director())
    status, body = refusal(stream.handle(headers_msg(extra={"content-encoding": encoding})))
    assert status == 415
    assert body.startswith(f"inference error: UnsupportedMediaType - request bodies with content-encoding '{encoding.lower()}' are not supported")


def test_identity_encoding_is_a_plain_body():
    out = send_request(RequestStream(make_director()), completion_body(), extra={"content-encoding": "identity"})
    assert set_headers(out[0])["x-gateway-destination-endpoint"] in ADDRS


# -- too large -------------------------------------------------------------------------------------


def test_declared_content_length_over_the_limit_is_413_before_any_body():
    stream = RequestStream(make_director(), limits=RequestLimits(max_body_bytes=1000))
    status, body = refusal(stream.handle(headers_msg(extra={"content-length": "80000000"})))
    assert status == 413
    assert body == "inference error: PayloadTooLarge - request body is 80000000 bytes, larger than the 1000 accepted"


def test_body_is_refused_on_the_chunk_that_passes_the_limit_and_not_kept():
    stream = RequestStream(make_director(), limits=RequestLimits(max_body_bytes=100))
    stream.handle(headers_msg())
    assert stream.handle(body_msg(b"x" * 60, False)) == []
    status, _ = refusal(stream.handle(body_msg(b"x" * 60, False)))
    assert status == 413
    assert stream._chunks == [] and stream.error.__traceback__ is None  # nothing of the body is held


# -- stalled bodies --------------------------------------------------------------------------------


def test_the_body_idle_timeout_applies_while_a_full_duplex_body_is_due():
    stream = RequestStream(make_director(), limits=RequestLimits(body_idle_timeout=7.0))
    assert stream.body_idle_timeout is None  # before the headers: Envoy sends them at once
    stream.handle(headers_msg())
    assert stream.body_idle_timeout == 7.0
    stream.handle(body_msg(completion_body(), True))
    assert stream.state is State.ROUTED and stream.body_idle_timeout is None  # now the upstream's turn


def test_the_body_idle_timeout_covers_bodies_streaming_through_unparsed():
    stream = RequestStream(make_director(), limits=RequestLimits(body_idle_timeout=7.0))
    stream.handle(headers_msg(path="/tokenize"))
    assert stream.state is State.PASSTHROUGH and stream.body_idle_timeout == 7.0
    stream.handle(body_msg(b"all of it", True))
    assert stream.state is State.ROUTED and stream.body_idle_timeout is None


def test_no_body_idle_timeout_in_buffered_mode_where_envoy_holds_the_body():
    stream = RequestStream(make_director(), limits=RequestLimits(body_idle_timeout=7.0))
    stream.handle(headers_msg(mode=BUFFERED))
    assert stream.body_idle_timeout is None


def test_a_stalled_body_gets_408():
    director = make_director()
    stream = RequestStream(director, limits=RequestLimits(body_idle_timeout=30.0))
    stream.handle(headers_msg())
    stream.handle(body_msg(b'{"model": "m", ', False))
    status, body = refusal(stream.body_timed_out())
    assert status == 408
    assert body == "inference error: RequestTimeout - no request body data for 30 s: send the body without pauses"
    assert stream.state is State.REJECTED and stream._chunks == []


def test_a_stalled_body_already_routed_releases_its_in_flight_count():
    director = make_director()
    stream = RequestStream(director)
    stream.handle(headers_msg(path="/tokenize"))
    assert in_flight(director) == 1
    assert refusal(stream.body_timed_out())[0] == 408
    assert in_flight(director) == 0 and director.outcomes[0].aborted
    stream.close()
    assert len(director.outcomes) == 1


# -- replies Envoy makes itself before the routing --------------------------------------------------


@pytest.mark.parametrize("mode", [FULL_DUPLEX, BUFFERED])
def test_an_envoy_reply_during_the_body_passes_through_unchanged(mode):
    # Envoy's stream idle timeout (408) or its buffer limit (413) answers the client through our
    # response path while the EPP still waits for the body
    director = make_director()
    stream = RequestStream(director)
    stream.handle(headers_msg(mode=mode))
    stream.handle(body_msg(b'{"model": "m", ', False))
    (out,) = stream.handle(response_headers_msg(status=408, ctype="text/plain"))
    assert out.WhichOneof("response") == "response_headers" and not out.response_headers.HasField("response")
    assert stream._chunks == []
    stream.handle(response_body_msg(b"stream timeout", True))
    stream.close()
    assert director.outcomes == [] and in_flight(director) == 0


def test_an_envoy_reply_before_the_request_headers_passes_through():
    # a malformed request: Envoy's 400 reaches ext_proc's response path with no request phase at all
    stream = RequestStream(make_director())
    (out,) = stream.handle(response_headers_msg(status=400, ctype="text/plain"))
    assert out.WhichOneof("response") == "response_headers"
    assert stream.state is State.RESPONSE_BODY
