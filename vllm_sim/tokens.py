"""Deterministic fake tokenizer, chat template and filler output text.

One token per 4 bytes of UTF-8, so token counts look like a real BPE's and, what matters for
prefix caching, two texts with a common prefix have a common token prefix.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import xxhash

VOCAB_SIZE = 50000
BYTES_PER_TOKEN = 4

# Four-byte pieces so the generated text re-tokenizes to as many tokens as were generated.
_FILLER_WORDS: tuple[str, ...] = (
    " the", " and", " for", " you", " not", " are", " but", " can", " all", " new",
    " one", " was", " our", " out", " day", " way", " use", " how", " its", " may",
    " see", " now", " two", " get", " had", " has", " him", " his", " who", " did",
)


def encode(text: str) -> list[int]:
    data = text.encode("utf-8")
    return [
        xxhash.xxh32_intdigest(data[i : i + BYTES_PER_TOKEN]) % VOCAB_SIZE
        for i in range(0, len(data), BYTES_PER_TOKEN)
    ]


def apply_chat_template(messages: Iterable[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    """Render (role, content) pairs; each message is a self-contained chunk, so shared leading
    messages give a shared text (and token) prefix."""
    text = "".join(f"<|{role}|>\n{content}\n" for role, content in messages)
    if add_generation_prompt:
        text += "<|assistant|>\n"
    return text


class FillerText:
    """The output of one request: a seeded stream of words, one word per token.

    Seeded by (simulator seed, request seed, prompt, choice) so a replayed request gets the same
    text whatever else the engine was doing at the time; the n choices of one request differ.
    """

    __slots__ = ("_rng",)

    def __init__(self, seed: int, prompt_token_ids: Sequence[int], request_seed: int | None = None,
                 choice: int = 0) -> None:
        h = xxhash.xxh64(seed=seed & 0xFFFFFFFFFFFFFFFF)
        h.update(repr(request_seed).encode())
        if choice:  # choice 0 hashes as before, so single-choice texts are unchanged
            h.update(f"#{choice}".encode())
        h.update(b"|")
        h.update(",".join(map(str, prompt_token_ids)).encode())
        self._rng = random.Random(h.intdigest())

    def next_token(self) -> str:
        return self._rng.choice(_FILLER_WORDS)
