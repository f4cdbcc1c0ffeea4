"""OpenTelemetry tracing (`--tracing`): spans per request through the state machine, no gRPC or network."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing needs the `otel` extra (pip install 'llm-epp[otel]')")

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from extproc.handlers.request_stream import RequestStream, State
from extproc.observability.bounds import MODEL_MAX, OBJECTIVE_MAX, REQUEST_ID_MAX
from extproc.requestcontrol.tracing import SCHEDULE_SPAN_NAME, SPAN_NAME, TracedDirector, build_provider
from extproc.server.runner import EppServer, ServeOptions
from pickers.framework.errors import ConfigError
from tests.unit.test_director import real_director
from tests.unit.test_protocol import ADDRS, body_msg, completion_body, headers_msg, send_request, set_headers

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def exporter():
    return InMemorySpanExporter()


def traced_director(exporter, ratio=1.0):
    plain = real_director()
    provider = build_provider(ratio, SimpleSpanProcessor(exporter))
    return TracedDirector(plain.datastore, plain.scheduler, plain.metrics, tracer=provider.get_tracer("test"))


def response_headers_msg(status=200, content_type="text/event-stream"):
    hs = {":status": str(status), "content-type": content_type}
    return pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs.items()])
        )
    )


def response_body_msg(data: bytes, eos: bool):
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos))


SSE = (
    b'data: {"choices":[{"text":"hi"}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
    b"data: [DONE]\n\n"
)


def complete(stream: RequestStream, extra=None) -> dict[str, str]:
    out = send_request(stream, completion_body(stream_options={"include_usage": True}, stream=True), extra=extra)
    upstream = set_headers(out[0])
    stream.handle(response_headers_msg())
    stream.handle(response_body_msg(SSE[:40], False))
    stream.handle(response_body_msg(SSE[40:], True))
    stream.close()
    return upstream


def spans_by_name(exporter):
    return {s.name: s for s in exporter.get_finished_spans()}


def test_span_is_parented_on_the_incoming_traceparent(exporter):
    complete(RequestStream(traced_director(exporter)), extra={"traceparent": PARENT})
    spans = spans_by_name(exporter)
    route = spans[SPAN_NAME]
    assert f"{route.context.trace_id:032x}" == TRACE_ID
    assert f"{route.parent.span_id:016x}" == "00f067aa0ba902b7"


def test_upstream_traceparent_carries_the_epp_span(exporter):
    upstream = complete(RequestStream(traced_director(exporter)), extra={"traceparent": PARENT})
    route = spans_by_name(exporter)[SPAN_NAME]
    assert upstream["traceparent"] == f"00-{TRACE_ID}-{route.context.span_id:016x}-01"


def test_request_without_traceparent_starts_a_trace_and_propagates_it(exporter):
    upstream = complete(RequestStream(traced_director(exporter)))
    route = spans_by_name(exporter)[SPAN_NAME]
    assert route.parent is None
    version, trace_id, span_id, flags = upstream["traceparent"].split("-")
    assert (trace_id, span_id) == (f"{route.context.trace_id:032x}", f"{route.context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled


def test_span_attributes_describe_the_request(exporter):
    complete(RequestStream(traced_director(exporter)), extra={"x-request-id": "req-1"})
    attrs = dict(spans_by_name(exporter)[SPAN_NAME].attributes)
    assert attrs["llm_epp.request_id"] == "req-1"
    assert attrs["gen_ai.request.model"] == "m"
    assert attrs["llm_epp.target_model"] == "m"
    assert attrs["llm_epp.endpoint"] in ADDRS
    assert list(attrs["llm_epp.endpoints"]) == [attrs["llm_epp.endpoint"]]
    assert attrs["llm_epp.profile"] == "default"
    assert attrs["http.response.status_code"] == 200
    assert attrs["llm_epp.aborted"] is False
    assert attrs["gen_ai.usage.input_tokens"] == 7
    assert attrs["gen_ai.usage.output_tokens"] == 3
    assert attrs["llm_epp.ttft_ms"] >= 0


def test_span_attributes_from_the_client_are_bounded(exporter):
    hostile = {"x-request-id": "r\n" * 10_000, "x-gateway-model-name-rewrite": "t" * 10_000, "x-gateway-inference-objective": "o" * 10_000}
    stream = RequestStream(traced_director(exporter))
    out = send_request(stream, completion_body(model="m\x00" * 2000), extra=hostile)
    assert json.loads(b"".join(r.request_body.response.body_mutation.streamed_response.body for r in out[1:]))["model"] == "t" * 10_000
    stream.close()
    attrs = dict(spans_by_name(exporter)[SPAN_NAME].attributes)
    caps = {"llm_epp.request_id": REQUEST_ID_MAX, "gen_ai.request.model": MODEL_MAX, "llm_epp.target_model": MODEL_MAX,
            "llm_epp.objective": OBJECTIVE_MAX}  # fmt: skip
    for key, cap in caps.items():
        assert len(attrs[key]) == cap and attrs[key].isprintable(), key


def test_scheduling_decision_is_a_child_span(exporter):
    complete(RequestStream(traced_director(exporter)))
    spans = spans_by_name(exporter)
    route, schedule = spans[SPAN_NAME], spans[SCHEDULE_SPAN_NAME]
    assert schedule.parent.span_id == route.context.span_id
    assert schedule.attributes["llm_epp.endpoints"] == route.attributes["llm_epp.endpoints"]
    assert schedule.end_time <= route.end_time


def test_aborted_request_ends_its_span_as_an_error(exporter):
    stream = RequestStream(traced_director(exporter))
    send_request(stream, completion_body())
    stream.handle(response_headers_msg(content_type="application/json"))
    stream.close()  # the client hung up mid-response
    route = spans_by_name(exporter)[SPAN_NAME]
    assert route.attributes["llm_epp.aborted"] is True
    assert route.status.status_code is StatusCode.ERROR


def test_upstream_error_status_marks_the_span(exporter):
    stream = RequestStream(traced_director(exporter))
    send_request(stream, completion_body())
    stream.handle(response_headers_msg(status=503, content_type="text/plain"))
    stream.handle(response_body_msg(b"down", True))
    stream.close()
    route = spans_by_name(exporter)[SPAN_NAME]
    assert route.attributes["http.response.status_code"] == 503
    assert route.status.status_code is StatusCode.ERROR


def test_refused_pick_ends_its_span_with_the_error(exporter):
    stream = RequestStream(traced_director(exporter))
    send_request(stream, completion_body(), subset="10.9.9.9")  # no endpoint matches: 503
    assert stream.state is State.REJECTED
    stream.close()
    spans = spans_by_name(exporter)
    assert set(spans) == {SPAN_NAME, SCHEDULE_SPAN_NAME}
    route = spans[SPAN_NAME]
    assert route.attributes["http.response.status_code"] == 503
    assert route.status.status_code is StatusCode.ERROR


def test_unsampled_requests_still_propagate_the_decision(exporter):
    upstream = complete(RequestStream(traced_director(exporter, ratio=0.0)))
    assert exporter.get_finished_spans() == ()
    assert not int(upstream["traceparent"].split("-")[3], 16) & 1  # not sampled: the model server need not trace it either


def test_sample_ratio_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="--tracing-sample-ratio"):
        build_provider(1.5)


def test_server_with_tracing_uses_the_traced_director():
    server = EppServer(ServeOptions(tracing=True))
    try:
        assert isinstance(server.director, TracedDirector)
    finally:
        assert server.tracer_provider is not None
        server.tracer_provider.shutdown()


def test_tracing_without_the_extra_is_a_clear_config_error(monkeypatch):
    monkeypatch.delitem(sys.modules, "extproc.requestcontrol.tracing", raising=False)
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"--tracing: .*pip install 'llm-epp\[otel\]'"):
        EppServer(ServeOptions(tracing=True))


def test_tracing_off_never_imports_opentelemetry():
    code = (
        "import sys; from extproc.server.runner import EppServer, ServeOptions; EppServer(ServeOptions());"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout.replace("'", '"')) == []
