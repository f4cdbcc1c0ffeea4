"""Guardrail admission (docs/guardrails.md): request-limits-admitter and content-check-admitter, their
parameters, and their refusals and flags through the request stream, /debug/decisions and the metrics."""

from __future__ import annotations

import json

import pytest

from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from extproc.server.admin import decisions_view
from pickers.config.loader import load_config
from pickers.framework.endpoint import Endpoint, EndpointSpec, Metrics, ServedModel, ServedModels
from pickers.framework.errors import ConfigError, RequestError
from pickers.framework.request import InferenceRequest
from pickers.framework.scheduler import Scheduler
from pickers.plugins.admission.patterns import PRESETS, Text, luhn_ok, redact
from pickers.plugins.base import PluginContext
from tests.unit.test_objectives_rewrite import dropped_reason, immediate
from tests.unit.test_protocol import ADDRS, send_request

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def config(plugins: str) -> str:
    return HEAD + "plugins:\n" + plugins + "- type: random-picker\n"


LIMITS = config("""\
- type: request-limits-admitter
  name: limits
  parameters:
    rules:
    - name: free
      objectives: [free]
      maxPromptTokens: 10
      maxOutputTokens: 100
      allowedModels: [small]
    - name: everyone
      allowedPaths: [/v1/completions, /v1/chat/*]
    - name: big-model
      models: [big]
      requireMaxTokens: true
""")

CONTENT = config("""\
- type: content-check-admitter
  name: content
  parameters:
    rules:
    - name: project
      pattern: '(?i)project\\s+bluebird'
      action: flag
    - name: aws-key
      preset: aws-access-key-id
    - name: card
      preset: card-number
      status: 400
      objectives: [public]
""")


def plugin(text: str, name: str):
    return load_config(text, "g.yaml", PluginContext()).plugins[name]


def request(*, model="small", prompt="hi", max_tokens: int | None = 5, objective="", path="/v1/completions", api="completions"):
    r = InferenceRequest("r1", path, {}, api, model, prompt, max_tokens=max_tokens)
    r.objective = objective
    return r


def refusal(admitter, req, endpoints=()) -> RequestError | None:
    try:
        admitter.admit_request(req, list(endpoints))
    except RequestError as e:
        return e
    return None


# -- request-limits-admitter -------------------------------------------------------------------


def test_a_rule_applies_only_to_its_objectives_and_models():
    limits = plugin(LIMITS, "limits")
    assert refusal(limits, request(model="other", prompt="x" * 400, max_tokens=1000)) is None  # no objective: only paths
    assert refusal(limits, request(objective="free")) is None


@pytest.mark.parametrize(
    ("req", "status", "param"),
    [
        (dict(prompt="x" * 44), 400, "maxPromptTokens"),  # 11 tokens estimated
        (dict(max_tokens=101), 400, "maxOutputTokens"),
        (dict(model="big"), 403, "allowedModels"),
        (dict(path="/v1/embeddings", api="embeddings"), 403, "allowedPaths"),
    ],
)
def test_each_limit_refuses_with_its_status_and_a_message_naming_plugin_rule_and_parameter(req, status, param):
    e = refusal(plugin(LIMITS, "limits"), request(objective="free", **req))
    assert e is not None and e.kind.status == status
    assert e.kind.dropped_reason == "rejected-request-limits"
    assert "'limits'" in e.message and param in e.message and e.rule in ("limits/free", "limits/everyone")


def test_paths_match_exactly_or_by_a_prefix_ending_in_a_star_without_the_query():
    limits = plugin(LIMITS, "limits")
    assert refusal(limits, request(path="/v1/chat/completions?x=1", api="chat")) is None
    assert refusal(limits, request(path="/v1/completions/extra")).rule == "limits/everyone"


def test_require_max_tokens_refuses_a_request_that_sets_none():
    e = refusal(plugin(LIMITS, "limits"), request(model="big", max_tokens=None))
    assert e is not None and e.rule == "limits/big-model" and "max_tokens" in e.message


def test_counted_prompt_tokens_are_used_when_a_token_producer_gave_them():
    req = request(objective="free", prompt="x" * 4)
    req.prompt_token_ids = list(range(11))
    e = refusal(plugin(LIMITS, "limits"), req)
    assert e is not None and "is 11 tokens" in e.message  # counted, not "about"


def test_a_passthrough_request_is_checked_on_its_path_alone():
    limits = plugin(LIMITS, "limits")
    req = request(objective="free", model="", api=None, path="/v1/completions")
    assert refusal(limits, req) is None
    assert refusal(limits, request(objective="free", model="", api=None, path="/metrics")).rule == "limits/everyone"


ADAPTERS = config("""\
- type: request-limits-admitter
  name: limits
  parameters:
    rules:
    - name: tenants
      allowedModels: [base]
      allowedLoraAdapters: [tenant-a]
""")


def _endpoint(served=(), running=()) -> Endpoint:
    ep = Endpoint(EndpointSpec("p", "10.0.0.1", 8000), Metrics(running_lora_adapters=frozenset(running)))
    ep.served_models = ServedModels(tuple(ServedModel(i, parent) for i, parent in served))
    return ep


def test_lora_adapters_are_those_the_pool_names_and_follow_their_own_allow_list():
    limits = plugin(ADAPTERS, "limits")
    pool = [_endpoint(served=[("base", None), ("tenant-a", "base"), ("tenant-b", "base")]), _endpoint(running=["tenant-c"])]
    assert refusal(limits, request(model="base"), pool) is None
    assert refusal(limits, request(model="tenant-a"), pool) is None
    for adapter in ("tenant-b", "tenant-c"):  # /v1/models parent; vLLM's lora_requests_info
        e = refusal(limits, request(model=adapter), pool)
        assert e is not None and e.kind.status == 403 and "allowedLoraAdapters" in e.message
    e = refusal(limits, request(model="unknown"), pool)  # not an adapter the pool knows: a model
    assert e is not None and "allowedModels" in e.message


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ("{}", "rules", "is required"),
        ("{rules: [{name: a}]}", "rules[0].name", "sets no limit"),
        ("{rules: [{name: a, maxPromptTokens: -1}]}", "rules[0].maxPromptTokens", ">= 0"),
        ("{rules: [{name: a, allowedModels: []}]}", "rules[0].allowedModels", "at least one"),
        ("{rules: [{name: a, allowedPaths: [v1]}]}", "rules[0].allowedPaths", "starting with '/'"),
        ("{rules: [{name: a, maxPromptTokens: 1}, {name: a, maxPromptTokens: 2}]}", "rules[1].name", "already named"),
        ("{rules: [{name: a, maxPromptTokens: 1, maxTokens: 3}]}", "rules[0].maxTokens", "unknown parameter"),
    ],
)
def test_limits_parameters_are_checked_and_errors_name_the_field(params, field, says):
    text = config(f"- type: request-limits-admitter\n  parameters: {params}\n")
    with pytest.raises(ConfigError) as e:
        load_config(text, "g.yaml", PluginContext())
    assert field in str(e.value) and says in str(e.value)


# -- content-check-admitter --------------------------------------------------------------------


def test_a_refusing_rule_answers_with_its_status_and_names_the_rule_never_the_match():
    content = plugin(CONTENT, "content")
    e = refusal(content, request(prompt="my key is AKIAABCDEFGHIJKLMNOP, use it"))
    assert e is not None and e.kind.status == 403 and e.kind.dropped_reason == "rejected-content-check"
    assert "'aws-key'" in e.message and "AKIA" not in e.message and e.rule == "content/aws-key"


def test_a_rule_scoped_to_an_objective_checks_only_its_requests():
    content = plugin(CONTENT, "content")
    card = "pay with 4111 1111 1111 1111 today"
    assert refusal(content, request(prompt=card)) is None
    e = refusal(content, request(prompt=card, objective="public"))
    assert e is not None and e.kind.status == 400 and e.rule == "content/card"


def test_a_flagging_rule_lets_the_request_through_with_the_rule_on_it():
    content = plugin(CONTENT, "content")
    req = request(prompt="about Project  Bluebird")
    assert refusal(content, req) is None
    assert req.flags == ["content/project"]
    clean = request(prompt="nothing to see")
    assert refusal(content, clean) is None and clean.flags is None


def test_card_numbers_need_a_valid_luhn_digit():
    assert luhn_ok("4111 1111 1111 1111") and not luhn_ok("4111 1111 1111 1112")
    card = PRESETS["card-number"]
    assert card.search(Text("card 4111-1111-1111-1111.")) and not card.search(Text("order 4111111111111112"))
    assert not card.search(Text("a 12 digit 123456789012 number"))
    assert not card.search(Text("part of a longer run: 94111111111111111"))


@pytest.mark.parametrize(
    ("preset", "text"),
    [
        ("us-ssn", "ssn 078-05-1120"),
        ("card-number", "card 5500 0000 0000 0004"),
        ("aws-access-key-id", "AKIAABCDEFGHIJKLMNOP"),
        ("email-address", "write to jane.doe@example.co.uk"),
        ("private-key", "-----BEGIN RSA PRIVATE KEY-----\nMIIE"),
        ("openai-api-key", "key sk-proj-abcdefghijklmnopqrstuvwxyz012345"),
        ("github-token", "token ghp_" + "a" * 36),
        ("bearer-token", "Authorization: Bearer abcdefghijklmnopqrstuvwxyz.0123"),
        ("bearer-token", "BEARER abcdefghijklmnopqrstuvwxyz.0123"),
    ],
)
def test_each_preset_finds_its_shape(preset, text):
    assert PRESETS[preset].search(Text(text))
    assert PRESETS[preset].search(Text(f"({text})"))
    assert not PRESETS[preset].search(Text("an ordinary sentence about the weather, 42 degrees on 2026-12-03"))


@pytest.mark.parametrize(
    ("preset", "text"),
    [
        ("us-ssn", "part 1078-05-1120 of a serial"),
        ("us-ssn", "078-05-11201"),
        ("aws-access-key-id", "XAKIAABCDEFGHIJKLMNOP"),
        ("openai-api-key", "task-abcdefghijklmnopqrstuvwxyz"),
    ],
)
def test_presets_do_not_match_inside_longer_runs(preset, text):
    assert not PRESETS[preset].search(Text(text))


def test_redaction_masks_every_preset_and_the_configs_patterns():
    text = "card 4111 1111 1111 1111, key AKIAABCDEFGHIJKLMNOP, project bluebird"
    out = redact(text, plugin(CONTENT, "content").patterns())
    assert "4111" not in out and "AKIA" not in out and "bluebird" not in out
    assert "[card-number]" in out and "[content/project]" in out


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ("{rules: [{name: a}]}", "rules[0].pattern", "exactly one of preset and pattern"),
        ("{rules: [{name: a, preset: x, pattern: y}]}", "rules[0].pattern", "exactly one"),
        ("{rules: [{name: a, preset: nope}]}", "rules[0].preset", "known: aws-access-key-id"),
        ("{rules: [{name: a, pattern: '('}]}", "rules[0].pattern", "not a valid regular expression"),
        ("{rules: [{name: a, pattern: x, status: 500}]}", "rules[0].status", "400 or 403"),
        ("{rules: [{name: a, pattern: x, action: log}]}", "rules[0].action", "refuse, flag"),
        ("{rules: [{name: a/b, pattern: x}]}", "rules[0].name", "without '/'"),
    ],
)
def test_content_parameters_are_checked_and_errors_name_the_field(params, field, says):
    text = config(f"- type: content-check-admitter\n  parameters: {params}\n")
    with pytest.raises(ConfigError) as e:
        load_config(text, "g.yaml", PluginContext())
    assert field in str(e.value) and says in str(e.value)


# -- through the request stream ----------------------------------------------------------------


def director_for(text: str) -> Director:
    cfg = load_config(text, "g.yaml", PluginContext())
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(a, a.split(":")[0], int(a.split(":")[1])) for a in ADDRS)
    return Director(ds, Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers), EppMetrics())


def body(prompt: str, **extra) -> bytes:
    return json.dumps({"model": "m", "prompt": prompt, "max_tokens": 4, **extra}).encode()


def test_a_refusal_is_an_immediate_response_with_the_status_body_and_dropped_reason():
    director = director_for(CONTENT)
    out = send_request(RequestStream(director), body("AKIAABCDEFGHIJKLMNOP"))
    imm = immediate(out)
    assert imm is not None and imm.status.code == 403 and dropped_reason(imm) == "rejected-content-check"
    assert imm.body.decode().startswith("inference error: Forbidden - content-check-admitter 'content' rule 'aws-key'")
    assert director.datastore.total_in_flight() == 0
    (decision,) = decisions_view(director)
    assert decision["rules"] == ["content/aws-key"] and decision["error"] == "Forbidden"
    assert director.metrics.admissions == {("content/aws-key", "refused"): 1}
    text = director.metrics.exposition().decode()
    assert 'llm_epp_admission_decisions_total{decision="refused",plugin_name="content",rule="aws-key"} 1.0' in text


def test_a_flagged_request_is_routed_and_its_rule_shows_in_decisions_and_metrics():
    director = director_for(CONTENT)
    stream = RequestStream(director)
    out = send_request(stream, body("about project bluebird", max_tokens=2))
    assert immediate(out) is None and stream.routing is not None
    assert decisions_view(director)[-1]["rules"] == ["content/project"]
    stream.close()  # the end of the request counts its admission decision
    assert director.metrics.admissions == {("content/project", "flagged"): 1}
