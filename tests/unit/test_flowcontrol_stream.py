"""Flow control on the request path, in-process: RequestStream and the real Director and scheduler with a
FlowController built from test doubles (tests.unit.test_flowcontrol_runtime). A queued request's stream
gets no answer until it is dispatched; a drop answers with llm-d's status and dropped reason; with flow
control off nothing changes (sheddable requests are still refused at saturation).
"""

from __future__ import annotations

import asyncio

from extproc.flowcontrol.controller import FlowController
from extproc.handlers.request_stream import RequestStream, State
from extproc.requestcontrol.director import Director
from tests.unit.test_director import real_director
from tests.unit.test_flowcontrol_runtime import Clock, Pool, Timers, config, settle
from tests.unit.test_protocol import (
    completion_body,
    response_body_msg,
    response_headers_msg,
    send_request,
)


class InFlightDetector:
    """Saturated when the datastore's in-flight requests reach `capacity`."""

    type = name = "datastore-in-flight-double"

    def __init__(self, director: Director, capacity: int):
        self.director, self.capacity = director, capacity

    def saturation(self, endpoints):
        return self.director.datastore.total_in_flight() / self.capacity


def flow_controlled(capacity=1, **kw):
    director = real_director()
    clock = Clock()
    timers = Timers(clock)
    cfg = config(Pool(), **kw)
    object.__setattr__(cfg, "saturation_detector", InFlightDetector(director, capacity))
    fc = FlowController(cfg, director.datastore.candidates, clock=clock, call_later=timers)
    director.flow_control = fc
    return director, fc, timers


async def start(director: Director, **headers) -> tuple[RequestStream, asyncio.Task]:
    stream = RequestStream(director)
    assert send_request(stream, completion_body(stream=True), extra=headers) == []
    assert stream.state is State.PREPARING
    await director.prepare(stream.request)
    return stream, asyncio.ensure_future(director.admit(stream, None))


def end(stream: RequestStream) -> None:
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    stream.handle(response_body_msg(b"data: [DONE]\n\n", True))


async def test_a_queued_stream_is_answered_when_the_request_before_it_ends():
    director, fc, _ = flow_controlled(capacity=1)
    first, t1 = await start(director)
    await settle()
    assert t1.done() and t1.result()[0].HasField("request_headers")  # routed at once
    second, t2 = await start(director)
    await settle()
    assert not t2.done() and fc.count == 1 and second.routing is None
    end(first)
    await settle()
    assert t2.done() and t2.result()[0].HasField("request_headers") and second.routing is not None
    end(second)
    assert director.datastore.total_in_flight() == 0 and fc.count == 0


async def test_a_ttl_drop_is_an_immediate_429_with_the_dropped_reason():
    director, fc, timers = flow_controlled(capacity=1, ttl=1.0)
    first, _ = await start(director)
    second, t2 = await start(director, **{"x-gateway-inference-fairness-id": "tenant-a"})
    await settle()
    timers.advance(1.0)
    await settle()
    (resp,) = t2.result()
    ir = resp.immediate_response
    assert ir.status.code == 429
    assert {h.header.key: h.header.raw_value for h in ir.headers.set_headers}["x-llm-d-request-dropped-reason"] == b"rejected-ttl-expired"
    assert second.state is State.REJECTED
    end(first)
    assert director.datastore.total_in_flight() == 0 and fc.count == 0


async def test_a_client_gone_while_queued_leaves_nothing_behind():
    director, fc, _ = flow_controlled(capacity=1)
    first, _ = await start(director)
    second, t2 = await start(director)
    await settle()
    t2.cancel()
    await settle()
    second.close()  # the servicer's finally
    assert fc.count == 0 and fc.byte_size == 0
    end(first)
    assert director.datastore.total_in_flight() == 0


async def test_with_flow_control_off_the_request_path_is_unchanged():
    director = real_director()
    stream = RequestStream(director)
    out = send_request(stream, completion_body())
    assert out and out[0].HasField("request_headers") and not director.needs_data(stream.request)
