"""The llm-d router's plugin types that llm-epp does not implement, each with the reason (and names
llm-d uses only inside a plugin, which its configs cannot name either).

A config naming one is refused with that reason (not just "unknown plugin type"), so a user moving a
config over learns what is missing and why; docs/configuration.md#what-llm-epp-refuses lists them.
A type leaves this table when it is implemented (the registry refuses a type in both places).
"""

from __future__ import annotations

from types import MappingProxyType

UNSUPPORTED_TYPES = MappingProxyType(
    {
        # others
        # not a type in llm-d either (its runner registers only the screener): the screener's own Pod watch
        "disaggregatedset-rollout-pod-extractor": "it is not a plugin type in llm-d either, but the Pod watch "
        "disaggregatedset-rollout-screener makes for itself; configure that screener (llm-epp counts its pods "
        "from the pool's endpoints)",
        "header-based-testing-filter": "a test-only plugin of the llm-d router",
        "destination-endpoint-served-verifier": "a test-only plugin of the llm-d router",
    }
)
