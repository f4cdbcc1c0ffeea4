"""token-load-scorer (llm-d): 1 - min(1, in-flight tokens / queueThresholdTokens), from the EPP's own
count of prompt + max output tokens per endpoint (`Endpoint.in_flight_tokens`). Absolute, and fresh
between scrapes.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin, PluginContext

DEFAULT_THRESHOLD_TOKENS = 4_194_304  # 128 requests of 32K tokens


class TokenLoadScorer(Plugin):
    type = "token-load-scorer"
    category = "distribution"

    def __init__(self, threshold_tokens: int = DEFAULT_THRESHOLD_TOKENS, name: str = "token-load-scorer") -> None:
        self.name = name
        self.threshold_tokens = threshold_tokens

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> TokenLoadScorer:
        return cls(p.integer("queueThresholdTokens", DEFAULT_THRESHOLD_TOKENS, minimum=1), name)

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        t = self.threshold_tokens
        return [1.0 - min(1.0, ep.in_flight_tokens / t) for ep in endpoints]
