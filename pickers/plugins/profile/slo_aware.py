"""slo-aware-profile-handler: the profile handler of GIE's unreleased slo-prediction-experimental branch
(with slo-request-tracker and slo-scorer, latency/slo_branch.py), in the form its configs were written
for: profiles `default` and `slo`.

Every profile runs for every request; the pick is the `slo` profile's when the request's header
`x-prediction-based-scheduling` is true (Go's ParseBool: 1, t, T, TRUE, true, True), else the `default`
profile's. A value that is not a bool is a 400, as the branch answered; a failed chosen profile fails
the request with its reason. The other profile's pick is not used (no prefix recorded, nothing charged
there). Without both profiles every request would fail in the branch; here the config is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

from pickers.framework.errors import RequestError, shown
from pickers.framework.params import ParameterError
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, ProfileOutcome, SchedulingProfile, SchedulingResult
from pickers.plugins.base import Plugin
from pickers.plugins.latency.slo_branch import PREDICTION_HEADER, prediction_based

DEFAULT_PROFILE, SLO_PROFILE = "default", "slo"


class SloAwareProfileHandler(Plugin):
    type = "slo-aware-profile-handler"

    def bind(self, plugins: Mapping[str, object], profiles: Mapping[str, SchedulingProfile]) -> None:
        missing = [n for n in (DEFAULT_PROFILE, SLO_PROFILE) if n not in profiles]
        if missing:
            raise ParameterError(
                "",
                f"needs scheduling profiles {shown(DEFAULT_PROFILE)} and {shown(SLO_PROFILE)} (it picks the second when "
                f"{PREDICTION_HEADER} is true, else the first); missing {', '.join(map(shown, missing))}, "
                f"defined: {', '.join(profiles)}",
            )

    def pick(
        self,
        request: InferenceRequest,
        cycle: CycleState,
        profiles: Mapping[str, SchedulingProfile],
        results: Mapping[str, ProfileOutcome],
    ) -> list[SchedulingProfile]:
        if results:
            return []
        prediction_based(request)  # a malformed header is refused before anything runs
        return list(profiles.values())

    def process_results(
        self, request: InferenceRequest, cycle: CycleState, results: Mapping[str, ProfileOutcome]
    ) -> SchedulingResult:
        name = SLO_PROFILE if prediction_based(request) else DEFAULT_PROFILE
        outcome = results[name]
        if isinstance(outcome, RequestError):
            raise outcome
        return SchedulingResult(outcome, name)
