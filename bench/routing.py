"""Routing benchmark: does cache-aware picking beat round-robin on a shared-prefix chat workload?

One seeded workload (a few long system prompts shared by many requests, Poisson arrivals, streamed
chat completions) is replayed through three gateways, each on a fresh simulated pool:
(a) Envoy round-robin without the EPP, (b) Envoy + EPP --strategy round-robin, (c) Envoy + EPP default.
Client-side TTFT and throughput, the simulators' prefix-cache hit rate and per-endpoint share are
printed in one table with ratios against (a).  Run: python -m bench.routing [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import machine_cpu_seconds, mean, percentile, ratio, table
from bench.plots import latency_and_throughput_png, report
from extproc.devstack.stack import LocalStack, StackOptions

MODEL = "sim-model"

# Common English-ish words so the text looks like a prompt; content does not matter to the sim.
_WORDS = (
    "policy customer account billing refund order shipping address invoice support agent escalate "
    "verify identity warranty product return replace schedule delivery tracking payment card bank "
    "transfer discount coupon loyalty points subscription renewal cancel upgrade plan tier limit "
    "usage report monthly annual contract clause notice period region tax rate currency exchange"
).split()


@dataclass(frozen=True, slots=True)
class Workload:
    groups: int = 8  # distinct long system prompts
    system_chars: int = 14_000  # ~3,500 simulator tokens each (4 bytes per token)
    question_chars: int = 200
    requests: int = 360
    rate: float = 10.0  # Poisson arrivals, requests/s
    max_tokens: tuple[int, int] = (16, 32)
    seed: int = 1


@dataclass(frozen=True, slots=True)
class Pool:
    sims: int = 4
    profile: str = "gpu"
    # 3x slower than the gpu profile (~6.7k prefill tokens/s, 24 ms decode steps: a 70B-class model
    # on one H100), so queueing comes from the simulated servers, not from our 2 shared CPU cores.
    time_scale: float = 3.0
    num_gpu_blocks: int = 1000  # x 16 tokens: room for ~4 of the 8 system prompts per server

    def sim_args(self) -> tuple[str, ...]:
        return ("--profile", self.profile, "--time-scale", str(self.time_scale), "--num-gpu-blocks", str(self.num_gpu_blocks))


@dataclass(frozen=True, slots=True)
class Planned:
    at: float  # seconds after the start of the run
    group: int
    body: bytes


@dataclass(slots=True)
class Outcome:
    group: int
    served_by: str = "?"
    ttft: float | None = None
    itl: float | None = None  # mean gap between content chunks after the first (one token each)
    e2e: float | None = None
    output_tokens: int = 0
    error: str | None = None
    prompt_tokens: int = 0  # from the stream's usage
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens


@dataclass(slots=True)
class RunResult:
    name: str
    outcomes: list[Outcome]
    wall_s: float
    sim_stats: list[dict[str, object]]
    queue_samples: dict[str, list[int]] = field(default_factory=dict)
    machine_cores: float = 0.0  # CPU busy on the whole machine during the run (other users too)


def _text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        w = rng.choice(_WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


def plan(w: Workload) -> list[Planned]:
    """The request sequence: the same for every configuration given the same Workload."""
    rng = random.Random(w.seed)
    systems = [f"[tenant {g}] You are the support assistant of tenant {g}. " + _text(rng, w.system_chars) for g in range(w.groups)]
    out: list[Planned] = []
    t = 0.0
    for i in range(w.requests):
        t += rng.expovariate(w.rate)
        g = rng.randrange(w.groups)
        body = {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": systems[g]},
                {"role": "user", "content": f"Question {i}: " + _text(rng, w.question_chars)},
            ],
            "max_tokens": rng.randint(*w.max_tokens),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        out.append(Planned(t, g, json.dumps(body).encode()))
    return out


async def stream_chat(session: aiohttp.ClientSession, url: str, body: bytes, group: int, timeout: float) -> Outcome:
    """One streamed chat completion: TTFT (first content), e2e, tokens and who served it."""
    loop = asyncio.get_running_loop()
    o = Outcome(group)
    start = loop.time()
    chunks, last = 0, 0.0
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            o.served_by = resp.headers.get("x-served-by", "?")
            if resp.status != 200:
                o.error = f"HTTP {resp.status}"
                await resp.read()
                return o
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                choices = chunk.get("choices")
                if choices and choices[0].get("delta", {}).get("content"):
                    last = loop.time()
                    chunks += 1
                    if o.ttft is None:
                        o.ttft = last - start
                if chunk.get("usage"):
                    o.output_tokens = chunk["usage"]["completion_tokens"]
                    o.prompt_tokens = chunk["usage"].get("prompt_tokens") or 0
                    o.cached_tokens = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            o.e2e = loop.time() - start
            if o.ttft is None:
                o.error = "no content"
            elif chunks > 1:
                o.itl = (last - start - o.ttft) / (chunks - 1)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        o.error = type(e).__name__
    return o


async def _send(session: aiohttp.ClientSession, url: str, p: Planned, t0: float, timeout: float) -> Outcome:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + p.at - loop.time()))
    return await stream_chat(session, url, p.body, p.group, timeout)


async def _get_json(session: aiohttp.ClientSession, url: str, method: str = "GET") -> dict[str, object]:
    async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=10)) as r:
        r.raise_for_status()
        return await r.json()  # type: ignore[no-any-return]


async def _sample_queues(session: aiohttp.ClientSession, ports: Sequence[int], into: dict[str, list[int]], every: float) -> None:
    """Waiting-queue length of each simulator, a few times a second, to explain TTFT."""
    while True:
        for port in ports:
            s = await _get_json(session, f"http://127.0.0.1:{port}/sim/stats")
            into[str(s["name"])].append(int(s["waiting"]))  # type: ignore[call-overload]
        await asyncio.sleep(every)


async def drive(stack: LocalStack, name: str, requests: Sequence[Planned], timeout: float) -> RunResult:
    url = f"{stack.base_url}/chat/completions"
    sims = [f"http://127.0.0.1:{p}" for p in stack.sim_ports]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as session:
        # Warm Envoy's and the EPP's connections with prompts unrelated to the workload, then
        # empty every simulator's cache and counters so each configuration starts the same.
        warm = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1}).encode()
        for _ in range(2 * len(sims)):
            async with session.post(url, data=warm, headers={"content-type": "application/json"}) as r:
                await r.read()
        for s in sims:
            await _get_json(session, f"{s}/sim/reset", "POST")
        await asyncio.sleep(0.3)  # let the EPP scrape the now-empty pool

        queues: dict[str, list[int]] = defaultdict(list)
        sampler = asyncio.create_task(_sample_queues(session, stack.sim_ports, queues, 0.5))
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.1
        cpu0 = machine_cpu_seconds()
        outcomes = await asyncio.gather(*(_send(session, url, p, t0, timeout) for p in requests))
        wall = loop.time() - t0
        machine = (machine_cpu_seconds() - cpu0) / wall
        sampler.cancel()
        try:
            await sampler
        except asyncio.CancelledError:
            pass
        stats = [await _get_json(session, f"{s}/sim/stats") for s in sims]
    return RunResult(name, list(outcomes), wall, stats, dict(queues), machine)


CONFIGS: tuple[tuple[str, dict[str, object]], ...] = (
    ("(a) envoy round-robin, no EPP", {"epp": False}),
    ("(b) envoy + EPP round-robin", {"epp_args": ("--strategy", "round-robin")}),
    ("(c) envoy + EPP default", {"epp_args": ("--strategy", "default")}),
)


def run_config(name: str, extra: dict[str, object], pool: Pool, requests: Sequence[Planned], workdir: Path, timeout: float) -> RunResult:
    opts = StackOptions(workdir=workdir, sims=pool.sims, sim_args=pool.sim_args(), model=MODEL, **extra)  # type: ignore[arg-type]
    with LocalStack(opts) as stack:
        return asyncio.run(drive(stack, name, requests, timeout))


def _ms(x: float) -> str:
    return f"{x * 1000:.0f}"


def summarize(results: Sequence[RunResult]) -> str:
    header = ["config", "ok", "err", "TTFT mean", "p50", "p90", "p99", "e2e p50", "out tok/s", "cache hit", "share % (sorted)"]
    rows: list[list[str]] = []
    figures: list[dict[str, float]] = []
    for r in results:
        ok = [o for o in r.outcomes if o.error is None]
        ttft = [o.ttft for o in ok if o.ttft is not None]
        e2e = [o.e2e for o in ok if o.e2e is not None]
        prompt = sum(int(s["prompt_tokens_total"]) for s in r.sim_stats)  # type: ignore[call-overload]
        cached = sum(int(s["cached_prompt_tokens_total"]) for s in r.sim_stats)  # type: ignore[call-overload]
        served = Counter(o.served_by for o in ok)
        share = "/".join(f"{100 * n / len(ok):.0f}" for _, n in served.most_common()) if ok else "-"
        f = {
            "mean": mean(ttft), "p50": percentile(ttft, 50), "p90": percentile(ttft, 90), "p99": percentile(ttft, 99),
            "e2e": percentile(e2e, 50), "tps": sum(o.output_tokens for o in ok) / r.wall_s, "hit": cached / prompt if prompt else 0.0,
        }  # fmt: skip
        figures.append(f)
        rows.append([
            r.name, str(len(ok)), str(len(r.outcomes) - len(ok)), _ms(f["mean"]), _ms(f["p50"]), _ms(f["p90"]), _ms(f["p99"]),
            _ms(f["e2e"]), f"{f['tps']:.0f}", f"{100 * f['hit']:.0f}%", share,
        ])  # fmt: skip
    base = figures[0]
    for r, f in zip(results[1:], figures[1:], strict=True):
        rows.append([
            f"  {r.name[:3]} vs (a)", "", "", ratio(f["mean"], base["mean"]), ratio(f["p50"], base["p50"]), ratio(f["p90"], base["p90"]),
            ratio(f["p99"], base["p99"]), ratio(f["e2e"], base["e2e"]), ratio(f["tps"], base["tps"]), ratio(f["hit"], base["hit"]), "",
        ])  # fmt: skip
    return table(header, rows) + "\n(times in ms, client-side; TTFT = first content chunk)"


def diagnostics(results: Sequence[RunResult]) -> str:
    """Why the numbers differ: where each prefix went, each server's hits and queue."""
    lines = []
    for r in results:
        ok = [o for o in r.outcomes if o.error is None]
        per_group: dict[int, set[str]] = defaultdict(set)
        for o in ok:
            per_group[o.group].add(o.served_by)
        spread = mean([len(v) for v in per_group.values()])
        errors = Counter(o.error for o in r.outcomes if o.error)
        lines.append(f"{r.name}: each prefix served by {spread:.1f} endpoints on average; wall {r.wall_s:.1f}s;"
                     f" machine CPU busy {r.machine_cores:.2f} of 2 cores"
                     + (f"; errors {dict(errors)}" if errors else ""))  # fmt: skip
        for s in sorted(r.sim_stats, key=lambda s: str(s["name"])):
            name = str(s["name"])
            prompt, cached = int(s["prompt_tokens_total"]), int(s["cached_prompt_tokens_total"])  # type: ignore[call-overload]
            q = r.queue_samples.get(name, [])
            lines.append(
                f"    {name}: {s['requests_total']} requests, hit {100 * cached / max(prompt, 1):.0f}%,"
                f" waiting mean {mean(q):.1f} max {max(q, default=0)}"
            )
    return "\n".join(lines)


def picture(results: Sequence[RunResult], w: Workload, path: str) -> Path | None:
    ttft = {r.name: [o.ttft for o in r.outcomes if o.error is None and o.ttft is not None] for r in results}
    tps = {r.name: sum(o.output_tokens for o in r.outcomes if o.error is None) / r.wall_s for r in results}
    title = f"routing: {w.requests} streamed chats, {w.groups} shared system prompts, Poisson {w.rate:g}/s"
    return latency_and_throughput_png(path, title, ttft, tps)


def main(argv: Sequence[str] | None = None) -> int:
    dw, dp = Workload(), Pool()
    ap = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke test, under a minute)")
    ap.add_argument("--rate", type=float, help="arrivals per second (default %.0f)" % dw.rate)
    ap.add_argument("--requests", type=int, help="requests per configuration (default %d)" % dw.requests)
    ap.add_argument("--num-gpu-blocks", type=int, default=dp.num_gpu_blocks)
    ap.add_argument("--time-scale", type=float, default=dp.time_scale)
    ap.add_argument("--seed", type=int, default=dw.seed)
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    ap.add_argument("--only", help="comma-separated config letters to run, e.g. a,c (default all)")
    ap.add_argument("--png", default="bench-routing.png", help="picture of the results (default %(default)s; '' for none)")
    args = ap.parse_args(argv)

    n = args.requests or (90 if args.quick else dw.requests)
    w = Workload(requests=n, rate=args.rate or dw.rate, seed=args.seed)
    pool = Pool(num_gpu_blocks=args.num_gpu_blocks, time_scale=args.time_scale)
    requests = plan(w)
    configs = [c for c in CONFIGS if not args.only or c[0][1] in args.only.split(",")]
    print(
        f"workload: {w.requests} streamed chat requests, {w.groups} system prompts of ~{w.system_chars // 4} tokens, "
        f"Poisson {w.rate:g}/s, max_tokens {w.max_tokens[0]}-{w.max_tokens[1]}, seed {w.seed}\n"
        f"pool: {pool.sims} x vllm-sim --profile {pool.profile} --time-scale {pool.time_scale:g} "
        f"--num-gpu-blocks {pool.num_gpu_blocks} (block 16 tokens)",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        for i, (name, extra) in enumerate(configs):
            started = time.monotonic()
            results.append(run_config(name, extra, pool, requests, Path(tmp) / str(i), args.timeout))
            print(f"  {name}: done in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    print(summarize(results))
    print(diagnostics(results))
    if args.png:
        print(report(picture(results, w, args.png)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
