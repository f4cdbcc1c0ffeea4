"""request-attribute-reporter through real Envoy: with llm-d's README config, the request's total
tokens reach Envoy as the dynamic metadata envoy.lb/x-gateway-inference-request-cost, which the
reference gateway's access log shows as `request_cost`, for JSON and streamed replies alike."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL, make_stack

pytestmark = pytest.mark.envoy

README_CONFIG = Path(__file__).resolve().parents[1] / "unit" / "configs" / "llm-d-request-cost.yaml"


def log_for(stack, request_id: str, timeout: float = 5.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # Envoy flushes its access log on a timer
        for entry in stack.access_log():
            if entry["request_id"] == request_id:
                return entry
        time.sleep(0.1)
    raise AssertionError(f"request {request_id} not in the access log")


def chat(stack, request_id: str, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count the tokens of this request"}], "max_tokens": 6, **extra}
    return httpx.post(f"{stack.base_url}/chat/completions", json=body, headers={"x-request-id": request_id}, timeout=30)


def streamed_usage(text: str) -> dict[str, int]:
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    (usage,) = [c["usage"] for c in chunks if c.get("usage")]
    return usage


@pytest.mark.parametrize("response_body_mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
def test_the_requests_total_tokens_reach_envoy_as_dynamic_metadata(tmp_path, response_body_mode):
    epp_args = ("--config-file", str(README_CONFIG))
    with make_stack(tmp_path, sims=1, epp_args=epp_args, response_body_mode=response_body_mode) as s:
        r = chat(s, "cost-json")
        assert r.status_code == 200
        usage = r.json()["usage"]
        assert log_for(s, "cost-json")["request_cost"] == usage["prompt_tokens"] + usage["completion_tokens"]

        r = chat(s, "cost-sse", stream=True, stream_options={"include_usage": True})
        assert r.status_code == 200
        usage = streamed_usage(r.text)  # in the last chunk before [DONE]
        assert log_for(s, "cost-sse")["request_cost"] == usage["prompt_tokens"] + usage["completion_tokens"]

        r = chat(s, "cost-none", stream=True)  # no usage in the stream: 0, which is not reported
        assert r.status_code == 200 and "usage" not in r.text.replace('"usage":null', "")
        assert log_for(s, "cost-none")["request_cost"] is None


def test_without_a_reporter_the_access_log_has_no_cost(stack):
    r = chat(stack, "no-cost")
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] > 0
    assert log_for(stack, "no-cost")["request_cost"] is None
