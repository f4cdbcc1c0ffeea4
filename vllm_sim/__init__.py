"""A vLLM simulator: OpenAI API, vLLM metrics and a prefix-cache/batching model, no GPU.

It lets the endpoint picker be developed and benchmarked against many cheap "engines" that
queue, cache prefixes and report load the way vLLM does.
"""

from vllm_sim.config import DataParallelConfig, SimConfig
from vllm_sim.data_parallel import DataParallelSim
from vllm_sim.profiles import PROFILES, Profile
from vllm_sim.server import SimServer

__all__ = ["PROFILES", "DataParallelConfig", "DataParallelSim", "Profile", "SimConfig", "SimServer"]
