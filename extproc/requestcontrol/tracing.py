"""OpenTelemetry tracing (`epp serve --tracing`, the `otel` extra): one span per routed request,
parented on the client's W3C `traceparent` and propagated to the model server.

Imported only when tracing is on, so an EPP without it never loads OpenTelemetry and its Director
does no per-request tracing work. `TracedDirector` is the plain Director plus the spans.
"""

from __future__ import annotations

import os

from pickers.framework.errors import ConfigError

try:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as e:  # pragma: no cover - exercised by a test that hides the package
    raise ConfigError("needs OpenTelemetry, which is not installed: pip install 'llm-epp[otel]'", field="--tracing") from e

from extproc.handlers.request_stream import Outcome, Routing
from extproc.handlers.usage import Usage
from extproc.observability import bounds
from extproc.requestcontrol.director import Director
from pickers.framework.errors import RequestError
from pickers.framework.request import InferenceRequest

SPAN_NAME = "llm-epp.route"  # the request, from the pick to the end of the response
SCHEDULE_SPAN_NAME = "llm-epp.schedule"  # its child: admission and the scheduling decision
DEFAULT_SERVICE_NAME = "llm-epp"

_PROPAGATOR = TraceContextTextMapPropagator()  # stateless: traceparent/tracestate in and out


def build_provider(sample_ratio: float = 1.0, processor: SpanProcessor | None = None) -> TracerProvider:
    """A provider exporting over OTLP/gRPC (OTEL_EXPORTER_OTLP_ENDPOINT etc. as the SDK reads them),
    named by OTEL_SERVICE_NAME (default llm-epp). Requests with a sampled parent are always traced;
    `sample_ratio` applies to those that arrive without one."""
    if not 0.0 <= sample_ratio <= 1.0:
        raise ConfigError(f"expected a ratio in [0, 1], got {sample_ratio}", field="--tracing-sample-ratio")
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    if processor is None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            # xds-protos (Envoy's types) ships an older copy of opentelemetry/proto/*; whichever
            # package was installed last owns those files.
            raise ConfigError(
                f"the OTLP exporter cannot load ({e}); xds-protos overwrote opentelemetry-proto's files: "
                "pip install --no-deps --force-reinstall opentelemetry-proto",
                field="--tracing",
            ) from None
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        processor = BatchSpanProcessor(OTLPSpanExporter())  # exports on its own thread, off the event loop
    provider.add_span_processor(processor)
    return provider


class TracedDirector(Director):
    """The Director, with a span per request kept on `Routing.trace` from `route` to `finish`."""

    def __init__(self, *args, tracer: Tracer, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.tracer = tracer

    def route(self, request: InferenceRequest, subset: list[str] | None) -> Routing:
        parent = _PROPAGATOR.extract(request.headers)  # Envoy hands header names lower-cased
        span = self.tracer.start_span(SPAN_NAME, context=parent, kind=SpanKind.SERVER)
        # Attributes carry what bounds.py allows of a client's strings: spans wait in the exporter's queue.
        span.set_attribute("llm_epp.request_id", bounds.request_id(request.request_id))
        if request.model:
            span.set_attribute("gen_ai.request.model", bounds.model_name(request.model))
        ctx = set_span_in_context(span)
        schedule = self.tracer.start_span(SCHEDULE_SPAN_NAME, context=ctx, kind=SpanKind.INTERNAL)
        try:
            routing = super().route(request, subset)
        except RequestError as e:
            for s in (schedule, span):
                s.set_attribute("http.response.status_code", e.kind.status)
                s.set_attribute("error.type", e.kind.code)
                s.set_status(Status(StatusCode.ERROR, bounds.message(e.message)))
                s.end()
            raise
        except Exception as e:  # a bug: the span still ends, with the exception on it
            for s in (schedule, span):
                s.record_exception(e)
                s.set_status(Status(StatusCode.ERROR, f"internal error: {e}"))
                s.end()
            raise
        endpoints = routing.destination.split(",")
        for s in (schedule, span):
            s.set_attribute("llm_epp.endpoints", endpoints)
            s.set_attribute("llm_epp.profile", routing.profile)
        if routing.scores is not None:
            schedule.set_attribute("llm_epp.scores", routing.scores)
        schedule.end()
        span.set_attribute("llm_epp.endpoint", routing.primary.address)
        if request.target_model:
            span.set_attribute("llm_epp.target_model", bounds.model_name(request.target_model))
        if request.objective:
            span.set_attribute("llm_epp.objective", bounds.objective(request.objective))
        # The upstream request becomes a child of this span: the model server's spans join the trace.
        carrier: dict[str, str] = dict(routing.request_headers)
        _PROPAGATOR.inject(carrier, context=ctx)
        routing.request_headers = carrier
        routing.trace = span
        return routing

    def finish(self, routing: Routing, outcome: Outcome) -> None:
        super().finish(routing, outcome)
        span = routing.trace
        if not isinstance(span, Span):
            return
        routing.trace = None  # ends once
        if span.is_recording():
            _record_outcome(span, outcome)
        span.end()


def _record_outcome(span: Span, outcome: Outcome) -> None:
    span.set_attribute("llm_epp.aborted", outcome.aborted)
    span.set_attribute("llm_epp.streaming", outcome.streaming)
    if outcome.status is not None:
        span.set_attribute("http.response.status_code", outcome.status)
    if outcome.served:
        span.set_attribute("llm_epp.served", outcome.served)
    if outcome.first_byte is not None:
        span.set_attribute("llm_epp.ttft_ms", round(outcome.first_byte * 1000, 3))  # from the request headers
    usage = outcome.usage
    if isinstance(usage, Usage):
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
        span.set_attribute("llm_epp.cached_tokens", usage.cached_tokens)
    if outcome.aborted:
        span.set_status(Status(StatusCode.ERROR, "aborted before the response ended"))
    elif outcome.status is None or outcome.status >= 500:
        span.set_status(Status(StatusCode.ERROR, f"upstream status {outcome.status}"))

