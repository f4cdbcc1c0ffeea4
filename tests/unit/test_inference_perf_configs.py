"""bench/inference-perf/*.yaml parse and carry what inference-perf requires, so a typo fails here.

The schema below is the part of inference-perf's config models (kubernetes-sigs/inference-perf,
inference_perf/config/, checked at commit 7de5ef2) that our configs use. Its models forbid unknown
keys (`extra="forbid"`), so an unknown key is an error here as it is there; values are checked for
type, range and the enum names it accepts. The configs also state bench.quality's default SLO of
the workload they rerun, checked against bench.quality itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import quality

CONFIG_DIR = Path(__file__).resolve().parents[2] / "bench" / "inference-perf"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
# config file -> the bench.quality workload it reruns
WORKLOADS = {"shared-prefix": "shared_prefix", "multi-turn": "multi_turn", "b2b": "b2b",
             "optimized-baseline": "optimized_baseline", "agent": "agent", "agent-short": "agent_short"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Required:
    spec: Any


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def _positive_int(v: Any) -> bool:
    return _int(v) and v > 0


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _str(v: Any) -> bool:
    return isinstance(v, str)


DISTRIBUTION = {
    "min": _int, "max": _int, "mean": _number, "std_dev": _number, "total_count": _int,
    "type": {"normal", "skew_normal", "lognormal", "uniform", "poisson", "fixed"}, "variance": _number, "skew": _number,
}  # fmt: skip
LENGTH: tuple[Any, ...] = (_int, DISTRIBUTION)  # int | Distribution
SHARED_PREFIX = {
    "num_groups": _positive_int, "num_unique_system_prompts": _positive_int,
    "num_prompts_per_group": _positive_int, "num_users_per_system_prompt": _positive_int,
    "system_prompt_len": LENGTH, "question_len": LENGTH, "output_len": LENGTH, "seed": _int,
    "question_distribution": DISTRIBUTION, "output_distribution": DISTRIBUTION, "enable_multi_turn_chat": _bool,
}  # fmt: skip
CONVERSATION_REPLAY = {
    "seed": _int, "num_conversations": _positive_int, "shared_system_prompt_len": _int,
    "dynamic_system_prompt_len": DISTRIBUTION, "turns_per_conversation": DISTRIBUTION,
    "input_tokens_per_turn": DISTRIBUTION, "output_tokens_per_turn": DISTRIBUTION,
    "tool_call_latency_sec": DISTRIBUTION, "max_model_len": _positive_int,
}  # fmt: skip
SCHEMA = {
    "api": {
        "type": {"completion", "chat", "anthropic_messages"}, "streaming": _bool, "headers": dict, "slo_unit": _str,
        "slo_tpot_header": _str, "slo_ttft_header": _str, "session_id_header_key": _str, "session_token_header_key": _str,
    },
    "data": {
        "type": Required({"mock", "shareGPT", "synthetic", "random", "shared_prefix", "cnn_dailymail", "infinity_instruct",
                          "billsum_conversations", "otel_trace_replay", "weka_trace_replay", "conversation_replay", "visionarena"}),
        "path": _str, "corpus_file_path": _str, "input_distribution": DISTRIBUTION, "output_distribution": DISTRIBUTION,
        "shared_prefix": SHARED_PREFIX, "conversation_replay": CONVERSATION_REPLAY, "use_chat_template": _bool,
    },
    "load": {
        "type": {"constant", "poisson", "trace_replay", "concurrent", "trace_session_replay"}, "interval": _number,
        "stages": Required(list), "num_workers": _positive_int, "worker_max_concurrency": _positive_int,
        "worker_max_tcp_connections": _positive_int, "request_timeout": _positive, "base_seed": _int,
    },
    "server": {
        "type": {"vllm", "sglang", "tgi", "mock"}, "model_name": _str, "base_url": Required(_str), "ignore_eos": _bool,
        "api_key": _str, "cert_path": _str, "key_path": _str,
    },
    "tokenizer": {"pretrained_model_name_or_path": _str, "trust_remote_code": _bool, "token": _str},
    "report": {
        "request_lifecycle": {
            "summary": _bool, "per_stage": _bool, "per_request": _bool, "per_adapter": _bool, "per_adapter_stage": _bool,
            "percentiles": list, "use_server_output_tokens": _bool, "max_error_messages": _positive_int,
        },
        "prometheus": {"summary": _bool, "per_stage": _bool},
        "session_lifecycle": {"summary": _bool, "per_stage": _bool, "per_session": _bool},
        "goodput": {"constraints": {"ttft": _positive, "tpot": _positive, "itl": _positive, "ntpot": _positive,
                                    "request_latency": _positive}},
    },
    "storage": {"local_storage": {"path": _str, "report_file_prefix": _str}},
}  # fmt: skip
STAGES = {  # load.type -> the stage fields, all required
    "constant": {"rate": _positive, "duration": _positive_int},
    "poisson": {"rate": _positive, "duration": _positive_int},
    "concurrent": {"num_requests": _positive_int, "concurrency_level": _positive_int},
}


def _check(value: Any, spec: Any, path: str, errors: list[str]) -> None:
    if isinstance(spec, Required):
        spec = spec.spec
    if isinstance(spec, tuple):  # a union: the first alternative that fits
        trials = []
        for alternative in spec:
            trial: list[str] = []
            _check(value, alternative, path, trial)
            if not trial:
                return
            trials.append((alternative, trial))
        # a mapping was meant as the mapping alternative: say what is wrong inside it
        inner = [t for a, t in trials if isinstance(a, dict) and isinstance(value, dict)]
        errors.extend(inner[0] if inner else [f"{path}: {value!r} fits none of its forms"])
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return
        for key in value.keys() - spec.keys():
            errors.append(f"{path}.{key}: not a field inference-perf knows (expected one of {sorted(spec)})")
        for key, sub in spec.items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}", errors)
            elif isinstance(sub, Required):
                errors.append(f"{path}.{key}: required")
        if spec is DISTRIBUTION and _number(value.get("min", 10)) and value.get("min", 10) > value.get("max", 1024):
            errors.append(f"{path}: min > max")
    elif isinstance(spec, set):
        if value not in spec:
            errors.append(f"{path}: {value!r} is not one of {sorted(spec)}")
    elif isinstance(spec, type):
        if not isinstance(value, spec):
            errors.append(f"{path}: expected {spec.__name__}, got {value!r}")
    elif isinstance(spec, Callable):  # type: ignore[arg-type]
        if not spec(value):
            errors.append(f"{path}: {value!r} is not a valid {spec.__name__.strip('_')}")


def validate(doc: Any) -> list[str]:
    """Everything inference-perf would refuse in this config, plus what our workloads need of it."""
    errors: list[str] = []
    _check(doc, SCHEMA, "config", errors)
    if errors:
        return errors
    load, data = doc.get("load", {}), doc["data"]
    load_type = load.get("type", "constant")
    stage_spec = STAGES.get(load_type)
    if stage_spec is None:
        errors.append(f"config.load.type: {load_type!r} is valid in inference-perf but not checked here")
    elif not load["stages"]:
        errors.append("config.load.stages: empty")
    else:
        for i, stage in enumerate(load["stages"]):
            _check(stage, {k: Required(v) for k, v in stage_spec.items()}, f"config.load.stages[{i}]", errors)
    if data["type"] in ("shared_prefix", "conversation_replay") and data["type"] not in data:
        errors.append(f"config.data.{data['type']}: required for data.type {data['type']}")
    if data["type"] == "conversation_replay" and load_type != "concurrent":
        errors.append("config.load.type: conversation_replay is driven by the concurrent load type")
    if not doc.get("api", {}).get("streaming"):
        errors.append("config.api.streaming: must be true (TTFT and ITL need a stream)")
    if "constraints" not in doc.get("report", {}).get("goodput", {}):
        errors.append("config.report.goodput.constraints: the goodput SLO is missing")
    return errors


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_there_is_a_config_for_every_bench_quality_workload():
    assert {p.stem for p in CONFIGS} == set(WORKLOADS)
    assert set(WORKLOADS.values()) == set(quality.SCENARIOS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_one_inference_perf_accepts(path):
    assert validate(_load(path)) == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_states_the_slo_bench_quality_uses_for_its_workload(path):
    constraints = _load(path)["report"]["goodput"]["constraints"]
    slo = quality.SCENARIOS[WORKLOADS[path.stem]](False).slo
    assert (constraints["ttft"], constraints["itl"]) == (slo.ttft_s, slo.itl_s)


def test_the_optimized_baseline_config_is_the_llm_d_guide_shape():
    sp = _load(CONFIG_DIR / "optimized-baseline.yaml")["data"]["shared_prefix"]
    assert (sp["num_prompts_per_group"], sp["system_prompt_len"], sp["question_len"]) == (5, 6000, 1200)


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda d: d["data"]["shared_prefix"].update(num_group=d["data"]["shared_prefix"].pop("num_groups")), "num_group"),
        (lambda d: d["load"]["stages"][0].update(rates=d["load"]["stages"][0].pop("rate")), "rate"),
        (lambda d: d["load"].update(type="poison"), "poison"),
        (lambda d: d["server"].pop("base_url"), "base_url: required"),
        (lambda d: d["data"]["shared_prefix"].update(output_len={"type": "uniform", "min": 48, "max": 16}), "min > max"),
        (lambda d: d["report"]["goodput"]["constraints"].update(ttf=1.0), "ttf"),
        (lambda d: d["api"].update(streaming=False), "streaming"),
    ],
    ids=["field typo", "stage field typo", "load type typo", "no base_url", "bad distribution", "constraint typo", "no stream"],
)
def test_a_typo_fails(mutate: Callable[[Any], None], expected: str):
    doc = _load(CONFIG_DIR / "optimized-baseline.yaml")
    mutate(doc)
    errors = validate(doc)
    assert any(expected in e for e in errors), errors


def test_conversation_replay_with_a_rate_load_fails():
    doc = _load(CONFIG_DIR / "agent.yaml")
    doc["load"] = {"type": "poisson", "stages": [{"rate": 2, "duration": 30}]}
    assert any("concurrent load type" in e for e in validate(doc))
