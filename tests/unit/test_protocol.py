"""The request state machine, driven with ext_proc messages and no gRPC or network."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.handlers.request_stream import STREAM_CHUNK, ProtocolError, RequestLimits, RequestStream, State
from tests.unit.fake_director import FakeDirector

FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
ADDRS = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]


def make_director(addrs=ADDRS, *, max_endpoints=1, scores=None) -> FakeDirector:
    return FakeDirector(addrs, max_endpoints, scores)


def headers_msg(path="/v1/completions", method="POST", eos=False, extra=None, mode=FULL_DUPLEX, subset=None):
    hs = {":path": path, ":method": method, ":authority": "gw", "content-type": "application/json", **(extra or {})}
    msg = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs.items()]),
            end_of_stream=eos,
        ),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=mode, response_body_mode=FULL_DUPLEX),
    )
    if subset is not None:
        ns = msg.metadata_context.filter_metadata["envoy.lb.subset_hint"]
        if isinstance(subset, str):
            ns.fields["x-gateway-destination-endpoint-subset"].string_value = subset
        else:
            lst = ns.fields["x-gateway-destination-endpoint-subset"].list_value
            lst.SetInParent()
            for s in subset:
                lst.values.add().string_value = s
    return msg


def body_msg(data: bytes, eos: bool):
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def completion_body(prompt="Hello there", **extra) -> bytes:
    return json.dumps({"model": "m", "prompt": prompt, "max_tokens": 4, **extra}).encode()


def set_headers(resp: pb.ProcessingResponse, which="request_headers") -> dict[str, str]:
    common = getattr(resp, which).response
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def send_request(stream: RequestStream, body: bytes, *, chunk=None, **hkw) -> list[pb.ProcessingResponse]:
    out = stream.handle(headers_msg(**hkw))
    chunk = chunk or max(1, len(body))
    for i in range(0, len(body), chunk):
        out += stream.handle(body_msg(body[i : i + chunk], i + chunk >= len(body)))
    return out


def test_full_duplex_answers_headers_then_body_after_the_last_chunk():
    stream = RequestStream(make_director())
    body = completion_body()
    assert stream.handle(headers_msg()) == []
    assert stream.handle(body_msg(body[:10], False)) == []
    out = stream.handle(body_msg(body[10:], True))
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"]
    hdr = set_headers(out[0])
    assert hdr["x-gateway-destination-endpoint"] in ADDRS
    assert hdr["content-length"] == str(len(body))
    assert out[0].request_headers.response.clear_route_cache
    lb = out[0].dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["x-gateway-destination-endpoint"].string_value == hdr["x-gateway-destination-endpoint"]
    streamed = out[1].request_body.response.body_mutation.streamed_response
    assert streamed.body == body and streamed.end_of_stream
    assert stream.state is State.ROUTED


def test_big_body_comes_back_in_62000_byte_chunks_in_order():
    stream = RequestStream(make_director())
    body = completion_body("x" * (8 * 1024 * 1024))
    out = send_request(stream, body, chunk=16_384)
    chunks = [r.request_body.response.body_mutation.streamed_response for r in out[1:]]
    assert all(len(c.body) <= STREAM_CHUNK for c in chunks)
    assert b"".join(c.body for c in chunks) == body
    assert [c.end_of_stream for c in chunks] == [False] * (len(chunks) - 1) + [True]


def test_buffered_mode_answers_headers_at_once_and_routes_in_the_body_answer():
    stream = RequestStream(make_director())
    first = stream.handle(headers_msg(mode=BUFFERED))
    assert [r.WhichOneof("response") for r in first] == ["request_headers"]
    assert not first[0].request_headers.response.header_mutation.set_headers
    out = stream.handle(body_msg(completion_body(), True))
    assert len(out) == 1
    assert set_headers(out[0], "request_body")["x-gateway-destination-endpoint"] in ADDRS
    assert out[0].request_body.response.clear_route_cache
    assert not out[0].request_body.response.HasField("body_mutation")


def test_request_id_is_generated_when_missing_and_kept_when_sent():
    stream = RequestStream(make_director(), new_request_id=lambda: "generated-1")
    assert set_headers(send_request(stream, completion_body())[0])["x-request-id"] == "generated-1"
    stream = RequestStream(make_director())
    out = send_request(stream, completion_body(), extra={"x-request-id": "client-7"})
    assert "x-request-id" not in set_headers(out[0])
    assert stream.request.request_id == "client-7"


def test_client_destination_header_is_overwritten_not_appended():
    stream = RequestStream(make_director(["10.0.0.1:8000"]))
    out = send_request(stream, completion_body(), extra={"x-gateway-destination-endpoint": "6.6.6.6:66"})
    opt = next(h for h in out[0].request_headers.response.header_mutation.set_headers if h.header.key == "x-gateway-destination-endpoint")
    assert opt.header.raw_value == b"10.0.0.1:8000"
    assert opt.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def test_fallback_endpoints_are_an_ordered_distinct_list():
    stream = RequestStream(make_director(max_endpoints=3))
    dest = set_headers(send_request(stream, completion_body())[0])["x-gateway-destination-endpoint"].split(",")
    assert sorted(dest) == sorted(ADDRS)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"prompt": "hi"}).encode(), "model not found"),
        (json.dumps({"model": "m"}).encode(), "'prompt' is required"),
        (json.dumps({"model": 5, "prompt": "x"}).encode(), "'model' must be a string"),
        (json.dumps({"model": "m", "prompt": "x", "stream": "yes"}).encode(), "'stream' must be a boolean"),
    ],
)
def test_bad_bodies_get_400_with_a_readable_message(body, fragment):
    director = make_director()
    stream = RequestStream(director)
    out = send_request(stream, body)
    imm = out[-1].immediate_response
    assert imm.status.code == 400
    assert imm.body.decode().startswith("inference error: BadRequest - ")
    assert fragment in imm.body.decode()
    assert stream.state is State.REJECTED
    assert stream.handle(body_msg(b"more", True)) == []  # later messages are ignored, not errors


def test_chat_without_messages_is_400():
    out = send_request(RequestStream(make_director()), json.dumps({"model": "m"}).encode(), path="/v1/chat/completions")
    assert out[-1].immediate_response.status.code == 400
    assert b"'messages' is required" in out[-1].immediate_response.body


def test_empty_pool_is_503_with_dropped_reason():
    out = send_request(RequestStream(make_director([])), completion_body())
    imm = out[-1].immediate_response
    assert imm.status.code == 503
    assert imm.body.startswith(b"inference error: ServiceUnavailable - ")
    assert {h.header.key: h.header.raw_value for h in imm.headers.set_headers}["x-llm-d-request-dropped-reason"] == b"rejected-no-endpoints"


def test_body_over_the_limit_is_413():
    stream = RequestStream(make_director(), limits=RequestLimits(max_body_bytes=100))
    out = send_request(stream, completion_body("y" * 200), chunk=50)
    assert out[-1].immediate_response.status.code == 413


@pytest.mark.parametrize("subset", [["10.0.0.2:8000"], "10.0.0.2", ["10.0.0.2:8000", "9.9.9.9:1"]])
def test_subset_hint_restricts_the_pick(subset):
    for _ in range(10):
        out = send_request(RequestStream(make_director()), completion_body(), subset=subset)
        assert set_headers(out[0])["x-gateway-destination-endpoint"] == "10.0.0.2:8000"


@pytest.mark.parametrize("subset", [["9.9.9.9:1"], []])
def test_subset_hint_matching_nothing_is_503(subset):
    out = send_request(RequestStream(make_director()), completion_body(), subset=subset)
    assert out[-1].immediate_response.status.code == 503


def test_get_without_body_is_routed_on_the_headers():
    stream = RequestStream(make_director())
    out = stream.handle(headers_msg(path="/v1/models", method="GET", eos=True))
    assert set_headers(out[0])["x-gateway-destination-endpoint"] in ADDRS
    assert stream.state is State.ROUTED


def test_unknown_post_path_passes_through_unparsed():
    stream = RequestStream(make_director())
    out = stream.handle(headers_msg(path="/tokenize"))
    assert set_headers(out[0])["x-gateway-destination-endpoint"] in ADDRS
    echoed = stream.handle(body_msg(b"not even json", True))
    assert echoed[0].request_body.response.body_mutation.streamed_response.body == b"not even json"


def test_body_ended_by_trailers_is_routed_then_trailers_answered():
    stream = RequestStream(make_director())
    stream.handle(headers_msg())
    stream.handle(body_msg(completion_body(), False))
    out = stream.handle(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "request_trailers"]
    assert not out[1].request_body.response.body_mutation.streamed_response.end_of_stream


def response_headers_msg(status=200, ctype="application/json", eos=False):
    hs = [base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()), base_pb2.HeaderValue(key="content-type", raw_value=ctype.encode())]
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=hs), end_of_stream=eos))


def response_body_msg(data: bytes, eos: bool):
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos))


def in_flight(director: FakeDirector) -> int:
    return director.in_flight


def test_streaming_response_usage_is_read_and_in_flight_released():
    director = make_director()
    stream = RequestStream(director)
    send_request(stream, completion_body(stream=True))
    assert in_flight(director) == 1
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    sse = (
        b'data: {"choices":[{"text":"a"}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":4,"total_tokens":11}}\n\n'
        b"data: [DONE]\n\n"
    )
    outs = []
    for i in range(0, len(sse), 13):  # split lines across chunks
        outs += stream.handle(response_body_msg(sse[i : i + 13], i + 13 >= len(sse)))
    assert b"".join(o.response_body.response.body_mutation.streamed_response.body for o in outs) == sse
    assert in_flight(director) == 0
    (outcome,) = director.outcomes
    assert outcome.streaming and not outcome.aborted
    assert (outcome.usage.prompt_tokens, outcome.usage.completion_tokens) == (7, 4)
    stream.close()
    assert len(director.outcomes) == 1  # settled once


def test_json_response_usage_is_read_at_the_end():
    director = make_director()
    stream = RequestStream(director)
    send_request(stream, completion_body())
    stream.handle(response_headers_msg())
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()
    stream.handle(response_body_msg(body[:9], False))
    stream.handle(response_body_msg(body[9:], True))
    assert director.outcomes[0].usage.completion_tokens == 2
    assert not director.outcomes[0].streaming


def test_aborted_stream_releases_in_flight_once():
    director = make_director()
    stream = RequestStream(director)
    send_request(stream, completion_body(stream=True))
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    stream.handle(response_body_msg(b'data: {"x":1}\n\n', False))
    assert in_flight(director) == 1
    stream.close()
    stream.close()
    assert in_flight(director) == 0
    assert len(director.outcomes) == 1 and director.outcomes[0].aborted


def test_upstream_error_status_is_reported():
    director = make_director()
    stream = RequestStream(director)
    send_request(stream, completion_body())
    stream.handle(response_headers_msg(status=503, eos=True))
    assert director.outcomes[0].status == 503
    assert in_flight(director) == 0


def test_response_trailers_get_an_empty_answer():
    stream = RequestStream(make_director())
    send_request(stream, completion_body())
    stream.handle(response_headers_msg())
    stream.handle(response_body_msg(b"{}", False))
    out = stream.handle(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    assert out[0].WhichOneof("response") == "response_trailers"
    assert stream.state is State.DONE


@pytest.mark.parametrize(
    "msg",
    [
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x")),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x")),
        pb.ProcessingRequest(),
    ],
)
def test_out_of_order_message_is_one_protocol_error_naming_state_and_event(msg):
    stream = RequestStream(make_director())
    with pytest.raises(ProtocolError, match="not allowed in state 'start'"):
        stream.handle(msg)
    resp = stream.protocol_error_response(ProtocolError(State.START, "response_body"))
    assert resp.immediate_response.status.code == 500


def test_explained_scores_go_into_lb_metadata():
    stream = RequestStream(make_director(scores='{"queue-scorer":{"10.0.0.1:8000":1.0}}'))
    out = send_request(stream, completion_body())
    scores = out[0].dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint-scores"].string_value
    assert json.loads(scores) == {"queue-scorer": {"10.0.0.1:8000": 1.0}}


def test_plugin_headers_reach_the_upstream_request_and_the_client_response():
    director = FakeDirector(request_headers={"x-prefiller-host-port": "10.0.0.9:8000"}, response_headers={"x-session-token": "t"})
    stream = RequestStream(director)
    out = send_request(stream, completion_body())
    assert set_headers(out[0])["x-prefiller-host-port"] == "10.0.0.9:8000"
    resp = stream.handle(response_headers_msg())
    assert {h.header.key: h.header.raw_value for h in resp[0].response_headers.response.header_mutation.set_headers}["x-session-token"] == b"t"


def test_outcome_carries_gateway_timings():
    ticks = iter([10.0, 10.5, 12.0])  # headers, first response byte, end
    director = make_director()
    stream = RequestStream(director, clock=lambda: next(ticks))
    send_request(stream, completion_body(stream=True))
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    stream.handle(response_body_msg(b"", False))  # empty chunks do not count as the first byte
    stream.handle(response_body_msg(b'data: {"x":1}\n\n', False))
    stream.handle(response_body_msg(b"data: [DONE]\n\n", True))
    (outcome,) = director.outcomes
    assert (outcome.first_byte, outcome.duration, outcome.body_chunks) == (0.5, 2.0, 2)


def test_stream_cut_after_done_marker_counts_as_complete_not_aborted():
    director = make_director()
    stream = RequestStream(director)
    send_request(stream, completion_body(stream=True))
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    stream.handle(response_body_msg(b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\ndata: [DONE]\n\n', False))
    stream.close()  # the client hung up before Envoy sent the end of stream
    (outcome,) = director.outcomes
    assert not outcome.aborted and outcome.usage.completion_tokens == 2
    assert in_flight(director) == 0
