"""One inference request as the scheduler sees it, decoded once at the edge by the EPP's body parser.

The prompt text is what the approximate prefix index hashes; ~4 characters make a token, unless a
token-producer set the prompt's real token ids (`token_ids`) before scheduling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CHARS_PER_TOKEN = 4


@dataclass(slots=True)
class InferenceRequest:
    """One request as the scheduler sees it."""

    request_id: str
    path: str
    headers: Mapping[str, str]
    api: str | None = None  # None: a path we pass through unparsed
    model: str = ""
    prompt_text: str = ""
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    body: Mapping[str, Any] = field(default_factory=dict)
    # Set by the Director when it admits the request:
    objective: str = ""  # from x-gateway-inference-objective
    priority: int = 0  # the objective's; negative = sheddable
    target_model: str = ""  # the model sent upstream (differs from `model` when rewritten)
    # Set when scheduled: the prompt tokens the primary probably has to compute (not cached there),
    # counted on the endpoint until the first response byte.
    prefill_tokens: int = 0
    # Set by a token-producer before scheduling: the prompt's token ids as the model server computes
    # them. None: not tokenized, so token counts are estimated from the characters.
    token_ids: list[int] | None = None
    # Set by request data producers (session-id-producer): (attribute, producer name) -> value
    attributes: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens: counted when a token-producer tokenized it, else estimated (4 characters each)."""
        ids = self.token_ids
        return len(ids) if ids is not None else len(self.prompt_text) // CHARS_PER_TOKEN
