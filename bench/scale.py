"""Large pools: the cost of one pick at 10 to 5,000 endpoints, the prefix index's memory, GC pauses.

In-process, without gRPC or a network (the scheduling library and the datastore only):
- schedule(): p50/p99 wall time of `Scheduler.schedule` for the default and the `best` config at
  10 / 100 / 1,000 / 5,000 endpoints; ~2k-token chat-style prompts (one of 40 tenants' ~1,500-token
  system prompts plus a unique ~500-token question), each pick recorded in the prefix index as the
  EPP does; timed after a warm-up, rounds alternating between the configs.
- the approximate prefix index after 100k distinct ~2k-token prompts over 100 endpoints (the
  default config's 64-character blocks, 128 a prompt): bytes per (endpoint, block) entry from
  tracemalloc, entries held, and the process's RSS.
- the longest cyclic GC pause while scheduling with that index in memory (gc.callbacks timing),
  before and after `gc.freeze()` (what `epp serve` does once it has started).
Read the ratios and the shape, not the absolute numbers: the machine's cores are shared.
Run: python -m bench.scale [--quick]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from bench.common import percentile, table
from extproc.datalayer.datastore import Datastore
from pickers.config.loader import load_config
from pickers.config.strategies import STRATEGY_CONFIGS
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.indexes.kv_blocks import KVBlockIndex
from pickers.indexes.prefix import ApproxPrefixIndex, block_hashes
from pickers.plugins.base import PluginContext

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CONFIGS = ("default", "best")
SIZES = (10, 100, 1_000, 5_000)
TENANTS = 40
IN_FLIGHT = 512
GC_PROMPTS = 100_000
SYSTEM_CHARS, QUESTION_CHARS = 6_000, 2_000  # ~1,500 + ~500 tokens at 4 characters a token


def _text(rng: random.Random, chars: int) -> str:
    return " ".join(str(rng.randrange(100_000, 1_000_000)) for _ in range(chars // 7))


@dataclass(slots=True)
class Pool:
    scheduler: Scheduler
    index: ApproxPrefixIndex
    endpoints: tuple[Endpoint, ...]


def pool(config: str, endpoints: int, seed: int = 0) -> Pool:
    index = ApproxPrefixIndex()
    cfg = load_config(STRATEGY_CONFIGS[config], "bench", PluginContext(prefix_index=index, rng=random.Random(seed)))
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"ep-{i}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 8000) for i in range(endpoints))
    now = time.monotonic() + 3600  # fresh for the whole run
    rng = random.Random(seed + 1)
    for ep in ds.candidates():
        ds.update_metrics(ep.address, Metrics(waiting=rng.randrange(4), running=rng.randrange(16), kv_usage=rng.random() * 0.8,
                                              block_size=16, num_gpu_blocks=31_250, updated_at=now))  # fmt: skip
    return Pool(Scheduler(cfg.profile, producers=cfg.producers), index, ds.candidates())


def prompts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    systems = [_text(rng, SYSTEM_CHARS) for _ in range(TENANTS)]
    return [systems[min(int(rng.paretovariate(1.0)) - 1, TENANTS - 1)] + " " + _text(rng, QUESTION_CHARS) for _ in range(count)]


def _request(i: int, prompt: str) -> InferenceRequest:
    return InferenceRequest(f"r{i}", "/v1/completions", {}, model=MODEL, prompt_text=prompt)


def schedule_times(pools: dict[str, Pool], texts: list[str], warmup: int, picks: int, rounds: int) -> dict[str, list[float]]:
    """Milliseconds per schedule() of each pool; rounds alternate between the pools."""
    out: dict[str, list[float]] = {name: [] for name in pools}
    for name, p in pools.items():
        for i in range(warmup):
            p.scheduler.schedule(_request(i, texts[i % len(texts)]), p.endpoints)
    clock = time.perf_counter
    per_round = picks // rounds
    for r in range(rounds):
        for name, p in pools.items():
            times = out[name]
            base = warmup + r * per_round
            for i in range(base, base + per_round):
                req = _request(i, texts[i % len(texts)])
                t = clock()
                p.scheduler.schedule(req, p.endpoints)
                times.append((clock() - t) * 1e3)
    return out


def index_memory(prompts_n: int, endpoints: int) -> tuple[float, int, float, int]:
    """(bytes per entry, entries, RSS MB, objects it made for the GC to track) after recording `prompts_n` distinct prompts round-robin over
    `endpoints` endpoints in an index the size the default config gives them (auto-tuned LRUs)."""
    rng = random.Random(7)
    index = ApproxPrefixIndex()
    addresses = [f"10.0.{i // 256}.{i % 256}:8000" for i in range(endpoints)]
    objects = len(gc.get_objects())
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    base = _text(rng, SYSTEM_CHARS + QUESTION_CHARS)
    for i in range(prompts_n):
        text = f"{i:08d}" + base  # distinct from the first block on: every block is a new entry
        index.record(addresses[i % endpoints], block_hashes(MODEL, text, "", 256, 64), 31_250 * 16 // 16)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    entries = index.size()
    return (after - before) / max(1, entries), entries, _rss_mb(), len(gc.get_objects()) - objects


def precise_index_memory(prompts_n: int, endpoints: int) -> tuple[float, int]:
    """(bytes per entry, entries) of the precise (KV-event) index after BlockStored events for
    `prompts_n` distinct 128-block prompts round-robin over `endpoints` endpoints."""
    index = KVBlockIndex()
    rng = random.Random(9)
    tokens = [rng.randrange(50_000) for _ in range(128 * 16)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(prompts_n):
        own = [i, *tokens[1:]]  # distinct from the first block on
        index.block_stored(f"10.0.{i % endpoints // 256}.{i % endpoints % 256}:8000", [(i, b) for b in range(128)], None, own, 16)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / max(1, index.size()), index.size()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class GcPauses:
    """The longest and total cyclic-GC pause per generation while installed (gc.callbacks)."""

    def __init__(self) -> None:
        self.longest = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._start = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._cb)

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        g = info["generation"]
        ms = (time.perf_counter() - self._start) * 1e3
        self.count[g] += 1
        if ms > self.longest[g]:
            self.longest[g] = ms


def gc_pauses(texts: list[str], picks: int, frozen: bool) -> tuple[GcPauses, GcPauses, int]:
    """Pauses while scheduling `picks` requests over 100 endpoints whose index holds 100k prompts."""
    p = pool("default", 100)
    rng = random.Random(3)
    base = _text(rng, SYSTEM_CHARS + QUESTION_CHARS)
    for i in range(GC_PROMPTS):
        p.index.record(p.endpoints[i % 100].address, block_hashes(MODEL, f"{i:08d}" + base, "", 256, 64), 31_250)
    gc.collect()
    if frozen:
        gc.freeze()
    tracked = len(gc.get_objects())
    in_flight: deque[object] = deque(maxlen=IN_FLIGHT)  # requests live until their responses end, as in the EPP
    with GcPauses() as pauses:
        for i in range(picks):
            req = _request(i, texts[i % len(texts)])
            in_flight.append((req, p.scheduler.schedule(req, p.endpoints)))
    with GcPauses() as full:
        gc.collect()  # a full collection's pause, whatever the thresholds reached in the run
    if frozen:
        gc.unfreeze()
    return pauses, full, tracked


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer picks, 10k prompts in the index (~1 min)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="endpoint counts, comma-separated")
    ap.add_argument("--only", choices=("schedule", "index", "gc"), help="one part only")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    picks = 1_000 if args.quick else 3_000
    texts = prompts(11, 2_000)
    if args.only in (None, "schedule"):
        rows = []
        for n in sizes:
            k = max(1, min(picks, picks * 1_000 // n)) if n > 1_000 else picks
            times = schedule_times({c: pool(c, n) for c in CONFIGS}, texts, 300, k, 3)
            cells = [f"{percentile(times[c], 50):.3f} / {percentile(times[c], 99):.3f}" for c in CONFIGS]
            rows.append([f"{n:,}", str(k), *cells])
        print(f"schedule(): ms p50 / p99, ~2k-token prompts from {TENANTS} tenants' system prompts, picks recorded; goal p99 <= 1 ms at 1,000")
        print(table(["endpoints", "picks", *(f"{c} config" for c in CONFIGS)], rows))
        print()
    if args.only in (None, "index"):
        n = 10_000 if args.quick else 100_000
        per, entries, rss, tracked = index_memory(n, 100)
        print(f"prefix index after {n:,} distinct ~2k-token prompts over 100 endpoints: {per:.1f} bytes per (endpoint, block) "
              f"entry (goal <= 64), {entries:,} entries, {tracked:,} objects for the GC to track, RSS {rss:.0f} MB")  # fmt: skip
        k = n // 10
        per, entries = precise_index_memory(k, 100)
        print(f"precise (KV-event) index after {k:,} distinct 128-block prompts' BlockStored events over 100 endpoints: "
              f"{per:.1f} bytes per (endpoint, block) entry, {entries:,} entries")  # fmt: skip
        print()
    if args.only in (None, "gc"):
        rows = []
        for frozen in (False, True):
            pauses, full, tracked = gc_pauses(texts, picks, frozen)
            rows.append(["after gc.freeze()" if frozen else "not frozen", f"{tracked:,}",
                         *(f"{pauses.longest[g]:.2f} ({pauses.count[g]})" for g in range(3)), f"{max(pauses.longest):.2f}",
                         f"{full.longest[2]:.2f}"])  # fmt: skip
        print(f"GC pauses scheduling {picks:,} requests ({IN_FLIGHT} in flight at a time), 100 endpoints, the index holding "
              f"{GC_PROMPTS:,} prompts; then one forced full collection. Goal: longest <= 5 ms")  # fmt: skip
        print(table(["heap", "objects tracked", "gen 0 ms (count)", "gen 1 ms (count)", "gen 2 ms (count)",
                     "longest under load", "forced full"], rows))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
