"""bench.latency_model: its EPP configs load, its workload is mixed as described, and its error
summary counts what it says (warm-up per endpoint, |predicted - observed|)."""

from __future__ import annotations

import json

import pytest

from bench.latency_model import AGGREGATED, DISAGGREGATED, POOLS, PoolResult, Sample, _errors, plan, summarize, warm
from pickers.config.loader import load_config


@pytest.mark.parametrize("text", [AGGREGATED, DISAGGREGATED])
def test_the_bench_configs_load(text):
    cfg = load_config(text, "bench.yaml")
    assert "predicted-latency-producer" in cfg.plugins and "latency-scorer" in cfg.plugins


def test_the_workload_mixes_shared_and_unique_prompts_of_many_lengths():
    bodies = [json.loads(b) for _, b in plan(POOLS["gpu"], 200)]
    with_system = [b for b in bodies if b["messages"][0]["role"] == "system"]
    assert len(with_system) == 100 and len({b["messages"][0]["content"] for b in with_system}) == 6
    lengths = [sum(len(m["content"]) for m in b["messages"]) // 4 for b in bodies]
    assert min(lengths) < 500 and max(lengths) > 4000
    assert all(b["stream"] and b["stream_options"]["include_usage"] for b in bodies)


def test_errors_and_warm_up_are_counted_per_endpoint():
    samples = [Sample(float(i), "a" if i % 2 else "b", predicted=0.1, observed=0.1 + 0.01 * (i % 3)) for i in range(30)]
    samples.append(Sample(31.0, "a", predicted=None, observed=0.2))  # no prediction: left out
    assert len(warm(samples)) == 31 - 20
    e = _errors(samples)
    assert e["n"] == 30 and e["mae"] == pytest.approx(10.0) and e["bias"] <= 0
    text = summarize([PoolResult(POOLS["cpu"], samples, [])])
    assert "CPU aggregated, all" in text and "warm (after 10/endpoint)" in text
