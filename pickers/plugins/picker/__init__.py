"""Pickers: scored candidates in, the chosen endpoints out (first = primary, rest = fallbacks)."""

from __future__ import annotations

import random

from pickers.framework.params import Params
from pickers.plugins.base import Plugin, PluginContext


class EndpointPicker(Plugin):
    """What every picker takes: `maxNumOfEndpoints` (left out, `--max-num-endpoints`, default 1: more
    are fallbacks) and the shared random source."""

    def __init__(self, max_endpoints: int = 1, rng: random.Random | None = None, name: str | None = None) -> None:
        super().__init__(name)
        self.max_endpoints = max_endpoints
        self.rng = rng or random.Random()

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> EndpointPicker:
        return cls(p.integer("maxNumOfEndpoints", ctx.max_endpoints, minimum=1), ctx.rng, name)
