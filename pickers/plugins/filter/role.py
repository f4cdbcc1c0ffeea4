"""prefill-filter / decode-filter / encode-filter: disaggregation roles from the `llm-d.ai/role` label,
as llm-d reads them. A role names the stages an endpoint runs (`encode-prefill-decode`: all three).
Decode keeps `decode`, `prefill-decode`, `both` (llm-d's deprecated `prefill-decode`),
`encode-prefill-decode` and unlabelled endpoints; prefill keeps `prefill`, `encode-prefill`,
`prefill-decode`, `both`, `encode-prefill-decode`; encode keeps `encode`, `encode-prefill`,
`encode-prefill-decode`. Only decode keeps an unlabelled endpoint.

decode-filter's `prefillEndpointsBelowTokens` (ours; 0, off, as llm-d): a request whose prompt is
shorter than that many tokens also keeps the prefill endpoints with a decode endpoint's KV geometry
(`vllm:cache_config_info` block size and count: the same accelerator, not a CPU prefill box), which
then serve it whole (vLLM's kv_both servers do: a request with no KV-transfer parameters is an
ordinary one). With more prefill
than decode servers, short requests need not queue on the few decoders while the prefill servers idle;
disagg-profile-handler never disaggregates a request whose pick is a prefill-only endpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

from pickers.framework.endpoint import ROLE_LABEL, Endpoint
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin, PluginContext

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

    def __init__(self, name: str | None = None, *, prefill_below_tokens: int = 0) -> None:
        super().__init__(name)
        self.prefill_below_tokens = prefill_below_tokens

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> DecodeFilter:
        return cls(name, prefill_below_tokens=p.integer("prefillEndpointsBelowTokens", 0, minimum=0))

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        if request.prompt_tokens >= self.prefill_below_tokens:
            return super().filter(request, cycle, endpoints)
        # decode endpoints, and the prefill endpoints with a decode endpoint's KV geometry (the same
        # accelerator, as latency-pd-decider takes it): a CPU prefill box would decode ~10x slower
        geometries = {_geometry(ep) for ep in endpoints if decodes(ep)}
        geometries.discard(None)
        return [ep for ep in endpoints if decodes(ep) or (ep.labels.get(ROLE_LABEL) in PREFILL_ROLES and _geometry(ep) in geometries)]


def _geometry(ep: Endpoint) -> tuple[int, int] | None:
    """(KV block size, KV blocks) from `vllm:cache_config_info`; None until scraped."""
    m = ep.metrics
    return None if m.block_size is None or m.num_gpu_blocks is None else (m.block_size, m.num_gpu_blocks)


def decodes(ep: Endpoint) -> bool:
    """Whether the endpoint runs decode (an unlabelled one does)."""
    role = ep.labels.get(ROLE_LABEL)
    return role is None or role in DECODE_ROLES


class EncodeFilter(_RoleFilter):
    type = "encode-filter"
    roles = ENCODE_ROLES
