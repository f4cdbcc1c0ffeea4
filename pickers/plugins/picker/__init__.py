"""Pickers: scored candidates in, the chosen endpoints out (first = primary, rest = fallbacks)."""

from __future__ import annotations

from pickers.framework.params import Params
from pickers.plugins.base import PluginContext


def max_endpoints_param(p: Params, ctx: PluginContext) -> int:
    """`maxNumOfEndpoints`, every picker's parameter; left out, it is `--max-num-endpoints` (default 1)."""
    return p.integer("maxNumOfEndpoints", ctx.max_endpoints, minimum=1)
