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


def _pick(grpc_port: int) -> str:
    """One completion through the EPP's ext_proc stream: the endpoint it routes to."""
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    from tests.unit.test_protocol import (
        body_msg,
        completion_body,
        headers_msg,
        set_headers,
    )

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        requests = iter([headers_msg(), body_msg(completion_body(), True)])
        reply = next(iter(pb_grpc.ExternalProcessorStub(channel).Process(requests, timeout=10)))
    return set_headers(reply)["x-gateway-destination-endpoint"]


def test_epp_serve_routes_on_the_gpu_utilization_the_simulators_dcgm_listeners_report(tmp_path):
    """Three simulators, each on its own loopback address as pods have their own IPs, each with a DCGM
    stand-in on one shared port (--dcgm-port) reporting 95%, 60% and 30%; `epp serve` with our config
    in the shape of llm-d's sim-epp-gpu-config.yaml shows each endpoint's GPUUtilization in
    /debug/endpoints and `epp status`, and routes to the least busy GPU."""
    hosts = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    with reserve_port() as dcgm, reserve_port() as grpc_port, reserve_port() as health, reserve_port() as metrics, \
            reserve_port() as admin, reserve_port() as p0, reserve_port() as p1, reserve_port() as p2:  # fmt: skip
        ports = (p0.port, p1.port, p2.port)
        logs = [tmp_path / f"sim{i}.log" for i in range(3)] + [tmp_path / "epp.log"]
        sims = [
            _spawn([sys.executable, "-m", "vllm_sim", "--host", h, "--port", str(p), "--model", "m", "--time-scale", "0.02",
                    "--dcgm-port", str(dcgm.port), "--dcgm-gpu-util", util, "--dcgm-pod", f"vllm-{i}"], logs[i])
            for i, (h, p, util) in enumerate(zip(hosts, ports, ("95", "60", "30"), strict=True))
        ]  # fmt: skip
        endpoints = tmp_path / "endpoints.yaml"
        endpoints.write_text("endpoints:\n" + "".join(
            f"  - {{name: vllm-{i}, address: '{h}', port: '{p}'}}\n" for i, (h, p) in enumerate(zip(hosts, ports, strict=True))
        ))  # fmt: skip
        guide = (Path(__file__).resolve().parents[1] / "unit" / "configs" / "guides" / "gpu-utilization.yaml").read_text()
        config = tmp_path / "epp.yaml"
        config.write_text(guide.replace("port: 9400", f"port: {dcgm.port}").replace('interval: "1s"', 'interval: "100ms"'))
        epp = _spawn([sys.executable, "-m", "extproc.cli", "serve", "--config-file", str(config), "--endpoints", str(endpoints),
                      "--grpc-port", str(grpc_port.port), "--grpc-health-port", str(health.port), "--metrics-port", str(metrics.port),
                      "--admin-port", str(admin.port), "--bind-address", "127.0.0.1"], logs[3])  # fmt: skip
        try:
            url = f"http://127.0.0.1:{admin.port}/debug/endpoints"

            def with_gpu_utilization():  # type: ignore[no-untyped-def]
                eps = json.loads(_get(url))["endpoints"]
                return eps if len(eps) == 3 and all(e.get("attributes") and e["healthy"] for e in eps) else None

            eps = _until(with_gpu_utilization, "three endpoints with GPUUtilization", logs)
            found = {e["name"]: [(a["attribute"], a["producer"], a["value"]) for a in e["attributes"]] for e in eps}
            assert found == {
                "vllm-0": [("GPUUtilization", "dcgm-extractor", 0.95)],
                "vllm-1": [("GPUUtilization", "dcgm-extractor", 0.6)],
                "vllm-2": [("GPUUtilization", "dcgm-extractor", 0.3)],
            }
            assert {_pick(grpc_port.port) for _ in range(5)} == {f"{hosts[2]}:{ports[2]}"}
            status = subprocess.run([sys.executable, "-m", "extproc.cli", "status", "--url", f"http://127.0.0.1:{admin.port}"],
                                    capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
            assert status.returncode == 0, status.stderr
            assert "endpoint attributes:" in status.stdout and "GPUUtilization  dcgm-extractor  0.3" in status.stdout
        finally:
            for proc in (epp, *sims):
                proc.terminate()
            for proc in (epp, *sims):
                proc.wait(10)
        assert "Traceback" not in logs[3].read_text()
