"""Benchmark pictures: drawn with matplotlib, skipped (with a note) without it."""

from __future__ import annotations

import pytest

from bench import plots

SERIES = {"(a) round-robin": [0.05, 0.2, 0.6, 1.1], "(c) default": [0.04, 0.05, 0.06, 0.5]}
RATES = {"(a) round-robin": 180.0, "(c) default": 202.0}


def test_picture_is_a_png_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    path = plots.latency_and_throughput_png(tmp_path / "out" / "r.png", "title", SERIES, RATES)
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "picture:" in plots.report(path)


def test_no_matplotlib_means_no_picture_and_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    assert plots.latency_and_throughput_png(tmp_path / "r.png", "t", SERIES, RATES) is None
    assert not (tmp_path / "r.png").exists()
    assert "matplotlib is not installed" in plots.report(None)
