"""`epp serve --config-file` with a `dataLayer` section, as a real process beside a simulated vLLM
server: the pool comes from llm-d's file-discovery (`--pool-name` only names it), the metrics source's
path and interval are the config's, and /v1/models lists the simulator's LoRA adapter."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from extproc.devstack.ports import reserve_port


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.read()


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _until(predicate, what: str, logs: list[Path], timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen in {timeout:g}s; logs:\n" + "\n".join(p.read_text()[-3000:] for p in logs))
        time.sleep(0.1)


def test_epp_serve_takes_its_pool_scrape_and_models_from_the_data_layer(tmp_path):
    with reserve_port() as sim_port, reserve_port() as grpc, reserve_port() as health, reserve_port() as metrics, \
            reserve_port() as admin:  # fmt: skip
        sim_log, epp_log = tmp_path / "sim.log", tmp_path / "epp.log"
        sim = _spawn([sys.executable, "-m", "vllm_sim", "--host", "127.0.0.1", "--port", str(sim_port.port), "--model", "base",
                      "--lora-modules", "sql-lora=/adapters/sql", "--time-scale", "0.02"], sim_log)  # fmt: skip
        endpoints = tmp_path / "endpoints.yaml"
        endpoints.write_text(f'endpoints:\n  - name: vllm-0\n    namespace: inference\n    address: "127.0.0.1"\n    port: "{sim_port.port}"\n')
        config = tmp_path / "epp.yaml"
        config.write_text(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
            f"- {{name: files, type: file-discovery, parameters: {{path: '{endpoints}'}}}}\n"
            "- {type: metrics-data-source, parameters: {interval: 250ms}}\n- type: core-metrics-extractor\n"
            "- {type: models-data-source, parameters: {interval: 100ms}}\n- type: models-data-extractor\n"
            "- type: served-model-filter\n- type: queue-scorer\n"
            "dataLayer:\n  discovery: {pluginRef: files}\n  sources:\n"
            "  - {pluginRef: metrics-data-source, extractors: [{pluginRef: core-metrics-extractor}]}\n"
            "  - {pluginRef: models-data-source, extractors: [{pluginRef: models-data-extractor}]}\n"
        )
        epp = _spawn([sys.executable, "-m", "extproc.cli", "serve", "--config-file", str(config), "--pool-name", "my-pool",
                      "--grpc-port", str(grpc.port), "--grpc-health-port", str(health.port), "--metrics-port", str(metrics.port),
                      "--admin-port", str(admin.port), "--bind-address", "127.0.0.1"], epp_log)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{admin.port}/debug/endpoints"

            def scraped_with_models():  # type: ignore[no-untyped-def]
                eps = json.loads(_get(url))["endpoints"]
                return eps if eps and eps[0]["served_models"] and eps[0]["last_scrape_age_s"] is not None else None

            eps = _until(scraped_with_models, "a scraped endpoint with its models", [epp_log, sim_log])
            assert [(e["name"], e["namespace"], e["address"]) for e in eps] == [("vllm-0", "inference", f"127.0.0.1:{sim_port.port}")]
            assert eps[0]["served_models"] == [{"id": "base", "parent": None}, {"id": "sql-lora", "parent": "base"}]
            assert eps[0]["healthy"] and eps[0]["scrape_error"] is None
            pool = _get(f"http://127.0.0.1:{metrics.port}/metrics").decode()
            assert 'name="my-pool"' in pool  # --pool-name names the pool; no Kubernetes discovery was tried
            assert epp.poll() is None
        finally:
            for proc in (epp, sim):
                proc.terminate()
            for proc in (epp, sim):
                proc.wait(10)
        text = epp_log.read_text()
        assert "metrics-data-source: interval" not in text  # 250 ms is 5 ticks of 50 ms: nothing rounded
        assert "Traceback" not in text
