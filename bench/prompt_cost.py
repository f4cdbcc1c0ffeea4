"""EPP CPU per request for long prompts with whole-prompt prefix matching, stage by stage.

One request's scheduling path without gRPC or a network: the body's JSON decode and prompt text
(extproc.handlers.request_body.parse_body), then the `best` strategy's cycle through the Scheduler:
block hashing, the index match, the other scorers and the picker, and recording the pick (PreRequest).
Prompts of 1k, 10k and 100k tokens: chat conversations that share one system prompt (8k tokens, or
half the prompt when shorter) and differ after it, over a pool whose prefix index already holds every
conversation on its endpoint, so each request is matched over its whole length (the longest walk).
CPU is this process's (time.process_time), best of rounds that alternate between the configs.
Run: python -m bench.prompt_cost [--quick] [--endpoints N]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.common import ratio, table
from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_body import parse_body
from pickers.config.loader import load_config
from pickers.config.strategies import STRATEGY_CONFIGS
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.framework.request import CHARS_PER_TOKEN, InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState, SchedulingResult
from pickers.indexes.prefix import ApproxPrefixIndex, block_hashes
from pickers.plugins.base import PluginContext
from pickers.plugins.scorer.affinity.prefix import ApproxPrefixCacheProducer, record_pick

BEST = STRATEGY_CONFIGS["best"]
WHOLE = "maxPrefixTokensToMatch: 131072"
assert WHOLE in BEST, "best.yaml's producer setting moved: update this benchmark"
# The same strategy with a 4k-token match, and the previous best (the same prefix settings, weighted scores
# instead of the latency model's cost), for the ratios.
CONFIGS = {
    "best (whole prompt, 64-token blocks)": BEST,
    "first 4k tokens": BEST.replace(WHOLE, "maxPrefixTokensToMatch: 4096"),
    "weighted (the previous best: weighted cache and load scores)": STRATEGY_CONFIGS["weighted"],
}
SIZES = (1_000, 10_000, 100_000)  # prompt tokens
SYSTEM_TOKENS = 8_000
TURN_TOKENS = 1_000
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
# ~500k tokens of KV cache per server (31,250 vLLM blocks of 16): each holds its two 100k-token conversations
SERVER_BLOCKS, SERVER_BLOCK_SIZE = 31_250, 16


def words(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of text (4 characters a token, as the EPP estimates)."""
    return " ".join(str(rng.randrange(100_000, 1_000_000)) for _ in range(tokens * CHARS_PER_TOKEN // 7))


def conversations(rng: random.Random, tokens: int, count: int) -> list[bytes]:
    """Chat bodies of ~`tokens` tokens: one shared system prompt, then each conversation's own turns."""
    system = words(rng, min(SYSTEM_TOKENS, tokens // 2))
    rest = tokens - min(SYSTEM_TOKENS, tokens // 2)
    bodies = []
    for _ in range(count):
        turns = max(1, rest // TURN_TOKENS)
        msgs = [{"role": "system", "content": system}]
        msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": words(rng, rest // turns)} for i in range(turns)]
        if msgs[-1]["role"] != "user":
            msgs[-1]["role"] = "user"
        bodies.append(json.dumps({"model": MODEL, "messages": msgs, "max_tokens": 256, "stream": True}).encode())
    return bodies


def parsed(raw: bytes, i: int = 0) -> InferenceRequest:
    req = InferenceRequest(f"r{i}", "/v1/chat/completions", {}, api="chat")
    parse_body(req, raw, "messages")
    return req


@dataclass(slots=True)
class Setup:
    scheduler: Scheduler
    scorer: ApproxPrefixCacheProducer  # the prefix match's block settings
    index: ApproxPrefixIndex
    endpoints: tuple[Endpoint, ...]
    bodies: list[bytes]
    requests: list[InferenceRequest]
    hashes: list[list[int]]


def setup(config: str, bodies: list[bytes], endpoints: int) -> Setup:
    index = ApproxPrefixIndex()
    cfg = load_config(config, "bench", PluginContext(prefix_index=index, rng=random.Random(0)))
    scorer = next(q for q in cfg.plugins.values() if isinstance(q, ApproxPrefixCacheProducer))
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"ep-{i}", f"10.0.0.{i + 1}", 8000) for i in range(endpoints))
    now = time.monotonic() + 3600  # fresh for the whole run
    rng = random.Random(1)
    for ep in ds.candidates():
        ds.update_metrics(ep.address, Metrics(waiting=rng.randrange(3), running=rng.randrange(8), kv_usage=rng.random() / 2,
                                              block_size=SERVER_BLOCK_SIZE, num_gpu_blocks=SERVER_BLOCKS, updated_at=now))  # fmt: skip
    candidates = ds.candidates()
    requests = [parsed(b, i) for i, b in enumerate(bodies)]
    hashes = [block_hashes(r.model, r.prompt_text, "", scorer.max_blocks, scorer.block_chars) for r in requests]
    for i, r in enumerate(requests):  # earlier turns: each conversation lives on its own endpoint (LRU sized as the scorer sizes it)
        record_pick(r, CycleState(), index, SchedulingResult([candidates[i % len(candidates)]]), scorer)
    return Setup(Scheduler(cfg.profile), scorer, index, candidates, bodies, requests, hashes)


def stages(s: Setup) -> dict[str, Callable[[int], object]]:
    """Each stage of one request on its own (same inputs as the full path), and the full path."""
    sc, index, eps = s.scorer, s.index, s.endpoints
    return {
        "decode + prompt": lambda i: parsed(s.bodies[i]),
        "hash": lambda i: block_hashes(s.requests[i].model, s.requests[i].prompt_text, "", sc.max_blocks, sc.block_chars),
        "match": lambda i: index.match(s.hashes[i]),
        "record": lambda i: index.record(eps[i % len(eps)].address, s.hashes[i]),  # the LRU keeps its size
        "schedule": lambda i: s.scheduler.schedule(s.requests[i], eps),
        "total": lambda i: s.scheduler.schedule(parsed(s.bodies[i], i), eps),
    }


def cpu_per_call(fn: Callable[[int], object], n: int, calls: int) -> float:
    """Milliseconds of process CPU per call over `calls` calls cycling through n inputs."""
    t0 = time.process_time()
    for k in range(calls):
        fn(k % n)
    return (time.process_time() - t0) / calls * 1e3


def measure(setups: dict[str, Setup], calls: int, rounds: int) -> dict[str, dict[str, float]]:
    """Best round of each (config, stage); the rounds alternate between configs so noise hits all alike."""
    funcs = {name: stages(s) for name, s in setups.items()}
    best = {name: {k: float("inf") for k in f} for name, f in funcs.items()}
    for _ in range(rounds):
        for name, f in funcs.items():
            n = len(setups[name].bodies)
            for k, fn in f.items():
                best[name][k] = min(best[name][k], cpu_per_call(fn, n, calls))
    return best


def index_bytes_per_entry(tokens: int = 100_000, prompts: int = 8) -> tuple[int, float, float]:
    """(blocks of one prompt, bytes per (endpoint, block) entry: a block's first holder, a further holder)."""
    rng = random.Random(2)
    reqs = [InferenceRequest("r", "/", {}, model=MODEL, prompt_text=words(rng, tokens)) for _ in range(prompts)]
    hashes = [block_hashes(r.model, r.prompt_text, "", tokens // 64, 256) for r in reqs]
    index = ApproxPrefixIndex()
    tracemalloc.start()
    a = tracemalloc.get_traced_memory()[0]
    for h in hashes:
        index.record("10.0.0.1:8000", h, 10**9)
    b = tracemalloc.get_traced_memory()[0]
    for h in hashes:
        index.record("10.0.0.2:8000", h, 10**9)
    c = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    entries = sum(map(len, hashes))
    return len(hashes[0]), (b - a) / entries, (c - b) / entries


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.prompt_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls and rounds (~15 s)")
    ap.add_argument("--endpoints", type=int, default=16)
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else 7
    conv = 2 * args.endpoints
    print(f"{args.endpoints} endpoints, {conv} conversations sharing a {SYSTEM_TOKENS}-token system prompt "
          f"(half the prompt when shorter), each held by its endpoint; best of {rounds} rounds; ms of CPU per request")  # fmt: skip
    rows, totals = [], []
    for tokens in SIZES:
        bodies = conversations(random.Random(tokens), tokens, conv)
        setups = {name: setup(text, bodies, args.endpoints) for name, text in CONFIGS.items()}
        calls = max(conv, (6_000 if args.quick else 20_000) * 1_000 // tokens)
        best = measure(setups, calls, rounds)
        m = best[next(iter(CONFIGS))]
        s0 = next(iter(setups.values()))
        rest = max(0.0, m["schedule"] - m["hash"] - m["match"] - m["record"])
        rows.append([f"{tokens // 1000}k ({len(s0.hashes[0])} blocks)", f"{m['decode + prompt']:.3f}", f"{m['hash']:.3f}",
                     f"{m['match']:.3f}", f"{rest:.3f}", f"{m['record']:.3f}", f"{m['total']:.3f}"])  # fmt: skip
        others = [best[name]["total"] for name in list(CONFIGS)[1:]]
        totals.append([f"{tokens // 1000}k", f"{m['total']:.3f}", *(f"{t:.3f} ({ratio(m['total'], t)})" for t in others)])
    print(table(["prompt tokens", "decode + prompt", "hash", "match", "scorers + picker", "record", "total"], rows))
    print("  (scorers + picker = the Scheduler's cycle less hashing, matching and recording, each timed on its own)")
    print()
    print(table(["prompt tokens", "total, best", *(f"{n} (best / this)" for n in list(CONFIGS)[1:])], totals))
    blocks, first, more = index_bytes_per_entry()
    print()
    print(f"index memory: {first:.0f} bytes per (endpoint, block) entry for a block's first holder, {more:.0f} for each "
          f"further one; a 100k-token prompt is {blocks} blocks: {blocks * first / 1e6:.2f} MB on one endpoint")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
