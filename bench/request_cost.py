"""Per-request CPU cost of the EPP's request path without gRPC or a network: one full request life
(headers, body, pick, streamed response with usage, end) through `RequestStream` and the real
Director, repeated. Shows what the metrics, plugin timing and the latency model's feed add to each request;
with --servicer, the servicers' own loop around it against the no-op server's (in-memory streams); with
--guardrails, what admission (request-limits-admitter + content-check-admitter) and the audit trail (a
JSON-lines file, its writer thread's CPU included) add (docs/guardrails.md).
Run: python -m bench.request_cost [--requests N] [--endpoints N] [--strategy S] [--servicer] [--guardrails]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence

import grpc
import msgspec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream
from extproc.observability.audit import AuditLog
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from pickers.config.strategies import STRATEGIES, build_profile
from pickers.framework.endpoint import EndpointSpec
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import SchedulingProfile, ScoredEndpoint, WeightedScorer
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.latency.model import LatencyModel

FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED


class _NoMetrics:
    """Stands in for EppMetrics to measure the request path without any metric work."""

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *a, **k: None


def _messages(prompt: str, chunks: int) -> tuple[list[pb.ProcessingRequest], list[pb.ProcessingRequest]]:
    hs = {":path": "/v1/completions", ":method": "POST", ":authority": "gw", "content-type": "application/json",
          "authorization": "Bearer secret"}  # fmt: skip
    headers = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs.items()])
        ),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=FULL_DUPLEX, response_body_mode=FULL_DUPLEX),
    )
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": chunks, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()  # fmt: skip
    request = [headers, pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))]
    rh = [base_pb2.HeaderValue(key=":status", raw_value=b"200"), base_pb2.HeaderValue(key="content-type", raw_value=b"text/event-stream")]
    response = [pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=rh)))]
    for i in range(chunks):
        data = b'data: {"choices":[{"index":0,"text":"tok%d"}],"usage":null}\n\n' % i
        response.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=data)))
    usage = {"prompt_tokens": len(prompt) // 4, "completion_tokens": chunks, "total_tokens": len(prompt) // 4 + chunks}
    tail = b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n"
    response.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=tail, end_of_stream=True)))
    return request, response


# A typical policy: two limit rules and four content rules (three secret presets and a literal-led
# pattern); --guardrails also measures it with the card-number preset, which no literal anchors
GUARD_LIMITS = {"rules": [
    {"name": "free-tier", "objectives": ["free"], "maxPromptTokens": 4096, "maxOutputTokens": 1024},
    {"name": "catalogue", "allowedModels": ["m"], "allowedPaths": ["/v1/completions", "/v1/chat/completions"]},
]}  # fmt: skip
GUARD_CONTENT = [
    {"name": "aws-key", "preset": "aws-access-key-id"},
    {"name": "private-key", "preset": "private-key"},
    {"name": "openai-key", "preset": "openai-api-key"},
    {"name": "codename", "pattern": "Project Bluebird", "action": "flag"},
]
GUARD_CARD = {"name": "card", "preset": "card-number", "action": "flag"}
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there been one all we their has would when if so no what up more out who said do about "
         "some can my than into them only time could new very just these two may first then other any like our "
         "model request endpoint cache prompt token server gateway latency answer question summary please explain").split()


def guardrail_plugins(card: bool = False) -> list[object]:
    from pickers.config.registry import create_plugin
    from pickers.plugins.base import PluginContext

    ctx = PluginContext()
    content = {"rules": [*GUARD_CONTENT, GUARD_CARD] if card else GUARD_CONTENT}
    return [create_plugin("request-limits-admitter", "limits", GUARD_LIMITS, ctx),
            create_plugin("content-check-admitter", "content", content, ctx)]  # fmt: skip


def build_director(
    endpoints: int, strategy: str, metrics: bool, plugin_timing: bool = False, explain: bool = False, latency: bool = True,
    admission: bool = False, audit: AuditLog | None = None, card: bool = False,
) -> Director:
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"ep-{i}", f"10.0.0.{i + 1}", 8000) for i in range(endpoints))
    index = ApproxPrefixIndex()
    profile = build_profile(strategy, index, rng=random.Random(0))
    m = EppMetrics(pool_name="bench")
    if hasattr(m, "attach"):
        m.attach(ds, index)
    producers = guardrail_plugins(card) if admission else []
    scheduler = Scheduler(profile, explain=explain, timer=m.plugin_timer if plugin_timing else None, producers=producers)
    model = LatencyModel() if latency else None  # the EPP always feeds one
    if audit is not None:
        m.audit = audit
    return Director(ds, scheduler, m if metrics else _NoMetrics(), latency=model, audit=audit)  # type: ignore[arg-type]


def lives(
    chunks: int, prompt_chars: int, seed: int = 0, words: bool = False
) -> list[tuple[list[pb.ProcessingRequest], list[pb.ProcessingRequest]]]:
    """16 request lives with random prompts: numbers, or (`words`) English-like text."""
    rng = random.Random(seed)
    if words:
        prompts = []
        for _ in range(16):
            text: list[str] = []
            while sum(map(len, text)) + len(text) < prompt_chars:
                text.append(rng.choice(WORDS))
            prompts.append(" ".join(text))
    else:
        prompts = [" ".join(str(rng.randrange(10**6)) for _ in range(prompt_chars // 7)) for _ in range(16)]
    return [_messages(p, chunks) for p in prompts]


def one_round(director: Director, requests: int, plan: list[tuple[list[pb.ProcessingRequest], list[pb.ProcessingRequest]]]) -> float:
    """Microseconds of CPU per request over one round (the process's: an audit writer thread's included,
    waited for until it has written this round's records)."""
    audit = director.audit
    target = audit.written + audit.dropped + requests if audit is not None else 0
    t0 = time.process_time()
    for i in range(requests):
        req, resp = plan[i % len(plan)]
        stream = RequestStream(director)
        for m in req:
            stream.handle(m)
        for m in resp:
            stream.handle(m)
        stream.close()
    while audit is not None and audit.written + audit.dropped + audit.failed < target:
        time.sleep(0.002)  # idle: costs no CPU
    return (time.process_time() - t0) / requests * 1e6


def compare(
    directors: dict[str, Director], requests: int, chunks: int, prompt_chars: int, rounds: int = 7, words: bool = False
) -> dict[str, float]:
    """Rounds alternate between the directors (so machine noise hits all alike); the best round of each."""
    plan = lives(chunks, prompt_chars, words=words)
    best = {name: float("inf") for name in directors}
    for _ in range(rounds):
        for name, d in directors.items():
            best[name] = min(best[name], one_round(d, requests, plan))
    return best


def _metric_calls(n: int = 100_000) -> str:
    """The metric calls of one request alone, without the rest of the path: a steadier number."""
    import timeit

    from extproc.handlers.request_stream import Outcome
    from extproc.handlers.usage import Usage

    m = EppMetrics()
    usage = msgspec.json.decode(b'{"prompt_tokens":500,"completion_tokens":16,"prompt_tokens_details":{"cached_tokens":96}}', type=Usage)
    outcome = Outcome(status=200, streaming=True, usage=usage, aborted=False, served=None, duration=0.5, first_byte=0.1)
    us = timeit.timeit(lambda: (m.scheduled("m", 0.0002), m.completed("m", outcome, usage)), number=n) / n * 1e6

    class Scorer:
        type = name = category = "x"

        def score(self, request: object, cycle: object, endpoints: Sequence[object]) -> list[float]:
            return [1.0] * len(endpoints)

    class Picker:
        type = name = "p"

        def pick(self, request: object, scored: Sequence[ScoredEndpoint]) -> list[object]:
            return [scored[0].endpoint]

    ds = Datastore()
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000)])
    req = InferenceRequest("r", "/v1/completions", {})
    prof = SchedulingProfile("p", Picker(), [WeightedScorer(Scorer())])  # type: ignore[arg-type]
    plain = Scheduler(prof)
    timed = Scheduler(prof, timer=m.plugin_timer)
    direct = timeit.timeit(lambda: plain.schedule(req, ds.candidates()), number=n) / n * 1e6
    wrapped = timeit.timeit(lambda: timed.schedule(req, ds.candidates()), number=n) / n * 1e6
    wrapped = (wrapped - direct) / 2  # two plugin calls per cycle
    return (f"  the metric calls of one request alone (scheduled + completed): {us:.2f} us\n"
            f"  timing one plugin call: {wrapped:.2f} us (x the filters, scorers and picker a profile runs)")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.request_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--endpoints", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=16, help="streamed response chunks per request")
    ap.add_argument("--prompt-chars", type=int, default=2000)
    ap.add_argument("--strategy", choices=STRATEGIES, default="default")
    ap.add_argument("--guardrails", action="store_true", help="compare admission and the audit trail on vs off instead")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per director, alternating (the best of each is shown)")
    ap.add_argument("--servicer", action="store_true", help="compare the servicers' Process() over in-memory streams instead")
    args = ap.parse_args(argv)
    if args.guardrails:
        return guardrails(args)
    if args.servicer:
        return servicers(args)
    print(f"{args.requests} requests x 7 rounds (best of each), {args.endpoints} endpoints, strategy {args.strategy}, "
          f"{args.chunks} response chunks, ~{args.prompt_chars}-char prompts")  # fmt: skip
    best = compare(
        {"off": build_director(args.endpoints, args.strategy, metrics=False),
         "on": build_director(args.endpoints, args.strategy, metrics=True),
         "plugins": build_director(args.endpoints, args.strategy, metrics=True, plugin_timing=True),
         "no-latency": build_director(args.endpoints, args.strategy, metrics=True, latency=False)},
        args.requests, args.chunks, args.prompt_chars,
    )  # fmt: skip
    off, on, plugins, bare = best["off"], best["on"], best["plugins"], best["no-latency"]
    print(f"  without metrics:               {off:7.1f} us/request")
    print(f"  with metrics:                  {on:7.1f} us/request  (metrics add {on - off:+.1f} us)")
    print(f"  with metrics + plugin timing:  {plugins:7.1f} us/request  (plugin timing adds {plugins - on:+.1f} us)")
    print(f"  with metrics, no latency model:{bare:7.1f} us/request  (the latency model's record and feed: {on - bare:+.1f} us)")
    print(_metric_calls())
    return 0


class _MemoryContext:
    """A gRPC servicer context over one request life held in memory: what Process reads and writes."""

    __slots__ = ("messages", "next", "written")

    def __init__(self, messages: list[pb.ProcessingRequest]) -> None:
        self.messages, self.next, self.written = messages, 0, 0

    async def read(self) -> object:
        i = self.next
        if i == len(self.messages):
            return grpc.aio.EOF
        self.next = i + 1
        return self.messages[i]

    async def write(self, message: pb.ProcessingResponse) -> None:
        self.written += 1


def servicers(args: argparse.Namespace) -> int:
    """CPU per request of the servicers' own loop (extproc.server.runner.ExtProcServicer, with and without
    the request-body idle timeout, against bench.noop_extproc's), each over in-memory streams on uvloop:
    what a server adds around RequestStream before gRPC's own cost."""
    import uvloop

    from bench.noop_extproc import NoopServicer
    from extproc.handlers.request_stream import RequestLimits
    from extproc.server.runner import ExtProcServicer

    director = build_director(args.endpoints, args.strategy, metrics=True)
    plan = [req + resp for req, resp in lives(args.chunks, args.prompt_chars)]
    runs = {
        "EPP servicer, body idle timeout on (30 s)": ExtProcServicer(director, RequestLimits(body_idle_timeout=30.0)),
        "EPP servicer, body idle timeout off": ExtProcServicer(director, RequestLimits(body_idle_timeout=None)),
        "no-op servicer (bench.noop_extproc)": NoopServicer("10.0.0.1:8000"),
    }

    async def one(servicer: object) -> float:
        t0 = time.process_time()
        for i in range(args.requests):
            await servicer.Process(None, _MemoryContext(plan[i % len(plan)]))  # type: ignore[attr-defined]
        return (time.process_time() - t0) / args.requests * 1e6

    async def measure() -> dict[str, float]:
        best = {name: float("inf") for name in runs}
        for _ in range(args.rounds):
            for name, servicer in runs.items():
                best[name] = min(best[name], await one(servicer))
        return best

    best = uvloop.run(measure())
    print(f"{args.requests} request lives x {args.rounds} rounds (best of each), {args.endpoints} endpoints, strategy "
          f"{args.strategy}, {args.chunks} response chunks, ~{args.prompt_chars}-char prompts; CPU us per request")  # fmt: skip
    noop = best["no-op servicer (bench.noop_extproc)"]
    for name, us in best.items():
        print(f"  {name:45s} {us:7.1f}  ({us / noop:.1f}x the no-op's)")
    return 0


def guardrails(args: argparse.Namespace) -> int:
    """Admission and the audit trail on vs off, side by side in one run (docs/guardrails.md)."""
    import tempfile

    from extproc.observability.audit import AuditOptions, FileSink

    print(f"{args.requests} requests x {args.rounds} rounds (best of each), {args.endpoints} endpoints, strategy "
          f"{args.strategy}, {args.chunks} response chunks, ~{args.prompt_chars}-char prompts of English-like words; "
          "metrics and the latency model on in all")  # fmt: skip
    n, e, strategy = args.requests, args.endpoints, args.strategy
    with tempfile.TemporaryDirectory() as tmp:
        audits = [AuditLog(FileSink(f"{tmp}/audit-{i}.jsonl", max_bytes=64 << 20), AuditOptions(prompt=mode))
                  for i, mode in enumerate(("none", "none", "hash"))]  # fmt: skip
        best = compare(
            {"off": build_director(e, strategy, metrics=True),
             "admission": build_director(e, strategy, metrics=True, admission=True),
             "audit": build_director(e, strategy, metrics=True, audit=audits[0]),
             "both": build_director(e, strategy, metrics=True, admission=True, audit=audits[1]),
             "hash": build_director(e, strategy, metrics=True, admission=True, audit=audits[2]),
             "card": build_director(e, strategy, metrics=True, admission=True, card=True)},
            n, args.chunks, args.prompt_chars, rounds=args.rounds, words=True,
        )  # fmt: skip
        for a in audits:
            a.close()
        written = sum(a.written for a in audits)
        dropped = sum(a.dropped + a.failed for a in audits)
    off = best["off"]
    rows = [("guardrails off", "off"),
            ("admission (2 limit rules, 4 content rules)", "admission"),
            ("audit file alone", "audit"),
            ("admission + audit file", "both"),
            ("admission + audit file + prompt sha256", "hash"),
            ("admission + card-number preset (no audit)", "card")]  # fmt: skip
    print(f"  {'':44s} {'us/request':>10s} {'vs off':>8s}")
    for label, key in rows:
        print(f"  {label:44s} {best[key]:10.1f} {best[key] / off:8.3f}")
    print(f"  audit records written {written}, dropped or failed {dropped}")
    print(_guardrail_calls(args.prompt_chars))
    return 0


def _guardrail_calls(prompt_chars: int, n: int = 20_000) -> str:
    """The guardrails' own calls for one request, without the rest of the path (best of 5): steadier numbers."""
    import timeit

    from extproc.handlers.request_stream import Outcome, Routing
    from extproc.handlers.usage import Usage
    from extproc.observability.audit import AuditOptions
    from pickers.framework.endpoint import Endpoint

    class Null:
        def write(self, records: object, data: bytes) -> None:
            pass

        def close(self) -> None:
            pass

    rng = random.Random(0)
    words: list[str] = []
    while sum(map(len, words)) + len(words) < prompt_chars:
        words.append(rng.choice(WORDS))
    req = InferenceRequest("5d1c7e2a-0b7f-4b58-9d7e-3f7f7c1d2a90", "/v1/completions", {"x-user-id": "u-1"}, "completions", "m",
                           " ".join(words), max_tokens=16)  # fmt: skip
    eps = [Endpoint(EndpointSpec("a", "10.0.0.1", 8000))]
    limits, content = guardrail_plugins()
    audit = AuditLog(Null(), AuditOptions(client_header="x-user-id", queue_size=10**9), interval=3600)
    usage = Usage(prompt_tokens=500, completion_tokens=16, total_tokens=516)
    routing = Routing(req, "10.0.0.1:8000", eps[0], 10, profile="default")
    outcome = Outcome(200, True, usage, False, None, 0.5, 0.1)

    def best(fn: object) -> float:
        return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6  # type: ignore[arg-type]

    lim = best(lambda: limits.admit_request(req, eps))  # type: ignore[attr-defined]
    con = best(lambda: content.admit_request(req, eps))  # type: ignore[attr-defined]
    hot = best(lambda: audit.record_routed(routing, outcome, usage))
    entries = list(audit._queue)
    audit._queue.clear()
    it = iter(entries * 5)
    record = best(lambda: audit._record(next(it)))
    records = [audit._record(e) for e in entries[:1000]]
    encode = min(timeit.repeat(lambda: audit._encoder.encode_lines(records), number=20, repeat=5)) / 20 / len(records) * 1e6
    audit.close()
    return (f"  the guardrails' calls alone (best of 5 x {n}): request-limits-admitter {lim:.2f} us, content-check-admitter "
            f"{con:.2f} us, audit on the request path {hot:.2f} us, on the writer thread {record + encode:.2f} us a record "
            f"(building {record:.2f}, encoding {encode:.2f})")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
