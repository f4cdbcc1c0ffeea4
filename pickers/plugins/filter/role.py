"""prefill-filter / decode-filter: P/D roles from the `llm-d.ai/role` label. Decode keeps `decode`,
`prefill-decode`, `both` and unlabelled endpoints; prefill keeps `prefill`, `prefill-decode`, `both`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import ROLE_LABEL, Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin

PREFILL_ROLES = frozenset({"prefill", "prefill-decode", "both"})
DECODE_ROLES = frozenset({"decode", "prefill-decode", "both"})


class _RoleFilter(Plugin):
    type = ""
    roles: frozenset[str] = frozenset()
    keeps_unlabelled = False

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        out = []
        for ep in endpoints:
            role = ep.labels.get(ROLE_LABEL)
            if role in self.roles or (role is None and self.keeps_unlabelled):
                out.append(ep)
        return out


class PrefillFilter(_RoleFilter):
    type = "prefill-filter"
    roles = PREFILL_ROLES


class DecodeFilter(_RoleFilter):
    type = "decode-filter"
    roles = DECODE_ROLES
    keeps_unlabelled = True
