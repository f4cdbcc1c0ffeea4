"""Hostile input thrown at the request state machine: whatever arrives, the outcome is a documented
answer (or one ProtocolError for out-of-order messages), never another exception, and the in-flight
books balance after close."""

from __future__ import annotations

import json

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.handlers.request_stream import ProtocolError, RequestLimits, RequestStream
from tests.unit.test_director import real_director
from tests.unit.test_protocol import (
    BUFFERED,
    FULL_DUPLEX,
    body_msg,
    headers_msg,
    make_director,
    response_body_msg,
    response_headers_msg,
)

DOCUMENTED = {400, 408, 413, 415, 429, 431, 500, 503}
PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/other", "/v1/completions?x=1"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=200),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
field_values = st.one_of(json_values, st.just("m"), st.lists(st.dictionaries(st.sampled_from(["role", "content", "type", "text"]), json_values)))
bodies = st.one_of(
    st.binary(max_size=2000),
    st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.sampled_from(["model", "prompt", "messages", "input", "stream", "max_tokens", "stream_options", "cache_salt"]), field_values)),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 200_000).map(lambda n: b'{"model":"m","prompt":' + b"[" * n),
    st.just(b'{"model":"m","prompt":"\\ud800\\udfff\\ud800"}'),
    st.just(b'{"model":"m","prompt":"\xff\xfe"}'),
)


def check(out):
    for r in out:
        assert isinstance(r, pb.ProcessingResponse)
        if r.HasField("immediate_response"):
            assert r.immediate_response.status.code in DOCUMENTED
            assert r.immediate_response.body.startswith(b"inference error: ")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=bodies,
    path=st.sampled_from(PATHS),
    mode=st.sampled_from([FULL_DUPLEX, BUFFERED]),
    cuts=st.lists(st.integers(0, 2000), max_size=8),
    limit=st.sampled_from([50, 10_000_000]),
)
def test_any_body_in_any_chunking_gets_a_documented_answer(body, path, mode, cuts, limit):
    director = make_director()
    stream = RequestStream(director, limits=RequestLimits(max_body_bytes=limit))
    check(stream.handle(headers_msg(path=path, mode=mode)))
    points = sorted({c for c in cuts if c < len(body)} | {0})
    pieces = [body[a:b] for a, b in zip(points, points[1:] + [len(body)])]
    for i, piece in enumerate(pieces):
        check(stream.handle(body_msg(piece, i == len(pieces) - 1)))
    stream.close()
    assert director.in_flight == 0


messages = st.sampled_from(["headers", "body", "body_eos", "trailers", "resp_headers", "resp_body", "resp_body_eos", "resp_trailers", "empty"])


def make_msg(kind: str) -> pb.ProcessingRequest:
    return {
        "headers": lambda: headers_msg(),
        "body": lambda: body_msg(b'{"model":"m",', False),
        "body_eos": lambda: body_msg(b'"prompt":"x"}', True),
        "trailers": lambda: pb.ProcessingRequest(request_trailers=pb.HttpTrailers()),
        "resp_headers": lambda: response_headers_msg(),
        "resp_body": lambda: response_body_msg(b'{"usage":', False),
        "resp_body_eos": lambda: response_body_msg(b"{}", True),
        "resp_trailers": lambda: pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
        "empty": lambda: pb.ProcessingRequest(),
    }[kind]()


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, max_size=12))
def test_messages_in_any_order_are_answered_or_refused_with_one_protocol_error(kinds):
    director = make_director()
    stream = RequestStream(director)
    for kind in kinds:
        try:
            check(stream.handle(make_msg(kind)))
        except ProtocolError as e:
            check([stream.protocol_error_response(e)])
            break
    stream.close()
    assert director.in_flight == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=bodies,
    mode=st.sampled_from([FULL_DUPLEX, BUFFERED]),
    reply=st.binary(max_size=300) | st.builds(lambda s: b'{"model":"target","x":' + json.dumps(s).encode() + b"}", st.text(max_size=50)),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    ctype=st.sampled_from(["application/json", "text/event-stream", "text/plain"]),
)
def test_with_every_model_rewritten_any_body_and_reply_get_documented_answers(body, mode, reply, cuts, ctype):
    from extproc.requestcontrol.rewrites import RewriteStore, Rule, Target

    director = real_director()
    director.rewrites = RewriteStore([Rule((), (Target("target"),))])
    stream = RequestStream(director)
    check(stream.handle(headers_msg(mode=mode)))
    check(stream.handle(body_msg(body, True)))
    if stream.routing is not None:
        check(stream.handle(response_headers_msg(ctype=ctype)))
        points = sorted({c for c in cuts if c < len(reply)} | {0})
        pieces = [reply[a:b] for a, b in zip(points, points[1:] + [len(reply)])]
        sent = b""
        for i, piece in enumerate(pieces):
            out = stream.handle(response_body_msg(piece, i == len(pieces) - 1))
            check(out)
            sent += b"".join(r.response_body.response.body_mutation.streamed_response.body for r in out)
        if stream.request.target_model != stream.request.model and ctype != "text/plain":
            assert b'"model":"target"' not in sent
        else:
            assert sent == reply
    stream.close()
    assert director.datastore.total_in_flight() == 0
