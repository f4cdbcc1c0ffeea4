"""header-profile-handler (llm-d): run the one scheduling profile a request header names.

For a caller that already knows which stage a call is for (encode, prefill, decode) and makes one
call per stage. With one profile configured, that profile always runs. With several: the profile named
by the header `headerName` (default `EPP-Profile`, matched lowercased as the EPP sees header names; the
value trimmed and matched exactly); a missing or blank header runs `defaultProfile` (default `decode`).
A value naming no profile, or a missing header when `defaultProfile` is not a profile either, is
refused with 400 and the reason (llm-d answers these 429 without a reason, which its README calls
misleading). The named profile's pick is the destination; nothing else is added to the request.

`header-phase-profile-handler` is the same handler under the name it had in llm-d-router PR #2134 before
it merged (renamed with its default header `EPP-Phase` -> `EPP-Profile`; no llm-d release registers
it). llm-d's coordinator guides built on that PR's image name it, and their coordinator sends
`EPP-Phase`, so under the old name the default header stays `EPP-Phase`; it loads with a warning.
"""

from __future__ import annotations

from collections.abc import Mapping

from pickers.framework.errors import BAD_REQUEST, RequestError, shown
from pickers.framework.params import Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import (
    CycleState,
    ProfileOutcome,
    SchedulingProfile,
    SchedulingResult,
)
from pickers.plugins.base import Plugin, PluginContext

DEFAULT_HEADER = "EPP-Profile"
PHASE_HEADER = "EPP-Phase"  # the pre-release header-phase-profile-handler's default
DEFAULT_PROFILE = "decode"


class HeaderProfileHandler(Plugin):
    type = "header-profile-handler"
    default_header = DEFAULT_HEADER

    def __init__(self, name: str | None = None, *, header: str = "", default_profile: str = DEFAULT_PROFILE) -> None:
        self.name = name or self.type
        # as llm-d: both trimmed, an empty one means the default; header names are lowercase at the EPP
        self.header = header.strip().lower() or self.default_header.lower()
        self.default_profile = default_profile.strip() or DEFAULT_PROFILE
        self.bind_warnings: list[str] = []  # the loader reports them with the plugin's

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> HeaderProfileHandler:
        handler = cls(
            name,
            header=p.string("headerName", cls.default_header) or "",
            default_profile=p.string("defaultProfile", DEFAULT_PROFILE) or "",
        )
        p.effective["headerName"] = handler.header
        p.effective["defaultProfile"] = handler.default_profile
        return handler

    def bind(self, plugins: Mapping[str, object], profiles: Mapping[str, SchedulingProfile]) -> None:
        if len(profiles) > 1 and self.default_profile not in profiles:
            # llm-d loads this too and fails only the requests without the header
            self.bind_warnings.append(
                f"defaultProfile {shown(self.default_profile)} is not a scheduling profile ({', '.join(profiles)}): "
                f"requests without the {self.header} header are refused"
            )

    def pick(
        self,
        request: InferenceRequest,
        cycle: CycleState,
        profiles: Mapping[str, SchedulingProfile],
        results: Mapping[str, ProfileOutcome],
    ) -> list[SchedulingProfile]:
        if results:
            return []  # the one profile ran
        if len(profiles) == 1:
            return list(profiles.values())
        profile = profiles.get(self._wanted(request))
        return [] if profile is None else [profile]

    def process_results(
        self, request: InferenceRequest, cycle: CycleState, results: Mapping[str, ProfileOutcome]
    ) -> SchedulingResult:
        if not results:
            value = request.headers.get(self.header, "").strip()
            if value:
                raise RequestError(BAD_REQUEST, f"no scheduling profile configured for {self.header} header value {shown(value)}")
            raise RequestError(
                BAD_REQUEST, f"missing {self.header} header, and defaultProfile {shown(self.default_profile)} is not a scheduling profile"
            )
        name, outcome = next(iter(results.items()))
        if isinstance(outcome, RequestError):
            raise outcome
        return SchedulingResult(outcome, name)

    def _wanted(self, request: InferenceRequest) -> str:
        return request.headers.get(self.header, "").strip() or self.default_profile


class HeaderPhaseProfileHandler(HeaderProfileHandler):
    """The pre-release name of header-profile-handler: the same parameters, default header EPP-Phase."""

    type = "header-phase-profile-handler"
    default_header = PHASE_HEADER

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> HeaderProfileHandler:
        handler = super().from_config(name, p, ctx)
        p.warnings.append(
            f"plugin type {cls.type} is the pre-release name of {HeaderProfileHandler.type} (llm-d-router PR #2134, "
            f"renamed before it merged, with its default header {PHASE_HEADER} -> {DEFAULT_HEADER}); loaded as "
            f"{HeaderProfileHandler.type} with headerName {shown(handler.header)}"
        )
        return handler
