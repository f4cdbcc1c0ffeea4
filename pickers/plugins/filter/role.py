"""prefill-filter / decode-filter / encode-filter: disaggregation roles from the `llm-d.ai/role` label,
as llm-d reads them. A role names the stages an endpoint runs (`encode-prefill-decode`: all three).
Decode keeps `decode`, `prefill-decode`, `both` (llm-d's deprecated `prefill-decode`),
`encode-prefill-decode` and unlabelled endpoints; prefill keeps `prefill`, `encode-prefill`,
`prefill-decode`, `both`, `encode-prefill-decode`; encode keeps `encode`, `encode-prefill`,
`encode-prefill-decode`. Only decode keeps an unlabelled endpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import ROLE_LABEL, Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin

PREFILL_ROLES = frozenset({"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"})
DECODE_ROLES = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
ENCODE_ROLES = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})


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


class EncodeFilter(_RoleFilter):
    type = "encode-filter"
    roles = ENCODE_ROLES
