"""SimRank: one engine with its own metrics and KV-event endpoint, as one vLLM engine core.

Without data parallelism a simulator has one rank (rank 0). A data-parallel group has one per
DP rank, each with its own KV cache, queue and running batch; the ranks step together in a
LockstepGroup (vllm_sim/lockstep.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vllm_sim.config import SimConfig
from vllm_sim.engine import Engine
from vllm_sim.kv_events import KVEventPublisher, KVEventsConfig
from vllm_sim.metrics import SimMetrics


@dataclass(slots=True, eq=False)
class SimRank:
    rank: int  # global DP rank: the metrics' engine label and the KV events' dp-rank
    engine: Engine
    metrics: SimMetrics
    kv_events_config: KVEventsConfig | None  # this rank's own endpoint; None = no KV events
    name: str = ""  # x-served-by of what this rank serves; set once its server's port is bound
    kv_events: KVEventPublisher | None = None  # bound by the server that serves this rank


def build_ranks(config: SimConfig) -> list[SimRank]:
    """The engines config describes: one, or one per rank of its data-parallel group."""
    dp = config.data_parallel
    endpoints = dp.kv_endpoints(config.kv_events) if config.kv_events is not None else [None] * dp.size
    ranks = []
    for rank, endpoint in zip(dp.global_ranks, endpoints):
        metrics = SimMetrics(config, engine=rank)
        engine = Engine(config, observer=metrics)
        metrics.watch(engine)
        kv = replace(config.kv_events, endpoint=endpoint) if config.kv_events is not None and endpoint else None
        ranks.append(SimRank(rank, engine, metrics, kv))
    return ranks
