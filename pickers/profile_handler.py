"""Profile handlers decide which scheduling profiles run for a request and how their results combine.

Only `single-profile-handler` (run the one profile, use its pick) exists so far; the config loader
refuses several profiles and `disagg-profile-handler` until multi-profile scheduling lands.
"""

from __future__ import annotations

from pickers.params import Params
from pickers.types import PluginContext


class SingleProfileHandler:
    type = "single-profile-handler"

    def __init__(self, name: str = "single-profile-handler") -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> SingleProfileHandler:
        return cls(name)
