"""EPP replicas: do two active-active replicas that share route as well as one?

The shared-prefix and B2B workloads of bench.quality (same seeded requests) are replayed through real
Envoy in front of the same simulated pool, three ways: one EPP; two EPP replicas that share their picks
and load (`epp serve --peers`, extproc.peers); two replicas that do not (each learns only the traffic
Envoy sends it). Envoy spreads the ext_proc streams over the replicas with LEAST_REQUEST. Printed per
workload: the pool's prefix-cache hit rate (the simulators' cached prompt tokens over prompt tokens),
TTFT p50/p90, ratios against one replica, and for the sharing run each replica's sync traffic
(serialized bytes it sent, scaled to 1,000 req/s through the fleet), the entries it holds and the
latency observations it made and counted from its peer (extproc.peers.latency), and its blind picks:
picks of a prefix made after a peer's pick of it, before that pick arrived (SyncStats.blind_picks_*;
"split" when they went to different endpoints, where one replica would likely have chosen the same).

    python -m bench.replicas [--quick] [--workload shared_prefix|b2b] [--strategy best] [--repeat N]

With --repeat N every setup runs N times (interleaved: 1, 2 sharing, 2 not sharing, 1, ...) and a last
table gives each setup's mean and range, so the single replica's own run-to-run spread shows next to
the gap between the setups.

Goal (issue 18): 2 sharing replicas reach at least 0.95x the single replica's hit rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import quality
from bench.common import mean, percentile, ratio, table
from bench.routing import MODEL
from extproc.devstack.stack import LocalStack, StackOptions

WORKLOADS = ("shared_prefix", "b2b")


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    replicas: int
    share: bool


SETUPS = (Setup("1 replica", 1, True), Setup("2 sharing", 2, True), Setup("2 not sharing", 2, False))


@dataclass(slots=True)
class Run:
    setup: Setup
    result: quality.Result
    replicas: list[dict[str, Any]] = field(default_factory=list)  # each replica's /debug/runtime


def _runtime(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/runtime", timeout=5) as r:
        return json.load(r)  # type: ignore[no-any-return]


def run_setup(sc: quality.Scenario, setup: Setup, strategy: str, timeout: float) -> Run:
    with tempfile.TemporaryDirectory(prefix=f"bench-replicas-{sc.name}-") as tmp:
        opts = StackOptions(
            workdir=Path(tmp), sims=sc.sims, sim_args=sc.sim_args, model=MODEL, epp_args=("--strategy", strategy),
            envoy_concurrency=2, epp_replicas=setup.replicas, epp_share=setup.share,
        )  # fmt: skip
        t = time.monotonic()
        with LocalStack(opts) as stack:
            result = asyncio.run(quality.drive(stack, strategy, sc, timeout))
            time.sleep(0.3)  # the last batch reaches the peers
            ports = [r.admin_port for r in stack.epp_replicas] or [stack.epp_admin_port]
            views = [_runtime(p) for p in ports]
        print(f"  {sc.name} / {setup.name}: done in {time.monotonic() - t:.0f}s", file=sys.stderr, flush=True)
    return Run(setup, result, views)


def _ms(x: float) -> str:
    return quality._ms(x)


def _stats(run: Run) -> dict[str, float]:
    ttfts = [o.ttft for o in run.result.outcomes if o.error is None and o.ttft is not None]
    return {"hit": run.result.hit_rate, "p50": percentile(ttfts, 50), "p90": percentile(ttfts, 90)}


def summarize(sc: quality.Scenario, runs: Sequence[Run]) -> str:
    repeated = len({r.setup.name for r in runs}) < len(runs)
    header = ["setup", "ok", "err", "cache hit", "hit vs 1", "TTFT p50", "p90", "p50 vs 1", "p90 vs 1"]
    rows = []
    base: dict[str, float] = {}
    seen: dict[str, int] = {}
    for run in runs:
        ok = sum(1 for o in run.result.outcomes if o.error is None and o.ttft is not None)
        s = _stats(run)
        base = base or s
        seen[run.setup.name] = seen.get(run.setup.name, 0) + 1
        name = f"{run.setup.name} #{seen[run.setup.name]}" if repeated else run.setup.name
        rows.append([
            name, str(ok), str(len(run.result.outcomes) - ok), f"{100 * s['hit']:.1f}%",
            ratio(s["hit"], base["hit"]), _ms(s["p50"]), _ms(s["p90"]), ratio(s["p50"], base["p50"]), ratio(s["p90"], base["p90"]),
        ])  # fmt: skip
    lines = [f"{sc.name}: {sc.note}; {sc.sims} sims {' '.join(sc.sim_args)} (TTFT in ms)", table(header, rows)]
    sync_rows = []
    seen.clear()
    for run in runs:
        seen[run.setup.name] = seen.get(run.setup.name, 0) + 1
        if run.setup.replicas < 2 or not run.setup.share:
            continue
        requests = max(1, len(run.result.outcomes))
        for i, view in enumerate(run.replicas):
            p = view.get("peers") or {}
            name = f"{run.setup.name} #{seen[run.setup.name]}" if repeated else run.setup.name
            sync_rows.append([
                f"{name} / epp-{i}", str(p.get("records_sent", 0)), str(p.get("records_applied", 0)),
                f"{p.get('bytes_sent', 0) / 1024:.0f}", f"{p.get('bytes_sent', 0) * 1000 / requests / 1024:.0f}",
                str(view.get("prefix_index_size", 0)), str(p.get("journal_entries", 0)), str(p.get("journal_blocks", 0)),
                str(p.get("peer_load_entries", 0)), str(p.get("records_dropped", 0)),
                str(p.get("observations_next", 0)), str(p.get("observations_applied", 0)), str(p.get("observation_log", 0)),
                f"{p.get('blind_picks_split', 0)}/{p.get('blind_picks_same', 0)}",
            ])  # fmt: skip
    if sync_rows:
        lines.append(table(["replica", "picks sent", "peer picks applied", "KiB sent", "KiB/s at 1k req/s", "index entries",
                            "journal entries", "journal blocks", "peer load entries", "dropped", "observations",
                            "peer obs. applied", "obs. held", "blind split/same"], sync_rows))  # fmt: skip
    by_setup: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        by_setup.setdefault(run.setup.name, []).append(_stats(run))
    means = {name: {k: mean([x[k] for x in xs]) for k in ("hit", "p50", "p90")} for name, xs in by_setup.items()}
    if repeated:
        base = means[runs[0].setup.name]
        mrows = []
        for name, xs in by_setup.items():
            hits = [x["hit"] for x in xs]
            m = means[name]
            mrows.append([
                name, str(len(xs)), f"{100 * m['hit']:.1f}%", f"{100 * min(hits):.1f}-{100 * max(hits):.1f}%",
                f"{(max(hits) - min(hits)) / m['hit']:.3f}" if m["hit"] else "-", ratio(m["hit"], base["hit"]),
                _ms(m["p50"]), _ms(m["p90"]), ratio(m["p50"], base["p50"]), ratio(m["p90"], base["p90"]),
            ])  # fmt: skip
        lines.append(table(["setup (mean of runs)", "runs", "cache hit", "range", "spread / mean", "hit vs 1",
                            "TTFT p50", "p90", "p50 vs 1", "p90 vs 1"], mrows))  # fmt: skip
    if "1 replica" in means and "2 sharing" in means and means["1 replica"]["hit"]:
        one = means["1 replica"]["hit"]
        got = means["2 sharing"]["hit"] / one
        line = f"2 sharing vs 1 replica hit rate{' (means)' if repeated else ''}: {got:.3f}x (goal >= 0.95x: {'met' if got >= 0.95 else 'NOT met'})"
        if "2 not sharing" in means:
            line += f"; 2 not sharing: {means['2 not sharing']['hit'] / one:.3f}x"
        ones = [x["hit"] for x in by_setup["1 replica"]]
        if len(ones) > 1:
            line += f"; 1 replica against its own mean: {min(ones) / one:.3f}x-{max(ones) / one:.3f}x"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per workload")
    ap.add_argument("--workload", choices=WORKLOADS, action="append", help="run only this workload (repeatable)")
    ap.add_argument("--strategy", default="best", help="the EPPs' --strategy (default best)")
    ap.add_argument("--setups", default=",".join(s.name for s in SETUPS), help="comma-separated, of: " + ", ".join(s.name for s in SETUPS))
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    ap.add_argument("--repeat", type=int, default=1, help="run every setup this many times (interleaved) and report mean and range")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat: expected at least 1, got {args.repeat}")
    wanted = [s.strip() for s in args.setups.split(",") if s.strip()]
    by_name = {s.name: s for s in SETUPS}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        ap.error(f"--setups: unknown {', '.join(unknown)}; expected some of {', '.join(by_name)}")
    for name in args.workload or list(WORKLOADS):
        sc = quality.SCENARIOS[name](args.quick)
        runs = [run_setup(sc, by_name[w], args.strategy, args.timeout) for _ in range(args.repeat) for w in wanted]
        print(summarize(sc, runs), flush=True)
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
