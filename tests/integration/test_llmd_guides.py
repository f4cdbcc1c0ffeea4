"""A config in the shape of llm-d's optimized-baseline guide (ours: prefix-cache-affinity-filter in front
of token-load-scorer, both producers listed) serving through Envoy -> llm-epp -> simulated vLLM."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import MODEL, make_stack
from tests.unit.test_llmd_plugins import OPTIMIZED_BASELINE

pytestmark = pytest.mark.envoy


def test_optimized_baseline_keeps_a_shared_prefix_on_the_endpoint_that_cached_it(tmp_path):
    config = tmp_path / "optimized-baseline.yaml"
    config.write_text(OPTIMIZED_BASELINE)
    with make_stack(tmp_path, epp_args=("--config-file", str(config))) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
        system = "You are a careful assistant. " * 60  # ~1,800 characters: 7 blocks of 64 tokens
        served, cached = set(), []
        for i in range(6):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}], max_tokens=2
            )
            served.add(raw.headers["x-served-by"])
            cached.append(raw.parse().usage.prompt_tokens_details.cached_tokens)
        assert len(served) == 1
        assert all(c > 0 for c in cached[1:])
