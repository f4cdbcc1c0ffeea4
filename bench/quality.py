"""Routing quality: which strategy gives the best TTFT and cache hits on realistic LLM traffic.

Four workloads, each replayed (same seeded requests) through real Envoy + the EPP in front of the
same simulated pool, once per strategy: round-robin, random, load-only (queue + kv), the GIE default
config and our `best`. One table per workload, ratios against round-robin.

    python -m bench.quality                 # all four workloads (~12 min)
    python -m bench.quality --quick         # shorter runs (~5 min)
    python -m bench.quality --workload b2b  # one workload

Workloads:
- shared_prefix: many groups x users sharing a system prompt per group (inference-perf `shared_prefix`).
- multi_turn: chat sessions whose every turn extends the previous conversation.
- b2b: many customers, each with a long private context and short questions, at a load that
  saturates a round-robin pool (the published llm-d precise-routing scenario, scaled down).
- long_system: agent sessions that all start with one 8,000-token system prompt and differ after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import mean, percentile, ratio, table
from bench.routing import MODEL, Outcome, _get_json, _text, stream_chat
from extproc.devstack.stack import LocalStack, StackOptions

STRATEGIES = ("round-robin", "random", "load", "default", "best")


@dataclass(frozen=True, slots=True)
class Session:
    """Requests sent one after another (a conversation); single-request sessions for the others."""

    at: float  # start, seconds after the run begins
    group: int
    bodies: tuple[bytes, ...]
    think_s: float = 0.0  # pause between a reply and the next turn


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    sessions: tuple[Session, ...]
    sims: int
    sim_args: tuple[str, ...]
    note: str


@dataclass(slots=True)
class Result:
    strategy: str
    outcomes: list[Outcome]
    wall_s: float
    hit_rate: float
    shares: list[float] = field(default_factory=list)


def _chat(messages: list[dict[str, str]], max_tokens: int) -> bytes:
    return json.dumps(
        {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    ).encode()


def shared_prefix(quick: bool, seed: int = 1) -> Scenario:
    rng = random.Random(seed)
    groups, users, rate = 16, (10 if quick else 20), 12.0
    systems = [f"[group {g}] " + _text(rng, 8_000) for g in range(groups)]  # ~2,000 tokens each
    sessions, t = [], 0.0
    for i in range(groups * users):
        t += rng.expovariate(rate)
        g = rng.randrange(groups)
        msgs = [{"role": "system", "content": systems[g]}, {"role": "user", "content": f"User {i}: " + _text(rng, 400)}]
        sessions.append(Session(t, g, (_chat(msgs, rng.randint(16, 48)),)))
    return Scenario(
        "shared_prefix",
        tuple(sessions),
        4,
        ("--profile", "gpu", "--time-scale", "3", "--num-gpu-blocks", "1200"),
        f"{groups} groups x ~{users} users, ~2,000-token system prompts, {rate:.0f} req/s Poisson",
    )


def multi_turn(quick: bool, seed: int = 2) -> Scenario:
    rng = random.Random(seed)
    convs, turns, rate = (24 if quick else 48), 6, 4.0
    sessions, t = [], 0.0
    for c in range(convs):
        t += rng.expovariate(rate)
        msgs = [{"role": "system", "content": f"[conversation {c}] " + _text(rng, 2_000)}]
        bodies = []
        for k in range(turns):
            msgs.append({"role": "user", "content": _text(rng, 600)})
            bodies.append(_chat(list(msgs), 32))
            msgs.append({"role": "assistant", "content": _text(rng, 400)})  # the next turn carries an answer
        sessions.append(Session(t, c, tuple(bodies), think_s=0.5))
    return Scenario(
        "multi_turn",
        tuple(sessions),
        4,
        ("--profile", "gpu", "--time-scale", "3", "--num-gpu-blocks", "1000"),
        f"{convs} conversations x {turns} turns, each turn extends the last, 0.5 s think time",
    )


def b2b(quick: bool, seed: int = 3) -> Scenario:
    rng = random.Random(seed)
    customers, rate = 24, (6.0 if quick else 7.0)
    n = 180 if quick else 360
    contexts = [f"[customer {c}] Contract and history: " + _text(rng, 24_000) for c in range(customers)]  # ~6,000 tokens
    sessions, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        c = rng.randrange(customers)
        msgs = [{"role": "system", "content": contexts[c]}, {"role": "user", "content": f"Q{i}: " + _text(rng, 300)}]
        sessions.append(Session(t, c, (_chat(msgs, rng.randint(16, 32)),)))
    return Scenario(
        "b2b",
        tuple(sessions),
        4,
        ("--profile", "gpu", "--time-scale", "3", "--num-gpu-blocks", "2000"),
        f"{customers} customers, ~6,000-token private contexts, short questions, {rate:.0f} req/s (saturates round-robin)",
    )


def long_system(quick: bool, seed: int = 4) -> Scenario:
    """Agent sessions: one 8,000-token system prompt for all, then each session's own long turns, so
    sessions differ only after the first 8k tokens (a 4K-token prefix match sees them all alike)."""
    rng = random.Random(seed)
    convs, turns, rate = (12 if quick else 16), 4, 2.0
    system = "[agent] Tools and instructions: " + _text(rng, 32_000)  # ~8,000 tokens
    sessions, t = [], 0.0
    for c in range(convs):
        t += rng.expovariate(rate)
        msgs = [{"role": "system", "content": system}]
        bodies = []
        for k in range(turns):
            msgs.append({"role": "user", "content": f"[session {c} turn {k}] tool output: " + _text(rng, 8_000)})
            bodies.append(_chat(list(msgs), 24))
            msgs.append({"role": "assistant", "content": _text(rng, 1_200)})
        sessions.append(Session(t, c, tuple(bodies), think_s=0.5))
    return Scenario(
        "long_system",
        tuple(sessions),
        4,
        ("--profile", "gpu", "--time-scale", "3", "--num-gpu-blocks", "4000"),
        f"{convs} agent sessions x {turns} turns sharing one ~8,000-token system prompt, ~2,300 tokens more per turn",
    )


SCENARIOS = {"shared_prefix": shared_prefix, "multi_turn": multi_turn, "b2b": b2b, "long_system": long_system}


async def _run_session(http: aiohttp.ClientSession, url: str, s: Session, t0: float, timeout: float) -> list[Outcome]:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + s.at - loop.time()))
    out = []
    for i, body in enumerate(s.bodies):
        if i:
            await asyncio.sleep(s.think_s)
        out.append(await stream_chat(http, url, body, s.group, timeout))
    return out


async def drive(stack: LocalStack, strategy: str, sc: Scenario, timeout: float) -> Result:
    url = f"{stack.base_url}/chat/completions"
    sims = [f"http://127.0.0.1:{p}" for p in stack.sim_ports]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024)) as http:
        warm = _chat([{"role": "user", "content": "warm up"}], 1)
        for _ in range(2 * len(sims)):
            await stream_chat(http, url, warm, -1, 30)
        for s in sims:
            await _get_json(http, f"{s}/sim/reset", "POST")
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.1
        nested = await asyncio.gather(*(_run_session(http, url, s, t0, timeout) for s in sc.sessions))
        wall = loop.time() - t0
        stats = [await _get_json(http, f"{s}/sim/stats") for s in sims]
    outcomes = [o for group in nested for o in group]
    prompt = sum(int(s["prompt_tokens_total"]) for s in stats)  # type: ignore[call-overload]
    cached = sum(int(s["cached_prompt_tokens_total"]) for s in stats)  # type: ignore[call-overload]
    counts = Counter(o.served_by for o in outcomes)
    total = sum(counts.values()) or 1
    shares = sorted((100.0 * c / total for c in counts.values()), reverse=True)
    return Result(strategy, outcomes, wall, cached / prompt if prompt else 0.0, shares)


def _epp_args(strategy: str) -> tuple[str, ...]:
    """A built-in strategy name, or a path to an EndpointPickerConfig file."""
    if strategy.endswith((".yaml", ".yml")):
        return ("--config-file", str(Path(strategy).resolve()))
    return ("--strategy", strategy)


def run(sc: Scenario, strategies: Sequence[str], timeout: float) -> list[Result]:
    results = []
    for strategy in strategies:
        with tempfile.TemporaryDirectory(prefix=f"bench-quality-{sc.name}-") as tmp:
            opts = StackOptions(
                workdir=Path(tmp), sims=sc.sims, sim_args=sc.sim_args, model=MODEL, epp_args=_epp_args(strategy), envoy_concurrency=2
            )
            t = time.monotonic()
            with LocalStack(opts) as stack:
                results.append(asyncio.run(drive(stack, strategy, sc, timeout)))
            print(f"  {sc.name} / {strategy}: done in {time.monotonic() - t:.0f}s", file=sys.stderr, flush=True)
    return results


def _ms(x: float) -> str:
    return f"{1000 * x:.0f}"


def summarize(sc: Scenario, results: Sequence[Result]) -> str:
    header = ["strategy", "ok", "err", "TTFT mean", "p50", "p90", "p99", "out tok/s", "cache hit", "max share", "share % (sorted)"]
    rows, stats = [], []
    for r in results:
        ttfts = [o.ttft for o in r.outcomes if o.ttft is not None]
        ok = len(ttfts)
        toks = sum(o.output_tokens for o in r.outcomes)
        fair = 100.0 / sc.sims
        s = {
            "mean": mean(ttfts), "p50": percentile(ttfts, 50), "p90": percentile(ttfts, 90), "p99": percentile(ttfts, 99),
            "tps": toks / r.wall_s if r.wall_s else 0.0, "hit": r.hit_rate,
        }  # fmt: skip
        stats.append(s)
        rows.append([
            r.strategy, str(ok), str(len(r.outcomes) - ok), _ms(s["mean"]), _ms(s["p50"]), _ms(s["p90"]), _ms(s["p99"]),
            f"{s['tps']:.0f}", f"{100 * s['hit']:.0f}%", f"{(r.shares[0] if r.shares else 0) / fair:.2f}x fair",
            "/".join(f"{x:.0f}" for x in r.shares),
        ])  # fmt: skip
    base = stats[0]
    for r, s in zip(results[1:], stats[1:]):
        rows.append([
            f"  {r.strategy} vs {results[0].strategy}", "", "",
            ratio(s["mean"], base["mean"]), ratio(s["p50"], base["p50"]), ratio(s["p90"], base["p90"]), ratio(s["p99"], base["p99"]),
            ratio(s["tps"], base["tps"]), ratio(s["hit"], base["hit"]), "", "",
        ])  # fmt: skip
    by_name = {r.strategy: s for r, s in zip(results, stats)}
    lines = [f"{sc.name}: {sc.note}; {sc.sims} sims {' '.join(sc.sim_args)} (TTFT in ms)", table(header, rows)]
    if "best" in by_name and "default" in by_name:
        lines.append(
            f"best vs GIE default: p90 TTFT {ratio(by_name['best']['p90'], by_name['default']['p90'])}, "
            f"mean {ratio(by_name['best']['mean'], by_name['default']['mean'])}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per workload")
    ap.add_argument("--workload", choices=tuple(SCENARIOS), action="append", help="run only this workload (repeatable)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated built-in strategies or config files (.yaml); the first is the baseline")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    args = ap.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for name in args.workload or list(SCENARIOS):
        sc = SCENARIOS[name](args.quick)
        print(summarize(sc, run(sc, strategies, args.timeout)), flush=True)
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
