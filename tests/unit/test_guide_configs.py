"""Our own configs in the shapes of llm-d's guides (tests/unit/configs/guides/, written by us) load
through `epp check-config` with no warning; tests/integration/test_llmd_guides.py serves each one."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.cli import main as cli

GUIDES = sorted((Path(__file__).parent / "configs" / "guides").glob("*.yaml"))


def test_every_guide_shape_is_here():
    assert {p.stem for p in GUIDES} >= {"inference-scheduling", "optimized-baseline", "pd-disaggregation", "wide-ep", "wide-ep-precise", "agentic"}


@pytest.mark.parametrize("path", GUIDES, ids=lambda p: p.stem)
def test_guide_config_checks_clean(path, capsys):
    rc = cli.main(["check-config", str(path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.startswith(f"{path}: valid (llm-d.ai/")
    assert "warning" not in out.out.lower() and out.err == ""
