"""data-parallel-profile-handler and pd-profile-handler's primaryPort (llm-d's data-parallel rewrite):
the picked rank goes in x-data-parallel-host-port, the proxy is sent to the pod's primary port, and
the rank endpoint keeps the in-flight counts and the prefix index. Through the config loader, the
Scheduler, the Director and the ext_proc state machine, as the EPP runs them."""

from __future__ import annotations

import logging
import random

import pytest

from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from pickers.config.loader import EndpointPickerConfig, load_config
from pickers.framework.endpoint import ROLE_LABEL, EndpointSpec
from pickers.framework.errors import ConfigError, RequestError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import PluginContext
from tests.unit.test_protocol import completion_body, response_body_msg, response_headers_msg, send_request, set_headers

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
DP = "x-data-parallel-host-port"

# llm-d's deploy/config/dp-epp-config.yaml, as it is there
LLMD_DP_CONFIG = """
plugins:
- type: prefix-cache-scorer
- type: decode-filter
- type: max-score-picker
- type: data-parallel-profile-handler
  parameters:
    primaryPort: 8000
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 2
"""


def handler_config(parameters: str = "", picker: str = "- type: max-score-picker") -> str:
    return f"""
plugins:
- type: active-request-scorer
{picker}
- type: data-parallel-profile-handler
{parameters}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: active-request-scorer
  - pluginRef: max-score-picker
"""


def ranks(pods: int = 2, size: int = 4) -> list[EndpointSpec]:
    return [
        EndpointSpec(f"p{g}-rank-{r}", f"10.0.{g}.1", 8000 + r, rank=r, dp_group=f"ns/p{g}")
        for g in range(pods) for r in range(size)
    ]  # fmt: skip


def load(text: str, ctx: PluginContext | None = None) -> EndpointPickerConfig:
    return load_config(HEADER + text, "test", ctx or PluginContext(ApproxPrefixIndex(), random.Random(0), 1))


def director(text: str, specs: list[EndpointSpec]) -> tuple[Director, PluginContext]:
    ctx = PluginContext(ApproxPrefixIndex(), random.Random(0), 1)
    cfg = load(text, ctx)
    ds = Datastore()
    ds.set_endpoints(specs)
    return Director(ds, Scheduler(cfg.profiles, handler=cfg.profile_handler), EppMetrics()), ctx


def req(prompt: str = "Hello there") -> InferenceRequest:
    return InferenceRequest("r", "/v1/completions", {}, "completions", "m", prompt, max_tokens=4)


# -- loading ----------------------------------------------------------------------------------------


def test_llm_ds_data_parallel_config_loads_unchanged_with_its_deprecation_note(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load(LLMD_DP_CONFIG)
    assert cfg.profile_handler.type == "data-parallel-profile-handler"
    notes = [w for w in cfg.warnings if "deprecated in llm-d: use single-profile-handler" in w]
    assert len(notes) == 1 and caplog.text.count("deprecated in llm-d: use single-profile-handler") == 1


def test_primary_port_defaults_to_8000():
    assert load(handler_config()).profile_handler.primary_port == 8000


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("70000", "expected a port 1-65535 (or 0: no rewrite), got 70000"),
        ("-1", "expected an integer >= 0, got -1"),
        ('"8000"', "expected an integer, got str '8000'"),
    ],
)
def test_a_bad_primary_port_is_refused_naming_the_field(value: str, message: str):
    with pytest.raises(ConfigError) as err:
        load(handler_config(f"  parameters:\n    primaryPort: {value}"))
    assert str(err.value).endswith(f"plugins[2].parameters.primaryPort: data-parallel-profile-handler: {message}")


def test_unknown_parameters_are_refused():
    with pytest.raises(ConfigError, match="primaryport"):
        load(handler_config("  parameters:\n    primaryport: 8000"))


def test_more_than_one_profile_is_refused_at_load():
    text = """
plugins:
- type: max-score-picker
- type: data-parallel-profile-handler
schedulingProfiles:
- name: a
  plugins: [{pluginRef: max-score-picker}]
- name: b
  plugins: [{pluginRef: max-score-picker}]
"""
    with pytest.raises(ConfigError, match="runs exactly one scheduling profile, got 2: a, b"):
        load(text)


def test_fallback_endpoints_get_a_load_warning():
    cfg = load(handler_config(picker="- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 2}"))
    assert any("names only the primary's rank" in w for w in cfg.warnings)
    assert not any("names only the primary's rank" in w for w in load(handler_config()).warnings)


# -- the result -------------------------------------------------------------------------------------


def test_the_rank_goes_in_the_header_and_the_proxy_to_the_primary_port():
    ds = Datastore()
    ds.set_endpoints(ranks())
    busy = {ep.address: ep for ep in ds.candidates()}
    for ep in ds.candidates():
        if ep.address != "10.0.1.1:8002":
            ds.acquire(ep, 0)  # every rank busy but one
    cfg = load(handler_config())
    result = Scheduler(cfg.profiles, handler=cfg.profile_handler).schedule(req(), ds.candidates())
    assert result.endpoints == [busy["10.0.1.1:8002"]]  # the rank endpoint itself: the books stay on it
    assert result.request_headers[DP] == "10.0.1.1:8002"
    assert result.destination() == "10.0.1.1:8000"


def test_primary_port_0_sets_the_header_and_rewrites_nothing():
    ds = Datastore()
    ds.set_endpoints(ranks(1, 2))
    cfg = load(handler_config("  parameters:\n    primaryPort: 0"))
    result = Scheduler(cfg.profiles, handler=cfg.profile_handler).schedule(req(), ds.candidates())
    assert result.destination() == result.endpoints[0].address == result.request_headers[DP]


def test_fallbacks_are_rewritten_too_as_in_llm_d():
    ds = Datastore()
    ds.set_endpoints(ranks(2, 1))
    cfg = load(handler_config(picker="- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 2}"))
    result = Scheduler(cfg.profiles, handler=cfg.profile_handler).schedule(req(), ds.candidates())
    assert len(result.endpoints) == 2
    assert result.destination() == ",".join(f"{ep.spec.host}:8000" for ep in result.endpoints)
    assert result.request_headers[DP] == result.endpoints[0].address


def test_a_profile_that_finds_no_endpoint_fails_the_request():
    text = handler_config().replace("- type: active-request-scorer", "- type: prefill-filter").replace(
        "pluginRef: active-request-scorer", "pluginRef: prefill-filter"
    )
    ds = Datastore()
    ds.set_endpoints(ranks(1, 2))  # unlabelled: not prefill
    cfg = load(text)
    with pytest.raises(RequestError, match="filtered out"):
        Scheduler(cfg.profiles, handler=cfg.profile_handler).schedule(req(), ds.candidates())


# -- on the wire --------------------------------------------------------------------------------------


def test_the_proxy_gets_the_primary_port_and_the_rank_endpoint_keeps_the_books():
    d, _ = director(handler_config(), ranks(1, 4))
    d.datastore.acquire(d.datastore.get("10.0.0.1:8000"), 0)  # rank 0 busy: a later rank is chosen
    stream = RequestStream(d)
    out = send_request(stream, completion_body(), extra={DP: "10.9.9.9:1"})  # a client cannot choose the rank
    headers = set_headers(out[0])
    assert headers["x-gateway-destination-endpoint"] == "10.0.0.1:8000"
    lb = out[0].dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["x-gateway-destination-endpoint"].string_value == "10.0.0.1:8000"
    rank = headers[DP]
    assert rank != "10.0.0.1:8000" and rank.startswith("10.0.0.1:800")
    ep = d.datastore.get(rank)
    assert ep is not None and ep.in_flight == 1 and d.datastore.get("10.0.0.1:8000").in_flight == 1  # its own earlier one
    assert d.decisions[-1][3] == rank  # /debug/decisions names the rank chosen
    stream.handle(response_headers_msg())
    stream.handle(response_body_msg(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 1}}', True))
    assert ep.in_flight == 0


def test_a_client_sent_rank_header_is_removed_when_no_handler_sets_it():
    d, _ = director(handler_config(), ranks(1, 1))
    d.scheduler = Scheduler(d.scheduler.profile)  # single-profile: no DP header of ours
    out = send_request(RequestStream(d), completion_body(), extra={DP: "10.9.9.9:1"})
    assert DP in out[0].request_headers.response.header_mutation.remove_headers


def test_the_prefix_index_records_the_rank_not_the_primary_port():
    text = """
plugins:
- type: prefix-cache-scorer
- type: active-request-scorer
- type: max-score-picker
- type: data-parallel-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
  - pluginRef: active-request-scorer
  - pluginRef: max-score-picker
"""
    d, ctx = director(text, ranks(1, 2))
    d.datastore.acquire(d.datastore.get("10.0.0.1:8000"), 0)  # rank 1 is chosen
    send_request(RequestStream(d), completion_body(prompt="x" * 400))
    assert ctx.prefix_index.blocks_of("10.0.0.1:8001") > 0
    assert ctx.prefix_index.blocks_of("10.0.0.1:8000") == 0


# -- pd-profile-handler's primaryPort ---------------------------------------------------------------

PD = """
plugins:
- type: prefill-filter
- type: decode-filter
- type: active-request-scorer
- type: max-score-picker
- type: always-disagg-pd-decider
- type: pd-profile-handler
  parameters:
    deciderPluginName: always-disagg-pd-decider
    primaryPort: {port}
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: active-request-scorer}}, {{pluginRef: max-score-picker}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: active-request-scorer}}, {{pluginRef: max-score-picker}}]
"""


def pd_ranks() -> list[EndpointSpec]:
    return [
        EndpointSpec(f"{role}-rank-{r}", host, 8000 + r, {ROLE_LABEL: role}, rank=r, dp_group=role)
        for role, host in (("prefill", "10.0.0.1"), ("decode", "10.0.1.1")) for r in range(2)
    ]  # fmt: skip


def test_pd_primary_port_sends_the_decode_rank_through_it_and_keeps_the_prefill_rank():
    d, _ = director(PD.format(port=8000), pd_ranks())
    d.datastore.acquire(d.datastore.get("10.0.1.1:8000"), 0)  # decode rank 1 is chosen
    out = send_request(RequestStream(d), completion_body())
    headers = set_headers(out[0])
    assert headers["x-gateway-destination-endpoint"] == "10.0.1.1:8000"
    assert headers[DP] == "10.0.1.1:8001"
    assert headers["x-prefiller-host-port"] in {"10.0.0.1:8000", "10.0.0.1:8001"}  # a rank, not rewritten
    assert d.datastore.get("10.0.1.1:8001").in_flight == 1


def test_pd_primary_port_logs_llm_ds_deprecation_once():
    cfg = load(PD.format(port=8000))
    assert sum("primaryPort not needed" in w for w in cfg.warnings) == 1


def test_pd_primary_port_0_is_plain_pd():
    d, _ = director(PD.format(port=0), pd_ranks())
    headers = set_headers(send_request(RequestStream(d), completion_body())[0])
    assert DP not in headers and headers["x-gateway-destination-endpoint"].startswith("10.0.1.1:800")
    assert not load(PD.format(port=0)).warnings


def test_pd_primary_port_out_of_range_is_refused():
    with pytest.raises(ConfigError, match=r"primaryPort: pd-profile-handler: expected a port 1-65535"):
        load(PD.format(port=65536))


def test_disagg_profile_handler_refuses_a_primary_port_llm_d_would_drop_unseen():
    text = """
plugins:
- type: max-score-picker
- type: disagg-profile-handler
  parameters: {primaryPort: 8000}
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: max-score-picker}]
"""
    with pytest.raises(ConfigError, match="primaryPort: disagg-profile-handler: not supported: disagg-profile-handler ignores it"):
        load(text)
    assert load(text.replace("primaryPort: 8000", "primaryPort: 0")).profile_handler.type == "disagg-profile-handler"
