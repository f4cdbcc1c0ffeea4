"""`vllm-sim` command line: flags -> SimConfig -> a SimServer that runs until SIGINT/SIGTERM.

build_parser()/run() are public so the main `epp` CLI can offer `epp sim` by delegating.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from vllm_sim.config import DEFAULT_EMBEDDING_DIM, DEFAULT_MODEL, ConfigError, SimConfig
from vllm_sim.kv_events import KVEventsConfig
from vllm_sim.profiles import PROFILES
from vllm_sim.server import SimServer

log = logging.getLogger("vllm_sim")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the simulator's flags to parser (e.g. an `epp sim` subparser) or a new one."""
    p = parser or argparse.ArgumentParser(prog="vllm-sim", description="Simulated vLLM endpoint.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to bind, 0 = any free (default %(default)s)")
    p.add_argument("--model", dest="models", action="append", metavar="NAME",
                   help=f"served model name, repeatable; first one labels metrics (default {DEFAULT_MODEL})")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH", type=_lora_module,
                   help="LoRA adapters of the first model, as vLLM's flag: listed in /v1/models with it as parent")
    p.add_argument("--profile", choices=sorted(PROFILES), default="gpu", help="timing profile (default %(default)s)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply simulated durations, 0.1 = 10x faster (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for output text (default %(default)s)")
    p.add_argument("--max-num-seqs", type=int, help="running batch size limit (profile default)")
    p.add_argument("--num-gpu-blocks", type=int, help="KV cache capacity in blocks (profile default)")
    p.add_argument("--block-size", type=int, help="tokens per KV block (profile default)")
    p.add_argument("--max-model-len", type=int, help="max prompt + output tokens (profile default)")
    p.add_argument("--kv-transfer-s-per-token", type=float,
                   help="P/D: seconds a decode leg waits per remotely prefilled token (profile default)")
    p.add_argument("--kv-transfer-s-overhead", type=float,
                   help="P/D: fixed seconds per KV transfer (profile default)")
    p.add_argument("--name", help="x-served-by value (default host:port as bound)")
    p.add_argument("--control-port", type=int, metavar="PORT",
                   help="serve /sim/* (stats, reset, fault) only on 127.0.0.1:PORT, 0 = any free port; "
                        "the main port then answers 404 for them (default: on the main port)")
    p.add_argument("--embedding-dim", type=int, metavar="N",
                   help=f"length of /v1/embeddings vectors (default {DEFAULT_EMBEDDING_DIM})")
    p.add_argument("--kv-events-port", type=int, metavar="PORT",
                   help="publish KV events (vLLM's ZMQ format) on tcp://*:PORT, 0 = any free port; "
                        "topic kv@<host:port>@<model>")
    p.add_argument("--kv-events-config", metavar="JSON",
                   help="vLLM's --kv-events-config: {enable_kv_cache_events, publisher: zmq, endpoint, topic}, "
                        "plus encoding: map (vLLM 0.32, default) | array (older vLLM)")
    return p


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig.from_profile(
        args.profile,
        host=args.host,
        port=args.port,
        models=tuple(args.models) if args.models else None,
        lora_modules=tuple(args.lora_modules) if args.lora_modules else None,
        name=args.name,
        time_scale=args.time_scale,
        seed=args.seed,
        max_num_seqs=args.max_num_seqs,
        num_gpu_blocks=args.num_gpu_blocks,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        kv_transfer_s_per_token=args.kv_transfer_s_per_token,
        kv_transfer_s_overhead=args.kv_transfer_s_overhead,
        kv_events=_kv_events(args),
        control_port=args.control_port,
        embedding_dim=args.embedding_dim,
    )


def _kv_events(args: argparse.Namespace) -> KVEventsConfig | None:
    if args.kv_events_config and args.kv_events_port is not None:
        raise ConfigError("kv-events: give --kv-events-port or --kv-events-config, not both")
    if args.kv_events_config:
        try:
            return KVEventsConfig.from_json(args.kv_events_config)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if args.kv_events_port is not None:
        return KVEventsConfig(f"tcp://*:{args.kv_events_port}")
    return None


async def serve(config: SimConfig) -> None:
    """Run one simulator until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass  # not on this platform; Ctrl-C still raises KeyboardInterrupt
    server = SimServer(config)
    await server.start()
    log.info("vllm-sim %s serving %s on %s (profile %s, time-scale %g)",
             server.name, ",".join(config.models), server.url, config.profile, config.time_scale)
    if config.control_port is not None:
        log.info("control endpoints (/sim/*) on %s only", server.control_url)
    if server.kv_events is not None:
        log.info("publishing KV events on tcp://*:%d, topic %s", server.kv_events.port, server.kv_events.topic.decode())
    try:
        await stop.wait()
    finally:
        await server.stop()


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"vllm-sim: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
