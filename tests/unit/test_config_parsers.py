"""The request parsers a config names: `requestHandler.parsers` (llm-d's) and the older top-level
`parser` (GIE's), their defaults, llm-d's skip rules, and every mistake refused naming the field."""

from __future__ import annotations

import pytest

from extproc.cli import main as cli
from extproc.server.runner import EppServer, ServeOptions
from pickers.config.loader import DEFAULT_CONFIG_TEXT, load_config
from pickers.config.parsers import DEFAULT_PARSER_TYPES, ParserSpec
from pickers.framework.errors import ConfigError

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
PICKER = "plugins:\n- type: max-score-picker\n"


def load(body: str):
    return load_config(HEAD + body, "test.yaml")


def error_of(body: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(body)
    return str(e.value)


def specs(cfg) -> list[tuple[str, str]]:
    return [(s.name, s.type) for s in cfg.parsers]


def test_no_section_means_llm_ds_default_list_with_passthrough_last():
    cfg = load_config(DEFAULT_CONFIG_TEXT, "default")
    assert specs(cfg) == [(t, t) for t in DEFAULT_PARSER_TYPES]
    assert DEFAULT_PARSER_TYPES[-1] == "passthrough-parser" and cfg.default_parsers and cfg.warnings == ()


@pytest.mark.parametrize("section", ["requestHandler: {}\n", "requestHandler:\n  parsers: []\n", "requestHandler:\n"])
def test_an_empty_section_means_the_default_list(section):
    cfg = load(PICKER + section)
    assert specs(cfg) == [(t, t) for t in DEFAULT_PARSER_TYPES] and cfg.default_parsers


def test_parsers_declared_as_plugins_and_referenced_by_name_run_in_that_order():
    cfg = load(
        "plugins:\n- type: max-score-picker\n- name: vllmhttpParser\n  type: vllmhttp-parser\n- name: openaiParser\n  type: openai-parser\n"
        "requestHandler:\n  parsers:\n  - pluginRef: vllmhttpParser\n  - pluginRef: openaiParser\n"
    )
    assert specs(cfg) == [("vllmhttpParser", "vllmhttp-parser"), ("openaiParser", "openai-parser")]
    assert not cfg.default_parsers and cfg.warnings == ()
    assert cfg.plugin_types["openaiParser"] == "openai-parser" and "openaiParser" not in cfg.plugins


def test_a_parser_type_referenced_without_declaring_it_is_made_under_that_name():
    cfg = load(PICKER + "requestHandler:\n  parsers:\n  - pluginRef: anthropic-parser\n  - pluginRef: passthrough-parser\n")
    assert specs(cfg) == [("anthropic-parser", "anthropic-parser"), ("passthrough-parser", "passthrough-parser")]


def test_gies_top_level_parser_loads_with_a_deprecation_warning():
    cfg = load("plugins:\n- type: max-score-picker\n- type: openai-parser\nparser:\n  pluginRef: openai-parser\n")
    assert specs(cfg) == [("openai-parser", "openai-parser")] and not cfg.default_parsers
    assert cfg.warnings == ("DEPRECATION: top-level parser is deprecated, use requestHandler.parsers instead",)


def test_with_both_forms_requesthandler_parsers_is_used_and_the_warning_says_so():
    cfg = load(PICKER + "parser: {pluginRef: openai-parser}\nrequestHandler:\n  parsers:\n  - pluginRef: anthropic-parser\n")
    assert specs(cfg) == [("anthropic-parser", "anthropic-parser")]
    assert "both are set, so requestHandler.parsers is used and parser ('openai-parser') is not" in cfg.warnings[0]


def test_parsers_after_the_fallback_are_skipped_with_a_warning():
    cfg = load(PICKER + "requestHandler:\n  parsers:\n  - pluginRef: passthrough-parser\n  - pluginRef: openai-parser\n")
    assert specs(cfg) == [("passthrough-parser", "passthrough-parser")]
    assert cfg.warnings == (
        (
            "requestHandler.parsers[1]: parser 'openai-parser' is skipped: it comes after the fallback parser "
            "'passthrough-parser', which takes all remaining paths"
        ),
    )


def test_a_second_parser_of_a_listed_type_is_skipped_with_a_warning():
    cfg = load(
        "plugins:\n- type: max-score-picker\n- name: a\n  type: openai-parser\n- name: b\n  type: openai-parser\n"
        "requestHandler:\n  parsers:\n  - pluginRef: a\n  - pluginRef: b\n"
    )
    assert specs(cfg) == [("a", "openai-parser")]
    assert cfg.warnings == ("requestHandler.parsers[1]: parser 'b' is skipped: a parser of type openai-parser ('a') is already listed",)


def test_a_declared_parser_no_list_uses_is_a_warning():
    cfg = load("plugins:\n- type: max-score-picker\n- type: sglanghttp-parser\n")
    assert cfg.default_parsers
    assert cfg.warnings == (
        (
            "parser plugin 'sglanghttp-parser' (sglanghttp-parser) is not one of the default parsers "
            "(add a requestHandler.parsers list): it parses nothing"
        ),
    )


def test_a_config_of_parsers_and_no_scheduling_plugin_gets_the_implied_picker():
    cfg = load("plugins:\n- type: passthrough-parser\nrequestHandler:\n  parsers:\n  - pluginRef: passthrough-parser\n")
    assert cfg.profile.picker.name == "max-score-picker" and cfg.profile.scorers == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (PICKER + "requestHandler:\n  parsers:\n  - pluginRef: nope\n",
         "test.yaml: requestHandler.parsers[0]: no parser plugin named 'nope'; declared parsers: none"),
        (PICKER + "requestHandler:\n  parsers:\n  - pluginRef: max-score-picker\n",
         "test.yaml: requestHandler.parsers[0]: plugin 'max-score-picker' (max-score-picker) is not a request parser"),
        (PICKER + "requestHandler:\n  parsers:\n  - {}\n", "test.yaml: requestHandler.parsers[0].pluginRef: expected a non-empty string"),
        (PICKER + "requestHandler:\n  parsers:\n  - openai-parser\n", "test.yaml: requestHandler.parsers[0]: expected a mapping {pluginRef: NAME}"),
        (PICKER + "requestHandler:\n  parsers:\n  - {pluginRef: openai-parser, weight: 2}\n", "test.yaml: requestHandler.parsers[0].weight: unknown field"),
        (PICKER + "requestHandler:\n  parsers: openai-parser\n", "test.yaml: requestHandler.parsers: expected a list"),
        (PICKER + "requestHandler: [openai-parser]\n", "test.yaml: requestHandler: expected a mapping"),
        (PICKER + "requestHandler:\n  parser:\n    pluginRef: openai-parser\n",
         "test.yaml: requestHandler.parser: unknown field; the list of parsers is requestHandler.parsers"),
        (PICKER + "requestHandler:\n  parsers: []\n  timeout: 3\n", "test.yaml: requestHandler.timeout: unknown field; expected one of parsers"),
        (PICKER + "parser: openai-parser\n", "test.yaml: parser: expected a mapping {pluginRef: NAME}"),
        (PICKER + "parser: {pluginRef: ghost}\n", "test.yaml: parser.pluginRef: no parser plugin named 'ghost'"),
        ("plugins:\n- type: openai-parser\n  parameters: [strict]\n",
         "test.yaml: plugins[0].parameters: openai-parser: expected a mapping of parameters, got list"),
        ("plugins:\n- type: max-score-picker\n- name: max-score-picker\n  type: openai-parser\n",
         "test.yaml: plugins[1].name: duplicate plugin name 'max-score-picker'"),
        ("plugins:\n- type: openai-parser\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: openai-parser\n",
         "test.yaml: schedulingProfiles[0].plugins[0].pluginRef: plugin 'openai-parser' (openai-parser) is a request parser"),
    ],
)  # fmt: skip
def test_mistakes_are_refused_naming_the_field(body, message):
    assert error_of(body).startswith(message)


def test_parser_parameters_load_with_a_warning_naming_each_as_llm_d_ignores_them():
    """llm-d's parser factories read no parameters (`_ *json.Decoder`): a config with some loads there."""
    cfg = load("plugins:\n- type: max-score-picker\n- type: openai-parser\n  parameters: {strict: true, mode: x}\n")
    assert cfg.parsers[0].type == "openai-parser"
    warned = [w for w in cfg.warnings if w.startswith("plugins[1] (openai-parser): parameter ")]
    assert len(warned) == 2 and "parameter mode has no effect" in warned[0] and "parameter strict has no effect" in warned[1]
    assert all("llm-d ignores it too" in w for w in warned)
    assert cfg.plugin_parameters["openai-parser"] == {}


@pytest.mark.parametrize(
    ("parser", "reason"), [("vllmgrpc-parser", "not vLLM's gRPC API"), ("vertexai-parser", "Vertex AI's gRPC PredictionService")]
)
def test_grpc_parsers_are_refused_with_the_reason(parser, reason):
    declared = error_of(f"plugins:\n- type: max-score-picker\n- type: {parser}\n")
    assert declared.startswith(f"test.yaml: plugins[1].type: {parser} is not supported: ") and reason in declared
    referenced = error_of(PICKER + f"requestHandler:\n  parsers:\n  - pluginRef: {parser}\n")
    assert referenced.startswith(f"test.yaml: requestHandler.parsers[0]: {parser} is not supported: ")


def test_check_config_prints_the_parsers_and_their_paths(tmp_path, capsys):
    path = tmp_path / "epp.yaml"
    path.write_text(HEAD + "plugins:\n- type: queue-scorer\n- name: msgs\n  type: anthropic-parser\n"
                    "requestHandler:\n  parsers:\n  - pluginRef: msgs\n  - pluginRef: passthrough-parser\n")  # fmt: skip
    assert cli.main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  request parsers:\n    msgs (anthropic-parser): /messages, /messages/count_tokens (unread)\n" in out
    assert "    passthrough-parser: every path no other parser claims, unread\n" in out
    assert "    msgs (anthropic-parser)\n" in out  # among the plugins


def test_check_config_says_when_the_list_is_the_default(tmp_path, capsys):
    path = tmp_path / "epp.yaml"
    path.write_text(HEAD + PICKER)
    cli.main(["check-config", str(path)])
    assert "  request parsers (the default list):\n    openai-parser: /chat/completions," in capsys.readouterr().out


def test_the_server_runs_the_configs_parsers():
    text = HEAD + PICKER + "requestHandler:\n  parsers:\n  - pluginRef: anthropic-parser\n"
    server = EppServer(ServeOptions(config_text=text, admin_port=0))
    assert server.servicer.parsers.specs == (ParserSpec("anthropic-parser", "anthropic-parser"),)
    assert server.servicer.parsers.resolve("/v1/chat/completions") is None


def test_errors_after_a_parser_plugin_name_the_plugins_place_in_the_list():
    body = "plugins:\n- type: openai-parser\n- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: ghost}\n"
    assert error_of(body).startswith("test.yaml: plugins[1].parameters.prefixMatchInfoProducerName: ")
