"""bench/scale.py's precise-lookups part: both indexes fed the same events, one row per lookup kind."""

from __future__ import annotations

from bench import scale


def test_the_precise_lookups_part_times_both_indexes_on_each_kind_of_lookup():
    rows = scale.precise_lookups(prompts_n=12, endpoints=6, rounds=1, batch_us=10)
    assert list(rows) == ["held by one endpoint", "held by one, tier-weighted", "held by nobody", "prefix held by all 6",
                          "prefix held by all 6, tier-weighted", "prefix held by all 6, tier-weighted, speculative"]  # fmt: skip
    assert [r[2] for r in rows.values()] == [1, 1, 0, 6, 6, 6]  # endpoints matched: the same answers from both
    assert all(r[0] > 0 and r[1] > 0 for r in rows.values())


def test_only_lookups_prints_the_side_by_side_table(capsys, monkeypatch):
    monkeypatch.setattr(scale, "precise_lookups", lambda n, e, r, k: {"held by one endpoint": [20.0, 40.0, 1]})
    assert scale.main(["--only", "lookups", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "compact / dict" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("held")]
    assert rows == [["held", "by", "one", "endpoint", "20.0", "40.0", "0.50x", "1"]]
