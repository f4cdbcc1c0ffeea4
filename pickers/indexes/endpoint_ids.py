"""Small integer ids for the endpoints an index knows, reused once freed: what the compact indexes
store per block instead of an address (int16 columns, bitsets of ids)."""

from __future__ import annotations

MAX_ENDPOINTS = 32_767  # ids are int16


class EndpointIds:
    """id -> address (`addresses`, None where freed), and the freed ids to give out again."""

    __slots__ = ("_free", "_what", "addresses")

    def __init__(self, what: str) -> None:
        self.addresses: list[str | None] = []
        self._free: list[int] = []
        self._what = what  # the index's name, for the error

    def take(self, address: str) -> int:
        """A free id for this address; ValueError past MAX_ENDPOINTS + 1 endpoints at once."""
        if self._free:
            eid = self._free.pop()
            self.addresses[eid] = address
            return eid
        eid = len(self.addresses)
        if eid > MAX_ENDPOINTS:
            raise ValueError(f"the {self._what} tracks at most {MAX_ENDPOINTS + 1} endpoints")
        self.addresses.append(address)
        return eid

    def release(self, eid: int) -> None:
        self.addresses[eid] = None
        self._free.append(eid)
