"""Wide-EP benchmark: does routing to each data-parallel rank, aware of lockstep groups, pay?

Simulated DP groups (`vllm-sim --data-parallel-size N`: N ranks in one process, each with its own KV
cache and queue, stepping in lockstep: a step lasts as long as the slowest rank's batch plus an
all-to-all, idle ranks take dummy steps) behind real Envoy + the EPP, driven by the same closed loop
of clients in every configuration:
  rank-aware    every rank an endpoint; `best` (prefix affinity + the EPP's in-flight load)
  rank-aware+dp the same plus data-parallel-balance-scorer (weight 3), which knows the ranks of a
                group step together: what a request adds to its group's slowest rank
  plain         every rank an endpoint; llm-d's wide-EP scoring shape: prefix-cache 3 + queue 2 +
                active-request 2, ranks treated as independent servers
  round-robin   every rank an endpoint, in turn
  rank-0 only   the pool lists one port per pod (InferencePool without every rank port in
                targetPorts): only rank 0 of each group gets traffic; plain scoring over those
With --pd: one prefill group and one decode group (decode ranks behind `pd-sidecar
--data-parallel-size`), every setup on llm-d's wide-EP P/D config shape (always-disagg-pd-decider;
prefill prefix 3 + queue 2 + active-request 2, decode active-request): rank-aware is that config over
every rank, rank-aware+dp adds the data-parallel-balance-scorer to both profiles.
Traffic: `clients` closed-loop clients send streamed completions back to back; each prompt is one of
`prefixes` shared system prompts (a tenant's instructions) plus a question of its own, so prefix
affinity matters, and the prefixes together overflow one rank's KV cache but fit the pool's.
Per-rank load spread is sampled from every rank's /sim/stats a few times a second: the mean over
samples of (max over ranks of running requests) / (mean over ranks), per group.

    python -m bench.wide_ep            # aggregated, 2 groups x 4 ranks (~2.5 min)
    python -m bench.wide_ep --pd       # 1 prefill + 1 decode group of 4 ranks (~2 min)
    python -m bench.wide_ep --quick    # shorter runs (~1.5 min)
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
from bench.pd import Sample, _one  # one streamed completion, timed
from extproc.devstack.stack import LocalStack, PdPool, StackOptions

MODEL = "sim-model"
_WORDS = "shipment invoice delay port customs carrier route freight quarter forecast margin supplier".split()

PLAIN_CONFIG = """\
# llm-d's wide-EP guide scoring (its prefill profile), ranks as independent endpoints
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {maxPrefixTokensToMatch: 131072}
- type: prefix-cache-scorer
- type: queue-scorer
- type: active-request-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: active-request-scorer, weight: 2}
  - {pluginRef: max-score-picker}
"""


def _pd_config(prefill: str, decode: str, extra_plugins: str = "") -> str:
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {{maxPrefixTokensToMatch: 131072}}
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders: {{prefill: always-disagg-pd-decider}}
- type: prefill-filter
- type: decode-filter
- type: prefix-cache-scorer
- type: queue-scorer
- type: active-request-scorer
- type: max-score-picker
- type: round-robin-picker
{extra_plugins}schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
{prefill}- name: decode
  plugins:
  - pluginRef: decode-filter
{decode}"""


# llm-d's wide-EP guide (router/wide-ep-lws.values.yaml, less its DisaggregatedSet rollout screener)
_GUIDE_PREFILL = ("  - {pluginRef: prefix-cache-scorer, weight: 3}\n  - {pluginRef: queue-scorer, weight: 2}\n"
                  "  - {pluginRef: active-request-scorer, weight: 2}\n  - {pluginRef: max-score-picker}\n")
_GUIDE_DECODE = "  - {pluginRef: active-request-scorer}\n  - {pluginRef: max-score-picker}\n"
PD_PLAIN = _pd_config(_GUIDE_PREFILL, _GUIDE_DECODE)
PD_RANK_AWARE = _pd_config(
    _GUIDE_PREFILL.replace("  - {pluginRef: max-score-picker}", "  - {pluginRef: data-parallel-balance-scorer, weight: 3}\n  - {pluginRef: max-score-picker}"),
    _GUIDE_DECODE.replace("  - {pluginRef: max-score-picker}", "  - {pluginRef: dp-decode, weight: 3}\n  - {pluginRef: max-score-picker}"),
    "- type: data-parallel-balance-scorer\n- type: data-parallel-balance-scorer\n  name: dp-decode\n  parameters: {prefill: false}\n",
)
# one round-robin picker per profile: a shared one would alternate between the profiles' candidate lists
PD_ROUND_ROBIN = _pd_config("  - {pluginRef: round-robin-picker}\n", "  - {pluginRef: rr-decode}\n",
                            "- type: round-robin-picker\n  name: rr-decode\n")


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    epp_args: tuple[str, ...] = ()
    config_text: str | None = None  # written to a file and passed as --config-file
    rank0_only: bool = False


def _best_with_dp(weight: int) -> str:
    """best.yaml plus the data-parallel-balance-scorer at `weight`."""
    text = (Path(__file__).resolve().parents[1] / "pickers" / "configs" / "best.yaml").read_text()
    text = text.replace("- type: max-score-picker\n", "- type: data-parallel-balance-scorer\n- type: max-score-picker\n", 1)
    return text.replace("  - {pluginRef: max-score-picker}", f"  - {{pluginRef: data-parallel-balance-scorer, weight: {weight}}}\n  - {{pluginRef: max-score-picker}}")


SETUPS = (
    Setup("rank-aware", ("--strategy", "best")),
    Setup("rank-aware+dp", config_text=_best_with_dp(3)),
    Setup("plain", config_text=PLAIN_CONFIG),
    Setup("round-robin", ("--strategy", "round-robin")),
    Setup("rank-0 only", config_text=PLAIN_CONFIG, rank0_only=True),
)
PD_SETUPS = (
    Setup("rank-aware", config_text=PD_PLAIN),  # llm-d's wide-EP P/D config over every rank
    Setup("rank-aware+dp", config_text=PD_RANK_AWARE),
    Setup("round-robin", config_text=PD_ROUND_ROBIN),
    Setup("rank-0 only", config_text=PD_PLAIN, rank0_only=True),
)


@dataclass(frozen=True, slots=True)
class Workload:
    prefixes: int = 24
    prefix_tokens: int = 1500
    question_tokens: tuple[int, int] = (100, 400)
    max_tokens: tuple[int, int] = (32, 160)


@dataclass(slots=True)
class Run:
    setup: Setup
    samples: list[Sample] = field(default_factory=list)
    duration: float = 0.0
    spread: list[float] = field(default_factory=list)  # per sample and group: max/mean running
    busy_ranks: Counter[str] = field(default_factory=Counter)  # rank name -> samples with work

    def row(self) -> dict[str, float]:
        done = [s for s in self.samples if s.ttft is not None and s.error is None and not s.unfinished]
        ttft = [s.ttft for s in done if s.ttft is not None]
        itl = [s.itl for s in done if s.itl is not None]
        return {
            "done": len(done),
            "errors": sum(1 for s in self.samples if s.error),
            "unfinished": sum(1 for s in self.samples if s.unfinished),
            "ttft50": percentile(ttft, 50),
            "ttft90": percentile(ttft, 90),
            "itl": mean(itl),
            "itl90": percentile(itl, 90),
            "tok_s": sum(s.tokens_in_window for s in self.samples) / self.duration,
            "spread": mean(self.spread),
        }


def _words(rng: random.Random, tokens: int) -> str:
    words: list[str] = []
    n = 0
    while n < tokens * 4:  # the simulator and the EPP count ~4 characters per token
        w = rng.choice(_WORDS)
        words.append(w)
        n += len(w) + 1
    return " ".join(words)[: tokens * 4]


def make_prefixes(w: Workload, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"[tenant {i}] " + _words(rng, w.prefix_tokens) for i in range(w.prefixes)]


async def _sample_ranks(session: aiohttp.ClientSession, ranks: dict[str, list[str]], run: Run, every: float) -> None:
    """Every rank's running batch, grouped: how unevenly each group's ranks are loaded."""
    while True:
        for group, urls in ranks.items():
            running = []
            for url in urls:
                async with session.get(f"{url}/sim/stats", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    s = await r.json()
                running.append(int(s["running"]))
                if s["running"]:
                    run.busy_ranks[url] += 1
            if sum(running):
                run.spread.append(max(running) / (sum(running) / len(running)))
        await asyncio.sleep(every)


async def drive(stack: LocalStack, setup: Setup, w: Workload, prefixes: Sequence[str], clients: int,
                duration: float, grace: float, seed: int, ranks: dict[str, list[str]]) -> Run:
    url = f"{stack.base_url}/completions"
    rng = random.Random(seed)
    run = Run(setup, duration=duration)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients * 2 + 16),
                                     timeout=aiohttp.ClientTimeout(total=duration + 120)) as session:
        loop = asyncio.get_running_loop()
        sampler = asyncio.create_task(_sample_ranks(session, ranks, run, 0.25))
        end = loop.time() + duration

        async def client() -> None:
            while loop.time() < end:
                prompt = rng.choice(prefixes) + " Q: " + _words(rng, rng.randint(*w.question_tokens))
                body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": rng.randint(*w.max_tokens),
                                   "stream": True}).encode()
                sample = Sample()
                run.samples.append(sample)
                try:
                    await asyncio.wait_for(_one(session, url, body, end, sample), timeout=end + grace - loop.time())
                except asyncio.TimeoutError:
                    sample.unfinished = True
                except aiohttp.ClientError as e:
                    sample.error = f"{type(e).__name__}: {e}"[:120]

        await asyncio.gather(*(client() for _ in range(clients)))
        sampler.cancel()
        try:
            await sampler
        except asyncio.CancelledError:
            pass
    return run


def _ms(v: float) -> str:
    return "-" if v != v else f"{v * 1000:.0f}"


def report(title: str, runs: Sequence[Run]) -> str:
    rows = {r.setup.name: r.row() for r in runs}
    base = rows[runs[0].setup.name]
    header = ["routing", "done", "unfin", "err", "out tok/s", "TTFT p50 ms", "TTFT p90 ms", "ITL ms", "ITL p90 ms",
              "rank spread", "busy ranks", f"tok/s: {runs[0].setup.name} vs this", "ITL vs this"]
    lines = []
    for r in runs:
        m = rows[r.setup.name]
        busy = sum(1 for v in r.busy_ranks.values() if v)
        lines.append([r.setup.name, str(int(m["done"])), str(int(m["unfinished"])), str(int(m["errors"])),
                      f"{m['tok_s']:.0f}", _ms(m["ttft50"]), _ms(m["ttft90"]), _ms(m["itl"]), _ms(m["itl90"]),
                      f"{m['spread']:.2f}", str(busy), ratio(base["tok_s"], m["tok_s"]), ratio(base["itl"], m["itl"])])
    return title + "\n" + table(header, lines)


class Rank0Stack(LocalStack):
    """The stack's DP groups with only each group's rank 0 in the pool (an InferencePool that lists one
    port per pod): the other ranks run, in lockstep, but get no traffic."""

    def _write_endpoints(self, entries: list[dict[str, object]]) -> None:
        hidden = {("127.0.0.1", e["port"]) for e in entries if e.get("rank")}
        self.endpoints = [e for e in self.endpoints if e not in hidden]
        self.prefill_endpoints = [e for e in self.prefill_endpoints if e not in hidden]
        super()._write_endpoints([e for e in entries if not e.get("rank")])


def run_setup(setup: Setup, workdir: Path, args: argparse.Namespace, w: Workload, prefixes: Sequence[str],
              pd_groups: tuple[int, int] | None = None) -> Run:
    workdir.mkdir(parents=True, exist_ok=True)
    epp_args = setup.epp_args
    if setup.config_text is not None:
        path = workdir / "config.yaml"
        path.write_text(setup.config_text)
        epp_args = ("--config-file", str(path))
    rank_args = ("--time-scale", str(args.time_scale), "--num-gpu-blocks", str(args.blocks))
    if pd_groups is None:
        opts = StackOptions(workdir=workdir, model=MODEL, epp_args=epp_args, envoy_concurrency=1, sim_args=rank_args,
                            dp_groups=args.groups, dp_size=args.size)
    else:
        opts = StackOptions(workdir=workdir, model=MODEL, epp_args=epp_args, envoy_concurrency=1, sim_args=rank_args,
                            pd=PdPool(prefill=pd_groups[0], decode=pd_groups[1], dp_size=args.size,
                                      prefill_sim_args=("--num-gpu-blocks", str(args.prefill_blocks or 1000))))
    stack = (Rank0Stack if setup.rank0_only else LocalStack)(opts)
    stack.start()
    try:
        ranks = {g: [f"http://127.0.0.1:{p}" for p in ports] for g, ports in stack.dp_sim_ports.items()}
        return asyncio.run(drive(stack, setup, w, prefixes, args.clients, args.duration, args.grace, args.seed, ranks))
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wide_ep", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs")
    p.add_argument("--groups", type=int, default=2, help="DP groups (default 4)")
    p.add_argument("--size", type=int, default=4, help="ranks per group (default 4)")
    p.add_argument("--clients", type=int, default=128, help="closed-loop clients (default 128)")
    p.add_argument("--duration", type=float, default=None, help="seconds of traffic per setup (default 15, quick 8)")
    p.add_argument("--time-scale", type=float, default=4.0,
                   help="simulator time scale; >1 keeps our own CPU cost small next to simulated time (default 4)")
    p.add_argument("--blocks", type=int, default=2000,
                   help="KV blocks of 16 tokens per rank (default 2000: ~21 of the 24 prefixes fit one rank, "
                        "with nothing running)")
    p.add_argument("--prefill-blocks", type=int, default=None,
                   help="--pd: KV blocks per prefill rank (default 1000): prefill ranks hold no decode KV, so with "
                        "--blocks the prefixes would fit one of them; with 1000 they overflow one rank and fit the group")
    p.add_argument("--question-tokens", type=lambda t: tuple(int(x) for x in t.split("-")), default=None, metavar="LO-HI",
                   help="tokens of each prompt's own part after its shared prefix (default 100-400)")
    p.add_argument("--only", action="append", choices=sorted({s.name for s in (*SETUPS, *PD_SETUPS)}), help="run only this setup (repeatable)")
    p.add_argument("--pd", action="store_true",
                   help="P/D instead: half the groups prefill, half decode (decode ranks behind a DP pd-sidecar)")
    p.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="run every setup K times, interleaved, and print each round and the ratios' range (default 1)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.pd and (args.groups < 2 or args.groups % 2):
        p.error("--pd needs an even number of --groups (half prefill, half decode)")
    args.duration = args.duration or (8.0 if args.quick else 15.0)
    args.grace = 3.0 if args.quick else 8.0
    w = Workload(question_tokens=args.question_tokens) if args.question_tokens else Workload()
    prefixes = make_prefixes(w, args.seed)
    rounds: list[list[Run]] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-wide-ep-") as tmp:
        pd_groups = (args.groups // 2, args.groups // 2) if args.pd else None
        for k in range(args.repeat):
            runs: list[Run] = []
            for setup in PD_SETUPS if args.pd else SETUPS:
                if args.only and setup.name not in args.only:
                    continue
                print(f"{setup.name} (round {k + 1}) ...", file=sys.stderr)
                workdir = Path(tmp) / f"{setup.name.replace(' ', '-')}-{k}"
                runs.append(run_setup(setup, workdir, args, w, prefixes, pd_groups))
            rounds.append(runs)
    runs = [r for rs in rounds for r in rs]
    errors = Counter(s.error for r in runs for s in r.samples if s.error)
    if errors:
        print(f"errors: {dict(errors)}", file=sys.stderr)
    shape = (f"P/D: {args.groups // 2} prefill + {args.groups // 2} decode DP groups" if args.pd
             else f"aggregated: {args.groups} DP groups")
    title = (f"{shape} x {args.size} ranks (lockstep), {args.clients} clients x "
             f"{args.duration:g}s per setup; prompts: 1 of {w.prefixes} shared {w.prefix_tokens}-token prefixes + "
             f"{w.question_tokens[0]}-{w.question_tokens[1]} tokens, outputs {w.max_tokens[0]}-{w.max_tokens[1]} tokens; "
             f"{args.blocks} KV blocks per rank"
             + (f" ({args.prefill_blocks or 1000} per prefill rank)" if args.pd else "")
             + f"; simulator time x{args.time_scale}")
    for k, rs in enumerate(rounds):
        print()
        print(report(title + (f"; round {k + 1} of {len(rounds)}" if len(rounds) > 1 else ""), rs))
    if len(rounds) > 1:
        print(f"\n{rounds[0][0].setup.name} vs each, over {len(rounds)} rounds (min-max):")
        for i, r in enumerate(rounds[0][1:], 1):
            tok = [rs[0].row()["tok_s"] / rs[i].row()["tok_s"] for rs in rounds if rs[i].row()["tok_s"]]
            itl = [rs[0].row()["itl"] / rs[i].row()["itl"] for rs in rounds if rs[i].row()["itl"] == rs[i].row()["itl"]]
            print(f"  {r.setup.name}: output tok/s {min(tok):.2f}-{max(tok):.2f}x; ITL {min(itl):.2f}-{max(itl):.2f}x")
    print(f"\n(rank spread: mean over samples of max/mean running requests across a group's ranks, 1.00 = even; "
          f"busy ranks: ranks seen running anything; total {time.monotonic() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
