"""Data-parallel ranks: which port serves which rank, which decoder each rank fronts, and which rank a
request's `x-data-parallel-host-port` names.

As llm-d's sidecar (`--data-parallel-size N`): rank r listens on the base port + r and forwards to the
decoder's port + r, unless explicit port lists say otherwise (a launcher that reserved its ports).
Pure functions and one lookup table; the sockets live in server.py.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from yarl import URL

from pd_sidecar import legs

MAX_PORT = 65535
# Binding these means "every interface": they say nothing about the address the EPP knows the pod by.
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


class UnknownRank(LookupError):
    """x-data-parallel-host-port names no rank of this sidecar."""


def listen_ports(port: int, size: int, explicit: Sequence[int]) -> tuple[int, ...]:
    """Rank r's port: the r-th explicit port, else port + r; port 0 = each rank on a free port."""
    if explicit:
        return tuple(explicit)
    if port == 0:
        return (0,) * size
    return tuple(port + r for r in range(size))


def decoder_urls(decoder: str, size: int, explicit_ports: Sequence[int]) -> tuple[str, ...]:
    """Rank r's decoder: the --decoder URL with the r-th explicit port, else with its port + r."""
    url = URL(decoder)
    if explicit_ports:
        ports: Sequence[int] = explicit_ports
    elif size == 1:
        return (decoder.rstrip("/"),)
    else:
        base = url.explicit_port
        assert base is not None  # validate_layout requires it
        ports = [base + r for r in range(size)]
    return tuple(str(url.with_port(p)).rstrip("/") for p in ports)


def _check_ports(field: str, ports: Sequence[int], size: int) -> None:
    if len(ports) != size:
        raise ValueError(f"{field}: {len(ports)} ports for data_parallel_size {size}; give one per rank")
    for p in ports:
        if not 1 <= p <= MAX_PORT:
            raise ValueError(f"{field}: port {p} is not in 1..{MAX_PORT}")
    if len(set(ports)) != len(ports):
        raise ValueError(f"{field}: ports repeat in {list(ports)}; each rank needs its own")


def validate_layout(*, decoder: str, port: int, size: int, rank_ports: Sequence[int],
                    decoder_rank_ports: Sequence[int], pod_ip: str) -> None:
    """Refuse a layout whose ports collide, overflow or disagree, naming the field (ValueError)."""
    if size < 1:
        raise ValueError(f"data_parallel_size: must be >= 1, got {size}")
    if rank_ports:
        _check_ports("rank_ports", rank_ports, size)
        if port not in (0, rank_ports[0]):
            raise ValueError(f"port: {port} disagrees with rank_ports, whose first (rank 0) is {rank_ports[0]}; "
                             "give one or make them agree")
    elif port and port + size - 1 > MAX_PORT:
        raise ValueError(f"port: ranks on {port}..{port + size - 1} pass {MAX_PORT}")
    try:
        url = URL(decoder)
    except ValueError as e:
        raise ValueError(f"decoder: not a URL: {decoder!r} ({e})") from None
    if not url.host:
        raise ValueError(f"decoder: no host in {decoder!r}")
    if decoder_rank_ports:
        _check_ports("decoder_rank_ports", decoder_rank_ports, size)
        if url.explicit_port is not None and url.explicit_port != decoder_rank_ports[0]:
            raise ValueError(f"decoder: port {url.explicit_port} disagrees with decoder_rank_ports, whose first "
                             f"(rank 0) is {decoder_rank_ports[0]}")
    elif size > 1:
        base = url.explicit_port
        if base is None:
            raise ValueError(f"decoder: {decoder!r} has no port; with data_parallel_size {size} rank r's decoder "
                             "is that port + r (or give decoder_rank_ports)")
        if base + size - 1 > MAX_PORT:
            raise ValueError(f"decoder: decoder ranks on {base}..{base + size - 1} pass {MAX_PORT}")
    if pod_ip:
        try:
            legs.parse_host_port(legs.join_host_port(pod_ip.strip("[]"), 1), "pod_ip", ValueError)
        except ValueError:
            raise ValueError(f"pod_ip: expected this pod's IP address or host name, got {pod_ip!r}") from None


def pod_address(pod_ip: str, host: str) -> str:
    """The address the EPP names this pod by, normalised as legs.parse_host_port does; "" = unknown."""
    address = pod_ip or ("" if host in _WILDCARDS else host)
    if not address:
        return ""
    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        return address.lower()


@dataclass(frozen=True, slots=True)
class RankTable:
    """Bound rank ports -> rank index, for x-data-parallel-host-port.

    The header names `podIP:rankPort`. When the pod's address is known (pod_ip, or a specific --host) the
    host must be it; when it is not (a wildcard bind and no POD_IP) only the port can be checked.
    """

    address: str  # "" = unknown: match the port only
    by_port: dict[int, int]

    def rank_of(self, values: list[str]) -> int:
        """The rank the header's values name; BadDataParallelHeader (malformed) or UnknownRank."""
        host, port = legs.parse_data_parallel_target(values)
        rank = self.by_port.get(port)
        if rank is None or (self.address and host != self.address):
            raise UnknownRank(f"{legs.DATA_PARALLEL_HEADER}: {legs.join_host_port(host, port)} is not a rank of "
                              f"this sidecar (its ranks: {', '.join(self.describe())})")
        return rank

    def describe(self) -> list[str]:
        host = self.address or "*"
        return [legs.join_host_port(host, p) for p in sorted(self.by_port, key=self.by_port.__getitem__)]
