"""precise-prefix-cache-scorer: tokenization (HF tokenizer files and the simulator's), the chat
template, the bounded prefix, and scores from the KV-event index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pickers.framework.endpoint import Endpoint, EndpointSpec
from pickers.framework.request import InferenceRequest
from pickers.framework.types import CycleState
from pickers.indexes.kv_blocks import KVBlockIndex
from pickers.indexes.tokenization import HFTokenizer, RequestTokenizer, SimTokenizer
from pickers.plugins.scorer.affinity.precise_prefix import PrecisePrefixCacheScorer
from vllm_sim import tokens as sim_tokens

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [Path(__file__).read_text()] * 3
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}))
    return out


def test_a_long_prompt_is_tokenized_only_as_far_as_it_can_match(hf_dir: Path):
    tok = HFTokenizer(hf_dir)
    text = Path(__file__).read_text() * 5
    full = tok.encode(text, add_special_tokens=True)
    for n in (1, 50, 333, 2000):
        assert tok.encode_prefix(text, n, add_special_tokens=True) == full[:n]


def test_the_chat_template_comes_from_the_tokenizer_files(hf_dir: Path):
    text = HFTokenizer(hf_dir).render_chat(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], add_generation_prompt=True)
    assert text == "<|user|>\na\nb</s>\n<|assistant|>\n"


def test_the_sim_tokenizer_matches_the_simulator():
    text = "héllo wörld, " * 40
    assert SimTokenizer().encode_prefix(text, 17, add_special_tokens=True) == sim_tokens.encode(text)[:17]
    chat = SimTokenizer().render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat == sim_tokens.apply_chat_template([("user", "hi")], True)


def request(prompt: str) -> InferenceRequest:
    return InferenceRequest("r", "/v1/completions", {}, api="completions", model="m", prompt_text=prompt,
                            body={"model": "m", "prompt": prompt})


def endpoint(host: str) -> Endpoint:
    return Endpoint(EndpointSpec(host, host, 8000))


def test_scores_are_the_share_of_leading_blocks_each_endpoint_holds():
    from extproc.datalayer.kv_events import BlockStored, apply_events

    index = KVBlockIndex()
    scorer = PrecisePrefixCacheScorer(SimTokenizer(), index=index, block_size=4)
    prompt = "x" * (4 * 4 * 4)  # 16 tokens, 4 blocks of 4
    ids = sim_tokens.encode(prompt)
    a, b, c = endpoint("10.0.0.1"), endpoint("10.0.0.2"), endpoint("10.0.0.3")
    apply_events(index, a.address, [BlockStored([1, 2, 3, 4], None, ids, 4)])
    apply_events(index, b.address, [BlockStored([9], None, ids[:4], 4)])
    assert scorer.score(request(prompt), CycleState(), [a, b, c]) == [1.0, 0.25, 0.0]


def test_the_block_size_is_each_endpoints_own(monkeypatch):
    from extproc.datalayer.kv_events import BlockStored, apply_events

    index = KVBlockIndex()
    scorer = PrecisePrefixCacheScorer(SimTokenizer(), index=index, block_size=16)
    prompt = "y" * (4 * 16)
    ids = sim_tokens.encode(prompt)
    a = endpoint("10.0.0.1")
    apply_events(index, a.address, [BlockStored([1, 2], None, ids[:8], 4)])
    assert scorer.score(request(prompt), CycleState(), [a]) == [0.5]


def test_a_slow_tokenization_is_abandoned_for_this_pick_and_cached_for_the_next():
    import threading

    release = threading.Event()

    class Slow:
        cheap = False

        def encode_prefix(self, text, max_tokens, *, add_special_tokens):
            release.wait(5)
            return [1, 2, 3, 4]

        def render_chat(self, messages, *, add_generation_prompt, tools=None):
            return ""

    scorer = PrecisePrefixCacheScorer(Slow(), tokenize_budget=0.01, block_size=4)
    a = endpoint("10.0.0.1")
    assert scorer.score(request("p"), CycleState(), [a]) == [0.0]
    assert scorer.tokenize.over_budget == 1
    release.set()
    import time

    for _ in range(100):
        if scorer.tokenize.tokens(request("p"), 1024) == [1, 2, 3, 4]:
            break
        time.sleep(0.01)
    assert scorer.tokenize.tokens(request("p"), 1024) == [1, 2, 3, 4]


def test_the_config_loads_with_the_sim_tokenizer_and_refuses_a_missing_one():
    from pickers.config.loader import load_config
    from pickers.framework.errors import ConfigError
    from pickers.plugins.base import PluginContext

    text = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters: {tokenizer: %s}
"""
    cfg = load_config(text % "sim", "t", PluginContext())
    assert cfg.plugins["precise-prefix-cache-scorer"].type == "precise-prefix-cache-scorer"
    with pytest.raises(ConfigError, match="tokenizer"):
        load_config(text % "/nonexistent/tok", "t", PluginContext())


def test_a_prompt_sent_as_token_ids_is_matched_as_it_is():
    from array import array

    req = InferenceRequest("r", "/inference/v1/generate", {}, api="generate", model="m", prompt_token_ids=array("I", [7, 8, 9]))
    assert RequestTokenizer(SimTokenizer()).tokens(req, 2) == [7, 8]


def test_an_anthropic_messages_request_is_tokenized_as_vllm_renders_it_a_chat_system_first():
    body = {"model": "m", "system": [{"type": "text", "text": "Be brief."}], "messages": [{"role": "user", "content": "hi"}]}
    req = InferenceRequest("r", "/v1/messages", {}, api="messages", model="m", body=body)
    expected = sim_tokens.encode(sim_tokens.apply_chat_template([("system", "Be brief."), ("user", "hi")], True))
    assert RequestTokenizer(SimTokenizer()).tokens(req, 1024) == expected
