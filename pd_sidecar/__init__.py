"""The P/D sidecar: a proxy in front of a decode server that runs a request's prefill elsewhere.

With header `x-prefiller-host-port` it sends a one-token prefill leg to that server and then the
client's request, carrying the returned `kv_transfer_params`, to its decoder; without it, it proxies.
"""

from pd_sidecar.server import Sidecar, SidecarConfig

__all__ = ["Sidecar", "SidecarConfig"]
