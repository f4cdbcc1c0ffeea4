"""What a child process the EPP or `epp up` starts gets between fork and exec: SIGTERM when the thread
that started it ends (Linux's PR_SET_PDEATHSIG), so a killed EPP leaves no worker behind and a killed
`epp up` or test run no server behind. Elsewhere a no-op."""

from __future__ import annotations

import signal
from collections.abc import Callable


def _load_prctl() -> Callable[..., int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


# Looked up once, here: the child of a process with threads (a supervisor's, a load generator's) must
# not import or load anything between fork and exec, where a lock another thread held stays held.
_PRCTL = _load_prctl()


def die_with_parent() -> None:
    """`preexec_fn` for subprocess: the child gets SIGTERM when its parent goes."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
