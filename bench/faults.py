"""Fault scenarios against the local stack (real Envoy, the EPP, simulators on loopback).

`python -m bench.faults [--quick]` runs each scenario under a paced load that stops by itself,
injects the fault part-way, heals it, and prints one row per scenario: requests sent, failed
(an HTTP answer other than 200), lost (no answer within the client timeout), how long after the fault
the faulty part stopped getting requests, and how long after healing it got them again.
The `up-*` scenarios run `epp up` itself and let its supervisor do the healing: they print how long
the dead child took to serve again and how long until requests went through it again.
The `replicas-*` scenarios run two active-active EPP replicas behind Envoy (docs/high-availability.md)
and fault one: kill -9 (restarted after a while), SIGSTOP for 10 s, a rolling restart (SIGTERM, drain,
start again, one replica after the other), a partition between the two (each keeps serving; after
healing, how long until every pick either made has reached the other). They print, per body mode, how long
requests kept failing after the fault ("errors for") and the partition's convergence time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
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
    error: str = ""  # why there was no answer: the client's exception


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
    bodies: Callable[[int], bytes] | None = None  # the n-th request's body instead of `body`
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
        await asyncio.sleep(w * self.period / self.concurrency)  # spread the connections over the period
        while not self._stop.is_set():
            rid = f"{self.prefix}-{w}-{n}"
            body = self.body if self.bodies is None else self.bodies(n * self.concurrency + w)
            n += 1
            rec = Sent(rid, time.monotonic())
            self.sent.append(rec)
            try:
                if writer is None or writer.is_closing():
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                assert reader is not None
                writer.write(request_bytes("POST", "/v1/completions", "gw", body,
                                           {"content-type": "application/json", "x-request-id": rid}))
                msg = await asyncio.wait_for(_read_message(reader), self.timeout)
                rec.status = msg.status
                rec.served_by = msg.headers.get(b"x-served-by", b"").decode()
                if msg.headers.get(b"connection", b"").lower() == b"close":  # Envoy's local replies close
                    writer.close()
                    writer = None
            except (OSError, TimeoutError, ParseError, ConnectionError) as e:
                rec.error = f"{type(e).__name__}: {e}"
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
    lost_because: dict[str, int] = field(default_factory=dict)  # the client's error -> requests lost to it

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
    because: dict[str, int] = {}
    for r in done:
        if r.status is None:
            because[r.error] = because.get(r.error, 0) + 1
    return Result(name, len(done), failed, lost, statuses=statuses, lost_because=because)


def _access_log(stack: LocalStack) -> dict[str, dict[str, str]]:
    time.sleep(0.3)  # Envoy flushes its access log every 100 ms
    return {e["request_id"]: e for e in stack.access_log()}


def _stack(tmp: Path, name: str, **kw) -> LocalStack:  # type: ignore[no-untyped-def]
    kw.setdefault("sims", 2)
    kw.setdefault("sim_args", FAST_SIM)
    kw.setdefault("model", MODEL)
    return LocalStack(StackOptions(workdir=tmp / name, **kw))


def _kill_epp(stack: LocalStack) -> None:
    """SIGKILL, as a crash; on the stack's behalf (a supervisor leaves it down until `start_epp`)."""
    stack.stop_epp(signal.SIGKILL)


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


# -- under `epp up` itself -----------------------------------------------------------------------


class UpRun:
    """`epp up` run as a user runs it, in a process of its own, so its supervisor, its reports and its
    shutdown are the real ones. Faults go to its children, found through /proc (Linux)."""

    def __init__(self, workdir: Path, args: Sequence[str] = (), sims: int = 2, sigint_ignored: bool = False) -> None:
        self.workdir = workdir
        # as a shell without job control starts `epp up &`: SIGINT ignored from the start
        self.sigint_ignored = sigint_ignored
        self.argv = [sys.executable, "-m", "extproc.cli", "up", "--port", "0", "--workdir", str(workdir),
                     "--sims", str(sims), "--time-scale", "0.02", "--model", MODEL, *args]  # fmt: skip
        self.output_path = workdir / "epp-up.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.epp_metrics_port = 0

    def __enter__(self) -> UpRun:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.output_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         preexec_fn=_ignore_sigint if self.sigint_ignored else None)  # fmt: skip
        deadline = time.monotonic() + 120
        while "Ctrl-C stops everything" not in (text := self.output()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"epp up did not start (exit code {self.proc.returncode}):\n{text}")
            time.sleep(0.1)
        self.port = int(re.search(r"OpenAI endpoint: http://127\.0\.0\.1:(\d+)/v1", text).group(1))  # type: ignore[union-attr]
        self.epp_metrics_port = int(re.search(r"EPP metrics: http://127\.0\.0\.1:(\d+)/", text).group(1))  # type: ignore[union-attr]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def reports(self) -> list[str]:
        """The supervisor's lines so far (a child died, a child is back)."""
        return [line.split(" epp up: ", 1)[1] for line in self.output().splitlines() if " epp up: " in line]

    def children(self) -> dict[int, list[str]]:
        """pid -> argv of each living child of `epp up`."""
        assert self.proc is not None
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, ...
            args = [a.decode() for a in argv if a]
            # a child between fork and exec, or exiting, can show an empty command line for a moment
            if int(fields[1]) == self.proc.pid and fields[0] != "Z" and args:
                found[int(entry.name)] = args
        return found

    def pid_of(self, name: str) -> int | None:
        """The living child called `name` (epp, envoy, sim-N), if any."""
        for pid, argv in self.children().items():
            if name == "epp" and argv[1:4] == ["-m", "extproc.cli", "serve"]:
                return pid
            if name == "envoy" and Path(argv[0]).name == "envoy":
                return pid
            if name.startswith("sim-") and "vllm_sim" in argv and argv[argv.index("--seed") + 1] == name[4:]:
                return pid
        return None

    def send(self, name: str, sig: int) -> int:
        pid = self.pid_of(name)
        assert pid is not None, f"no {name} under epp up"
        os.killpg(pid, sig)  # each child leads its own session
        return pid

    def ready_url(self, name: str) -> str:
        if name == "epp":
            return f"http://127.0.0.1:{self.epp_metrics_port}/metrics"
        if name == "envoy":
            admin = yaml.safe_load((self.workdir / "envoy.yaml").read_text())["admin"]["address"]["socket_address"]
            return f"http://127.0.0.1:{admin['port_value']}/ready"
        return f"http://127.0.0.1:{self.sim_port(int(name[4:]))}/health"

    def sim_port(self, i: int) -> int:
        entries = yaml.safe_load((self.workdir / "endpoints.yaml").read_text())["endpoints"]
        return int(next(e["port"] for e in entries if e["name"] == f"sim-{i}"))

    def wait_back(self, name: str, old_pid: int, timeout: float = 60.0) -> float:
        """Wait until a new `name` serves; returns when (time.monotonic())."""
        deadline = time.monotonic() + timeout
        url = self.ready_url(name)
        while time.monotonic() < deadline:
            pid = self.pid_of(name)
            if pid is not None and pid != old_pid and _http_ok(url):
                return time.monotonic()
            time.sleep(0.05)
        raise AssertionError(f"{name} was not restarted within {timeout:.0f} s:\n{self.output()}")

    def access_log(self) -> dict[str, dict[str, str]]:
        time.sleep(0.3)  # Envoy flushes its access log every 100 ms
        path = self.workdir / "access.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return {e["request_id"]: e for e in map(json.loads, filter(None, lines))}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Stop `epp up` as Ctrl-C (SIGINT) or `kill` (SIGTERM) would; its exit code, or None if it
        had to be killed. Raises if a child outlives it."""
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        children = list(self.children())
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            code = None
        left = [pid for pid in children if _alive(pid)]
        for pid in left:
            os.killpg(pid, signal.SIGKILL)
        if left:
            raise AssertionError(f"epp up left {len(left)} children running:\n{self.output()}")
        return code


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


UP_HEADER = ["scenario", "sent", "failed", "lost", "non-200", "slowest", "back after", "routed again after"]


@dataclass(slots=True)
class UpResult:
    scenario: str
    sent: int
    failed: int
    lost: int
    statuses: dict[int, int] = field(default_factory=dict)
    slowest_s: float = math.nan  # the longest wait for an answer (200 or not)
    back_s: float = math.nan  # fault -> the restarted child serves
    routed_s: float = math.nan  # fault (SIGSTOP: SIGCONT) -> the first request sent since then that went through it
    reports: list[str] = field(default_factory=list)

    def row(self) -> list[str]:
        def s(v: float) -> str:
            return "-" if math.isnan(v) else f"{v:.2f} s"

        codes = ",".join(f"{k}x{v}" for k, v in sorted(self.statuses.items()) if k != 200) or "-"
        return [self.scenario, str(self.sent), str(self.failed), str(self.lost), codes, s(self.slowest_s), s(self.back_s), s(self.routed_s)]


def up_fault(tmp: Path, *, fault: str, fail_open: bool = False, body_mode: str = "FULL_DUPLEX_STREAMED", seconds: float) -> UpResult:
    """Under `epp up` (2 simulators) and a paced load, a child fails: 'epp-kill', 'sim-kill' and
    'envoy-kill' send SIGKILL and leave the restart to the supervisor; 'epp-sigstop' freezes the EPP
    for `seconds * 0.4` (at least 3 s), then SIGCONT. `back after`: from the kill to the restarted
    child serving; `routed again after`: from the fault (SIGSTOP: from SIGCONT) to the first request sent
    since then that went through the part again (routed by the EPP, or served by the simulator)."""
    what, _, how = fault.partition("-")
    mode = body_mode.lower().replace("_streamed", "")
    name = f"up: {what.upper() if what == 'epp' else what} {how}" + (f", {'FailOpen' if fail_open else 'FailClose'}, {mode}" if what == "epp" else "")
    args = ["--request-body-mode", body_mode, *(["--fail-open"] if fail_open else [])]
    victim = "sim-0" if what == "sim" else what
    with UpRun(tmp / f"up-{fault}-{fail_open}-{mode}", args) as up:
        sim0 = f"127.0.0.1:{up.sim_port(0)}"
        # The usual ~100 requests/s from 200 connections: requests keep arriving while some wait on
        # a frozen EPP, as they would from independent clients.
        load = LoadRun(up.port, concurrency=200, period=2.0).start()
        time.sleep(seconds * 0.2)
        fault_at = time.monotonic()
        back_at = math.nan
        if how == "sigstop":
            up.send(victim, signal.SIGSTOP)
            time.sleep(max(seconds * 0.4, 3.0))
            up.send(victim, signal.SIGCONT)
            since = time.monotonic()
        else:
            old = up.send(victim, signal.SIGKILL)
            fault_at = since = time.monotonic()  # finding the child took a moment: the kill is now
            back_at = up.wait_back(victim, old)
        time.sleep(max(seconds * 0.4, 3.0))  # Envoy's health check (1 s) and the EPP's scrapes see it back
        sent = load.stop()
        log = up.access_log()
        reports = up.reports()
    res = _summary(name, sent)
    if what == "sim":
        through = [r.start for r in sent if r.status == 200 and log.get(r.request_id, {}).get("upstream") == sim0]
    elif what == "epp":
        through = [r.start for r in sent if log.get(r.request_id, {}).get("destination")]
    else:
        through = [r.start for r in sent if r.status == 200]
    slowest = max((r.end - r.start for r in sent if r.status is not None and not math.isnan(r.end)), default=math.nan)
    return UpResult(name, res.sent, res.failed, res.lost, res.statuses, slowest_s=slowest, back_s=back_at - fault_at,
                    routed_s=min((t for t in through if t > since), default=math.nan) - since, reports=reports)  # fmt: skip


# -- two active-active replicas ------------------------------------------------------------------


class CuttableProxy:
    """A TCP forwarder on loopback to a port looked up when a connection opens; `cut()` black-holes
    every connection (bytes are swallowed, nothing is closed: a partition, found only by keepalives)
    and `heal()` closes those so the clients reconnect."""

    def __init__(self, target_port: Callable[[], int]) -> None:
        self.target_port = target_port
        self.port = 0
        self.cut_off = False
        self._conns: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CuttableProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            if self.cut_off:
                await reader.read()  # held open, never answered
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port())
            self._conns.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            writer.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if not self.cut_off:
                    dst.write(data)
                    await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "cut_off", True)

    def heal(self) -> None:
        def _heal() -> None:
            self.cut_off = False
            for w in list(self._conns):
                w.close()
            self._conns.clear()

        self._loop.call_soon_threadsafe(_heal)

    def stop(self) -> None:
        self.heal()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _shared_prefix_bodies(n: int) -> bytes:
    """8 shared system prompts, each followed by the request's own question: picks worth sharing."""
    system = f"[tenant {n % 8}] " + "You answer questions about fault injection. " * 30
    own = f"Question {n}: " + f"{n:06d} " * 30  # ~3 blocks of its own, so every pick adds to the index
    return json.dumps({"model": MODEL, "prompt": f"{system} {own}", "max_tokens": 2}).encode()


def _runtime(port: int) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/runtime", timeout=2) as r:
        return json.load(r)  # type: ignore[no-any-return]


def _journal_positions(stack: LocalStack) -> dict[str, int]:
    """Each replica's picks so far (its journal position), by replica id."""
    views = [_runtime(r.admin_port)["peers"] for r in stack.epp_replicas]
    return {v["replica_id"]: v["journal_next"] for v in views}


def _behind(stack: LocalStack, picked: dict[str, int]) -> int:
    """Picks made by `picked` (each replica's journal position then) that have not reached the other replica;
    -1 while a replica does not answer."""
    try:
        views = [_runtime(r.admin_port)["peers"] for r in stack.epp_replicas]
    except OSError:
        return -1
    return sum(max(0, upto - v["heard_upto"].get(peer, 0)) for v in views for peer, upto in picked.items() if peer != v["replica_id"])


REPLICA_HEADER = ["scenario", "sent", "failed", "lost", "non-200", "after answer", "errors for", "picks apart", "converged after"]


@dataclass(slots=True)
class ReplicaResult:
    scenario: str
    sent: int
    failed: int
    lost: int
    statuses: dict[int, int] = field(default_factory=dict)
    errors_s: float = 0.0  # fault -> the last request (sent since) that failed or got no answer
    converged_s: float = math.nan  # partition healed -> every pick made before has reached the other replica
    behind: int = -1  # at the heal: picks either replica had not heard from the other
    # Of the failed: those whose ext_proc stream broke after the EPP had answered on it (its pick, or
    # the response passing through it), which Envoy cannot replay; the others broke before it answered
    # anything, which the stream's retry policy replays to the other replica (envoy/llm-gateway.yaml).
    after_answer: int = 0

    def row(self) -> list[str]:
        codes = ",".join(f"{k}x{v}" for k, v in sorted(self.statuses.items()) if k != 200) or "-"
        conv = "-" if math.isnan(self.converged_s) else f"{self.converged_s:.2f} s"
        apart = "-" if self.behind < 0 else str(self.behind)
        return [self.scenario, str(self.sent), str(self.failed), str(self.lost), codes, str(self.after_answer),
                f"{self.errors_s:.2f} s", apart, conv]  # fmt: skip


def replica_fault(tmp: Path, *, fault: str, body_mode: str, fail_open: bool, seconds: float) -> ReplicaResult:
    """Two sharing replicas behind Envoy under a paced load of shared-prefix requests; replica 0 (and,
    for a rolling restart, then replica 1) is faulted part-way. fault: 'kill' (SIGKILL, started again
    after seconds * 0.4), 'sigstop' (10 s, then SIGCONT), 'rolling' (SIGTERM with a drain, start
    again, wait until Envoy sends to it, the same for replica 1), 'partition' (the exchange between
    the replicas cut for seconds * 0.4, then healed)."""
    mode = "buffered" if body_mode == "BUFFERED" else "duplex"
    name = f"2 replicas: {fault}, {'FailOpen' if fail_open else 'FailClose'}, {mode}"
    response_mode = "STREAMED" if body_mode == "BUFFERED" else "FULL_DUPLEX_STREAMED"
    # The drain on SIGTERM: NOT_SERVING at once, serving on past Envoy's 1 s health check.
    epp_args = ("--shutdown-delay", "1.5s", "--grace-period", "10")
    stack = _stack(tmp, f"replicas-{fault}-{fail_open}-{mode}", failure_mode_allow=fail_open, request_body_mode=body_mode,
                   response_body_mode=response_mode, epp_args=epp_args, message_timeout="1s", epp_replicas=2)  # fmt: skip
    proxies = [CuttableProxy(lambda i=i: stack.epp_replicas[i].peer_port).start() for i in range(2)]  # type: ignore[misc]
    stack.peer_address = lambda r: f"127.0.0.1:{proxies[r.index].port}"
    converged = math.nan
    behind = -1
    try:
        with stack as s:
            load = LoadRun(s.listen_port, concurrency=8, period=0.08, bodies=_shared_prefix_bodies).start()
            time.sleep(seconds * 0.2)
            fault_at = time.monotonic()
            if fault == "kill":
                s.stop_epp_replica(0, signal.SIGKILL)
                time.sleep(seconds * 0.4)
                s.start_epp_replica(0)
            elif fault == "sigstop":
                proc = s.epp_replicas[0].proc
                assert proc is not None
                proc.kill(signal.SIGSTOP)
                time.sleep(10.0)
                proc.kill(signal.SIGCONT)
            elif fault == "rolling":
                for i in range(2):
                    s.stop_epp_replica(i, signal.SIGTERM)  # returns once it has drained and exited
                    s.start_epp_replica(i)
                    time.sleep(2.5)  # Envoy's health check (1 s) sees it serving before the next goes
            else:
                for p in proxies:
                    p.cut()
                time.sleep(seconds * 0.4)
                picked = _journal_positions(s)  # what each replica picked while cut off (and before)
                behind = _behind(s, picked)
                for p in proxies:
                    p.heal()
                healed = time.monotonic()
                deadline = healed + 30
                while time.monotonic() < deadline and _behind(s, picked) != 0:
                    time.sleep(0.05)
                converged = time.monotonic() - healed if _behind(s, picked) == 0 else math.inf
            time.sleep(max(seconds * 0.3, 2.5))
            sent = load.stop()
            access = _access_log(s)
    finally:
        for p in proxies:
            p.stop()
    res = _summary(name, sent)
    bad = [r.start for r in sent if r.start >= fault_at and (r.status is None or r.status != 200)]
    after = sum(1 for r in sent if r.status not in (None, 200) and _answered(access.get(r.request_id)))
    return ReplicaResult(name, res.sent, res.failed, res.lost, res.statuses, errors_s=max(bad, default=fault_at) - fault_at,
                         converged_s=converged, behind=behind, after_answer=after)  # fmt: skip


def _answered(entry: dict[str, str] | None) -> bool:
    """Envoy's access log says the request's ext_proc stream broke after the EPP had answered on it
    (%RESPONSE_CODE_DETAILS%: ext_proc_error_gRPC_error_..{upstream_reset_after_response_started..})."""
    return entry is not None and "after_response_started" in str(entry.get("details", ""))


SCENARIOS: dict[str, Callable[[Path, float], Result | UpResult | ReplicaResult]] = {
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
    "up-epp-kill-close-duplex": lambda t, s: up_fault(t, fault="epp-kill", seconds=s),
    "up-epp-kill-close-buffered": lambda t, s: up_fault(t, fault="epp-kill", body_mode="BUFFERED", seconds=s),
    "up-epp-kill-open-duplex": lambda t, s: up_fault(t, fault="epp-kill", fail_open=True, seconds=s),
    "up-epp-kill-open-buffered": lambda t, s: up_fault(t, fault="epp-kill", fail_open=True, body_mode="BUFFERED", seconds=s),
    "up-epp-sigstop-close-duplex": lambda t, s: up_fault(t, fault="epp-sigstop", seconds=s),
    "up-epp-sigstop-open-buffered": lambda t, s: up_fault(t, fault="epp-sigstop", fail_open=True, body_mode="BUFFERED", seconds=s),
    "up-sim-kill": lambda t, s: up_fault(t, fault="sim-kill", seconds=s),
    "up-envoy-kill": lambda t, s: up_fault(t, fault="envoy-kill", seconds=s),
    **{
        f"replicas-{fault}-{'open' if fail_open else 'close'}-{'buffered' if mode == 'BUFFERED' else 'duplex'}": (
            lambda t, s, fault=fault, mode=mode, fail_open=fail_open: replica_fault(
                t, fault=fault, body_mode=mode, fail_open=fail_open, seconds=s)
        )
        for fault in ("kill", "sigstop", "rolling", "partition")
        for mode, fail_open in (("BUFFERED", True), ("FULL_DUPLEX_STREAMED", False))
    },
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter runs (about a minute in all)")
    p.add_argument("--seconds", type=float, default=None, help="load per scenario (default 6, --quick 3)")
    p.add_argument("-k", dest="only", default="", help="run only scenarios whose key contains this")
    args = p.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 6.0)
    rows: list[list[str]] = []
    up_rows: list[list[str]] = []
    replica_rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="llm-epp-faults-") as tmp:
        for key, run in SCENARIOS.items():
            if args.only and args.only not in key:
                continue
            res = run(Path(tmp), seconds)
            print(f"{key}: {res.row()}", flush=True)
            (up_rows if isinstance(res, UpResult) else replica_rows if isinstance(res, ReplicaResult) else rows).append(res.row())
    for header, found in ((HEADER, rows), (UP_HEADER, up_rows), (REPLICA_HEADER, replica_rows)):
        if found:
            print()
            print(table(header, found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
