"""One inference request as the scheduler sees it, decoded once at the edge by the EPP's request parser.

The prompt text is what the approximate prefix index hashes; ~4 characters make a token. A prompt the
client sent as token ids (vLLM's and SGLang's generate APIs) is kept as `prompt_token_ids`, and its
prompt text is exactly 4 ASCII characters per id, so blocks of text are blocks of tokens. A
token-producer sets `prompt_token_ids` too, before scheduling: the prompt as the model server tokenizes
it (the text stays the text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CHARS_PER_TOKEN = 4


@dataclass(slots=True, frozen=True)
class MediaPart:
    """An image, video or audio part of a prompt, as the body parser met it while building the prompt
    text: what a token-producer's estimate needs to weigh it, with no second walk of the body."""

    kind: str  # "image", "video" or "audio"
    # an image's or video's URL (a data: URL for inline data), or an image's bare base64 data when
    # `inline` (Anthropic's); an `input_audio` part's data (`inline`), an `audio_url` part's URL
    source: str = ""
    inline: bool = False
    media_type: str = ""  # an inline image's media type (Anthropic's source.media_type); an audio part's format
    size: int = 0  # audio: the characters of its data and format
    text_chars: int = 0  # the characters the part added to the prompt text (its JSON)


@dataclass(slots=True)
class InferenceRequest:
    """One request as the scheduler sees it."""

    request_id: str
    path: str
    headers: Mapping[str, str]
    api: str | None = None  # None: a path we pass through unparsed
    model: str = ""
    prompt_text: str = ""
    # the prompt as the client tokenized it, or (before scheduling) as a token-producer had the model
    # server tokenize it; None: counts are estimated from the characters
    prompt_token_ids: Sequence[int] | None = None
    cache_salt: str = ""  # isolates this request's prefix-cache entries (vLLM's cache_salt, SGLang's extra_key)
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    # the prompt has an image, audio or video part (set by the body parser while it builds prompt_text);
    # always-disagg-multimodal-decider sends such a request to an encoder first
    multimodal: bool = False
    media: list[MediaPart] | None = None  # those parts, in prompt order (None: none)
    # the model server's own hashes of the prompt's multimodal items, by modality (vLLM's `mm_hashes`:
    # from its render endpoint, through a token-producer, or a generate body's `features`); None: unknown
    media_hashes: Mapping[str, Sequence[str]] | None = None
    # a token-producer's estimate of those parts' placeholder tokens; they then count instead of the
    # parts' text form
    media_tokens: int | None = None
    body: Mapping[str, Any] = field(default_factory=dict)
    # Set by the Director when it admits the request:
    objective: str = ""  # from x-gateway-inference-objective
    priority: int = 0  # the objective's; negative = sheddable
    target_model: str = ""  # the model sent upstream (differs from `model` when rewritten)
    # Set when scheduled: the prompt tokens the primary probably has to compute (not cached there),
    # counted on the endpoint until the first response byte.
    prefill_tokens: int = 0
    # Set by request data producers (session-id-producer): (attribute, producer name) -> value
    attributes: dict[tuple[str, str], str] = field(default_factory=dict)
    # Set by admission plugins that flag without refusing (content-check-admitter's `action: flag`): the
    # rules the request matched, as `plugin/rule`; the audit record and /debug/decisions list them
    flags: list[str] | None = None

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens: counted when the client or a token-producer gave its ids, else estimated
        (4 characters each, plus the media parts' placeholder tokens where a token-producer estimated them)."""
        ids = self.prompt_token_ids
        if ids is not None:
            return len(ids)
        if self.media_tokens is None or not self.media:
            return len(self.prompt_text) // CHARS_PER_TOKEN
        media_chars = sum(m.text_chars for m in self.media)
        return max(0, len(self.prompt_text) - media_chars) // CHARS_PER_TOKEN + self.media_tokens


def mm_hashes(value: Any) -> dict[str, list[str]] | None:
    """vLLM's `features.mm_hashes` (modality -> the items' hashes) as a request keeps it: the string
    hashes of each modality; {} when there are none (null), None when it is not such a mapping."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        return None
    return {str(k): [h for h in v if isinstance(h, str) and h] for k, v in value.items() if isinstance(v, list)}
