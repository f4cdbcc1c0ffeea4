"""Deterministic fake embeddings: a sum of per-token +-1 vectors, so inputs sharing tokens point alike.

Each token id hashes to a dense +-1 vector (a random projection of a bag of tokens); the sum over
the input is optionally truncated (`dimensions`, as a matryoshka model does) and L2-normalised, as
vLLM's default pooler does. Same tokens, same vector, whatever the process or platform.
"""

from __future__ import annotations

import base64
import math
import struct
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import xxhash

# Bit b of a byte -> a 32-bit little-endian lane holding 0 or 1; 8 lanes (32 bytes) per byte value.
_LANES = tuple(b"".join(((byte >> b) & 1).to_bytes(4, "little") for b in range(8)) for byte in range(256))


@lru_cache(maxsize=16384)
def _token_lanes(token_id: int, dim: int) -> int:
    """A token's sign bits (bit i set = coordinate i is -1) spread one per 32-bit lane of an int,
    so summing these ints counts, per coordinate, the tokens that vote -1 (no carries between lanes)."""
    key = struct.pack("<q", token_id)
    digest = b"".join(xxhash.xxh3_128_digest(key, seed=k) for k in range(-(-dim // 128)))
    return int.from_bytes(b"".join(_LANES[byte] for byte in digest[: -(-dim // 8)]), "little")


def embed(token_ids: Sequence[int], dim: int, dimensions: int | None = None, normalize: bool = True) -> list[float]:
    """The embedding of one tokenized input: `dim` floats, or the first `dimensions` of them."""
    minus = 0
    for token_id, count in Counter(token_ids).items():
        minus += count * _token_lanes(token_id, dim)
    lanes = -(-dim // 8) * 8
    ones = struct.unpack(f"<{lanes}I", minus.to_bytes(4 * lanes, "little"))[:dim]
    total = [len(token_ids) - 2 * m for m in ones]
    vector = [float(v) for v in (total if dimensions is None else total[:dimensions])]
    if normalize:
        norm = math.sqrt(sum(v * v for v in vector))
        if norm == 0.0:  # every coordinate cancelled out: still return a unit vector
            return [1.0] + [0.0] * (len(vector) - 1)
        vector = [v / norm for v in vector]
    return vector


def encode_base64(vector: Sequence[float]) -> str:
    """encoding_format=base64: little-endian float32 bytes, what the OpenAI client decodes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
