"""The request parsers as the EPP runs them: which parser a path goes to, what each makes of a body,
the usage each reads from responses, and how RequestStream answers through them."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.handlers.anthropic import parse_messages
from extproc.handlers.generate import parse_sglang_generate, parse_vllm_generate
from extproc.handlers.parsers import CLAIMS, DEFAULT, RequestParsers
from extproc.handlers.request_body import parse_body
from extproc.handlers.request_stream import RequestStream, State
from extproc.handlers.usage import ANTHROPIC, OPENAI, SGLANG, UsageReader
from pickers.config.parsers import PARSER_TYPES, ParserSpec
from pickers.framework.errors import RequestError
from pickers.framework.request import InferenceRequest
from tests.unit.fake_director import FakeDirector
from tests.unit.test_protocol import (
    body_msg,
    headers_msg,
    response_body_msg,
    response_headers_msg,
    send_request,
)


def parsers(*types: str) -> RequestParsers:
    return RequestParsers([ParserSpec(t, t) for t in types])


def request(api: str, path: str = "/v1/x") -> InferenceRequest:
    return InferenceRequest("r", path, {}, api)


def refusal(parse, body: object, required: str) -> str:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(RequestError) as e:
        parse(request("x"), raw, required)
    assert e.value.kind.status == 400
    return e.value.message


# -- which parser reads a path ----------------------------------------------------------------------
def test_every_loadable_parser_type_has_claims():
    assert set(CLAIMS) == set(PARSER_TYPES)


@pytest.mark.parametrize(
    ("path", "parser", "api"),
    [
        ("/v1/chat/completions", "openai-parser", "chat"),
        ("/v1/completions", "openai-parser", "completions"),
        ("/v1/chat/completions/render", "openai-parser", "chat"),
        ("/v1/completions/render?x=1", "openai-parser", "completions"),
        ("/v1/images/generations", "openai-parser", "images"),
        ("/v1/responses/", "openai-parser", "responses"),
        ("/v1/messages", "anthropic-parser", "messages"),
        ("/v1/messages/count_tokens", "anthropic-parser", None),
        ("/inference/v1/generate", "vllmhttp-parser", "generate"),
        ("/tokenize", "passthrough-parser", None),
        ("/v1/models", "passthrough-parser", None),
    ],
)
def test_the_default_list_routes_each_path_to_its_parser(path, parser, api):
    route = DEFAULT.resolve(path)
    assert route is not None and (route.parser, route.api) == (parser, api)


def test_the_longest_claimed_suffix_wins_whatever_the_order():
    for order in (("sglanghttp-parser", "vllmhttp-parser"), ("vllmhttp-parser", "sglanghttp-parser")):
        route = parsers(*order).resolve("/inference/v1/generate")
        assert route is not None and route.parser == "vllmhttp-parser"


def test_a_suffix_matches_whole_path_segments():
    assert parsers("openai-parser").resolve("/v1/textcompletions") is None


def test_without_a_fallback_an_unclaimed_path_resolves_to_nothing():
    assert parsers("openai-parser").resolve("/v1/messages") is None


def test_anthropic_and_openai_on_one_route():
    both = parsers("openai-parser", "anthropic-parser")
    assert both.resolve("/v1/messages").parser == "anthropic-parser"
    assert both.resolve("/v1/chat/completions").parser == "openai-parser"


# -- openai-parser: the paths added with llm-d's claims ---------------------------------------------
def test_images_generations_needs_a_prompt_string():
    req = request("images")
    parse_body(req, json.dumps({"model": "m", "prompt": "a red cube"}).encode(), "prompt")
    assert (req.model, req.prompt_text) == ("m", "a red cube")
    assert "must be a string" in refusal(lambda r, b, f: parse_body(request("images"), b, f), {"model": "m", "prompt": ["x"]}, "prompt")


def test_openai_cache_salt_salts_the_prefix_hash():
    req = request("completions")
    parse_body(req, json.dumps({"model": "m", "prompt": "p", "cache_salt": "tenant-a"}).encode(), "prompt")
    assert req.cache_salt == "tenant-a"


# -- anthropic-parser -------------------------------------------------------------------------------
def messages_request(**body) -> InferenceRequest:
    req = request("messages", "/v1/messages")
    parse_messages(req, json.dumps({"model": "claude-x", **body}).encode(), "messages")
    return req


def test_anthropic_prompt_is_the_system_prompt_then_each_message():
    req = messages_request(system="Be brief.", messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert req.prompt_text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello\n"
    assert (req.model, req.api, req.stream, req.max_tokens) == ("claude-x", "messages", False, None)


def test_anthropic_content_blocks_count_their_text_and_others_their_json():
    req = messages_request(
        system=[{"type": "text", "text": "Sys "}, {"type": "text", "text": "prompt"}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "look: "}, {"type": "image", "source": {"type": "url", "url": "u"}}]},
                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm"}]}],
    )  # fmt: skip
    assert req.prompt_text == (
        '<|system|>\nSys prompt\n<|user|>\nlook: {"type":"image","source":{"type":"url","url":"u"}}\n<|assistant|>\nhmm\n'
    )


def test_anthropic_stream_max_tokens_and_cache_salt_are_read():
    req = messages_request(messages=[{"role": "user", "content": "x"}], stream=True, max_tokens=64, cache_salt="s")
    assert (req.stream, req.max_tokens, req.cache_salt) == (True, 64, "s")


def test_the_same_conversation_has_the_same_prompt_text_in_both_apis():
    chat = request("chat")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    parse_body(chat, json.dumps({"model": "m", "messages": msgs}).encode(), "messages")
    assert messages_request(system="S", messages=msgs[1:]).prompt_text == chat.prompt_text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model not found in request body"),
        ({"model": "m"}, "field 'messages' is required for messages"),
        ({"model": "m", "messages": []}, "field 'messages' must have at least one message"),
        ({"model": "m", "messages": "hi"}, "field 'messages' must be a list"),
        ({"model": "m", "messages": ["hi"]}, "messages[0] must be an object"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "field 'messages[0].content' must be a string or a list of content blocks"),
        ({"model": "m", "messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0] must be a content block"),
        ({"model": "m", "system": 3, "messages": [{"role": "user", "content": "x"}]}, "field 'system' must be a string or a list"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "field 'stream' must be a boolean"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "field 'max_tokens' must be a non-negative integer"),
        (b"", "request body is empty: x needs a JSON object with 'model' and 'messages'"),
        (b"{nope", "request body is not valid JSON"),
    ],
)
def test_anthropic_bodies_it_cannot_read_are_400_saying_why(body, message):
    assert message in refusal(parse_messages, body, "messages")


# -- vllmhttp-parser --------------------------------------------------------------------------------
def test_vllm_generate_reads_token_ids_model_cap_stream_and_salt():
    req = request("generate", "/inference/v1/generate")
    body = {"model": "m", "token_ids": [1, 2, 70000], "sampling_params": {"max_tokens": 9}, "stream": True, "cache_salt": "s"}
    parse_vllm_generate(req, json.dumps(body).encode(), "token_ids")
    assert list(req.prompt_token_ids) == [1, 2, 70000]
    assert (req.model, req.max_tokens, req.stream, req.cache_salt, req.prompt_tokens) == ("m", 9, True, "s", 3)


def test_token_ids_pack_four_characters_a_token_so_a_shared_token_prefix_is_a_shared_text_prefix():
    a, b = request("generate"), request("generate")
    parse_vllm_generate(a, b'{"model":"m","token_ids":[5,6,7,8]}', "token_ids")
    parse_vllm_generate(b, b'{"model":"m","token_ids":[5,6,7,9]}', "token_ids")
    assert len(a.prompt_text.encode()) == 16 and a.prompt_text.isascii()  # the prefix index hashes UTF-8 bytes
    assert a.prompt_text[:12] == b.prompt_text[:12] and a.prompt_text[12:] != b.prompt_text[12:]


@given(st.lists(st.integers(0, 2**24 - 1), min_size=1, max_size=50), st.lists(st.integers(0, 2**24 - 1), min_size=1, max_size=50))
def test_prompt_texts_share_four_characters_per_shared_leading_token(x, y):
    a, b = request("generate"), request("generate")
    parse_vllm_generate(a, json.dumps({"model": "m", "token_ids": x}).encode(), "token_ids")
    parse_vllm_generate(b, json.dumps({"model": "m", "token_ids": y}).encode(), "token_ids")
    shared = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    common = next((i for i, (p, q) in enumerate(zip(a.prompt_text, b.prompt_text)) if p != q), min(len(a.prompt_text), len(b.prompt_text)))
    assert common // 4 == shared and len(a.prompt_text) == 4 * len(x)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m"}, "field 'token_ids' is required for generate"),
        ({"token_ids": [1]}, "model not found in request body"),
        ({"model": "m", "token_ids": []}, "field 'token_ids' must not be empty"),
        ({"model": "m", "token_ids": "hello"}, "field 'token_ids' must be a list of token ids, got a string"),
        ({"model": "m", "token_ids": [1, -2]}, "integers from 0 to 4294967295"),
        ({"model": "m", "token_ids": [1, 2**32]}, "integers from 0 to 4294967295"),
        ({"model": "m", "token_ids": [1.5]}, "integers from 0 to 4294967295"),
        ({"model": "m", "token_ids": [1], "sampling_params": 3}, "field 'sampling_params' must be an object"),
        ({"model": "m", "token_ids": [1], "sampling_params": {"max_tokens": "x"}}, "'sampling_params.max_tokens' must be a non-negative integer"),
    ],
)
def test_vllm_generate_bodies_it_cannot_read_are_400_saying_why(body, message):
    assert message in refusal(parse_vllm_generate, body, "token_ids")


# -- sglanghttp-parser ------------------------------------------------------------------------------
def test_sglang_generate_reads_input_ids_extra_key_cap_and_stream_and_no_model():
    req = request("generate", "/generate")
    body = {"input_ids": [3, 4], "extra_key": "k", "sampling_params": {"max_new_tokens": 12}, "stream": True, "text": "ignored"}
    parse_sglang_generate(req, json.dumps(body).encode(), "input_ids")
    assert list(req.prompt_token_ids) == [3, 4]
    assert (req.model, req.cache_salt, req.max_tokens, req.stream) == ("", "k", 12, True)


@pytest.mark.parametrize("cap", [-1, "12", None, True])
def test_sglang_a_cap_that_is_not_a_count_is_left_for_sglang_to_refuse(cap):
    req = request("generate", "/generate")
    parse_sglang_generate(req, json.dumps({"input_ids": [1], "sampling_params": {"max_new_tokens": cap}}).encode(), "input_ids")
    assert req.max_tokens is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text": "hello"}, "field 'input_ids' is required for generate (a 'text' prompt is not read"),
        ({}, "field 'input_ids' is required for generate"),
        ({"input_ids": [[1, 2], [3]]}, "one prompt per request: batches are not supported"),
        ({"input_ids": [1], "extra_key": ["a"]}, "field 'extra_key' must be a string"),
        (b" ", "request body is empty: x needs a JSON object with 'input_ids'"),
    ],
)
def test_sglang_bodies_it_cannot_read_are_400_saying_why(body, message):
    assert message in refusal(parse_sglang_generate, body, "input_ids")


# -- usage in each API's shape ----------------------------------------------------------------------
def feed_all(reader: UsageReader, body: bytes, chunk: int = 7) -> UsageReader:
    for i in range(0, len(body), chunk):
        reader.feed(body[i : i + chunk], i + chunk >= len(body))
    return reader


ANTHROPIC_STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"m","usage":{"input_tokens":25,"output_tokens":1,"cache_read_input_tokens":8}}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_anthropic_streamed_usage_takes_input_from_message_start_and_output_from_message_delta(chunk):
    reader = feed_all(UsageReader(True, ANTHROPIC), ANTHROPIC_STREAM, chunk)
    u = reader.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens) == (25, 15, 40, 8)
    assert reader.done


def test_anthropic_json_usage():
    body = b'{"id":"msg_1","type":"message","content":[],"usage":{"input_tokens":10,"output_tokens":4}}'
    u = feed_all(UsageReader(False, ANTHROPIC), body).usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.prompt_tokens_details) == (10, 4, 14, None)


def test_an_anthropic_stream_cut_before_message_stop_is_not_done():
    reader = feed_all(UsageReader(True, ANTHROPIC), ANTHROPIC_STREAM.split(b"event: message_stop")[0])
    assert not reader.done and reader.usage.completion_tokens == 15


SGLANG_STREAM = (
    b'data: {"text":"he","meta_info":{"prompt_tokens":10,"completion_tokens":2,"finish_reason":null}}\n\n'
    b'data: {"text":"hello","meta_info":{"prompt_tokens":10,"completion_tokens":5,"cached_tokens":3,"finish_reason":{"type":"length"}}}\n\n'
    b"data: [DONE]\n\n"
)


def test_sglang_streamed_usage_is_the_finished_chunks_meta_info():
    reader = feed_all(UsageReader(True, SGLANG), SGLANG_STREAM)
    u = reader.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, reader.done) == (10, 5, 15, 3, True)


def test_sglang_unfinished_chunks_give_no_usage():
    assert feed_all(UsageReader(True, SGLANG), SGLANG_STREAM.split(b"\n\n")[0] + b"\n\n").usage is None


def test_sglang_json_usage():
    u = feed_all(UsageReader(False, SGLANG), b'{"text":"hi","meta_info":{"prompt_tokens":8,"completion_tokens":3}}').usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (8, 3, 11)


def test_no_format_reads_nothing_but_counts_chunks():
    reader = feed_all(UsageReader(True, None), b'data: {"usage":{"prompt_tokens":1}}\n\ndata: [DONE]\n\n', 10)
    assert (reader.usage, reader.done, reader.chunks_seen) == (None, False, 6)


@given(st.binary(max_size=300), st.integers(1, 50), st.sampled_from([OPENAI, ANTHROPIC, SGLANG]), st.booleans())
def test_any_response_bytes_are_read_without_error(body, chunk, fmt, streaming):
    feed_all(UsageReader(streaming, fmt), body, chunk)


# -- through the request state machine --------------------------------------------------------------
def anthropic_body(**extra) -> bytes:
    return json.dumps({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}], **extra}).encode()


def test_a_messages_request_is_parsed_routed_and_its_anthropic_usage_read():
    director = FakeDirector()
    stream = RequestStream(director)
    out = send_request(stream, anthropic_body(stream=True), path="/v1/messages")
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"]
    assert director.routed[0].api == "messages" and director.routed[0].prompt_text == "<|user|>\nHello\n"
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    stream.handle(response_body_msg(ANTHROPIC_STREAM, True))
    usage = director.outcomes[0].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (25, 15)


def test_a_messages_body_it_cannot_read_is_400_with_the_reason():
    out = send_request(RequestStream(FakeDirector()), b'{"model":"m","messages":[]}', path="/v1/messages")
    resp = out[-1].immediate_response
    assert resp.status.code == 400 and b"must have at least one message" in resp.body


def test_count_tokens_is_routed_on_its_headers_and_its_body_streams_through_unread():
    director = FakeDirector()
    stream = RequestStream(director)
    out = stream.handle(headers_msg(path="/v1/messages/count_tokens"))
    assert out[0].WhichOneof("response") == "request_headers" and stream.state is State.PASSTHROUGH
    assert director.routed[0].api is None
    echoed = stream.handle(body_msg(b"anything", True))
    assert echoed[0].request_body.response.body_mutation.streamed_response.body == b"anything"


def test_passthrough_routes_on_load_alone_and_reads_no_usage():
    director = FakeDirector()
    stream = RequestStream(director, parsers=parsers("passthrough-parser"))
    out = stream.handle(headers_msg(path="/v1/chat/completions"))
    assert out[0].WhichOneof("response") == "request_headers" and stream.state is State.PASSTHROUGH
    assert (director.routed[0].api, director.routed[0].prompt_text) == (None, "")
    stream.handle(body_msg(b'{"model":"m","messages":[]}', True))  # not read, so not refused
    stream.handle(response_headers_msg())
    stream.handle(response_body_msg(b'{"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}', True))
    assert director.outcomes[0].usage is None and not director.outcomes[0].aborted


def test_a_path_no_configured_parser_claims_is_400_before_the_body():
    director = FakeDirector()
    stream = RequestStream(director, parsers=parsers("openai-parser"))
    out = stream.handle(headers_msg(path="/v1/messages"))
    resp = out[0].immediate_response
    assert resp.status.code == 400
    assert b"no request parser claims the path '/v1/messages'" in resp.body and b"add passthrough-parser last" in resp.body
    assert director.routed == []


def test_a_request_without_a_body_is_routed_whatever_the_parsers():
    stream = RequestStream(FakeDirector(), parsers=parsers("openai-parser"))
    out = stream.handle(headers_msg(path="/v1/models", method="GET", eos=True))
    assert out[0].WhichOneof("response") == "request_headers" and stream.state is State.ROUTED


def test_sglang_reads_generate_only_and_refuses_other_paths_it_claims():
    stream = RequestStream(FakeDirector(), parsers=parsers("sglanghttp-parser"))
    resp = stream.handle(headers_msg(path="/v1/generate"))[0].immediate_response
    assert resp.status.code == 400 and b"sglanghttp-parser reads /generate only, not '/v1/generate'" in resp.body
    director = FakeDirector()
    out = send_request(RequestStream(director, parsers=parsers("sglanghttp-parser")), b'{"input_ids":[1,2,3]}', path="/generate")
    assert out[-1].WhichOneof("response") == "request_body" and director.routed[0].prompt_tokens == 3


def test_an_empty_post_to_a_parsed_path_says_what_the_api_needs():
    stream = RequestStream(FakeDirector())
    resp = stream.handle(headers_msg(path="/inference/v1/generate", eos=True))[0].immediate_response
    assert resp.status.code == 400 and b"generate needs a JSON object with 'model' and 'token_ids'" in resp.body


def test_the_model_of_a_messages_request_is_rewritten_like_a_chat_request():
    director = FakeDirector()
    original_route = director.route

    def rewrite(req, subset):
        routing = original_route(req, subset)
        req.target_model = "served-name"
        return routing

    director.route = rewrite  # type: ignore[method-assign]
    out = send_request(RequestStream(director), anthropic_body(), path="/v1/messages")
    sent = json.loads(out[1].request_body.response.body_mutation.streamed_response.body)
    assert sent["model"] == "served-name" and sent["messages"] == [{"role": "user", "content": "Hello"}]
