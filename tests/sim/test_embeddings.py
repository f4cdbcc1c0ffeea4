"""POST /v1/embeddings as vLLM serves it: shape, input forms, determinism, encodings, errors, and the
engine accounting (queue, prefix cache, /metrics) of a prefill-only request."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from tests.sim.conftest import StartSim, metric, post
from vllm_sim import SimServer
from vllm_sim.tokens import encode

TEXT = "the quick brown fox jumps over the lazy dog"


async def embed(http: aiohttp.ClientSession, sim: SimServer, body: dict[str, Any]) -> dict[str, Any]:
    status, out, _ = await post(http, sim, "/v1/embeddings", body)
    assert status == 200, out
    return out


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_embedding_response_has_vllms_shape(http: aiohttp.ClientSession, sim: SimServer) -> None:
    body = await embed(http, sim, {"model": "sim-model", "input": TEXT})
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("embd-") and body["object"] == "list" and body["model"] == "sim-model"
    assert isinstance(body["created"], int)
    [item] = body["data"]
    assert item["index"] == 0 and item["object"] == "embedding"
    assert len(item["embedding"]) == 64 and all(isinstance(v, float) for v in item["embedding"])
    n = len(encode(TEXT))
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                             "prompt_tokens_details": None}


@pytest.mark.parametrize(("given", "count"), [
    ("one text", 1),
    (["first text", "second", "third one"], 3),
    ([5, 6, 7, 8], 1),
    ([[5, 6], [7], [8, 9, 10]], 3),
])
async def test_each_input_form_gives_one_embedding_per_item(http: aiohttp.ClientSession, sim: SimServer,
                                                            given: Any, count: int) -> None:
    body = await embed(http, sim, {"input": given})
    assert [d["index"] for d in body["data"]] == list(range(count))


async def test_model_defaults_to_the_first_served_model(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(models=("a", "b"))
    assert (await embed(http, sim, {"input": "x"}))["model"] == "a"
    assert (await embed(http, sim, {"input": "x", "model": "b"}))["model"] == "b"


async def test_same_input_gives_the_same_vector_on_any_simulator(http: aiohttp.ClientSession,
                                                                 start_sim: StartSim) -> None:
    one, other = await start_sim(seed=1), await start_sim(seed=2)
    a = (await embed(http, one, {"input": TEXT}))["data"][0]["embedding"]
    b = (await embed(http, other, {"input": TEXT}))["data"][0]["embedding"]
    c = (await embed(http, one, {"input": TEXT}))["data"][0]["embedding"]
    assert a == b == c


async def test_text_and_its_token_ids_embed_the_same(http: aiohttp.ClientSession, sim: SimServer) -> None:
    body = await embed(http, sim, {"input": [TEXT]})
    ids = await embed(http, sim, {"input": encode(TEXT)})
    assert body["data"][0]["embedding"] == ids["data"][0]["embedding"]
    assert body["usage"] == ids["usage"]


async def test_vectors_are_unit_length_and_shared_tokens_mean_closer(http: aiohttp.ClientSession,
                                                                     sim: SimServer) -> None:
    body = await embed(http, sim, {"input": [TEXT, TEXT.replace("dog", "cat"), "Quarterly revenue rose 4 percent"]})
    a, near, far = (d["embedding"] for d in body["data"])
    assert all(math.isclose(dot(v, v), 1.0) for v in (a, near, far))
    assert dot(a, near) > 0.7 and dot(a, near) > dot(a, far) + 0.3


async def test_normalize_false_returns_the_raw_vector(http: aiohttp.ClientSession, sim: SimServer) -> None:
    raw = (await embed(http, sim, {"input": TEXT, "normalize": False}))["data"][0]["embedding"]
    unit = (await embed(http, sim, {"input": TEXT}))["data"][0]["embedding"]
    norm = math.sqrt(dot(raw, raw))
    assert norm > 1.5 and all(math.isclose(r / norm, u) for r, u in zip(raw, unit, strict=True))


async def test_dimensions_truncates_then_renormalises(http: aiohttp.ClientSession, sim: SimServer) -> None:
    raw = (await embed(http, sim, {"input": TEXT, "normalize": False}))["data"][0]["embedding"]
    short = (await embed(http, sim, {"input": TEXT, "dimensions": 16}))["data"][0]["embedding"]
    assert len(short) == 16 and math.isclose(dot(short, short), 1.0)
    norm = math.sqrt(dot(raw[:16], raw[:16]))
    assert all(math.isclose(s, r / norm) for s, r in zip(short, raw[:16], strict=True))


@pytest.mark.parametrize("dimensions", [0, -1, 65])
async def test_dimensions_out_of_range_is_400(http: aiohttp.ClientSession, sim: SimServer, dimensions: int) -> None:
    status, error, _ = await post(http, sim, "/v1/embeddings", {"input": "x", "dimensions": dimensions})
    assert status == 400 and error["type"] == "BadRequestError" and "imensions" in error["message"]


async def test_embedding_dim_is_configurable(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(embedding_dim=200)
    assert len((await embed(http, sim, {"input": "x"}))["data"][0]["embedding"]) == 200


async def test_base64_encoding_is_little_endian_float32_of_the_same_vector(http: aiohttp.ClientSession,
                                                                           sim: SimServer) -> None:
    floats = (await embed(http, sim, {"input": TEXT}))["data"][0]["embedding"]
    b64 = (await embed(http, sim, {"input": TEXT, "encoding_format": "base64"}))["data"][0]["embedding"]
    decoded = struct.unpack("<64f", base64.b64decode(b64))
    assert all(math.isclose(d, f, rel_tol=1e-6) for d, f in zip(decoded, floats, strict=True))


async def test_openai_client_round_trip(http: aiohttp.ClientSession, sim: SimServer) -> None:
    floats = (await embed(http, sim, {"input": ["a b c d", "e f"]}))["data"]
    client = AsyncOpenAI(base_url=sim.url + "/v1", api_key="unused")
    try:
        result = await client.embeddings.create(model="sim-model", input=["a b c d", "e f"])  # asks for base64
    finally:
        await client.close()
    assert [d.index for d in result.data] == [0, 1]
    for got, want in zip(result.data, floats, strict=True):
        assert all(math.isclose(g, w, rel_tol=1e-6) for g, w in zip(got.embedding, want["embedding"], strict=True))
    assert result.usage.prompt_tokens == result.usage.total_tokens == len(encode("a b c d")) + len(encode("e f"))


async def test_messages_form_embeds_the_chat_template(http: aiohttp.ClientSession, sim: SimServer) -> None:
    body = await embed(http, sim, {"messages": [{"role": "user", "content": TEXT}]})
    assert len(body["data"]) == 1 and body["usage"]["prompt_tokens"] == len(encode(f"<|user|>\n{TEXT}\n"))


@pytest.mark.parametrize("given", ["", [], [""], [[]], ["ok", ""]])
async def test_empty_input_is_400(http: aiohttp.ClientSession, sim: SimServer, given: Any) -> None:
    status, error, _ = await post(http, sim, "/v1/embeddings", {"input": given})
    assert status == 400 and error["type"] == "BadRequestError" and "input" in error["message"]


@pytest.mark.parametrize("body", [{}, {"model": "sim-model"}, {"input": None}])
async def test_missing_input_is_400(http: aiohttp.ClientSession, sim: SimServer, body: dict[str, Any]) -> None:
    status, error, _ = await post(http, sim, "/v1/embeddings", body)
    assert status == 400 and "input" in error["message"]


@pytest.mark.parametrize("given", [5, [1, "a"], [[1], ["a"]], [-1], {"text": "x"}])
async def test_input_of_the_wrong_type_is_400(http: aiohttp.ClientSession, sim: SimServer, given: Any) -> None:
    status, error, _ = await post(http, sim, "/v1/embeddings", {"input": given})
    assert status == 400 and error["type"] == "BadRequestError"


async def test_input_and_messages_together_is_400(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, error, _ = await post(http, sim, "/v1/embeddings", {"input": "x", "messages": [{"role": "user"}]})
    assert status == 400 and "not both" in error["message"]


async def test_unsupported_encoding_format_is_400(http: aiohttp.ClientSession, sim: SimServer) -> None:
    status, error, _ = await post(http, sim, "/v1/embeddings", {"input": "x", "encoding_format": "int8"})
    assert status == 400 and "encoding_format" in error["message"]


async def test_input_longer_than_max_model_len_is_400_with_vllms_message(
        http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(max_model_len=8)
    status, error, _ = await post(http, sim, "/v1/embeddings", {"input": list(range(9))})
    assert status == 400 and error["message"] == (
        "This model's maximum context length is 8 tokens. However, you requested 9 tokens in the input for "
        "embedding generation. Please reduce the length of the input.")


async def test_embeddings_count_in_metrics_as_prompt_tokens_and_finished_requests(
        http: aiohttp.ClientSession, sim: SimServer) -> None:
    await embed(http, sim, {"input": [list(range(10)), list(range(100, 130))]})
    async with http.get(sim.url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "vllm:prompt_tokens_total") == 40
    assert metric(text, "vllm:generation_tokens_total") == 0
    assert 'vllm:request_success_total{engine="0",finished_reason="stop",model_name="sim-model"} 2.0' in text
    assert metric(text, "vllm:e2e_request_latency_seconds_count") == 2
    async with http.get(sim.url + "/sim/stats") as r:
        stats = await r.json()
    assert stats["requests_total"] == 2 and stats["prompt_tokens_total"] == 40
    assert stats["generation_tokens_total"] == 0 and stats["running"] == 0


async def test_embedding_prompt_blocks_are_prefix_cached(http: aiohttp.ClientSession, sim: SimServer) -> None:
    prompt = list(range(1000, 1100))  # 6 full blocks of 16 and a partial one
    first = await embed(http, sim, {"input": prompt})
    status, completion, _ = await post(http, sim, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert status == 200 and completion["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert first["usage"]["prompt_tokens"] == 100
    async with http.get(sim.url + "/metrics") as r:
        assert metric(await r.text(), "vllm:prefix_cache_hits_total") == 96


async def test_embeddings_wait_in_the_queue_behind_a_full_batch(http: aiohttp.ClientSession,
                                                                start_sim: StartSim) -> None:
    sim = await start_sim(max_num_seqs=1, time_scale=0.5)

    async def stats() -> dict[str, Any]:
        async with http.get(sim.url + "/sim/stats") as r:
            return await r.json()

    completion = asyncio.create_task(post(http, sim, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 40}))
    while (await stats())["running"] == 0:  # until the completion holds the only batch slot
        await asyncio.sleep(0.001)
    embedding = asyncio.create_task(embed(http, sim, {"input": [4, 5, 6]}))
    while (await stats())["waiting"] == 0:
        assert not completion.done(), "the embedding never queued"
        await asyncio.sleep(0.001)
    assert (await stats())["running"] == 1 and not embedding.done()
    await completion
    assert (await embedding)["usage"]["prompt_tokens"] == 3


async def test_embedding_request_ids_are_recorded(http: aiohttp.ClientSession, sim: SimServer) -> None:
    await post(http, sim, "/v1/embeddings", {"input": "x"}, {"x-request-id": "emb-1"})
    async with http.get(sim.url + "/sim/stats") as r:
        assert (await r.json())["request_ids"] == ["emb-1"]


async def test_embeddings_say_who_served_them(http: aiohttp.ClientSession, start_sim: StartSim) -> None:
    sim = await start_sim(name="pod-e")
    for body in ({"input": "x"}, {"input": ""}):
        _, _, headers = await post(http, sim, "/v1/embeddings", body)
        assert headers["x-served-by"] == "pod-e"
