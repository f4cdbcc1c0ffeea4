"""disaggregatedset-rollout-screener (llm-d): while a DisaggregatedSet rolls out, keep every profile of a
request on one revision, so a prefill pod and a decode pod of different revisions never pair.

It runs before the profiles (pickers.framework.types.Screener). A strict header selector keeps only the
endpoints whose label equals the request's header; one on the revision label pins the revision. With
revision gating (`sum`, `max-role`) a revision lacking a Ready pod of a required role is dropped and,
unless pinned, one of the others is drawn, weighted by its Ready pods; only its endpoints go on. After
the pick, each selector's label of the primary endpoint goes on the client's response.

The Ready-pod counts come from the pool itself (the datastore holds Ready pods only), computed once per
pool tuple, which the datastore replaces only when membership or labels change. llm-d's plugin watches
the scope's Pods itself (its internal disaggregatedset-rollout-pod-extractor), so it also sees Pods
outside the InferencePool; here the pool must hold every required role (one EPP for P/D).

Two forms of the parameters load: llm-d v0.10's (`headerSelectors`, `revisionGating.requireRoles.values`)
and the newer one llm-d's guides write (`revisionGating.requiredRoles`, `revisionHeaderName`: one strict
revision header, stamped too; requests sharing a decision id reuse one revision unless
`disableCoordination`).
"""

from __future__ import annotations

import bisect
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

from pickers.framework.endpoint import Endpoint
from pickers.framework.errors import NO_ENDPOINTS, RequestError, shown
from pickers.framework.params import ParameterError, Params
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState, SchedulingResult
from pickers.plugins.base import Plugin, PluginContext
from pickers.plugins.filter.by_label import Requirement, parse_label_selector

log = logging.getLogger(__name__)

DEFAULT_REVISION_LABEL = "disaggregatedset.x-k8s.io/revision"
DEFAULT_ROLE_LABEL = "disaggregatedset.x-k8s.io/role"
DEFAULT_REVISION_HEADER = "x-llm-d-disagg-revision"  # the newer form's revisionHeaderName
DECISION_ID_HEADER = "x-llm-d-revision-decision-id"  # a coordinator's id shared by the requests of one decision
SUM, MAX_ROLE, DISABLED = "sum", "max-role", "disabled"
MODES = (SUM, MAX_ROLE, DISABLED)
# The newer form's shared decisions, kept as llm-d's local plugin state keeps them (dropped after five
# minutes unused); bounded here, the least recently used going first.
DECISION_TTL = 300.0
MAX_DECISIONS = 10_000
_RANK_SUFFIX = re.compile(r"-rank-[0-9]+$")  # Kubernetes discovery names a pod's endpoints <pod>-rank-<i>


@dataclass(slots=True, frozen=True)
class HeaderSelector:
    name: str  # the strict no-match metric's `selector` label
    header: str  # lowercase, as Envoy hands headers over
    label: str
    strict: bool  # strict: screens the candidates; prefer: only stamped (a header-label-affinity-scorer prefers)


@dataclass(slots=True, frozen=True, eq=False)
class Revisions:
    """The gating's view of one pool: per revision its Ready pods by role (endpoints in scope with both
    labels; a pod's ranks count once), the complete revisions' shares and, for the draw, their names
    sorted with the cumulative shares, and the pool's endpoints of each complete revision."""

    pool: Sequence[Endpoint]  # the pool these were computed from: its identity is the cache key
    counts: Mapping[str, Mapping[str, int]]
    shares: Mapping[str, float]  # complete revisions only, each > 0
    order: tuple[str, ...]
    cumulative: tuple[float, ...]
    endpoints: Mapping[str, tuple[Endpoint, ...]]

    def missing(self, revision: str, roles: Sequence[str]) -> list[str]:
        have = self.counts.get(revision, {})
        return [r for r in roles if not have.get(r)]


def pod_of(ep: Endpoint) -> tuple[str, str, str]:
    """One pod's key: the data-parallel ranks of a pod are several endpoints, and llm-d counts Pods."""
    spec = ep.spec
    return spec.namespace, spec.host, _RANK_SUFFIX.sub("", spec.name)


def revisions_of(
    pool: Sequence[Endpoint], scope: Sequence[Requirement], revision_label: str, role_label: str, roles: Sequence[str], mode: str
) -> Revisions:
    pods: dict[str, dict[str, set[tuple[str, str, str]]]] = {}
    for ep in pool:
        labels = ep.labels
        revision, role = labels.get(revision_label), labels.get(role_label)
        if revision and role and all(r.matches(labels) for r in scope):
            pods.setdefault(revision, {}).setdefault(role, set()).add(pod_of(ep))
    counts = {rev: {role: len(p) for role, p in by_role.items()} for rev, by_role in pods.items()}
    complete = {rev: c for rev, c in counts.items() if all(c.get(r) for r in roles)}
    if mode == MAX_ROLE:
        # one role for the whole distribution: the largest over the complete revisions (ties: the first listed)
        dominant = max(roles, key=lambda r: sum(c.get(r, 0) for c in complete.values()))
        weights = {rev: c[dominant] for rev, c in complete.items()}
    else:
        weights = {rev: sum(c[r] for r in roles) for rev, c in complete.items()}
    total = sum(weights.values())
    shares = {rev: w / total for rev, w in weights.items()} if total else {}
    order = tuple(sorted(shares))
    by_revision: dict[str, list[Endpoint]] = {}
    for ep in pool:
        rev = ep.labels.get(revision_label)
        if rev in shares:
            by_revision.setdefault(rev, []).append(ep)
    return Revisions(
        pool, counts, shares, order, tuple(accumulate(shares[r] for r in order)), {r: tuple(e) for r, e in by_revision.items()}
    )


class DisaggregatedSetRolloutScreener(Plugin):
    type = "disaggregatedset-rollout-screener"

    def __init__(
        self,
        name: str,
        *,
        scope: Sequence[Requirement],
        selectors: Sequence[HeaderSelector] = (),
        mode: str = MAX_ROLE,
        roles: Sequence[str] = (),
        revision_label: str = DEFAULT_REVISION_LABEL,
        role_label: str = DEFAULT_ROLE_LABEL,
        revision_header_form: bool = False,
        coordinate: bool = False,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.scope = tuple(scope)
        self.selectors = tuple(selectors)
        self.mode = mode
        self.gated = mode != DISABLED
        self.roles = tuple(roles)
        self.revision_label = revision_label
        self.role_label = role_label
        # the newer form: its no-match metric is llm-d's ..._strict_revision_no_match_total (no selector label)
        self.revision_header_form = revision_header_form
        self.coordinate = coordinate and self.gated
        self.rng = rng or random.Random()
        self._clock = clock
        self._strict = tuple(s for s in self.selectors if s.strict)
        self._pin = next((s for s in self._strict if s.label == revision_label), None)  # pins the revision
        self.no_match: dict[str, int] = {}  # selector name -> strict selections that matched no endpoint
        self._revisions: Revisions | None = None
        self._decisions: OrderedDict[str, tuple[str, float]] = OrderedDict()  # decision id -> (revision, expiry)

    # -- configuration --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> DisaggregatedSetRolloutScreener:
        scope_text = p.section("scope").string("labelSelector", required=True)
        assert scope_text is not None
        try:
            scope = parse_label_selector(scope_text)
        except ValueError as e:
            raise ParameterError("scope.labelSelector", f"not a valid label selector: {e}") from None
        if not p.given("revisionGating"):
            raise ParameterError("revisionGating", "is required (mode: sum, max-role or disabled)")
        g = p.section("revisionGating")
        mode = g.string("mode", required=True)
        if mode not in MODES:
            raise ParameterError("revisionGating.mode", f"expected one of {', '.join(MODES)}, got {shown(mode)}")
        revision_label = g.string("revisionLabelKey", DEFAULT_REVISION_LABEL) or DEFAULT_REVISION_LABEL
        role_label = g.string("roleLabelKey", DEFAULT_ROLE_LABEL) or DEFAULT_ROLE_LABEL
        newer = [k for k in ("requiredRoles", "revisionHeaderName", "disableCoordination") if g.given(k)]
        older = [k for k in ("headerSelectors",) if p.given(k)] + [f"revisionGating.{k}" for k in ("requireRoles",) if g.given(k)]
        if newer and older:
            raise ParameterError(
                f"revisionGating.{newer[0]}",
                f"mixes llm-d's two forms: {older[0]} (v0.10) with revisionGating.{newer[0]} (the newer form); use one",
            )
        coordinate = False
        if newer:
            roles_path = "revisionGating.requiredRoles"
            roles = g.strings("requiredRoles") if g.given("requiredRoles") else []
            header = (g.string("revisionHeaderName", DEFAULT_REVISION_HEADER) or DEFAULT_REVISION_HEADER).lower()
            coordinate = not g.flag("disableCoordination", False)
            selectors = [HeaderSelector("revision", header, revision_label, True)]
        else:
            roles_path = "revisionGating.requireRoles.values"
            roles = g.section("requireRoles").strings("values") if g.given("requireRoles") else []
            selectors = _selectors(p)
        if mode == DISABLED:
            if roles:
                p.warnings.append(f"parameter {roles_path} has no effect with revisionGating.mode: disabled")
        else:
            if not roles:
                raise ParameterError(roles_path, f"is required with revisionGating.mode: {mode} (the roles a revision needs Ready pods of)")
            for i, role in enumerate(roles):
                if not role:
                    raise ParameterError(f"{roles_path}[{i}]", "must not be empty")
                if role in roles[:i]:
                    raise ParameterError(f"{roles_path}[{i}]", f"role {shown(role)} is listed twice")
        return cls(
            name, scope=scope, selectors=selectors, mode=mode, roles=roles, revision_label=revision_label,
            role_label=role_label, revision_header_form=bool(newer), coordinate=coordinate, rng=ctx.rng,
        )  # fmt: skip

    # -- the pool's revisions -------------------------------------------------------------------
    def revisions(self, pool: Sequence[Endpoint]) -> Revisions:
        """The counts and shares of this pool, recomputed only when the pool tuple is another one."""
        revs = self._revisions
        if revs is None or revs.pool is not pool:
            revs = self._revisions = revisions_of(pool, self.scope, self.revision_label, self.role_label, self.roles, self.mode)
            if pool and not revs.shares:
                log.warning("%s: %s; requests get 503 until one has", self.name, self._incomplete(revs, pool))
        return revs

    def revision_shares(self, pool: Sequence[Endpoint]) -> dict[str, float]:
        """Each revision seen in scope with its share, 0 for an incomplete one (the share gauge)."""
        if not self.gated:
            return {}
        revs = self.revisions(pool)
        return {rev: revs.shares.get(rev, 0.0) for rev in sorted(revs.counts)}

    # -- the request ----------------------------------------------------------------------------
    def screen(self, request: InferenceRequest, endpoints: Sequence[Endpoint], pool: Sequence[Endpoint]) -> Sequence[Endpoint]:
        headers = request.headers
        kept = endpoints
        pinned: str | None = None
        for sel in self._strict:
            want = headers.get(sel.header)
            if not want:
                continue
            label = sel.label
            kept = [ep for ep in kept if ep.labels.get(label) == want]
            if not kept:
                self._count_no_match(sel)
                raise RequestError(NO_ENDPOINTS, f"no endpoint has {label}={shown(want)}, which the strict header {sel.header} asks for")
            if sel is self._pin:
                pinned = want
        if not self.gated:
            return kept
        revs = self.revisions(pool)
        if pinned is not None:
            if pinned not in revs.shares:
                assert self._pin is not None
                self._count_no_match(self._pin)
                raise RequestError(
                    NO_ENDPOINTS,
                    f"revision {shown(pinned)} ({self._pin.header}) has no Ready endpoint of role "
                    f"{', '.join(revs.missing(pinned, self.roles))} ({self.role_label})",
                )
            return kept
        revision = self._choose(request, revs, kept)
        if kept is revs.pool:
            return revs.endpoints[revision]
        label = self.revision_label
        return [ep for ep in kept if ep.labels.get(label) == revision]

    def _choose(self, request: InferenceRequest, revs: Revisions, kept: Sequence[Endpoint]) -> str:
        """One complete revision among those of `kept`, drawn by share (or the one decided before for the
        request's decision id)."""
        if kept is revs.pool:
            order, cumulative = revs.order, revs.cumulative
        else:
            label = self.revision_label
            seen = {ep.labels.get(label) for ep in kept}
            order = tuple(r for r in revs.order if r in seen)
            cumulative = tuple(accumulate(revs.shares[r] for r in order))
        if not order:
            raise RequestError(NO_ENDPOINTS, self._incomplete(revs, kept))
        key = None
        if self.coordinate and len(revs.counts) > 1:  # one revision in scope: nothing to agree on
            key = request.headers.get(DECISION_ID_HEADER) or request.request_id or None
        if key is not None:
            decided = self._decided(key)
            if decided is not None:
                if decided not in order:
                    raise RequestError(
                        NO_ENDPOINTS, f"revision {shown(decided)}, chosen earlier for decision {shown(key)}, can no longer serve"
                    )
                return decided
        i = bisect.bisect_right(cumulative, self.rng.random() * cumulative[-1])
        revision = order[min(i, len(order) - 1)]
        if key is not None:
            self._decide(key, revision)
        return revision

    def _decided(self, key: str) -> str | None:
        found = self._decisions.get(key)
        if found is None:
            return None
        now = self._clock()
        if found[1] <= now:
            del self._decisions[key]
            return None
        self._decisions[key] = (found[0], now + DECISION_TTL)
        self._decisions.move_to_end(key)
        return found[0]

    def _decide(self, key: str, revision: str) -> None:
        decisions = self._decisions
        now = self._clock()
        decisions[key] = (revision, now + DECISION_TTL)
        while decisions:
            oldest, (_, expiry) = next(iter(decisions.items()))
            if expiry > now and len(decisions) <= MAX_DECISIONS:
                break
            del decisions[oldest]

    def pre_request(self, request: InferenceRequest, cycle: CycleState, result: SchedulingResult) -> None:
        """Each selector's label of the primary endpoint on the client's response (llm-d stamps its target)."""
        if not result.endpoints or not self.selectors:
            return
        labels = result.endpoints[0].labels
        for sel in self.selectors:
            value = labels.get(sel.label)
            if value:
                result.response_headers[sel.header] = value

    def _count_no_match(self, sel: HeaderSelector) -> None:
        self.no_match[sel.name] = self.no_match.get(sel.name, 0) + 1

    def _incomplete(self, revs: Revisions, endpoints: Sequence[Endpoint]) -> str:
        label = self.revision_label
        seen = sorted({v for ep in endpoints if (v := ep.labels.get(label))})
        roles = ", ".join(self.roles)
        if not seen:
            return f"no candidate endpoint has the revision label {label}"
        lacking = [f"{shown(r)} lacks {', '.join(revs.missing(r, self.roles))}" for r in seen[:3]]
        more = f" and {len(seen) - 3} more" if len(seen) > 3 else ""
        return f"no revision has a Ready endpoint of every required role ({roles}, label {self.role_label}): {'; '.join(lacking)}{more}"


def _selectors(p: Params) -> list[HeaderSelector]:
    """v0.10's headerSelectors: name, headerName, labelKey, mode (strict | prefer), names and headers unique."""
    out: list[HeaderSelector] = []
    for i, raw in enumerate(p.mappings("headerSelectors")):
        sp = Params(raw, prefix=f"headerSelectors[{i}].")
        name = sp.string("name", required=True)
        header = sp.string("headerName", required=True)
        label = sp.string("labelKey", required=True)
        mode = sp.string("mode", required=True)
        assert name is not None and header is not None and label is not None
        if mode not in ("strict", "prefer"):
            raise ParameterError(sp.path("mode"), f"expected strict or prefer, got {shown(mode)}")
        sp.done()
        header = header.lower()
        if any(s.name == name for s in out):
            raise ParameterError(sp.path("name"), f"duplicate selector name {shown(name)}")
        if any(s.header == header for s in out):
            raise ParameterError(sp.path("headerName"), f"duplicate headerName {shown(header)}")
        out.append(HeaderSelector(name, header, label, mode == "strict"))
    return out
