"""A cluster-scoped llm-epp behind a real Envoy: its endpoints are two peer "clusters" reached by host
name (`localhost:port`), each an HTTP server answering completions and serving a peer EPP's pool
metrics (llm_d_epp_average_*) at its metricsAddress/metricsPort labels. Envoy routes by host name
with its dynamic forward proxy (`epp envoy-config --dns-destinations`); requests go to the less
loaded cluster, and follow the load when it moves."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from extproc.devstack import envoy_config
from extproc.devstack.ports import reserve_port
from extproc.devstack.stack import envoy_binary

CONFIG = Path(__file__).resolve().parents[1] / "unit" / "configs" / "multicluster.yaml"


class Cluster:
    """A peer cluster: its gateway (completions answer with the cluster's name; the Host header they
    came with is kept) and, on another port, its EPP's /metrics with the pool means `queue` and `kv`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue, self.kv = 0.0, 0.0
        self.hosts: list[str] = []
        cluster = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            metrics = False  # the gateway's port serves no metrics: they are at the metrics labels

            def _send(self, body: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if not self.metrics:
                    self.send_error(404)
                    return
                text = (f'llm_d_epp_average_kv_cache_utilization{{name="pool-{cluster.name}"}} {cluster.kv}\n'
                        f'llm_d_epp_average_queue_size{{name="pool-{cluster.name}"}} {cluster.queue}\n')  # fmt: skip
                self._send(text.encode(), "text/plain")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                cluster.hosts.append(self.headers.get("host", ""))
                body = {"id": "c", "object": "text_completion", "model": "m", "served_by": cluster.name,
                        "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}  # fmt: skip
                self._send(json.dumps(body).encode(), "application/json")

            def log_message(self, *args: object) -> None:
                pass

        class Metrics(Handler):
            metrics = True

        self.servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), h) for h in (Handler, Metrics)]
        self.port, self.metrics_port = (srv.server_address[1] for srv in self.servers)
        for srv in self.servers:
            threading.Thread(target=srv.serve_forever, daemon=True).start()

    def entry(self) -> str:
        # requests to the gateway's host name; metrics at an IP and port of their own (the labels)
        return (f"- {{name: {self.name}, address: localhost, port: '{self.port}', "
                f"labels: {{metricsAddress: 127.0.0.1, metricsPort: '{self.metrics_port}'}}}}\n")  # fmt: skip

    def stop(self) -> None:
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()


@pytest.fixture
def two_clusters() -> Iterator[tuple[Cluster, Cluster]]:
    a, b = Cluster("cluster-a"), Cluster("cluster-b")
    yield a, b
    a.stop()
    b.stop()


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


def _complete(port: int, prompt: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=json.dumps({"model": "m", "prompt": prompt, "max_tokens": 1}).encode(),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_envoy_routes_to_the_less_loaded_cluster_by_host_name(tmp_path, two_clusters):
    a, b = two_clusters
    a.queue, a.kv = 9.0, 0.9
    b.queue, b.kv = 0.5, 0.1
    clusters = tmp_path / "clusters.yaml"
    clusters.write_text("endpoints:\n" + a.entry() + b.entry())
    text = CONFIG.read_text().replace("/etc/epp/clusters.yaml", str(clusters))
    text = text.replace("scheme: https\n      caCertPath: /etc/epp/tls/ca.crt\n      interval: 1s", "scheme: http\n      interval: 100ms")
    config = tmp_path / "epp.yaml"
    config.write_text(text)
    with reserve_port() as grpc, reserve_port() as health, reserve_port() as metrics, reserve_port() as admin, \
            reserve_port() as listen, reserve_port() as envoy_admin:  # fmt: skip
        epp_log, envoy_log = tmp_path / "epp.log", tmp_path / "envoy.log"
        serve = [sys.executable, "-m", "extproc.cli", "serve", "--config-file", str(config), "--grpc-port", str(grpc.port),
                 "--grpc-health-port", str(health.port), "--metrics-port", str(metrics.port), "--admin-port", str(admin.port),
                 "--bind-address", "127.0.0.1"]  # fmt: skip
        refused = subprocess.run(serve, capture_output=True, text=True, timeout=60, check=False)  # no flag: refused, as in llm-d
        assert refused.returncode == 2 and "--allow-experimental-plugins is not set" in refused.stderr
        settings = envoy_config.GatewaySettings(
            listen_port=listen.port, epp_port=grpc.port, epp_health_port=health.port, admin_port=envoy_admin.port,
            access_log_path=str(tmp_path / "access.log"), dns_destinations=True,
        )  # fmt: skip
        (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(envoy_config.render(settings), sort_keys=False))
        epp = _spawn([*serve, "--allow-experimental-plugins"], epp_log)
        envoy = _spawn([envoy_binary(), "-c", str(tmp_path / "envoy.yaml"), "--base-id", str(listen.port), "--concurrency", "1",
                        "-l", "warning", "--disable-hot-restart", "--file-flush-interval-msec", "100"], envoy_log)  # fmt: skip
        logs = [epp_log, envoy_log]
        try:
            url = f"http://127.0.0.1:{admin.port}/debug/endpoints"

            def scraped() -> bool:
                with urllib.request.urlopen(url, timeout=2) as r:
                    eps = json.loads(r.read())["endpoints"]
                return len(eps) == 2 and all(e["last_scrape_age_s"] is not None and e["scrape_error"] is None for e in eps)

            _until(scraped, "both clusters scraped", logs)
            _until(lambda: _complete(listen.port, "warm up"), "Envoy routing", logs)
            served = {_complete(listen.port, f"question {i}")["served_by"] for i in range(6)}
            assert served == {"cluster-b"}
            assert set(b.hosts) == {f"localhost:{b.port}"}  # Envoy rewrote Host to the destination it resolved
            a.queue, a.kv = 0.0, 0.05
            b.queue, b.kv = 7.0, 0.85
            _until(lambda: _complete(listen.port, "after the move")["served_by"] == "cluster-a", "requests following the load", logs)
            assert {_complete(listen.port, f"later {i}")["served_by"] for i in range(6)} == {"cluster-a"}
            def routed() -> list[dict]:
                lines = (tmp_path / "access.log").read_text().splitlines()
                return [e for e in map(json.loads, lines) if e["status"] == 200]

            access = _until(lambda: len(routed()) >= 14 and routed(), "the access log", logs)  # 1 + 6 + 1 + 6 at least
            assert {e["destination"] for e in access} == {f"localhost:{a.port}", f"localhost:{b.port}"}
            assert {e["upstream"] for e in access} == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}  # resolved by Envoy
            pool = urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=2).read().decode()
            assert "llm_d_epp_average_queue_size" in pool  # this EPP exports the means a level above would read
        finally:
            for proc in (envoy, epp):
                proc.terminate()
            for proc in (envoy, epp):
                proc.wait(10)
        assert "Traceback" not in epp_log.read_text()
