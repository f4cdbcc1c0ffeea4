"""A seeded run of picks whose every score is written down: what tests/unit/test_vectorised_scheduling.py
compares against the scores the loop-per-endpoint scheduler gave on the same inputs (recorded in
tests/fixtures/scheduling-reference.json (each pick's endpoints and a digest of its scores) by running this module against that code:
`python -m tests.unit.scheduling_trace > tests/fixtures/scheduling-reference.json (each pick's endpoints and a digest of its scores)` in a checkout of it).

Only public APIs both implementations share: the config loader, the Scheduler with --explain-scores,
the datastore, the latency model's feed. A pool with varied queues, KV use, in-flight counts and
latency fits (warm, cold with a warm peer of their hardware class, cold alone), prompts sharing
tenants' system prompts, picks recorded in the prefix index and charged in flight as the EPP does.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from typing import Any

from extproc.datalayer.datastore import Datastore
from pickers.config.loader import load_config
from pickers.config.strategies import STRATEGY_CONFIGS
from pickers.framework.endpoint import EndpointSpec, Metrics
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import PluginContext

CONFIGS = ("default", "best", "weighted", "load")
ENDPOINTS = 24
PICKS = 120


def _words(rng: random.Random, n: int) -> str:
    return " ".join(str(rng.randrange(10_000, 100_000)) for _ in range(n))


def trace(config: str, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    index = ApproxPrefixIndex()
    ctx = PluginContext(prefix_index=index, rng=random.Random(seed))
    cfg = load_config(STRATEGY_CONFIGS[config], "trace", ctx)
    scheduler = Scheduler(cfg.profile, producers=cfg.producers, explain=True)
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"ep-{i}", f"10.0.0.{i + 1}", 8000) for i in range(ENDPOINTS))
    now = time.monotonic() + 3600
    for i, ep in enumerate(ds.candidates()):
        blocks = 2_000 if i % 3 else 160  # two hardware classes; the small one fills up (evictions, no room)
        ds.update_metrics(ep.address, Metrics(waiting=rng.randrange(5), running=rng.randrange(12), kv_usage=round(rng.random() * 0.9, 3),
                                              block_size=16, num_gpu_blocks=blocks, updated_at=now))  # fmt: skip
        ep.in_flight = rng.randrange(4)
        ep.in_flight_prefill_tokens = rng.randrange(3) * 700
    model = ctx.latency
    for i, ep in enumerate(ds.candidates()):
        if i % 4 == 0:  # warm: enough responses for its own fit; the others stay cold (a peer's or the prior)
            for _ in range(12):
                model.observe_ttft(ep, rng.randrange(200, 4_000), rng.randrange(1, 12), rng.uniform(0.05, 0.6))
                model.observe_tpot(ep, rng.randrange(1, 12), rng.uniform(0.008, 0.03))
        elif i % 4 == 1:
            model.observe_ttft(ep, 1_000, 2, 0.2)
    systems = [_words(rng, 300) for _ in range(5)]
    out = []
    candidates = ds.candidates()
    for k in range(PICKS):
        prompt = systems[rng.randrange(len(systems))] + " " + _words(rng, rng.randrange(20, 200))
        req = InferenceRequest(f"r{k}", "/v1/completions", {}, model="m", prompt_text=prompt, max_tokens=64)
        result = scheduler.schedule(req, candidates)
        scores = {key: {a: float(v) for a, v in sorted(vals.items())} for key, vals in sorted((result.scores or {}).items())}
        out.append({"chosen": [ep.address for ep in result.endpoints], "scores": scores})
        if k % 7 == 0:  # responses come back now and then: fits move, and so do peers
            ep = result.endpoints[0]
            model.observe_ttft(ep, rng.randrange(200, 4_000), rng.randrange(1, 12), rng.uniform(0.05, 0.6))
            model.observe_tpot(ep, rng.randrange(1, 12), rng.uniform(0.008, 0.03))
        if k % 5 == 0:
            victim = candidates[rng.randrange(len(candidates))]
            victim.in_flight = rng.randrange(6)
            victim.in_flight_prefill_tokens = rng.randrange(4) * 500
    return out


def digest(picks: list[dict[str, Any]]) -> list[list[Any]]:
    """Each pick as (chosen, a digest of every score it saw): small enough to keep, exact to compare."""
    return [[p["chosen"], hashlib.sha256(json.dumps(p["scores"], sort_keys=True).encode()).hexdigest()[:20]] for p in picks]


def main() -> int:
    json.dump({c: digest(trace(c)) for c in CONFIGS}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
