"""Fixtures shared by the unit tests."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """A place for a test to send the root logger's output; the root logger is put back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
