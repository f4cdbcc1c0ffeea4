"""Request parsers through the real stack (Envoy -> llm-epp -> simulated vLLM): Anthropic's
`/v1/messages` under the default parser list, streamed and not, its usage counted in the EPP's token
metrics; and a config whose parsers claim only OpenAI paths refusing the rest."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import MODEL, epp_metric, make_stack

pytestmark = pytest.mark.envoy

SYSTEM = "You are a careful assistant who answers in full sentences. " * 30  # ~1,800 characters


def pool(stack) -> set[str]:
    return {f"{h}:{p}" for h, p in stack.endpoints}


def token_sums(stack) -> tuple[float, float]:
    return epp_metric(stack, "inference_objective_input_tokens_sum"), epp_metric(stack, "inference_objective_output_tokens_sum")


def wait_for_sums(stack, expected: tuple[float, float]) -> tuple[float, float]:
    deadline = time.monotonic() + 5
    while (got := token_sums(stack)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def messages(stack, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/messages", json={"model": MODEL, **body}, timeout=20, **kw)


def test_a_messages_reply_is_routed_by_the_epp_and_its_usage_counted(stack):
    before = token_sums(stack)
    r = messages(stack, {"max_tokens": 5, "system": "Be brief.", "messages": [{"role": "user", "content": "Hello"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-served-by"] in pool(stack)
    usage = r.json()["usage"]
    assert usage["output_tokens"] == 5
    assert wait_for_sums(stack, (before[0] + usage["input_tokens"], before[1] + 5)) == (before[0] + usage["input_tokens"], before[1] + 5)


def test_a_streamed_messages_reply_is_counted_from_its_events(stack):
    before = token_sums(stack)
    body = {"max_tokens": 7, "stream": True, "messages": [{"role": "user", "content": [{"type": "text", "text": "Stream please"}]}]}
    with httpx.stream("POST", f"{stack.base_url}/messages", json={"model": MODEL, **body}, timeout=20) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    data = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert [d["type"] for d in data][-2:] == ["message_delta", "message_stop"]
    prompt = data[0]["message"]["usage"]["input_tokens"]
    assert data[-2]["usage"]["output_tokens"] == 7
    assert wait_for_sums(stack, (before[0] + prompt, before[1] + 7)) == (before[0] + prompt, before[1] + 7)


def test_messages_with_one_long_system_prompt_stick_to_one_endpoint_and_hit_its_cache(stack):
    served, cached = set(), []
    for i in range(5):
        r = messages(stack, {"max_tokens": 2, "system": SYSTEM, "messages": [{"role": "user", "content": f"question {i}"}]})
        assert r.status_code == 200, r.text
        served.add(r.headers["x-served-by"])
        cached.append(r.json()["usage"]["cache_read_input_tokens"])
    assert len(served) == 1
    assert all(c > 0 for c in cached[1:])


def test_a_messages_body_the_parser_cannot_read_is_400_from_the_epp(stack):
    r = messages(stack, {"max_tokens": 5, "messages": []})
    assert r.status_code == 400
    assert r.text == "inference error: BadRequest - field 'messages' must have at least one message"
    assert "x-served-by" not in r.headers


OPENAI_ONLY = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- name: openai
  type: openai-parser
requestHandler:
  parsers:
  - pluginRef: openai
"""


@pytest.fixture(scope="module")
def openai_only(tmp_path_factory) -> Iterator:
    with make_stack(tmp_path_factory.mktemp("openai-only"), sims=1, epp_args=("--config-text", OPENAI_ONLY)) as s:
        yield s


def test_a_path_no_configured_parser_claims_is_refused_and_the_rest_routed(openai_only):
    r = messages(openai_only, {"max_tokens": 5, "messages": [{"role": "user", "content": "Hello"}]})
    assert r.status_code == 400 and "no request parser claims the path '/v1/messages'" in r.text
    ok = httpx.post(f"{openai_only.base_url}/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=20)
    assert ok.status_code == 200 and ok.headers["x-served-by"] in pool(openai_only)
    assert httpx.get(f"{openai_only.base_url}/models", timeout=10).status_code == 200  # no body: routed on load
