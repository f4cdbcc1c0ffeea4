"""A stand-in for NVIDIA's DCGM exporter beside the simulator: `DCGM_FI_DEV_GPU_UTIL` per simulated GPU.

Off by default (`--dcgm-port`). A real exporter is its own process (a sidecar or a DaemonSet), so this
is a listener of its own, not a series on the vLLM `/metrics`. Each rank is one GPU (`gpu="<i>"`); its
utilization is, as DCGM measures it, the percent of the last second its engine was stepping (a rank of
a data-parallel group steps with its group, dummy steps included), or a fixed `--dcgm-gpu-util`.
With `--dcgm-pod` the samples carry the pod labels an exporter in Kubernetes mode adds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

WINDOW_S = 1.0  # DCGM's utilization is over its sample period; a second here


@dataclass(frozen=True, slots=True)
class DcgmConfig:
    port: int = 0  # 0 = any free port
    gpu_util: float | None = None  # percent, fixed; None = measured from the engine's steps
    pod: str = ""  # the `pod` label (and namespace, container); "": none, as a sidecar exporter's


class BusyMeter:
    """How much of the last WINDOW_S seconds (loop time) an engine spent in steps."""

    def __init__(self) -> None:
        self._steps: deque[tuple[float, float]] = deque()

    def add(self, start: float, end: float) -> None:
        self._steps.append((start, end))

    def utilization(self, now: float) -> float:
        """0-1."""
        since = now - WINDOW_S
        steps = self._steps
        while steps and steps[0][1] <= since:
            steps.popleft()
        busy = sum(min(end, now) - max(start, since) for start, end in steps if end > since and start < now)
        return min(1.0, max(0.0, busy / WINDOW_S))


def render(config: DcgmConfig, utilizations: Sequence[float], hostname: str) -> bytes:
    """The exporter's text for these GPUs (utilizations 0-1, one per rank), integer percent as DCGM's."""
    lines = [
        "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).",
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge",
    ]
    for i, util in enumerate(utilizations):
        percent = config.gpu_util if config.gpu_util is not None else 100.0 * util
        labels = (
            f'gpu="{i}",UUID="GPU-sim-{hostname}-{i}",pci_bus_id="00000000:{i:02X}:00.0",device="nvidia{i}",'
            f'modelName="vllm-sim",Hostname="{hostname}"'
        )
        if config.pod:
            labels += f',container="vllm",namespace="default",pod="{config.pod}"'
        lines.append(f"DCGM_FI_DEV_GPU_UTIL{{{labels}}} {round(percent)}")
    return ("\n".join(lines) + "\n").encode()
