"""session-affinity-scorer: 1 for the endpoint named in the request's `x-session-token` header (base64 of
its `ip:port`), 0 for the others. A missing or unreadable token scores every endpoint 0.

After the pick it hands the client the token of the chosen endpoint on the response headers.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from pickers.framework.endpoint import Endpoint
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.plugins.base import Plugin

SESSION_HEADER = "x-session-token"


def session_token(address: str) -> str:
    """The header value that routes a session back to `address`."""
    return base64.standard_b64encode(address.encode()).decode()


def session_address(token: str) -> str | None:
    try:
        return base64.standard_b64decode(token.strip().encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


class SessionAffinityScorer(Plugin):
    type = "session-affinity-scorer"
    category = "affinity"

    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        token = request.headers.get(SESSION_HEADER)
        address = session_address(token) if token else None
        return [1.0 if address is not None and ep.address == address else 0.0 for ep in endpoints]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        if result.endpoints:
            result.response_headers[SESSION_HEADER] = session_token(result.endpoints[0].address)
