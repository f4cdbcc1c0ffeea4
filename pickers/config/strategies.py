"""Built-in scheduling strategies selectable by name (`epp serve --strategy`), each an EndpointPickerConfig.

`default` is the reference picker's default config (`pickers.config.loader.DEFAULT_CONFIG_TEXT`): queue 2,
kv-cache 2, prefix-cache 3, max-score. `best` is ours (pickers/configs/best.yaml: the latency model's cost
per endpoint); `weighted` our previous one (weighted cache and load scores). The others are baselines.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import MappingProxyType

from pickers.config.loader import DEFAULT_CONFIG_TEXT, load_config
from pickers.framework.errors import ConfigError
from pickers.framework.types import SchedulingProfile
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import PluginContext

# the built-in configs (best.yaml, pd.yaml) ship as data beside this package: pickers/configs/
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

_HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"

STRATEGY_CONFIGS = MappingProxyType(
    {
        "default": DEFAULT_CONFIG_TEXT,
        "best": (CONFIGS / "best.yaml").read_text(),
        "weighted": (CONFIGS / "weighted.yaml").read_text(),  # the previous best: weighted cache and load scores
        # no schedulingProfiles: one `default`-style profile with every plugin, weight 1
        "load": _HEADER + "plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n",
        "random": _HEADER + "plugins:\n- type: random-picker\n",
        "round-robin": _HEADER + "plugins:\n- type: round-robin-picker\n",
    }
)
STRATEGIES = tuple(STRATEGY_CONFIGS)
# What `epp serve` and `epp up` run without --strategy or a config: ours, not the reference's `default`
# (on agent traffic `default` is 2x worse than round-robin at p90 TTFT, `best` 4x better; docs/benchmarks.md).
DEFAULT_STRATEGY = "best"


def strategy_config(strategy: str) -> str:
    """The EndpointPickerConfig text of a built-in strategy; ConfigError naming --strategy if unknown."""
    text = STRATEGY_CONFIGS.get(strategy)
    if text is None:
        raise ConfigError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}", field="--strategy")
    return text


def build_profile(
    strategy: str, index: ApproxPrefixIndex, *, max_endpoints: int = 1, rng: random.Random | None = None
) -> SchedulingProfile:
    text = strategy_config(strategy)
    ctx = PluginContext(prefix_index=index, rng=rng or random.Random(), max_endpoints=max_endpoints)
    return load_config(text, f"--strategy {strategy}", ctx).profile
