"""Named timing/capacity profiles: what kind of machine a simulator pretends to be.

Numbers are rough fits, good enough for a router to see realistic ratios between prefill,
decode and queueing; they are not a performance model of any one GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    prefill_s_per_token: float  # cost of each uncached prompt token
    prefill_s_overhead: float  # fixed cost of a step that prefills anything
    decode_s_base: float  # cost of one decode step, whatever the batch
    decode_s_per_seq: float  # extra decode cost per running sequence
    max_num_seqs: int
    num_gpu_blocks: int
    block_size: int
    max_model_len: int
    # P/D: what a decode leg pays to pull a remotely prefilled prompt's KV instead of computing it.
    # The decode server's profile decides, since it is the one that waits for the transfer.
    kv_transfer_s_per_token: float
    kv_transfer_s_overhead: float  # per transfer (handshake, metadata round trip)


# An H100 serving an ~8B model: ~20k prefill tokens/s, ~8 ms per decode step.
GPU = Profile(
    name="gpu",
    prefill_s_per_token=1 / 20000,
    prefill_s_overhead=0.002,
    decode_s_base=0.008,
    decode_s_per_seq=0.0001,
    max_num_seqs=256,
    num_gpu_blocks=8000,
    block_size=16,
    max_model_len=32768,
    # ~128 KiB of KV per token for an 8B model over RDMA at ~25 GB/s.
    kv_transfer_s_per_token=1 / 200000,
    kv_transfer_s_overhead=0.001,
)

# A CPU box serving a small model: everything ~10-50x slower and much less KV room.
CPU = Profile(
    name="cpu",
    prefill_s_per_token=1 / 400,
    prefill_s_overhead=0.010,
    decode_s_base=0.060,
    decode_s_per_seq=0.002,
    max_num_seqs=16,
    num_gpu_blocks=2000,
    block_size=16,
    max_model_len=8192,
    # A small model's KV over TCP: a few times slower per token than RDMA, more fixed latency.
    kv_transfer_s_per_token=1 / 50000,
    kv_transfer_s_overhead=0.005,
)

# Read-only so no caller can change a profile for every other simulator in the process.
PROFILES: MappingProxyType[str, Profile] = MappingProxyType({p.name: p for p in (GPU, CPU)})
