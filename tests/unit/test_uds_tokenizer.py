"""The token-producer's deprecated `udsTokenizerConfig` backend: llm-d's tokenizer sidecar over gRPC on a
Unix domain socket. The config as llm-d reads it (and what it refuses), and the backend against a real
gRPC server on a socket in tmp_path that speaks the sidecar's service with the simulator's tokenizer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import xxhash

from extproc.cli import main as cli
from extproc.datalayer.kv_events import BlockStored, apply_events
from extproc.handlers.request_stream import RequestStream
from extproc.requestcontrol.tokenizerpb import tokenizer_pb2 as pb
from extproc.requestcontrol.tokenizerpb import tokenizer_pb2_grpc as pb_grpc
from extproc.requestcontrol.uds_tokenizer import UdsTokenizerClient
from extproc.server.runner import EppServer, ServeOptions
from pickers.framework.request import InferenceRequest
from pickers.indexes.tokenization import message_text, sim_chat_template, sim_encode
from pickers.plugins.producer.tokens import (
    UDS_DEPRECATION,
    TokenProducer,
    UdsTokenizerTarget,
)
from pickers.plugins.scorer.affinity.precise_prefix import PrecisePrefixCacheProducer
from tests.unit.test_producers import (
    HEADER,
    A,
    B,
    C,
    _director,
    chat,
    completion,
    load,
    refused,
)
from tests.unit.test_protocol import body_msg, completion_body, headers_msg

GUIDE = Path(__file__).parent / "configs" / "uds-tokenizer.yaml"


def uds_config(socket: str, extra: str = "") -> str:
    return (f"plugins:\n- type: token-producer\n  parameters:\n    modelName: m\n    udsTokenizerConfig:\n"
            f"      socketFile: {socket}\n{extra}- type: max-score-picker\n")  # fmt: skip


# -- the sidecar: llm-d-kv-cache's TokenizationService, with the simulator's tokenizer ------------------
class Sidecar(pb_grpc.TokenizationServiceServicer):
    def __init__(self, path: str) -> None:
        self.path = path
        self.mode = "ok"  # ok | hang | abort | refuse
        self.completions: list[pb.RenderCompletionRequest] = []
        self.chats: list[pb.RenderChatCompletionRequest] = []
        self.initialized: list[str] = []
        self.deadlines: list[float] = []  # seconds left on each render call's deadline as it arrived
        self.refuse_init = 0  # InitializeTokenizer answers success=false this many times first

    async def _fault(self, context: grpc.aio.ServicerContext) -> bool:
        self.deadlines.append(context.time_remaining() or 0.0)
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "abort":
            await context.abort(grpc.StatusCode.INTERNAL, "renderer exploded")
        return self.mode == "refuse"

    async def InitializeTokenizer(self, request: pb.InitializeTokenizerRequest, context: Any) -> pb.InitializeTokenizerResponse:
        if self.refuse_init:
            self.refuse_init -= 1
            return pb.InitializeTokenizerResponse(success=False, error_message="no such model")
        self.initialized.append(request.model_name)
        return pb.InitializeTokenizerResponse(success=True)

    async def RenderCompletion(self, request: pb.RenderCompletionRequest, context: Any) -> pb.RenderCompletionResponse:
        self.completions.append(request)
        if await self._fault(context):
            return pb.RenderCompletionResponse(success=False, error_message="prompt too long")
        return pb.RenderCompletionResponse(token_ids=sim_encode(request.prompt.encode()), success=True)

    async def RenderChatCompletion(self, request: pb.RenderChatCompletionRequest, context: Any) -> pb.RenderChatCompletionResponse:
        self.chats.append(request)
        if await self._fault(context):
            return pb.RenderChatCompletionResponse(success=False, error_message="bad template")
        turns = [(m.role, m.content if m.HasField("content") else message_text([{"type": p.type, "text": p.text} for p in m.content_parts]))
                 for m in request.messages]  # fmt: skip
        add = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        answer = pb.RenderChatCompletionResponse(token_ids=sim_encode(sim_chat_template(turns, add).encode()), success=True)
        images = [p.image_url.url for m in request.messages for p in m.content_parts if p.type == "image_url"]
        if images:
            answer.features.mm_hashes["image"].values.extend(xxhash.xxh64_hexdigest(u.encode()) for u in images)
        return answer


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[Sidecar]:
    path = str(tmp_path / "tokenizer-uds.socket")
    servicer = Sidecar(path)
    server = grpc.aio.server()
    pb_grpc.add_TokenizationServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    try:
        yield servicer
    finally:
        await server.stop(0)


def producer(socket: str, *, model: str = "m", timeout: float = 5.0) -> TokenProducer:
    tp = TokenProducer(backend="uds", model_name=model, uds=UdsTokenizerTarget(socket, False, model), timeout=timeout,
                       mm_timeout=max(timeout, 30.0))  # fmt: skip
    tp.renderer = UdsTokenizerClient(tp.uds)  # type: ignore[arg-type]
    return tp


# -- the config -----------------------------------------------------------------------------------------
def test_a_uds_config_loads_with_llm_ds_deprecation_and_shows_what_it_runs_with():
    cfg = load(uds_config("/tmp/tokenizer/tokenizer-uds.socket"))
    tp = cfg.plugins["token-producer"]
    assert isinstance(tp, TokenProducer) and tp.token_backend == "uds"
    assert tp.uds == UdsTokenizerTarget("/tmp/tokenizer/tokenizer-uds.socket", False, "m") and tp.render_model == "m"
    assert tp.uds.grpc_target == "unix:/tmp/tokenizer/tokenizer-uds.socket"
    assert (tp.timeout, tp.mm_timeout) == (5.0, 30.0)  # llm-d-kv-cache's fixed timeouts
    assert any(w.endswith(UDS_DEPRECATION) for w in cfg.warnings)
    assert UDS_DEPRECATION == ("DEPRECATION: the 'udsTokenizerConfig' parameter is deprecated and will be removed in a "
                               "future release; set the 'vllm' parameter instead")  # llm-d's words  # fmt: skip
    assert cfg.plugin_parameters["token-producer"] == {
        "modelName": "m", "udsTokenizerConfig": {"socketFile": "/tmp/tokenizer/tokenizer-uds.socket", "useTCP": False}}  # fmt: skip


def test_the_old_name_tokenizer_with_the_sidecar_warns_twice_as_llm_d_does():
    cfg = load(uds_config("/s").replace("type: token-producer", "type: tokenizer"))
    assert cfg.plugins["tokenizer"].token_backend == "uds"
    said = " | ".join(cfg.warnings)
    assert "plugin type tokenizer is deprecated" in said and UDS_DEPRECATION in said


def test_the_sidecars_tokens_are_real_tokens_for_the_precise_producer():
    cfg = load(uds_config("/s", "- type: precise-prefix-cache-producer\n"))
    precise = cfg.plugins["precise-prefix-cache-producer"]
    assert isinstance(precise, PrecisePrefixCacheProducer) and precise.real_tokens
    assert not any("estimated tokens never match" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    ("tokenizer_path", "sent"),
    [("/models/qwen", "/models/qwen"), ("/opt/tok/qwen/tokenizer.json", "/opt/tok/qwen"), ("tokenizer.json", ".")],
)
def test_the_model_tokenizer_map_names_what_the_sidecar_loads(tokenizer_path: str, sent: str):
    cfg = load(uds_config("/s", f"      modelTokenizerMap: {{m: '{tokenizer_path}', other: /x}}\n"))
    tp = cfg.plugins["token-producer"]
    assert tp.render_model == sent and tp.model_name == "m"  # as llm-d-kv-cache: a tokenizer.json's folder
    assert cfg.plugin_parameters["token-producer"]["udsTokenizerConfig"]["modelTokenizerMap"] == {"m": tokenizer_path, "other": "/x"}


def test_use_tcp_makes_the_socket_file_a_host_and_port():
    tp = load(uds_config("127.0.0.1:50051", "      useTCP: true\n")).plugins["token-producer"]
    assert tp.uds.grpc_target == "127.0.0.1:50051"


@pytest.mark.parametrize(
    ("params", "field", "fragment"),
    [
        ("{udsTokenizerConfig: {socketFile: /s}}", "modelName", "is required with udsTokenizerConfig"),
        ("{modelName: m, udsTokenizerConfig: {}}", "udsTokenizerConfig.socketFile", "is required"),
        ("{modelName: m, udsTokenizerConfig: {useTCP: true}}", "udsTokenizerConfig.socketFile", "is required"),
        ("{modelName: m, udsTokenizerConfig: {socketFile: /s}, vllm: {url: 'http://x:8000'}}", "udsTokenizerConfig", "only one of"),
        ("{udsTokenizerConfig: {socketFile: /s}, estimate: {}}", "udsTokenizerConfig", "only one of"),
        ("{modelName: m, udsTokenizerConfig: {socketFile: /s}, local: {tokenizer: sim}}", "local", "only one of"),
        ("{modelName: m, udsTokenizerConfig: {socketFile: /s, timeout: 5s}}", "udsTokenizerConfig.timeout", "no such setting"),
        ("{modelName: m, udsTokenizerConfig: {socketFile: /s, maxRetries: 3}}", "udsTokenizerConfig.maxRetries", "no such setting"),
        ("{modelName: m, udsTokenizerConfig: {socketFile: /s, socket: /t}}", "udsTokenizerConfig.socket",
         "unknown parameter; udsTokenizerConfig takes: maxRetries, modelTokenizerMap, socketFile, timeout, useTCP"),
        ("{modelName: m, udsTokenizerConfig: {socketFile: 7}}", "udsTokenizerConfig.socketFile", "expected a non-empty string"),
        ("{modelName: m, udsTokenizerConfig: {socketFile: /s, useTCP: yes please}}", "udsTokenizerConfig.useTCP", "expected true or false"),
        ("{modelName: m, udsTokenizerConfig: {socketFile: /s, useTCP: true}}", "udsTokenizerConfig.socketFile", "expected host:port"),
        ("{modelName: m, udsTokenizerConfig: {socketFile: /s, modelTokenizerMap: {other: /x}}}", "udsTokenizerConfig.modelTokenizerMap",
         "has no entry for modelName 'm'; it maps other"),
        ("{modelName: m, udsTokenizerConfig: {socketFile: /s, modelTokenizerMap: {}}}", "udsTokenizerConfig.modelTokenizerMap",
         "has no entry for modelName 'm'; it maps nothing"),
        ("{modelName: m, udsTokenizerConfig: {socketFile: /s, modelTokenizerMap: [a]}}", "udsTokenizerConfig.modelTokenizerMap",
         "expected a mapping of string to string"),
        ("{modelName: m, udsTokenizerConfig: /s}", "udsTokenizerConfig", "expected a mapping"),
    ],
)
def test_bad_uds_settings_are_refused_naming_the_field(params: str, field: str, fragment: str):
    msg = refused(f"plugins:\n- type: token-producer\n  parameters: {params}\n- type: max-score-picker\n")
    assert f"plugins[0].parameters.{field}" in msg and fragment in msg, msg


def test_check_config_on_the_guide_shape_prints_the_deprecation_and_the_sidecar(capsys):
    assert cli.main(["check-config", str(GUIDE)]) == 0
    out = capsys.readouterr().out
    assert f"  warning: plugins[0] (tokenizer): {UDS_DEPRECATION}" in out
    assert '    tokenizer: modelName=Qwen/Qwen3-32B, udsTokenizerConfig={"socketFile":"/tmp/tokenizer/tokenizer-uds.socket","useTCP":false}' in out
    assert "    scorers: prefix-cache-scorer x2, kv-cache-utilization-scorer x1, queue-scorer x1" in out


# -- the backend, against the sidecar ----------------------------------------------------------------------
async def test_a_completion_is_tokenized_by_the_sidecar_and_its_tokens_reach_the_request(sidecar: Sidecar):
    tp = producer(sidecar.path)
    try:
        req = completion("the prompt the sidecar tokenizes")
        assert tp.needs_io(req)
        await tp.prepare(req)
        assert req.prompt_token_ids == sim_encode(b"the prompt the sidecar tokenizes")
        assert req.prompt_tokens == len(req.prompt_token_ids)  # what counts tokens counts these
        assert [(r.model_name, r.prompt) for r in sidecar.completions] == [("m", "the prompt the sidecar tokenizes")]
        assert sidecar.deadlines[0] < 6.0  # the text timeout (5s)
        batch = completion(["first prompt", "second one"])
        await tp.prepare(batch)
        assert batch.prompt_token_ids == sim_encode(b"first prompt") + sim_encode(b"second one")
        given = completion([5, 6, 7])
        await tp.prepare(given)
        assert given.prompt_token_ids == [5, 6, 7] and len(sidecar.completions) == 3  # token ids: no call
        assert not tp.fallbacks
    finally:
        await tp.renderer.close()  # type: ignore[union-attr]


async def test_a_chat_is_rendered_by_the_sidecar_with_what_the_client_sent(sidecar: Sidecar):
    tp = producer(sidecar.path)
    try:
        req = chat("and a chat, with its template")
        await tp.prepare(req)
        assert req.prompt_token_ids == sim_encode(sim_chat_template([("user", "and a chat, with its template")], True).encode())
        (sent,) = sidecar.chats
        assert sent.model_name == "m" and not sent.HasField("add_generation_prompt")  # the sidecar's default: vLLM's
        assert not sent.HasField("tools_json") and req.media_hashes == {}

        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        body = {"model": "m", "tools": tools, "add_generation_prompt": False, "continue_final_message": True,
                "chat_template": "{{ messages }}", "chat_template_kwargs": {"enable_thinking": False},
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                                 {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}}]},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                           "function": {"name": "f", "arguments": "{}"}}]},
                ]}  # fmt: skip
        multimodal = InferenceRequest("r", "/v1/chat/completions", {}, api="chat", model="m", prompt_text="x", body=body)
        await tp.prepare(multimodal)
        sent = sidecar.chats[1]
        system, user, assistant = sent.messages
        assert system.content == "be brief" and not system.content_parts
        assert not user.HasField("content") and [p.type for p in user.content_parts] == ["text", "image_url"]  # audio: no field
        assert user.content_parts[0].text == "what is this?" and user.content_parts[1].image_url.url == "data:image/png;base64,AAAA"
        assert not assistant.HasField("content") and assistant.tool_calls_json == '[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]'
        assert sent.tools_json.startswith('[{"type": "function"') and sent.chat_template == "{{ messages }}"
        assert sent.HasField("add_generation_prompt") and sent.add_generation_prompt is False and sent.continue_final_message
        assert sent.chat_template_kwargs == '{"enable_thinking": false}'
        expected = sim_chat_template([("system", "be brief"), ("user", "what is this?"), ("assistant", "")], False)
        assert multimodal.prompt_token_ids == sim_encode(expected.encode())
        assert multimodal.media_hashes == {"image": [xxhash.xxh64_hexdigest(b"data:image/png;base64,AAAA")]}
        assert 10.0 < sidecar.deadlines[1] < 31.0  # content parts: the multimodal timeout (30s)
    finally:
        await tp.renderer.close()  # type: ignore[union-attr]


async def test_the_sidecars_tokens_route_a_shared_prefix_to_the_endpoint_whose_kv_events_hold_it(sidecar: Sidecar):
    cfg = load(uds_config(sidecar.path, "- type: precise-prefix-cache-producer\n  parameters: {tokenProcessorConfig: {blockSizeTokens: 4}}\n"
                          "- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}\n"))  # fmt: skip
    tp, precise = cfg.plugins["token-producer"], cfg.plugins["precise-prefix-cache-producer"]
    tp.renderer = UdsTokenizerClient(tp.uds)
    prompt = "a long shared system prompt, then the question " * 8
    ids = sim_encode(prompt.encode())
    blocks = len(ids) // 4
    apply_events(precise.index, B, [BlockStored(list(range(blocks)), None, ids[: blocks * 4], 4)])  # B holds the prompt
    apply_events(precise.index, C, [BlockStored([999], None, ids[:4], 4)])  # C its first block only
    director = _director(cfg, addrs=(A, B, C))
    try:
        stream = RequestStream(director)
        stream.handle(headers_msg())
        stream.handle(body_msg(completion_body(prompt=prompt), True))
        await director.prepare(stream.request)  # type: ignore[arg-type]
        picked = stream.resume()[0].request_headers.response.header_mutation.set_headers[0].header.raw_value.decode()
        assert stream.request.prompt_token_ids == ids  # type: ignore[union-attr]
        assert picked == B and not tp.fallbacks
    finally:
        await tp.renderer.close()


async def test_a_sidecar_that_hangs_costs_the_timeout_once_per_request_then_the_estimate(sidecar: Sidecar, caplog):
    sidecar.mode = "hang"
    tp = producer(sidecar.path, timeout=0.2)
    try:
        with caplog.at_level(logging.WARNING, "pickers.plugins.producer.tokens"):
            for _ in range(2):
                req = completion("y" * 40)
                await asyncio.wait_for(tp.prepare(req), 5.0)  # never a hang: the producer's own timeout
                assert req.prompt_token_ids is None and req.prompt_tokens == 10  # the estimate
        assert tp.fallbacks == {"timeout": 2}
        (logged,) = [r.getMessage() for r in caplog.records]  # once per reason
        assert "from the tokenizer sidecar at unix:" in logged
    finally:
        await tp.renderer.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["abort", "refuse"])
async def test_a_sidecar_error_falls_back_to_the_estimate(sidecar: Sidecar, mode: str):
    sidecar.mode = mode
    tp = producer(sidecar.path)
    try:
        req, conversation = completion("z" * 40), chat("hello")
        await tp.prepare(req)
        await tp.prepare(conversation)
        assert req.prompt_token_ids is None and conversation.prompt_token_ids is None
        assert tp.fallbacks == {"RenderError": 2}  # the vllm backend's reasons
    finally:
        await tp.renderer.close()  # type: ignore[union-attr]


async def test_an_unreachable_socket_falls_back_to_the_estimate(tmp_path: Path):
    tp = producer(str(tmp_path / "nobody-listens.socket"))
    try:
        for _ in range(2):
            req = completion("w" * 40)
            await asyncio.wait_for(tp.prepare(req), 5.0)
            assert req.prompt_token_ids is None
        assert tp.fallbacks == {"RenderError": 2}
    finally:
        await tp.renderer.close()  # type: ignore[union-attr]


async def test_initialize_asks_the_sidecar_for_the_model_until_it_loads_it(sidecar: Sidecar):
    sidecar.refuse_init = 1  # the first answer is a failure: retried
    client = UdsTokenizerClient(UdsTokenizerTarget(sidecar.path, False, "/models/qwen"))
    try:
        await asyncio.wait_for(client.initialize(), 10.0)
        assert client.initialized and sidecar.initialized == ["/models/qwen"]
        (warmup,) = sidecar.chats
        assert warmup.model_name == "/models/qwen" and warmup.messages[0].content == "warmup"
    finally:
        await client.close()


async def test_epp_serve_wires_the_sidecar_client_and_initializes_it(sidecar: Sidecar):
    text = HEADER + uds_config(sidecar.path, "      modelTokenizerMap: {m: /models/m/tokenizer.json}\n")
    server = EppServer(ServeOptions(grpc_port=0, grpc_health_port=0, metrics_port=0, admin_port=0, bind_address="127.0.0.1",
                                    config_text=text))  # fmt: skip
    client = server.token_producers[0].renderer
    assert isinstance(client, UdsTokenizerClient) and client.target.model == "/models/m"
    await server.start()
    try:
        for _ in range(200):
            if client.initialized:
                break
            await asyncio.sleep(0.05)
        assert sidecar.initialized == ["/models/m"]
        req = completion("through the server's client")
        await server.director.prepare(req)
        assert req.prompt_token_ids == sim_encode(b"through the server's client")
        assert sidecar.completions[-1].model_name == "/models/m"
    finally:
        await server.stop(0)


async def test_epp_serve_without_its_sidecar_serves_on_the_estimate_and_stops_cleanly(tmp_path: Path):
    text = HEADER + uds_config(str(tmp_path / "not-yet.socket"))
    server = EppServer(ServeOptions(grpc_port=0, grpc_health_port=0, metrics_port=0, admin_port=0, bind_address="127.0.0.1",
                                    config_text=text))  # fmt: skip
    await server.start()
    try:
        assert "uds-tokenizer-init" in server.supervisor.running  # waiting for the sidecar, in the background
        req = completion("x" * 40)
        await asyncio.wait_for(server.director.prepare(req), 5.0)
        assert req.prompt_token_ids is None and server.token_producers[0].fallbacks == {"RenderError": 1}
    finally:
        await asyncio.wait_for(server.stop(0), 10.0)
    assert not server.supervisor.running
