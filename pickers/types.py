"""The scheduling interfaces. Each fits in a few lines; plugins implement one or more of them.

- Filter: candidates in, the candidates that may serve out (order kept).
- Scorer: a score per candidate; out-of-range scores are clamped to [0, 1] by the scheduler.
- Picker: scored candidates in, the chosen endpoints out (first = primary, rest = fallbacks).
- PreRequest: told the result after a pick (e.g. the prefix index records the chosen endpoint).
- ResponseComplete: told when the response finished (or aborted), with the usage if known.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from extproc.datastore import Datastore, Endpoint
from extproc.inference_request import InferenceRequest
from pickers.prefix_index import ApproxPrefixIndex


@dataclass(slots=True)
class PluginContext:
    """What plugins share, handed to every plugin factory: the live state and one random source."""

    prefix_index: ApproxPrefixIndex = field(default_factory=ApproxPrefixIndex)
    datastore: Datastore | None = None
    rng: random.Random = field(default_factory=random.Random)
    max_endpoints: int = 1  # pickers' maxNumOfEndpoints when the config leaves it out (--max-num-endpoints)


@dataclass(slots=True)
class CycleState:
    """Per-request scratch space shared by the plugins of one scheduling cycle."""

    data: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class Filter(Protocol):
    type: str
    name: str

    def filter(
        self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]: ...


@runtime_checkable
class Scorer(Protocol):
    type: str
    name: str
    category: str  # "affinity" (caches) or "distribution" (load)

    def score(
        self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]
    ) -> Sequence[float]: ...


@dataclass(slots=True)
class ScoredEndpoint:
    endpoint: Endpoint
    score: float


@runtime_checkable
class Picker(Protocol):
    type: str
    name: str

    def pick(self, request: InferenceRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]: ...


@dataclass(slots=True)
class SchedulingResult:
    endpoints: list[Endpoint]  # primary first, then fallbacks
    profile: str = "default"
    # per-scorer scores of every candidate, kept only when explaining decisions
    scores: dict[str, dict[str, float]] | None = None
    # headers plugins add to the upstream request (e.g. x-prefiller-host-port) and to the response
    # the client gets (e.g. x-session-token)
    request_headers: dict[str, str] = field(default_factory=dict)
    # estimated uncached prompt tokens on the primary, when a plugin (prefill-load-scorer) knows them
    prefill_tokens: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    # several profiles ran (P/D): each one's chosen endpoints, by profile name; None for one profile
    profile_results: dict[str, list[Endpoint]] | None = None


@runtime_checkable
class PreRequest(Protocol):
    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None: ...


@runtime_checkable
class ResponseComplete(Protocol):
    def response_complete(
        self, request: InferenceRequest, endpoint: Endpoint, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None: ...
