"""Disaggregation deciders: given the decode pick, is a separate stage worth it for this request?

`disagg-profile-handler` asks its deciders after the decode profile ran: the encode decider (yes runs
the encode profile) and then the prefill decider (yes runs the prefill profile; no serves the request
aggregated on the decode endpoint). A prefill decider that is also a PrefillPickDecider is asked once
more, with the prefill profile's pick (latency-pd-decider: does that endpoint beat a local prefill?).
Names and parameters are llm-d's, but for latency-pd-decider (profile/latency_pd_decider.py).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import CHARS_PER_TOKEN, InferenceRequest
from pickers.framework.types import CycleState
from pickers.indexes.prefix import BLOCK_CHARS, MAX_BLOCKS
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.scorer.affinity.prefix import prefix_match


@runtime_checkable
class PdDecider(Protocol):
    """True: run this decider's stage (prefill, or encode) elsewhere, then decode on `decode` (which
    the decode profile chose)."""

    type: str
    name: str

    def disaggregate(self, request: InferenceRequest, cycle: CycleState, decode: Endpoint) -> bool: ...


@runtime_checkable
class PrefillPickDecider(Protocol):
    """A prefill decider that judges the prefill profile's pick too: False serves the request
    aggregated on `decode` after all (the prefill pick is dropped)."""

    def disaggregate(self, request: InferenceRequest, cycle: CycleState, decode: Endpoint) -> bool: ...

    def keep_prefill(self, request: InferenceRequest, cycle: CycleState, decode: Endpoint, prefill: Endpoint) -> bool: ...


class PrefixBasedPDDecider(Plugin):
    """Prefill remotely when the part of the prompt the decode endpoint probably lacks is long enough.

    uncached = prompt tokens (characters / 4) - leading blocks the decode endpoint holds x 16 tokens,
    read from the shared approximate prefix index. As in llm-d, `nonCachedTokens: 0` turns P/D off and
    `promptTokens` (0 = no gate) is a minimum prompt length.
    """

    type = "prefix-based-pd-decider"

    def __init__(
        self,
        ctx: PluginContext,
        name: str = "prefix-based-pd-decider",
        *,
        non_cached_tokens: int = 0,
        prompt_tokens: int = 0,
        block_chars: int = BLOCK_CHARS,
        max_blocks: int = MAX_BLOCKS,
    ) -> None:
        self.name = name
        self.index = ctx.prefix_index
        self.non_cached_tokens = non_cached_tokens
        self.prompt_tokens = prompt_tokens
        self.block_chars = block_chars
        self.max_blocks = max_blocks

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> PrefixBasedPDDecider:
        return cls(
            ctx,
            name,
            non_cached_tokens=p.integer("nonCachedTokens", 0, minimum=0),
            prompt_tokens=p.integer("promptTokens", 0, minimum=0),
        )

    def disaggregate(self, request: InferenceRequest, cycle: CycleState, decode: Endpoint) -> bool:
        threshold = self.non_cached_tokens
        if threshold == 0:
            return False
        tokens = request.prompt_tokens
        if tokens < threshold or tokens < self.prompt_tokens:
            return False  # too short even if nothing is cached: no need to look at the index
        m = prefix_match(request, cycle, self.index, self.block_chars, self.max_blocks)
        cached = m.matched.get(decode.address, 0) * max(1, self.block_chars // CHARS_PER_TOKEN)
        return tokens - cached >= threshold


class AlwaysDisaggPDDecider(Plugin):
    """Every request is prefilled remotely (when a prefill endpoint is available)."""

    type = "always-disagg-pd-decider"

    def disaggregate(self, request: InferenceRequest, cycle: CycleState, decode: Endpoint) -> bool:
        return True


class AlwaysDisaggMultimodalDecider(Plugin):
    """Encode remotely every request with an image, audio or video part (the body parser flags them:
    chat's image_url, video_url, input_audio, audio_url parts, Anthropic's image blocks); text-only
    requests skip the encode stage."""

    type = "always-disagg-multimodal-decider"

    def disaggregate(self, request: InferenceRequest, cycle: CycleState, decode: Endpoint) -> bool:
        return request.multimodal
