"""Hand freed heap memory back to the OS after requests that held large bodies.

A large request body reaches the EPP as gRPC messages of 1-30 MB each; once the request is done (or
refused) nothing holds them, but glibc keeps the freed memory in its heaps, so the process's RSS
stays near the peak (measured in docs/reliability.md, Hostile input). `malloc_trim(0)` returns it.
It runs in a worker thread, at most once per `interval`, after a stream that held `threshold` bytes
or more; off glibc (no `malloc_trim`) this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

TRIM_AFTER_BYTES = 8 * 1024 * 1024


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


class HeapTrimmer:
    def __init__(self, threshold: int = TRIM_AFTER_BYTES, interval: float = 1.0) -> None:
        self.threshold = threshold
        self.interval = interval
        self.trims = 0  # how many trims ran (for /debug/runtime and the tests)
        self._trim = _malloc_trim()
        self._scheduled = False

    def after_stream(self, body_bytes: int) -> None:
        """A stream that held `body_bytes` of request body ended; called on the event loop."""
        if self._trim is None or body_bytes < self.threshold or self._scheduled:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_later(self.interval, self._run)

    def _run(self) -> None:
        self._scheduled = False
        self.trims += 1
        # the trim walks the heaps: a few milliseconds that the event loop should not wait for
        asyncio.get_running_loop().run_in_executor(None, self._trim, 0)  # type: ignore[arg-type]
