"""SimConfig: everything one simulator instance needs, resolved once from a profile plus overrides."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vllm_sim.dcgm import DcgmConfig
from vllm_sim.kv_events import KVEventsConfig
from vllm_sim.profiles import PROFILES, Profile

DEFAULT_MODEL = "sim-model"
DEFAULT_EMBEDDING_DIM = 64


class ConfigError(ValueError):
    """A simulator option has a value that cannot work; the message names the option."""


LB_MODES = ("internal", "external", "hybrid")


@dataclass(frozen=True, slots=True)
class DataParallelConfig:
    """One data-parallel group in this process, with vLLM's flags (--data-parallel-*).

    lb: "internal" (no LB flag) and "hybrid" (--data-parallel-hybrid-lb: one API server per node
    for its local ranks; this process is one node) serve one API port that balances over the
    ranks; "external" (--data-parallel-external-lb) serves each rank on its own port.
    """

    size: int = 1
    size_local: int | None = None  # None = size; anything else is refused (one process = one group)
    start_rank: int = 0  # global rank of local rank 0
    lb: str = "internal"
    rank_ports: tuple[int, ...] = ()  # external LB: local rank i on rank_ports[i] instead of port + i
    kv_events_ports: tuple[int, ...] = ()  # local rank i publishes on kv_events_ports[i]

    @property
    def enabled(self) -> bool:
        return self.size > 1 or self.lb != "internal"

    @property
    def global_ranks(self) -> range:
        return range(self.start_rank, self.start_rank + self.size)

    def validate(self, port: int, control_port: int | None, kv_events: KVEventsConfig | None) -> None:
        if self.size < 1:
            raise ConfigError(f"data_parallel_size: must be >= 1, got {self.size}")
        if self.size_local is not None and self.size_local != self.size:
            raise ConfigError(
                f"data_parallel_size_local: must equal data_parallel_size ({self.size}), got {self.size_local}: "
                "the simulator runs a whole DP group in one process; a group spanning processes is not simulated")
        if self.start_rank < 0:
            raise ConfigError(f"data_parallel_start_rank: must be >= 0, got {self.start_rank}")
        if self.lb not in LB_MODES:
            raise ConfigError(f"data_parallel_lb: expected one of {', '.join(LB_MODES)}, got {self.lb!r}")
        if self.rank_ports:
            if self.lb != "external":
                raise ConfigError("rank_ports: only with --data-parallel-external-lb (one API server per rank)")
            if len(self.rank_ports) != self.size:
                raise ConfigError(f"rank_ports: need one port per rank ({self.size}), got {len(self.rank_ports)}")
        if self.kv_events_ports:
            if kv_events is None:
                raise ConfigError("kv_events_ports: KV events are not enabled")
            if len(self.kv_events_ports) != self.size:
                raise ConfigError(
                    f"kv_events_ports: need one port per rank ({self.size}), got {len(self.kv_events_ports)}")
        for name, ports in (("rank_ports", self.rank_ports), ("kv_events_ports", self.kv_events_ports)):
            bad = [p for p in ports if not 0 <= p <= 65535]
            if bad:
                raise ConfigError(f"{name}: ports must be in 0..65535, got {bad[0]}")
        if self.enabled and control_port is not None and self.lb == "external":
            raise ConfigError("control_port: not with --data-parallel-external-lb; each rank serves /sim/* "
                              "on its own port")
        # Every fixed port this group binds, by what binds it, so a clash names both.
        bound: dict[int, str] = {}

        def claim(p: int, what: str) -> None:
            if p == 0:
                return  # any free port: the OS never hands out one twice
            if not 0 < p <= 65535:
                raise ConfigError(f"{what}: port {p} is outside 1..65535")
            if p in bound:
                raise ConfigError(f"{what}: port {p} is also {bound[p]}")
            bound[p] = what

        for i, p in enumerate(self.api_ports(port)):
            claim(p, f"rank {self.start_rank + i}'s API port" if self.lb == "external" else "the API port")
        if control_port is not None:
            claim(control_port, "the control port")
        if kv_events is not None:
            for g, endpoint in zip(self.global_ranks, self.kv_endpoints(kv_events)):
                claim(_endpoint_port(endpoint), f"rank {g}'s KV-events port" if self.enabled else "the KV-events port")

    def api_ports(self, port: int) -> list[int]:
        """The HTTP ports this group binds: one per rank (external LB) or the one API port."""
        if self.lb != "external":
            return [port]
        if self.rank_ports:
            return list(self.rank_ports)
        return [0 if port == 0 else port + i for i in range(self.size)]

    def kv_endpoints(self, kv_events: KVEventsConfig) -> list[str]:
        """Each local rank's ZMQ endpoint: kv_events_ports[i], else the configured endpoint's port
        plus the rank's global DP rank, as vLLM's ZmqEventPublisher.offset_endpoint_port does
        (vllm/distributed/kv_events.py, fed the scheduler's data_parallel_index, the global rank)."""
        prefix = kv_events.endpoint.rpartition(":")[0]
        if self.kv_events_ports:
            return [f"{prefix}:{p}" for p in self.kv_events_ports]
        base = _endpoint_port(kv_events.endpoint)
        if not self.enabled or base == 0:
            return [kv_events.endpoint] * self.size  # a random port (0 or *) for every rank
        return [f"{prefix}:{base + g}" for g in self.global_ranks]


def _endpoint_port(endpoint: str) -> int:
    """The port of tcp://host:port; 0 for a random one (0 or *)."""
    port = endpoint.rpartition(":")[2]
    return int(port) if port.isdigit() else 0


@dataclass(frozen=True, slots=True)
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = let the OS pick a free port
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    # vLLM's --lora-modules: (name, path) of LoRA adapters on the first model; /v1/models lists them
    # with that model as `parent`, and requests may name them
    lora_modules: tuple[tuple[str, str], ...] = ()
    name: str | None = None  # x-served-by value; None = "host:port" as bound
    time_scale: float = 1.0  # multiplies every simulated duration (0.1 = 10x faster)
    seed: int = 0
    profile: str = "gpu"
    prefill_s_per_token: float = PROFILES["gpu"].prefill_s_per_token
    prefill_s_overhead: float = PROFILES["gpu"].prefill_s_overhead
    decode_s_base: float = PROFILES["gpu"].decode_s_base
    decode_s_per_seq: float = PROFILES["gpu"].decode_s_per_seq
    max_num_seqs: int = PROFILES["gpu"].max_num_seqs
    num_gpu_blocks: int = PROFILES["gpu"].num_gpu_blocks
    block_size: int = PROFILES["gpu"].block_size
    max_model_len: int = PROFILES["gpu"].max_model_len
    kv_transfer_s_per_token: float = PROFILES["gpu"].kv_transfer_s_per_token
    kv_transfer_s_overhead: float = PROFILES["gpu"].kv_transfer_s_overhead
    dp_all2all_s: float = PROFILES["gpu"].dp_all2all_s  # per step of a DP group of 2+ ranks
    data_parallel: DataParallelConfig = field(default_factory=DataParallelConfig)
    kv_events: KVEventsConfig | None = None  # publish the prefix cache's KV events over ZMQ, as vLLM
    # /sim/* (stats, reset, fault) on their own 127.0.0.1 port (0 = any free) and 404 on the main
    # one, so a gateway that exposes the main port cannot reach them; None = on the main port.
    control_port: int | None = None
    embedding_dim: int = DEFAULT_EMBEDDING_DIM  # length of /v1/embeddings vectors
    # a DCGM exporter stand-in on its own port (vllm_sim/dcgm.py); None = off
    dcgm: DcgmConfig | None = None

    @classmethod
    def from_profile(cls, profile: str | Profile = "gpu", **overrides: object) -> SimConfig:
        """Profile values first, then any explicit override (None means "keep the profile's")."""
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise ConfigError(f"profile: unknown {profile!r}, expected one of {sorted(PROFILES)}")
            profile = PROFILES[profile]
        base = cls(
            profile=profile.name,
            prefill_s_per_token=profile.prefill_s_per_token,
            prefill_s_overhead=profile.prefill_s_overhead,
            decode_s_base=profile.decode_s_base,
            decode_s_per_seq=profile.decode_s_per_seq,
            max_num_seqs=profile.max_num_seqs,
            num_gpu_blocks=profile.num_gpu_blocks,
            block_size=profile.block_size,
            max_model_len=profile.max_model_len,
            kv_transfer_s_per_token=profile.kv_transfer_s_per_token,
            kv_transfer_s_overhead=profile.kv_transfer_s_overhead,
            dp_all2all_s=profile.dp_all2all_s,
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "models" in given:
            given["models"] = tuple(given["models"])  # type: ignore[arg-type]
        if "lora_modules" in given:
            given["lora_modules"] = tuple(given["lora_modules"])  # type: ignore[arg-type]
        config = replace(base, **given)  # type: ignore[arg-type]
        config.validate()
        return config

    @property
    def servable(self) -> tuple[str, ...]:
        """What a request may name: the served models, then the LoRA adapters."""
        return self.models + tuple(name for name, _ in self.lora_modules)

    @property
    def served_model(self) -> str:
        """The name vLLM puts in metric labels: the first served model name."""
        return self.models[0]

    def validate(self) -> None:
        if not self.models or any(not m for m in self.models):
            raise ConfigError("models: need at least one non-empty model name")
        for name, _path in self.lora_modules:
            if not name or name in self.models:
                raise ConfigError(f"lora_modules: {name!r} must be a non-empty name other than a served model's")
        for name in ("max_num_seqs", "num_gpu_blocks", "block_size", "max_model_len", "embedding_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("kv_transfer_s_per_token", "kv_transfer_s_overhead", "dp_all2all_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.time_scale < 0:
            raise ConfigError(f"time_scale: must be >= 0, got {self.time_scale}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: must be in 0..65535, got {self.port}")
        if self.control_port is not None:
            if not 0 <= self.control_port <= 65535:
                raise ConfigError(f"control_port: must be in 0..65535, got {self.control_port}")
            if self.control_port != 0 and self.control_port == self.port:
                raise ConfigError(f"control_port: must differ from port ({self.port}); leave it unset "
                                  "to serve /sim/* on the main port")
        self.data_parallel.validate(self.port, self.control_port, self.kv_events)
        if self.dcgm is not None:
            d = self.dcgm
            if not 0 <= d.port <= 65535:
                raise ConfigError(f"dcgm_port: must be in 0..65535, got {d.port}")
            if d.port != 0 and d.port in (self.port, self.control_port):
                raise ConfigError(f"dcgm_port: {d.port} is taken by the {'main' if d.port == self.port else 'control'} port")
            if d.gpu_util is not None and not 0 <= d.gpu_util <= 100:
                raise ConfigError(f"dcgm_gpu_util: a percent, 0-100, got {d.gpu_util}")
            if any(c in d.pod for c in '"\\\n'):
                raise ConfigError(f"dcgm_pod: a pod name, got {d.pod!r}")
            if self.data_parallel.lb == "external" and self.data_parallel.size > 1:
                raise ConfigError("dcgm_port: not with --data-parallel-external-lb (each rank's server would claim it)")
