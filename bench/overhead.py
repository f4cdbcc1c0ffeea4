"""Overhead benchmark: what the EPP hop costs next to plain Envoy, against a no-op backend.

For each gateway -- (a) Envoy round-robin without ext_proc, (b) Envoy + EPP --strategy round-robin,
(c) Envoy + EPP default -- a closed-loop client measures requests/s at concurrency 32 and latency at
concurrency 1 (small non-streaming completions), and every process's CPU seconds per request from
/proc/<pid>/stat. The load generator runs on the same cores; its CPU is reported too.
Run: python -m bench.overhead [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
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
    seconds: float = 20.0  # throughput phase
    latency_seconds: float = 10.0  # concurrency-1 phase
    warmup_seconds: float = 2.0
    backends: int = 4


@dataclass(slots=True)
class Measured:
    name: str
    load: LoadResult
    single: LoadResult
    cpu_per_request: dict[str, float]  # process -> CPU seconds per request in the throughput phase
    busy_cores: float  # all four processes' CPU seconds / wall seconds in the throughput phase
    machine_cores: float  # every process on the machine (other users' too), same phase


CONFIGS: tuple[tuple[str, dict[str, object]], ...] = (
    ("(a) envoy direct, no EPP", {"epp": False}),
    ("(b) envoy + EPP round-robin", {"epp_args": ("--strategy", "round-robin")}),
    ("(c) envoy + EPP default", {"epp_args": ("--strategy", "default")}),
)


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


def _cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


async def measure(name: str, stack: LocalStack, backend_pid: int, s: Settings) -> Measured:
    req = request_bytes("POST", "/v1/completions", f"127.0.0.1:{stack.listen_port}", BODY, {"Content-Type": "application/json"})
    go: Callable[[int, float], object] = lambda c, secs: closed_loop(  # noqa: E731
        "127.0.0.1", stack.listen_port, req, concurrency=c, seconds=secs, max_requests=MAX_REQUESTS
    )
    await go(s.concurrency, s.warmup_seconds)  # type: ignore[misc]
    pids = {"envoy": stack.envoy_proc.popen.pid, "backend": backend_pid}  # type: ignore[union-attr]
    if stack.epp_proc is not None:
        pids["epp"] = stack.epp_proc.popen.pid
    before, machine_before = _cpu_snapshot(pids), machine_cpu_seconds()
    load: LoadResult = await go(s.concurrency, s.seconds)  # type: ignore[misc]
    after, machine_after = _cpu_snapshot(pids), machine_cpu_seconds()
    spent = {k: after[k] - before[k] for k in pids} | {"loadgen": load.cpu_s}
    single: LoadResult = await go(1, s.latency_seconds)  # type: ignore[misc]
    per_req = {k: v / max(load.ok, 1) for k, v in spent.items()}
    return Measured(name, load, single, per_req, sum(spent.values()) / load.wall_s, (machine_after - machine_before) / load.wall_s)


def run_config(name: str, extra: dict[str, object], endpoints: Path, backend_pid: int, workdir: Path, s: Settings) -> Measured:
    workdir.mkdir(parents=True)  # LocalStack only creates it when it spawns its first process
    opts = StackOptions(workdir=workdir, endpoints_file=endpoints, model=MODEL, **extra)  # type: ignore[arg-type]
    with LocalStack(opts) as stack:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(measure(name, stack, backend_pid, s))
        return uvloop.run(measure(name, stack, backend_pid, s))


def _ms(x: float) -> str:
    return f"{x * 1000:.2f}"


def summarize(results: Sequence[Measured], s: Settings) -> str:
    c = s.concurrency
    header = [
        "config", f"req/s @{c}", f"p50 @{c}", f"p99 @{c}", "p50 @1", "p99 @1",
        "EPP cpu/req", "envoy cpu/req", "backend cpu/req", "loadgen cpu/req", "cores: ours", "machine", "errors",
    ]  # fmt: skip
    rows = []
    for m in results:
        bad = sum(m.load.errors.values()) + sum(m.single.errors.values())
        bad += sum(n for st, n in (m.load.statuses + m.single.statuses).items() if st != 200)
        cpu = m.cpu_per_request
        rows.append([
            m.name, f"{m.load.rate:.0f}", _ms(percentile(m.load.latencies, 50)), _ms(percentile(m.load.latencies, 99)),
            _ms(percentile(m.single.latencies, 50)), _ms(percentile(m.single.latencies, 99)),
            _ms(cpu["epp"]) if "epp" in cpu else "-", _ms(cpu["envoy"]), _ms(cpu["backend"]), _ms(cpu["loadgen"]),
            f"{m.busy_cores:.2f}", f"{m.machine_cores:.2f}", str(bad),
        ])  # fmt: skip
    base = results[0]
    for m in results[1:]:
        rows.append([
            f"  {m.name[:3]} vs (a)", ratio(m.load.rate, base.load.rate),
            ratio(percentile(m.load.latencies, 50), percentile(base.load.latencies, 50)),
            ratio(percentile(m.load.latencies, 99), percentile(base.load.latencies, 99)),
            ratio(percentile(m.single.latencies, 50), percentile(base.single.latencies, 50)),
            ratio(percentile(m.single.latencies, 99), percentile(base.single.latencies, 99)),
            "", ratio(m.cpu_per_request["envoy"], base.cpu_per_request["envoy"]), "", "", "", "", "",
        ])  # fmt: skip
    notes = [
        "(latencies and CPU in ms; cpu/req = CPU seconds in the throughput phase / requests answered;"
        " cores: ours = envoy+EPP+backend+loadgen CPU / wall; machine = every process on the box, from /proc/stat)"
    ]
    for m in results[1:]:
        d = percentile(m.single.latencies, 50) - percentile(base.single.latencies, 50)
        notes.append(f"{m.name}: +{d * 1000:.2f} ms p50 at concurrency 1 over (a)")
    return table(header, rows) + "\n" + "\n".join(notes)


def main(argv: Sequence[str] | None = None) -> int:
    d = Settings()
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short phases (a smoke test, under a minute)")
    ap.add_argument("--concurrency", type=int, default=d.concurrency)
    ap.add_argument("--seconds", type=float, help=f"throughput phase length (default {d.seconds:g})")
    ap.add_argument("--png", default="bench-overhead.png", help="picture of the results (default %(default)s; '' for none)")
    args = ap.parse_args(argv)
    if args.quick:
        s = Settings(concurrency=args.concurrency, seconds=args.seconds or 4.0, latency_seconds=3.0, warmup_seconds=1.0)
    else:
        s = Settings(concurrency=args.concurrency, seconds=args.seconds or d.seconds)
    print(
        f"no-op backend ({s.backends} ports, one process); POST /v1/completions max_tokens 1, non-streaming; "
        f"{s.seconds:g}s at concurrency {s.concurrency}, {s.latency_seconds:g}s at concurrency 1; "
        "Envoy --concurrency 1; ext_proc FULL_DUPLEX_STREAMED both ways",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        reserved: list[ReservedPort] = []
        backend, endpoints = start_backend(Path(tmp) / "noop", s.backends, reserved)
        try:
            for i, (name, extra) in enumerate(CONFIGS):
                started = time.monotonic()
                results.append(run_config(name, extra, endpoints, backend.popen.pid, Path(tmp) / str(i), s))
                print(f"  {name}: done in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
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
