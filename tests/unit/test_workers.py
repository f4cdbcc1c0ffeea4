"""`epp serve --workers N` without gRPC: a worker's RequestStream and RemoteDirector talking to the
parent's PickService and real Director over a real unix socket (extproc.server.ipc)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import msgspec
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.datalayer.datastore import Datastore
from extproc.handlers.parsers import RequestParsers
from extproc.handlers.request_stream import RequestStream, State
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from extproc.server import ipc
from extproc.server.worker import RemoteDirector, _parsers
from extproc.server.workers import PickService
from pickers.config.parsers import DEFAULT_PARSERS
from pickers.config.strategies import build_profile
from pickers.framework.endpoint import EndpointSpec
from pickers.framework.scheduler import Scheduler
from pickers.indexes.prefix import ApproxPrefixIndex
from tests.unit.test_protocol import body_msg, completion_body, headers_msg, set_headers


def _director(endpoints: int = 3) -> Director:
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"ep-{i}", f"10.0.0.{i + 1}", 8000) for i in range(endpoints))
    index = ApproxPrefixIndex()
    scheduler = Scheduler(build_profile("default", index, rng=random.Random(0)))
    return Director(ds, scheduler, EppMetrics(pool_name="t"))


class Worker:
    """One worker's end of the socket: its RemoteDirector, fed the parent's frames as the worker process feeds it."""

    def __init__(self) -> None:
        self.link = ipc.FrameProtocol(self._frame, self._lost)
        self.director = RemoteDirector(self.link)
        self.parsers = RequestParsers(DEFAULT_PARSERS)

    def _frame(self, frame: bytes) -> None:
        msg = ipc.worker_decoder.decode(frame)
        if type(msg) is ipc.Setup:
            self.parsers = _parsers(msg.specs)
            self.director.send_body = msg.send_body
        else:
            self.director.on_message(msg)

    def _lost(self) -> None:
        self.director.parent_lost()

    async def drive(self, stream: RequestStream, msgs: list[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
        """What the servicer does with each message (extproc.server.runner.ExtProcServicer._serve)."""
        out: list[pb.ProcessingResponse] = []
        for m in msgs:
            answer = stream.handle(m)
            if stream.needs_data:
                out += answer
                await self.director.prepare(stream.request, stream.subset)
                answer = await self.director.admit(stream, None)
            if stream.report_due is not None:
                await stream.complete_report()
            out += answer
        return out

    def stream(self) -> RequestStream:
        return RequestStream(self.director, parsers=self.parsers)


@pytest.fixture
async def parent(tmp_path: Path):
    director = _director()
    service = PickService(director, tmp_path / "p.sock", lambda: ipc.Setup(ipc.parser_specs(DEFAULT_PARSERS), False))
    await service.start()
    yield service
    await service.close()


async def connect(service: PickService, index: int = 0) -> Worker:
    w = Worker()
    await asyncio.get_running_loop().create_unix_connection(lambda: w.link, str(service.path))
    w.link.send_frame(ipc.encode_hello(index, 4242 + index))
    await settle(lambda: any(c.index == index for c in service.conns), "the worker counted in")
    return w


def response_msgs(usage: dict[str, int] | None = None) -> list[pb.ProcessingRequest]:
    rh = [base_pb2.HeaderValue(key=":status", raw_value=b"200"), base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")]
    body = json.dumps({"choices": [{"text": "ok"}], "usage": usage or {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
    return [pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=rh))),
            pb.ProcessingRequest(response_body=pb.HttpBody(body=body.encode(), end_of_stream=True))]  # fmt: skip


async def settle(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(400):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"not reached: {what}")


def in_flight(service: PickService) -> int:
    return sum(ep.in_flight for ep in service.director.datastore.candidates())


async def test_a_worker_routes_with_the_parents_pick_and_its_end_settles_the_parents_books(parent):
    w = await connect(parent)
    stream = w.stream()
    out = await w.drive(stream, [headers_msg(), body_msg(completion_body("a shared prompt " * 20), True)])
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"]
    dest = set_headers(out[0])["x-gateway-destination-endpoint"]
    assert dest.startswith("10.0.0.")
    lb = out[0].dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["x-gateway-destination-endpoint"].string_value == dest
    await settle(lambda: in_flight(parent) == 1, "the pick's in-flight count in the parent")
    assert parent.view()[0]["in_flight"] == 1
    await w.drive(stream, response_msgs())
    stream.close()
    assert stream.state is State.DONE
    await settle(lambda: in_flight(parent) == 0, "the end released in the parent")
    assert parent.view()[0]["picks"] == 1 and parent.view()[0]["in_flight"] == 0
    decision = parent.director.decisions[-1]
    assert decision[3] == dest  # the parent's decision log names the worker's route


async def test_two_workers_share_one_prefix_index_so_a_prompt_follows_its_cache(parent):
    one, two = await connect(parent, 0), await connect(parent, 1)
    prompt = "the same long system prompt that both workers see " * 30
    dests = []
    for w in (one, two, one, two):
        stream = w.stream()
        out = await w.drive(stream, [headers_msg(), body_msg(completion_body(prompt), True)])
        dests.append(set_headers(out[0])["x-gateway-destination-endpoint"])
        await w.drive(stream, response_msgs())
        stream.close()
    assert len(set(dests)) == 1  # one index: the second worker's requests find the first's blocks
    assert [v["picks"] for v in parent.view()] == [2, 2]


async def test_a_request_with_nothing_to_parse_waits_for_its_pick_too(parent):
    w = await connect(parent)
    stream = w.stream()
    out = await w.drive(stream, [headers_msg(path="/v1/models", method="GET", eos=True)])
    assert [r.WhichOneof("response") for r in out] == ["request_headers"]
    assert set_headers(out[0])["x-gateway-destination-endpoint"].startswith("10.0.0.")
    assert stream.state is State.ROUTED
    stream.close()
    await settle(lambda: in_flight(parent) == 0, "the passthrough request released")


async def test_the_parents_refusal_is_the_workers_answer_and_is_counted_once(parent):
    parent.director.datastore.set_endpoints([])
    w = await connect(parent)
    stream = w.stream()
    out = await w.drive(stream, [headers_msg(), body_msg(completion_body(), True)])
    assert out[-1].immediate_response.status.code == 503
    assert stream.state is State.REJECTED
    await settle(lambda: parent.director.decisions and parent.director.decisions[-1][7] is not None, "the refusal recorded")
    await asyncio.sleep(0.2)  # a second record, if the worker also reported the parent's own refusal, would be here by now
    refusals = [d for d in parent.director.decisions if d[7] is not None]
    assert [d[7] for d in refusals] == ["ServiceUnavailable"]  # recorded once, in the parent, where the pick was refused


async def test_a_worker_that_dies_mid_request_leaves_no_in_flight_count_behind(parent):
    w = await connect(parent)
    stream = w.stream()
    await w.drive(stream, [headers_msg(), body_msg(completion_body(), True)])
    await settle(lambda: in_flight(parent) == 1, "in flight")
    w.link.abort()  # the process is gone: its socket closes under it
    await settle(lambda: in_flight(parent) == 0 and not parent.conns, "the dead worker's request settled as aborted")


async def test_a_worker_whose_parent_is_gone_answers_503_not_a_hang(parent):
    w = await connect(parent)
    await parent.close()
    await settle(lambda: w.director.lost, "the worker saw the parent go")
    stream = w.stream()
    out = await w.drive(stream, [headers_msg(), body_msg(completion_body(), True)])
    assert out[-1].immediate_response.status.code == 503


async def test_a_config_reload_reaches_the_workers_parsers(parent):
    w = await connect(parent)
    stream = w.stream()
    body = json.dumps({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()
    out = await w.drive(stream, [headers_msg(path="/v1/messages"), body_msg(body, True)])
    assert set_headers(out[0])["x-gateway-destination-endpoint"].startswith("10.0.0.")  # anthropic-parser's, by default
    stream.close()
    openai_only = ipc.Setup([("openai-parser", "openai-parser")], False)
    parent._setup = lambda: openai_only
    parent.config_changed()
    await settle(lambda: w.parsers.resolve("/v1/messages") is None, "the new parsers in the worker")
    stream = w.stream()
    out = await w.drive(stream, [headers_msg(path="/v1/messages"), body_msg(b"{}", True)])
    assert out[-1].immediate_response.status.code == 400


def test_messages_round_trip_through_msgpack():
    from extproc.handlers.usage import Usage

    usage = msgspec.json.decode(b'{"prompt_tokens":5,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":3}}', type=Usage)
    msg = ipc.Finish(7, 200, True, usage, False, "10.0.0.1:8000", 0.5, 0.1, 3)
    frame = ipc.encode(msg)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert ipc.parent_decoder.decode(frame[4:]) == msg


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["serve", "--workers", "0"], "--workers: expected at least 1, got 0"),
        (["serve", "--workers", "2", "--grpc-port", "0"], "--grpc-port: --workers N needs a --grpc-port number"),
        (["up", "--workers", "0"], "--workers: expected at least 1, got 0"),
    ],
)
def test_bad_worker_counts_are_refused_with_the_flag_named(argv, fragment, capsys):
    from extproc.cli.main import main

    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
