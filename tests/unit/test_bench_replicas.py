"""bench.replicas' table: hit-rate and TTFT ratios against one replica, the goal line, sync rows."""

from __future__ import annotations

from bench import quality, replicas
from bench.routing import Outcome


def _run(setup: replicas.Setup, hit: float, ttft: float, peers: dict | None = None) -> replicas.Run:
    outcomes = [Outcome(0, served_by="a", ttft=ttft) for _ in range(10)]
    views = [{"prefix_index_size": 7, "peers": peers}, {"prefix_index_size": 7, "peers": peers}] if peers else [{}]
    return replicas.Run(setup, quality.Result(setup.name, outcomes, 1.0, hit), views)


def test_the_table_compares_with_one_replica_and_says_whether_the_goal_is_met() -> None:
    sc = quality.shared_prefix(True)
    peers = {"records_sent": 5, "records_applied": 5, "bytes_sent": 2048, "journal_entries": 5, "journal_blocks": 50,
             "peer_load_entries": 0, "records_dropped": 0}  # fmt: skip
    text = replicas.summarize(sc, [_run(replicas.SETUPS[0], 0.8, 0.1), _run(replicas.SETUPS[1], 0.78, 0.2, peers),
                                   _run(replicas.SETUPS[2], 0.5, 0.4)])  # fmt: skip
    assert "0.97x" in text and "2.00x" in text  # hit and p50 against one replica
    assert "hit rate: 0.975x (goal >= 0.95x: met); 2 not sharing: 0.625x" in text
    assert "2 sharing / epp-1" in text and "200" in text  # 2 KiB over 10 requests: 200 KiB/s at 1k req/s


def test_a_sharing_pair_below_the_goal_is_reported_as_such() -> None:
    sc = quality.shared_prefix(True)
    text = replicas.summarize(sc, [_run(replicas.SETUPS[0], 0.8, 0.1), _run(replicas.SETUPS[1], 0.6, 0.1, {"records_sent": 1})])
    assert "(goal >= 0.95x: NOT met)" in text and "not sharing" not in text.split("goal")[-1]


def test_repeated_runs_get_numbers_a_mean_and_the_single_replicas_own_spread() -> None:
    sc = quality.b2b(True)
    one, two = replicas.SETUPS[0], replicas.SETUPS[1]
    peers = {"records_sent": 5, "blind_picks_split": 2, "blind_picks_same": 3}
    runs = [_run(one, 0.80, 0.1), _run(two, 0.76, 0.1, peers), _run(one, 0.70, 0.1), _run(two, 0.74, 0.1, peers)]
    text = replicas.summarize(sc, runs)
    assert "1 replica #2" in text and "2 sharing #2 / epp-0" in text and "2/3" in text  # blind split/same
    assert "70.0-80.0%" in text and "0.133" in text  # the single replica's range, and (0.8 - 0.7) / 0.75
    assert "hit rate (means): 1.000x (goal >= 0.95x: met)" in text
    assert "1 replica against its own mean: 0.933x-1.067x" in text
