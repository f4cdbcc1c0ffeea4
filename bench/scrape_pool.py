"""The metrics scraper at pool scale: what keeping every endpoint's metrics fresh costs the EPP.

A server process answers `GET /metrics` on N loopback ports with vLLM 0.32's exposition
(tests/fixtures/vllm-0.32-metrics.txt, ~50 KB) whose gauges and counters change on every answer, as
under load, so every body is parsed; like vLLM, it honours `name[]` at `/metrics/` (prometheus_client's
app there), not at the exact `/metrics`. Each
size is measured with the whole page (`seriesFilter: false`) and with the series filter (the default). This process runs the EPP's own `MetricsScraper` (its keep-alive
HTTP client, the vLLM parser, the datastore's update) over N endpoints at the EPP's default 50 ms
interval, on uvloop, for a few seconds per pool size (after `gc.freeze()`, as `epp serve` does once it
has started), and prints:
- scrapes/s done against the wanted N / interval, and this process's CPU per scrape and cores used;
- the metrics' age seen by a pick (sampled every 20 ms over 64 endpoints) and the event loop's lag
  (a 10 ms ticker's lateness): what a pick waits behind the scraping;
- the parts of one scrape in process: the parse of the page, and the rest of the scrape's work;
- at a size that wants more than --max-scrape-rate's default (5,000 fetches/s), the scraper with it;
- with --workers 1,2 (default), the real `epp serve` over the same ports, once per worker count: scrapes/s,
  the parent's and the workers' cores, and the metrics' age in the parent's datastore (/debug/endpoints).
  With workers, each scrapes a share of the endpoints (extproc.server.scrape_shares) and the parent only
  records what they read; `--workers 1` is one process scraping everything.
The server shares the machine's cores: where it cannot keep up, scrapes/s fall short for both codes
alike; CPU per scrape is this process's alone. --baseline CHECKOUT measures another checkout's
scraper against the same server, each size right before this one's.
Run: python -m bench.scrape_pool [--quick] [--sizes 10,100,1000] [--baseline CHECKOUT]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qsl

from bench.common import percentile, table

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vllm-0.32-metrics.txt"
VARIANTS = 64  # distinct bodies the server rotates through
INTERVAL = 0.05  # the EPP's default --refresh-metrics-interval
SIZES = (10, 100, 1_000)

# the series a busy server changes between scrapes (the parser reads all of them)
_CHANGING = re.compile(
    r"^(vllm:(?:num_requests_running|num_requests_waiting|kv_cache_usage_perc|prefix_cache_hits_total|"
    r"prefix_cache_queries_total|generation_tokens_total|prompt_tokens_total)(?:\{[^}\n]*\})?) (\S+)$",
    re.M,
)


def only(text: str, names: frozenset[str]) -> str:
    """The exposition's samples of these names, with their families' HELP and TYPE lines: what
    prometheus_client serves for `?name[]=...` (vLLM's /metrics/)."""
    kept = []
    for line in text.splitlines(keepends=True):
        if line.startswith("#"):
            parts = line.split(" ", 3)
            family = parts[2] if len(parts) > 2 else ""
            if family in names or family + "_total" in names:
                kept.append(line)
        elif line.split("{", 1)[0].split(" ", 1)[0] in names:
            kept.append(line)
    return "".join(kept)


def bodies(text: str, count: int, seed: int = 0) -> list[bytes]:
    """`count` HTTP answers of the fixture with its load series' values changed (each body differs)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):

        def value(m: re.Match[str], i: int = i) -> str:
            name = m.group(1)
            if "perc" in name:
                return f"{name} {rng.random():.6f}"
            if "total" in name:
                return f"{name} {1000.0 * (i + 1) + rng.randrange(1000)}"
            return f"{name} {float(rng.randrange(64))}"

        body = _CHANGING.sub(value, text).encode()
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: %d\r\n\r\n" % len(body)
        out.append(head + body)
    return out


class _Answers:
    """The server's answers: the whole page's variants, and per distinct `name[]` query the filtered ones."""

    def __init__(self) -> None:
        self._text = FIXTURE.read_text()
        self._by_query: dict[str, list[bytes]] = {"": bodies(self._text, VARIANTS)}
        self.turn = 0

    def next(self, target: str) -> bytes:
        path, _, query = target.partition("?")
        if not path.endswith("/"):  # as vLLM: its exact /metrics ignores the query, /metrics/ honours it
            query = ""
        answers = self._by_query.get(query)
        if answers is None:
            names = frozenset(v for k, v in parse_qsl(query) if k == "name[]")
            answers = self._by_query[query] = bodies(only(self._text, names), VARIANTS) if names else self._by_query[""]
        self.turn += 1
        return answers[self.turn % len(answers)]


class _Answer(asyncio.Protocol):
    def __init__(self, answers: _Answers) -> None:
        self._answers = answers
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        assert self._transport is not None
        while (end := self._buf.find(b"\r\n\r\n")) >= 0:
            target = self._buf[: self._buf.find(b"\r\n")].split(b" ")[1].decode()
            self._buf = self._buf[end + 4 :]
            self._transport.write(self._answers.next(target))


async def _serve(count: int) -> None:
    loop = asyncio.get_running_loop()
    answers = _Answers()
    servers = [await loop.create_server(lambda: _Answer(answers), "127.0.0.1", 0, backlog=1024) for _ in range(count)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    while await loop.run_in_executor(None, sys.stdin.readline):  # each line: how many answers so far; EOF: done
        sys.stdout.write(f"{answers.turn}\n")
        sys.stdout.flush()


def _answered(server: subprocess.Popen[str]) -> int:
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write("\n")
    server.stdin.flush()
    return int(server.stdout.readline())


def _run(coro):  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


async def scrape(ports: Sequence[int], seconds: float, series_filter: bool | None, max_rate: float | None = None) -> dict[str, float]:
    """The EPP's scraper over these ports for `seconds` (after one interval's warm-up); `series_filter`
    None: the code's default source; `max_rate`: --max-scrape-rate."""
    from extproc.datalayer.datastore import Datastore
    from extproc.datalayer.scraper import MetricsScraper
    from pickers.framework.endpoint import EndpointSpec

    ds = Datastore()
    ds.set_endpoints([EndpointSpec(name=f"ep-{i}", host="127.0.0.1", port=p) for i, p in enumerate(ports)])
    updates = [0]
    ds.on_metrics_update(lambda: updates.__setitem__(0, updates[0] + 1))
    if series_filter is None:
        scraper = MetricsScraper(ds, interval=INTERVAL, timeout=5.0)
    else:
        from pickers.plugins.datalayer.sources import DEFAULT_METRICS_SOURCE

        source = replace(DEFAULT_METRICS_SOURCE, series_filter=series_filter)
        scraper = MetricsScraper(ds, interval=INTERVAL, timeout=5.0, source=source, max_rate=max_rate)
    task = asyncio.create_task(scraper.run())
    eps = ds.candidates()
    ages: list[float] = []
    lags: list[float] = []
    rng = random.Random(1)

    async def ticker(stop: float) -> None:
        while (now := time.monotonic()) < stop:
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - now - 0.01)

    async def sampler(stop: float) -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            for ep in rng.sample(eps, min(64, len(eps))):
                ages.append(ep.metrics_age(now))

    await asyncio.sleep(2 * INTERVAL)  # every poller started and connected
    gc.collect()
    gc.freeze()  # as `epp serve` does once it has started: what lives on leaves the cyclic GC's way
    cpu, wall, done = time.process_time(), time.monotonic(), updates[0]
    stop = wall + seconds
    await asyncio.gather(ticker(stop), sampler(stop))
    cpu, wall, done = time.process_time() - cpu, time.monotonic() - wall, updates[0] - done
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    gc.unfreeze()
    ages = [a for a in ages if a != float("inf")]
    return {
        "scrapes_s": done / wall,
        "cpu_us": cpu / max(done, 1) * 1e6,
        "cores": cpu / wall,
        "age_p50": percentile(ages, 50) * 1e3,
        "age_p99": percentile(ages, 99) * 1e3,
        "lag_p99": percentile(lags, 99) * 1e3,
    }


def parts(series_filter: bool | None, rounds: int = 200) -> dict[str, float]:
    """CPU µs of one scrape's parse and datastore update, in process, of the page the scraper asks for."""
    from extproc.datalayer.datastore import Datastore
    from extproc.datalayer.scraper import MetricsScraper
    from pickers.framework.endpoint import EndpointSpec

    ds = Datastore()
    ds.set_endpoints([EndpointSpec(name="ep", host="127.0.0.1", port=1)])
    ep = ds.candidates()[0]
    scraper = MetricsScraper(ds)
    parser = scraper.parser_for(ep)
    text = FIXTURE.read_text()
    if series_filter is not False and "?" in scraper.url(ep):
        text = only(text, frozenset(getattr(parser, "names", ())))
    answers = [a.split(b"\r\n\r\n", 1)[1] for a in bodies(text, VARIANTS)]
    texts = [a.decode() for a in answers]
    t = time.process_time()
    for i in range(rounds):
        parser.parse_with_attributes(texts[i % len(texts)])
    parse = (time.process_time() - t) / rounds * 1e6
    t = time.process_time()
    for i in range(rounds):
        scraper.take(ep, answers[i % len(answers)])
    take = (time.process_time() - t) / rounds * 1e6
    return {"parse_us": parse, "take_us": take, "bytes": sum(map(len, answers)) / len(answers)}


def measure(ports: Sequence[int], seconds: float, series_filter: bool | None = None, max_rate: float | None = None) -> dict[str, object]:
    return {"run": _run(scrape(ports, seconds, series_filter, max_rate)), "parts": parts(series_filter)}


def _baseline(path: str, ports: Sequence[int], seconds: float) -> dict[str, object]:
    """The same measurement in a child process with another checkout's code first on the path (its
    default metrics source)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--json", json.dumps(list(ports)), "--seconds", str(seconds)]
    done = subprocess.run(argv, cwd=path, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the baseline at {path} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def serve_epp(server: subprocess.Popen[str], ports: Sequence[int], seconds: float, workers: int, workdir: Path) -> list[str]:
    """`epp serve --workers N` (1: one process) over these ports with no traffic: what scraping them costs
    the parent and its workers, and how old the parent's metrics are."""
    from bench.common import cpu_seconds
    from bench.overhead import tree_cpu_seconds
    from extproc.devstack.ports import reserve_port

    endpoints = workdir / f"endpoints-{len(ports)}.yaml"
    endpoints.write_text(json.dumps({"endpoints": [{"address": "127.0.0.1", "port": p, "name": f"ep-{i}"} for i, p in enumerate(ports)]}))
    reserved = [reserve_port() for _ in range(4)]
    grpc, health, metrics, admin = (r.port for r in reserved)
    for r in reserved:
        r.close()
    argv = [sys.executable, "-m", "extproc.cli", "serve", "--endpoints", str(endpoints), "--grpc-port", str(grpc),
            "--grpc-health-port", str(health), "--metrics-port", str(metrics), "--admin-port", str(admin)]  # fmt: skip
    if workers > 1:
        argv += ["--workers", str(workers)]
    log = workdir / f"epp-{len(ports)}-{workers}.log"
    with open(log, "ab") as f:
        epp = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{admin}/debug"
    try:
        deadline = time.monotonic() + 120
        while True:  # up, every endpoint scraped once, and (workers) the scraping shared out
            try:
                eps = _get(f"{base}/endpoints")["endpoints"]  # type: ignore[index]
                shares = [w["scraping"] for w in _get(f"{base}/runtime").get("workers", [])]  # type: ignore[union-attr]
                if len(eps) == len(ports) and all(e["last_scrape_age_s"] is not None for e in eps) and (workers == 1 or sum(shares) == len(ports)):
                    break
            except OSError:
                pass
            if epp.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"epp serve --workers {workers} did not start scraping:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        time.sleep(1.0)  # settled: every poller at its period
        wall, answered = time.monotonic(), _answered(server)
        parent, total = cpu_seconds(epp.pid), tree_cpu_seconds(epp.pid)
        time.sleep(seconds)
        parent, total = cpu_seconds(epp.pid) - parent, tree_cpu_seconds(epp.pid) - total
        answered, wall = _answered(server) - answered, time.monotonic() - wall
        eps = _get(f"{base}/endpoints")["endpoints"]  # type: ignore[index]
    finally:
        epp.terminate()
        try:
            epp.wait(20)
        except subprocess.TimeoutExpired:
            epp.kill()
    ages = [e["last_scrape_age_s"] * 1e3 for e in eps]
    label = "one process" if workers == 1 else f"--workers {workers}"
    return [f"{len(ports):,}, {label}", f"{len(ports) / INTERVAL:,.0f}", f"{answered / wall:,.0f}", f"{parent / wall:.2f}",
            f"{(total - parent) / wall:.2f}", f"{percentile(ages, 50):.0f} / {percentile(ages, 99):.0f}"]  # fmt: skip


def _row(label: str, n: int, m: dict[str, object]) -> list[str]:
    r: dict[str, float] = m["run"]  # type: ignore[assignment]
    p: dict[str, float] = m["parts"]  # type: ignore[assignment]
    return [label, f"{p['bytes'] / 1e3:.1f}", f"{n / INTERVAL:,.0f}", f"{r['scrapes_s']:,.0f}", f"{r['cpu_us']:.0f}", f"{r['cores']:.2f}",
            f"{r['age_p50']:.0f} / {r['age_p99']:.0f}", f"{r['lag_p99']:.1f}", f"{p['parse_us']:.0f}", f"{p['take_us']:.0f}"]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scrape_pool", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 and 100 endpoints, 3 s each")
    ap.add_argument("--sizes", help="endpoint counts, comma-separated (default 10,100,1000)")
    ap.add_argument("--seconds", type=float, help="scraping time per size (default 6, --quick 3)")
    ap.add_argument("--baseline", metavar="CHECKOUT", help="also measure another checkout's scraper, each size right before this one's")
    ap.add_argument("--workers", default="1,2", help="`epp serve` runs over each size with these worker counts (default 1,2; '' for none)")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server child: N ports
    ap.add_argument("--json", help=argparse.SUPPRESS)  # a --baseline child: scrape these ports, print JSON
    args = ap.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 6.0)
    if args.serve:
        _run(_serve(args.serve))
        return 0
    if args.json:
        json.dump(measure(json.loads(args.json), seconds), sys.stdout)
        return 0
    from pickers.plugins.datalayer.sources import DEFAULT_MAX_SCRAPE_RATE  # here: a --baseline child's code may not have it

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([10, 100] if args.quick else list(SIZES))
    rows = []
    served: list[list[str]] = []
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="bench-scrape-pool-"))
    for n in sizes:
        server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(n)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert server.stdout is not None
            ports = json.loads(server.stdout.readline())
            if args.baseline:
                rows.append(_row(f"{n:,} baseline", n, _baseline(args.baseline, ports, seconds)))
            rows.append(_row(f"{n:,} whole page", n, measure(ports, seconds, series_filter=False)))
            rows.append(_row(f"{n:,} series filter", n, measure(ports, seconds, series_filter=True)))
            if n / INTERVAL > DEFAULT_MAX_SCRAPE_RATE:
                rows.append(_row(f"{n:,} filter + rate cap", n, measure(ports, seconds, series_filter=True, max_rate=DEFAULT_MAX_SCRAPE_RATE)))
            for w in worker_counts:
                served.append(serve_epp(server, ports, seconds, w, workdir))
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(10)
    print(f"the metrics scraper: N endpoints every {INTERVAL * 1e3:.0f} ms, vLLM 0.32's ~50 KB /metrics changing every answer, "
          f"{seconds:g} s per size on uvloop")  # fmt: skip
    print(table(["endpoints, page", "KB", "wanted /s", "scrapes /s", "CPU µs / scrape", "cores", "age p50 / p99 ms",
                 "loop lag p99 ms", "parse µs", "take µs"], rows))  # fmt: skip
    print("  (whole page: seriesFilter false; series filter: the default, /metrics/?name[]= for the parser's series,")
    print("   which the server honours as vLLM does; KB: the page; CPU: this process's, the server's not")
    print("   counted; age: now - the metrics' updated_at at a pick; parse: the vLLM parser on one page; take: a")
    print("   scrape's work after the fetch: hash, parse, the datastore's update; rate cap: --max-scrape-rate's")
    print(f"   default {DEFAULT_MAX_SCRAPE_RATE:g}/s, where the pool wants more: each endpoint every endpoints/cap seconds;")
    print("   the other rows run uncapped)")
    if served:
        print(f"\n`epp serve` over the same servers, no traffic, its defaults (series filter, --max-scrape-rate {DEFAULT_MAX_SCRAPE_RATE:g} per process):")
        print(table(["endpoints, epp", "wanted /s", "scrapes /s", "parent cores", "workers' cores", "age p50 / p99 ms"], served))
        print("  (scrapes/s: the servers' answers; cores: CPU seconds / wall seconds, the parent process alone and its")
        print("   workers together; age: each endpoint's last scrape in the parent's datastore, /debug/endpoints, at the end)")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
