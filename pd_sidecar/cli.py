"""`pd-sidecar` command line: flags -> SidecarConfig -> a Sidecar that runs until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from pd_sidecar.server import Sidecar, SidecarConfig

log = logging.getLogger("pd_sidecar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-sidecar", description="P/D sidecar in front of a decode server.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to bind, 0 = any free (default %(default)s)")
    p.add_argument("--decoder", required=True, metavar="URL",
                   help="the decode server this sidecar fronts, e.g. http://127.0.0.1:8200")
    p.add_argument("--prefill-retries", type=int, default=2,
                   help="extra prefill attempts after 502/503/504 or a connection error (default %(default)s)")
    p.add_argument("--prefill-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="limit per prefill attempt; past it the decoder prefills locally (default %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="TCP connect limit for both legs (default %(default)s)")
    p.add_argument("--log-level", default="INFO", help="(default %(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> SidecarConfig:
    config = SidecarConfig(decoder=args.decoder, host=args.host, port=args.port,
                           prefill_retries=args.prefill_retries, prefill_timeout_s=args.prefill_timeout,
                           connect_timeout_s=args.connect_timeout)
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
    log.info("pd-sidecar on %s in front of %s", sidecar.url, config.decoder)
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
