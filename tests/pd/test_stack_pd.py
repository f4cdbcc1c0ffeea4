"""The local stack's P/D pool: prefill simulators, decode simulators behind sidecars, labelled endpoints."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from extproc.datalayer.endpoints_file import load_endpoints_file
from extproc.devstack.stack import LocalStack, PdPool, StackOptions


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def test_pd_pool_starts_labelled_prefill_and_sidecar_fronted_decode_endpoints(tmp_path: Path) -> None:
    opts = StackOptions(workdir=tmp_path, sim_args=("--time-scale", "0.1"),
                        pd=PdPool(prefill=1, decode=2, prefill_sim_args=("--profile", "cpu")))
    stack = LocalStack(opts)
    try:
        stack.start_pd_pool(opts.pd)  # type: ignore[arg-type]
        assert stack.endpoints_path is not None
        specs = load_endpoints_file(stack.endpoints_path)
        assert [(s.name, s.labels["llm-d.ai/role"]) for s in specs] == [
            ("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode")]
        prefill, decode = specs[0], specs[1]
        assert decode.port == stack.sidecar_ports[0] and decode.metrics_port == stack.sim_ports[1]

        request = urllib.request.Request(
            f"http://127.0.0.1:{decode.port}/v1/completions", data=b'{"prompt": "hello world", "max_tokens": 3}',
            headers={"Content-Type": "application/json", "x-prefiller-host-port": f"127.0.0.1:{prefill.port}"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert json.load(r)["usage"]["completion_tokens"] == 3
        assert get(f"http://127.0.0.1:{prefill.port}/sim/stats")["prefill_legs_total"] == 1
        assert get(f"http://127.0.0.1:{decode.metrics_port}/sim/stats")["decode_legs_total"] == 1
    finally:
        stack.stop()
