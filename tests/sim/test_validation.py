"""Request validation as vLLM's OpenAI server does it: what is rejected, with which status and message,
and what is accepted (lenient coercion, n > 1)."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sim.conftest import StartSim, post
from vllm_sim import SimConfig, SimServer
from vllm_sim import openai_api as api
from vllm_sim.tokens import encode

PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def assert_vllm_error(status: int, error: Any, expected_status: int = 400) -> str:
    """The status and vLLM's error body shape; returns the message."""
    assert status == expected_status, error
    error_type = {400: "BadRequestError", 404: "NotFoundError"}[expected_status]
    assert error == {"object": "error", "message": error["message"], "type": error_type,
                     "param": None, "code": expected_status}
    assert isinstance(error["message"], str) and error["message"]
    return error["message"]


async def stats(http: aiohttp.ClientSession, sim: SimServer) -> dict[str, Any]:
    async with http.get(sim.url + "/sim/stats") as r:
        return await r.json()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("body", [b"", b"   ", b" \n\t\r\n"])
async def test_empty_or_whitespace_body_is_400(http: aiohttp.ClientSession, sim: SimServer,
                                               path: str, body: bytes) -> None:
    status, error, _ = await post(http, sim, path, body)
    assert "empty" in assert_vllm_error(status, error)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("body", [b"{not json", b'{"prompt": "x",}', b"nope", b'{"prompt": "x"} trailing'])
async def test_invalid_json_is_400(http: aiohttp.ClientSession, sim: SimServer, path: str, body: bytes) -> None:
    status, error, _ = await post(http, sim, path, body)
    assert assert_vllm_error(status, error).startswith("Invalid JSON")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("body", "kind"), [(b"[1, 2]", "an array"), (b'"hi"', "a string"), (b"5", "a number"),
                                            (b"null", "null"), (b"true", "a boolean")])
async def test_json_body_that_is_not_an_object_is_400(http: aiohttp.ClientSession, sim: SimServer,
                                                      path: str, body: bytes, kind: str) -> None:
    status, error, _ = await post(http, sim, path, body)
    assert assert_vllm_error(status, error) == f"The request body must be a JSON object, got {kind}."


async def test_chat_with_empty_messages_is_400(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, error, _ = await post(http, sim, "/v1/chat/completions", {"messages": []})
    assert "at least one message" in assert_vllm_error(status, error)


async def test_chat_without_messages_is_400_naming_the_field(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, error, _ = await post(http, sim, "/v1/chat/completions", {"model": "sim-model"})
    assert "`messages`" in assert_vllm_error(status, error)


async def test_chat_message_without_role_is_400(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, error, _ = await post(http, sim, "/v1/chat/completions", {"messages": [{"content": "hi"}]})
    assert "`role`" in assert_vllm_error(status, error)


@pytest.mark.parametrize("body", [{}, {"prompt": None}, {"prompt": ""}])
async def test_completion_without_prompt_is_400_with_vllms_message(http: aiohttp.ClientSession, sim: SimServer,
                                                                   body: dict[str, Any]) -> None:
    status, error, _ = await post(http, sim, "/v1/completions", body)
    assert assert_vllm_error(status, error) == "Either prompt or prompt_embeds must be provided and non-empty."


@pytest.mark.parametrize("prompt", [[], [[]], [""], ["a", ""]])
async def test_empty_prompt_list_or_item_is_400(http: aiohttp.ClientSession, sim: SimServer, prompt: Any) -> None:
    status, error, _ = await post(http, sim, "/v1/completions", {"prompt": prompt})
    assert "empty" in assert_vllm_error(status, error)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("max_tokens", [0, -3])
async def test_max_tokens_below_one_is_400(http: aiohttp.ClientSession, sim: SimServer,
                                           path: str, max_tokens: int) -> None:
    body = {"prompt": "x"} if path == "/v1/completions" else dict(CHAT)
    status, error, _ = await post(http, sim, path, {**body, "max_tokens": max_tokens})
    assert assert_vllm_error(status, error) == f"max_tokens must be at least 1, got {max_tokens}."


@pytest.mark.parametrize("max_tokens", ["many", 1.5, True, [1], {"n": 1}])
async def test_max_tokens_that_is_not_an_int_is_400_naming_the_field(http: aiohttp.ClientSession, sim: SimServer,
                                                                     max_tokens: Any) -> None:
    status, error, _ = await post(http, sim, "/v1/completions", {"prompt": "x", "max_tokens": max_tokens})
    message = assert_vllm_error(status, error)
    assert "max_tokens" in message and "int" in message


@pytest.mark.parametrize("field", ["stream", "n", "temperature", "messages", "model", "stop"])
async def test_fields_of_the_wrong_type_are_400_naming_the_field(http: aiohttp.ClientSession, sim: SimServer,
                                                                 field: str) -> None:
    status, error, _ = await post(http, sim, "/v1/chat/completions", {**CHAT, field: {"not": "this"}})
    assert f"$.{field}" in assert_vllm_error(status, error)


async def test_numbers_in_strings_are_coerced_as_pydantic_does(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, body, _ = await post(http, sim, "/v1/completions",
                                 {"prompt": "x", "max_tokens": "3", "temperature": "0.5", "stream": "false"})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


async def test_unknown_fields_are_ignored(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, _, _ = await post(http, sim, "/v1/chat/completions", {**CHAT, "max_tokens": 1, "frobnicate": [1, 2]})
    assert status == 200


@pytest.mark.parametrize("path", PATHS)
async def test_unknown_model_is_404_not_found_naming_the_model(http: aiohttp.ClientSession, sim: SimServer,
                                                               path: str) -> None:
    body = {"/v1/completions": {"prompt": "x"}, "/v1/chat/completions": CHAT, "/v1/embeddings": {"input": "x"}}[path]
    status, error, _ = await post(http, sim, path, {**body, "model": "gpt-9"})
    assert assert_vllm_error(status, error, 404) == "The model `gpt-9` does not exist."


@pytest.mark.parametrize(("params", "message"), [
    ({"temperature": -0.5}, "temperature must be non-negative, got -0.5."),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0.0."),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
    ({"top_k": -2}, "top_k must be 0 (disable), or at least 1, got -2."),
    ({"min_p": 2}, "min_p must be in [0, 1], got 2.0."),
    ({"presence_penalty": 3}, "presence_penalty must be in [-2, 2], got 3.0."),
    ({"frequency_penalty": -2.5}, "frequency_penalty must be in [-2, 2], got -2.5."),
    ({"repetition_penalty": 0}, "repetition_penalty must be greater than zero, got 0.0."),
    ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1."),
    ({"stop": ["ok", ""]}, "stop cannot contain an empty string."),
    ({"n": 0}, "n must be at least 1, got 0."),
    ({"n": 16385}, "n must be at most 16384, got 16385. To increase this limit, set the VLLM_MAX_N_SEQUENCES "
                   "environment variable."),
])
async def test_out_of_range_sampling_params_are_400_with_vllms_message(
        http: aiohttp.ClientSession, sim: SimServer, params: dict[str, Any], message: str) -> None:
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", CHAT)):
        status, error, _ = await post(http, sim, path, {**body, **params})
        assert assert_vllm_error(status, error) == message


async def test_in_range_sampling_params_are_accepted(http: aiohttp.ClientSession, sim: SimServer) -> None:
    params = {"temperature": 0, "top_p": 1, "top_k": -1, "min_p": 0, "presence_penalty": -2, "frequency_penalty": 2,
              "repetition_penalty": 1.1, "min_tokens": 2, "stop": "\n", "seed": 3, "user": "u", "max_tokens": 2}
    status, _, _ = await post(http, sim, "/v1/completions", {"prompt": "x", **params})
    assert status == 200


async def test_min_tokens_above_max_tokens_is_400(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, error, _ = await post(http, sim, "/v1/chat/completions", {**CHAT, "max_tokens": 2, "min_tokens": 5})
    assert assert_vllm_error(status, error) == "min_tokens must be less than or equal to max_tokens=2, got 5."


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_stream_options_without_stream_is_400(http: aiohttp.ClientSession, sim: SimServer, path: str) -> None:
    body = {"prompt": "x"} if path == "/v1/completions" else dict(CHAT)
    status, error, _ = await post(http, sim, path, {**body, "stream_options": {"include_usage": False}})
    assert assert_vllm_error(status, error) == "Stream options can only be defined when `stream=True`."


async def test_empty_stream_options_without_stream_is_accepted(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, _, _ = await post(http, sim, "/v1/completions", {"prompt": "x", "max_tokens": 1, "stream_options": {}})
    assert status == 200


async def test_chat_top_logprobs_without_logprobs_is_400(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, error, _ = await post(http, sim, "/v1/chat/completions", {**CHAT, "top_logprobs": 2})
    assert assert_vllm_error(status, error) == "when using `top_logprobs`, `logprobs` must be set to true."


async def test_completion_negative_logprobs_is_400(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, error, _ = await post(http, sim, "/v1/completions", {"prompt": "x", "logprobs": -2})
    assert assert_vllm_error(status, error) == "`logprobs` must be a positive value or -1."


async def test_n_greater_than_one_with_greedy_sampling_is_400(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, error, _ = await post(http, sim, "/v1/chat/completions", {**CHAT, "n": 2, "temperature": 0})
    assert assert_vllm_error(status, error) == "n must be 1 when using greedy sampling, got 2."


async def test_n_gives_n_distinct_choices_per_prompt_indexed_like_vllm(
        http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, body, _ = await post(http, sim, "/v1/completions",
                                 {"prompt": ["one two", "three"], "n": 3, "max_tokens": 4})
    assert status == 200
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    assert all(len(encode(c["text"])) == 4 for c in choices)
    assert len({c["text"] for c in choices[:3]}) == 3  # the choices of one prompt differ
    # A prompt's tokens count once, however many choices it has; every choice's tokens count.
    assert body["usage"]["prompt_tokens"] == len(encode("one two")) + len(encode("three"))
    assert body["usage"]["completion_tokens"] == 6 * 4


async def test_n_choice_zero_is_what_n_1_returns(http: aiohttp.ClientSession, sim: SimServer) -> None:
    _, one, _ = await post(http, sim, "/v1/chat/completions", {**CHAT, "max_tokens": 5})
    _, three, _ = await post(http, sim, "/v1/chat/completions", {**CHAT, "max_tokens": 5, "n": 3})
    assert len(three["choices"]) == 3
    assert three["choices"][0]["message"]["content"] == one["choices"][0]["message"]["content"]
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]


async def test_streaming_chat_with_n_opens_and_finishes_every_choice(http: aiohttp.ClientSession,
                                                                     sim: SimServer) -> None:
    status, text, _ = await post(http, sim, "/v1/chat/completions",
                                 {**CHAT, "n": 2, "max_tokens": 3, "stream": True,
                                  "stream_options": {"include_usage": True}})
    assert status == 200 and text.endswith("data: [DONE]\n\n")
    chunks = [msgspec.json.decode(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    for index in (0, 1):
        mine = [d for d in deltas if d["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert len(mine) == 1 + 3 and mine[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6


async def test_disaggregated_request_with_n_above_one_is_400(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, error, _ = await post(http, sim, "/v1/completions",
                                  {"prompt": "x", "n": 2, "kv_transfer_params": {"do_remote_decode": True}})
    assert "n=1" in assert_vllm_error(status, error)


async def test_rejected_requests_never_reach_the_engine(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim()
    for path, body in ((PATHS[0], b""), (PATHS[1], {"messages": []}), (PATHS[0], {"prompt": "x", "top_p": 0}),
                       (PATHS[2], {"input": []})):
        status, _, _ = await post(http, sim, path, body)
        assert status == 400
    s = await stats(http, sim)
    assert s["requests_total"] == 0 and s["prompt_tokens_total"] == 0


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-3, 3) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["role", "content", "type", "text",
                                                                                 "include_usage"]), inner, max_size=3),
    max_leaves=8)
_KEYS = st.sampled_from(["prompt", "messages", "input", "model", "max_tokens", "n", "temperature", "top_p", "top_k",
                         "min_tokens", "stop", "stream", "stream_options", "logprobs", "top_logprobs",
                         "encoding_format", "dimensions"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=6) | _VALUES)
def test_every_parser_answers_any_body_with_a_result_or_an_api_error(body: Any) -> None:
    config = SimConfig(models=("sim-model",))
    raw = msgspec.json.encode(body)
    for parse in (api.parse_completion, api.parse_chat, api.parse_embedding):
        try:
            parse(raw, config)
        except api.ApiError as e:
            assert e.status in (400, 404) and e.message
