"""`data-parallel-profile-handler` (llm-d's, deprecated there): route a data-parallel rank through the
pod's primary port, for gateways that could not send traffic to every rank port themselves.

The one scheduling profile picks a rank endpoint (`podIP:rankPort`, one per InferencePool targetPort).
The request then goes to `podIP:primaryPort` with header `x-data-parallel-host-port: podIP:rankPort`,
and a sidecar on the primary port forwards it to that rank. Fallback endpoints are rewritten the same
way, as in llm-d (the header names only the primary's rank). The rewrite is only what the proxy is
told (SchedulingResult.destination_port): in-flight counts, the prefix index and metrics stay on the
rank endpoint that was picked.

`primaryPort` (default 8000) 1-65535; 0 rewrites nothing, the header is still set. llm-d accepts 0 too
but then sends the request to port 0, which no server listens on; 0 here means what
`pd-profile-handler`'s 0 means in llm-d: no rewrite.
"""

from __future__ import annotations

from collections.abc import Mapping

from pickers.framework.errors import RequestError
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, ProfileOutcome, SchedulingProfile, SchedulingResult
from pickers.plugins.base import Plugin, PluginContext

DATA_PARALLEL_HEADER = "x-data-parallel-host-port"
DEFAULT_PRIMARY_PORT = 8000


def primary_port(p: Params, default: int) -> int:
    """llm-d's `primaryPort`: 0 (no rewrite) or a port."""
    port = p.integer("primaryPort", default, minimum=0)
    if port > 65535:
        raise ParameterError(p.path("primaryPort"), f"expected a port 1-65535 (or 0: no rewrite), got {port}")
    return port


def route_through_primary_port(result: SchedulingResult, port: int) -> None:
    """Name the picked rank in the header and, with a port, send the proxy to that port of each chosen
    endpoint's host (llm-d's data-parallel rewrite, shared by pd-profile-handler's primaryPort)."""
    result.request_headers[DATA_PARALLEL_HEADER] = result.endpoints[0].address
    result.destination_port = port


class DataParallelProfileHandler(Plugin):
    """Exactly one profile; its pick goes through `primaryPort` with the rank in the header."""

    type = "data-parallel-profile-handler"

    def __init__(self, name: str | None = None, *, primary_port: int = DEFAULT_PRIMARY_PORT) -> None:
        super().__init__(name)
        self.primary_port = primary_port
        self._profile: SchedulingProfile | None = None
        self.bind_warnings: list[str] = []  # for the loader

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> DataParallelProfileHandler:
        # llm-d logs this when it builds the plugin; the loader logs our warnings once per load
        p.warnings.append(
            "deprecated in llm-d: use single-profile-handler (each rank port is its own endpoint, routed to "
            "directly; needs a gateway that honours the endpoint's port, e.g. Istio >= 1.28.1)"
        )
        return cls(name, primary_port=primary_port(p, DEFAULT_PRIMARY_PORT))

    def bind(self, plugins: Mapping[str, object], profiles: Mapping[str, SchedulingProfile]) -> None:
        if len(profiles) != 1:
            # llm-d loads this and then fails every request; refusing it at load says why
            raise ParameterError("", f"runs exactly one scheduling profile, got {len(profiles)}: {', '.join(profiles)}")
        self._profile = next(iter(profiles.values()))
        fallbacks = getattr(self._profile.picker, "max_endpoints", 1)
        self.bind_warnings = []
        if fallbacks > 1 and self.primary_port:
            self.bind_warnings.append(
                f"profile {self._profile.name!r} picks up to {fallbacks} endpoints: the fallbacks are sent to their "
                f"pods' port {self.primary_port} too, but {DATA_PARALLEL_HEADER} names only the primary's rank, so a "
                "fallback on another pod is refused by its sidecar (as in llm-d); maxNumOfEndpoints: 1 avoids it"
            )

    def pick(
        self,
        request: InferenceRequest,
        cycle: CycleState,
        profiles: Mapping[str, SchedulingProfile],
        results: Mapping[str, ProfileOutcome],
    ) -> list[SchedulingProfile]:
        assert self._profile is not None, "bind() first"
        return [] if results else [self._profile]

    def process_results(
        self, request: InferenceRequest, cycle: CycleState, results: Mapping[str, ProfileOutcome]
    ) -> SchedulingResult:
        name, outcome = next(iter(results.items()))
        if isinstance(outcome, RequestError):
            raise outcome
        result = SchedulingResult(outcome, name)
        route_through_primary_port(result, self.primary_port)
        return result
