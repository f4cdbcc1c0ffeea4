"""Flow control under overload: does holding requests in the EPP protect the important traffic and the small tenants?

A pool of slow simulators (low `--max-num-seqs`) behind real Envoy + the EPP is driven at about 2x its
capacity (measured first, in the same run) by three tenants (`x-gateway-inference-fairness-id`: one heavy
with 60% of the load, two light with 20% each), each sending two objectives (`x-gateway-inference-objective`):
`interactive` (priority 10) and `batch` (priority -1, sheddable). The same seeded arrivals are replayed
with flow control off (today's EPP: at saturation it sheds sheddable requests) and on (a config in the
shape of llm-d's flow-control guide). Printed per objective and tenant: TTFT p50/p90/p99, served /
rejected (429, 503) / evicted counts, requests that got no answer at all, the share of served tokens and
how it compares to a max-min fair share (Jain's index over tenants), queue lengths and the EPP's memory
over the run, and the issue's goals as ratios.

    python -m bench.flow_control            # ~7 min
    python -m bench.flow_control --quick    # ~2 min

A build without flow control refuses the "on" config (`epp check-config` is asked first): the table
then says why instead of giving numbers, and the run measures "off" only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from bench.common import percentile, ratio, table
from bench.routing import MODEL, _text
from extproc.devstack.stack import LocalStack, StackOptions

OBJECTIVE_HEADER = "x-gateway-inference-objective"
FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
DROPPED_HEADER = "x-llm-d-request-dropped-reason"
# The flow-control queue gauge, llm-d's name first (labels fairness_id, priority, inference_pool, ...);
# the GIE name after it. The first family present in /metrics is read, so one is never counted twice.
QUEUE_GAUGES = ("llm_d_epp_flow_control_queue_size", "inference_extension_flow_control_queue_size")
LIGHT = ("light-a", "light-b")


@dataclass(frozen=True, slots=True)
class Pool:
    sims: int = 3
    max_num_seqs: int = 4  # a small batch so a few dozen requests a second overload the pool
    # 10x slower than the gpu profile: ~84 ms decode steps, ~1.4 s per 16-token answer, so queueing
    # comes from the simulated servers and not from the 2 shared CPU cores.
    time_scale: float = 10.0

    def sim_args(self) -> tuple[str, ...]:
        return ("--profile", "gpu", "--time-scale", f"{self.time_scale:g}", "--max-num-seqs", str(self.max_num_seqs))


@dataclass(frozen=True, slots=True)
class Workload:
    duration_s: float = 120.0
    overload: float = 2.0  # offered load / measured capacity
    tenants: tuple[tuple[str, float], ...] = (("heavy", 0.6), ("light-a", 0.2), ("light-b", 0.2))
    interactive_fraction: float = 0.3  # of each tenant's requests; the rest are batch
    max_tokens: tuple[int, int] = (12, 20)
    prompt_chars: tuple[int, int] = (200, 600)
    seed: int = 1


OBJECTIVES = {"interactive": 10, "batch": -1}


@dataclass(frozen=True, slots=True)
class Planned:
    at: float  # seconds after the load starts
    objective: str
    tenant: str
    max_tokens: int
    body: bytes


@dataclass(slots=True)
class Outcome:
    objective: str
    tenant: str
    offered_tokens: int
    kind: str = "lost"  # served | rejected | evicted | cut | other | lost
    status: int | None = None  # None: no answer at all
    reason: str = ""  # x-llm-d-request-dropped-reason
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0  # completion tokens of a served request
    error: str = ""


@dataclass(slots=True)
class Sample:
    t: float  # seconds after the load starts
    sims_waiting: int
    sims_running: int
    epp_in_flight: int | None
    fc_queued: dict[str, float] | None  # priority -> queued requests; None: no flow-control gauge
    rss_kib: int | None


@dataclass(slots=True)
class RunResult:
    config: str
    available: bool = True
    why_not: str = ""  # why the config could not run
    unloaded_ttft: list[float] = field(default_factory=list)  # interactive, one at a time, before the load
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    after_drain: Sample | None = None
    wall_s: float = 0.0
    capped: int = 0  # arrivals that waited for the client's concurrency bound


# -- the workload ---------------------------------------------------------------------------------


def plan(w: Workload, rate: float) -> list[Planned]:
    """Poisson arrivals at `rate` for `duration_s`; the same list for every config."""
    rng = random.Random(w.seed)
    names = [t for t, _ in w.tenants]
    weights = [s for _, s in w.tenants]
    out: list[Planned] = []
    t = rng.expovariate(rate)
    i = 0
    while t < w.duration_s:
        tenant = rng.choices(names, weights)[0]
        objective = "interactive" if rng.random() < w.interactive_fraction else "batch"
        n = rng.randint(*w.max_tokens)
        msg = f"[{tenant} {objective} {i}] " + _text(rng, rng.randint(*w.prompt_chars))
        out.append(Planned(t, objective, tenant, n, _chat(msg, n)))
        t += rng.expovariate(rate)
        i += 1
    return out


def _chat(content: str, max_tokens: int) -> bytes:
    return json.dumps({
        "model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "stream": True, "stream_options": {"include_usage": True},
    }).encode()  # fmt: skip


def _headers(objective: str, tenant: str) -> dict[str, str]:
    h = {"content-type": "application/json", FAIRNESS_HEADER: tenant}
    if objective:
        h[OBJECTIVE_HEADER] = objective
    return h


# -- pure parts (unit tested) ---------------------------------------------------------------------


def classify(status: int | None, reason: str, completed: bool) -> str:
    """What happened to one request, from what the client saw."""
    if status is None:
        return "lost"
    if reason.startswith("evicted"):
        return "evicted"
    if status == 200:
        return "served" if completed else "cut"  # a stream that broke off after it started
    if status in (429, 503):
        return "rejected"
    return "other"


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one gets everything; nan for no values."""
    if not values:
        return math.nan
    sq = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * sq) if sq else 1.0


def fair_shares(demands: Mapping[str, float], capacity: float) -> dict[str, float]:
    """Max-min fair share of `capacity` (water-filling): nobody gets more than they asked for, and what
    the small ones leave is split evenly among the rest."""
    out = {k: 0.0 for k in demands}
    left = capacity
    pending = sorted((d, k) for k, d in demands.items() if d > 0)
    while pending and left > 1e-12:
        each = left / len(pending)
        d, k = pending[0]
        if d <= each:
            out[k] = d
            left -= d
            pending.pop(0)
        else:
            for _, k2 in pending:
                out[k2] = each
            left = 0.0
            pending = []
    return out


@dataclass(frozen=True, slots=True)
class Fairness:
    share: dict[str, float]  # tenant -> fraction of the served tokens
    ratio: dict[str, float]  # tenant -> served / max-min fair share of what was served
    jain: float  # over tenants, of served / fair share


def fairness(outcomes: Sequence[Outcome], tenants: Sequence[str]) -> Fairness:
    """How the served tokens were split between tenants, against the max-min fair split of the same
    total given what each tenant offered."""
    offered = {t: 0.0 for t in tenants}
    served = {t: 0.0 for t in tenants}
    for o in outcomes:
        offered[o.tenant] += o.offered_tokens
        if o.kind == "served":
            served[o.tenant] += o.tokens
    total = sum(served.values())
    fair = fair_shares(offered, total)
    share = {t: served[t] / total if total else math.nan for t in tenants}
    rat = {t: served[t] / fair[t] if fair[t] else math.nan for t in tenants}
    vals = [v for v in rat.values() if not math.isnan(v)]
    return Fairness(share, rat, jain(vals))


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def fc_queue_by_priority(metrics_text: str) -> dict[str, float] | None:
    """Queued requests per priority from the flow-control queue gauge (summed over flows); None when
    the EPP exposes no such gauge (a build without flow control)."""
    found: dict[str, dict[str, float]] = {}
    for line in metrics_text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE_RE.match(line)
        if m is None or m.group(1) not in QUEUE_GAUGES:
            continue
        labels = dict(_LABEL_RE.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        by = found.setdefault(m.group(1), {})
        prio = labels.get("priority", "?")
        by[prio] = by.get(prio, 0.0) + value
    for name in QUEUE_GAUGES:
        if name in found:
            return found[name]
    return None


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# -- flow-control config --------------------------------------------------------------------------


def flow_control_config(pool: Pool, ttl_s: float, eviction: bool, detector: str, holdback: float | None = None) -> str:
    """An EndpointPickerConfig in the shape of llm-d's flow-control guide: the feature gate, round-robin
    fairness between tenants in each band, FCFS within a tenant, a TTL, and a saturation detector that
    holds requests before the simulators' own queues grow (the default scheduling profile below it).
    `holdback`: a priority-holdback-policy with that minCeiling, so the lower band dispatches only while
    saturation is below it and the rest of the pool is kept for the higher one."""
    if detector == "concurrency":
        det = f"- name: detector\n  type: concurrency-detector\n  parameters: {{concurrencyMode: requests, maxConcurrency: {pool.max_num_seqs}}}\n"
    else:
        det = "- name: detector\n  type: utilization-detector\n  parameters: {queueDepthThreshold: 1, kvCacheUtilThreshold: 0.8}\n"
    hold = "" if holdback is None else f"- name: holdback\n  type: priority-holdback-policy\n  parameters: {{minCeiling: {holdback:g}}}\n"
    usage = "" if holdback is None else "  usageLimitPolicyPluginRef: holdback\n"
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
- name: fair
  type: round-robin-fairness-policy
- name: fcfs
  type: fcfs-ordering-policy
{det}{hold}schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer, weight: 2}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: max-score-picker}}
flowControl:
  defaultRequestTTL: {ttl_s:g}s
  enableEviction: {str(eviction).lower()}
  saturationDetector: {{pluginRef: detector}}
{usage}  priorityBands:
  - {{priority: {OBJECTIVES["interactive"]}, fairnessPolicyRef: fair, orderingPolicyRef: fcfs}}
  - {{priority: {OBJECTIVES["batch"]}, fairnessPolicyRef: fair, orderingPolicyRef: fcfs}}
"""


def objectives_file() -> str:
    return "".join(f"- {{name: {n}, priority: {p}}}\n" for n, p in OBJECTIVES.items())


def check_config(path: Path) -> str:
    """'' when `epp check-config` accepts the file, else its error (one line)."""
    r = subprocess.run([sys.executable, "-m", "extproc.cli", "check-config", str(path)], check=False, capture_output=True, text=True, timeout=60)
    if r.returncode == 0:
        return ""
    lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
    return (lines[-1] if lines else f"exit status {r.returncode}").removeprefix("epp: ")


# -- the client -----------------------------------------------------------------------------------


async def send(http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], o: Outcome, timeout: float) -> Outcome:
    """One streamed chat completion: TTFT at the first content chunk; `o` filled in and returned."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    completed = False
    try:
        async with http.post(url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            o.status = resp.status
            o.reason = resp.headers.get(DROPPED_HEADER, "")
            if resp.status != 200:
                await resp.read()
            else:
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        completed = True
                        break
                    chunk = json.loads(data)
                    choices = chunk.get("choices")
                    if o.ttft is None and choices and choices[0].get("delta", {}).get("content"):
                        o.ttft = loop.time() - start
                    if chunk.get("usage"):
                        o.tokens = chunk["usage"].get("completion_tokens") or 0
            o.e2e = loop.time() - start
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        o.error = type(e).__name__
    o.kind = classify(o.status, o.reason, completed)
    return o


async def _get(http: aiohttp.ClientSession, url: str, method: str = "GET") -> str:
    async with http.request(method, url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        r.raise_for_status()
        return await r.text()


async def sample(http: aiohttp.ClientSession, stack: LocalStack, t: float) -> Sample:
    waiting = running = 0
    for port in stack.sim_ports:
        s = json.loads(await _get(http, f"http://127.0.0.1:{port}/sim/stats"))
        waiting += int(s["waiting"])
        running += int(s["running"])
    try:
        in_flight = int(json.loads(await _get(http, f"http://127.0.0.1:{stack.epp_admin_port}/debug/runtime"))["in_flight"])
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
        in_flight = None
    try:
        fc = fc_queue_by_priority(await _get(http, f"http://127.0.0.1:{stack.epp_metrics_port}/metrics"))
    except (aiohttp.ClientError, TimeoutError):
        fc = None
    pid = stack.epp_proc.popen.pid if stack.epp_proc is not None else 0
    return Sample(round(max(t, 0.0), 1), waiting, running, in_flight, fc, rss_kib(pid) if pid else None)


async def _sampler(http: aiohttp.ClientSession, stack: LocalStack, t0: float, into: list[Sample], every: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            into.append(await sample(http, stack, loop.time() - t0))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            pass  # a busy simulator missed one sample; the next one will do
        await asyncio.sleep(every)


async def measure_capacity(stack: LocalStack, pool: Pool, w: Workload, seconds: float) -> tuple[float, float]:
    """Closed loop with one more request per server than its batch holds, so every server stays full:
    completions per second after a warm-up second, and the mean end-to-end time of those requests."""
    url = f"{stack.base_url}/chat/completions"
    rng = random.Random(w.seed + 100)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    done: list[tuple[float, float]] = []  # (end time, e2e)

    async def worker(k: int) -> None:
        while loop.time() - t0 < seconds:
            n = rng.randint(*w.max_tokens)
            o = Outcome("", "probe", n)
            await send(http, url, _chat(f"[capacity {k}] " + _text(rng, rng.randint(*w.prompt_chars)), n), _headers("", "probe"), o, 60)
            if o.kind == "served" and o.e2e is not None:
                done.append((loop.time() - t0, o.e2e))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:
        await asyncio.gather(*(worker(k) for k in range(pool.sims * (pool.max_num_seqs + 1))))
    window = [d for d in done if d[0] >= 1.0]
    span = max((d[0] for d in window), default=0.0) - 1.0
    rate = len(window) / span if span > 0 else math.nan
    service = sum(d[1] for d in window) / len(window) if window else math.nan
    return rate, service


async def drive(stack: LocalStack, name: str, requests: Sequence[Planned], w: Workload, calm: int, timeout: float, bound: int) -> RunResult:
    url = f"{stack.base_url}/chat/completions"
    res = RunResult(name)
    rng = random.Random(w.seed + 200)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=bound)) as http:
        for i in range(2 * len(stack.sim_ports)):  # warm Envoy's and the EPP's connections
            await send(http, url, _chat(f"warm up {i}", 1), _headers("", "warm"), Outcome("", "warm", 1), 30)
        for i in range(calm):  # the unloaded TTFT of the high priority: one at a time
            n = rng.randint(*w.max_tokens)
            o = await send(http, url, _chat(f"[calm {i}] " + _text(rng, rng.randint(*w.prompt_chars)), n),
                           _headers("interactive", LIGHT[0]), Outcome("interactive", LIGHT[0], n), timeout)  # fmt: skip
            if o.kind == "served" and o.ttft is not None:
                res.unloaded_ttft.append(o.ttft)
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.2
        sampler = asyncio.create_task(_sampler(http, stack, t0, res.samples, 1.0))
        gate = asyncio.Semaphore(bound)

        async def one(p: Planned) -> Outcome:
            await asyncio.sleep(max(0.0, t0 + p.at - loop.time()))
            if gate.locked():
                res.capped += 1
            async with gate:
                return await send(http, url, p.body, _headers(p.objective, p.tenant), Outcome(p.objective, p.tenant, p.max_tokens), timeout)

        res.outcomes = list(await asyncio.gather(*(one(p) for p in requests)))
        res.wall_s = loop.time() - t0
        sampler.cancel()
        try:
            await sampler
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(1.0)  # let the EPP settle its books, then look for leftovers
        try:
            res.after_drain = await sample(http, stack, loop.time() - t0)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            res.after_drain = None
    return res


# -- running it -----------------------------------------------------------------------------------


def stack_options(workdir: Path, pool: Pool, epp_args: Sequence[str], ttl_s: float) -> StackOptions:
    # Envoy must not cut a request the EPP holds in its queue: message_timeout above the longest TTL.
    return StackOptions(workdir=workdir, sims=pool.sims, sim_args=pool.sim_args(), model=MODEL, epp_args=tuple(epp_args),
                        envoy_concurrency=2, message_timeout=f"{ttl_s + 10:g}s")  # fmt: skip


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the report -----------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{1000 * x:.0f}"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.0f}%"


def _x(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


@dataclass(frozen=True, slots=True)
class Goals:
    unloaded_p90: float
    loaded_p90: float  # interactive, all tenants
    light_min_ratio: float  # the lower of the light tenants' served / fair share, worst band
    lost: int
    rss_start_mb: float
    rss_max_mb: float
    rss_end_mb: float

    @property
    def ttft_ratio(self) -> float:
        return self.loaded_p90 / self.unloaded_p90 if self.unloaded_p90 and not math.isnan(self.unloaded_p90) else math.nan


def goals(r: RunResult, tenants: Sequence[str]) -> Goals:
    inter = [o.ttft for o in r.outcomes if o.objective == "interactive" and o.kind == "served" and o.ttft is not None]
    ratios = []
    for obj in OBJECTIVES:
        f = fairness([o for o in r.outcomes if o.objective == obj], tenants)
        ratios += [f.ratio[t] for t in LIGHT if t in f.ratio and not math.isnan(f.ratio[t])]
    rss = [s.rss_kib / 1024 for s in r.samples if s.rss_kib is not None]
    end = r.after_drain.rss_kib / 1024 if r.after_drain and r.after_drain.rss_kib is not None else (rss[-1] if rss else math.nan)
    return Goals(
        percentile(r.unloaded_ttft, 90), percentile(inter, 90), min(ratios, default=math.nan),
        sum(o.kind == "lost" for o in r.outcomes), rss[0] if rss else math.nan, max(rss, default=math.nan), end,
    )  # fmt: skip


HEADER = ["config", "objective", "tenant", "sent", "served", "429", "503", "evicted", "cut", "other", "lost",
          "TTFT p50", "p90", "p99", "tok share", "fair ratio"]  # fmt: skip


def _row(config: str, objective: str, tenant: str, outs: Sequence[Outcome], share: float, fair: float) -> list[str]:
    ttft = [o.ttft for o in outs if o.kind == "served" and o.ttft is not None]
    rejected = [o for o in outs if o.kind == "rejected"]
    return [
        config, objective, tenant, str(len(outs)), str(sum(o.kind == "served" for o in outs)),
        str(sum(o.status == 429 for o in rejected)), str(sum(o.status == 503 for o in rejected)),
        str(sum(o.kind == "evicted" for o in outs)), str(sum(o.kind == "cut" for o in outs)),
        str(sum(o.kind == "other" for o in outs)), str(sum(o.kind == "lost" for o in outs)),
        _ms(percentile(ttft, 50)), _ms(percentile(ttft, 90)), _ms(percentile(ttft, 99)), _pct(share), _x(fair),
    ]  # fmt: skip


def summarize(results: Sequence[RunResult], tenants: Sequence[str]) -> str:
    rows: list[list[str]] = []
    for r in results:
        if not r.available:
            rows.append([r.config, "not available", *["-"] * (len(HEADER) - 2)])
            continue
        for obj in OBJECTIVES:
            outs = [o for o in r.outcomes if o.objective == obj]
            f = fairness(outs, tenants)
            for t in tenants:
                rows.append(_row(r.config, obj, t, [o for o in outs if o.tenant == t], f.share[t], f.ratio[t]))
            rows.append(_row(r.config, obj, "all", outs, math.nan, math.nan))
        rows.append(_row(r.config, "all", "all", r.outcomes, math.nan, math.nan))
    lines = [table(HEADER, rows),
             ("(TTFT in ms, client-side, first content chunk, served requests; tok share = the tenant's part of the served "
             "completion tokens of that objective; fair ratio = served / max-min fair share of those tokens given what each "
             "tenant offered; cut = a 200 whose stream broke off; lost = no answer at all)")]  # fmt: skip
    lines += [f"{r.config}: flow control: not available in this build ({r.why_not})" for r in results if not r.available]
    done = [r for r in results if r.available]
    for r in done:
        g = goals(r, tenants)
        jains = ", ".join(f"{obj} {_x(fairness([o for o in r.outcomes if o.objective == obj], tenants).jain)}" for obj in OBJECTIVES)
        lines.append(
            f"{r.config}: interactive TTFT p90 {_ms(g.loaded_p90)} ms vs {_ms(g.unloaded_p90)} unloaded = {_x(g.ttft_ratio)}x "
            f"(goal <= 2.00x); light tenants' worst fair ratio {_x(g.light_min_ratio)} (goal >= 0.80); lost {g.lost} (goal 0); "
            f"Jain {jains}, overall {_x(fairness(r.outcomes, tenants).jain)}; "
            f"EPP RSS {g.rss_start_mb:.0f} -> max {g.rss_max_mb:.0f} -> {g.rss_end_mb:.0f} MB after drain"
        )
    if len(done) == 2:
        a, b = (goals(r, tenants) for r in done)
        lines.append(f"{done[1].config} vs {done[0].config}: interactive TTFT p90 {ratio(b.loaded_p90, a.loaded_p90)}, "
                     f"light tenants' worst fair ratio {ratio(b.light_min_ratio, a.light_min_ratio)}")  # fmt: skip
    for r in done:
        lines.append(timeline(r))
    return "\n".join(lines)


def timeline(r: RunResult, points: int = 12) -> str:
    """Queue lengths and memory over the run, at about `points` evenly spaced samples."""
    s = r.samples
    if not s:
        return f"{r.config}: no samples"
    step = max(1, math.ceil(len(s) / points))
    picked = s[::step]
    lines = [f"{r.config} over time (s):  " + " ".join(f"{p.t:>5.0f}" for p in picked)]
    lines.append("  sims waiting:      " + " ".join(f"{p.sims_waiting:>5}" for p in picked))
    lines.append("  sims running:      " + " ".join(f"{p.sims_running:>5}" for p in picked))
    lines.append("  EPP in-flight:     " + " ".join(f"{'-' if p.epp_in_flight is None else p.epp_in_flight:>5}" for p in picked))
    prios = sorted({k for p in s if p.fc_queued for k in p.fc_queued}, key=lambda k: -float(k) if _num(k) else math.inf)
    if prios:
        for k in prios:
            lines.append(f"  FC queued prio {k:>3}: " + " ".join(f"{(p.fc_queued or {}).get(k, 0):>5.0f}" for p in picked))
    else:
        lines.append(f"  FC queued:         - (no {QUEUE_GAUGES[0]} in the EPP's /metrics)")
    lines.append("  EPP RSS MB:        " + " ".join(f"{'-' if p.rss_kib is None else round(p.rss_kib / 1024):>5}" for p in picked))
    d = r.after_drain
    if d is not None:
        fc = "-" if d.fc_queued is None else str(round(sum(d.fc_queued.values())))
        lines.append(f"  after drain: EPP in-flight {d.epp_in_flight}, FC queued {fc}, sims waiting {d.sims_waiting} running {d.sims_running}; "
                     f"wall {r.wall_s:.0f}s; arrivals held by the client's bound {r.capped}")  # fmt: skip
    return "\n".join(lines)


def _num(k: str) -> bool:
    try:
        float(k)
        return True
    except ValueError:
        return False


def to_json(results: Sequence[RunResult], meta: Mapping[str, object], tenants: Sequence[str]) -> dict[str, object]:
    out: dict[str, object] = {"meta": dict(meta), "configs": []}
    for r in results:
        entry: dict[str, object] = {"config": r.config, "available": r.available, "why_not": r.why_not}
        if r.available:
            g = goals(r, tenants)
            entry |= {
                "goals": asdict(g) | {"ttft_ratio": g.ttft_ratio},
                "unloaded_ttft_s": r.unloaded_ttft,
                "outcomes": [asdict(o) for o in r.outcomes],
                "samples": [asdict(s) for s in r.samples],
                "after_drain": asdict(r.after_drain) if r.after_drain else None,
                "wall_s": r.wall_s,
                "capped": r.capped,
            }
        out["configs"].append(entry)  # type: ignore[attr-defined]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    dp = Pool()
    ap = argparse.ArgumentParser(prog="python -m bench.flow_control", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 25 s load phase and a 10 s TTL (about 2 minutes in all)")
    ap.add_argument("--duration", type=float, help="seconds of load (default 120, --quick 25)")
    ap.add_argument("--ttl", type=float, help="flowControl.defaultRequestTTL in seconds (default 30, --quick 10)")
    ap.add_argument("--overload", type=float, default=2.0, help="offered load / measured capacity (default %(default)s)")
    ap.add_argument("--detector", choices=("concurrency", "utilization"), default="concurrency",
                    help="saturation detector of the 'on' config (default %(default)s: maxConcurrency = --max-num-seqs)")
    ap.add_argument("--no-eviction", action="store_true", help="flowControl.enableEviction: false in the 'on' config")
    ap.add_argument("--holdback", type=float, metavar="MIN", help="a priority-holdback-policy with minCeiling MIN: batch dispatches only below that saturation")
    ap.add_argument("--sims", type=int, default=dp.sims)
    ap.add_argument("--max-num-seqs", type=int, default=dp.max_num_seqs)
    ap.add_argument("--time-scale", type=float, default=dp.time_scale)
    ap.add_argument("--rate", type=float, help="arrivals per second instead of --overload x measured capacity")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-outstanding", type=int, default=2000, help="the client's bound on requests in flight")
    ap.add_argument("--only", choices=("off", "on"), help="run one config")
    ap.add_argument("--json", metavar="FILE", help="also write every outcome and sample as JSON")
    ap.add_argument("--print-config", action="store_true", help="print the 'on' EndpointPickerConfig and the objectives file, and exit")
    args = ap.parse_args(argv)

    pool = Pool(args.sims, args.max_num_seqs, args.time_scale)
    ttl = args.ttl if args.ttl is not None else (10.0 if args.quick else 30.0)
    w = Workload(duration_s=args.duration or (25.0 if args.quick else 120.0), overload=args.overload, seed=args.seed)
    tenants = [t for t, _ in w.tenants]
    if args.print_config:
        print(f"# flow-control.yaml\n{flow_control_config(pool, ttl, not args.no_eviction, args.detector, args.holdback)}\n# objectives.yaml\n{objectives_file()}", end="")
        return 0
    timeout = ttl + 30.0  # above the TTL plus a whole answer: a request without an answer by then is lost
    calm = 12 if args.quick else 24
    results: list[RunResult] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-flow-control-") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "objectives.yaml").write_text(objectives_file())
        (tmp / "flow-control.yaml").write_text(flow_control_config(pool, ttl, not args.no_eviction, args.detector, args.holdback))
        obj = ("--objectives", str(tmp / "objectives.yaml"))
        configs = [("off", [*obj, "--strategy", "default"]), ("on", [*obj, "--config-file", str(tmp / "flow-control.yaml")])]
        configs = [c for c in configs if args.only in (None, c[0])]
        rate = args.rate
        capacity = service = math.nan
        requests: list[Planned] = []
        for i, (name, epp_args) in enumerate(configs):
            if name == "on" and (err := check_config(tmp / "flow-control.yaml").replace(str(tmp) + "/", "")):
                results.append(RunResult(name, available=False, why_not=err))
                _log(f"  on: refused by epp check-config: {err}")
                continue
            t = time.monotonic()
            with LocalStack(stack_options(tmp / str(i), pool, epp_args, ttl)) as stack:
                if rate is None:
                    capacity, service = asyncio.run(measure_capacity(stack, pool, w, 5.0 if args.quick else 10.0))
                    rate = args.overload * capacity
                    _log(f"  capacity: {capacity:.2f} req/s (mean e2e {service:.2f} s); load {rate:.2f} req/s")
                if not requests:
                    requests = plan(w, rate)
                results.append(asyncio.run(drive(stack, name, requests, w, calm, timeout, args.max_outstanding)))
            _log(f"  {name}: done in {time.monotonic() - t:.0f}s")
    inter = sum(p.objective == "interactive" for p in requests)
    print(
        f"pool: {pool.sims} x vllm-sim {' '.join(pool.sim_args())}; capacity {capacity:.2f} req/s measured (closed loop, "
        f"{pool.sims * (pool.max_num_seqs + 1)} clients, mean e2e {service:.2f} s)\n"
        f"load: {len(requests)} streamed chats over {w.duration_s:g} s, Poisson {rate or 0:.2f} req/s (~{w.overload:g}x capacity); "
        f"tenants {', '.join(f'{t} {100 * s:.0f}%' for t, s in w.tenants)}; objectives interactive (priority "
        f"{OBJECTIVES['interactive']}) {inter}, batch (priority {OBJECTIVES['batch']}, sheddable) {len(requests) - inter}; "
        f"max_tokens {w.max_tokens[0]}-{w.max_tokens[1]}; seed {w.seed}\n"
        f"off: --strategy default; on: featureGates [flowControl], round-robin fairness, FCFS, defaultRequestTTL {ttl:g}s, "
        f"{args.detector}-detector, enableEviction {str(not args.no_eviction).lower()}"
        f"{'' if args.holdback is None else f', priority-holdback-policy minCeiling {args.holdback:g}'}; client timeout {timeout:g} s; "
        f"unloaded TTFT: {calm} interactive requests one at a time before the load",
        flush=True,
    )
    print(summarize(results, tenants))
    print(f"{time.monotonic() - started:.0f} s", flush=True)
    if args.json:
        meta = {"pool": asdict(pool), "workload": asdict(w), "rate": rate, "capacity": capacity, "capacity_mean_e2e_s": service, "ttl_s": ttl,
                "detector": args.detector, "eviction": not args.no_eviction}  # fmt: skip
        Path(args.json).write_text(json.dumps(to_json(results, meta, tenants), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
