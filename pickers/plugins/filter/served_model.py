"""served-model-filter (llm-epp's own): keep the endpoints whose `/v1/models` lists the request's model
(the one sent upstream, after a rewrite), base model or LoRA adapter alike, plus those whose list is not
known yet. When no endpoint can be shown to serve it, every endpoint is kept: the model server answers
with its own error rather than the EPP refusing a model it cannot see. Needs a `models-data-source`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.plugins.base import Plugin


class ServedModelFilter(Plugin):
    type = "served-model-filter"
    reads_served_models: ClassVar[bool] = True  # the dataLayer loader refuses it without a models source

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        model = request.target_model or request.model
        if not model:
            return endpoints
        kept = [ep for ep in endpoints if ep.served_models is None or model in ep.served_models]
        return kept or endpoints
