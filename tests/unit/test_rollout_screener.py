"""disaggregatedset-rollout-screener: during a DisaggregatedSet rollout every profile of a request sees
one revision (incomplete revisions dropped, the others drawn by their Ready pods), a strict header pins
it, and the chosen endpoint's labels are stamped on the response. Driven through the config loader,
the Scheduler and (for the wire) the Director behind RequestStream, on a datastore of labelled
endpoints; our configs in the guides' shapes are in tests/unit/configs/rollout/."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from extproc.cli import main as cli
from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from pickers.config.loader import load_config, load_config_file
from pickers.framework.endpoint import ROLE_LABEL, EndpointSpec
from pickers.framework.errors import ConfigError, RequestError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.plugins.base import PluginContext
from pickers.plugins.filter.by_label import parse_label_selector
from pickers.plugins.screener import disaggregatedset_rollout as rollout
from tests.unit.test_protocol import (
    completion_body,
    response_headers_msg,
    send_request,
    set_headers,
)

CONFIGS = sorted((Path(__file__).parent / "configs" / "rollout").glob("*.yaml"))
STRICT = Path(__file__).parent / "configs" / "rollout" / "pd-strict-revision.yaml"
REQUIRED = Path(__file__).parent / "configs" / "rollout" / "pd-required-roles.yaml"
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
REV = "disaggregatedset.x-k8s.io/revision"
ROLE = "disaggregatedset.x-k8s.io/role"
SET = "disaggregatedset.x-k8s.io/name"
LONG = "Summarize the quarterly report for the board, section by section. " * 30


def pool(shape: dict[str, tuple[int, int]], *, set_name: str = "chat-pd", ranks: int = 1, extra: list[EndpointSpec] | None = None) -> Datastore:
    """revision -> (prefill pods, decode pods); each pod `ranks` endpoints (ports 8000...)."""
    specs: list[EndpointSpec] = []
    for r, (rev, (prefill, decode)) in enumerate(sorted(shape.items())):
        for role, n, octet in (("prefill", prefill, 0), ("decode", decode, 1)):
            for i in range(n):
                labels = {SET: set_name, REV: rev, ROLE: role, ROLE_LABEL: role, "disaggregatedset.x-k8s.io/slice": str(i % 2)}
                for k in range(ranks):
                    specs.append(EndpointSpec(f"{rev}-{role}-{i}-rank-{k}", f"10.{r}.{octet}.{i}", 8000 + k, labels))
    ds = Datastore()
    ds.set_endpoints([*specs, *(extra or [])])
    return ds


def scheduler(config: str | Path, seed: int = 7) -> Scheduler:
    """From a config file, a whole config text, or its `plugins:`... part."""
    ctx = PluginContext(rng=random.Random(seed))
    if isinstance(config, Path):
        cfg = load_config_file(config, ctx)
    else:
        cfg = load_config(config if "apiVersion:" in config else HEADER + config, "test.yaml", ctx)
    return Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)


def variant(path: Path, old: str, new: str) -> str:
    text = path.read_text()
    assert old in text
    return text.replace(old, new)


def req(i: int = 0, headers: dict[str, str] | None = None) -> InferenceRequest:
    return InferenceRequest(f"r{i}", "/v1/completions", headers or {}, "completions", "m", LONG, max_tokens=8)


def revisions_used(s: Scheduler, ds: Datastore, n: int, headers: dict[str, str] | None = None) -> Counter[str]:
    """Which revision served each of n requests; every endpoint a request touched (prefill and decode) must share it."""
    used: Counter[str] = Counter()
    for i in range(n):
        result = s.schedule(req(i, headers), ds.candidates(), ds.candidates())
        touched = {ep.labels[REV] for eps in (result.profile_results or {"": result.endpoints}).values() for ep in eps}
        assert len(touched) == 1, f"request {i} crossed revisions: {touched}"
        used[touched.pop()] += 1
    return used


def screener_of(s: Scheduler) -> rollout.DisaggregatedSetRolloutScreener:
    return next(p for p in s.plugins if isinstance(p, rollout.DisaggregatedSetRolloutScreener))


# -- which revisions serve, and how often --------------------------------------------------------


@pytest.mark.parametrize(
    "old, new",
    [((8, 2), (2, 0)), ((6, 1), (2, 0))],  # (decode, prefill) per revision: steps 2 and 3 of the README's 2P:10D rollout
    ids=["step-2", "step-3"],
)
def test_a_revision_missing_a_role_gets_no_request(old, new):
    ds = pool({"old": (old[1], old[0]), "new": (new[1], new[0])})
    assert revisions_used(scheduler(STRICT), ds, 200) == {"old": 200}


@pytest.mark.parametrize(
    "old, new, new_share",
    # (decode, prefill) per revision at steps 4, 6 and 8 of the README's 2P:10D rollout: decode is the
    # largest role, so max-role splits by decode pods: 60/40, 40/60, 20/80
    [((6, 1), (4, 1), 0.40), ((4, 1), (6, 1), 0.60), ((2, 1), (8, 1), 0.80)],
    ids=["step-4", "step-6", "step-8"],
)
def test_max_role_splits_by_the_largest_role(old, new, new_share):
    ds = pool({"old": (old[1], old[0]), "new": (new[1], new[0])})
    s = scheduler(STRICT)
    assert screener_of(s).revisions(ds.candidates()).shares == pytest.approx({"old": 1 - new_share, "new": new_share})
    n = 4000
    used = revisions_used(s, ds, n)  # the draws follow the shares (seeded: the same every run)
    assert abs(used["new"] / n - new_share) < 0.03, used


def test_max_role_and_sum_weigh_the_same_rollout_differently():
    # the README's intermediate 2P:10D state: A has 2 prefill + 9 decode, B 1 + 1
    ds = pool({"a": (2, 9), "b": (1, 1)})
    n = 4000
    max_role, by_sum = scheduler(STRICT), scheduler(variant(REQUIRED, "summarizer", "chat-pd"))
    assert screener_of(max_role).revisions(ds.candidates()).shares == pytest.approx({"a": 9 / 10, "b": 1 / 10})  # decode pods
    assert screener_of(by_sum).revisions(ds.candidates()).shares == pytest.approx({"a": 11 / 13, "b": 2 / 13})  # all pods
    assert abs(revisions_used(max_role, ds, n)["b"] / n - 1 / 10) < 0.03
    assert abs(revisions_used(by_sum, ds, n)["b"] / n - 2 / 13) < 0.03


def test_a_pods_data_parallel_ranks_count_once():
    # llm-d counts Pods: a pod serving 4 ranks is 4 endpoints here, and one pod
    ds = pool({"a": (1, 2), "b": (1, 1)}, ranks=4)
    assert len(ds.candidates()) == 20
    screener = screener_of(scheduler(variant(REQUIRED, "summarizer", "chat-pd")))
    revs = screener.revisions(ds.candidates())
    assert revs.counts == {"a": {"prefill": 1, "decode": 2}, "b": {"prefill": 1, "decode": 1}}
    assert revs.shares == {"a": 3 / 5, "b": 2 / 5}


def test_pods_outside_the_scope_do_not_count():
    # B's only prefill pod belongs to another set: B is incomplete in scope
    other = EndpointSpec("stray", "10.9.0.1", 8000, {SET: "other", REV: "b", ROLE: "prefill", ROLE_LABEL: "prefill"})
    ds = pool({"a": (1, 2), "b": (0, 2)}, extra=[other])
    assert revisions_used(scheduler(STRICT), ds, 100) == {"a": 100}


def test_endpoints_without_a_revision_label_are_dropped_while_gating():
    bare = EndpointSpec("bare", "10.9.0.2", 8000, {ROLE_LABEL: "decode"})
    ds = pool({"a": (1, 1)}, extra=[bare])
    s = scheduler(STRICT)
    for i in range(50):
        result = s.schedule(req(i), ds.candidates(), ds.candidates())
        assert result.endpoints[0].name != "bare"


def test_no_complete_revision_is_503_naming_what_is_missing():
    ds = pool({"a": (0, 3), "b": (2, 0)})
    with pytest.raises(RequestError) as e:
        scheduler(STRICT).schedule(req(), ds.candidates(), ds.candidates())
    assert e.value.kind.status == 503 and e.value.kind.dropped_reason == "rejected-no-endpoints"
    assert "'a' lacks prefill" in e.value.message and "'b' lacks decode" in e.value.message


def test_the_choice_is_among_the_revisions_a_subset_hint_leaves():
    ds = pool({"a": (1, 5), "b": (1, 5)})
    subset = [ep for ep in ds.candidates() if ep.labels[REV] == "b"]
    s = scheduler(STRICT)
    for i in range(30):
        result = s.schedule(req(i), subset, ds.candidates())
        assert {ep.labels[REV] for eps in result.profile_results.values() for ep in eps} == {"b"}


def test_counts_are_recomputed_only_when_the_pool_changes(monkeypatch):
    ds = pool({"a": (1, 2), "b": (1, 2)})
    s = scheduler(STRICT)
    calls = []
    real = rollout.revisions_of
    monkeypatch.setattr(rollout, "revisions_of", lambda *a: calls.append(1) or real(*a))
    revisions_used(s, ds, 50)
    assert len(calls) == 1
    ds.set_endpoints([*(ep.spec for ep in ds.candidates()), EndpointSpec("b-decode-9", "10.1.1.9", 8000, ds.candidates()[-1].labels)])
    revisions_used(s, ds, 50)
    assert len(calls) == 2


# -- strict headers -------------------------------------------------------------------------------


def test_a_strict_revision_header_keeps_only_that_revision():
    ds = pool({"a": (1, 9), "b": (1, 1)})
    assert revisions_used(scheduler(STRICT), ds, 100, {"x-disagg-revision": "b"}) == {"b": 100}


def test_a_strict_header_for_an_incomplete_revision_is_503_and_counted():
    ds = pool({"a": (1, 3), "b": (0, 2)})
    s = scheduler(STRICT)
    with pytest.raises(RequestError) as e:
        s.schedule(req(0, {"x-disagg-revision": "b"}), ds.candidates(), ds.candidates())
    assert e.value.kind.status == 503 and e.value.kind.dropped_reason == "rejected-no-endpoints"
    assert e.value.message == f"revision 'b' (x-disagg-revision) has no Ready endpoint of role prefill ({ROLE})"
    assert screener_of(s).no_match == {"revision": 1}


def test_a_strict_header_matching_no_endpoint_is_503():
    ds = pool({"a": (1, 1)})
    s = scheduler(STRICT)
    with pytest.raises(RequestError) as e:
        s.schedule(req(0, {"x-disagg-revision": "zzz"}), ds.candidates(), ds.candidates())
    assert e.value.kind.status == 503
    assert e.value.message == f"no endpoint has {REV}='zzz', which the strict header x-disagg-revision asks for"


def test_a_strict_header_on_another_label_still_keeps_one_revision():
    # llm-d v0.10 skips the revision draw when any strict header is set, so a strict slice could pair
    # revisions; here the draw runs among the revisions the slice leaves (docs/prefill-decode.md)
    config = variant(STRICT, "labelKey: disaggregatedset.x-k8s.io/slice\n      mode: prefer", "labelKey: disaggregatedset.x-k8s.io/slice\n      mode: strict")
    ds = pool({"a": (2, 4), "b": (2, 4)})
    s = scheduler(config)
    used = revisions_used(s, ds, 200, {"x-disagg-slice": "1"})
    assert set(used) == {"a", "b"}
    result = s.schedule(req(0, {"x-disagg-slice": "1"}), ds.candidates(), ds.candidates())
    assert {ep.labels["disaggregatedset.x-k8s.io/slice"] for eps in result.profile_results.values() for ep in eps} == {"1"}


def test_the_newer_forms_revision_header_is_strict_too():
    ds = pool({"a": (1, 9), "b": (1, 1)}, set_name="summarizer")
    s = scheduler(REQUIRED)
    assert revisions_used(s, ds, 50, {"x-llm-d-disagg-revision": "b"}) == {"b": 50}
    with pytest.raises(RequestError):
        s.schedule(req(0, {"x-llm-d-disagg-revision": "c"}), ds.candidates(), ds.candidates())
    assert screener_of(s).no_match == {"revision": 1}


# -- the response header ----------------------------------------------------------------------


def test_the_chosen_revision_and_prefer_labels_are_stamped_on_the_response():
    ds = pool({"a": (1, 2), "b": (1, 2)})
    s = scheduler(STRICT)
    for i in range(20):
        result = s.schedule(req(i), ds.candidates(), ds.candidates())
        primary = result.endpoints[0]
        assert result.response_headers["x-disagg-revision"] == primary.labels[REV]
        assert result.response_headers["x-disagg-slice"] == primary.labels["disaggregatedset.x-k8s.io/slice"]


def test_the_stamp_reaches_the_clients_response_and_a_refusal_is_a_503_answer():
    ds = pool({"a": (1, 2), "b": (0, 2)})
    director = Director(ds, scheduler(STRICT), EppMetrics())
    stream = RequestStream(director)
    out = send_request(stream, completion_body(LONG))
    decode = set_headers(out[0])["x-gateway-destination-endpoint"]
    assert ds.get(decode).labels[REV] == "a"
    stamped = set_headers(stream.handle(response_headers_msg())[0], "response_headers")
    assert stamped["x-disagg-revision"] == "a"

    refused = send_request(RequestStream(director), completion_body(LONG), extra={"x-disagg-revision": "b"})
    imm = refused[-1].immediate_response
    assert imm.status.code == 503
    assert imm.body.decode().startswith("inference error: ServiceUnavailable - revision 'b' (x-disagg-revision)")
    assert {h.header.key: h.header.raw_value for h in imm.headers.set_headers}["x-llm-d-request-dropped-reason"] == b"rejected-no-endpoints"


# -- gating off, coordination ------------------------------------------------------------------


def test_disabled_gating_keeps_every_candidate_and_still_stamps():
    zone = "topology.kubernetes.io/zone"
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"e{i}", f"10.0.0.{i}", 8000, {zone: f"z{i % 2}"}) for i in range(4))
    s = scheduler(CONFIGS[[p.name for p in CONFIGS].index("prefer-only.yaml")])
    for i in range(20):
        result = s.schedule(req(i, {"x-preferred-zone": "z1"}), ds.candidates(), ds.candidates())
        assert result.endpoints[0].labels[zone] == "z1"  # the affinity scorer's preference (weight 5)
        assert result.response_headers["x-preferred-zone"] == "z1"
    assert screener_of(s).screen(req(), ds.candidates(), ds.candidates()) is ds.candidates()


def test_requests_sharing_a_decision_id_share_a_revision():
    ds = pool({"a": (1, 1), "b": (1, 1)}, set_name="summarizer")
    s = scheduler(REQUIRED)
    shared = revisions_used(s, ds, 40, {"x-llm-d-revision-decision-id": "one-conversation-turn"})
    assert len(shared) == 1
    assert len(revisions_used(s, ds, 40)) == 2  # each request id its own decision


def test_disable_coordination_draws_each_request_anew():
    config = variant(REQUIRED, "mode: sum", "mode: sum\n      disableCoordination: true")
    ds = pool({"a": (1, 1), "b": (1, 1)}, set_name="summarizer")
    assert len(revisions_used(scheduler(config), ds, 40, {"x-llm-d-revision-decision-id": "same"})) == 2


def test_shared_decisions_expire_and_stay_bounded(monkeypatch):
    now = [0.0]
    screener = rollout.DisaggregatedSetRolloutScreener(
        "s", scope=(), mode=rollout.SUM, roles=("prefill", "decode"), coordinate=True, rng=random.Random(1), clock=lambda: now[0]
    )
    monkeypatch.setattr(rollout, "MAX_DECISIONS", 3)
    for key in "abcde":
        screener._decide(key, "r1")
    assert list(screener._decisions) == ["c", "d", "e"]
    now[0] = rollout.DECISION_TTL + 1
    assert screener._decided("e") is None


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_rollout_configs_check_clean(path, capsys):
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"{path}: valid (llm-d.ai/v1alpha1)") and out.err == ""
    assert "warning" not in out.out.lower()
    assert "  screeners (narrow every profile's candidates first): " in out.out


def test_the_newer_form_loads_with_its_defaults():
    s = scheduler(REQUIRED)
    screener = screener_of(s)
    assert screener.selectors == (rollout.HeaderSelector("revision", "x-llm-d-disagg-revision", REV, True),)
    assert screener.roles == ("prefill", "decode") and screener.mode == "sum" and screener.coordinate
    default = scheduler("""
plugins:
- type: disaggregatedset-rollout-screener
  parameters:
    scope: {labelSelector: "app=x"}
    revisionGating: {mode: max-role, requiredRoles: [decode, prefill]}
""")
    assert screener_of(default).selectors[0].header == rollout.DEFAULT_REVISION_HEADER


SCREENER = """
plugins:
- type: disaggregatedset-rollout-screener
  parameters:
{params}
"""


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines())


@pytest.mark.parametrize(
    "params, field, fragment",
    [
        ("revisionGating: {mode: disabled}", "scope.labelSelector", "is required"),
        ("scope: {labelSelector: 'a in ()'}\nrevisionGating: {mode: disabled}", "scope.labelSelector", "in needs at least one value"),
        ("scope: {labelSelector: a=b, namespace: llm-d}\nrevisionGating: {mode: disabled}", "scope.namespace", "unknown parameter"),
        ("scope: {labelSelector: a=b}", "revisionGating", "is required"),
        ("scope: {labelSelector: a=b}\nrevisionGating: {mode: canary}", "revisionGating.mode", "expected one of sum, max-role, disabled"),
        ("scope: {labelSelector: a=b}\nrevisionGating: {mode: sum}", "revisionGating.requireRoles.values", "is required with revisionGating.mode: sum"),
        ("scope: {labelSelector: a=b}\nrevisionGating: {mode: sum, requireRoles: {values: [prefill, prefill]}}",
         "revisionGating.requireRoles.values[1]", "listed twice"),
        ("scope: {labelSelector: a=b}\nrevisionGating: {mode: sum, requiredRoles: [prefill, '']}", "revisionGating.requiredRoles[1]", "must not be empty"),
        ("scope: {labelSelector: a=b}\nrevisionGating: {mode: sum, requireRoles: {values: [p]}, requiredRoles: [p]}",
         "revisionGating.requiredRoles", "mixes llm-d's two forms"),
        (("scope: {labelSelector: a=b}\nheaderSelectors: [{name: r, headerName: h, labelKey: l, mode: strict}]\n"
          "revisionGating: {mode: disabled, revisionHeaderName: x}"), "revisionGating.revisionHeaderName", "mixes llm-d's two forms"),
        ("scope: {labelSelector: a=b}\nheaderSelectors: [{name: r, headerName: h, labelKey: l, mode: sticky}]\nrevisionGating: {mode: disabled}",
         "headerSelectors[0].mode", "expected strict or prefer"),
        (("scope: {labelSelector: a=b}\nheaderSelectors: [{name: r, headerName: h, labelKey: l, mode: strict, weight: 2}]\n"
          "revisionGating: {mode: disabled}"), "headerSelectors[0].weight", "unknown parameter"),
        (("scope: {labelSelector: a=b}\nheaderSelectors: [{name: r, headerName: H, labelKey: l, mode: strict}, "
          "{name: s, headerName: h, labelKey: m, mode: prefer}]\nrevisionGating: {mode: disabled}"),
         "headerSelectors[1].headerName", "duplicate headerName 'h'"),
        ("scope: {labelSelector: a=b}\nrevisionGating: {mode: sum, requiredRoles: [p], disableCoordination: 'yes'}",
         "revisionGating.disableCoordination", "expected true or false"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(params, field, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(HEADER + SCREENER.format(params=_indent(params)), "bad.yaml")
    assert f"plugins[0].parameters.{field}" in str(e.value), str(e.value)
    assert fragment in str(e.value)


def test_roles_with_gating_off_load_with_a_warning():
    cfg = load_config(HEADER + SCREENER.format(params=_indent("scope: {labelSelector: a=b}\nrevisionGating: {mode: disabled, requireRoles: {values: [p]}}")), "w.yaml")
    assert any("revisionGating.requireRoles.values has no effect with revisionGating.mode: disabled" in w for w in cfg.warnings)


def test_the_pod_extractor_is_refused_as_llm_d_refuses_it():
    with pytest.raises(ConfigError) as e:
        load_config(HEADER + "plugins:\n- type: disaggregatedset-rollout-pod-extractor\n", "x.yaml")
    assert "not a plugin type in llm-d either" in str(e.value) and "disaggregatedset-rollout-screener" in str(e.value)


def test_listed_in_a_profile_it_still_screens_every_profile():
    text = variant(STRICT, "  - pluginRef: prefill-filter\n", "  - pluginRef: rollout\n  - pluginRef: prefill-filter\n")
    ds = pool({"a": (1, 1), "b": (1, 1)})
    assert sum(revisions_used(scheduler(text), ds, 20).values()) == 20  # each request on one revision


def test_label_selector_strings_read_as_kubernetes_reads_them():
    labels = {"app": "chat", "tier": "gpu", "replicas": "4"}

    def matches(text: str) -> bool:
        return all(r.matches(labels) for r in parse_label_selector(text))

    assert matches("app=chat, tier in (gpu,tpu), !canary, replicas>3, replicas<5, app!=web")
    assert not matches("app==web") and not matches("tier notin (gpu)") and not matches("canary")
    for bad in ("", "a=b,", "a b", "n>x", "-bad=1"):
        with pytest.raises(ValueError):
            parse_label_selector(bad)


# -- metrics ------------------------------------------------------------------------------------


def test_shares_and_strict_misses_are_exported_under_llm_ds_names():
    ds = pool({"old": (1, 6), "new": (1, 4), "half": (0, 3)})
    s = scheduler(STRICT)
    with pytest.raises(RequestError):
        s.schedule(req(0, {"x-disagg-revision": "half"}), ds.candidates(), ds.candidates())
    m = EppMetrics(datastore=ds)
    m.attach_precise(s.plugins)
    text = m.exposition().decode()
    share = 'llm_d_epp_disaggregatedset_revision_gating_share{mode="max-role",plugin_name="rollout",plugin_type="disaggregatedset-rollout-screener",revision="%s"}'
    assert share % "new" + " 0.4" in text and share % "old" + " 0.6" in text and share % "half" + " 0.0" in text
    assert ('llm_d_epp_disaggregatedset_strict_header_no_match_total{plugin_name="rollout",'
            'plugin_type="disaggregatedset-rollout-screener",selector="revision"} 1.0') in text  # fmt: skip


# -- the scheduler's screener hook ----------------------------------------------------------------


class KeepEvery:
    """A screener keeping every n-th candidate (by position, from `offset`), to see how the scheduler
    combines several."""

    type = "keep-every"

    def __init__(self, n: int, offset: int = 0) -> None:
        self.name = f"every-{n}"
        self.n = n
        self.offset = offset
        self.seen: list[int] = []

    def screen(self, request, endpoints, pool):
        self.seen.append(len(endpoints))
        return [ep for i, ep in enumerate(endpoints) if i % self.n == self.offset]


def test_the_scheduler_keeps_what_every_screener_kept_and_refuses_when_none_is_left():
    from pickers.framework.types import SchedulingProfile
    from pickers.plugins.picker.random import RandomPicker

    ds = Datastore()
    ds.set_endpoints(EndpointSpec(f"e{i}", f"10.0.0.{i}", 8000) for i in range(12))
    two, three = KeepEvery(2), KeepEvery(3)
    s = Scheduler(SchedulingProfile("default", RandomPicker(max_endpoints=12, rng=random.Random(0))), producers=(two, three))
    chosen = s.schedule(req(), ds.candidates()).endpoints
    assert sorted(ep.name for ep in chosen) == ["e0", "e6"]  # every 6th: kept by both
    assert two.seen == three.seen == [12]  # both saw all candidates
    s = Scheduler(SchedulingProfile("default", RandomPicker(rng=random.Random(0))), producers=(KeepEvery(2), KeepEvery(2, 1)))
    with pytest.raises(RequestError) as e:  # each keeps one of the two, not the same one
        s.schedule(req(), ds.candidates()[:2])
    assert e.value.kind.status == 503 and e.value.message == "screeners eliminated all endpoint candidates"
