"""P/D scheduling: disagg-profile-handler runs decode, asks its decider, maybe runs prefill; the decode
pick is the destination and the prefill pick goes in x-prefiller-host-port. Driven through the config
loader and the Scheduler as the EPP does, on a datastore of labelled endpoints."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from extproc.datalayer.datastore import Datastore
from pickers.config.loader import load_config, load_config_file
from pickers.framework.endpoint import ROLE_LABEL, EndpointSpec, Metrics
from pickers.framework.errors import ConfigError, RequestError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.framework.types import CycleState
from pickers.indexes.prefix import block_hashes
from pickers.plugins.base import PluginContext
from pickers.plugins.profile.handlers import DisaggProfileHandler, PdProfileHandler
from pickers.plugins.profile.pd_deciders import AlwaysDisaggPDDecider, PrefixBasedPDDecider

ROOT = Path(__file__).resolve().parents[2]
PD_YAML = ROOT / "pickers" / "configs" / "pd.yaml"
HEADER = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
LONG = "The quick brown fox jumps over the lazy dog. " * 100  # 4,500 characters, ~1,125 tokens


def pool(prefill: int = 2, decode: int = 2, roles: dict[str, str] | None = None) -> Datastore:
    ds = Datastore()
    specs = [EndpointSpec(f"p{i}", f"10.0.0.{i}", 8000, {ROLE_LABEL: "prefill"}) for i in range(prefill)]
    specs += [EndpointSpec(f"d{i}", f"10.0.1.{i}", 8000, {ROLE_LABEL: "decode"}) for i in range(decode)]
    specs += [EndpointSpec(name, f"10.0.2.{i}", 8000, {ROLE_LABEL: role} if role else {})
              for i, (name, role) in enumerate((roles or {}).items())]
    ds.set_endpoints(specs)
    return ds


def scheduler(ds: Datastore, config: str | Path = PD_YAML) -> Scheduler:
    ctx = PluginContext(rng=random.Random(3))
    cfg = load_config_file(config, ctx) if isinstance(config, Path) else load_config(HEADER + config, "test", ctx)
    return Scheduler(cfg.profiles, handler=cfg.profile_handler)


def req(prompt: str, i: int = 0) -> InferenceRequest:
    return InferenceRequest(f"r{i}", "/v1/completions", {}, "completions", "m", prompt, max_tokens=16)


def test_long_uncached_prompt_gets_a_decode_destination_and_a_prefill_header():
    ds = pool()
    result = scheduler(ds).schedule(req(LONG), ds.candidates())
    assert result.profile == "decode"
    assert result.endpoints[0].labels[ROLE_LABEL] == "decode"
    prefiller = result.request_headers["x-prefiller-host-port"]
    assert prefiller in {"10.0.0.0:8000", "10.0.0.1:8000"}


def test_short_prompt_is_served_aggregated_without_the_header():
    ds = pool()
    result = scheduler(ds).schedule(req("hello there"), ds.candidates())
    assert result.endpoints[0].labels[ROLE_LABEL] == "decode"
    assert "x-prefiller-host-port" not in result.request_headers


def test_a_repeated_prompt_is_cached_on_its_decode_endpoint_and_skips_prefill():
    ds = pool()
    s = scheduler(ds)
    first = s.schedule(req(LONG + "first question"), ds.candidates())
    second = s.schedule(req(LONG + "second question"), ds.candidates())
    assert "x-prefiller-host-port" in first.request_headers
    assert second.endpoints[0] is first.endpoints[0]
    assert "x-prefiller-host-port" not in second.request_headers


def test_prefix_index_records_the_prompt_on_the_prefill_and_the_decode_endpoint():
    ds = pool()
    s = scheduler(ds)
    result = s.schedule(req(LONG), ds.candidates())
    scorer = s.profile.scorers[0].scorer
    index, block = scorer.index, scorer.block_chars  # type: ignore[attr-defined]
    assert block == 64 * 4  # pd.yaml's producer: llm-d's 64-token blocks
    prefill_addr = result.request_headers["x-prefiller-host-port"]
    assert index.blocks_of(result.endpoints[0].address) == len(LONG) // block
    assert index.blocks_of(prefill_addr) == len(LONG) // block


def test_no_prefill_endpoint_serves_aggregated_and_never_fails():
    ds = pool(prefill=0, decode=2)
    result = scheduler(ds).schedule(req(LONG), ds.candidates())
    assert result.endpoints[0].labels[ROLE_LABEL] == "decode"
    assert result.request_headers == {}


def test_no_decode_endpoint_is_a_429_like_any_filtered_out_pool():
    ds = pool(prefill=2, decode=0)
    with pytest.raises(RequestError) as e:
        scheduler(ds).schedule(req(LONG), ds.candidates())
    assert e.value.kind.status == 429 and "decode-filter" in str(e.value)


def test_unlabelled_and_both_endpoints_decode_and_both_can_prefill():
    ds = pool(prefill=0, decode=0, roles={"both": "both", "plain": ""})
    result = scheduler(ds).schedule(req(LONG), ds.candidates())
    assert result.endpoints[0].name in {"both", "plain"}
    assert result.request_headers["x-prefiller-host-port"] == "10.0.2.0:8000"


def test_decider_threshold_and_minimum_prompt_length():
    d = pool(prefill=0, decode=1).candidates()[0]
    decider = PrefixBasedPDDecider(PluginContext(), non_cached_tokens=100, prompt_tokens=300)
    assert decider.disaggregate(req("x" * 300 * 4), CycleState(), d)
    assert not decider.disaggregate(req("x" * 299 * 4), CycleState(), d)  # below promptTokens
    assert not PrefixBasedPDDecider(PluginContext(), non_cached_tokens=0).disaggregate(req(LONG), CycleState(), d)


def test_uncached_part_is_prompt_minus_cached_blocks_on_the_decode_endpoint():
    ctx = PluginContext()
    ds = pool(prefill=0, decode=1)
    d = ds.candidates()[0]
    cached = "c" * 64 * 10  # 10 blocks, 160 tokens
    ctx.prefix_index.record(d.address, block_hashes("m", cached))
    decider = PrefixBasedPDDecider(ctx, non_cached_tokens=100)
    assert not decider.disaggregate(req(cached + "u" * 99 * 4), CycleState(), d)  # 99 uncached tokens
    assert decider.disaggregate(req(cached + "u" * 100 * 4), CycleState(), d)  # 100 uncached tokens


def test_always_disagg_decider_prefills_even_short_prompts():
    ds = pool()
    body = PD_YAML.read_text().split("plugins:\n", 1)[1].replace(
        "- type: prefix-based-pd-decider\n  parameters:\n    nonCachedTokens: 512\n", "- type: always-disagg-pd-decider\n"
    ).replace("prefill: prefix-based-pd-decider", "prefill: always-disagg-pd-decider")
    result = scheduler(ds, "plugins:\n" + body).schedule(req("hi"), ds.candidates())
    assert "x-prefiller-host-port" in result.request_headers


def test_llm_d_pd_example_configs_load_unchanged():
    cfg = load_config_file(ROOT / "tests" / "unit" / "configs" / "llm-d-pd.yaml")
    assert [p.name for p in cfg.profiles] == ["prefill", "decode"]
    assert isinstance(cfg.profile_handler, DisaggProfileHandler)
    assert isinstance(cfg.profile_handler.decider, PrefixBasedPDDecider)
    assert cfg.profile_handler.decider.non_cached_tokens == 16 and cfg.profile_handler.decider.prompt_tokens == 8

    legacy = load_config_file(ROOT / "tests" / "unit" / "configs" / "llm-d-pd-legacy.yaml")
    assert isinstance(legacy.profile_handler, PdProfileHandler)
    assert isinstance(legacy.profile_handler.decider, AlwaysDisaggPDDecider)  # threshold 0: always P/D
    assert [p.picker.type for p in legacy.profiles] == ["max-score-picker", "max-score-picker"]


def test_llm_d_example_config_schedules_prefill_and_decode():
    ds = pool()
    result = scheduler(ds, ROOT / "tests" / "unit" / "configs" / "llm-d-pd-legacy.yaml").schedule(req("hi"), ds.candidates())
    assert result.endpoints[0].labels[ROLE_LABEL] == "decode"
    assert result.request_headers["x-prefiller-host-port"].startswith("10.0.0.")


def test_shipped_pd_config_loads():
    cfg = load_config_file(PD_YAML)
    assert isinstance(cfg.profile_handler, DisaggProfileHandler)
    assert cfg.profile_handler.decider.non_cached_tokens == 512  # type: ignore[union-attr]


def error_of(body: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(HEADER + body, "test.yaml")
    return str(e.value)


TWO_PROFILES = (
    "schedulingProfiles:\n- name: prefill\n  plugins:\n  - pluginRef: prefill-filter\n"
    "- name: decode\n  plugins:\n  - pluginRef: decode-filter\n"
)


def test_several_profiles_without_a_handler_are_refused():
    msg = error_of("plugins:\n- type: prefill-filter\n- type: decode-filter\n" + TWO_PROFILES)
    assert "schedulingProfiles: 2 profiles need a profile handler" in msg


def test_unknown_decider_name_names_the_parameter():
    msg = error_of(
        "plugins:\n- type: prefill-filter\n- type: decode-filter\n- type: disagg-profile-handler\n"
        "  parameters:\n    deciders:\n      prefill: nope\n" + TWO_PROFILES
    )
    assert "plugins[2].parameters.deciders.prefill" in msg and "no plugin named 'nope'" in msg


def test_decider_that_is_not_a_decider_is_refused():
    msg = error_of(
        "plugins:\n- type: prefill-filter\n- type: decode-filter\n- type: disagg-profile-handler\n"
        "  parameters:\n    deciders:\n      prefill: decode-filter\n" + TWO_PROFILES
    )
    assert "deciders.prefill" in msg and "is not a disaggregation decider" in msg


def test_missing_decode_profile_names_the_parameter():
    msg = error_of(
        "plugins:\n- type: prefill-filter\n- type: decode-filter\n- type: always-disagg-pd-decider\n"
        "- type: disagg-profile-handler\n  parameters:\n    profiles:\n      decode: dec\n"
        "    deciders:\n      prefill: always-disagg-pd-decider\n" + TWO_PROFILES
    )
    assert "plugins[3].parameters.profiles.decode" in msg and "no scheduling profile named 'dec'" in msg


def test_negative_non_cached_tokens_is_refused():
    msg = error_of("plugins:\n- type: prefix-based-pd-decider\n  parameters:\n    nonCachedTokens: -1\n- type: queue-scorer\n")
    assert "plugins[0].parameters.nonCachedTokens" in msg


def test_single_profile_result_has_no_profile_results_and_no_headers():
    ds = pool(prefill=0, decode=2)
    cfg = load_config(HEADER + "plugins:\n- type: queue-scorer\n", "t", PluginContext())
    result = Scheduler(cfg.profiles, handler=cfg.profile_handler).schedule(req(LONG), ds.candidates())
    assert result.profile_results is None and result.request_headers == {}


LEGACY_DECIDER = """apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciderPluginName: always-disagg-pd-decider{extra}
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: max-score-picker}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: max-score-picker}}]
"""


def test_deprecated_decider_plugin_name_binds_the_decider_with_a_warning():
    cfg = load_config(LEGACY_DECIDER.format(extra=""), "t")
    handler = cfg.profile_handler
    assert isinstance(handler, DisaggProfileHandler) and isinstance(handler.decider, AlwaysDisaggPDDecider)
    assert any("Deprecated parameter 'deciderPluginName', use 'deciders.prefill' instead" in w for w in cfg.warnings)


def test_decider_plugin_name_and_deciders_prefill_together_are_refused():
    with pytest.raises(ConfigError, match="deciderPluginName.*not both"):
        load_config(LEGACY_DECIDER.format(extra="\n    deciders: {prefill: always-disagg-pd-decider}"), "t")


def test_a_dangling_decider_plugin_name_names_the_parameter():
    with pytest.raises(ConfigError, match=r"plugins\[1\]\.parameters\.deciderPluginName.*no plugin named 'nope'"):
        load_config(LEGACY_DECIDER.format(extra="").replace("deciderPluginName: always-disagg-pd-decider", "deciderPluginName: nope"), "t")


SHORT_ON_PREFILL = (
    "plugins:\n- type: prefill-filter\n- type: decode-filter\n  parameters: {prefillEndpointsBelowTokens: 256}\n"
    "- type: active-request-scorer\n- type: max-score-picker\n- type: always-disagg-pd-decider\n"
    "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: always-disagg-pd-decider}}\n"
    "schedulingProfiles:\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker}]\n"
    "- name: decode\n  plugins: [{pluginRef: decode-filter}, {pluginRef: active-request-scorer}, {pluginRef: max-score-picker}]\n"
)


def geometry(ds: Datastore, blocks: dict[str, int]) -> None:
    """Give endpoints the KV geometry `vllm:cache_config_info` would report (16-token blocks)."""
    for ep in ds.candidates():
        if ep.name in blocks:
            ep.metrics = Metrics(block_size=16, num_gpu_blocks=blocks[ep.name])


def test_decode_filter_lets_prefill_endpoints_serve_short_requests_whole():
    ds = pool(prefill=3, decode=1)
    geometry(ds, {"p0": 8000, "p1": 2000, "p2": 8000, "d0": 8000})  # p1: another kind of box (a CPU's)
    d0 = next(ep for ep in ds.candidates() if ep.name == "d0")
    d0.in_flight = 5  # the one decoder is busy: an idle prefill server takes the short request
    s = scheduler(ds, SHORT_ON_PREFILL)
    short = s.schedule(req("hello there"), ds.candidates())
    assert short.endpoints[0].name in ("p0", "p2")
    kept = [ep.name for ep in s.profiles["decode"].filters[0].filter(req("hi"), CycleState(), ds.candidates())]
    assert kept == ["p0", "p2", "d0"]  # not p1, whose geometry no decode endpoint has
    assert "x-prefiller-host-port" not in short.request_headers  # served whole there, even by always-disagg
    assert short.profile_results is None or set(short.profile_results) == {"decode"}
    long = s.schedule(req(LONG), ds.candidates())  # ~1,125 tokens: above the bound, decode endpoints only
    assert long.endpoints[0].name == "d0" and long.request_headers["x-prefiller-host-port"].startswith("10.0.0.")


def test_prefill_endpoints_below_tokens_is_off_by_default_and_refuses_a_negative():
    ds = pool(prefill=3, decode=1)
    geometry(ds, {"p0": 8000, "p1": 8000, "p2": 8000, "d0": 8000})
    next(ep for ep in ds.candidates() if ep.name == "d0").in_flight = 5
    s = scheduler(ds, SHORT_ON_PREFILL.replace("\n  parameters: {prefillEndpointsBelowTokens: 256}", ""))
    assert s.schedule(req("hello there"), ds.candidates()).endpoints[0].name == "d0"
    with pytest.raises(ConfigError, match="prefillEndpointsBelowTokens"):
        scheduler(ds, SHORT_ON_PREFILL.replace("256", "-1"))
