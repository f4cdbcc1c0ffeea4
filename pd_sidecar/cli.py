"""`pd-sidecar` command line: flags -> SidecarConfig -> a Sidecar that runs until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from pd_sidecar.server import Sidecar, SidecarConfig

log = logging.getLogger("pd_sidecar")


def _port_list(value: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated port numbers, got {value!r}") from None
    return ports


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-sidecar", description="P/D sidecar in front of a decode server.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=None,
                   help="port to bind (rank 0's with --data-parallel-size), 0 = any free (default 8000)")
    p.add_argument("--decoder", required=True, metavar="URL",
                   help="the decode server this sidecar fronts, e.g. http://127.0.0.1:8200 "
                        "(rank 0's with --data-parallel-size)")
    dp = p.add_argument_group("data parallel (llm-d's --data-parallel-size)")
    dp.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                    help="serve N ranks: rank r on --port + r in front of the decoder's port + r (default 1)")
    dp.add_argument("--rank-ports", type=_port_list, default=(), metavar="P0,P1,...",
                    help="rank r's port, instead of --port + r (one per rank; e.g. ports a launcher reserved)")
    dp.add_argument("--decoder-rank-ports", type=_port_list, default=(), metavar="Q0,Q1,...",
                    help="rank r's decoder port on --decoder's host, instead of its port + r (one per rank)")
    dp.add_argument("--pod-ip", default=None, metavar="ADDRESS",
                    help="the address the EPP names this pod by in x-data-parallel-host-port (default $POD_IP, "
                         "else --host unless it is a wildcard; with neither only the port is checked)")
    p.add_argument("--prefill-retries", type=int, default=2,
                   help="extra prefill attempts after 502/503/504 or a connection error (default %(default)s)")
    p.add_argument("--prefill-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="limit per prefill attempt; past it the decoder prefills locally (default %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="TCP connect limit for both legs (default %(default)s)")
    p.add_argument("--log-level", default="INFO", help="(default %(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> SidecarConfig:
    if args.port is None:
        port = args.rank_ports[0] if args.rank_ports else 8000
    else:
        port = args.port
    pod_ip = args.pod_ip if args.pod_ip is not None else os.environ.get("POD_IP", "")
    config = SidecarConfig(decoder=args.decoder, host=args.host, port=port,
                           prefill_retries=args.prefill_retries, prefill_timeout_s=args.prefill_timeout,
                           connect_timeout_s=args.connect_timeout, data_parallel_size=args.data_parallel_size,
                           rank_ports=args.rank_ports, decoder_rank_ports=args.decoder_rank_ports,
                           pod_ip=pod_ip.strip())
    config.validate()
    return config


async def serve(config: SidecarConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    sidecar = Sidecar(config)
    await sidecar.start()
    for rank, url in zip(sidecar.ranks, sidecar.urls, strict=True):
        log.info("pd-sidecar rank %d on %s in front of %s", rank.index, url, rank.decoder)
    if config.data_parallel_size > 1 and not sidecar.rank_table.address:
        log.warning("no pod address (--pod-ip, $POD_IP, or a specific --host): x-data-parallel-host-port "
                    "is matched on its port only")
    try:
        await stop.wait()
    finally:
        await sidecar.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"pd-sidecar: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
