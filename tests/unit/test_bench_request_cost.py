"""bench.request_cost runs small and prints its rows (the numbers themselves are the benchmark's business)."""

from __future__ import annotations

import grpc
import pytest

from bench import request_cost


def test_the_servicer_comparison_prints_the_three_servicers(capsys: pytest.CaptureFixture[str]) -> None:
    assert request_cost.main(["--servicer", "--requests", "20", "--rounds", "1", "--endpoints", "2", "--prompt-chars", "40", "--chunks", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("EPP servicer, body idle timeout on", "EPP servicer, body idle timeout off", "no-op servicer"):
        assert row in out
    assert "1.0x the no-op's" in out


def test_the_memory_context_plays_a_life_and_counts_the_answers() -> None:
    import asyncio

    from bench.noop_extproc import NoopServicer

    (req, resp), *_ = request_cost.lives(chunks=2, prompt_chars=40)
    ctx = request_cost._MemoryContext(req + resp)
    asyncio.run(NoopServicer("10.0.0.1:8000").Process(None, ctx))  # type: ignore[arg-type]
    assert ctx.written == len(req + resp)  # the no-op answers every message


def test_the_burning_no_op_server_spends_its_cpu_once_per_request_and_answers_the_same() -> None:
    import asyncio
    import time

    import pytest

    from bench.noop_extproc import NoopServicer, main

    (req, resp), *_ = request_cost.lives(chunks=2, prompt_chars=40)
    ctx = request_cost._MemoryContext(req + resp)
    t = time.thread_time()
    asyncio.run(NoopServicer("10.0.0.1:8000", burn_us=20_000).Process(None, ctx))  # type: ignore[arg-type]
    assert time.thread_time() - t >= 0.02  # a lower bound the burn guarantees (CPU time, not a timing)
    assert ctx.written == len(req + resp)
    with pytest.raises(SystemExit):
        main(["--port", "1", "--health-port", "2", "--destination", "x:1", "--burn-us", "-5"])


class _Recording(request_cost._MemoryContext):
    """The memory context, keeping what was written and the order of reads and writes."""

    __slots__ = ("answers", "order")

    def __init__(self, messages: list) -> None:  # type: ignore[type-arg]
        super().__init__(messages)
        self.answers: list = []  # type: ignore[type-arg]
        self.order: list[str] = []

    async def read(self) -> object:
        msg = await super().read()
        if msg is not grpc.aio.EOF:
            self.order.append("read " + msg.WhichOneof("request"))  # type: ignore[attr-defined]
        return msg

    async def write(self, message: object) -> None:
        self.answers.append(message)
        self.order.append("write " + message.WhichOneof("response"))  # type: ignore[attr-defined]


def test_the_no_op_server_answering_as_the_epp_writes_the_epps_answers_in_its_order() -> None:
    import asyncio

    from bench.noop_extproc import NoopServicer
    from extproc.handlers.request_stream import RequestLimits
    from extproc.server.runner import ExtProcServicer

    (req, resp), *_ = request_cost.lives(chunks=2, prompt_chars=40)
    director = request_cost.build_director(2, "default", metrics=False)
    epp, shaped, plain = _Recording(req + resp), _Recording(req + resp), _Recording(req + resp)
    asyncio.run(ExtProcServicer(director, RequestLimits()).Process(None, epp))  # type: ignore[arg-type]
    asyncio.run(NoopServicer("10.0.0.1:8000", epp_answers=True).Process(None, shaped))  # type: ignore[arg-type]
    asyncio.run(NoopServicer("10.0.0.1:8000").Process(None, plain))  # type: ignore[arg-type]

    assert shaped.order == epp.order
    assert epp.order[:3] == ["read request_headers", "read request_body", "write request_headers"]  # answered at the body's end
    assert plain.order[:2] == ["read request_headers", "write request_headers"]  # the plain no-op answers them at once
    routed_epp, routed = epp.answers[0], shaped.answers[0]
    assert routed.request_headers.response.clear_route_cache == routed_epp.request_headers.response.clear_route_cache

    def headers(answer: object) -> list[tuple[str, int]]:
        return [(o.header.key, o.append_action) for o in answer.request_headers.response.header_mutation.set_headers]  # type: ignore[attr-defined]

    # (the EPP adds an x-request-id only where the request came without one; Envoy sets it)
    assert headers(routed) == [h for h in headers(routed_epp) if h[0] != "x-request-id"]
    assert [k for k, _ in headers(routed)] == ["x-gateway-destination-endpoint", "content-length"]
    assert set(routed.dynamic_metadata.fields) == set(routed_epp.dynamic_metadata.fields) == {"envoy.lb"}
    lb = routed.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["x-gateway-destination-endpoint"].string_value == "10.0.0.1:8000"
