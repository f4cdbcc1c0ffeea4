"""lora-affinity-scorer: prefer endpoints where the requested adapter (the request's model) is already
running (1.0), then endpoints with room to load another adapter (0.8), then ones where it is waiting
to load (0.6); else 0. An endpoint that reports no LoRA info has no room we know of.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin

RUNNING, ROOM, WAITING = 1.0, 0.8, 0.6


class LoraAffinityScorer(Plugin):
    type = "lora-affinity-scorer"
    category = "affinity"

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        adapter = request.model
        out = []
        for ep in endpoints:
            m = ep.metrics
            if adapter in m.running_lora_adapters:
                out.append(RUNNING)
            elif m.max_lora is not None and len(m.running_lora_adapters | m.waiting_lora_adapters) < m.max_lora:
                out.append(ROOM)
            elif adapter in m.waiting_lora_adapters:
                out.append(WAITING)
            else:
                out.append(0.0)
        return out
