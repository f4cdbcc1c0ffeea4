"""Our configs in the shapes of llm-d's guides serving through Envoy -> llm-epp -> simulated vLLM: each
guide shape (tests/unit/configs/guides/) answers, and optimized-baseline keeps a shared prefix in place."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import pytest

from extproc.devstack.stack import PdPool
from tests.integration.conftest import MODEL, make_stack
from tests.integration.test_gateway import shared_prefix_run
from tests.unit.test_llmd_plugins import OPTIMIZED_BASELINE

pytestmark = pytest.mark.envoy


def test_optimized_baseline_keeps_a_shared_prefix_on_the_endpoint_that_cached_it(tmp_path):
    config = tmp_path / "optimized-baseline.yaml"
    config.write_text(OPTIMIZED_BASELINE)
    with make_stack(tmp_path, epp_args=("--config-file", str(config))) as stack:
        served, cached = shared_prefix_run(stack)
        assert len(served) == 1
        assert all(c > 0 for c in cached[1:])


GUIDES = sorted((Path(__file__).resolve().parents[1] / "unit" / "configs" / "guides").glob("*.yaml"))


def _disaggregated(path: Path) -> bool:
    return "disagg-profile-handler" in path.read_text()


def _prefills_remotely(path: Path) -> bool:
    return "-pd-decider" in path.read_text()  # a prefill decider: prefix-based or always


def _encodes_remotely(path: Path) -> bool:
    return "always-disagg-multimodal-decider" in path.read_text()


@pytest.mark.parametrize("path", GUIDES, ids=lambda p: p.stem)
def test_guide_config_serves_through_envoy(path, tmp_path):
    """`epp serve --config-file` with each guide-shaped config answers a chat completion and a stream;
    P/D shapes run on a prefill/decode pool and must take the disaggregated path. E/P/D shapes route a
    request with an image too: the pool has no encoders (the encode profile finds none) and our sidecar
    runs no encode leg, so it reaches the decoder, which (a text-only simulator) refuses the image part
    as vLLM does for a text model. The encoder header itself: tests/unit/test_epd_scheduling.py."""
    pd = PdPool(prefill=1, decode=2) if _disaggregated(path) else None
    with make_stack(tmp_path, sims=2, pd=pd, epp_args=("--config-file", str(path))) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="unused")
        prompt = "Plan the migration of the billing service, step by step. " * 40
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4)
        assert reply.choices[0].message.content
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True))
        assert any(c.choices and c.choices[0].delta.content for c in chunks)
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.epp_admin_port}/debug/flowcontrol", timeout=5) as r:
            fc = json.load(r)
        if "flowControl" in path.read_text():  # the gate on: both requests went through the controller
            assert fc["enabled"] and sum(n for k, n in fc["outcomes"].items() if k.startswith("Dispatched:")) == 2, fc
            assert fc["requests"] == 0 and fc["saturation_detector"]["name"] == "pool-saturation"
        else:
            assert fc == {"enabled": False}
        if _encodes_remotely(path):
            image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
            content = [{"type": "text", "text": "What is in this picture?"}, image]
            with pytest.raises(openai.BadRequestError, match="content part type 'image_url'"):
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=3)
        if pd is not None and _prefills_remotely(path):
            prefilled = 0
            for port in stack.sim_ports[: len(stack.prefill_endpoints)]:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/stats", timeout=5) as r:
                    prefilled += json.load(r)["prefill_legs_total"]
            assert prefilled >= 1, "the long uncached prompt must have been prefilled on the prefill pool"
