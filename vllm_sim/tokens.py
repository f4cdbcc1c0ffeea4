"""Deterministic fake tokenizer, chat template and filler output text.

One token per 4 bytes of UTF-8, so token counts look like a real BPE's and, what matters for
prefix caching, two texts with a common prefix have a common token prefix. The tokenizer and the
chat template are the EPP's own `sim` tokenizer (pickers.indexes.tokenization), so the precise
prefix scorer computes exactly the tokens the simulator does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import xxhash

from pickers.indexes.tokenization import SIM_BYTES_PER_TOKEN, SIM_VOCAB_SIZE, sim_chat_template, sim_encode

VOCAB_SIZE = SIM_VOCAB_SIZE
BYTES_PER_TOKEN = SIM_BYTES_PER_TOKEN

# Four-byte pieces so the generated text re-tokenizes to as many tokens as were generated.
_FILLER_WORDS: tuple[str, ...] = (
    " the", " and", " for", " you", " not", " are", " but", " can", " all", " new",
    " one", " was", " our", " out", " day", " way", " use", " how", " its", " may",
    " see", " now", " two", " get", " had", " has", " him", " his", " who", " did",
)


def encode(text: str) -> list[int]:
    return sim_encode(text.encode("utf-8"))


apply_chat_template = sim_chat_template


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
