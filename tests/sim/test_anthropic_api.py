"""The simulator's Anthropic Messages API (`/v1/messages`, as vLLM serves it): the reply, its SSE
events with usage, prefix caching shared with the chat API, errors in Anthropic's shape."""

from __future__ import annotations

import json

import aiohttp

from tests.sim.conftest import post
from vllm_sim import SimServer
from vllm_sim.tokens import apply_chat_template, encode

SYSTEM = "You answer in one word. " * 20


def events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n", 1)
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def test_a_message_reply_counts_the_system_prompt_and_runs_to_max_tokens(http: aiohttp.ClientSession, sim: SimServer) -> None:
    body = {"model": "sim-model", "max_tokens": 6, "system": "Be brief.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}  # fmt: skip
    status, reply, _ = await post(http, sim, "/v1/messages", body)
    assert status == 200
    assert (reply["type"], reply["role"], reply["model"], reply["stop_reason"]) == ("message", "assistant", "sim-model", "max_tokens")
    assert reply["id"].startswith("msg_") and reply["content"][0]["type"] == "text"
    prompt = len(encode(apply_chat_template([("system", "Be brief."), ("user", "hi")], True)))
    assert reply["usage"] == {"input_tokens": prompt, "output_tokens": 6, "cache_read_input_tokens": 0}


async def test_streamed_events_carry_input_usage_first_and_output_usage_last(http: aiohttp.ClientSession, sim: SimServer) -> None:
    body = {"model": "sim-model", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    status, text, headers = await post(http, sim, "/v1/messages", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    got = events(text)
    assert [n for n, _ in got] == ["message_start", "content_block_start", *["content_block_delta"] * 3,
                                   "content_block_stop", "message_delta", "message_stop"]  # fmt: skip
    assert all(n == d["type"] for n, d in got)
    assert got[0][1]["message"]["usage"]["input_tokens"] == len(encode(apply_chat_template([("user", "hi")], True)))
    assert got[-2][1]["usage"] == {"output_tokens": 3} and got[-2][1]["delta"]["stop_reason"] == "max_tokens"


async def test_a_repeated_system_prompt_is_read_from_the_cache(http: aiohttp.ClientSession, sim: SimServer) -> None:
    body = {"model": "sim-model", "max_tokens": 1, "system": SYSTEM, "messages": [{"role": "user", "content": "one"}]}
    await post(http, sim, "/v1/messages", body)
    _, reply, _ = await post(http, sim, "/v1/messages", {**body, "messages": [{"role": "user", "content": "two"}]})
    assert reply["usage"]["cache_read_input_tokens"] > 0


async def test_errors_are_in_anthropics_shape(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, reply, _ = await post(http, sim, "/v1/messages", {"model": "sim-model", "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and reply["type"] == "error" and reply["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in reply["error"]["message"]
    status, reply, _ = await post(http, sim, "/v1/messages", {"model": "nope", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
    assert status == 404 and reply["error"]["type"] == "not_found_error"
    status, reply, _ = await post(http, sim, "/v1/messages", {"model": "sim-model", "max_tokens": 1, "messages": []})
    assert status == 400 and "at least one message" in reply["error"]["message"]
