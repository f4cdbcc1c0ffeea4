"""DataParallelSim: one data-parallel group with an API server per rank (vLLM's external LB).

Each rank gets its own SimServer on its own port (local rank i on port + i, or rank_ports[i]),
with that rank's /metrics, /sim/stats, x-served-by and KV-event endpoint, so a router sees every
rank as its own endpoint. All ranks step in one LockstepGroup. Internal and hybrid LB (one API
port for the group) are a plain SimServer with several ranks; `create()` picks the right one.
"""

from __future__ import annotations

from dataclasses import replace

from vllm_sim.config import SimConfig
from vllm_sim.lockstep import LockstepGroup
from vllm_sim.rank import build_ranks
from vllm_sim.server import SimServer


class DataParallelSim:
    """`await start()`, then `servers[i]` serves local rank i; `await stop()` always."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        dp = config.data_parallel
        ranks = build_ranks(config)
        self.group = LockstepGroup([r.engine for r in ranks], config.time_scale, config.dp_all2all_s)
        self.servers = [
            SimServer(replace(config, port=port, name=f"{config.name}-dp{rank.rank}" if config.name else None),
                      ranks=[rank])
            for rank, port in zip(ranks, dp.api_ports(config.port))
        ]

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    async def start(self) -> list[int]:
        await self.group.start()
        try:
            for server in self.servers:
                await server.start()
        except BaseException:
            await self.stop()
            raise
        return self.ports

    async def stop(self) -> None:
        # The step loop first: it fails every unfinished request, so the handlers return promptly.
        await self.group.stop()
        for server in self.servers:
            await server.stop()

    async def __aenter__(self) -> DataParallelSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def create(config: SimConfig) -> SimServer | DataParallelSim:
    """What config describes: a server per rank for external LB, else one server for all ranks."""
    dp = config.data_parallel
    if dp.lb == "external":
        return DataParallelSim(config)
    return SimServer(config)
