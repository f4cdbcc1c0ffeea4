"""bench.prompt_cost compares `best` with a 4k-token match of it and with `weighted` (same prefix settings)."""

from __future__ import annotations

import random

from bench.prompt_cost import CONFIGS, conversations, setup


def test_the_variants_differ_from_best_in_match_length_or_scoring_only():
    bodies = conversations(random.Random(0), 1_000, 4)
    settings = [(s.scorer.block_chars, s.scorer.max_blocks) for s in (setup(c, bodies, 2) for c in CONFIGS.values())]
    assert settings == [(256, 131072 // 64), (256, 4096 // 64), (256, 131072 // 64)]


def test_each_conversation_is_held_by_its_endpoint_and_routed_back_there():
    s = setup(next(iter(CONFIGS.values())), conversations(random.Random(0), 10_000, 4), 2)
    for i, r in enumerate(s.requests):
        assert s.scheduler.schedule(r, s.endpoints).endpoints[0] is s.endpoints[i % 2]
