"""probabilistic-admitter (llm-d): sheds sheddable requests with a probability that rises with load.

Requests with priority >= 0 are always admitted. For a sheddable one (priority < 0) the pool's
saturation is the mean over candidates of `max(waiting / queueDepthThreshold, kv_usage /
kvCacheUtilThreshold)` (an endpoint never scraped counts 1.0), and the request is refused (429) with
probability `min(saturation^power * k, 1)`: with the defaults (power 5, k 300) about 2% at 0.15 and all
of them from about 0.34. It runs before flow control's queues (and before scheduling without them).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import SATURATED, RequestError
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.plugins.base import Plugin, PluginContext


class ProbabilisticAdmitter(Plugin):
    type = "probabilistic-admitter"

    def __init__(self, name: str, rng: random.Random, *, queue_depth: int = 5, kv_cache_util: float = 0.8,
                 power: float = 5.0, k: float = 300.0) -> None:  # fmt: skip
        self.name = name
        self.rng = rng
        self.queue_depth = float(queue_depth)
        self.kv_cache_util = kv_cache_util
        self.power = power
        self.k = k

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> ProbabilisticAdmitter:
        return cls(
            name,
            ctx.rng,
            queue_depth=p.integer("queueDepthThreshold", 5, minimum=1),
            kv_cache_util=p.number("kvCacheUtilThreshold", 0.8, positive=True),
            power=p.number("power", 5.0, positive=True),
            k=p.number("k", 300.0, positive=True),
        )

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        total = 0.0
        for ep in endpoints:
            m = ep.metrics
            if m.updated_at == 0.0:  # never scraped: llm-d's nil metrics
                total += 1.0
            else:
                total += max(m.waiting / self.queue_depth, m.kv_usage / self.kv_cache_util)
        return total / len(endpoints)

    def admit_request(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        if request.priority >= 0 or not endpoints:
            return
        saturation = self.saturation(endpoints)
        prob = min(saturation**self.power * self.k, 1.0)
        if self.rng.random() < prob:
            raise RequestError(SATURATED, f"probabilistic-admitter: rejected, saturation={saturation:.3f} prob={prob:.2f}",
                               rule=self.name)  # fmt: skip
