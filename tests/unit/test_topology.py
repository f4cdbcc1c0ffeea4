"""Topology-aware P/D (llm-d's topology-extractor, topology-affinity-filter, topology-affinity-scorer):
each endpoint's host, rack, zone and region from its pod; in the prefill profile the candidates near
the decode pick (the cycle's peer) are kept or preferred. Plugins alone, then the loader, then whole
P/D cycles through the Scheduler."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from extproc.cli import main as cli
from extproc.datalayer.datastore import Datastore
from extproc.datalayer.endpoints_file import parse_endpoints_yaml
from pickers.config.loader import load_config, load_config_file
from pickers.framework.endpoint import ROLE_LABEL, Endpoint, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState
from pickers.plugins.base import PluginContext
from pickers.plugins.datalayer.topology import (
    Level,
    Topology,
    TopologyExtractor,
    shared_level,
)
from pickers.plugins.profile.handlers import DisaggProfileHandler
from pickers.plugins.scorer.affinity.topology_affinity import (
    TopologyAffinityFilter,
    TopologyAffinityScorer,
)

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY_YAML = ROOT / "tests" / "unit" / "configs" / "pd-topology.yaml"
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
HOST, RACK, ZONE, REGION = (
    "kubernetes.io/hostname", "topology.kubernetes.io/rack", "topology.kubernetes.io/zone", "topology.kubernetes.io/region",
)  # fmt: skip
LONG = "The quick brown fox jumps over the lazy dog. " * 100  # ~1,125 tokens: worth a remote prefill


def ep(name: str, hostname: str = "", *, labels: dict[str, str] | None = None, n: int = 0) -> Endpoint:
    return Endpoint(EndpointSpec(name, f"10.0.0.{n}", 8000, labels or {}, hostname=hostname))


def located(name: str, host: str = "", rack: str = "", zone: str = "", region: str = "", n: int = 0) -> Endpoint:
    """An endpoint whose pod carries the default topology labels it is given."""
    labels = {k: v for k, v in ((HOST, host), (RACK, rack), (ZONE, zone), (REGION, region)) if v}
    return ep(name, labels=labels, n=n)


def bound(plugin: TopologyAffinityFilter | TopologyAffinityScorer, extractor: TopologyExtractor | None = None):
    plugin.extractor = extractor or TopologyExtractor()
    return plugin


def with_peer(peer: Endpoint | None) -> CycleState:
    cycle = CycleState()
    cycle.peer = peer
    return cycle


REQ = InferenceRequest("r", "/v1/completions", {}, "completions", "m", "hi")


# -- the extractor ---------------------------------------------------------------------------------


def test_the_extractor_reads_kubernetes_topology_labels_by_default():
    e = located("a", host="node-1", rack="r1", zone="z1", region="us")
    assert TopologyExtractor().topology(e) == Topology("node-1", "r1", "z1", "us")


def test_without_the_hostname_label_the_host_is_the_pods_spec_hostname():
    assert TopologyExtractor().topology(ep("a", "vllm-0", labels={ZONE: "z1"})) == Topology("vllm-0", zone="z1")


def test_the_hostname_label_wins_over_spec_hostname():
    assert TopologyExtractor().topology(ep("a", "vllm-0", labels={HOST: "node-1"})) == Topology("node-1")


def test_the_configured_labels_are_read_and_the_default_ones_are_not():
    ex = TopologyExtractor(hostname_label="my/host", rack_label="my/rack", zone_label="my/zone", region_label="my/region")
    e = ep("a", labels={"my/host": "h", "my/rack": "r", "my/zone": "z", "my/region": "g", ZONE: "ignored", RACK: "ignored"})
    assert ex.topology(e) == Topology("h", "r", "z", "g")
    assert ex.topology(located("b", rack="r1", zone="z1")) is None


def test_an_endpoint_without_any_topology_has_none():
    assert TopologyExtractor().topology(ep("a", labels={"app": "vllm"})) is None


def test_a_custom_hostname_label_still_falls_back_to_spec_hostname():
    ex = TopologyExtractor(hostname_label="my/host")
    assert ex.topology(ep("a", "vllm-0")) == Topology("vllm-0")


def test_the_extractor_reads_an_endpoints_file_entry_s_labels():
    # llm-d's endpoints file has no hostname: its entries' labels carry the topology
    (spec,) = parse_endpoints_yaml(
        "endpoints:\n- name: a\n  address: 10.0.0.1\n  port: '8000'\n"
        f"  labels: {{{HOST}: node-1, {ZONE}: z1}}\n"
    )
    assert TopologyExtractor().topology(Endpoint(spec)) == Topology("node-1", zone="z1")


# -- levels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "level"),
    [
        (Topology("h1", "r1", "z1", "g1"), Level.HOST),
        (Topology("h1", "r9", "z9", "g9"), Level.HOST),  # the same host implies the rest
        (Topology("h2", "r1", "z1", "g1"), Level.RACK),
        (Topology("h2", "r2", "z1", "g1"), Level.ZONE),
        (Topology("h2", "r2", "z2", "g1"), Level.REGION),
        (Topology("h2", "r2", "z2", "g2"), Level.NONE),
        (Topology(), Level.NONE),
    ],
)
def test_the_shared_level_is_the_tightest_equal_field(candidate, level):
    assert shared_level(Topology("h1", "r1", "z1", "g1"), candidate) is level


def test_an_empty_value_never_matches_not_even_an_empty_one():
    assert shared_level(Topology(zone="z1"), Topology(zone="z1")) is Level.ZONE
    assert shared_level(Topology(zone="z1"), Topology(zone="z2")) is Level.NONE


def test_the_extractors_level_of_an_endpoint_is_the_shared_level_of_its_topology():
    ex, peer = TopologyExtractor(), Topology("h1", "r1", "z1", "g1")
    for e in (located("a", host="h1"), located("b", host="h2", rack="r1"), located("c", zone="z1"), located("d", region="g2")):
        t = ex.topology(e)
        assert t is not None and ex.level(peer, e) is shared_level(peer, t)
    assert ex.level(peer, ep("none")) is None


# -- the filter ------------------------------------------------------------------------------------

PEER = located("decode", host="h1", rack="r1", zone="z1", region="g1", n=9)
SAME_HOST = located("same-host", host="h1", rack="r1", zone="z1", region="g1", n=1)
SAME_RACK = located("same-rack", host="h2", rack="r1", zone="z1", region="g1", n=2)
SAME_ZONE = located("same-zone", host="h3", rack="r3", zone="z1", region="g1", n=3)
SAME_REGION = located("same-region", host="h4", rack="r4", zone="z4", region="g1", n=4)
ELSEWHERE = located("elsewhere", host="h5", rack="r5", zone="z5", region="g5", n=5)
CANDIDATES = [SAME_HOST, SAME_RACK, SAME_ZONE, SAME_REGION, ELSEWHERE]


@pytest.mark.parametrize(
    ("floor", "kept"),
    [
        (Level.HOST, ["same-host"]),
        (Level.RACK, ["same-host", "same-rack"]),
        (Level.ZONE, ["same-host", "same-rack", "same-zone"]),
        (Level.REGION, ["same-host", "same-rack", "same-zone", "same-region"]),
    ],
)
def test_the_filter_keeps_candidates_at_min_affinity_or_tighter(floor, kept):
    f = bound(TopologyAffinityFilter(min_affinity=floor))
    assert [e.name for e in f.filter(REQ, with_peer(PEER), CANDIDATES)] == kept


def test_a_candidate_on_the_peers_host_passes_every_floor_whatever_its_other_labels():
    odd = located("odd", host="h1", rack="r9", zone="z9", region="g9")
    for floor in (Level.RACK, Level.ZONE, Level.REGION):
        f = bound(TopologyAffinityFilter(min_affinity=floor))
        assert f.filter(REQ, with_peer(PEER), [odd, ELSEWHERE]) == [odd]


def test_the_filter_fails_open_without_a_peer():
    f = bound(TopologyAffinityFilter())
    assert f.filter(REQ, with_peer(None), CANDIDATES) == CANDIDATES


def test_the_filter_fails_open_when_the_peer_has_no_topology():
    f = bound(TopologyAffinityFilter())
    assert f.filter(REQ, with_peer(ep("decode", labels={"app": "vllm"})), CANDIDATES) == CANDIDATES


def test_the_filter_fails_open_when_no_candidate_is_close_enough():
    f = bound(TopologyAffinityFilter(min_affinity=Level.ZONE))
    assert f.filter(REQ, with_peer(PEER), [SAME_REGION, ELSEWHERE]) == [SAME_REGION, ELSEWHERE]


def test_the_filter_fails_open_without_an_extractor():
    f = TopologyAffinityFilter()
    assert f.filter(REQ, with_peer(PEER), CANDIDATES) == CANDIDATES


def test_a_candidate_without_a_topology_is_dropped():
    unknown = ep("unknown", labels={"app": "vllm"}, n=7)
    f = bound(TopologyAffinityFilter(min_affinity=Level.REGION))
    assert f.filter(REQ, with_peer(PEER), [unknown, SAME_REGION]) == [SAME_REGION]


def test_hosts_missing_on_both_sides_do_not_make_them_co_located():
    peer = located("decode", zone="z1")
    near = located("near", zone="z1")
    f = bound(TopologyAffinityFilter(min_affinity=Level.HOST))
    assert f.filter(REQ, with_peer(peer), [near, ELSEWHERE]) == [near, ELSEWHERE]  # none on the host: open
    f = bound(TopologyAffinityFilter(min_affinity=Level.ZONE))
    assert f.filter(REQ, with_peer(peer), [near, ELSEWHERE]) == [near]


# -- the scorer ------------------------------------------------------------------------------------


def test_the_scorer_grades_by_the_shared_level_on_llm_ds_curve():
    unknown = ep("unknown", labels={"app": "vllm"})
    s = bound(TopologyAffinityScorer())
    assert s.score(REQ, with_peer(PEER), [*CANDIDATES, unknown]) == [1.0, 0.2, 0.05, 0.02, 0.0, 0.0]


def test_the_scorer_scores_every_candidate_0_without_a_peer_topology():
    s = bound(TopologyAffinityScorer())
    assert s.score(REQ, with_peer(None), CANDIDATES) == [0.0] * 5
    assert s.score(REQ, with_peer(ep("decode")), CANDIDATES) == [0.0] * 5
    assert TopologyAffinityScorer().score(REQ, with_peer(PEER), CANDIDATES) == [0.0] * 5  # no extractor


def test_the_scorer_is_an_affinity_scorer():
    assert TopologyAffinityScorer.category == "affinity"


# -- config ----------------------------------------------------------------------------------------


def load(body: str):
    return load_config(HEADER + body, "t.yaml")


def error_of(body: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(body)
    return str(e.value)


PD = """\
- type: prefill-filter
- type: decode-filter
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always-disagg-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: topology-affinity-filter}, {pluginRef: topology-affinity-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}]
"""
PLUGINS = "plugins:\n- type: topology-extractor\n- type: topology-affinity-filter\n- type: topology-affinity-scorer\n"


def test_our_config_in_the_shape_of_llm_ds_pd_topology_config_loads_with_its_parameters():
    cfg = load_config_file(TOPOLOGY_YAML)
    assert cfg.warnings == ()
    ex = cfg.plugins["topology-extractor"]
    f = cfg.plugins["topology-affinity-filter"]
    s = cfg.plugins["topology-affinity-scorer"]
    assert isinstance(ex, TopologyExtractor) and ex.rack_label == "example.com/nvlink-domain"
    assert (ex.hostname_label, ex.zone_label, ex.region_label) == (HOST, ZONE, REGION)
    assert isinstance(f, TopologyAffinityFilter) and f.min_affinity is Level.ZONE and f.extractor is ex
    assert isinstance(s, TopologyAffinityScorer) and s.extractor is ex
    prefill = next(p for p in cfg.profiles if p.name == "prefill")
    assert f in prefill.filters and any(w.scorer is s and w.weight == 1 for w in prefill.scorers)
    assert cfg.plugin_parameters["topology-affinity-filter"] == {"minAffinity": "zone", "topologyProducerName": "topology-extractor"}
    assert cfg.plugin_parameters["topology-extractor"]["rack"] == "example.com/nvlink-domain"


def test_defaults_and_empty_values_are_llm_ds():
    cfg = load(PLUGINS.replace("- type: topology-affinity-filter\n", "- type: topology-affinity-filter\n  parameters: {minAffinity: ''}\n")
               .replace("- type: topology-extractor\n", "- type: topology-extractor\n  parameters: {zone: ''}\n") + PD)  # fmt: skip
    f = cfg.plugins["topology-affinity-filter"]
    assert isinstance(f, TopologyAffinityFilter) and f.min_affinity is Level.HOST
    assert cfg.plugin_parameters["topology-extractor"] == {"hostname": HOST, "rack": RACK, "zone": ZONE, "region": REGION}
    assert cfg.warnings == ()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            PLUGINS.replace("- type: topology-affinity-filter\n", "- type: topology-affinity-filter\n  parameters: {minAffinity: node}\n"),
            "plugins[1].parameters.minAffinity: topology-affinity-filter: expected one of host, rack, zone, region, got 'node'",
        ),
        (
            PLUGINS.replace("- type: topology-extractor\n", "- type: topology-extractor\n  parameters: {hostLabel: x}\n"),
            "plugins[0].parameters.hostLabel: topology-extractor: unknown parameter",
        ),
        (
            PLUGINS.replace("- type: topology-extractor\n", "- type: topology-extractor\n  parameters: {zone: 3}\n"),
            "plugins[0].parameters.zone: topology-extractor: expected a non-empty string",
        ),
        (
            PLUGINS.replace("- type: topology-affinity-scorer\n", "- type: topology-affinity-scorer\n  parameters: {minAffinity: host}\n"),
            "plugins[2].parameters.minAffinity: topology-affinity-scorer: unknown parameter",
        ),
        (
            PLUGINS.replace("- type: topology-affinity-filter\n", "- type: topology-affinity-filter\n  parameters: {topologyProducerName: prefill-filter}\n"),
            "plugins[1].parameters.topologyProducerName: topology-affinity-filter: 'prefill-filter': prefill-filter, not a topology-extractor",
        ),
        (
            PLUGINS.replace("- type: topology-affinity-scorer\n", "- type: topology-affinity-scorer\n  parameters: {topologyProducerName: nope}\n"),
            "plugins[2].parameters.topologyProducerName: topology-affinity-scorer: 'nope': no plugin",
        ),
        (
            PLUGINS.replace("- type: topology-extractor\n", "- {type: topology-extractor, name: a}\n- {type: topology-extractor, name: b}\n"),
            "topologyProducerName: topology-affinity-filter: 2 topology-extractor plugins",
        ),
    ],
    ids=["bad-level", "unknown-parameter", "label-not-a-string", "scorer-takes-no-floor", "not-an-extractor", "dangling", "ambiguous"],
)
def test_each_mistake_is_refused_naming_the_field(body, message):
    assert message in error_of(body + PD)


def test_two_extractors_pair_by_topology_producer_name():
    cfg = load(
        "plugins:\n- type: topology-extractor\n- name: racks\n  type: topology-extractor\n  parameters: {rack: my/rack}\n"
        "- type: topology-affinity-filter\n  parameters: {topologyProducerName: racks, minAffinity: rack}\n"
        "- type: topology-affinity-scorer\n" + PD
    )
    f, s = cfg.plugins["topology-affinity-filter"], cfg.plugins["topology-affinity-scorer"]
    assert f.extractor is cfg.plugins["racks"] and s.extractor is cfg.plugins["topology-extractor"]  # type: ignore[attr-defined]
    peer = ep("decode", labels={"my/rack": "r1"})
    near, far = ep("near", labels={"my/rack": "r1"}, n=1), ep("far", labels={RACK: "r1"}, n=2)
    assert f.filter(REQ, with_peer(peer), [near, far]) == [near]  # type: ignore[attr-defined]


def test_the_only_extractor_is_read_whatever_its_name():
    cfg = load(PLUGINS.replace("- type: topology-extractor\n", "- {type: topology-extractor, name: where}\n") + PD)
    assert cfg.plugins["topology-affinity-filter"].extractor is cfg.plugins["where"]  # type: ignore[attr-defined]
    assert cfg.plugin_parameters["topology-affinity-scorer"] == {"topologyProducerName": "where"}


def test_without_an_extractor_the_plugins_load_with_a_warning_and_do_nothing():
    cfg = load(PLUGINS.replace("- type: topology-extractor\n", "") + PD)
    assert any("topology-affinity-filter" in w and "no topology-extractor" in w and "passes every candidate" in w for w in cfg.warnings)
    assert any("topology-affinity-scorer" in w and "scores every candidate 0" in w for w in cfg.warnings)
    f = cfg.plugins["topology-affinity-filter"]
    assert f.filter(REQ, with_peer(PEER), CANDIDATES) == CANDIDATES  # type: ignore[attr-defined]


def test_in_a_profile_that_runs_without_a_peer_they_load_with_a_warning():
    single = load(PLUGINS + "- type: max-score-picker\n")  # one default profile: no decode pick before it
    assert any("topology-affinity-filter" in w and "no earlier pick" in w for w in single.warnings)
    decode = load(PLUGINS + PD.replace("[{pluginRef: decode-filter}]", "[{pluginRef: decode-filter}, {pluginRef: topology-affinity-scorer}]"))
    (warning,) = [w for w in decode.warnings if "no earlier pick" in w]
    assert "topology-affinity-scorer" in warning and "'decode'" in warning and "'prefill'" not in warning


def test_data_parallel_profile_handler_runs_them_without_a_peer():
    cfg = load(PLUGINS + "- type: data-parallel-profile-handler\nschedulingProfiles:\n- name: default\n"
               "  plugins: [{pluginRef: topology-affinity-filter}]\n")  # fmt: skip
    assert any("topology-affinity-filter" in w and "no earlier pick" in w for w in cfg.warnings)


def test_they_are_no_longer_refused_as_unsupported():
    from pickers.config.unsupported import UNSUPPORTED_TYPES

    assert not {"topology-extractor", "topology-affinity-filter", "topology-affinity-scorer"} & UNSUPPORTED_TYPES.keys()


def test_check_config_prints_the_topology_plugins_with_their_parameters(capsys):
    rc = cli.main(["check-config", str(TOPOLOGY_YAML)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "    filters: prefill-filter, topology-affinity-filter\n" in out
    assert "topology-affinity-scorer x1" in out
    assert (
        "    topology-extractor: hostname=kubernetes.io/hostname, rack=example.com/nvlink-domain, "
        "zone=topology.kubernetes.io/zone, region=topology.kubernetes.io/region\n"
    ) in out
    assert "    topology-affinity-filter: minAffinity=zone, topologyProducerName=topology-extractor\n" in out
    assert "    topology-affinity-scorer: topologyProducerName=topology-extractor\n" in out
    assert "warning" not in out


# -- whole P/D cycles ------------------------------------------------------------------------------


def pd_pool(*specs: EndpointSpec) -> Datastore:
    ds = Datastore()
    ds.set_endpoints(specs)
    return ds


def node(name: str, role: str, n: int, hostname: str, zone: str) -> EndpointSpec:
    """A pod of a StatefulSet (spec.hostname set) pinned to a zone, labelled with it."""
    return EndpointSpec(name, f"10.0.0.{n}", 8000, {ROLE_LABEL: role, ZONE: zone}, hostname=hostname)


def scheduler(config: str | Path = TOPOLOGY_YAML) -> Scheduler:
    ctx = PluginContext(rng=random.Random(5))
    cfg = load_config_file(config, ctx) if isinstance(config, Path) else load_config(HEADER + config, "t.yaml", ctx)
    return Scheduler(cfg.profiles, handler=cfg.profile_handler)


_SEQ = itertools.count()


def schedule(s: Scheduler, ds: Datastore, *busy: str) -> tuple[str, str]:
    """(decode pick, prefill pick) with the `busy` endpoints queueing (the queue scorer avoids them)."""
    for e in ds.candidates():
        ds.update_metrics(e.address, Metrics(waiting=5 if e.name in busy else 0))
    prompt = f"request {next(_SEQ)}: {LONG}"  # a new prompt each time: no endpoint holds it yet
    result = s.schedule(InferenceRequest("r", "/v1/completions", {}, "completions", "m", prompt, max_tokens=8), ds.candidates())
    prefill = result.profile_results["prefill"][0].name if result.profile_results else ""
    return result.endpoints[0].name, prefill


def test_the_prefill_pick_follows_the_decode_pick_to_its_host():
    ds = pd_pool(
        node("d-a", "decode", 1, "host-a", "z1"), node("d-b", "decode", 2, "host-b", "z1"),
        node("p-a", "prefill", 3, "host-a", "z1"), node("p-b", "prefill", 4, "host-b", "z1"),
    )  # fmt: skip
    s = scheduler()
    assert schedule(s, ds, "d-b") == ("d-a", "p-a")
    assert schedule(s, ds, "d-a") == ("d-b", "p-b")


def test_the_prefill_pick_stays_in_the_decode_picks_zone_when_its_host_has_none():
    ds = pd_pool(
        node("d-a", "decode", 1, "host-a", "z1"), node("d-b", "decode", 2, "host-b", "z2"),
        node("p-c", "prefill", 3, "host-c", "z1"), node("p-d", "prefill", 4, "host-d", "z2"),
    )  # fmt: skip
    s = scheduler()
    for _ in range(5):  # the queue and prefix scores tie: the filter alone decides
        assert schedule(s, ds, "d-b") == ("d-a", "p-c")
        assert schedule(s, ds, "d-a") == ("d-b", "p-d")


def test_with_no_prefill_endpoint_in_the_zone_the_request_is_still_disaggregated():
    ds = pd_pool(
        node("d-a", "decode", 1, "host-a", "z1"), node("d-b", "decode", 2, "host-b", "z1"),
        node("p-x", "prefill", 3, "host-x", "z9"),
    )  # fmt: skip
    assert schedule(scheduler(), ds, "d-b") == ("d-a", "p-x")


def test_the_scorer_alone_prefers_the_host_but_yields_to_a_busy_one():
    config = (
        "plugins:\n- type: topology-extractor\n- type: topology-affinity-scorer\n- type: queue-scorer\n"
        "- type: prefill-filter\n- type: decode-filter\n- type: always-disagg-pd-decider\n"
        "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: always-disagg-pd-decider}}\n"
        "schedulingProfiles:\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer},"
        " {pluginRef: topology-affinity-scorer}]\n- name: decode\n  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]\n"
    )
    ds = pd_pool(
        node("d-a", "decode", 1, "host-a", "z1"), node("d-b", "decode", 2, "host-b", "z1"),
        node("p-a", "prefill", 3, "host-a", "z1"), node("p-c", "prefill", 4, "host-c", "z1"),
    )  # fmt: skip
    s = scheduler(config)
    assert schedule(s, ds, "d-b") == ("d-a", "p-a")  # queue ties: host 1 beats zone 0.05
    # the host's prefill endpoint queues: queue 0 + host 1 = 1 < queue 1 + zone 0.05
    assert schedule(s, ds, "d-b", "p-a") == ("d-a", "p-c")


def test_the_decode_pick_is_the_cycles_peer_only_while_the_prefill_profile_runs():
    seen: dict[str, object] = {}

    class Spy:
        type = name = "spy"

        def filter(self, request, cycle, endpoints):
            seen[cycle.data.get("profile", "")] = cycle.peer
            return endpoints

    cfg = load(PLUGINS + PD)
    handler = cfg.profile_handler
    assert isinstance(handler, DisaggProfileHandler) and handler.peer_profiles() == ("prefill",)
    for prof in cfg.profiles:
        prof.filters.insert(0, Spy())  # type: ignore[arg-type]
        prof.filters.insert(0, _Mark(prof.name))  # type: ignore[arg-type]
    ds = pd_pool(node("d", "decode", 1, "h", "z"), node("p", "prefill", 2, "h", "z"))
    result = Scheduler(cfg.profiles, handler=handler).schedule(REQ, ds.candidates())
    assert seen == {"decode": None, "prefill": result.endpoints[0]}


class _Mark:
    """Notes which profile is running, for the spy behind it."""

    type = "mark"

    def __init__(self, profile: str) -> None:
        self.name = f"mark-{profile}"
        self.profile = profile

    def filter(self, request, cycle, endpoints):
        cycle.data["profile"] = self.profile
        return endpoints


@pytest.mark.parametrize("order", ["decode-first", "decodeFirst", "decode", "DECODE_FIRST", ""])
def test_stage_order_decode_first_loads_in_each_of_llm_ds_spellings(order):
    cfg = load(PLUGINS + PD.replace("{deciders:", f"{{stageOrder: '{order}', deciders:"))
    assert cfg.plugin_parameters["disagg-profile-handler"]["stageOrder"] == "decode-first"


@pytest.mark.parametrize(
    ("order", "message"),
    [("prefill-first", "stageOrder: disagg-profile-handler: prefill-first is not supported"),
     ("Prefill", "prefill-first is not supported"),
     ("sideways", "invalid stage order 'sideways', must be decode-first or prefill-first")],
)  # fmt: skip
def test_stage_order_prefill_first_is_refused_with_the_reason(order, message):
    assert message in error_of(PLUGINS + PD.replace("{deciders:", f"{{stageOrder: {order}, deciders:"))
