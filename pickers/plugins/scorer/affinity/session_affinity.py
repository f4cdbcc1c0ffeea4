"""session-affinity-scorer (llm-d): 1 for the endpoint the request's session is pinned to, 0 for the others.

Two strategies (`strategy`), as llm-d's:
- `encoded_endpoint_header` (default): stateless. The request's header (`encodedEndpointHeaderConfig.
  header`, default `x-session-token`) names the endpoint (base64 of its `ip:port`); after the pick the
  response carries the chosen endpoint's token in that header for the client to send back. A missing
  or unreadable token scores every endpoint 0.
- `session_id`: the client sends an opaque session id, read from the first of `sessionIdConfig.sources`
  that has one: `{header: name}` or `{attribute: key, producer: name}` (a request attribute, e.g.
  `{attribute: SessionIDDataKey, producer: session-id-producer}` set by the session-id-producer);
  default one header source `x-session-id`. The scorer keeps session -> endpoint bindings: an unbound
  session, or one whose endpoint is not a candidate, scores 0 everywhere; after the pick an unbound
  session binds to the chosen endpoint, and a bound one moves only when its endpoint was not a
  candidate. Bindings unused for `evictionTtlSeconds` (300) go, checked every `evictionSweepSeconds`
  (10); at most `MAX_SESSIONS` are kept (the least recently used go first: llm-epp's bound on
  client-made ids).

`profileName`: the profile whose pick is pinned (e.g. `prefill`; default the primary's). Only the
config block of the chosen strategy is used: the other one loads with a warning, as llm-d ignores it.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.plugins.base import Plugin, PluginContext

SESSION_HEADER = "x-session-token"
SESSION_ID_HEADER = "x-session-id"
ENCODED = "encoded_endpoint_header"
SESSION_ID = "session_id"
MAX_SESSIONS = 100_000  # llm-epp's bound on bindings: session ids come from clients


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

    def __init__(
        self,
        name: str = "session-affinity-scorer",
        *,
        strategy: str = ENCODED,
        header: str = SESSION_HEADER,
        profile_name: str = "",
        sources: Sequence[tuple[str, str, str]] = (("header", SESSION_ID_HEADER, ""),),
        ttl: float = 300.0,
        sweep: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.strategy = strategy
        self.header = header.lower()
        self.profile_name = profile_name
        # ("header", name, "") or ("attribute", key, producer), tried in order
        self.sources = tuple((kind, key.lower() if kind == "header" else key, producer) for kind, key, producer in sources)
        self.ttl = ttl
        self.sweep = sweep
        self._clock = clock
        self._bindings: OrderedDict[str, tuple[str, float]] = OrderedDict()  # session -> (address, last use)
        self._next_sweep = 0.0
        self._absent = f"session-affinity/absent/{name}"  # cycle key: the bound endpoint was no candidate

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> SessionAffinityScorer:
        strategy = p.string("strategy", ENCODED) or ENCODED
        if strategy not in (ENCODED, SESSION_ID):
            raise ParameterError("strategy", f"expected {ENCODED} or {SESSION_ID}, got {shown(strategy)}")
        profile = p.string("profileName") or ""
        unused = f"only the block of the strategy in use is read (strategy {strategy}), as in llm-d"
        if strategy == ENCODED:
            header = p.section("encodedEndpointHeaderConfig").string("header", SESSION_HEADER) or SESSION_HEADER
            p.deprecated("sessionIdConfig", unused)
            return cls(name, header=header, profile_name=profile)
        p.deprecated("encodedEndpointHeaderConfig", unused)
        sid = p.section("sessionIdConfig")
        sources: list[tuple[str, str, str]] = []
        for i, src in enumerate(sid.mappings("sources")):
            where = f"sessionIdConfig.sources[{i}]"
            extra = sorted(set(src) - {"header", "attribute", "producer"})
            if extra:
                raise ParameterError(f"{where}.{extra[0]}", "unknown field; a source takes header, or attribute and producer")
            header, attribute, producer = (src.get(k) for k in ("header", "attribute", "producer"))
            for key, v in (("header", header), ("attribute", attribute), ("producer", producer)):
                if v is not None and not isinstance(v, str):
                    raise ParameterError(f"{where}.{key}", f"expected a string, got {shown(v)}")
            if bool(header) == bool(attribute):
                raise ParameterError(where, "exactly one of header or attribute must be set")
            if header and producer:
                raise ParameterError(f"{where}.producer", "names the producer of an attribute; this source reads a header")
            sources.append(("header", header, "") if header else ("attribute", attribute, producer or ""))  # type: ignore[arg-type]
        if not sources:
            sources = [("header", SESSION_ID_HEADER, "")]
            sid.effective["sources"] = [{"header": SESSION_ID_HEADER}]
        ttl = sid.number("evictionTtlSeconds", 300.0, positive=True)
        sweep = sid.number("evictionSweepSeconds", 10.0, positive=True)
        return cls(name, strategy=SESSION_ID, profile_name=profile, sources=sources, ttl=ttl, sweep=sweep)

    # -- scoring --------------------------------------------------------------------------------
    def score(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        if self.strategy == ENCODED:
            token = request.headers.get(self.header)
            address = session_address(token) if token else None
        else:
            address = self._bound(request)
            if address is not None and all(ep.address != address for ep in endpoints):
                cycle.data[self._absent] = True  # PreRequest may move the session
                address = None
        return [1.0 if address is not None and ep.address == address else 0.0 for ep in endpoints]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        chosen = self._picked(result)
        if chosen is None:
            return
        if self.strategy == ENCODED:
            result.response_headers[self.header] = session_token(chosen.address)
            return
        session = self.session_id(request)
        if not session:
            return
        now = self._clock()
        self._expire(now)
        bound = self._bindings.get(session)
        if bound is not None and bound[0] != chosen.address and not cycle.data.get(self._absent):
            return  # the picker chose elsewhere although the bound endpoint was there: the binding stays
        self._bindings[session] = (chosen.address, now)
        self._bindings.move_to_end(session)
        while len(self._bindings) > MAX_SESSIONS:
            self._bindings.popitem(last=False)

    def session_id(self, request: InferenceRequest) -> str:
        """The request's session id, from the first source that has one ("" when none has)."""
        for kind, key, producer in self.sources:
            value = request.headers.get(key) if kind == "header" else request.attributes.get((key, producer))
            if value and value.strip():
                return value.strip()
        return ""

    def _bound(self, request: InferenceRequest) -> str | None:
        session = self.session_id(request)
        if not session:
            return None
        bound = self._bindings.get(session)
        if bound is None or self._clock() - bound[1] > self.ttl:
            return None
        return bound[0]

    def _picked(self, result: SchedulingResult) -> Endpoint | None:
        if self.profile_name:
            eps = (result.profile_results or {}).get(self.profile_name)
            if eps is None and result.profile_results is None and result.profile == self.profile_name:
                eps = result.endpoints
            return eps[0] if eps else None
        return result.endpoints[0] if result.endpoints else None

    def _expire(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep
        bindings, ttl = self._bindings, self.ttl
        while bindings:  # least recently used first: stop at the first one still in use
            session, (_, used) = next(iter(bindings.items()))
            if now - used <= ttl:
                break
            del bindings[session]

    def sessions(self) -> Mapping[str, Any]:
        return {s: a for s, (a, _) in self._bindings.items()}


class SessionAffinityFilter(Plugin):
    """session-affinity-filter (llm-d): the hard form of session-affinity-scorer, with the same parameters
    and strategies. When the session's endpoint is a candidate it is the only one kept; with no session,
    an unreadable token, an unbound session or an endpoint that is no candidate, every candidate passes
    (and a session_id binding moves to where the request went). After the pick it hands out the token or
    records the binding exactly as the scorer does."""

    type = "session-affinity-filter"

    def __init__(self, pin: SessionAffinityScorer) -> None:
        self.name = pin.name
        self.pin = pin

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> SessionAffinityFilter:
        return cls(SessionAffinityScorer.from_config(name, p, ctx))

    def filter(self, request: InferenceRequest, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        scores = self.pin.score(request, cycle, endpoints)
        kept = [ep for ep, s in zip(endpoints, scores, strict=True) if s]
        return kept or list(endpoints)

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        self.pin.pre_request(request, cycle, result)


class MulticlusterSessionAffinityFilter(SessionAffinityFilter):
    """multicluster-session-affinity-filter (llm-d): session-affinity-filter for a cluster-scoped EPP. Its
    candidates are the peer clusters discovery lists, so pinning a session to an endpoint pins it to a
    cluster: the stock filter, under llm-d's cluster-scoped type name."""

    type = "multicluster-session-affinity-filter"
