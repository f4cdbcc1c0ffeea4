"""SimConfig: everything one simulator instance needs, resolved once from a profile plus overrides."""

from __future__ import annotations

from dataclasses import dataclass, replace

from vllm_sim.kv_events import KVEventsConfig
from vllm_sim.profiles import PROFILES, Profile

DEFAULT_MODEL = "sim-model"
DEFAULT_EMBEDDING_DIM = 64


class ConfigError(ValueError):
    """A simulator option has a value that cannot work; the message names the option."""


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
    kv_events: KVEventsConfig | None = None  # publish the prefix cache's KV events over ZMQ, as vLLM
    # /sim/* (stats, reset, fault) on their own 127.0.0.1 port (0 = any free) and 404 on the main
    # one, so a gateway that exposes the main port cannot reach them; None = on the main port.
    control_port: int | None = None
    embedding_dim: int = DEFAULT_EMBEDDING_DIM  # length of /v1/embeddings vectors

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
        for field in ("max_num_seqs", "num_gpu_blocks", "block_size", "max_model_len", "embedding_dim"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{field}: must be >= 1, got {getattr(self, field)}")
        for field in ("kv_transfer_s_per_token", "kv_transfer_s_overhead"):
            if getattr(self, field) < 0:
                raise ConfigError(f"{field}: must be >= 0, got {getattr(self, field)}")
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
