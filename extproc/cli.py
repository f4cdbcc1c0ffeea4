"""`epp`: serve (the EPP), up (the local stack), sim (a simulated vLLM server), envoy-config.

Flag names follow the reference endpoint picker where one exists, so manifests carry over.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

import yaml

from extproc.errors import ConfigError
from extproc.protocol import DEFAULT_MAX_BODY
from pickers.strategies import STRATEGIES


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


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port (default 9002)")
    p.add_argument("--grpc-health-port", type=int, default=9003, help="gRPC health port (default 9003)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (default 9090)")
    p.add_argument("--bind-address", default="0.0.0.0", help="address the servers listen on (default all)")
    p.add_argument("--endpoints", metavar="FILE", help="YAML file listing the pool's endpoints; reloaded when it changes")
    p.add_argument("--pool-name", default="", help="InferencePool name (labels the pool metrics)")
    p.add_argument("--strategy", choices=STRATEGIES, default="default", help="scheduling strategy (default: queue+kv+prefix)")
    p.add_argument(
        "--max-num-endpoints", type=int, default=1, metavar="N",
        help="endpoints to return per request: the first is primary, the rest ordered fallbacks (default 1)",
    )  # fmt: skip
    p.add_argument("--refresh-metrics-interval", type=_duration, default=0.05, help="metrics scrape interval (default 50ms)")
    p.add_argument(
        "--metrics-staleness-threshold", type=_duration, default=2.0, help="metrics older than this are stale (default 2s)"
    )
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="larger request bodies get 413")
    p.add_argument(
        "--explain-scores", action="store_true",
        help="put every candidate's scores in envoy.lb metadata x-gateway-destination-endpoint-scores",
    )  # fmt: skip
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds to drain open streams on SIGTERM")
    p.add_argument("-v", "--v", dest="verbosity", type=int, default=0, help="log verbosity: 0 info, 1+ debug")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epp", description="llm-epp: an endpoint picker for LLM inference behind Envoy")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ext_proc endpoint picker")
    _add_serve_flags(serve)

    up = sub.add_parser("up", help="run Envoy + the EPP + a simulated vLLM pool on loopback, until Ctrl-C")
    up.add_argument("--port", type=int, default=8081, help="the OpenAI endpoint's port (default 8081)")
    up.add_argument("--sims", type=int, default=4, help="simulated vLLM servers (default 4)")
    up.add_argument("--profile", default="gpu", help="simulator timing profile: gpu or cpu (default gpu)")
    up.add_argument("--time-scale", type=float, default=1.0, help="simulator time scale (0.1 = 10x faster)")
    up.add_argument("--model", default="sim-model", help="model name the simulators serve (default sim-model)")
    up.add_argument("--endpoints", metavar="FILE", help="use these real vLLM servers instead of simulators")
    up.add_argument("--strategy", choices=STRATEGIES, default="default")
    up.add_argument("--fail-open", action="store_true", help="Envoy serves from the pool directly when the EPP is down")
    up.add_argument("--request-body-mode", choices=("FULL_DUPLEX_STREAMED", "BUFFERED"), default="FULL_DUPLEX_STREAMED")
    up.add_argument("--workdir", help="where configs and logs go (default: a temporary folder)")

    sim = sub.add_parser("sim", help="run one simulated vLLM server (same flags as vllm-sim)", add_help=False)
    sim.add_argument("sim_args", nargs=argparse.REMAINDER)

    cfg = sub.add_parser("envoy-config", help="print the Envoy configuration for a gateway in front of the EPP")
    cfg.add_argument("--port", type=int, default=8081)
    cfg.add_argument("--epp-host", default="127.0.0.1")
    cfg.add_argument("--epp-port", type=int, default=9002)
    cfg.add_argument("--admin-port", type=int, default=19000)
    cfg.add_argument("--request-body-mode", choices=("FULL_DUPLEX_STREAMED", "BUFFERED"), default="FULL_DUPLEX_STREAMED")
    cfg.add_argument("--fail-open", action="store_true", help="with --pool-endpoints: serve from the pool when the EPP is down")
    cfg.add_argument(
        "--pool-endpoints", metavar="FILE",
        help="endpoints file of the pool: route with Envoy's override-host policy over these endpoints, "
        "which follows the EPP's fallback list and retries on the next endpoint",
    )  # fmt: skip
    return parser


def _setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbosity > 0 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run(coro) -> None:  # type: ignore[no-untyped-def]
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        asyncio.run(coro)


def cmd_serve(args: argparse.Namespace) -> int:
    from extproc.server import EppServer, ServeOptions

    _setup_logging(args.verbosity)
    opts = ServeOptions(
        grpc_port=args.grpc_port,
        grpc_health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        bind_address=args.bind_address,
        endpoints_file=args.endpoints,
        strategy=args.strategy,
        max_endpoints=args.max_num_endpoints,
        refresh_metrics_interval=args.refresh_metrics_interval,
        metrics_staleness_threshold=args.metrics_staleness_threshold,
        max_body_bytes=args.max_body_bytes,
        explain_scores=args.explain_scores,
        grace_period=args.grace_period,
        pool_name=args.pool_name,
    )
    if opts.max_endpoints < 1:
        raise ConfigError("expected at least 1", field="--max-num-endpoints")
    _run(EppServer(opts).serve_forever())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from extproc.stack import LocalStack, StackOptions

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="llm-epp-"))
    body_mode = args.request_body_mode
    if args.fail_open and body_mode == "FULL_DUPLEX_STREAMED":
        # Envoy 1.40 fails open only part of the time in full-duplex mode (a 500 once the body has
        # started streaming to a dead EPP); BUFFERED fails open every time. See README.
        print("--fail-open: using BUFFERED request body mode (Envoy fails open reliably only there)")
        body_mode = "BUFFERED"
    opts = StackOptions(
        workdir=workdir,
        sims=args.sims,
        sim_args=("--profile", args.profile, "--time-scale", str(args.time_scale)),
        model=args.model,
        endpoints_file=Path(args.endpoints) if args.endpoints else None,
        epp_args=("--strategy", args.strategy),
        listen_port=args.port,
        request_body_mode=body_mode,
        failure_mode_allow=args.fail_open,
        envoy_concurrency=2,
    )
    stack = LocalStack(opts)
    print(f"starting Envoy, the EPP and {'your endpoints' if args.endpoints else f'{args.sims} simulated vLLM servers'} ...")
    stack.start()
    try:
        print(f"\nOpenAI endpoint: {stack.base_url}   (model: {args.model})")
        print(f"  curl {stack.base_url}/completions -H 'content-type: application/json' \\")
        print(f"       -d '{{\"model\": \"{args.model}\", \"prompt\": \"Hello\", \"max_tokens\": 8}}'")
        print(f"EPP metrics: http://127.0.0.1:{stack.epp_metrics_port}/metrics   logs: {workdir}")
        print("Ctrl-C stops everything.")
        while True:
            for proc in stack.procs:
                if proc.popen.poll() is not None:
                    print(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.log_tail()}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...")
        return 0
    finally:
        stack.stop()


def cmd_sim(args: argparse.Namespace) -> int:
    from vllm_sim import cli as sim_cli

    return int(sim_cli.main(args.sim_args) or 0)


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from extproc import envoy_config
    from extproc.discovery.static import load_endpoints_file

    pool = [(e.host, e.port) for e in load_endpoints_file(args.pool_endpoints)] if args.pool_endpoints else []
    settings = envoy_config.GatewaySettings(
        listen_port=args.port,
        epp_port=args.epp_port,
        epp_host=args.epp_host,
        admin_port=args.admin_port,
        listen_address="0.0.0.0",
        request_body_mode=args.request_body_mode,
        failure_mode_allow=args.fail_open,
        fallback_endpoints=pool,
        override_host_endpoints=pool,
    )
    print(yaml.safe_dump(envoy_config.render(settings), sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"serve": cmd_serve, "up": cmd_up, "sim": cmd_sim, "envoy-config": cmd_envoy_config}
    try:
        return handlers[args.command](args)
    except ConfigError as e:
        print(f"epp: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
