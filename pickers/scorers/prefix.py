"""prefix-cache-scorer: the share of the prompt's leading blocks an endpoint probably holds.

It reads the approximate index before the pick and records the prompt's blocks for the chosen
endpoint after it (PreRequest), sizing that endpoint's LRU from its reported KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from extproc.datastore import Endpoint
from extproc.inference_request import InferenceRequest
from pickers.prefix_index import BLOCK_TOKENS, ApproxPrefixIndex, block_hashes
from pickers.types import CycleState, SchedulingResult

_HASHES = "prefix-cache-scorer/hashes"


class PrefixCacheScorer:
    type = "prefix-cache-scorer"
    category = "affinity"

    def __init__(self, index: ApproxPrefixIndex, name: str = "prefix-cache-scorer") -> None:
        self.name = name
        self.index = index

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        hashes = block_hashes(request.model, request.prompt_text, _cache_salt(request))
        cycle.data[_HASHES] = hashes
        if not hashes:
            return [0.0] * len(endpoints)
        matched = self.index.match(hashes)
        total = len(hashes)
        return [matched.get(ep.address, 0) / total for ep in endpoints]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        hashes = cycle.data.get(_HASHES)
        if not hashes or not result.endpoints:
            return
        ep = result.endpoints[0]
        m = ep.metrics
        capacity = None
        if m.num_gpu_blocks:
            capacity = max(1, m.num_gpu_blocks * (m.block_size or BLOCK_TOKENS) // BLOCK_TOKENS)
        self.index.record(ep.address, hashes, capacity)  # type: ignore[arg-type]


def _cache_salt(request: InferenceRequest) -> str:
    salt = request.body.get("cache_salt") if request.body else None
    return salt if isinstance(salt, str) else ""
