"""The latency model against real vLLM: bench.latency_model's `vllm` pool, two real vLLM CPU servers
behind Envoy + the EPP, Poisson arrivals of prompts from ~40 to ~1,000 tokens (half behind shared
system prompts), every request streamed with usage.

What is checked is what must hold whatever the machine's speed: every request is served and carries
the EPP's prediction for the route it took, and each server's fit has left the prior after at least
ten responses of its own (so both took work) (it learned its own prefill rate from real responses, unconfigured). The error table
(predicted vs observed TTFT, median and p90) and the fitted values are printed: `pytest -s` shows
them, and docs/latency-model.md records a run. No timing is asserted.
"""

from __future__ import annotations

import pytest

from bench.latency_model import POOLS, run_pool, summarize

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def test_the_latency_model_learns_real_vllm_servers_and_predicts_every_route():
    result = run_pool(POOLS["vllm"], quick=True, timeout=120.0)
    print("\n" + summarize([result]))
    failed = [s.error for s in result.samples if s.error]
    assert not failed, (
        f"{len(failed)} of {len(result.samples)} requests failed: {sorted(set(failed))}"
    )
    assert all(
        s.observed is not None for s in result.samples
    )  # each streamed a first event
    assert all(
        s.predicted is not None for s in result.samples
    )  # each carried the EPP's prediction
    fits = {str(ep["name"]): ep["latency"] for ep in result.endpoints}
    assert len(fits) == 2
    for name, fit in fits.items():
        assert fit["source"] == "own" and fit["samples"] >= 10, (
            name,
            fit,
        )  # learned, not the prior
        assert fit["prefill_tokens_per_s"] != 15928.0, (
            name,
            fit,
        )  # its own rate, not the GPU prior's
