"""`epp`: serve (the EPP), up (the local stack), sim (a simulated vLLM server), envoy-config.

Flag names follow the reference endpoint picker where one exists, so manifests carry over.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from extproc.handlers.request_stream import (
    DEFAULT_BODY_IDLE_TIMEOUT,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_HEADERS_KB,
)
from extproc.observability.logs import LOG_FORMATS
from pickers.config.strategies import CONFIGS, DEFAULT_STRATEGY, STRATEGIES
from pickers.framework.errors import ConfigError
from pickers.plugins.datalayer.sources import DEFAULT_MAX_SCRAPE_RATE

if TYPE_CHECKING:
    from extproc.observability.audit import AuditOptions


def _positive_float(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def _duration(text: str) -> float:
    """Seconds, or a Go-style duration as the reference picker takes (50ms, 2s, 1m)."""
    t = text.strip()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if t.endswith(suffix) and t[: -len(suffix)].replace(".", "", 1).isdigit():
            return _positive_float(str(float(t[: -len(suffix)]) * scale))
    try:
        return _positive_float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 50ms, 2s or 0.5, got {text!r}") from None


def _scrape_rate(text: str) -> float:
    """Fetches a second, or 0 for no cap."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected fetches a second (a number, 0 for no cap), got {text!r}")
    return value


def _duration_or_off(text: str) -> float:
    """A duration, or 0 for no limit."""
    return 0.0 if text.strip() in ("0", "0s") else _duration(text)


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port (default 9002)")
    p.add_argument("--grpc-health-port", type=int, default=9003, help="gRPC health port (default 9003)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (default 9090)")
    p.add_argument("--bind-address", default="0.0.0.0", help="address the servers listen on (default all)")
    p.add_argument("--endpoints", metavar="FILE", help="YAML file listing the pool's endpoints; reloaded when it changes")
    p.add_argument(
        "--pool-name", default="",
        help="the InferencePool to serve: without --endpoints its pods are discovered from the Kubernetes API; "
        "also labels the pool metrics",
    )  # fmt: skip
    p.add_argument(
        "--objectives", metavar="FILE",
        help="YAML list of {name, priority}: the priority of the objective a request names in "
        "x-gateway-inference-objective (negative = sheddable); with Kubernetes, InferenceObjectives add to it",
    )  # fmt: skip
    p.add_argument(
        "--model-rewrites", metavar="FILE",
        help="InferenceModelRewrite rules (a YAML list of {matches, targets}); with Kubernetes, "
        "InferenceModelRewrites add to them",
    )  # fmt: skip
    _add_kubernetes_flags(p)
    _add_peer_flags(p)
    scheduling = p.add_mutually_exclusive_group()
    scheduling.add_argument(
        "--strategy", choices=STRATEGIES, default=None,
        help=f"a built-in scheduling strategy (default: `{DEFAULT_STRATEGY}`, the latency model's cost; `default` is the "
             "reference picker's queue 2 + kv 2 + prefix 3)",
    )  # fmt: skip
    scheduling.add_argument("--config-file", metavar="FILE", help="an EndpointPickerConfig YAML file")
    scheduling.add_argument("--config-text", metavar="YAML", help="an EndpointPickerConfig given inline")
    p.add_argument(
        "--config-reload-interval", type=_duration_or_off, default=5.0, metavar="DURATION",  # reload.DEFAULT_INTERVAL
        help="how often to look at --config-file for changes, applied while serving (default 5s; 0: never reload; "
        "docs/operating.md#config-reload)",
    )  # fmt: skip
    p.add_argument(
        "--max-num-endpoints", type=int, default=1, metavar="N",
        help="endpoints to return per request: the first is primary, the rest ordered fallbacks (default 1)",
    )  # fmt: skip
    p.add_argument("--refresh-metrics-interval", type=_duration, default=0.05, help="metrics scrape interval (default 50ms)")
    p.add_argument("--max-scrape-rate", type=_scrape_rate, default=DEFAULT_MAX_SCRAPE_RATE, metavar="PER_SECOND",
                   help="the most fetches a second each HTTP data source (metrics, /v1/models, DCGM) makes over all "
                        "endpoints; past it each endpoint is polled every endpoints/rate seconds instead, so polling a "
                        "large pool cannot take the whole event loop; per scraping process: with --workers each worker scrapes "
                        "a share of the endpoints under it (default %(default)g; 0: no cap)")  # fmt: skip
    p.add_argument(
        "--metrics-staleness-threshold", type=_duration, default=2.0, help="metrics older than this are stale (default 2s)"
    )
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="larger request bodies get 413")
    p.add_argument(
        "--max-request-headers", type=int, default=DEFAULT_MAX_HEADERS, metavar="N",
        help=f"request headers allowed, the gateway's own and the EPP's included (default {DEFAULT_MAX_HEADERS}, Envoy's "
        "max_headers_count default; never above the gateway's): more get 431",
    )  # fmt: skip
    p.add_argument(
        "--max-request-headers-kb", type=int, default=DEFAULT_MAX_HEADERS_KB, metavar="KB",
        help=f"KiB of request header names and values allowed, likewise (default {DEFAULT_MAX_HEADERS_KB}, Envoy's "
        "max_request_headers_kb default; never above the gateway's)",
    )  # fmt: skip
    p.add_argument(
        "--request-body-idle-timeout", type=_duration_or_off, default=DEFAULT_BODY_IDLE_TIMEOUT, metavar="DURATION",
        help=f"a client that sends no request body data this long gets 408 (full-duplex body mode; default "
        f"{DEFAULT_BODY_IDLE_TIMEOUT:g}s; 0: no limit)",
    )  # fmt: skip
    p.add_argument(
        "--explain-scores", action="store_true",
        help="put every candidate's scores in envoy.lb metadata x-gateway-destination-endpoint-scores",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="N >= 2: N worker processes serve ext_proc on --grpc-port (SO_REUSEPORT) and this process makes every "
        "pick with the one scheduling state, to go past one core (default 1: this process serves; docs/scaling.md)",
    )  # fmt: skip
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds to drain open streams on SIGTERM")
    p.add_argument(
        "--shutdown-delay", type=_duration, default=0.0,
        help="on SIGTERM, report NOT_SERVING and keep serving this long before closing the port (set it above "
        "the gateway's health-check interval; default 0)",
    )  # fmt: skip
    p.add_argument(
        "--secure-serving", type=_bool_flag, nargs="?", const=True, default=False, metavar="BOOL",
        help="serve ext_proc over TLS (the certificate from --cert-path, else a self-signed one generated at start)",
    )  # fmt: skip
    p.add_argument("--cert-path", metavar="DIR", help="directory holding tls.crt and tls.key for --secure-serving")
    _add_experimental_flag(p)
    p.add_argument(
        "-v", "--v", dest="verbosity", type=int, default=0,
        help="log verbosity: 0 info; 1+ debug, which also logs every request with its candidates' scores",
    )  # fmt: skip
    obs = p.add_argument_group("logs and live views")
    obs.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="text lines or one JSON object per line")
    obs.add_argument(
        "--log-requests", action="store_true",
        help="one INFO line per request: id, model, endpoint(s), profile, status, aborted, durations, tokens",
    )  # fmt: skip
    obs.add_argument("--admin-port", type=int, default=9091, help="HTTP port of the /debug/ live views (default 9091; 0: off)")
    obs.add_argument("--admin-address", default="127.0.0.1", help="address of the live views (default 127.0.0.1)")
    obs.add_argument(
        "--tracing", action="store_true",
        help="OpenTelemetry spans per request, parented on the client's traceparent and propagated upstream; exported "
        "over OTLP/gRPC to $OTEL_EXPORTER_OTLP_ENDPOINT as $OTEL_SERVICE_NAME (needs the `otel` extra)",
    )  # fmt: skip
    obs.add_argument(
        "--tracing-sample-ratio", type=float, default=1.0, metavar="RATIO",
        help="with --tracing: share of requests without a sampled traceparent that are traced (default 1.0)",
    )  # fmt: skip
    audit = p.add_argument_group("audit trail (docs/guardrails.md)")
    audit.add_argument(
        "--audit-sink", choices=("file", "stdout", "otel"), default=None,
        help="one record per request, written off the request path: a JSON-lines file (--audit-file), stdout, or "
        "OpenTelemetry logs over OTLP/gRPC to $OTEL_EXPORTER_OTLP_ENDPOINT (the `otel` extra); default: off",
    )  # fmt: skip
    audit.add_argument("--audit-file", metavar="PATH", help="the file sink's path (appended to, rotated by size)")
    audit.add_argument("--audit-file-max-mb", type=int, default=100, metavar="MIB", help="rotate the file past this size (default 100)")
    audit.add_argument("--audit-file-backups", type=int, default=5, metavar="N", help="rotated files kept: PATH.1 .. PATH.N (default 5)")
    audit.add_argument(
        "--audit-client-header", default="", metavar="NAME",
        help="the request header naming the client (e.g. the gateway's authenticated user or API-key id; never the key)",
    )  # fmt: skip
    audit.add_argument(
        "--audit-prompt", choices=("none", "hash", "excerpt"), default="none",
        help="what a record keeps of the prompt: nothing (default), its SHA-256, or a redacted excerpt",
    )  # fmt: skip
    audit.add_argument(
        "--audit-response", choices=("none", "hash", "excerpt"), default="none",
        help="what a record keeps of the response body: nothing (default), its SHA-256, or a redacted excerpt",
    )  # fmt: skip
    audit.add_argument("--audit-excerpt-chars", type=int, default=200, metavar="N", help="characters of a redacted excerpt (default 200)")
    audit.add_argument(
        "--audit-queue-size", type=int, default=10_000, metavar="N",
        help="records waiting for the sink at most; past it records are dropped and counted (default 10000)",
    )  # fmt: skip


def _add_experimental_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-experimental-plugins", type=_bool_flag, nargs="?", const=True, default=False, metavar="BOOL",
        help="let a config use llm-d's Alpha plugin types (the multicluster-* family), as llm-d's flag of this name",
    )  # fmt: skip


def _bool_flag(text: str) -> bool:
    """Go-style booleans, so `--flag`, `--flag=true` and `--flag=false` all work as in the reference."""
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_kubernetes_flags(p: argparse.ArgumentParser) -> None:
    k = p.add_argument_group("Kubernetes (pod discovery from the API server and leader election)")
    k.add_argument("--pool-namespace", default="", help="namespace of the InferencePool (default: $NAMESPACE, else the pod's own)")
    k.add_argument("--pool-group", default="inference.networking.k8s.io", help="API group of the InferencePool")
    k.add_argument(
        "--endpoint-selector", default="", metavar="K=V,...",
        help="select model-server pods by labels instead of an InferencePool (needs --endpoint-target-ports)",
    )  # fmt: skip
    k.add_argument("--endpoint-target-ports", default="", metavar="PORT,...", help="ports of each selected pod (1-8)")
    k.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig to reach the API server (default: in-cluster service account)")
    k.add_argument(
        "--ha-enable-leader-election", type=_bool_flag, nargs="?", const=True, default=False, metavar="BOOL",
        help="run several replicas of which only the leader (holding a Lease) reports ready",
    )  # fmt: skip
    k.add_argument("--leader-election-lease-name", default="", help="Lease name (default: the reference picker's for the pool)")
    k.add_argument("--leader-election-namespace", default="", help="namespace of the Lease (default: the pool's)")
    k.add_argument("--leader-election-lease-duration", type=_duration, default=15.0, help="lease duration (default 15s)")
    k.add_argument("--leader-election-renew-deadline", type=_duration, default=10.0, help="leader steps down if not renewed within this (default 10s)")
    k.add_argument("--leader-election-retry-period", type=_duration, default=2.0, help="how often to renew or retry (default 2s)")


def _add_peer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("active-active replicas (share picks and load with peers: docs/high-availability.md)")
    g.add_argument("--peers", default="", metavar="HOST:PORT,...",
                   help="the replicas to share with, at their --peer-port (this replica may be listed too)")
    g.add_argument("--peer-service", default="", metavar="NAME",
                   help="Kubernetes: the headless Service whose EndpointSlices list the replicas (ready addresses, port `peers`)")
    g.add_argument("--peer-port", type=int, default=9004, help="port this replica takes peers' streams on (default 9004)")
    g.add_argument("--replica-id", default="", help="this replica's name to its peers (default: $POD_NAME or host, pid, random)")


def _peer_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if not (args.peers or args.peer_service):
        return None  # not sharing: the exchange is never imported
    from extproc.peers.sync import PeerOptions, parse_peers

    try:
        peers = parse_peers(args.peers)
    except ValueError as e:
        raise ConfigError(str(e), field="--peers") from None
    if not 0 <= args.peer_port < 65536:
        raise ConfigError(f"expected a port 0-65535, got {args.peer_port}", field="--peer-port")
    return PeerOptions(peers=peers, service=args.peer_service, namespace=args.pool_namespace, kubeconfig=args.kubeconfig,
                       port=args.peer_port, bind_address=args.bind_address, replica_id=args.replica_id)


def _kubernetes_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if args.endpoints and args.endpoint_selector:
        raise ConfigError("give either --endpoints or --endpoint-selector, not both", field="--endpoint-selector")
    wanted = (args.pool_name and not args.endpoints) or args.endpoint_selector or args.endpoint_target_ports
    if not (wanted or args.ha_enable_leader_election):
        return None  # no Kubernetes: do not import its client (half a second)
    from extproc.kubernetes.runtime import KubernetesOptions

    opts = KubernetesOptions(
        kubeconfig=args.kubeconfig,
        pool_name="" if args.endpoints else args.pool_name,  # with a file, --pool-name only labels metrics
        pool_namespace=args.pool_namespace,
        pool_group=args.pool_group,
        endpoint_selector=args.endpoint_selector,
        endpoint_target_ports=args.endpoint_target_ports,
        leader_election=args.ha_enable_leader_election,
        lease_name=args.leader_election_lease_name,
        lease_namespace=args.leader_election_namespace,
        lease_duration=args.leader_election_lease_duration,
        renew_deadline=args.leader_election_renew_deadline,
        retry_period=args.leader_election_retry_period,
    )
    opts.validate()
    return opts if opts.discovers or opts.leader_election else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epp", description="llm-epp: an endpoint picker for LLM inference behind Envoy")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ext_proc endpoint picker")
    _add_serve_flags(serve)

    up = sub.add_parser("up", help="run Envoy + the EPP + a simulated vLLM pool on loopback, until Ctrl-C")
    up.add_argument("--port", type=int, default=8081, help="the OpenAI endpoint's port (default 8081)")
    up.add_argument("--sims", type=int, default=None, help="simulated vLLM servers (default 4)")
    up.add_argument("--dp-groups", type=int, metavar="G",
                    help="instead of --sims: G simulated data-parallel groups (wide-EP), each a process whose "
                         "ranks step in lockstep, every rank its own endpoint; with --pd: G prefill groups and "
                         "G decode groups")
    up.add_argument("--dp-size", type=int, metavar="N", help="ranks per data-parallel group (default 4; with --dp-groups)")
    up.add_argument("--profile", default="gpu", help="simulator timing profile: gpu or cpu (default gpu)")
    up.add_argument("--time-scale", type=float, default=1.0, help="simulator time scale (0.1 = 10x faster)")
    up.add_argument("--model", default="sim-model", help="model name the simulators serve (default sim-model)")
    up.add_argument("--endpoints", metavar="FILE", help="use these real vLLM servers instead of simulators")
    up_sched = up.add_mutually_exclusive_group()
    up_sched.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY, help=f"scheduling strategy (default: {DEFAULT_STRATEGY})")
    up_sched.add_argument("--config-file", metavar="FILE", help="an EndpointPickerConfig YAML file for the EPP")
    up.add_argument(
        "--fail-open", action="store_true",
        help="Envoy serves from the pool directly when the EPP is down (BUFFERED request bodies unless --request-body-mode)",
    )  # fmt: skip
    up.add_argument("--replicas", type=int, default=1, metavar="N",
                    help="EPP replicas behind Envoy (LEAST_REQUEST), active-active: they share picks and load (default 1)")
    up.add_argument("--no-sharing", action="store_true", help="with --replicas: each replica keeps its own state (a baseline)")
    up.add_argument("--secure", action="store_true", help="Envoy talks to the EPP over TLS (a certificate generated for the run)")
    pd = up.add_argument_group("prefill/decode disaggregation (uses pickers/configs/pd.yaml unless --config-file)")
    pd.add_argument("--pd", action="store_true", help="prefill simulators + decode simulators each behind a pd-sidecar")
    pd.add_argument("--prefill", type=int, default=None, metavar="N",
                    help="prefill simulators (default 2; implies --pd); with --dp-groups: prefill groups instead of G")
    pd.add_argument("--decode", type=int, default=None, metavar="M",
                    help="decode simulators (default 2; implies --pd); with --dp-groups: decode groups instead of G")
    pd.add_argument("--prefill-profile", default=None, help="timing profile of the prefill simulators (default --profile)")
    pd.add_argument("--decode-profile", default=None, help="timing profile of the decode simulators (default --profile)")
    up.add_argument(
        "--request-body-mode", choices=("FULL_DUPLEX_STREAMED", "BUFFERED"), default=None,
        help="how Envoy hands request bodies to the EPP (default FULL_DUPLEX_STREAMED; with --fail-open BUFFERED)",
    )  # fmt: skip
    up.add_argument("--workers", type=int, default=1, metavar="N",
                    help="the EPP's worker processes (epp serve --workers; default 1)")
    up.add_argument("--workdir", help="where configs and logs go (default: a temporary folder)")

    sim = sub.add_parser("sim", help="run one simulated vLLM server (same flags as vllm-sim)", add_help=False)
    sim.add_argument("sim_args", nargs=argparse.REMAINDER)

    status = sub.add_parser("status", help="print a running EPP's endpoint table and recent decisions (its /debug/ views)")
    status.add_argument("--url", default="http://127.0.0.1:9091", help="the EPP's admin address (default http://127.0.0.1:9091)")
    status.add_argument("--decisions", type=int, default=10, metavar="N", help="recent decisions to show (default 10)")
    status.add_argument("--json", action="store_true", help="print the raw JSON instead of tables")

    check = sub.add_parser(
        "check-config", help="validate EndpointPickerConfig files without serving and print what they configure"
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="config files; - reads one from standard input")
    check.add_argument(
        "--allow-experimental-plugins", action="store_true",
        help="check as `epp serve --allow-experimental-plugins` would load: llm-d's Alpha plugin types allowed",
    )  # fmt: skip

    cfg = sub.add_parser("envoy-config", help="print the Envoy configuration for a gateway in front of the EPP")
    cfg.add_argument("--port", type=int, default=8081)
    cfg.add_argument("--epp-host", default="127.0.0.1")
    cfg.add_argument("--epp-port", type=int, default=9002)
    cfg.add_argument("--epp-health-port", type=int, default=9003, help="the EPP's gRPC health port Envoy checks (0: no health check)")
    cfg.add_argument("--secure", action="store_true", help="reach the EPP over TLS (epp serve --secure-serving)")
    cfg.add_argument("--epp-ca", metavar="PEM", help="with --secure: verify the EPP's certificate against this CA")
    cfg.add_argument("--admin-port", type=int, default=19000)
    cfg.add_argument("--request-body-mode", choices=("FULL_DUPLEX_STREAMED", "BUFFERED"), default="FULL_DUPLEX_STREAMED")
    cfg.add_argument("--fail-open", action="store_true", help="with --pool-endpoints: serve from the pool when the EPP is down")
    cfg.add_argument(
        "--epp-max-requests-per-connection", type=int, default=0, metavar="N",
        help="turn Envoy's connections to the EPP over every N streams, so an EPP with --workers gets its "
        "connections spread over all its workers (default 0: never; docs/scaling.md)",
    )  # fmt: skip
    cfg.add_argument(
        "--epp-streams-per-connection", type=int, default=0, metavar="N",
        help="at most N concurrent streams on one connection to the EPP: Envoy opens more connections, which "
        "reach all of an EPP's --workers (default 0: unbounded; docs/scaling.md)",
    )  # fmt: skip
    cfg.add_argument(
        "--dns-destinations", action="store_true",
        help="the EPP's destinations are host names (a cluster-scoped EPP's peer gateways): route with Envoy's "
        "dynamic forward proxy, which resolves them, instead of ORIGINAL_DST (IP addresses only)",
    )  # fmt: skip
    cfg.add_argument(
        "--pool-endpoints", metavar="FILE",
        help="endpoints file of the pool: route with Envoy's override-host policy over these endpoints, "
        "which follows the EPP's fallback list and retries on the next endpoint",
    )  # fmt: skip
    return parser


def _run(coro) -> None:  # type: ignore[no-untyped-def]
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        asyncio.run(coro)


# headers whose value is a credential: never an audit record's client identity
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "x-goog-api-key"})


def _audit_options(args: argparse.Namespace) -> AuditOptions | None:
    """The audit trail's settings; None when off (then no other --audit-* flag may be given)."""
    from extproc.observability.audit import AuditOptions

    if args.audit_sink is None:
        given = [f for f, v in (("--audit-file", args.audit_file), ("--audit-client-header", args.audit_client_header),
                                ("--audit-prompt", args.audit_prompt != "none"),
                                ("--audit-response", args.audit_response != "none")) if v]  # fmt: skip
        if given:
            raise ConfigError(f"{given[0]} needs --audit-sink", field=given[0])
        return None
    for flag, value in (("--audit-file-max-mb", args.audit_file_max_mb), ("--audit-queue-size", args.audit_queue_size),
                        ("--audit-excerpt-chars", args.audit_excerpt_chars)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"expected at least 1, got {value}", field=flag)
    if args.audit_client_header.lower() in CREDENTIAL_HEADERS:
        raise ConfigError(
            f"{args.audit_client_header!r} carries a credential, which an audit record must never hold: name the header "
            "the gateway sets with the authenticated user or the API key's id instead", field="--audit-client-header",
        )  # fmt: skip
    if args.audit_file_backups < 0:
        raise ConfigError(f"expected 0 or more, got {args.audit_file_backups}", field="--audit-file-backups")
    return AuditOptions(
        sink=args.audit_sink, path=args.audit_file, max_bytes=args.audit_file_max_mb * 1024 * 1024,
        backups=args.audit_file_backups, client_header=args.audit_client_header, prompt=args.audit_prompt,
        response=args.audit_response, excerpt_chars=args.audit_excerpt_chars, queue_size=args.audit_queue_size,
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from extproc.observability.logs import setup_logging
    from extproc.server.runner import EppServer, ServeOptions

    setup_logging(args.verbosity, args.log_format)
    opts = ServeOptions(
        grpc_port=args.grpc_port,
        grpc_health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        bind_address=args.bind_address,
        endpoints_file=args.endpoints,
        strategy=args.strategy or DEFAULT_STRATEGY,
        config_file=args.config_file,
        config_text=args.config_text,
        config_reload_interval=args.config_reload_interval,
        max_endpoints=args.max_num_endpoints,
        refresh_metrics_interval=args.refresh_metrics_interval,
        max_scrape_rate=args.max_scrape_rate,
        metrics_staleness_threshold=args.metrics_staleness_threshold,
        max_body_bytes=args.max_body_bytes,
        max_request_headers=args.max_request_headers,
        max_request_headers_kb=args.max_request_headers_kb,
        request_body_idle_timeout=args.request_body_idle_timeout,
        explain_scores=args.explain_scores or args.verbosity > 0,
        log_requests=args.log_requests or args.verbosity > 0,
        admin_port=args.admin_port,
        admin_address=args.admin_address,
        grace_period=args.grace_period,
        shutdown_delay=args.shutdown_delay,
        pool_name=args.pool_name,
        secure_serving=args.secure_serving,
        cert_path=args.cert_path,
        kubernetes=_kubernetes_options(args),
        objectives_file=args.objectives,
        model_rewrites_file=args.model_rewrites,
        tracing=args.tracing,
        tracing_sample_ratio=args.tracing_sample_ratio,
        allow_experimental_plugins=args.allow_experimental_plugins,
        workers=args.workers,
        log_verbosity=args.verbosity,
        log_format=args.log_format,
        peers=_peer_options(args),
        audit=_audit_options(args),
    )
    if opts.workers < 1:
        raise ConfigError(f"expected at least 1, got {opts.workers}", field="--workers")
    if opts.workers > 1 and opts.grpc_port == 0:
        raise ConfigError("--workers N needs a --grpc-port number: the workers share it (SO_REUSEPORT), port 0 would give each its own",
                          field="--grpc-port")  # fmt: skip
    if opts.max_endpoints < 1:
        raise ConfigError("expected at least 1", field="--max-num-endpoints")
    if opts.max_request_headers < 1 or opts.max_request_headers_kb < 1:
        raise ConfigError("expected at least 1", field="--max-request-headers" if opts.max_request_headers < 1 else "--max-request-headers-kb")
    if opts.cert_path and not opts.secure_serving:
        raise ConfigError("--cert-path needs --secure-serving", field="--cert-path")
    if opts.secure_serving and opts.cert_path:
        from extproc.server.tls import load_certificate

        load_certificate(opts.cert_path)  # a missing or unreadable file stops start-up with its name
    _run(EppServer(opts).serve_forever())
    return 0


def _report(line: str) -> None:
    """What `epp up`'s supervisor has to say: a child died, a child is back."""
    print(f"{time.strftime('%H:%M:%S')} epp up: {line}", file=sys.stderr, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    from extproc.devstack.stack import LocalStack, StackError, StackOptions

    if args.replicas < 1:
        print(f"epp up: --replicas: expected at least 1, got {args.replicas}", file=sys.stderr)
        return 2
    if args.no_sharing and args.replicas < 2:
        print("epp up: --no-sharing: only with --replicas 2 or more (one EPP has no one to share with)", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="llm-epp-"))
    body_mode = args.request_body_mode or "FULL_DUPLEX_STREAMED"
    if args.fail_open and args.request_body_mode is None:
        # A body already streamed to an EPP that dies cannot be failed open (Envoy answers 500);
        # BUFFERED keeps the body in Envoy until the EPP answers, so no request is lost
        # (docs/kubernetes.md, Failure mode). An explicit --request-body-mode is kept.
        print("--fail-open: using BUFFERED request body mode (Envoy fails open reliably only there)")
        body_mode = "BUFFERED"
    # With buffered requests, responses go to the EPP STREAMED: Envoy keeps each chunk until the EPP
    # answers, so a response passing through an EPP that dies fails open too. In full duplex Envoy
    # keeps no copy of what it handed over and answers 500 (docs/reliability.md, Faults).
    response_mode = "STREAMED" if body_mode == "BUFFERED" else "FULL_DUPLEX_STREAMED"
    opts = StackOptions(
        workdir=workdir,
        sims=4 if args.sims is None else args.sims,
        sim_args=("--profile", args.profile, "--time-scale", str(args.time_scale)),
        model=args.model,
        endpoints_file=Path(args.endpoints) if args.endpoints else None,
        epp_args=("--config-file", str(Path(args.config_file).resolve())) if args.config_file else ("--strategy", args.strategy),
        listen_port=args.port,
        request_body_mode=body_mode,
        response_body_mode=response_mode,
        failure_mode_allow=args.fail_open,
        envoy_concurrency=2,
        epp_tls="verified" if args.secure else "",
        epp_workers=args.workers,
        epp_replicas=args.replicas,
        epp_share=not args.no_sharing,
    )
    if args.workers < 1:
        raise ConfigError(f"expected at least 1, got {args.workers}", field="--workers")
    opts.pd = _pd_pool(args)
    opts.dp_groups, opts.dp_size = _dp_groups(args)
    if opts.pd is not None and not args.config_file:
        opts.epp_args = ("--config-file", str(PD_CONFIG))
    stack = LocalStack(opts)

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM/SIGHUP stop the stack like Ctrl-C: every process is stopped

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    # Ctrl-C too, set here: a shell without job control starts `epp up &` with SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler, so a later SIGINT would stop nothing.
    signal.signal(signal.SIGINT, _stop)
    what = f"{opts.sims} simulated vLLM servers"
    if opts.dp_groups:
        what = f"{opts.dp_groups} simulated data-parallel groups of {opts.dp_size} ranks"
    if opts.pd is not None:
        what = f"{opts.pd.prefill} prefill + {opts.pd.decode} decode simulators (decode behind pd-sidecars)"
        if opts.pd.dp_size:
            what = (f"{opts.pd.prefill} prefill + {opts.pd.decode} decode data-parallel groups of {opts.pd.dp_size} "
                    "ranks (decode ranks behind DP pd-sidecars)")
    epps = "the EPP" if args.replicas == 1 else f"{args.replicas} EPP replicas ({'own state each' if args.no_sharing else 'sharing'})"
    print(f"starting Envoy, {epps} and {'your endpoints' if args.endpoints else what} ...", flush=True)
    try:
        stack.start()
    except StackError as e:
        print(f"epp up: {e}", file=sys.stderr)
        return 1
    try:
        # A child that dies is reported and restarted (same ports); Envoy, and with --fail-open the
        # traffic, stay up meanwhile.
        stack.supervise(report=_report)
        print(f"\nOpenAI endpoint: {stack.base_url}   (model: {args.model})")
        print(f"  curl {stack.base_url}/completions -H 'content-type: application/json' \\")
        print(f"       -d '{{\"model\": \"{args.model}\", \"prompt\": \"Hello\", \"max_tokens\": 8}}'")
        print(f"EPP metrics: http://127.0.0.1:{stack.epp_metrics_port}/metrics   logs: {workdir}")
        print(f"EPP live views: epp status --url http://127.0.0.1:{stack.epp_admin_port}")
        for r in stack.epp_replicas[1:]:
            print(f"EPP replica {r.index}: metrics http://127.0.0.1:{r.metrics_port}/metrics   live views: epp status --url http://127.0.0.1:{r.admin_port}")
        print("A child that dies is restarted. Ctrl-C stops everything.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        stack.stop()


PD_CONFIG = CONFIGS / "pd.yaml"


def _pd_pool(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """`epp up --pd` (or --prefill/--decode): the P/D pool to start, else None. With --dp-groups G the
    pool is data-parallel groups: G per role, unless --prefill or --decode counts that role's groups."""
    from extproc.devstack.stack import PdPool

    if not (args.pd or args.prefill is not None or args.decode is not None):
        return None
    if args.endpoints:
        raise ConfigError("--pd starts simulators; it cannot be combined with --endpoints", field="--pd")
    dp_size, unit, default = 0, "", 2
    if args.dp_groups is not None:
        if args.prefill is not None and args.decode is not None:
            raise ConfigError("--dp-groups G gives both roles G groups; with --prefill and --decode both given it "
                              "would count nothing: give --dp-groups with at most one of them", field="--dp-groups")
        dp_size, unit, default = _dp_size(args), " groups", args.dp_groups
    prefill = default if args.prefill is None else args.prefill
    decode = default if args.decode is None else args.decode
    if prefill < 0 or decode < 1:
        raise ConfigError(f"expected --prefill >= 0 and --decode >= 1{unit}, got {prefill} and {decode}",
                          field="--decode")
    return PdPool(
        prefill=prefill,
        decode=decode,
        prefill_sim_args=("--profile", args.prefill_profile or args.profile),
        decode_sim_args=("--profile", args.decode_profile or args.profile),
        dp_size=dp_size,
    )


def _dp_size(args: argparse.Namespace) -> int:
    """The ranks per group of `--dp-groups G [--dp-size N]` (default 4), with G and N checked."""
    size = 4 if args.dp_size is None else args.dp_size
    if args.dp_groups < 1 or size < 1:
        raise ConfigError(f"expected --dp-groups >= 1 and --dp-size >= 1, got {args.dp_groups} and {size}",
                          field="--dp-groups")
    if args.endpoints or args.sims is not None:
        raise ConfigError("--dp-groups starts its own simulators; it cannot be combined with --sims or --endpoints",
                          field="--dp-groups")
    return size


def _dp_groups(args: argparse.Namespace) -> tuple[int, int]:
    """`epp up --dp-groups G [--dp-size N]` without --pd: (G, N) aggregated groups, else (0, 1)."""
    if args.dp_groups is None:
        if args.dp_size is not None:
            raise ConfigError("--dp-size is the size of each --dp-groups group; give --dp-groups too", field="--dp-size")
        return 0, 1
    size = _dp_size(args)
    if args.pd or args.prefill is not None or args.decode is not None:
        return 0, 1  # P/D groups: _pd_pool's PdPool.dp_size
    return args.dp_groups, size


def cmd_sim(args: argparse.Namespace) -> int:
    # The simulator is a program of its own (`vllm-sim`), run in this process's place: the EPP never
    # imports it.
    argv = [sys.executable, "-m", "vllm_sim", *args.sim_args]
    os.execv(argv[0], argv)
    return 0  # not reached


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from extproc.datalayer.endpoints_file import load_endpoints_file
    from extproc.devstack import envoy_config

    pool = [(e.host, e.port) for e in load_endpoints_file(args.pool_endpoints)] if args.pool_endpoints else []
    settings = envoy_config.GatewaySettings(
        listen_port=args.port,
        epp_port=args.epp_port,
        epp_host=args.epp_host,
        epp_health_port=args.epp_health_port,
        epp_tls=args.secure,
        epp_tls_ca=args.epp_ca,
        admin_port=args.admin_port,
        listen_address="0.0.0.0",
        request_body_mode=args.request_body_mode,
        failure_mode_allow=args.fail_open,
        fallback_endpoints=pool,
        override_host_endpoints=pool,
        dns_destinations=args.dns_destinations,
        epp_max_requests_per_connection=args.epp_max_requests_per_connection,
        epp_streams_per_connection=args.epp_streams_per_connection,
    )
    print(yaml.safe_dump(envoy_config.render(settings), sort_keys=False), end="")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from extproc.cli.check_config import check_config

    return check_config(args.files, allow_experimental=args.allow_experimental_plugins)


def cmd_status(args: argparse.Namespace) -> int:
    from extproc.cli.status import show_status

    return show_status(args.url, decisions=args.decisions, raw=args.json)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"serve": cmd_serve, "up": cmd_up, "sim": cmd_sim, "envoy-config": cmd_envoy_config, "status": cmd_status,
                "check-config": cmd_check_config}
    try:
        return handlers[args.command](args)
    except ConfigError as e:
        print(f"epp: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
