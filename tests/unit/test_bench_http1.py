"""The benchmarks' HTTP/1.1 parser and helpers."""

from __future__ import annotations

import os

import pytest

from bench.common import cpu_seconds, percentile
from bench.http1 import ParseError, Parser, request_bytes
from bench.routing import Workload, plan


def test_sized_body_split_across_reads_is_one_message():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Served-By: a:1\r\n\r\nhello"
    p = Parser()
    got = [m for i in range(len(raw)) for m in p.feed(raw[i : i + 1])]
    assert len(got) == 1
    assert got[0].status == 200
    assert got[0].headers[b"x-served-by"] == b"a:1"
    assert got[0].body == b"hello"


def test_chunked_body_with_trailers_is_joined():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-T: 1\r\n\r\n"
    p = Parser()
    got = p.feed(raw[:20]) + p.feed(raw[20:])
    assert [m.body for m in got] == [b"abcde"]


def test_back_to_back_messages_in_one_read():
    req = request_bytes("POST", "/v1/completions", "h", b"{}")
    got = Parser().feed(req + req + b"GET /metrics HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [m.start_line.split()[0] for m in got] == [b"POST", b"POST", b"GET"]
    assert got[0].body == b"{}" and got[2].body == b""


def test_bad_chunk_size_raises():
    with pytest.raises(ParseError):
        Parser().feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")


def test_nearest_rank_percentile():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0


def test_cpu_seconds_of_this_process_is_non_negative():
    assert cpu_seconds(os.getpid()) >= 0


def test_routing_plan_is_seeded_and_ordered_in_time():
    w = Workload(requests=50, seed=3)
    a, b = plan(w), plan(w)
    assert a == b
    assert all(x.at < y.at for x, y in zip(a, a[1:]))
    assert {p.group for p in a} <= set(range(w.groups))
