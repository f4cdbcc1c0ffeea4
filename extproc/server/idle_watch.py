"""The request-body idle timeout of every stream, kept by one timer.

A stream waiting for its client's next body chunk (FULL_DUPLEX_STREAMED) must be answered 408 when
none comes within `--request-body-idle-timeout`. An `asyncio.timeout` around each read did that with
a timer per read, about 14 us of CPU a request (a quarter of the servicer's own cost on a small
request, bench.request_cost's servicer rows). Here a read costs two dict operations: the servicer
`arm`s its task with a deadline before the read and `disarm`s it after, and one timer, running only
while some stream waits, looks at the deadlines every eighth of the limit. A stream past its
deadline has its task cancelled and is marked `expired`, so the servicer tells that cancellation
from any other and answers 408. A stalled body is answered between the limit and an eighth of it
later (0.3 s: within 0.34 s).
"""

from __future__ import annotations

import asyncio

MIN_STEP = 0.01  # seconds between looks, at least (a limit of a few tens of milliseconds)
MAX_STEP = 1.0  # and at most: a long limit is still answered within a second of it


class BodyIdleWatch:
    """Deadlines of the streams reading a request body, and the tasks that went past theirs."""

    __slots__ = ("_due", "_timer", "_step", "expired")

    def __init__(self) -> None:
        self._due: dict[asyncio.Task[object], float] = {}  # task -> loop time its next chunk is due by
        self._timer: asyncio.TimerHandle | None = None
        self._step = MAX_STEP
        self.expired: set[asyncio.Task[object]] = set()  # cancelled here: the servicer answers 408

    def arm(self, task: asyncio.Task[object], seconds: float) -> None:
        """`task` waits for a body chunk for at most `seconds` from now."""
        loop = task.get_loop()  # not asyncio.get_running_loop(): a getpid() each call on Python 3.11
        self._due[task] = loop.time() + seconds
        if self._timer is None:
            self._step = min(MAX_STEP, max(MIN_STEP, seconds / 8))
            self._timer = loop.call_later(self._step, self._look)

    def disarm(self, task: asyncio.Task[object]) -> None:
        """The read ended (a chunk came, or the stream): its deadline no longer applies."""
        self._due.pop(task, None)

    def take_expired(self, task: asyncio.Task[object]) -> bool:
        """Whether this task's cancellation was the idle timeout's (and forget it)."""
        if task in self.expired:
            self.expired.discard(task)
            return True
        return False

    @property
    def waiting(self) -> int:
        return len(self._due)

    def _look(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = [task for task, due in self._due.items() if due <= now]
        for task in late:
            del self._due[task]
            # a task already being cancelled (flow control's eviction, Envoy gone) ends that way instead
            if not task.done() and not task.cancelling():
                self.expired.add(task)
                task.cancel()
        self._timer = loop.call_later(self._step, self._look) if self._due else None
