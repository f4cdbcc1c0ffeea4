"""Fault scenarios against the local stack (real Envoy, the EPP, simulators on loopback).

`python -m bench.faults [--quick]` runs each scenario under a paced load that stops by itself,
injects the fault part-way, heals it, and prints one row per scenario: requests sent, failed
(an HTTP answer other than 200), lost (no answer within the client timeout), how long after the fault
the faulty part stopped getting requests, and how long after healing it got them again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.common import table
from bench.http1 import ParseError, Parser, request_bytes
from extproc.devstack.stack import LocalStack, StackOptions

MODEL = "sim-model"
FAST_SIM = ("--time-scale", "0.02")
BODY = json.dumps({"model": MODEL, "prompt": "fault injection, please answer", "max_tokens": 2}).encode()
# Short intervals so endpoint faults are seen quickly (the defaults are 50 ms and 2 s).
FAST_SCRAPE = ("--refresh-metrics-interval", "50ms", "--metrics-staleness-threshold", "0.5s")


# -- load ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Sent:
    request_id: str
    start: float  # time.monotonic()
    end: float = math.nan
    status: int | None = None  # None: no answer (lost)
    served_by: str = ""


@dataclass
class LoadRun:
    """Paced load from a background thread: `concurrency` keep-alive connections, each sending a
    request every `period` seconds (or when the last one answers, if later), until `stop()`."""

    port: int
    concurrency: int = 4
    period: float = 0.04
    timeout: float = 5.0
    prefix: str = "load"
    body: bytes = BODY
    sent: list[Sent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> LoadRun:
        self._thread.start()
        return self

    def stop(self) -> list[Sent]:
        self._stop.set()
        self._thread.join(self.timeout + 10)
        return self.sent

    async def _main(self) -> None:
        await asyncio.gather(*(self._worker(i) for i in range(self.concurrency)))

    async def _worker(self, w: int) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        n = 0
        while not self._stop.is_set():
            rid = f"{self.prefix}-{w}-{n}"
            n += 1
            rec = Sent(rid, time.monotonic())
            self.sent.append(rec)
            try:
                if writer is None or writer.is_closing():
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                assert reader is not None
                writer.write(request_bytes("POST", "/v1/completions", "gw", self.body,
                                           {"content-type": "application/json", "x-request-id": rid}))
                msg = await asyncio.wait_for(_read_message(reader), self.timeout)
                rec.status = msg.status
                rec.served_by = msg.headers.get(b"x-served-by", b"").decode()
                if msg.headers.get(b"connection", b"").lower() == b"close":  # Envoy's local replies close
                    writer.close()
                    writer = None
            except (OSError, TimeoutError, ParseError, ConnectionError):
                if writer is not None:
                    writer.close()
                writer = None
            rec.end = time.monotonic()
            await asyncio.sleep(max(0.0, self.period - (rec.end - rec.start)))
        if writer is not None:
            writer.close()


async def _read_message(reader: asyncio.StreamReader):  # type: ignore[no-untyped-def]
    parser = Parser()
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("closed before an answer")
        msgs = parser.feed(data)
        if msgs:
            return msgs[0]


# -- a stand-in EPP that never answers -------------------------------------------------------


class _Silent(pb_grpc.ExternalProcessorServicer):
    def Process(self, request_iterator, context):  # noqa: N802
        for _ in request_iterator:  # read until Envoy gives up on the stream; answer nothing
            pass
        return iter(())


@contextmanager
def hanging_epp(port: int, health_port: int) -> Iterator[None]:
    """An ext_proc server on `port` that accepts streams and never answers, healthy on `health_port`
    (so Envoy keeps sending to it): the EPP 'slow past its deadline'."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    pb_grpc.add_ExternalProcessorServicer_to_server(_Silent(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    hs = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    for name in ("", "readiness", "liveness", "envoy.service.ext_proc.v3.ExternalProcessor"):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, hs)
    hs.add_insecure_port(f"127.0.0.1:{health_port}")
    server.start()
    hs.start()
    try:
        yield
    finally:
        server.stop(0)
        hs.stop(0)


# -- scenarios ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    scenario: str
    sent: int
    failed: int
    lost: int
    isolated_s: float = math.nan  # fault -> the faulty part's last new request
    recovered_s: float = math.nan  # heal -> its first new request
    statuses: dict[int, int] = field(default_factory=dict)

    def row(self) -> list[str]:
        def s(v: float) -> str:
            return "-" if math.isnan(v) else f"{v:.2f} s"

        codes = ",".join(f"{k}x{v}" for k, v in sorted(self.statuses.items()) if k != 200) or "-"
        return [self.scenario, str(self.sent), str(self.failed), str(self.lost), codes, s(self.isolated_s), s(self.recovered_s)]


HEADER = ["scenario", "sent", "failed", "lost", "non-200", "isolated after", "recovered after"]


def _summary(name: str, sent: list[Sent]) -> Result:
    done = [r for r in sent if not math.isnan(r.end)]
    statuses: dict[int, int] = {}
    for r in done:
        if r.status is not None:
            statuses[r.status] = statuses.get(r.status, 0) + 1
    failed = sum(1 for r in done if r.status is not None and r.status != 200)
    lost = sum(1 for r in done if r.status is None)
    return Result(name, len(done), failed, lost, statuses=statuses)


def _access_log(stack: LocalStack) -> dict[str, dict[str, str]]:
    time.sleep(0.3)  # Envoy flushes its access log every 100 ms
    return {e["request_id"]: e for e in stack.access_log()}


def _stack(tmp: Path, name: str, **kw) -> LocalStack:  # type: ignore[no-untyped-def]
    kw.setdefault("sims", 2)
    kw.setdefault("sim_args", FAST_SIM)
    kw.setdefault("model", MODEL)
    return LocalStack(StackOptions(workdir=tmp / name, **kw))


def _kill_epp(stack: LocalStack) -> None:
    assert stack.epp_proc is not None
    os.killpg(stack.epp_proc.popen.pid, signal.SIGKILL)
    stack.epp_proc.popen.wait(5)
    stack.procs.remove(stack.epp_proc)
    stack.epp_proc = None


def epp_outage(tmp: Path, *, fail_open: bool, body_mode: str, how: str, seconds: float) -> Result:
    """The EPP goes away under load (how: 'kill' = SIGKILL, 'stop' = SIGTERM with a shutdown delay
    past Envoy's health-check interval, 'hang' = replaced by a server that never answers) and comes
    back. Recovery: from the EPP serving again to the first request it routes."""
    name = f"EPP {how}, {'FailOpen' if fail_open else 'FailClose'}, {body_mode.lower().replace('_streamed', '')}"
    epp_args = ("--shutdown-delay", "1.5s") if how == "stop" else ()
    response_mode = "STREAMED" if body_mode == "BUFFERED" else "FULL_DUPLEX_STREAMED"
    with _stack(tmp, f"epp-{how}-{fail_open}-{body_mode}", failure_mode_allow=fail_open, request_body_mode=body_mode,
                response_body_mode=response_mode, epp_args=epp_args, message_timeout="1s") as s:
        load = LoadRun(s.listen_port).start()
        time.sleep(seconds * 0.2)
        fault_at = time.monotonic()
        if how == "kill":
            _kill_epp(s)
            time.sleep(seconds * 0.4)
        elif how == "stop":
            s.stop_epp()
            time.sleep(seconds * 0.4)
        else:
            _kill_epp(s)
            with hanging_epp(s.epp_port, s.epp_health_port):
                time.sleep(seconds * 0.4)
        s.start_epp()
        back_at = time.monotonic()
        time.sleep(max(seconds * 0.4, 2.5))  # Envoy's health check (1 s) and ejection (<= 1 s) must see it back
        sent = load.stop()
        log = _access_log(s)
    res = _summary(name, sent)
    routed = [r.start for r in sent if log.get(r.request_id, {}).get("destination")]
    res.recovered_s = min((t for t in routed if t >= back_at), default=math.nan) - back_at
    return res


def endpoint_fault(tmp: Path, *, fault: str, override_host: bool, seconds: float) -> Result:
    """One of two endpoints fails under load (fault: 'kill', 'error' = 503 to everything, 'hang',
    'garbage-metrics') and heals ('kill' restarts nothing: healing is not measured)."""
    name = f"endpoint {fault}" + (", fallbacks" if override_host else "")
    epp_args = ("--strategy", "round-robin", *FAST_SCRAPE)
    if override_host:
        epp_args += ("--max-num-endpoints", "2")
    with _stack(tmp, f"ep-{fault}-{override_host}", epp_args=epp_args, override_host=override_host) as s:
        victim = f"127.0.0.1:{s.sim_ports[0]}"
        # A hung endpoint holds each request sent to it until the client gives up: more connections
        # at the same rate keep the load going meanwhile.
        load = (LoadRun(s.listen_port, concurrency=16, period=0.16, timeout=2.0) if fault == "hang"
                else LoadRun(s.listen_port, timeout=3.0)).start()
        time.sleep(seconds * 0.2)
        fault_at = time.monotonic()
        if fault == "kill":
            s.procs[0].stop()
        else:
            _sim_fault(victim, fault)
        time.sleep(seconds * 0.5)
        heal_at = time.monotonic()
        if fault != "kill":
            _sim_fault(victim, "none")
        time.sleep(max(seconds * 0.3, 1.0))
        sent = load.stop()
        log = _access_log(s)
    res = _summary(name, sent)
    to_victim = [r.start for r in sent if log.get(r.request_id, {}).get("destination", "").split(",")[0] == victim]
    res.isolated_s = max((t for t in to_victim if fault_at <= t < heal_at), default=fault_at) - fault_at
    if fault != "kill":
        res.recovered_s = min((t for t in to_victim if t >= heal_at), default=math.nan) - heal_at
    return res


def _sim_fault(address: str, mode: str) -> None:
    req = urllib.request.Request(f"http://{address}/sim/fault", data=json.dumps({"mode": mode}).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


SCENARIOS: dict[str, Callable[[Path, float], Result]] = {
    "epp-kill-open-buffered": lambda t, s: epp_outage(t, fail_open=True, body_mode="BUFFERED", how="kill", seconds=s),
    "epp-kill-open-duplex": lambda t, s: epp_outage(t, fail_open=True, body_mode="FULL_DUPLEX_STREAMED", how="kill", seconds=s),
    "epp-stop-open-duplex": lambda t, s: epp_outage(t, fail_open=True, body_mode="FULL_DUPLEX_STREAMED", how="stop", seconds=s),
    "epp-hang-open-buffered": lambda t, s: epp_outage(t, fail_open=True, body_mode="BUFFERED", how="hang", seconds=s),
    "epp-kill-close-duplex": lambda t, s: epp_outage(t, fail_open=False, body_mode="FULL_DUPLEX_STREAMED", how="kill", seconds=s),
    "endpoint-kill": lambda t, s: endpoint_fault(t, fault="kill", override_host=False, seconds=s),
    "endpoint-kill-fallbacks": lambda t, s: endpoint_fault(t, fault="kill", override_host=True, seconds=s),
    "endpoint-error": lambda t, s: endpoint_fault(t, fault="error", override_host=False, seconds=s),
    "endpoint-error-fallbacks": lambda t, s: endpoint_fault(t, fault="error", override_host=True, seconds=s),
    "endpoint-hang": lambda t, s: endpoint_fault(t, fault="hang", override_host=False, seconds=s),
    "endpoint-garbage-metrics": lambda t, s: endpoint_fault(t, fault="garbage-metrics", override_host=False, seconds=s),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter runs (about a minute in all)")
    p.add_argument("--seconds", type=float, default=None, help="load per scenario (default 6, --quick 3)")
    p.add_argument("-k", dest="only", default="", help="run only scenarios whose key contains this")
    args = p.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 6.0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="llm-epp-faults-") as tmp:
        for key, run in SCENARIOS.items():
            if args.only and args.only not in key:
                continue
            res = run(Path(tmp), seconds)
            print(f"{key}: {res.row()}", flush=True)
            rows.append(res.row())
    print()
    print(table(HEADER, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
