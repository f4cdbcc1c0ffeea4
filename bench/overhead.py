"""Overhead benchmark: what the EPP hop costs next to plain Envoy, against a no-op backend.

For each gateway -- (a) Envoy round-robin without ext_proc, (b) Envoy + a no-op Python ext_proc server
(bench.noop_extproc: the gRPC/protobuf/event-loop floor, same processing mode), (c) Envoy + EPP
--strategy round-robin, (d) Envoy + EPP default, (e) the same with `--workers 2`, (f) (d) scraping the
endpoints' metrics every second instead of every 50 ms, (g) (d) with guardrails: request-limits-admitter
and content-check-admitter (bench.request_cost's policy) and the audit trail to a JSON-lines file, (h)
Envoy + EPP best (the built-in default strategy), (i) the no-op server spending 100 us of CPU in Python
per request (about what the EPP's request path costs in process, bench.request_cost --servicer): what
that much Python costs at full load whatever it does --
a closed-loop
client measures requests/s at concurrency 32 and latency at concurrency 1 (small non-streaming
completions), and every process's CPU seconds per request from /proc/<pid>/stat (the EPP's with its
worker processes). The load generator runs on the same cores; its CPU is reported too.
Run: python -m bench.overhead [--quick] [--only b,d,e] [--baseline CHECKOUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.common import cpu_seconds, machine_cpu_seconds, percentile, ratio, table
from bench.http1 import LoadResult, closed_loop, request_bytes
from bench.plots import latency_and_throughput_png, report
from extproc.devstack.ports import ReservedPort, reserve_port
from extproc.devstack.stack import LocalStack, ManagedProcess, StackOptions

MODEL = "sim-model"
BODY = json.dumps({"model": MODEL, "prompt": "Say ok", "max_tokens": 1}).encode()
MAX_REQUESTS = 500_000  # a bound on any one load loop, far above what 2 cores can do in its time


@dataclass(frozen=True, slots=True)
class Settings:
    concurrency: int = 32
    seconds: float = 10.0  # one throughput phase
    latency_seconds: float = 10.0  # concurrency-1 phase
    warmup_seconds: float = 2.0
    backends: int = 4
    # Envoy worker threads: each opens its own HTTP/2 connection to the ext_proc server, so the EPP's
    # workers (e) can all be busy at once
    envoy_concurrency: int = 2
    idle_seconds: float = 3.0  # the EPP's CPU with no traffic, before the throughput phases
    rounds: int = 3  # throughput phases per gateway, taking turns; the best of each is kept
    # and as many phases at this many requests/s, which every gateway here sustains: the ext_proc
    # servers' CPU per request compared at one load (per-message costs fall as a loop batches more)
    rate: float = 300.0


@dataclass(slots=True)
class Measured:
    name: str
    load: LoadResult
    single: LoadResult
    cpu_per_request: dict[str, float]  # process -> CPU seconds per request in the throughput phase
    busy_cores: float  # all four processes' CPU seconds / wall seconds in the throughput phase
    machine_cores: float  # every process on the machine (other users' too), same phase
    epp_cores: float = 0.0  # the ext_proc server's CPU seconds (workers included) / wall seconds, same phase
    epp_idle_cores: float = 0.0  # the same with no traffic (the EPP's scrapers and timers), measured just before
    paced: Measured | None = None  # the same gateway at Settings.rate req/s (all gateways at one load)


NOOP = "noop"  # run_all: replace the EPP with bench.noop_extproc on its ports
NOOP_ARGS = "noop_args"  # ... with these flags
GUARDRAILS = "guardrails"  # run_all: the default config plus admitters, and an audit file (docs/guardrails.md)
CONFIGS: tuple[tuple[str, dict[str, object]], ...] = (
    ("(a) envoy direct, no EPP", {"epp": False}),
    ("(b) envoy + no-op ext_proc", {NOOP: True}),
    ("(c) envoy + EPP round-robin", {"epp_args": ("--strategy", "round-robin")}),
    ("(d) envoy + EPP default", {"epp_args": ("--strategy", "default")}),
    ("(e) envoy + EPP default --workers 2", {"epp_args": ("--strategy", "default"), "epp_workers": 2}),
    # the same as (d) with the metrics scraped every second instead of every 50 ms: the scraper's cost is
    # per endpoint and second, not per request (idle cores), and at a few hundred req/s it is a share of (d)'s
    ("(f) envoy + EPP default, scrape 1s", {"epp_args": ("--strategy", "default", "--refresh-metrics-interval", "1s")}),
    ("(g) envoy + EPP default + guardrails", {GUARDRAILS: True}),
    # `best`, what `epp serve` runs without a config since 2026-12-03: the latency model's cost per pick
    ("(h) envoy + EPP best (the built-in default)", {"epp_args": ("--strategy", "best")}),
    # the no-op server with a request path as dear as the EPP's in process: what 100 us of Python per
    # request costs at full load on this machine (the event loop and gRPC batch less as each request
    # takes longer), apart from what the EPP does with it
    ("(i) envoy + no-op ext_proc + 100 us of Python per request", {NOOP: True, NOOP_ARGS: ("--burn-us", "100")}),
    # the no-op server answering as the EPP does (the routed headers answer at the body's end, with the
    # destination in envoy.lb): what the EPP's answers cost the transport, apart from its Python
    ("(j) envoy + no-op ext_proc answering as the EPP", {NOOP: True, NOOP_ARGS: ("--epp-answers",)}),
)


def with_baseline(configs: Sequence[tuple[str, dict[str, object]]], checkout: str) -> list[tuple[str, dict[str, object]]]:
    """Each EPP config followed by the same with `checkout`'s code (its directory first on the EPP's
    PYTHONPATH), named `... (baseline)`: both measured in the same turns."""
    root = Path(checkout).resolve()
    if not (root / "extproc" / "cli").is_dir():
        raise SystemExit(f"--baseline {checkout}: not an llm-epp checkout (no extproc/cli there)")
    out: list[tuple[str, dict[str, object]]] = []
    for name, extra in configs:
        out.append((name, extra))
        if extra.get("epp", True) and not extra.get(NOOP):
            env = {**dict(extra.get("extra_env", {})), "PYTHONPATH": str(root)}  # type: ignore[call-overload]
            out.append((f"{name} (baseline)", {**extra, "extra_env": env}))
    return out


def guardrails_args(workdir: Path) -> tuple[str, ...]:
    """(g)'s EPP flags: the default strategy's config with bench.request_cost's admission policy (its model
    allowed), and every request's audit record written to a file."""
    from bench.request_cost import GUARD_CONTENT, GUARD_LIMITS
    from pickers.config.strategies import strategy_config

    limits = {"rules": [{**r, "allowedModels": [MODEL]} if "allowedModels" in r else r for r in GUARD_LIMITS["rules"]]}
    admitters = yaml.safe_dump([
        {"type": "request-limits-admitter", "name": "limits", "parameters": limits},
        {"type": "content-check-admitter", "name": "content", "parameters": {"rules": GUARD_CONTENT}},
    ], sort_keys=False)  # fmt: skip
    text = strategy_config("default")
    assert "\nplugins:\n" in text
    config = workdir / "guardrails.yaml"
    config.write_text(text.replace("\nplugins:\n", "\nplugins:\n" + admitters, 1))
    return ("--config-file", str(config), "--audit-sink", "file", "--audit-file", str(workdir / "audit.jsonl"))


def start_backend(workdir: Path, n: int, reserved: list[ReservedPort]) -> tuple[ManagedProcess, Path]:
    """The no-op backend on n ports held in `reserved` until the caller closes them (ports.py), and an
    endpoints file listing them."""
    workdir.mkdir(parents=True, exist_ok=True)
    reserved.extend(reserve_port() for _ in range(n))
    ports = [r.port for r in reserved]
    log = workdir / "noop.log"
    argv = [sys.executable, "-m", "bench.noop_backend", *(a for p in ports for a in ("--port", str(p)))]
    with open(log, "ab") as f:
        popen = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    proc = ManagedProcess("noop", popen, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[-1]}/health", timeout=1):
                break
        except OSError:
            if popen.poll() is not None or time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError(f"no-op backend did not start:\n{proc.log_tail()}") from None
            time.sleep(0.05)
    path = workdir / "endpoints.yaml"
    path.write_text(yaml.safe_dump({"endpoints": [{"address": "127.0.0.1", "port": p, "name": f"noop-{i}"} for i, p in enumerate(ports)]}))
    return proc, path


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and every live process below it (the EPP's workers)."""
    total = cpu_seconds(pid)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return total
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = f.read().split()
        except OSError:
            continue
        for child in children:
            try:
                total += tree_cpu_seconds(int(child))
            except OSError:
                pass  # gone meanwhile
    return total


def _cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    snap = {name: tree_cpu_seconds(pid) if name == "epp" else cpu_seconds(pid) for name, pid in pids.items()}
    if "epp" in pids:
        snap["epp-parent"] = cpu_seconds(pids["epp"])  # with --workers: the process that makes every pick
    return snap


@dataclass(slots=True)
class Live:
    """One gateway of the run, up for the whole run: its stack and the pid whose tree is the ext_proc server."""

    name: str
    stack: LocalStack
    epp_pid: int | None

    def pids(self, backend_pid: int) -> dict[str, int]:
        pids = {"envoy": self.stack.envoy_proc.popen.pid, "backend": backend_pid}  # type: ignore[union-attr]
        if self.epp_pid is not None:
            pids["epp"] = self.epp_pid
        return pids

    def go(self, concurrency: int, seconds: float, rate: float | None = None) -> Awaitable[LoadResult]:
        port = self.stack.listen_port
        req = request_bytes("POST", "/v1/completions", f"127.0.0.1:{port}", BODY, {"Content-Type": "application/json"})
        return closed_loop("127.0.0.1", port, req, concurrency=concurrency, seconds=seconds, max_requests=MAX_REQUESTS, rate=rate)


async def throughput(g: Live, backend_pid: int, s: Settings, rate: float | None = None) -> tuple[LoadResult, dict[str, float], float]:
    """One throughput phase (at most `rate` req/s): the load, each process's CPU seconds in it, the machine's cores busy."""
    pids = g.pids(backend_pid)
    before, machine_before = _cpu_snapshot(pids), machine_cpu_seconds()
    load = await g.go(s.concurrency, s.seconds, rate)
    after, machine_after = _cpu_snapshot(pids), machine_cpu_seconds()
    spent = {k: after[k] - before[k] for k in before} | {"loadgen": load.cpu_s}
    return load, spent, (machine_after - machine_before) / load.wall_s


async def measure_all(gateways: Sequence[Live], backend_pid: int, s: Settings) -> list[Measured]:
    """Warm-up and idle CPU per gateway, then `rounds` throughput phases that take turns between the
    gateways (so the machine's noise hits all alike; the best round of each is kept: the least EPP CPU
    per request, or for Envoy alone the most requests/s), then the concurrency-1 latency phases."""
    idle: dict[str, float] = {}
    for g in gateways:
        await g.go(s.concurrency, s.warmup_seconds)
        idle[g.name] = 0.0
        if g.epp_pid is not None:  # what the EPP spends per second with no request: its scrapers and timers
            t0, c0 = time.monotonic(), tree_cpu_seconds(g.epp_pid)
            await asyncio.sleep(s.idle_seconds)
            idle[g.name] = (tree_cpu_seconds(g.epp_pid) - c0) / (time.monotonic() - t0)
    best: dict[str, Measured] = {}
    paced: dict[str, Measured] = {}
    for _ in range(s.rounds):
        for g in gateways:
            for rate, kept in ((None, best), (s.rate, paced)):
                if rate is not None and g.epp_pid is None:
                    continue
                load, spent, machine = await throughput(g, backend_pid, s, rate)
                per_req = {k: v / max(load.ok, 1) for k, v in spent.items()}
                ours = sum(v for k, v in spent.items() if k != "epp-parent")
                m = Measured(g.name, load, LoadResult(), per_req, ours / load.wall_s, machine,
                             spent.get("epp", 0.0) / load.wall_s, idle[g.name])  # fmt: skip
                old = kept.get(g.name)
                if old is None or (_net(m) < _net(old) if "epp" in per_req else m.load.rate > old.load.rate):
                    kept[g.name] = m
    for g in gateways:
        best[g.name].single = await g.go(1, s.latency_seconds)
        if g.name in paced:
            best[g.name].paced = paced[g.name]
    return [best[g.name] for g in gateways]


def run_all(configs: Sequence[tuple[str, dict[str, object]]], endpoints: Path, backend_pid: int, tmp: Path, s: Settings) -> list[Measured]:
    """Every gateway up at once (each its own Envoy and ext_proc server, one backend), measured in turns."""
    with contextlib.ExitStack() as up:
        gateways = []
        for i, (name, extra) in enumerate(configs):
            started = time.monotonic()
            workdir = tmp / str(i)
            workdir.mkdir(parents=True)  # LocalStack only creates it when it spawns its first process
            extra = dict(extra)
            noop = bool(extra.pop(NOOP, False))
            noop_args = tuple(extra.pop(NOOP_ARGS, ()))  # type: ignore[arg-type]
            if extra.pop(GUARDRAILS, False):
                extra["epp_args"] = guardrails_args(workdir)
            opts = StackOptions(workdir=workdir, endpoints_file=endpoints, model=MODEL, envoy_concurrency=s.envoy_concurrency, **extra)  # type: ignore[arg-type]
            stack = up.enter_context(LocalStack(opts))
            pid = stack.epp_proc.popen.pid if stack.epp_proc is not None else None
            if noop:
                proc = _replace_with_noop(stack, workdir, noop_args)
                up.callback(proc.stop)
                pid = proc.popen.pid
            gateways.append(Live(name, stack, pid))
            print(f"  {name}: up in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
        try:
            import uvloop
        except ImportError:
            return asyncio.run(measure_all(gateways, backend_pid, s))
        return uvloop.run(measure_all(gateways, backend_pid, s))


def _replace_with_noop(stack: LocalStack, workdir: Path, args: Sequence[str] = ()) -> ManagedProcess:
    """Stop the stack's EPP and serve its ports with the no-op ext_proc server; back once Envoy routes through it."""
    port, health = stack.epp_port, stack.epp_health_port
    stack.stop_epp()
    host, dest_port = stack.serving_endpoints[0]
    argv = [sys.executable, "-m", "bench.noop_extproc", "--port", str(port), "--health-port", str(health),
            "--destination", f"{host}:{dest_port}", *args]  # fmt: skip
    log = workdir / "noop-extproc.log"
    with open(log, "ab") as f:
        popen = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    proc = ManagedProcess("noop-extproc", popen, log)
    deadline = time.monotonic() + 60
    while True:  # Envoy's health check sees it within a second or two
        try:
            req = urllib.request.Request(f"{stack.base_url}/completions", data=BODY, headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if popen.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"no-op ext_proc server did not serve:\n{proc.log_tail()}")
        time.sleep(0.1)


def _net(m: Measured) -> float:
    """The ext_proc server's CPU per request less its idle rate over the phase (per second, not per request)."""
    return max(0.0, m.cpu_per_request["epp"] - m.epp_idle_cores * m.load.wall_s / max(m.load.ok, 1))


def _ms(x: float) -> str:
    return f"{x * 1000:.2f}"


def summarize(results: Sequence[Measured], s: Settings) -> str:
    c = s.concurrency
    header = [
        "config", f"req/s @{c}", f"p50 @{c}", f"p99 @{c}", "p50 @1", "p99 @1",
        "EPP cpu/req", "vs no-op", "net of idle", "vs no-op", "EPP cores", "idle cores", "envoy cpu/req", "backend cpu/req", "loadgen cpu/req", "cores: ours", "machine",
        "errors",
    ]  # fmt: skip
    rows = []
    noop = next((m for m in results if m.name.startswith("(b)")), None)
    for m in results:
        bad = sum(m.load.errors.values()) + sum(m.single.errors.values())
        bad += sum(n for st, n in (m.load.statuses + m.single.statuses).items() if st != 200)
        cpu = m.cpu_per_request
        rows.append([
            m.name, f"{m.load.rate:.0f}", _ms(percentile(m.load.latencies, 50)), _ms(percentile(m.load.latencies, 99)),
            _ms(percentile(m.single.latencies, 50)), _ms(percentile(m.single.latencies, 99)),
            _ms(cpu["epp"]) if "epp" in cpu else "-",
            ratio(cpu["epp"], noop.cpu_per_request["epp"]) if noop is not None and "epp" in cpu and m is not noop else "-",
            _ms(_net(m)) if "epp" in cpu else "-",
            ratio(_net(m), _net(noop)) if noop is not None and "epp" in cpu and m is not noop else "-",
            f"{m.epp_cores:.2f}" if "epp" in cpu else "-", f"{m.epp_idle_cores:.2f}" if "epp" in cpu else "-",
            _ms(cpu["envoy"]), _ms(cpu["backend"]), _ms(cpu["loadgen"]), f"{m.busy_cores:.2f}", f"{m.machine_cores:.2f}", str(bad),
        ])  # fmt: skip
    base = results[0]
    for m in results[1:] if base.name.startswith("(a)") else ():
        rows.append([
            f"  {m.name[:3]} vs (a)", ratio(m.load.rate, base.load.rate),
            ratio(percentile(m.load.latencies, 50), percentile(base.load.latencies, 50)),
            ratio(percentile(m.load.latencies, 99), percentile(base.load.latencies, 99)),
            ratio(percentile(m.single.latencies, 50), percentile(base.single.latencies, 50)),
            ratio(percentile(m.single.latencies, 99), percentile(base.single.latencies, 99)),
            "", "", "", "", "", "", ratio(m.cpu_per_request["envoy"], base.cpu_per_request["envoy"]), "", "", "", "", "",
        ])  # fmt: skip
    notes = [
        "(latencies and CPU in ms; cpu/req = CPU seconds in the throughput phase / requests answered;"
        " vs no-op = EPP cpu/req over (b)'s; net of idle = less what the server spends per second with no traffic"
        " (idle cores: scrapers, timers) over the phase; EPP cores = the ext_proc server's CPU (workers included) / wall;"
        " cores: ours = envoy+EPP+backend+loadgen CPU / wall; machine = every process on the box, from /proc/stat)"
    ]
    for m in results[1:] if base.name.startswith("(a)") else ():
        d = percentile(m.single.latencies, 50) - percentile(base.single.latencies, 50)
        notes.append(f"{m.name}: +{d * 1000:.2f} ms p50 at concurrency 1 over (a)")
    return table(header, rows) + "\n" + "\n".join(notes + worker_notes(results) + guardrail_notes(results)) + "\n" + paced_table(results, s)


def guardrail_notes(results: Sequence[Measured]) -> list[str]:
    """(g) against (d): what admission and the audit trail add to the EPP's CPU per request (issue 20: <= 5%)."""
    by = {m.name[:3]: m for m in results}
    d, g = by.get("(d)"), by.get("(g)")
    if d is None or g is None:
        return []
    out = f"(g) vs (d), guardrails on vs off: EPP cpu/req {ratio(g.cpu_per_request['epp'], d.cpu_per_request['epp'])}, net of idle {ratio(_net(g), _net(d))}"
    if d.paced is not None and g.paced is not None:
        out += f"; at {d.paced.load.rate:.0f} req/s {ratio(_net(g.paced), _net(d.paced))} net of idle"
    return [out]


def paced_table(results: Sequence[Measured], s: Settings) -> str:
    """Every ext_proc server at the same load: CPU per request and against the no-op server's."""
    paced = [(m.name, m.paced) for m in results if m.paced is not None]
    noop = next((p for name, p in paced if name.startswith("(b)")), None)
    rows = []
    for name, p in paced:
        assert p is not None
        rows.append([
            name, f"{p.load.rate:.0f}", _ms(p.cpu_per_request["epp"]), _ms(_net(p)),
            ratio(_net(p), _net(noop)) if noop is not None and p is not noop else "-", f"{p.epp_cores:.2f}",
            _ms(p.cpu_per_request.get("epp-parent", 0.0)) if p.cpu_per_request.get("epp-parent", 0.0) < 0.8 * p.cpu_per_request["epp"] else "-",
            str(sum(p.load.errors.values()) + sum(n for st, n in p.load.statuses.items() if st != 200)),
        ])  # fmt: skip
    head = f"at {s.rate:g} req/s (the same load for every ext_proc server; best of {s.rounds}):"
    return head + "\n" + table(["config", "req/s", "EPP cpu/req", "net of idle", "vs no-op", "EPP cores", "parent cpu/req", "errors"], rows)


def worker_notes(results: Sequence[Measured]) -> list[str]:
    """For an EPP with workers: the parent's share of the CPU per request (every pick is its), and
    the ceilings that follow: the parent's one core, and the workers' cores."""
    notes = []
    for m in results:
        cpu = m.cpu_per_request
        parent, total = cpu.get("epp-parent", 0.0), cpu.get("epp", 0.0)
        if not parent or total - parent < 0.2 * total:
            continue  # one process
        # the idle rate (the metrics scraping, shared out to the workers, and timers) is per second, not
        # per request: off the workers' share (the parent's own idle timers are left in its share)
        workers = max(total - parent - m.epp_idle_cores * m.load.wall_s / max(m.load.ok, 1), 1e-6)
        parent = max(parent, 1e-6)
        notes.append(
            f"{m.name}: parent {parent * 1000:.2f} ms/request (the picks: its one core tops out near {1 / parent:,.0f} req/s), "
            f"workers {workers * 1000:.2f} ms/request together net of idle (one core each: {1 / workers:,.0f} req/s per worker); "
            f"16 cores, 15 workers + the parent: about {min(1 / parent, 15 / workers):,.0f} req/s"
        )
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    d = Settings()
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short phases (a smoke test, under a minute)")
    ap.add_argument("--concurrency", type=int, default=d.concurrency)
    ap.add_argument("--seconds", type=float, help=f"throughput phase length (default {d.seconds:g})")
    ap.add_argument("--rate", type=float, default=d.rate, help="the fixed load of the CPU comparison, req/s (default %(default)g)")
    ap.add_argument("--rounds", type=int, help=f"throughput phases per config, taking turns (default {d.rounds}; --quick 2)")
    ap.add_argument("--only", default="", metavar="a,b,...", help="run only these configs (letters; default all)")
    ap.add_argument("--envoy-concurrency", type=int, default=d.envoy_concurrency, help="Envoy worker threads (default %(default)s)")
    ap.add_argument("--baseline", metavar="CHECKOUT", help="also run each EPP config with another checkout's code (say main "
                    "before a change), in the same turns: before and after side by side")
    ap.add_argument("--png", default="bench-overhead.png", help="picture of the results (default %(default)s; '' for none)")
    args = ap.parse_args(argv)
    if args.quick:
        s = Settings(concurrency=args.concurrency, seconds=args.seconds or 4.0, latency_seconds=3.0, warmup_seconds=1.0,
                     envoy_concurrency=args.envoy_concurrency, idle_seconds=1.5, rounds=args.rounds or 2, rate=args.rate)  # fmt: skip
    else:
        s = Settings(concurrency=args.concurrency, seconds=args.seconds or d.seconds, envoy_concurrency=args.envoy_concurrency,
                     rounds=args.rounds or d.rounds, rate=args.rate)  # fmt: skip
    wanted = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = wanted - {name[1] for name, _ in CONFIGS}
    if unknown:
        ap.error(f"--only: no config {', '.join(sorted(unknown))} (configs a-{CONFIGS[-1][0][1]})")
    configs = [(name, extra) for name, extra in CONFIGS if not wanted or name[1] in wanted]
    if args.baseline:
        configs = with_baseline(configs, args.baseline)
    print(
        f"no-op backend ({s.backends} ports, one process); POST /v1/completions max_tokens 1, non-streaming; "
        f"{s.rounds} x {s.seconds:g}s at concurrency {s.concurrency} taking turns (best kept), {s.latency_seconds:g}s at concurrency 1; "
        f"Envoy --concurrency {s.envoy_concurrency}; ext_proc FULL_DUPLEX_STREAMED both ways",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        reserved: list[ReservedPort] = []
        backend, endpoints = start_backend(Path(tmp) / "noop", s.backends, reserved)
        try:
            results = run_all(configs, endpoints, backend.popen.pid, Path(tmp), s)
        finally:
            backend.stop()
            for r in reserved:
                r.close()
    print(summarize(results, s))
    if args.png:
        path = latency_and_throughput_png(
            args.png, f"the EPP hop: no-op backend, non-streaming, {s.seconds:g}s at concurrency {s.concurrency}",
            {m.name: m.single.latencies for m in results}, {m.name: m.load.rate for m in results},
            latency_label="latency at concurrency 1", throughput_label=f"requests / s at concurrency {s.concurrency}",
        )  # fmt: skip
        print(report(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
