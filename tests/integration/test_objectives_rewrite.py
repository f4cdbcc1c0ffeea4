"""Real Envoy -> llm-epp -> simulated vLLM pool: a model rewrite rule sends `alias` to the simulators'
model and the client reads `alias` back, streamed or not; a sheddable request gets 429 while the
simulators' metrics say the pool is saturated, and a request that is not sheddable still goes through."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import MODEL, epp_metric, make_stack

pytestmark = pytest.mark.envoy

ALIAS = "alias"
REWRITES = f"""\
- matches: [{{model: {{type: Exact, value: {ALIAS}}}}}]
  targets: [{{modelRewrite: {MODEL}, weight: 1}}]
"""
OBJECTIVES = "- {name: batch, priority: -1}\n- {name: interactive, priority: 5}\n"


@pytest.fixture(scope="module", params=["FULL_DUPLEX_STREAMED", "BUFFERED"])
def stack(request, tmp_path_factory) -> Iterator:
    tmp = tmp_path_factory.mktemp("rewrite")
    (tmp / "rewrites.yaml").write_text(REWRITES)
    (tmp / "objectives.yaml").write_text(OBJECTIVES)
    epp_args = ("--model-rewrites", str(tmp / "rewrites.yaml"), "--objectives", str(tmp / "objectives.yaml"),
                "--metrics-staleness-threshold", "500ms")  # fmt: skip
    with make_stack(tmp, sims=2, epp_args=epp_args, request_body_mode=request.param) as s:
        yield s


def completion(stack, model: str, *, stream: bool = False, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"model": model, "prompt": "Tell me about rewriting names", "max_tokens": 6, "stream": stream}
    return httpx.post(f"{stack.base_url}/completions", json=body, headers=headers or {}, timeout=20)


def test_a_rewritten_model_is_served_and_the_client_reads_its_own_name(stack):
    r = completion(stack, ALIAS)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == ALIAS
    assert r.json()["usage"]["completion_tokens"] == 6
    # the upstream's content-length was dropped (the name's length changed): the reply is chunked
    assert "content-length" not in r.headers and r.headers["transfer-encoding"] == "chunked"


def test_a_rewritten_streamed_reply_says_the_requested_name_in_every_event(stack):
    r = completion(stack, ALIAS, stream=True)
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert len(events) >= 6
    assert {e["model"] for e in events} == {ALIAS}


def test_the_rewrite_header_sends_any_name_to_the_target(stack):
    r = completion(stack, "client-facing-name", headers={"x-gateway-model-name-rewrite": MODEL})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "client-facing-name"


def test_the_rewrite_is_counted_under_the_target_model_name(stack):
    completion(stack, ALIAS)
    assert epp_metric(stack, "inference_objective_request_total", f'model_name="{ALIAS}",target_model_name="{MODEL}"') >= 1


def test_without_a_rewrite_the_simulators_model_is_unknown_to_them(stack):
    assert completion(stack, "not-rewritten").status_code == 404  # the rule is what made `alias` work


def _fault(stack, mode: str) -> None:
    for port in stack.sim_ports:
        httpx.post(f"http://127.0.0.1:{port}/sim/fault", json={"mode": mode}, timeout=5).raise_for_status()


def test_a_sheddable_request_gets_429_only_while_the_pool_is_saturated(stack):
    batch = {"x-gateway-inference-objective": "batch"}
    assert completion(stack, MODEL, headers=batch).status_code == 200  # fresh metrics, idle pool
    _fault(stack, "garbage-metrics")  # scrapes fail: metrics go stale, which counts as saturated
    try:
        deadline = time.monotonic() + 10
        while (r := completion(stack, MODEL, headers=batch)).status_code != 429:
            assert r.status_code == 200 and time.monotonic() < deadline, r.text
            time.sleep(0.1)
        assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-saturated"
        assert r.text.startswith("inference error: InferencePoolResourceExhausted - ")
        for headers in ({"x-gateway-inference-objective": "interactive"}, {}, {"x-llm-d-inference-objective": "unknown"}):
            assert completion(stack, MODEL, headers=headers).status_code == 200  # never shed
    finally:
        _fault(stack, "none")
    deadline = time.monotonic() + 10
    while completion(stack, MODEL, headers=batch).status_code != 200:
        assert time.monotonic() < deadline, "sheddable requests still refused after the pool recovered"
        time.sleep(0.1)
