"""Real vLLM CPU servers for the `vllm` test tier (shared/VLLM-CPU.md has the recipe).

`scripts/vllm-cpu-setup` builds the vLLM venv and the tiny model once, in
${LLM_EPP_CACHE:-~/.cache/llm-epp}; without them every test here is skipped with that reason.
Servers start with prefix caching, 32-token blocks, KV events over ZMQ on a free port and
`--enable-prompt-tokens-details`; each takes 50-130 s to start and ~1.5 GB, so the module-scoped
fixtures start at most two and always stop them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from extproc.devstack.ports import PortUnavailable, ReservedPort, reserve_port
from extproc.devstack.stack import _die_with_parent

CACHE = Path(os.environ.get("LLM_EPP_CACHE", str(Path.home() / ".cache" / "llm-epp")))
VLLM_PYTHON = CACHE / "vllm-venv" / "bin" / "python"
MODEL_DIR = CACHE / "tiny-model"
MODEL = "tiny"
BLOCK_SIZE = 32
START_TIMEOUT = 300.0


def vllm_missing() -> str | None:
    if not (CACHE / "vllm-venv" / ".llm-epp-vllm-0.32.0").exists():
        return f"real vLLM is not installed in {CACHE}/vllm-venv: run scripts/vllm-cpu-setup (~3 min, 3.4 GB)"
    if not (MODEL_DIR / ".llm-epp-tiny-model").exists():
        return f"the tiny model is not built in {MODEL_DIR}: run scripts/vllm-cpu-setup"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = vllm_missing()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class VllmServer:
    """One real vLLM OpenAI server on 127.0.0.1:port, publishing KV events on kv_port."""

    port: int
    kv_port: int  # data-parallel rank r (dp_size > 1) publishes on kv_port + r, as vLLM offsets it
    proc: subprocess.Popen[bytes]
    log_path: Path
    core: int
    reserved: tuple[ReservedPort, ...] = ()  # its ports, held until `stop()` (extproc/devstack/ports.py)
    dp_size: int = 1

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def topic(self) -> str:
        return f"kv@{self.address}@{MODEL}"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        """Sum of a metric's samples (all label sets)."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        try:
            self._stop()
        finally:
            for reserved in self.reserved:
                reserved.close()

    def _stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def start_vllm(workdir: Path, core: int = 0, extra_args: tuple[str, ...] = (),
               extra_env: dict[str, str] | None = None) -> VllmServer:
    """Start one server and wait until it serves (or raise with its log)."""
    server = spawn_vllm(workdir, core, extra_args, extra_env)
    wait_ready(server)
    return server


def reserve_consecutive(count: int, host: str = "0.0.0.0") -> list[ReservedPort]:
    """`count` consecutive free ports, held (the KV-event ports of a DP group's ranks)."""
    for _ in range(50):
        first = reserve_port(host)
        held = [first]
        try:
            for i in range(1, count):
                held.append(reserve_port(host, first.port + i))
            return held
        except PortUnavailable:
            for r in held:
                r.close()
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


def spawn_vllm(workdir: Path, core: int = 0, extra_args: tuple[str, ...] = (),
               extra_env: dict[str, str] | None = None, nixl_side_channel: bool = False,
               dp_size: int = 1) -> VllmServer:
    """Start one server without waiting for it (`wait_ready`), so two can start side by side.
    nixl_side_channel: give it a NIXL side-channel port of its own (VLLM_NIXL_SIDE_CHANNEL_PORT).
    dp_size > 1: one API server over that many data-parallel engines (vLLM's internal load
    balancing), engine r on core `core + r`, its KV events on kv_port + r."""
    # vLLM, its ZMQ publisher and NIXL's side channel bind with SO_REUSEADDR: they can serve on ports we hold.
    reserved = [reserve_port(), *reserve_consecutive(dp_size)]
    if nixl_side_channel:
        reserved.append(reserve_port())
        extra_env = {**(extra_env or {}), "VLLM_NIXL_SIDE_CHANNEL_PORT": str(reserved[-1].port)}
    port, kv_port = reserved[0].port, reserved[1].port
    if dp_size > 1:
        extra_args = ("--data-parallel-size", str(dp_size), *extra_args)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"vllm-{port}.log"
    kv_config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{kv_port}",
        "topic": f"kv@127.0.0.1:{port}@{MODEL}",
    }
    argv = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(MODEL_DIR), "--served-model-name", MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-prefix-caching", "--block-size", str(BLOCK_SIZE),
        "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager",
        "--max-num-seqs", "8", "--enable-prompt-tokens-details",
        "--kv-events-config", json.dumps(kv_config),
        *extra_args,
    ]  # fmt: skip
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(CACHE / "vllm-cache"),
        "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(core + r) for r in range(dp_size)),  # one core per engine
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, preexec_fn=_die_with_parent)  # fmt: skip
    return VllmServer(port, kv_port, proc, log_path, core, tuple(reserved), dp_size)


def wait_ready(server: VllmServer) -> None:
    """Wait until the server answers /health; stop it and raise with its log otherwise."""
    proc = server.proc
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {proc.returncode}:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"vLLM not ready after {START_TIMEOUT:.0f}s:\n{server.log_tail()}")
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """One real vLLM server, shared by a module's tests that need only one (module-scoped, so it is
    stopped before another module starts its own servers: never more than two at once)."""
    server = start_vllm(tmp_path_factory.mktemp("vllm"), core=0)
    try:
        yield server
    finally:
        server.stop()


def write_endpoints(path: Path, servers: list[VllmServer]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"endpoints": [
        {"address": "127.0.0.1", "port": s.port, "name": f"vllm-{i}",
         "labels": {"llm-epp/kv-events-port": str(s.kv_port)}}
        for i, s in enumerate(servers)
    ]}))  # fmt: skip
    return path
