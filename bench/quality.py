"""Routing quality: which strategy gives the best TTFT, cache hits and goodput on realistic LLM traffic.

Six workloads, each replayed (same seeded requests) through real Envoy + the EPP in front of the
same simulated pool, once per strategy: round-robin, random, load-only (queue + kv), the GIE default
config and our `best`. One table per workload, ratios against the first strategy (round-robin).

    python -m bench.quality                 # all six workloads (~35 min)
    python -m bench.quality --quick         # shorter runs (~18 min; each workload 1.5-5 min)
    python -m bench.quality --workload b2b  # one workload (repeatable)

Workloads:
- shared_prefix: many groups x users sharing a system prompt per group (inference-perf `shared_prefix`).
- multi_turn: chat sessions whose every turn extends the previous conversation.
- b2b: many customers, each with a long private context and short questions, at a load that
  saturates a round-robin pool (the published llm-d precise-routing scenario, scaled down). Its
  contexts (144k tokens) are a little more than the pool's cache (128k).
- optimized_baseline: llm-d's optimized-baseline guide benchmark (inference-perf `shared_prefix`,
  150 groups x 5 prompts, 6,000-token system prompts + 1,200-token questions on 8 servers) scaled to
  4 simulated servers: 20 groups x 5 users, ~6,000-token contexts + ~1,200-token questions, groups and
  users drawn at random, 7 req/s. Sizing: 20 contexts x 6,000 tokens = 7,500 blocks of 16 tokens;
  `--num-gpu-blocks 2400` per server holds about 6 of them (a third), the pool's 9,600 blocks hold
  all 20 plus ~2,000 blocks of questions and running requests. Requests are 12x (quick) or 24x the
  groups, so the first touch of each context (a miss no router can avoid) is 8.3% (4.2%) of them;
  the table's title prints it. Round-robin hits about a third of the contexts and its servers need
  ~0.8 s of prefill per request: 7 req/s saturates it, while a router that keeps each context on one
  server prefills ~0.2 s per request.
- agent: agent traffic as issue 16 describes it: one ~10,000-token system prompt of tools and
  instructions (40,000 characters) shared by 12 (quick) or 16 conversations starting at 1/s, each
  growing by a tool output and an answer (~1,150 tokens) per turn for 16 turns (tool calls), 0.5 s
  apart. Sizing: the conversations' own history (~18,400 tokens each at the last turn, 221k / 294k
  tokens in all) overflows one server (`--num-gpu-blocks 6000`: 96k tokens) and fits the pool (384k
  tokens, the system prompt on every server included). Sessions differ only after the first ~10k
  tokens, so a prefix match capped at 4K tokens sees them all alike. Round-robin recomputes a
  conversation's history at almost every turn (~10,000 tokens a turn on average against ~1,150).
- agent_short: the same total history in conversations half as long: 24 (quick) or 32 of 8 turns
  (`agent` until 2026-12-03). Its bound (`pinned`) is about 2.6-3x lower than round-robin at p90:
  shorter histories cost round-robin less to recompute.

`--strategies` also takes `pinned`: no router, each session sent straight to server i mod n in arrival
order. Every conversation then finds its history cached and the sessions are spread evenly: the
bound for what a router can get on these workloads (a router must also find where a session lives
and cannot know ahead how long it will run).

Goodput: requests/s that met both bounds of the workload's SLO (a request's TTFT, and its mean
inter-token gap after the first token, as inference-perf's `itl`: see bench.common.Slo), over the
run's wall time, failed requests counted as missed. `--slo-ttft-ms` / `--slo-itl-ms` override the
bounds for every workload; the defaults, per workload, are set where they separate the strategies
(simulated GPU at time scale 3: ~6.7k prefill tokens/s, 24 ms decode steps, so a token gap above
~50 ms means prefills of other requests stalled the batch):
- shared_prefix: TTFT 500 ms (a ~2,100-token prompt prefilled uncached on an idle server makes it;
  one queued behind another miss does not), ITL 50 ms (2x an unloaded decode step).
- multi_turn: TTFT 250 ms (a turn whose history is cached makes it; the whole conversation, up to
  ~1,900 tokens, recomputed does not), ITL 50 ms.
- b2b, optimized_baseline: TTFT 1,000 ms (a ~6,000-token context prefilled on an idle server just
  makes it; queued behind another miss does not), ITL 50 ms.
- agent, agent_short: TTFT 1,000 ms (one turn's new ~1,150 tokens plus some queueing; a history
  recomputed from scratch, up to ~18,000 / ~9,000 tokens, does not make it), ITL 50 ms.
Each table also prints the measured share of requests that found less than half their prompt
cached ("miss"), and the busiest endpoint's share of requests over its fair share ("max/fair";
issue 16 asks for no endpoint above 2x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import Goodput, Slo, goodput, goodput_ratio, max_over_fair, mean, percentile, ratio, slo_from_flags, table
from bench.routing import MODEL, Outcome, _get_json, _text, stream_chat
from extproc.devstack.stack import LocalStack, StackOptions

STRATEGIES = ("round-robin", "random", "load", "default", "best")
# Not a router: each session's requests go straight to one server (session i to server i mod n, in
# arrival order), so every conversation or group finds its own history cached and the sessions are
# spread evenly. What perfect session affinity with balanced placement gets: a bound to read the
# routers' numbers against (`--strategies round-robin,best,pinned`).
PINNED = "pinned"


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
    slo: Slo  # the default; --slo-ttft-ms / --slo-itl-ms replace it

    @property
    def requests(self) -> int:
        return sum(len(s.bodies) for s in self.sessions)


def first_touches(sc: Scenario) -> int:
    """Requests that are the first of their group (a shared context, a conversation) in arrival order:
    no router can find that group's own prompt cached anywhere."""
    return len({s.group for s in sc.sessions})


@dataclass(slots=True)
class Result:
    strategy: str
    outcomes: list[Outcome]
    wall_s: float
    hit_rate: float
    counts: dict[str, int] = field(default_factory=dict)  # requests served per endpoint

    def goodput(self, slo: Slo) -> Goodput:
        return goodput(((None, None) if o.error else (o.ttft, o.itl) for o in self.outcomes), slo, self.wall_s)


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
        Slo(0.5, 0.05),
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
        Slo(0.25, 0.05),
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
        Slo(1.0, 0.05),
    )


def optimized_baseline(quick: bool, seed: int = 5) -> Scenario:
    """llm-d's optimized-baseline benchmark shape scaled to 4 simulated servers (sizing in the module doc)."""
    rng = random.Random(seed)
    groups, users, rate = 20, 5, 7.0
    n = 240 if quick else 480
    contexts = [f"[group {g}] Shared context: " + _text(rng, 24_000) for g in range(groups)]  # ~6,000 tokens
    questions = [[f"[group {g} user {u}] " + _text(rng, 4_800) for u in range(users)] for g in range(groups)]  # ~1,200
    sessions, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        g, u = rng.randrange(groups), rng.randrange(users)
        msgs = [{"role": "system", "content": contexts[g]}, {"role": "user", "content": questions[g][u]}]
        sessions.append(Session(t, g, (_chat(msgs, rng.randint(16, 48)),)))
    return Scenario(
        "optimized_baseline",
        tuple(sessions),
        4,
        ("--profile", "gpu", "--time-scale", "3", "--num-gpu-blocks", "2400"),
        f"{groups} groups x {users} users, ~6,000-token contexts + ~1,200-token questions, {n} requests at {rate:.0f} req/s "
        f"(llm-d optimized-baseline shape; contexts ~3x one server's cache, 0.8x the pool's)",
        Slo(1.0, 0.05),
    )


def _agent(name: str, convs: int, turns: int, seed: int) -> Scenario:
    """Agent conversations behind one long identical system prompt, growing turn by turn, so they
    differ only after its ~10k tokens (a 4K-token prefix match sees them all alike)."""
    rng = random.Random(seed)
    rate = 1.0
    system = "[agent] Tools and instructions: " + _text(rng, 40_000)  # ~10,000 tokens
    sessions, t = [], 0.0
    for c in range(convs):
        t += rng.expovariate(rate)
        msgs = [{"role": "system", "content": system}]
        bodies = []
        for k in range(turns):
            msgs.append({"role": "user", "content": f"[session {c} turn {k}] tool output: " + _text(rng, 4_000)})
            bodies.append(_chat(list(msgs), 24))
            msgs.append({"role": "assistant", "content": _text(rng, 600)})
        sessions.append(Session(t, c, tuple(bodies), think_s=0.5))
    history_k = convs * turns * 1.15  # thousands of tokens of the conversations' own history, last turn
    return Scenario(
        name,
        tuple(sessions),
        4,
        ("--profile", "gpu", "--time-scale", "3", "--num-gpu-blocks", "6000"),
        f"{convs} agent conversations x {turns} turns behind one ~10,000-token system prompt, ~1,150 tokens more per turn "
        f"(histories ~{history_k:.0f}k tokens: {history_k / 96:.1f}x one server's cache, {(history_k + 40) / 384:.2f}x the pool's)",
        Slo(1.0, 0.05),
    )


def agent(quick: bool, seed: int = 4) -> Scenario:
    """Agent traffic: 12 (quick) or 16 conversations of 16 turns (tool calls) each."""
    return _agent("agent", 12 if quick else 16, 16, seed)


def agent_short(quick: bool, seed: int = 4) -> Scenario:
    """The same total history in shorter conversations: 24 (quick) or 32 of 8 turns (`agent` until 2026-12-03)."""
    return _agent("agent_short", 24 if quick else 32, 8, seed)


SCENARIOS = {
    "shared_prefix": shared_prefix,
    "multi_turn": multi_turn,
    "b2b": b2b,
    "optimized_baseline": optimized_baseline,
    "agent": agent,
    "agent_short": agent_short,
}


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
    groups = {g: i for i, g in enumerate(dict.fromkeys(s.group for s in sc.sessions))}
    direct = [f"{sim}/v1/chat/completions" for sim in sims]

    def target(s: Session) -> str:
        return direct[groups[s.group] % len(direct)] if strategy == PINNED else url

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024)) as http:
        warm = _chat([{"role": "user", "content": "warm up"}], 1)
        for _ in range(2 * len(sims)):
            await stream_chat(http, url, warm, -1, 30)
        for s in sims:
            await _get_json(http, f"{s}/sim/reset", "POST")
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.1
        nested = await asyncio.gather(*(_run_session(http, target(s), s, t0, timeout) for s in sc.sessions))
        wall = loop.time() - t0
        stats = [await _get_json(http, f"{s}/sim/stats") for s in sims]
    outcomes = [o for group in nested for o in group]
    prompt = sum(int(s["prompt_tokens_total"]) for s in stats)  # type: ignore[call-overload]
    cached = sum(int(s["cached_prompt_tokens_total"]) for s in stats)  # type: ignore[call-overload]
    counts = Counter(o.served_by for o in outcomes if o.error is None)
    return Result(strategy, outcomes, wall, cached / prompt if prompt else 0.0, dict(counts))


def _epp_args(strategy: str) -> tuple[str, ...]:
    """A built-in strategy name, or a path to an EndpointPickerConfig file (`pinned`: the stack's EPP
    runs round-robin, unused)."""
    if strategy == PINNED:
        return ("--strategy", "round-robin")
    if strategy.endswith((".yaml", ".yml")):
        return ("--config-file", str(Path(strategy).resolve()))
    return ("--strategy", strategy)


def run(sc: Scenario, strategies: Sequence[str], timeout: float, workers: Sequence[int] = (1,)) -> list[Result]:
    """Each strategy through the real stack, once per EPP worker count (`epp serve --workers`)."""
    results = []
    for strategy in strategies:
        for n in workers:
            with tempfile.TemporaryDirectory(prefix=f"bench-quality-{sc.name}-") as tmp:
                opts = StackOptions(
                    workdir=Path(tmp), sims=sc.sims, sim_args=sc.sim_args, model=MODEL, epp_args=_epp_args(strategy),
                    envoy_concurrency=2, epp_workers=n,
                )  # fmt: skip
                t = time.monotonic()
                with LocalStack(opts) as stack:
                    result = asyncio.run(drive(stack, strategy, sc, timeout))
                if len(workers) > 1:
                    result.strategy = f"{strategy} --workers {n}"
                results.append(result)
                print(f"  {sc.name} / {result.strategy}: done in {time.monotonic() - t:.0f}s", file=sys.stderr, flush=True)
    return results


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{1000 * x:.0f}"


def _miss_share(outcomes: Sequence[Outcome]) -> float:
    """Served requests that found less than half their prompt cached (from each response's usage)."""
    served = [o for o in outcomes if o.error is None and o.prompt_tokens]
    return sum(1 for o in served if 2 * o.cached_tokens < o.prompt_tokens) / len(served) if served else math.nan


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.0f}%"


def summarize(sc: Scenario, results: Sequence[Result], slo: Slo) -> str:
    good_col = f"goodput/s {slo.label()}"
    header = ["strategy", "ok", "err", "TTFT mean", "p50", "p90", "p99", "ITL mean", "out tok/s", "cache hit", "miss",
              "SLO met", good_col, "max/fair", "share % (sorted)"]  # fmt: skip
    rows, stats = [], []
    for r in results:
        ok = [o for o in r.outcomes if o.error is None and o.ttft is not None]
        ttfts = [o.ttft for o in ok if o.ttft is not None]
        itls = [o.itl for o in ok if o.itl is not None]
        gp = r.goodput(slo)
        served = sum(r.counts.values())
        shares = sorted((100.0 * c / served for c in r.counts.values()), reverse=True) if served else []
        s = {
            "mean": mean(ttfts), "p50": percentile(ttfts, 50), "p90": percentile(ttfts, 90), "p99": percentile(ttfts, 99),
            "itl": mean(itls), "tps": sum(o.output_tokens for o in r.outcomes) / r.wall_s if r.wall_s else 0.0,
            "hit": r.hit_rate, "miss": _miss_share(r.outcomes), "met": gp.share, "good": gp.per_s,
            "fair": max_over_fair(r.counts.values(), sc.sims),
        }  # fmt: skip
        stats.append(s)
        rows.append([
            r.strategy, str(len(ok)), str(len(r.outcomes) - len(ok)), _ms(s["mean"]), _ms(s["p50"]), _ms(s["p90"]), _ms(s["p99"]),
            _ms(s["itl"]), f"{s['tps']:.0f}", _pct(s["hit"]), _pct(s["miss"]), _pct(s["met"]), f"{s['good']:.2f}",
            f"{s['fair']:.2f}x", "/".join(f"{x:.0f}" for x in shares),
        ])  # fmt: skip
    base = stats[0]
    for r, s in zip(results[1:], stats[1:]):
        rows.append([
            f"  {r.strategy} vs {results[0].strategy}", "", "",
            ratio(s["mean"], base["mean"]), ratio(s["p50"], base["p50"]), ratio(s["p90"], base["p90"]), ratio(s["p99"], base["p99"]),
            ratio(s["itl"], base["itl"]), ratio(s["tps"], base["tps"]), ratio(s["hit"], base["hit"]), "", "",
            goodput_ratio(s["good"], base["good"]), "", "",
        ])  # fmt: skip
    touched = first_touches(sc)
    lines = [
        f"{sc.name}: {sc.note}; {sc.sims} sims {' '.join(sc.sim_args)} (TTFT, ITL in ms)",
        f"first touches (a group's first request, a miss for any router): {touched} of {sc.requests} requests "
        f"({100 * touched / sc.requests:.1f}%); SLO: TTFT <= {1000 * slo.ttft_s:g} ms and mean ITL <= {1000 * slo.itl_s:g} ms",
        table(header, rows),
    ]
    over = [f"{r.strategy} ({s['fair']:.2f}x)" for r, s in zip(results, stats) if s["fair"] > 2.0]
    lines.append("endpoints over 2x their fair share: " + (", ".join(over) if over else "none"))
    by_name = {r.strategy: s for r, s in zip(results, stats)}
    if "best" in by_name and "default" in by_name:
        b, d = by_name["best"], by_name["default"]
        lines.append(f"best vs GIE default: p90 TTFT {ratio(b['p90'], d['p90'])}, mean {ratio(b['mean'], d['mean'])}, "
                     f"goodput {goodput_ratio(b['good'], d['good'])}")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests per workload")
    ap.add_argument("--workload", choices=tuple(SCENARIOS), action="append", help="run only this workload (repeatable)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated built-in strategies or config files (.yaml); the first is the baseline")
    ap.add_argument("--seed", type=int, help="the workloads' random seed (default: each workload's own), to repeat a run on other requests")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    ap.add_argument("--slo-ttft-ms", type=float, help="goodput's TTFT bound for every workload (default: per workload, see above)")
    ap.add_argument("--slo-itl-ms", type=float, help="goodput's mean inter-token latency bound for every workload (default: per workload)")
    ap.add_argument("--workers", default="1", metavar="N,...",
                    help="run each strategy with the EPP's --workers N for each N listed (default 1), e.g. 1,2 to compare")
    args = ap.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--workers: expected comma-separated numbers, got {args.workers!r}")
    if not workers or min(workers) < 1:
        ap.error(f"--workers: expected numbers >= 1, got {args.workers!r}")
    for name in args.workload or list(SCENARIOS):
        sc = SCENARIOS[name](args.quick) if args.seed is None else SCENARIOS[name](args.quick, args.seed)
        try:
            slo = slo_from_flags(sc.slo, args.slo_ttft_ms, args.slo_itl_ms)
        except ValueError as e:
            ap.error(str(e))
        print(summarize(sc, run(sc, strategies, args.timeout, workers), slo), flush=True)
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
