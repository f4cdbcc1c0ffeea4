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

from vllm_sim.config import DEFAULT_EMBEDDING_DIM, DEFAULT_MODEL, ConfigError, DataParallelConfig, SimConfig
from vllm_sim.data_parallel import DataParallelSim, create
from vllm_sim.dcgm import DcgmConfig
from vllm_sim.kv_events import KVEventsConfig
from vllm_sim.profiles import PROFILES

log = logging.getLogger("vllm_sim")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the simulator's flags to parser (e.g. an `epp sim` subparser) or a new one."""
    p = parser or argparse.ArgumentParser(prog="vllm-sim", description="Simulated vLLM endpoint.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=None,
                   help=f"port to bind, 0 = any free (default {DEFAULT_PORT}); external LB: local rank i on PORT+i")
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
    p.add_argument("--dcgm-port", type=int, metavar="PORT",
                   help="also serve a DCGM exporter stand-in: GET /metrics on PORT (0 = any free port) with "
                        "DCGM_FI_DEV_GPU_UTIL per rank, the percent of the last second the engine was stepping "
                        "(default: off)")
    p.add_argument("--dcgm-gpu-util", type=float, metavar="PCT",
                   help="with --dcgm-port: report this utilization (0-100) instead of the measured one")
    p.add_argument("--dcgm-pod", metavar="NAME", default="",
                   help="with --dcgm-port: label the samples pod=NAME, as an exporter in Kubernetes mode does "
                        "(default: no pod label, as a sidecar's)")
    p.add_argument("--embedding-dim", type=int, metavar="N",
                   help=f"length of /v1/embeddings vectors (default {DEFAULT_EMBEDDING_DIM})")
    p.add_argument("--kv-events-port", type=int, metavar="PORT",
                   help="publish KV events (vLLM's ZMQ format) on tcp://*:PORT, 0 = any free port; "
                        "topic kv@<host:port>@<model>")
    p.add_argument("--kv-events-config", metavar="JSON",
                   help="vLLM's --kv-events-config: {enable_kv_cache_events, publisher: zmq, endpoint, topic}, "
                        "plus encoding: map (vLLM 0.32, default) | array (older vLLM)")
    dp = p.add_argument_group("data parallel (one DP group of ranks stepping in lockstep, as an MoE model "
                              "with expert parallelism)")
    dp.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                    help="ranks in the group, all in this process (default %(default)s)")
    dp.add_argument("--data-parallel-size-local", type=int, metavar="N",
                    help="ranks in this process: must equal --data-parallel-size")
    dp.add_argument("--data-parallel-start-rank", type=int, default=0, metavar="R",
                    help="global rank of local rank 0 (default %(default)s)")
    lb = dp.add_mutually_exclusive_group()
    lb.add_argument("--data-parallel-external-lb", action="store_true",
                    help="one API server per rank: local rank i on --port + i (or the i-th of --rank-ports)")
    lb.add_argument("--data-parallel-hybrid-lb", action="store_true",
                    help="one API server per node balancing over its local ranks; here: one API port, "
                         "as without an LB flag")
    dp.add_argument("--rank-ports", type=_ports, metavar="P0,P1,...",
                    help="external LB: the ranks' API ports instead of --port + i (sim only, for launchers)")
    dp.add_argument("--kv-events-ports", type=_ports, metavar="K0,K1,...",
                    help="local rank i publishes KV events on the i-th (default: the --kv-events-port or "
                         "--kv-events-config port + global rank, as vLLM)")
    dp.add_argument("--dp-all2all-s", type=float, metavar="SECONDS",
                    help="cost of one group step's expert all-to-alls, added to every step of a group of "
                         "2+ ranks (profile default)")
    return p


DEFAULT_PORT = 8000


def _ports(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated port numbers, got {text!r}") from None


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def config_from_args(args: argparse.Namespace) -> SimConfig:
    if args.rank_ports and args.port is not None and args.port != args.rank_ports[0]:
        raise ConfigError(f"rank-ports: local rank 0 serves on the first of them ({args.rank_ports[0]}), "
                          f"but --port says {args.port}; give the same port or leave --port out")
    if args.kv_events_ports and args.kv_events_port is not None:
        raise ConfigError("kv-events-ports: give --kv-events-port or --kv-events-ports, not both")
    kv_events = _kv_events(args)
    if args.kv_events_ports and kv_events is None:
        kv_events = KVEventsConfig("tcp://*:0")  # the per-rank ports below replace this endpoint's
    lb = "external" if args.data_parallel_external_lb else "hybrid" if args.data_parallel_hybrid_lb else "internal"
    return SimConfig.from_profile(
        args.profile,
        host=args.host,
        port=args.port if args.port is not None else args.rank_ports[0] if args.rank_ports else DEFAULT_PORT,
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
        kv_events=kv_events,
        control_port=args.control_port,
        embedding_dim=args.embedding_dim,
        dcgm=_dcgm(args),
        dp_all2all_s=args.dp_all2all_s,
        data_parallel=DataParallelConfig(
            size=args.data_parallel_size,
            size_local=args.data_parallel_size_local,
            start_rank=args.data_parallel_start_rank,
            lb=lb,
            rank_ports=args.rank_ports or (),
            kv_events_ports=args.kv_events_ports or (),
        ),
    )


def _dcgm(args: argparse.Namespace) -> DcgmConfig | None:
    if args.dcgm_port is None:
        if args.dcgm_gpu_util is not None or args.dcgm_pod:
            raise ConfigError("dcgm-gpu-util, dcgm-pod: only with --dcgm-port")
        return None
    return DcgmConfig(args.dcgm_port, args.dcgm_gpu_util, args.dcgm_pod)


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
    sim = create(config)
    await sim.start()
    servers = sim.servers if isinstance(sim, DataParallelSim) else [sim]
    dp = config.data_parallel
    if dp.enabled:
        log.info("vllm-sim data-parallel group: ranks %d-%d (%s LB), lockstep, all-to-all %g s per step",
                 dp.global_ranks[0], dp.global_ranks[-1], dp.lb, config.dp_all2all_s if dp.size > 1 else 0.0)
    for server in servers:
        log.info("vllm-sim %s serving %s on %s (profile %s, time-scale %g)",
                 server.name, ",".join(config.models), server.url, config.profile, config.time_scale)
        if config.control_port is not None:
            log.info("control endpoints (/sim/*) on %s only", server.control_url)
        if server.dcgm_port:
            log.info("DCGM exporter stand-in (DCGM_FI_DEV_GPU_UTIL) on port %d", server.dcgm_port)
        for rank in server.ranks:
            if rank.kv_events is not None:
                log.info("rank %d publishing KV events on tcp://*:%d, topic %s",
                         rank.rank, rank.kv_events.port, rank.kv_events.topic.decode())
    try:
        await stop.wait()
    finally:
        await sim.stop()


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
