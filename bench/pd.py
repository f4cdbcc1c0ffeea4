"""P/D benchmark: does splitting prefill and decode pay on the same hardware, and does CPU prefill help GPUs?

Simulated pools, each behind real Envoy + the EPP, each driven with the same two traffic mixes:
  agg-4gpu      4 GPU-profile servers, aggregated (EPP `best`)          baseline of the 4-GPU P/D rows
  pd-2p2d       2 GPU prefill + 2 GPU decode behind pd-sidecars (pickers/configs/pd.yaml:
                prefix-based-pd-decider)
  pd-2p2d-latency, pd-1p3d-latency, pd-3p1d-latency
                the same 4 GPUs split 2:2, 1:3, 3:1 (prefill:decode), pickers/configs/pd-latency.yaml
                (latency-pd-decider: the latency model's decision)
  agg-2gpu      2 GPU-profile servers, aggregated                        baseline of the CPU-prefill rows
  pd-cpu2p-gpu2d  2 CPU-profile prefill + 2 GPU decode (CPU boxes added to the two GPUs), pd.yaml
  pd-cpu2p-gpu2d-latency  the same with pd-latency.yaml
--configs runs a subset (their baselines are added).
Mixes: long prompt / short output (prefill-heavy) and short prompt / long output (decode-heavy).
Each run is a closed loop: `concurrency` clients send streamed completions back to back for `duration`
seconds; tokens received in that window count towards throughput. Requests still open `grace` seconds
after the window are dropped and counted as unfinished; latencies are those of finished requests.

Goodput, the number P/D exists to improve: requests/s (finished ones over the window) that met both
bounds of the mix's SLO: TTFT, and the request's mean gap between tokens after the first (inference-
perf's `itl`; see bench.common.Slo). Unfinished and failed requests miss. Defaults, at the default
simulator time x2 (GPU profile: ~10k prefill tokens/s, 16 ms decode steps), scaled with --time-scale:
  long prompt / short output   TTFT <= 1000 ms (5x a 2,000-token prefill on an idle server)
                               ITL <= 25 ms (1.5x an idle decode step: a step that also prefilled
                               another request's ~2,000 tokens takes ~200 ms, so a few of those
                               in a 16-32-token answer break it; what disaggregation removes)
  short prompt / long output   TTFT <= 250 ms, ITL <= 25 ms (met by an aggregated pool at this load;
                               P/D must not lose it, e.g. by sending short prompts to slow prefill)
--slo-ttft-ms / --slo-itl-ms set both mixes' bounds as given (not scaled).
Run: python -m bench.pd [--quick]
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
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import Goodput, Slo, goodput, goodput_ratio, mean, percentile, ratio, slo_from_flags, table
from extproc.devstack.stack import LocalStack, PdPool, StackOptions

MODEL = "sim-model"
PD_CONFIG = Path(__file__).resolve().parents[1] / "pickers" / "configs" / "pd.yaml"
PD_LATENCY_CONFIG = PD_CONFIG.with_name("pd-latency.yaml")
_WORDS = "shipment invoice delay port customs carrier route freight quarter forecast margin supplier".split()


DEFAULT_TIME_SCALE = 2.0  # the SLO defaults below are for this simulator time scale


@dataclass(frozen=True, slots=True)
class Mix:
    name: str
    prompt_tokens: tuple[int, int]
    max_tokens: tuple[int, int]
    slo: Slo  # at DEFAULT_TIME_SCALE


MIXES = (
    Mix("long prompt / short output", (1500, 2500), (16, 32), Slo(1.0, 0.025)),
    Mix("short prompt / long output", (50, 150), (150, 250), Slo(0.25, 0.025)),
)
QUICK_MIXES = (MIXES[0], Mix(MIXES[1].name, (50, 150), (50, 80), MIXES[1].slo))


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    baseline: str | None  # the row this one is compared with
    sims: int = 0
    pd: PdPool | None = None
    epp_config: Path = PD_CONFIG  # P/D pools: the EPP's config


_CPU_PREFILL = PdPool(prefill=2, decode=2, prefill_sim_args=("--profile", "cpu"))
CONFIGS = (
    Config("agg-4gpu", None, sims=4),
    Config("pd-2p2d", "agg-4gpu", pd=PdPool(prefill=2, decode=2)),
    Config("pd-2p2d-latency", "agg-4gpu", pd=PdPool(prefill=2, decode=2), epp_config=PD_LATENCY_CONFIG),
    Config("pd-1p3d-latency", "agg-4gpu", pd=PdPool(prefill=1, decode=3), epp_config=PD_LATENCY_CONFIG),
    Config("pd-3p1d-latency", "agg-4gpu", pd=PdPool(prefill=3, decode=1), epp_config=PD_LATENCY_CONFIG),
    Config("agg-2gpu", None, sims=2),
    Config("pd-cpu2p-gpu2d", "agg-2gpu", pd=_CPU_PREFILL),
    Config("pd-cpu2p-gpu2d-latency", "agg-2gpu", pd=_CPU_PREFILL, epp_config=PD_LATENCY_CONFIG),
)


def select(names: str | None) -> tuple[Config, ...]:
    """The configs named (comma-separated) and their baselines, in CONFIGS' order; all for None."""
    if not names:
        return CONFIGS
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    known = {c.name: c for c in CONFIGS}
    unknown = sorted(wanted - known.keys())
    if unknown:
        raise ValueError(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(known)}")
    wanted |= {b for n in wanted if (b := known[n].baseline) is not None}
    return tuple(c for c in CONFIGS if c.name in wanted)


@dataclass(slots=True)
class Sample:
    ttft: float | None = None
    itl: float | None = None  # mean gap between tokens after the first
    e2e: float | None = None
    tokens_in_window: int = 0
    error: str | None = None
    unfinished: bool = False


@dataclass(slots=True)
class Run:
    config: Config
    mix: Mix
    samples: list[Sample] = field(default_factory=list)
    duration: float = 0.0

    @property
    def done(self) -> list[Sample]:
        return [s for s in self.samples if s.e2e is not None and s.error is None]

    def goodput(self, slo: Slo) -> Goodput:
        pairs = ((None, None) if s.error or s.unfinished or s.e2e is None else (s.ttft, s.itl) for s in self.samples)
        return goodput(pairs, slo, self.duration)

    def row(self, slo: Slo) -> dict[str, float]:
        done = self.done
        gp = self.goodput(slo)
        ttft = [s.ttft for s in done if s.ttft is not None]
        itl = [s.itl for s in done if s.itl is not None]
        return {
            "done": len(done),
            "errors": sum(1 for s in self.samples if s.error),
            "unfinished": sum(1 for s in self.samples if s.unfinished),
            "ttft50": percentile(ttft, 50),
            "ttft90": percentile(ttft, 90),
            "itl": mean(itl),
            "e2e50": percentile([s.e2e for s in done if s.e2e is not None], 50),
            "tok_s": sum(s.tokens_in_window for s in self.samples) / self.duration,
            "req_s": len(done) / self.duration,
            "met": gp.share,
            "good_s": gp.per_s,
        }


def _prompt(rng: random.Random, tokens: int) -> str:
    words: list[str] = [f"[{rng.random():.12f}]"]  # unique head: no run shares a prefix with another
    n = len(words[0]) + 1
    while n < tokens * 4:  # the simulator and the EPP count ~4 characters per token
        w = rng.choice(_WORDS)
        words.append(w)
        n += len(w) + 1
    return " ".join(words)[: tokens * 4]


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, end: float, sample: Sample) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    times: list[float] = []
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
        if resp.status != 200:
            sample.error = f"HTTP {resp.status}"
            await resp.read()
            return
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices")
            if choices and choices[0].get("text"):
                now = loop.time()
                times.append(now)
                if now <= end:
                    sample.tokens_in_window += 1
    if not times:
        sample.error = "no tokens"
        return
    sample.ttft = times[0] - start
    sample.e2e = loop.time() - start
    if len(times) > 1:
        sample.itl = (times[-1] - times[0]) / (len(times) - 1)


async def drive(stack: LocalStack, config: Config, mix: Mix, concurrency: int, duration: float, grace: float,
                seed: int) -> Run:
    url = f"{stack.base_url}/completions"
    rng = random.Random(seed)
    run = Run(config, mix, duration=duration)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency * 2),
                                     timeout=aiohttp.ClientTimeout(total=duration + 120)) as session:
        warm = json.dumps({"model": MODEL, "prompt": "warm up", "max_tokens": 1}).encode()
        for _ in range(4):
            async with session.post(url, data=warm, headers={"content-type": "application/json"}) as r:
                await r.read()
        loop = asyncio.get_running_loop()
        end = loop.time() + duration

        async def client() -> None:
            while loop.time() < end:
                body = json.dumps({
                    "model": MODEL, "prompt": _prompt(rng, rng.randint(*mix.prompt_tokens)),
                    "max_tokens": rng.randint(*mix.max_tokens), "stream": True,
                }).encode()
                sample = Sample()
                run.samples.append(sample)
                try:
                    await asyncio.wait_for(_one(session, url, body, end, sample), timeout=end + grace - loop.time())
                except asyncio.TimeoutError:
                    sample.unfinished = True
                except aiohttp.ClientError as e:
                    sample.error = f"{type(e).__name__}: {e}"[:120]

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return run


def start_stack(config: Config, workdir: Path, time_scale: float) -> LocalStack:
    sim_args = ("--time-scale", str(time_scale))
    if config.pd is not None:
        opts = StackOptions(workdir=workdir, pd=config.pd, sim_args=sim_args, model=MODEL,
                            epp_args=("--config-file", str(config.epp_config)), envoy_concurrency=1)
    else:
        opts = StackOptions(workdir=workdir, sims=config.sims, sim_args=sim_args, model=MODEL,
                            epp_args=("--strategy", "best"), envoy_concurrency=1)
    stack = LocalStack(opts)
    stack.start()
    return stack


def _ms(v: float) -> str:
    return "-" if v != v else f"{v * 1000:.0f}"


def report(mix: Mix, runs: list[Run], concurrency: int, duration: float, time_scale: float, slo: Slo) -> str:
    rows = {r.config.name: r.row(slo) for r in runs}
    header = ["config", "done", "unfinished", "err", "TTFT p50 ms", "TTFT p90 ms", "ITL ms", "E2E p50 ms", "out tok/s",
              "SLO met", f"goodput/s {slo.label()}", "tok/s vs base", "TTFT vs base", "ITL vs base", "E2E vs base",
              "goodput vs base"]
    lines = []
    for r in runs:
        m, base = rows[r.config.name], rows.get(r.config.baseline or "", None)
        vs = ["", "", "", "", ""] if base is None else [
            ratio(m["tok_s"], base["tok_s"]), ratio(m["ttft50"], base["ttft50"]),
            ratio(m["itl"], base["itl"]), ratio(m["e2e50"], base["e2e50"]), goodput_ratio(m["good_s"], base["good_s"])]
        name = r.config.name + ("" if base is None else f" (vs {r.config.baseline})")
        met = "-" if m["met"] != m["met"] else f"{100 * m['met']:.0f}%"
        lines.append([name, str(int(m["done"])), str(int(m["unfinished"])), str(int(m["errors"])), _ms(m["ttft50"]), _ms(m["ttft90"]),
                      _ms(m["itl"]), _ms(m["e2e50"]), f"{m['tok_s']:.0f}", met, f"{m['good_s']:.2f}", *vs])
    title = (f"{mix.name}: prompts {mix.prompt_tokens[0]}-{mix.prompt_tokens[1]} tokens, outputs "
             f"{mix.max_tokens[0]}-{mix.max_tokens[1]} tokens; {concurrency} clients x {duration:g}s per config; "
             f"simulator time x{time_scale}; SLO: TTFT <= {1000 * slo.ttft_s:g} ms and mean ITL <= {1000 * slo.itl_s:g} ms")
    return title + "\n" + table(header, lines)


def mix_slo(mix: Mix, time_scale: float, ttft_ms: float | None, itl_ms: float | None) -> Slo:
    """The mix's default bounds scaled to the simulator's time scale, each replaced by its flag when given."""
    return slo_from_flags(mix.slo.scaled(time_scale / DEFAULT_TIME_SCALE), ttft_ms, itl_ms)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pd", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter runs (under a minute)")
    p.add_argument("--duration", type=float, default=None, help="seconds of traffic per config and mix (default 9, quick 2.5)")
    p.add_argument("--concurrency", type=int, default=12, help="closed-loop clients (default 12)")
    p.add_argument("--time-scale", type=float, default=2.0,
                   help="simulator time scale; >1 keeps our own CPU cost small next to simulated time (default 2)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--slo-ttft-ms", type=float, help="goodput's TTFT bound for both mixes (default: per mix, see above)")
    p.add_argument("--slo-itl-ms", type=float, help="goodput's mean inter-token latency bound for both mixes (default: per mix)")
    p.add_argument("--configs", help=f"comma-separated subset of {', '.join(c.name for c in CONFIGS)} (their baselines are added)")
    args = p.parse_args(argv)
    try:
        configs = select(args.configs)
    except ValueError as e:
        p.error(str(e))
    duration = args.duration or (2.5 if args.quick else 9.0)
    grace = 1.5 if args.quick else 5.0
    mixes = QUICK_MIXES if args.quick else MIXES
    try:
        slos = {m.name: mix_slo(m, args.time_scale, args.slo_ttft_ms, args.slo_itl_ms) for m in mixes}
    except ValueError as e:
        p.error(str(e))
    runs: dict[str, list[Run]] = {m.name: [] for m in mixes}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-pd-") as tmp:
        for config in configs:
            stack = start_stack(config, Path(tmp) / config.name, args.time_scale)
            try:
                for i, mix in enumerate(mixes):
                    print(f"{config.name}: {mix.name} ...", file=sys.stderr)
                    run = asyncio.run(drive(stack, config, mix, args.concurrency, duration, grace, args.seed + i))
                    runs[mix.name].append(run)
            finally:
                stack.stop()
    errors = Counter(s.error for rs in runs.values() for r in rs for s in r.samples if s.error)
    if errors:
        print(f"errors: {dict(errors)}", file=sys.stderr)
    for mix in mixes:
        print()
        print(report(mix, runs[mix.name], args.concurrency, duration, args.time_scale, slos[mix.name]))
    print(f"\n(ratios: a config over its baseline; TTFT, ITL and E2E lower is better, tok/s and goodput higher is better; "
          f"total {time.monotonic() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
