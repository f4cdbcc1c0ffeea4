"""request-attribute-reporter: llm-d's config loads as written, bad CEL is refused at load naming the
attribute, and each response's usage is evaluated as llm-d's plugin does (a Struct of doubles; 0, -1,
errors and non-numbers report nothing); the value reaches Envoy as dynamic metadata on the message
that ends the response body, and nothing changes when no reporter is configured."""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import pytest
import yaml
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.cli import main as cli
from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream
from extproc.handlers.usage import Usage, _UsageDetails, usage_object
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from pickers.config.loader import load_config
from pickers.framework.endpoint import EndpointSpec
from pickers.framework.errors import ConfigError
from pickers.framework.scheduler import Scheduler
from pickers.indexes.prefix import ApproxPrefixIndex
from pickers.plugins.base import PluginContext
from pickers.plugins.requestcontrol.attribute_reporter import RequestAttributeReporter
from tests.unit.fake_director import FakeDirector
from tests.unit.test_protocol import (
    completion_body,
    response_body_msg,
    response_headers_msg,
    send_request,
)

README_CONFIG = Path(__file__).parent / "configs" / "llm-d-request-cost.yaml"
BEST_CONFIG = Path(__file__).resolve().parents[2] / "pickers" / "configs" / "best.yaml"
COST = "x-gateway-inference-request-cost"
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED


def config(attributes: object) -> str:
    return yaml.safe_dump({
        "apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig",
        "plugins": [{"name": "cost", "type": "request-attribute-reporter", "parameters": {"attributes": attributes}},
                    {"type": "queue-scorer"}],
    })  # fmt: skip


def attribute(expression: str = "usage.prompt_tokens", condition: str | None = None, **key: str) -> dict[str, object]:
    out: dict[str, object] = {"key": {"name": COST, **key}, "expression": expression}
    if condition is not None:
        out["condition"] = condition
    return out


def refusal(attributes: object) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(config(attributes), "epp.yaml")
    return str(e.value)


def report(expression: str, usage: Usage | None, condition: str = "") -> dict[str, dict[str, float]]:
    metadata: dict[str, dict[str, float]] = {}
    RequestAttributeReporter(COST, expression, condition).report_response(usage_object(usage), metadata)
    return metadata


def cost(value: float) -> dict[str, dict[str, float]]:
    return {"envoy.lb": {COST: value}}


# -- config ------------------------------------------------------------------------------------------
def test_llm_ds_readme_config_loads_unchanged_with_the_default_namespace(capsys):
    rc = cli.main(["check-config", str(README_CONFIG)])
    out = capsys.readouterr().out
    assert rc == 0
    line = next(x for x in out.splitlines() if "total-tokens-cost-reporter (request-attribute-reporter)" in x)
    assert json.loads(line.split("attributes=", 1)[1]) == [{
        "key": {"namespace": "envoy.lb", "name": COST},
        "expression": "usage.prompt_tokens + usage.completion_tokens\n",
        "condition": "has(usage.prompt_tokens) && has(usage.completion_tokens)",
    }]  # fmt: skip


def test_a_left_out_or_empty_namespace_is_envoy_lb():
    for key in ({}, {"namespace": ""}):
        cfg = load_config(config([attribute(**key)]), "epp.yaml")
        assert cfg.plugins["cost"].namespace == "envoy.lb"
        assert not cfg.warnings


def test_the_reporter_runs_outside_the_profiles():
    cfg = load_config(config([attribute()]), "epp.yaml")
    assert cfg.plugins["cost"] in cfg.producers
    assert Scheduler(cfg.profiles, producers=cfg.producers).reporters == (cfg.plugins["cost"],)


def test_another_namespace_loads_with_a_warning_about_envoys_receiving_namespaces():
    cfg = load_config(config([attribute(namespace="billing")]), "epp.yaml")
    assert cfg.plugins["cost"].namespace == "billing"
    (warning,) = cfg.warnings
    assert "attributes[0].key.namespace 'billing'" in warning and "receiving_namespaces" in warning


def test_an_expression_that_does_not_parse_is_refused_naming_the_attribute_and_the_error():
    message = refusal([attribute("usage.prompt_tokens + -")])
    assert message.startswith("epp.yaml: plugins[0].parameters.attributes[0].expression: request-attribute-reporter: ")
    assert f"attribute '{COST}': 'usage.prompt_tokens + -' does not compile: 1:24: Syntax error" in message


def test_a_condition_that_does_not_parse_is_refused_naming_the_condition():
    message = refusal([attribute(condition="usage.prompt_tokens > ")])
    assert "plugins[0].parameters.attributes[0].condition: request-attribute-reporter:" in message
    assert "does not compile: 1:23: Syntax error" in message


def test_an_undeclared_variable_is_refused_at_load():
    assert "does not compile: 1:8: undeclared reference to 'request.size'" in refusal([attribute("request.size")])


def test_a_type_error_the_checker_sees_is_refused_at_load():
    assert "found no matching overload for '_+_' applied to '(int, string)'" in refusal([attribute("size(usage) + 'a'")])


@pytest.mark.parametrize("expression, returns", [("'not a number'", "string"), ("has(usage.prompt_tokens)", "bool"),
                                                 ("[1]", "list<int>"), ("1u", "uint")])  # fmt: skip
def test_an_expression_that_can_never_be_a_number_is_refused(expression, returns):
    assert f"returns {returns}; it must return a number" in refusal([attribute(expression)])


def test_a_condition_that_can_never_be_a_bool_is_refused():
    assert "'size(usage)' returns int; it must return a bool" in refusal([attribute(condition="size(usage)")])


@pytest.mark.parametrize("attributes, field, fragment", [
    ([], "attributes", "expected exactly one attribute (as llm-d), got 0"),
    (None, "attributes", "expected exactly one attribute (as llm-d), got 0"),
    ([attribute(), attribute()], "attributes", "expected exactly one attribute (as llm-d), got 2"),
    ("usage.prompt_tokens", "attributes", "expected a list of mappings"),
    ([{"expression": "usage.prompt_tokens"}], "attributes[0].key.name", "is required"),
    ([{"key": {"name": ""}, "expression": "usage.prompt_tokens"}], "attributes[0].key.name", "expected a non-empty string"),
    ([{"key": {"name": COST}}], "attributes[0].expression", "is required"),
    ([{"key": {"name": COST}, "expression": ""}], "attributes[0].expression", "expected a non-empty string"),
    ([{**attribute(), "expresion": "x"}], "attributes[0].expresion", "unknown parameter"),
    ([{"key": {"name": COST, "nmae": "y"}, "expression": "1"}], "attributes[0].key.nmae", "unknown parameter"),
])  # fmt: skip
def test_a_malformed_attribute_is_refused_naming_the_field(attributes, field, fragment):
    message = refusal(attributes)
    assert f"plugins[0].parameters.{field}: request-attribute-reporter: " in message and fragment in message


def test_without_the_cel_runtime_the_plugin_is_refused_with_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cel_expr_python", None)  # what an uninstalled package imports as
    message = refusal([attribute()])
    assert "plugins[0].type: request-attribute-reporter needs the CEL runtime, which is not installed" in message
    assert "pip install 'llm-epp[cel]'" in message


# -- evaluation over usage (llm-d's plugin_test cases first) ------------------------------------------
def test_the_expressions_value_is_reported():
    assert report("usage.prompt_tokens", Usage(15, 0, 15)) == cost(15.0)


def test_a_zero_value_is_not_reported():
    assert report("usage.prompt_tokens", Usage(0, 4, 4), "has(usage.prompt_tokens)") == {}


def test_a_condition_not_met_reports_nothing():
    assert report("usage.prompt_tokens", Usage(10, 0, 10), "usage.completion_tokens > 0") == {}


def test_a_condition_that_evaluates_to_a_number_reports_nothing():
    assert report("usage.prompt_tokens", Usage(10, 0, 10), "usage.prompt_tokens") == {}


def test_a_missing_field_without_has_reports_nothing():
    assert report("usage.non_existent_field", Usage(10, 0, 10)) == {}


def test_has_guards_on_a_response_without_usage_give_zero_and_report_nothing():
    guarded = "(has(usage.prompt_tokens) ? usage.prompt_tokens : 0) + (has(usage.completion_tokens) ? usage.completion_tokens : 0)"
    assert report(guarded, None) == {}
    assert report(guarded, Usage(0, 25, 25)) == cost(25.0)


def test_the_counts_are_always_there_and_the_details_only_when_sent():
    assert usage_object(None) == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert usage_object(Usage(3, 2, 5, _UsageDetails(None)))["prompt_tokens_details"] == {"cached_tokens": 0}
    details = "has(usage.prompt_tokens_details) ? usage.prompt_tokens_details.cached_tokens : 0"
    assert report(details, Usage(30, 2, 32, _UsageDetails(24))) == cost(24.0)
    assert report(details, Usage(30, 2, 32)) == {}  # no details: 0


def test_usage_numbers_are_doubles_as_in_llm_ds_struct():
    usage = Usage(15, 10, 25)
    assert report("usage.prompt_tokens + 1", usage) == {}  # double + int: no such overload, as in cel-go
    assert report("int(usage.prompt_tokens) + 1", usage) == cost(16.0)
    assert report("usage.total_tokens > 20 ? usage.total_tokens : 0.0", usage) == cost(25.0)  # comparisons mix


def test_a_double_is_truncated_toward_zero():
    assert report("usage.prompt_tokens * 0.5", Usage(15, 0, 15)) == cost(7.0)
    assert report("0.0 - usage.prompt_tokens * 0.5", Usage(15, 0, 15)) == cost(-7.0)


def test_minus_one_is_not_reported_as_llm_ds_failure_marker_but_other_negatives_are():
    assert report("int(usage.prompt_tokens) - 16", Usage(15, 0, 15)) == {}
    assert report("int(usage.prompt_tokens) - 17", Usage(15, 0, 15)) == cost(-2.0)


def test_a_value_that_is_no_number_at_run_time_reports_nothing():
    assert report("dyn('seven')", Usage(15, 0, 15)) == {}
    assert report("dyn(7u)", Usage(15, 0, 15)) == {}  # a uint, which llm-d does not take either
    assert report("dyn(true)", Usage(15, 0, 15)) == {}
    assert report("usage.prompt_tokens_details", Usage(15, 0, 15, _UsageDetails(3))) == {}  # a map
    assert report("usage.prompt_tokens / 0.0", Usage(15, 0, 15)) == {}  # +inf


def test_the_value_goes_under_its_namespace_beside_what_is_there():
    plugin = RequestAttributeReporter("prompt", "usage.prompt_tokens", namespace="billing")
    metadata: dict[str, dict[str, float]] = {"billing": {"other": 1.0}}
    plugin.report_response(usage_object(Usage(15, 1, 16)), metadata)
    assert metadata == {"billing": {"other": 1.0, "prompt": 15.0}}


def test_outcomes_are_counted_and_each_failure_logged_once(caplog):
    plugin = RequestAttributeReporter(COST, "usage.nope", name="cost")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            plugin.report_response(usage_object(Usage(1, 1, 2)), {})
    assert plugin.outcomes == {"failed": 3}
    (record,) = caplog.records
    assert "request-attribute-reporter cost: the expression 'usage.nope' failed" in record.getMessage()
    assert "Key not found in map" in record.getMessage()


def test_the_outcomes_are_a_metric():
    plugin = RequestAttributeReporter(COST, "usage.total_tokens", "usage.total_tokens > 3", name="cost")
    for usage in (Usage(3, 2, 5), Usage(1, 1, 2), Usage(2, 2, 4)):
        plugin.report_response(usage_object(usage), {})
    m = EppMetrics(pool_name="p", version="t")
    m.attach_precise([plugin])
    text = m.exposition().decode()
    assert 'llm_epp_request_attribute_reports_total{plugin_name="cost",result="reported"} 2.0' in text
    assert 'llm_epp_request_attribute_reports_total{plugin_name="cost",result="condition_false"} 1.0' in text


# -- the metadata on the ext_proc answers ----------------------------------------------------------------
def metadata_of(resp: pb.ProcessingResponse) -> dict[str, dict[str, float]]:
    return {ns: {k: v.number_value for k, v in s.struct_value.fields.items()} for ns, s in resp.dynamic_metadata.fields.items()}


def test_the_metadata_rides_on_the_answer_to_the_last_body_chunk_only():
    director = FakeDirector(metadata=cost(11.0))
    stream = RequestStream(director)
    send_request(stream, completion_body(stream=True))
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    first = stream.handle(response_body_msg(b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":4,"total_tokens":11}}\n\n', False))
    (last,) = stream.handle(response_body_msg(b"data: [DONE]\n\n", True))
    assert not first[0].HasField("dynamic_metadata")
    assert metadata_of(last) == cost(11.0)
    assert last.response_body.response.body_mutation.streamed_response.end_of_stream
    (usage,) = director.reported
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 4)


def test_a_buffered_response_body_answer_carries_the_metadata():
    director = FakeDirector(metadata=cost(5.0))
    stream = RequestStream(director, default_response_mode=BUFFERED)
    send_request(stream, completion_body())
    stream.response_mode = BUFFERED  # what protocol_config says in a gateway with a buffered response body
    stream.handle(response_headers_msg())
    (answer,) = stream.handle(response_body_msg(b'{"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}', True))
    assert answer.WhichOneof("response") == "response_body" and metadata_of(answer) == cost(5.0)


def test_a_body_ended_by_trailers_gets_the_metadata_on_the_trailers_answer():
    director = FakeDirector(metadata=cost(5.0))
    stream = RequestStream(director)
    send_request(stream, completion_body())
    stream.handle(response_headers_msg())
    stream.handle(response_body_msg(b"{}", False))
    out = stream.handle(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    assert out[-1].WhichOneof("response") == "response_trailers" and metadata_of(out[-1]) == cost(5.0)
    assert len(director.reported) == 1


def test_no_body_or_an_abort_reports_nothing():
    director = FakeDirector(metadata=cost(5.0))
    stream = RequestStream(director)
    send_request(stream, completion_body())
    stream.handle(response_headers_msg(status=204, eos=True))
    aborted = RequestStream(director)
    send_request(aborted, completion_body(stream=True))
    aborted.handle(response_headers_msg(ctype="text/event-stream"))
    aborted.handle(response_body_msg(b'data: {"x":1}\n\n', False))
    aborted.close()
    assert director.reported == []


def test_without_metadata_the_answer_has_none():
    stream = RequestStream(FakeDirector())
    send_request(stream, completion_body())
    stream.handle(response_headers_msg())
    (answer,) = stream.handle(response_body_msg(b"{}", True))
    assert not answer.HasField("dynamic_metadata")


def director_for(text: str) -> Director:
    ds = Datastore()
    ds.set_endpoints([EndpointSpec("pod-1", "10.0.0.1", 8000)])
    cfg = load_config(text, "epp.yaml", PluginContext(ApproxPrefixIndex(), random.Random(0)))
    return Director(ds, Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers), EppMetrics())


def serve_json(director: Director, usage: dict[str, int] | None, status: int = 200) -> pb.ProcessingResponse:
    stream = RequestStream(director)
    send_request(stream, completion_body())
    stream.handle(response_headers_msg(status=status))
    body = json.dumps({"choices": [], **({"usage": usage} if usage else {})}).encode()
    (answer,) = stream.handle(response_body_msg(body, True))
    return answer


def test_through_the_director_llm_ds_readme_config_reports_the_total_tokens():
    director = director_for(README_CONFIG.read_text())
    answer = serve_json(director, {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11})
    assert metadata_of(answer) == cost(11.0)
    assert not serve_json(director, None).HasField("dynamic_metadata")  # no usage: 0, not reported


def test_an_error_response_is_evaluated_with_zero_usage_as_in_llm_d():
    director = director_for(config([attribute("int(usage.prompt_tokens) + 2")]))
    assert metadata_of(serve_json(director, {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}, status=500)) == cost(2.0)


def test_without_a_reporter_the_director_has_nothing_to_send():
    director = director_for(BEST_CONFIG.read_text())
    assert director.scheduler.reporters == ()
    assert not serve_json(director, {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}).HasField("dynamic_metadata")
