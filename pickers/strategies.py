"""Built-in scheduling strategies selectable by name (`epp serve --strategy`).

`default` is the reference picker's default profile: queue 2, kv-cache 2, prefix-cache 3, max-score.
The others are baselines for comparison.
"""

from __future__ import annotations

import random

from extproc.errors import ConfigError
from pickers.picker.max_score import MaxScorePicker
from pickers.picker.random import RandomPicker
from pickers.picker.round_robin import RoundRobinPicker
from pickers.prefix_index import ApproxPrefixIndex
from pickers.scheduler import SchedulingProfile, WeightedScorer
from pickers.scorers.kv_cache import KVCacheUtilizationScorer
from pickers.scorers.prefix import PrefixCacheScorer
from pickers.scorers.queue import QueueScorer

STRATEGIES = ("default", "load", "random", "round-robin")


def build_profile(
    strategy: str, index: ApproxPrefixIndex, *, max_endpoints: int = 1, rng: random.Random | None = None
) -> SchedulingProfile:
    if strategy == "default":
        return SchedulingProfile(
            "default",
            MaxScorePicker(max_endpoints, rng),
            [
                WeightedScorer(QueueScorer(), 2),
                WeightedScorer(KVCacheUtilizationScorer(), 2),
                WeightedScorer(PrefixCacheScorer(index), 3),
            ],
        )
    if strategy == "load":
        return SchedulingProfile(
            "load",
            MaxScorePicker(max_endpoints, rng),
            [WeightedScorer(QueueScorer(), 1), WeightedScorer(KVCacheUtilizationScorer(), 1)],
        )
    if strategy == "random":
        return SchedulingProfile("random", RandomPicker(max_endpoints, rng))
    if strategy == "round-robin":
        return SchedulingProfile("round-robin", RoundRobinPicker(max_endpoints))
    raise ConfigError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}", field="--strategy")
