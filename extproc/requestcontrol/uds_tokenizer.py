"""The token-producer's deprecated `udsTokenizerConfig` backend: llm-d's tokenizer sidecar (llm-d-kv-cache's
uds_tokenizer, vLLM's renderer on CPU) over gRPC on a Unix domain socket, as llm-d's router calls it.

A completions prompt goes to RenderCompletion (one call per string of a batch), a chat to
RenderChatCompletion: its messages (string content, or `text` and `image_url` parts: the sidecar has no
field for other parts, which are left out as llm-d leaves them out), tool calls, tools, template and its
arguments. Each answers the prompt's token ids, a chat also its multimodal items' hashes. At start-up
`initialize` asks the sidecar to load the model (InitializeTokenizer, then a warm-up chat), retried in
the background until it answers; the EPP serves meanwhile, and a request whose call fails is scheduled
on the estimate by the producer (RenderError, TimeoutError). Wire types: the generated `tokenizerpb`
(protos/README.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

import grpc

from extproc.datalayer.supervisor import Backoff
from extproc.requestcontrol.render import RenderError
from extproc.requestcontrol.tokenizerpb import tokenizer_pb2 as pb
from extproc.requestcontrol.tokenizerpb import tokenizer_pb2_grpc as pb_grpc
from pickers.framework.request import InferenceRequest
from pickers.plugins.producer.tokens import Rendered, UdsTokenizerTarget

log = logging.getLogger(__name__)

_MAX_MESSAGE = 100 << 20  # bytes each way, as llm-d's client (a chat with inline images is large)
_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    # llm-d's keepalive: a ping after 10 idle minutes, dead after 10 s without an answer
    ("grpc.keepalive_time_ms", 600_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # a sidecar that comes up after the EPP (or restarts) is reconnected within seconds, not gRPC's 2 minutes
    ("grpc.max_reconnect_backoff_ms", 5_000),
)
_INITIALIZE_TIMEOUT = 120.0  # the sidecar loads the model's tokenizer and processor (a download, maybe)
_PART_TYPES = frozenset({"text", "image_url"})  # the content parts the sidecar's messages carry


class UdsTokenizerClient:
    """One gRPC channel to the sidecar, opened on first use (on the event loop that serves)."""

    def __init__(self, target: UdsTokenizerTarget) -> None:
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TokenizationServiceStub | None = None
        self.calls = 0
        self.initialized = False  # the sidecar answered InitializeTokenizer

    def _client(self) -> pb_grpc.TokenizationServiceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.target.grpc_target, options=_CHANNEL_OPTIONS)
            self._stub = pb_grpc.TokenizationServiceStub(self._channel)
        return self._stub

    async def render(self, request: InferenceRequest, model: str, timeout: float) -> Rendered:
        stub = self._client()
        try:
            if request.api == "chat":
                self.calls += 1
                answer = await stub.RenderChatCompletion(chat_request(request.body, model), timeout=timeout)
                if not answer.success:
                    raise RenderError(f"the tokenizer sidecar could not render the chat: {answer.error_message}")
                hashes = {k: list(v.values) for k, v in answer.features.mm_hashes.items()} if answer.HasField("features") else {}
                return Rendered(list(answer.token_ids), hashes)
            ids: list[int] = []
            deadline = asyncio.get_running_loop().time() + timeout
            for prompt in completion_prompts(request.body):  # a batch: each string, within the one timeout
                self.calls += 1
                left = max(0.001, deadline - asyncio.get_running_loop().time())
                done = await stub.RenderCompletion(pb.RenderCompletionRequest(model_name=model, prompt=prompt), timeout=left)
                if not done.success:
                    raise RenderError(f"the tokenizer sidecar could not render the prompt: {done.error_message}")
                ids.extend(done.token_ids)
            return Rendered(ids)
        except grpc.aio.AioRpcError as e:
            raise _failed(e, timeout) from None

    async def initialize(self) -> None:
        """Ask the sidecar to load the model, as llm-d does at start-up, until it answers; then one warm-up
        chat (its lazy downloads, e.g. an image processor's config). A long-running task of the EPP's
        supervisor that returns once done; its failures are logged, first as a warning, then quietly."""
        stub = self._client()
        model = self.target.model
        backoff = Backoff(1.0, 30.0)
        failures = 0
        while True:
            try:
                answer = await stub.InitializeTokenizer(
                    pb.InitializeTokenizerRequest(model_name=model, enable_thinking=False, add_generation_prompt=True),
                    timeout=_INITIALIZE_TIMEOUT, wait_for_ready=True,
                )  # fmt: skip
                why = "" if answer.success else answer.error_message or "it answered no success"
            except grpc.aio.AioRpcError as e:
                why = f"{e.code().name}: {e.details()}"
            if not why:
                break
            failures += 1
            (log.warning if failures == 1 else log.debug)(
                "the tokenizer sidecar at %s has not loaded model %s (%s); requests are scheduled on the estimated "
                "token count until it answers (retrying)", self.target.grpc_target, model, why)  # fmt: skip
            await asyncio.sleep(backoff.next_delay())
        self.initialized = True
        log.info("the tokenizer sidecar at %s loaded model %s", self.target.grpc_target, model)
        try:
            warmup = pb.RenderChatCompletionRequest(model_name=model, messages=[pb.ChatMessage(role="user", content="warmup")],
                                                    add_generation_prompt=True)  # fmt: skip
            await stub.RenderChatCompletion(warmup, timeout=30.0)
        except grpc.aio.AioRpcError as e:  # the first real request tries again
            log.debug("tokenizer sidecar warm-up failed: %s", e.details())

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None


def _failed(e: grpc.aio.AioRpcError, timeout: float) -> Exception:
    """The producer's reasons, as the vllm backend's: a deadline is a timeout, anything else a RenderError
    (the producer's log line names the sidecar)."""
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(f"no tokens within {timeout:g}s")
    return RenderError(f"the call failed: {e.code().name}: {e.details()}")


def completion_prompts(body: Mapping[str, Any]) -> list[str]:
    """A completions prompt's strings (one, or a batch's); token-id prompts never get here (pretokenized)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise RenderError("the prompt is neither a string nor a list of strings")


def chat_request(body: Mapping[str, Any], model: str) -> pb.RenderChatCompletionRequest:
    """The chat's fields the sidecar renders, as the client sent them. `add_generation_prompt` is sent only
    when the client set it, so the sidecar's default (true, vLLM's) applies as the engine applies it."""
    messages = body.get("messages")
    req = pb.RenderChatCompletionRequest(
        model_name=model,
        messages=[_message(m) for m in messages if isinstance(m, Mapping)] if isinstance(messages, list) else [],
        chat_template=body.get("chat_template") if isinstance(body.get("chat_template"), str) else "",
        continue_final_message=body.get("continue_final_message") is True,
    )
    if body.get("tools"):
        req.tools_json = json.dumps(body["tools"])
    if isinstance(body.get("add_generation_prompt"), bool):
        req.add_generation_prompt = body["add_generation_prompt"]
    if body.get("chat_template_kwargs"):
        req.chat_template_kwargs = json.dumps(body["chat_template_kwargs"])
    return req


def _message(m: Mapping[str, Any]) -> pb.ChatMessage:
    msg = pb.ChatMessage(role=str(m.get("role", "")))
    content = m.get("content")
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") not in _PART_TYPES:
                continue  # audio, video, ...: the sidecar's messages have no field for them
            if part["type"] == "text":
                msg.content_parts.append(pb.ContentPart(type="text", text=str(part.get("text", ""))))
            else:
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, Mapping) else image
                msg.content_parts.append(pb.ContentPart(type="image_url", image_url=pb.ImageUrl(url=str(url or ""))))
    elif content is not None:
        msg.content = content if isinstance(content, str) else str(content)
    if m.get("tool_calls"):
        msg.tool_calls_json = json.dumps(m["tool_calls"])
    return msg
