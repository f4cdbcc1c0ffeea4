"""The OpenAI surface a router sees: shapes, streaming, errors, who served, stats, determinism."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI

from tests.sim.conftest import StartSim, metric, post
from vllm_sim import SimConfig, SimServer
from vllm_sim import openai_api as api
from vllm_sim.tokens import encode

LONG_PROMPT = "You are a helpful assistant. Answer briefly and cite sources. " * 20


async def test_completion_returns_exactly_max_tokens_of_filler(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, body, _ = await post(http, sim, "/v1/completions", {"model": "sim-model", "prompt": "hi", "max_tokens": 7})
    assert status == 200
    assert body["object"] == "text_completion" and body["model"] == "sim-model"
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(encode(body["choices"][0]["text"])) == 7
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 7, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}


async def test_max_tokens_defaults_to_16_and_chat_prefers_max_completion_tokens(
        http: aiohttp.ClientSession, sim: SimServer) -> None:
    _, plain, _ = await post(http, sim, "/v1/completions", {"prompt": [1, 2, 3]})
    assert plain["usage"]["completion_tokens"] == 16
    _, chat, _ = await post(http, sim, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 9, "max_completion_tokens": 3})
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] == 3


async def test_list_of_prompts_gives_one_choice_each(http: aiohttp.ClientSession, sim: SimServer) -> None:
    _, body, _ = await post(http, sim, "/v1/completions", {"prompt": ["a b c d", "e f"], "max_tokens": 2})
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 4


async def test_repeated_prefix_is_served_from_cache(http: aiohttp.ClientSession, sim: SimServer) -> None:
    req = {"prompt": LONG_PROMPT, "max_tokens": 2}
    _, first, _ = await post(http, sim, "/v1/completions", req)
    _, second, _ = await post(http, sim, "/v1/completions", req)
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (prompt_tokens - 1) // 16 * 16 and cached > 0
    async with http.get(sim.url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "vllm:prefix_cache_hits_total") == cached
    assert metric(text, "vllm:prefix_cache_queries_total") == 2 * prompt_tokens


async def test_chats_sharing_leading_messages_share_cached_prefix(http: aiohttp.ClientSession, sim: SimServer) -> None:
    system = {"role": "system", "content": LONG_PROMPT}
    await post(http, sim, "/v1/chat/completions", {"messages": [system, {"role": "user", "content": "one"}]})
    _, body, _ = await post(http, sim, "/v1/chat/completions",
                            {"messages": [system, {"role": "user", "content": [{"type": "text", "text": "two"}]}]})
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(encode(LONG_PROMPT)) - 32


async def test_streaming_chat_with_usage_through_openai_client(sim: SimServer) -> None:
    client = AsyncOpenAI(base_url=sim.url + "/v1", api_key="unused")
    try:
        stream = await client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "hello"}], max_tokens=5,
            stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    finally:
        await client.close()
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices]
    assert len(content) == 5 and chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    details = chunks[-1].usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == 0


async def test_streaming_completion_through_openai_client_ends_with_done(sim: SimServer) -> None:
    client = AsyncOpenAI(base_url=sim.url + "/v1", api_key="unused")
    try:
        stream = await client.completions.create(model="sim-model", prompt="abc", max_tokens=4, stream=True)
        chunks = [c async for c in stream]
    finally:
        await client.close()
    assert [c.object for c in chunks] == ["text_completion"] * 4
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(("body", "status", "error_type"), [
    (b"{not json", 400, "BadRequestError"),
    ({"model": "sim-model"}, 400, "BadRequestError"),  # no messages
    ({"messages": "hi"}, 400, "BadRequestError"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400, "BadRequestError"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "BadRequestError"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 40000}, 400, "BadRequestError"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "NotFoundError"),
])
async def test_chat_errors_have_vllm_shape(http: aiohttp.ClientSession, sim: SimServer,
                                           body: Any, status: int, error_type: str) -> None:
    got, error, _ = await post(http, sim, "/v1/chat/completions", body)
    assert got == status
    assert error["object"] == "error" and error["type"] == error_type
    assert error["code"] == status and error["param"] is None and error["message"]


@pytest.mark.parametrize("prompt", [None, 5, [], [1, "a"], [[1], [True]], "", [-1]])
async def test_bad_prompts_are_400(http: aiohttp.ClientSession, sim: SimServer, prompt: Any) -> None:
    body = {} if prompt is None else {"prompt": prompt}
    status, error, _ = await post(http, sim, "/v1/completions", body)
    assert status == 400 and error["type"] == "BadRequestError"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["prompt", "messages", "model", "max_tokens", "role", "content",
                                         "type", "text", "stream", "stream_options"]), inner, max_size=4),
                    max_leaves=12))
def test_parsers_reject_any_bad_body_with_an_api_error(body: Any) -> None:
    config = SimConfig(models=("sim-model",))
    raw = msgspec.json.encode(body)
    for parse in (api.parse_completion, api.parse_chat):
        try:
            parse(raw, config)
        except api.ApiError as e:
            assert e.status in (400, 404)


async def test_every_response_says_who_served_it(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim()
    named = await start_sim(name="pod-a")
    assert sim.name == f"127.0.0.1:{sim.port}"
    for body in ({"prompt": "x", "max_tokens": 1}, {"prompt": "x", "stream": True}, {"model": "nope", "prompt": "x"}):
        _, _, headers = await post(http, sim, "/v1/completions", body)
        assert headers["x-served-by"] == sim.name
    _, _, headers = await post(http, named, "/v1/completions", b"{")
    assert headers["x-served-by"] == "pod-a"


async def test_stats_count_requests_and_keep_the_last_1000_request_ids(
        http: aiohttp.ClientSession, sim: SimServer) -> None:
    await post(http, sim, "/v1/completions", {"prompt": "abcdefgh", "max_tokens": 3}, {"x-request-id": "first"})
    async with http.get(sim.url + "/sim/stats") as r:
        stats = await r.json()
    assert stats["requests_total"] == 1 and stats["request_ids"] == ["first"]
    assert stats["prompt_tokens_total"] == 2 and stats["generation_tokens_total"] == 3
    assert stats["cached_prompt_tokens_total"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    # Rejected requests are seen too, and they are cheap.
    for batch in range(11):
        await asyncio.gather(*(post(http, sim, "/v1/completions", {"model": "nope", "prompt": "x"},
                                    {"x-request-id": f"r{batch * 100 + i}"}) for i in range(100)))
    async with http.get(sim.url + "/sim/stats") as r:
        ids = (await r.json())["request_ids"]
    assert len(ids) == 1000 and "first" not in ids and len(set(ids)) == 1000


async def test_reset_clears_prefix_cache_and_stats(http: aiohttp.ClientSession, sim: SimServer) -> None:
    req = {"prompt": LONG_PROMPT, "max_tokens": 1}
    await post(http, sim, "/v1/completions", req, {"x-request-id": "a"})
    async with http.post(sim.url + "/sim/reset") as r:
        assert r.status == 200
    _, body, _ = await post(http, sim, "/v1/completions", req)
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    async with http.get(sim.url + "/sim/stats") as r:
        stats = await r.json()
    assert stats["requests_total"] == 1 and stats["request_ids"] == []


async def test_health_and_models(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(models=("a", "b"))
    async with http.get(sim.url + "/health") as r:
        assert r.status == 200 and await r.read() == b""
    async with http.get(sim.url + "/v1/models") as r:
        models = await r.json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["a", "b"]
    status, body, _ = await post(http, sim, "/v1/completions", {"model": "b", "prompt": "x", "max_tokens": 1})
    assert status == 200 and body["model"] == "b"


async def test_lora_adapters_are_listed_with_their_base_as_parent_and_can_be_requested(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    from vllm_sim.cli import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["--lora-modules", "sql=/a/sql", "chat=/a/chat"])).lora_modules == (
        ("sql", "/a/sql"), ("chat", "/a/chat"))
    sim = await start_sim(models=("base",), lora_modules=(("sql", "/a/sql"),))
    async with http.get(sim.url + "/v1/models") as r:
        models = (await r.json())["data"]
    assert [(m["id"], m["parent"], m["root"]) for m in models] == [("base", None, "base"), ("sql", "base", "/a/sql")]
    status, body, _ = await post(http, sim, "/v1/completions", {"model": "sql", "prompt": "x", "max_tokens": 1})
    assert status == 200 and body["model"] == "sql"


async def test_same_seed_gives_same_text_and_another_seed_differs(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    req = {"prompt": "tell me a story", "max_tokens": 20}
    texts = []
    for seed in (7, 7, 8):
        sim = await start_sim(seed=seed)
        _, body, _ = await post(http, sim, "/v1/completions", req)
        texts.append(body["choices"][0]["text"])
    assert texts[0] == texts[1] != texts[2]
