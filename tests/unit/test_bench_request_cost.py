"""bench.request_cost runs small and prints its rows (the numbers themselves are the benchmark's business)."""

from __future__ import annotations

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
