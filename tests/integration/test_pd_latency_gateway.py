"""latency-pd-decider end to end: real Envoy -> llm-epp (pickers/configs/pd-latency.yaml, --explain-scores)
-> pd-sidecar -> simulated prefill and decode servers. A long prompt goes to the prefill server only
while the decode server has a running batch its local prefill would stall; an untried CPU prefill
server (other KV geometry) is not trusted with it; /debug/decisions shows the decision's inputs."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from extproc.devstack.stack import LocalStack, PdPool
from tests.integration.conftest import MODEL, make_stack
from tests.integration.test_pd_gateway import legs

pytestmark = pytest.mark.envoy

CONFIG = Path(__file__).resolve().parents[2] / "pickers" / "configs" / "pd-latency.yaml"
D = "latency-pd-decider"


def long_prompt() -> str:
    return f"[{uuid.uuid4()}] " + "Summarise the quarterly report on shipping delays. " * 85  # ~1,100 tokens


def last_decision(stack: LocalStack) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.epp_admin_port}/debug/decisions?limit=1", timeout=5) as r:
        (decision,) = json.loads(r.read())["decisions"]
    return decision


def complete(stack: LocalStack, prompt: str, max_tokens: int) -> None:
    c = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0)
    assert c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens).usage.completion_tokens == max_tokens


@contextmanager
def a_running_request(stack: LocalStack) -> Iterator[None]:
    """While the body runs, a long answer streams from the decode server (the EPP counts it in flight);
    it is dropped when the body is done. Its prompt (~300 tokens) is above pd-latency.yaml's
    prefillEndpointsBelowTokens, so it cannot land on the prefill server, and the idle decode server
    prefills it itself."""
    streaming, done = threading.Event(), threading.Event()

    def decode() -> None:
        body = {"model": MODEL, "prompt": "tell me a long story " * 60, "max_tokens": 2000, "stream": True}
        with httpx.stream("POST", f"{stack.base_url}/completions", json=body, timeout=30) as r:
            for _ in r.iter_lines():
                streaming.set()
                if done.is_set():
                    return

    t = threading.Thread(target=decode)
    t.start()
    try:
        assert streaming.wait(10)
        yield
    finally:
        done.set()
        t.join(30)


def pd_stack(tmp: Path, *prefill_args: str) -> LocalStack:
    return make_stack(tmp, pd=PdPool(prefill=1, decode=1, prefill_sim_args=prefill_args), sim_args=("--time-scale", "1"),
                      epp_args=("--config-file", str(CONFIG), "--explain-scores"))  # fmt: skip


def test_a_long_prompt_is_prefilled_remotely_only_when_a_local_prefill_would_stall_a_running_batch(tmp_path):
    with pd_stack(tmp_path) as s:
        before = legs(s)
        complete(s, long_prompt(), 2)  # the decode server is idle: it prefills the prompt itself
        assert legs(s) == before
        d = last_decision(s)["scores"]
        assert d[f"{D}/slowdown_ms"] == {k: 0.0 for k in d[f"{D}/local_ttft_ms"]}
        assert list(d[f"{D}/disaggregate"].values()) == [0.0]
        with a_running_request(s):
            # counted from here: under load the fitted local rate may send the running request's own
            # ~300-token prompt to the prefill server too, which is the model's call, not this test's
            during = legs(s)
            complete(s, long_prompt(), 2)
        assert legs(s) == (during[0] + 1, during[1] + 1)
        d = last_decision(s)["scores"]
        # the decision that sent it: local TTFT + the stall of the running request beat remote + transfer
        (decided,) = [v for v in d[f"{D}/disaggregate"].values()]
        assert decided == 1.0
        (local,), (slowdown,) = d[f"{D}/local_ttft_ms"].values(), d[f"{D}/slowdown_ms"].values()
        (remote,) = d[f"{D}/remote_ttft_ms"].values()
        assert slowdown > 0 and remote < local + slowdown
        assert f"127.0.0.1:{s.sim_ports[0]}" in d[f"{D}/remote_ttft_ms"]


def test_an_untried_cpu_prefill_server_is_not_trusted_with_a_long_prompt(tmp_path):
    with pd_stack(tmp_path, "--profile", "cpu") as s:
        before = legs(s)
        with a_running_request(s):
            complete(s, long_prompt(), 2)
        assert legs(s) == before  # prefilled on the decode (GPU) server, not ~50x slower on the CPU one
        d = last_decision(s)["scores"]
        assert list(d[f"{D}/disaggregate"].values()) == [0.0] and d[f"{D}/remote_ttft_ms"] == {}
