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
    # Data parallel (MoE, expert parallel): the exposed cost of one step's expert all-to-alls
    # (dispatch + combine in every MoE layer), added to the step of a group of 2 or more ranks.
    dp_all2all_s: float


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
    # DeepEP's low-latency kernels take ~0.1 ms to dispatch and ~0.2 ms to combine per MoE layer
    # at EP16 (128 tokens); ~60 MoE layers would be ~18 ms unhidden, but two-batch overlap hides
    # most of it behind compute. Scaled to this profile's 8 ms decode step: ~3 ms left exposed.
    dp_all2all_s=0.003,
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
    # Experts exchanged over TCP between CPU ranks: no overlap, several times the GPU cost.
    dp_all2all_s=0.010,
)

# Read-only so no caller can change a profile for every other simulator in the process.
PROFILES: MappingProxyType[str, Profile] = MappingProxyType({p.name: p for p in (GPU, CPU)})
