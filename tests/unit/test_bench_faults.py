"""bench.faults' accounting: a request without an answer is lost, and the result says why."""

from __future__ import annotations

from bench.faults import Sent, _summary


def test_lost_requests_are_counted_by_the_clients_error() -> None:
    sent = [Sent("a", 0.0, 1.0, 200), Sent("b", 0.0, 1.0, 500),
            Sent("c", 0.0, 3.0, None, error="TimeoutError: "), Sent("d", 0.0, 0.1, None, error="ConnectionError: closed before an answer"),
            Sent("e", 0.0, 3.0, None, error="TimeoutError: "), Sent("f", 0.0)]  # fmt: skip  (f: still in flight, not counted)
    res = _summary("x", sent)
    assert (res.sent, res.failed, res.lost) == (5, 1, 3)
    assert res.lost_because == {"TimeoutError: ": 2, "ConnectionError: closed before an answer": 1}
