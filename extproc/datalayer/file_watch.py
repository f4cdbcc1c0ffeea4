"""Change detection for the files the EPP watches by polling (the endpoints file, the config file).

A file's identity is (device, inode, size, mtime) read through its symlinks, so the atomic `..data`
symlink swap Kubernetes does when a mounted ConfigMap changes shows as a new inode. inotify would
not follow that swap on the watched path either; a stat every few seconds is cheap. Mtimes tick
coarsely (a few ms), so a same-size rewrite in place right after a read can keep the identity: while
the mtime is recent the caller reads the file again and compares the text.
"""

from __future__ import annotations

import os
import time

FileIdentity = tuple[int, int, int, int]

RECENT_NS = 2_000_000_000  # an mtime this recent may hide a second write: look at the content too


def file_identity(path: str) -> FileIdentity | None:
    """What changes when the file (or the target of its symlinks) changes; None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def may_have_changed(identity: FileIdentity | None, last: FileIdentity | None) -> bool:
    """Whether the file must be read again: its identity moved, or its mtime is too recent to trust."""
    return identity != last or (identity is not None and time.time_ns() - identity[3] < RECENT_NS)
