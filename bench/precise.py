"""Precise vs approximate prefix-cache routing: where do KV events beat a routing-history guess?

Three workloads, each replayed (same seeded requests) through real Envoy + the EPP in front of a fresh
pool of simulators that publish KV events, once per strategy: round-robin, load-only (queue + kv),
approximate (the GIE default: queue 2 + kv 2 + prefix-cache 3) and precise (the same with
`precise-prefix-cache-scorer`, fed by the simulators' KV events, in place of prefix-cache-scorer).

    python -m bench.precise            # all three workloads (~6 min)
    python -m bench.precise --quick    # shorter runs (~1.5 min)
    python -m bench.precise --workload restart

Workloads:
- churn: more distinct long prefixes than the caches hold (40 tenants x ~2,400-token system
  prompts, Zipf popularity: a few hot tenants, a long tail that keeps evicting each other).
- restart: 12 tenants that fit in the pool; halfway through, the busiest simulator so far is killed and started
  again on the same ports with an empty cache (the approximate index does not know; the KV events
  tell the precise one).
- shared: the pool also serves traffic this EPP never sees (another gateway, direct clients): 40% of
  the requests go straight to the simulators, by tenant to a fixed server, half of them for the
  gateway's own tenants (the same application behind a second gateway), half for tenants of their
  own, under cache pressure. The direct traffic evicts blocks the approximate index believes are
  cached and warms prefixes on servers it does not know about; the KV events show both.

Per strategy: client-side TTFT (mean/p50/p90/p99) of the requests through the gateway, the pool's
prefix-cache hit rate (from `/sim/stats`, all traffic) and the gateway requests' own (from their
usage), the prefix index's size (approximate: the EPP's `inference_extension_prefix_indexer_size`;
precise: the EPP's `inference_extension_precise_prefix_indexer_size`, checked against a copy the
bench keeps from the same KV events with the EPP's own code) and the EPP's resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import mean, percentile, ratio, table
from bench.quality import Session, _chat
from bench.routing import MODEL, Outcome, _get_json, _text, stream_chat
from extproc.datalayer.datastore import Datastore
from extproc.datalayer.endpoints_file import load_endpoints_file
from extproc.datalayer.kv_events import KVEventSubscriber
from extproc.devstack.stack import LocalStack, StackOptions
from pickers.config.loader import DEFAULT_CONFIG_TEXT
from pickers.indexes.kv_blocks import KVBlockIndex

PRECISE_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: precise-prefix-cache-scorer
  parameters: {tokenizer: sim, kvEventsPort: 0}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: precise-prefix-cache-scorer, weight: 3}
  - {pluginRef: max-score-picker}
"""

# The default config with the approximate index sized like the reference picker's default
# (31,250 blocks per server) instead of from each server's reported cache size: a diagnostic.
APPROX_NO_TUNE_CONFIG = DEFAULT_CONFIG_TEXT.replace(
    "- type: prefix-cache-scorer\n", "- type: prefix-cache-scorer\n  parameters: {autoTune: false}\n"
)

# name -> `epp serve` flags; the first is the baseline of the ratio rows
STRATEGIES: dict[str, tuple[str, ...]] = {
    "round-robin": ("--strategy", "round-robin"),
    "load": ("--strategy", "load"),
    "approximate": ("--strategy", "default"),
    "precise": ("--config-text", PRECISE_CONFIG),
    "approx-no-tune": ("--config-text", APPROX_NO_TUNE_CONFIG),  # not run unless named
}
DEFAULT_STRATEGIES = ("round-robin", "load", "approximate", "precise")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    sessions: tuple[Session, ...]
    sim_args: tuple[str, ...]
    note: str
    sims: int = 4
    restart_at: float | None = None  # seconds after the start: kill the busiest simulator so far and start it again
    window_s: float = 8.0  # "after the restart" = requests sent in this many seconds after it
    direct: tuple[tuple[int, Session], ...] = ()  # (simulator index, session): sent past the EPP


@dataclass(slots=True)
class Result:
    strategy: str
    outcomes: list[tuple[float, Outcome]]  # (sent at, seconds after the start; outcome)
    wall_s: float
    stats: list[dict[str, object]]  # every simulator's /sim/stats (+ the restarted one's before it stopped)
    approx_entries: int
    precise_entries: int
    precise_bytes: int
    cached_blocks: int  # blocks the simulators' caches hold at the end (what a precise index mirrors)
    epp_rss_mb: float
    restarted: str = ""  # host:port of the restarted simulator
    restarted_after: dict[str, object] = field(default_factory=dict)  # its /sim/stats since the restart
    downtime_s: float = 0.0
    gaps: int = 0
    direct: list[tuple[float, Outcome]] = field(default_factory=list)  # the traffic the EPP did not see
    epp_precise_entries: int = 0  # the EPP's own inference_extension_precise_prefix_indexer_size


def _zipf(rng: random.Random, n: int, s: float) -> list[float]:
    weights = [1.0 / (k + 1) ** s for k in range(n)]
    rng.shuffle(weights)  # tenant ids carry no popularity order
    return weights


def _tenant_sessions(rng: random.Random, tenants: int, system_chars: int, requests: int, rate: float, zipf_s: float) -> tuple[Session, ...]:
    systems = [f"[tenant {g}] You are the assistant of tenant {g}. " + _text(rng, system_chars) for g in range(tenants)]
    weights = _zipf(rng, tenants, zipf_s)
    out, t = [], 0.0
    for i in range(requests):
        t += rng.expovariate(rate)
        g = rng.choices(range(tenants), weights)[0]
        msgs = [{"role": "system", "content": systems[g]}, {"role": "user", "content": f"Question {i}: " + _text(rng, 200)}]
        out.append(Session(t, g, (_chat(msgs, rng.randint(16, 32)),)))
    return tuple(out)


def churn(quick: bool, seed: int = 11) -> Scenario:
    rng = random.Random(seed)
    tenants, chars, rate, blocks = 40, 9_600, 8.0, 500
    n = 50 if quick else 150
    return Scenario(
        "churn",
        _tenant_sessions(rng, tenants, chars, n, rate, 1.0),
        ("--profile", "gpu", "--time-scale", "3", "--num-gpu-blocks", str(blocks)),
        f"{n} requests, {tenants} tenants x ~{chars // 4}-token system prompts, Zipf 1.0 popularity, Poisson {rate:g}/s;"
        f" each server caches {blocks} blocks (~{blocks * 16 * 4 // chars} prompts), the pool ~{4 * blocks * 16 * 4 // chars} of {tenants}",
    )


def restart(quick: bool, seed: int = 12) -> Scenario:
    rng = random.Random(seed)
    tenants, chars, rate, blocks = 12, 12_000, 8.0, 1000
    n = 50 if quick else 150
    sessions = _tenant_sessions(rng, tenants, chars, n, rate, 0.8)
    at = sessions[len(sessions) // 2].at
    return Scenario(
        "restart",
        sessions,
        ("--profile", "gpu", "--time-scale", "3", "--num-gpu-blocks", str(blocks)),
        f"{n} requests, {tenants} tenants x ~{chars // 4}-token system prompts, Zipf 0.8, Poisson {rate:g}/s;"
        f" each server caches {blocks} blocks (~{blocks * 16 * 4 // chars} prompts); the busiest server is killed and restarted at {at:.1f}s",
        restart_at=at,
        window_s=4.0 if quick else 8.0,
    )


def shared(quick: bool, seed: int = 13) -> Scenario:
    rng = random.Random(seed)
    tenants, own, chars, rate, blocks, share, sims = 16, 16, 9_600, 10.0, 600, 0.4, 4
    n = 80 if quick else 250
    systems = [f"[tenant {g}] You are the assistant of tenant {g}. " + _text(rng, chars) for g in range(tenants)]
    others = [f"[other {g}] You are the assistant of another team, {g}. " + _text(rng, chars) for g in range(own)]
    wg, wo = _zipf(rng, tenants, 1.0), _zipf(rng, own, 1.0)
    gateway: list[Session] = []
    direct: list[tuple[int, Session]] = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        q = {"role": "user", "content": f"Question {i}: " + _text(rng, 200)}
        if rng.random() < share:  # the other gateway: sticky by tenant, one fixed server each
            if rng.random() < 0.5:
                g = rng.choices(range(tenants), wg)[0]
                group, system = g, systems[g]
            else:
                g = rng.choices(range(own), wo)[0]
                group, system = 1000 + g, others[g]
            body = _chat([{"role": "system", "content": system}, q], rng.randint(16, 32))
            direct.append((g % sims, Session(t, group, (body,))))
        else:
            g = rng.choices(range(tenants), wg)[0]
            gateway.append(Session(t, g, (_chat([{"role": "system", "content": systems[g]}, q], rng.randint(16, 32)),)))
    return Scenario(
        "shared",
        tuple(gateway),
        ("--profile", "gpu", "--time-scale", "3", "--num-gpu-blocks", str(blocks)),
        f"{n} requests at Poisson {rate:g}/s, ~{chars // 4}-token system prompts, Zipf 1.0: {len(gateway)} through the EPP from"
        f" {tenants} tenants, {len(direct)} ({100 * len(direct) / n:.0f}%) straight to the servers (by tenant, one fixed server each):"
        f" half the same {tenants} tenants, half {own} others; each server caches {blocks} blocks (~{blocks * 16 * 4 // chars}"
        f" prompts), the pool ~{sims * blocks * 16 * 4 // chars} of {tenants + own}",
        sims=sims,
        direct=tuple(direct),
    )


SCENARIOS = {"churn": churn, "restart": restart, "shared": shared}
SEEDS = {"churn": 11, "restart": 12, "shared": 13}


def _respawn_sim(stack: LocalStack, i: int) -> float:
    """Kill simulator i (a crash: in-flight requests fail) and start it again with the same argv
    (same HTTP and KV-event ports, empty cache); returns the downtime."""
    old = next(p for p in stack.procs if p.name == f"sim-{i}")
    argv = list(old.popen.args)  # type: ignore[arg-type]
    started = time.monotonic()
    os.killpg(old.popen.pid, signal.SIGKILL)
    old.popen.wait(10)
    stack.procs.remove(old)
    new = stack._spawn(f"sim-{i}", argv)
    stack._wait_http(new, f"http://127.0.0.1:{stack.sim_ports[i]}/health")
    return time.monotonic() - started


async def _timed_session(http: aiohttp.ClientSession, url: str, s: Session, t0: float, timeout: float) -> list[tuple[float, Outcome]]:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + s.at - loop.time()))
    out = []
    for body in s.bodies:
        sent = loop.time() - t0
        out.append((sent, await stream_chat(http, url, body, s.group, timeout)))
    return out


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _metric(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def drive(stack: LocalStack, strategy: str, sc: Scenario, timeout: float) -> Result:
    url = f"{stack.base_url}/chat/completions"
    sims = [f"http://127.0.0.1:{p}" for p in stack.sim_ports]
    # The bench's own copy of the precise index, from the same events (the EPP exports no size for it).
    ds = Datastore()
    ds.set_endpoints(load_endpoints_file(stack.endpoints_path))  # type: ignore[arg-type]
    shadow = KVBlockIndex()
    sub = KVEventSubscriber(ds, shadow, default_port=None)
    sub_task = asyncio.create_task(sub.run())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024)) as http:
        warm = _chat([{"role": "user", "content": "warm up"}], 1)
        for _ in range(2 * len(sims)):
            await stream_chat(http, url, warm, -1, 30)
        for s in sims:
            await _get_json(http, f"{s}/sim/reset", "POST")
        await asyncio.sleep(0.5)  # the EPP scrapes the empty pool; SUB sockets are connected
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.1
        before: list[dict[str, object]] = []
        downtime = [0.0]
        restarted = [0]

        async def restarter() -> None:
            assert sc.restart_at is not None
            await asyncio.sleep(max(0.0, t0 + sc.restart_at - loop.time()))
            now = [await _get_json(http, f"{s}/sim/stats") for s in sims]
            busiest = max(range(len(sims)), key=lambda i: int(now[i]["requests_total"]))  # type: ignore[call-overload]
            restarted[0] = busiest
            before.append(now[busiest])
            downtime[0] = await asyncio.to_thread(_respawn_sim, stack, busiest)

        side = asyncio.create_task(restarter()) if sc.restart_at is not None else None
        direct = asyncio.gather(*(_timed_session(http, f"{sims[i]}/v1/chat/completions", s, t0, timeout) for i, s in sc.direct))
        nested = await asyncio.gather(*(_timed_session(http, url, s, t0, timeout) for s in sc.sessions))
        wall = loop.time() - t0
        direct_nested = await direct
        if side is not None:
            await side
        await asyncio.sleep(0.3)  # the last events reach the subscribers
        stats = [await _get_json(http, f"{s}/sim/stats") for s in sims]
        async with http.get(f"http://127.0.0.1:{stack.epp_metrics_port}/metrics") as r:
            metrics = await r.text()
    sub_task.cancel()
    try:
        await sub_task
    except asyncio.CancelledError:
        pass
    assert stack.epp_proc is not None
    return Result(
        strategy, [x for group in nested for x in group], wall, stats + before,
        approx_entries=_metric(metrics, "inference_extension_prefix_indexer_size"),
        precise_entries=shadow.size(), precise_bytes=shadow.memory_bytes(),
        cached_blocks=sum(int(s.get("cached_blocks", 0)) for s in stats),  # type: ignore[call-overload]
        epp_rss_mb=_rss_mb(stack.epp_proc.popen.pid),
        restarted=str(stats[restarted[0]]["name"]) if before else "", restarted_after=stats[restarted[0]] if before else {},
        downtime_s=downtime[0], gaps=sub.gaps, direct=[x for group in direct_nested for x in group],
        epp_precise_entries=_metric(metrics, "inference_extension_precise_prefix_indexer_size"),
    )  # fmt: skip


def run(sc: Scenario, strategies: Sequence[str], timeout: float) -> list[Result]:
    results = []
    for strategy in strategies:
        with tempfile.TemporaryDirectory(prefix=f"bench-precise-{sc.name}-") as tmp:
            opts = StackOptions(
                workdir=Path(tmp), sims=sc.sims, sim_args=sc.sim_args, model=MODEL,
                epp_args=STRATEGIES[strategy], envoy_concurrency=2, kv_events=True,
            )  # fmt: skip
            t = time.monotonic()
            with LocalStack(opts) as stack:
                results.append(asyncio.run(drive(stack, strategy, sc, timeout)))
            print(f"  {sc.name} / {strategy}: done in {time.monotonic() - t:.0f}s", file=sys.stderr, flush=True)
    return results


def _ms(x: float) -> str:
    return f"{1000 * x:.0f}"


def _hit(stats: Sequence[dict[str, object]]) -> float:
    prompt = sum(int(s["prompt_tokens_total"]) for s in stats)  # type: ignore[call-overload]
    cached = sum(int(s["cached_prompt_tokens_total"]) for s in stats)  # type: ignore[call-overload]
    return cached / prompt if prompt else 0.0


def _usage_hit(outcomes: Sequence[Outcome]) -> float:
    prompt = sum(o.prompt_tokens for o in outcomes)
    return sum(o.cached_tokens for o in outcomes) / prompt if prompt else 0.0


def summarize(sc: Scenario, results: Sequence[Result]) -> str:
    header = ["strategy", "ok", "err", "TTFT mean", "p50", "p90", "p99", "pool hit", "gw hit", "index entries", "EPP RSS MB",
              "share % (sorted)"]  # fmt: skip
    rows, figs = [], []
    for r in results:
        ok = [o for _, o in r.outcomes if o.error is None and o.ttft is not None]
        ttfts = [o.ttft for o in ok if o.ttft is not None]
        f = {"mean": mean(ttfts), "p50": percentile(ttfts, 50), "p90": percentile(ttfts, 90), "p99": percentile(ttfts, 99), "hit": _hit(r.stats),
             "gw": _usage_hit(ok)}  # fmt: skip
        figs.append(f)
        served = Counter(o.served_by for o in ok)
        entries = f"{r.epp_precise_entries or r.precise_entries:,}" if r.strategy == "precise" else f"{r.approx_entries:,}" if r.strategy.startswith("approx") else "-"
        rows.append([
            r.strategy, str(len(ok)), str(len(r.outcomes) - len(ok)), _ms(f["mean"]), _ms(f["p50"]), _ms(f["p90"]), _ms(f["p99"]),
            f"{100 * f['hit']:.0f}%", f"{100 * f['gw']:.0f}%", entries, f"{r.epp_rss_mb:.0f}",
            "/".join(f"{100 * n / max(len(ok), 1):.0f}" for _, n in served.most_common()),
        ])  # fmt: skip
    base = figs[0]
    for r, f in zip(results[1:], figs[1:], strict=True):
        rows.append([
            f"  {r.strategy} vs {results[0].strategy}", "", "", ratio(f["mean"], base["mean"]), ratio(f["p50"], base["p50"]),
            ratio(f["p90"], base["p90"]), ratio(f["p99"], base["p99"]), ratio(f["hit"], base["hit"]), ratio(f["gw"], base["gw"]), "", "", "",
        ])  # fmt: skip
    by = {r.strategy: f for r, f in zip(results, figs, strict=True)}
    lines = [f"{sc.name}: {sc.note}", f"pool: {sc.sims} x vllm-sim {' '.join(sc.sim_args)} --kv-events-port P", table(header, rows)]
    lines.append("(TTFT in ms, client-side, of the requests through the gateway; pool hit = cached / prompt tokens over the pool, all traffic;"
                 " gw hit = the same for the gateway's requests, from their usage; index entries = (endpoint, block) pairs)")
    if "precise" in by and "approximate" in by:
        p, a = by["precise"], by["approximate"]
        lines.append(
            f"precise vs approximate: TTFT mean {ratio(p['mean'], a['mean'])}, p50 {ratio(p['p50'], a['p50'])},"
            f" p90 {ratio(p['p90'], a['p90'])}, p99 {ratio(p['p99'], a['p99'])}; pool hit {100 * p['hit']:.0f}% vs {100 * a['hit']:.0f}%,"
            f" gateway hit {100 * p['gw']:.0f}% vs {100 * a['gw']:.0f}%"
        )
    for r in results:
        ok = [(at, o) for at, o in r.outcomes if o.error is None]
        spread: dict[int, set[str]] = defaultdict(set)
        for _, o in ok:
            spread[o.group].add(o.served_by)
        errors = Counter(o.error for _, o in r.outcomes if o.error)
        line = f"  {r.strategy}: wall {r.wall_s:.1f}s; each tenant served by {mean([len(v) for v in spread.values()]):.1f} servers"
        if r.strategy == "precise":
            line += (f"; precise index {r.epp_precise_entries:,} entries (EPP metric; the bench's copy {r.precise_entries:,},"
                     f" ~{r.precise_bytes / 1e6:.1f} MB est.) vs {r.cached_blocks:,} blocks cached in the pool; event gaps {r.gaps}")  # fmt: skip
        if errors:
            line += f"; errors {dict(errors)}"
        lines.append(line)
        if r.direct:
            d_ok = [o for _, o in r.direct if o.error is None and o.ttft is not None]
            d_ttft = [o.ttft for o in d_ok if o.ttft is not None]
            lines.append(
                f"    direct traffic (not through the EPP): {len(d_ok)}/{len(r.direct)} ok, TTFT p50 {_ms(percentile(d_ttft, 50))}"
                f" p90 {_ms(percentile(d_ttft, 90))} ms, hit {100 * _usage_hit(d_ok):.0f}%"
            )
        if sc.restart_at is not None:
            lo, hi = sc.restart_at, sc.restart_at + sc.window_s
            after = [o.ttft for at, o in ok if lo <= at < hi and o.ttft is not None]
            to_it = [o for at, o in ok if at >= lo and o.served_by == r.restarted]
            a = r.restarted_after
            hit_after = int(a.get("cached_prompt_tokens_total", 0)) / max(int(a.get("prompt_tokens_total", 0)), 1)  # type: ignore[call-overload]
            lines.append(
                f"    restart of {r.restarted} (down {r.downtime_s:.1f}s): in the {sc.window_s:g}s after it TTFT p50 {_ms(percentile(after, 50))}"
                f" p90 {_ms(percentile(after, 90))} mean {_ms(mean(after))} ms ({len(after)} requests);"
                f" the restarted server then took {len(to_it)} requests, hit {100 * hit_after:.0f}%"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.precise", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per workload")
    ap.add_argument("--workload", choices=tuple(SCENARIOS), action="append", help="run only this workload (repeatable)")
    ap.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                    help=f"comma-separated, of {', '.join(STRATEGIES)} (default %(default)s); the first is the baseline")
    ap.add_argument("--seed", type=int, default=0, help="added to each workload's seed (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    args = ap.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        ap.error(f"unknown strategies {unknown}; expected some of {', '.join(STRATEGIES)}")
    for name in args.workload or list(SCENARIOS):
        sc = SCENARIOS[name](args.quick, SEEDS[name] + args.seed)
        print(summarize(sc, run(sc, strategies, args.timeout)), flush=True)
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
