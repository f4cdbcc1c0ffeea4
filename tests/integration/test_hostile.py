"""The hostile tier: generated hostile requests and files against the real stack (Envoy + EPP +
simulators), as an attacker would send them through the gateway.

Every hostile request must get a prompt HTTP answer that is not a server error (no empty 500, no
hang); after each one a normal request must still succeed, and after each batch the EPP's in-flight
counts must be back to zero and its memory bounded. HOSTILE_EXAMPLES sets the cases per class
(default 40; the table in docs/reliability.md was made with a larger run).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bench.http1 import Parser
from extproc.datalayer.endpoints_file import parse_endpoints_yaml
from extproc.devstack.stack import LocalStack
from pickers.framework.errors import ConfigError
from tests.integration.conftest import MODEL, make_stack

pytestmark = pytest.mark.envoy

EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "40"))
HOSTILE = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
ANSWER_WITHIN = 15.0  # seconds a hostile request may take to get its answer
RSS_GROWTH_LIMIT = 300 * 1024 * 1024  # the EPP's memory after all batches, above its start
INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


@pytest.fixture(scope="module")
def hostile_stack(tmp_path_factory) -> Iterator[LocalStack]:
    # a short body idle timeout, so a stalled body is answered within the test's patience
    with make_stack(tmp_path_factory.mktemp("hostile"), sims=2, epp_args=("--request-body-idle-timeout", "2s")) as s:
        s.baseline_rss = epp_rss(s)  # type: ignore[attr-defined]
        yield s


@pytest.fixture(autouse=True)
def healthy_after_the_batch(hostile_stack: LocalStack) -> Iterator[None]:
    yield
    # in-flight counts settle (aborted streams are settled when Envoy closes them)
    deadline = time.monotonic() + 10
    while (n := in_flight(hostile_stack)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert n == 0, f"{n} requests still counted in flight after the batch"
    growth = epp_rss(hostile_stack) - hostile_stack.baseline_rss  # type: ignore[attr-defined]
    assert growth < RSS_GROWTH_LIMIT, f"EPP memory grew by {growth / 2**20:.0f} MiB"
    assert_normal_request_succeeds(hostile_stack)


# -- what the client sees -------------------------------------------------------------------------


def send_raw(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request on its own connection; (status, body) of the answer, or (0, b"") if the
    connection was closed without one. Raises TimeoutError when no answer comes in time."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN) as sock:
        sock.sendall(head + body)
        parser = Parser()
        deadline = time.monotonic() + ANSWER_WITHIN
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return 0, b""
            if not data:
                return 0, b""
            for msg in parser.feed(data):
                return msg.status, msg.body
        raise TimeoutError("no answer")


def head_bytes(method: str, path: str, headers: list[tuple[str, str]], body_len: int | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gw", "Connection: close"]
    if body_len is not None:
        lines.append(f"Content-Length: {body_len}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def assert_clear_answer(status: int, body: bytes) -> None:
    assert status != 0, "the connection closed without an answer"
    assert status < 500, f"server error {status}: {body[:200]!r}"
    if status >= 400:
        assert body.strip(), f"{status} with an empty body"


def assert_normal_request_succeeds(stack: LocalStack) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}).encode()
    status, reply = send_raw(stack.listen_port, head_bytes("POST", "/v1/chat/completions", [("content-type", "application/json")], len(body)), body)
    assert status == 200, f"a normal request after the hostile one got {status}: {reply[:200]!r}"


def in_flight(stack: LocalStack) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.epp_admin_port}/debug/endpoints", timeout=5) as r:
        return sum(int(ep.get("in_flight", 0)) for ep in json.load(r)["endpoints"])


def epp_rss(stack: LocalStack) -> int:
    assert stack.epp_proc is not None
    status = Path(f"/proc/{stack.epp_proc.popen.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


# -- generated hostile input ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
# bodies with the fields the EPP reads, each of any type
request_objects = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.just(MODEL), st.text(max_size=300), json_values),
        "messages": st.one_of(st.just([]), st.lists(st.fixed_dictionaries({"role": st.text(max_size=10), "content": json_values}), max_size=3), json_values),
        "prompt": json_values,
        "input": json_values,
        "stream": json_values,
        "stream_options": json_values,
        "max_tokens": st.one_of(st.integers(-5, 5), json_values),
    },
)
bodies = st.one_of(
    st.binary(max_size=3000),
    json_values.map(lambda v: json.dumps(v).encode()),
    request_objects.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"   ", b"\xff\xfe", b"{" * 5000, b'{"model": "' + b"\xc3" * 100 + b'"}']),
)
token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
header_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)


@HOSTILE
@given(path=st.sampled_from(INFERENCE_PATHS), body=bodies)
def test_any_body_gets_a_clear_answer(hostile_stack, path, body):
    head = head_bytes("POST", path, [("content-type", "application/json")], len(body))
    assert_clear_answer(*send_raw(hostile_stack.listen_port, head, body))


@HOSTILE
@given(
    path=st.sampled_from(INFERENCE_PATHS),
    headers=st.lists(st.tuples(token, header_value), max_size=30),
    spoof=st.booleans(),
)
def test_any_headers_get_a_clear_answer_and_never_choose_the_destination(hostile_stack, path, headers, spoof):
    if spoof:
        headers = [*headers, ("x-gateway-destination-endpoint", "127.0.0.1:1"), ("x-prefiller-host-port", "127.0.0.1:1")]
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    status, reply = send_raw(hostile_stack.listen_port, head_bytes("POST", path, [("content-type", "application/json"), *headers], len(body)), body)
    assert_clear_answer(status, reply)


ENVOY_MAX_HEADERS = 128  # max_headers_count in envoy/llm-gateway.yaml


@HOSTILE
@given(count=st.integers(80, ENVOY_MAX_HEADERS - 4), value_size=st.sampled_from([1, 100, 600]))
def test_many_headers_get_a_clear_answer(hostile_stack, count, value_size):
    # up to Envoy's own limit (with Host, Connection and Content-Length): the EPP answers 431 when
    # the headers it adds would pass it, and never an empty 500
    headers = [(f"x-h{i}", "v" * value_size) for i in range(count)]
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    assert_clear_answer(*send_raw(hostile_stack.listen_port, head_bytes("POST", "/v1/completions", headers, len(body)), body))


@pytest.mark.parametrize("count", [ENVOY_MAX_HEADERS, 500])
def test_past_envoys_own_header_limit_the_connection_is_closed_at_once(hostile_stack, count):
    # Envoy's HTTP/1 codec drops a connection whose request passes max_headers_count, without an
    # answer (its behaviour, before any filter runs); the client learns at once, nothing hangs
    headers = [(f"x-h{i}", "v") for i in range(count)]
    start = time.monotonic()
    status, _ = send_raw(hostile_stack.listen_port, head_bytes("POST", "/v1/completions", headers, 2), b"{}")
    assert status in (0, 431) and time.monotonic() - start < ANSWER_WITHIN


@HOSTILE
@given(
    method=st.sampled_from(["GET", "PUT", "DELETE", "OPTIONS", "PATCH", "POST"]),
    path=st.one_of(st.sampled_from([*INFERENCE_PATHS, "/v1/models", "/sim/fault", "/sim/reset", "/metrics"]),
                   st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._-%", max_size=60).map(lambda p: "/" + p)),
    encoding=st.sampled_from([None, "gzip", "br", "deflate", "identity, gzip"]),
    upgrade=st.booleans(),
)
def test_any_method_path_encoding_or_upgrade_gets_a_clear_answer(hostile_stack, method, path, encoding, upgrade):
    headers = [("content-type", "application/json")]
    if encoding:
        headers.append(("content-encoding", encoding))
    if upgrade:
        headers += [("upgrade", "websocket"), ("sec-websocket-version", "13"), ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    head = head_bytes(method, path, headers, len(body)).replace(b"Connection: close", b"Connection: upgrade" if upgrade else b"Connection: close")
    status, reply = send_raw(hostile_stack.listen_port, head, body)
    if upgrade and path not in INFERENCE_PATHS and status == 503:
        # off the inference paths an upgrade goes to the model server as it is; the simulator may
        # drop it, and Envoy then says so (a 503 that names the reset), which is an answer too
        assert b"reset" in reply, reply[:200]
    else:
        assert_clear_answer(status, reply)
    if path.startswith("/sim/"):
        # not reachable: 404 from the gateway, or its 403 when the request also asks for an upgrade
        assert status in (403, 404), "the simulator's control endpoints are not reachable through the gateway"


@settings(max_examples=max(3, EXAMPLES // 10), deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(size=st.sampled_from([2 * 2**20, 80 * 2**20]), short_by=st.sampled_from([0, 1000]))
def test_huge_and_truncated_bodies_get_a_clear_answer(hostile_stack, size, short_by):
    """Over the EPP's 64 MiB limit: 413 as soon as it is passed. Under it: the body is read (400, not
    JSON), or, when it stops short of its Content-Length, the body idle timeout answers 408."""
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", hostile_stack.listen_port), timeout=120) as sock:
        sock.sendall(head_bytes("POST", "/v1/completions", [("content-type", "application/json")], size))
        sent = 0
        try:
            while sent < size - short_by:
                n = min(len(chunk), size - short_by - sent)
                sock.sendall(chunk[:n])
                sent += n
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-body: the answer is already waiting
        parser = Parser()
        sock.settimeout(120)
        status, body = 0, b""
        while not status:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            for msg in parser.feed(data):
                status, body = msg.status, msg.body
    expected = 413 if size > 64 * 2**20 else 408 if short_by else 400
    assert status == expected, (status, body[:200])
    assert body.strip()


# -- hostile files ------------------------------------------------------------------------------------

yaml_texts = st.one_of(
    st.text(max_size=2000),
    json_values.map(lambda v: yaml.safe_dump(v)),
    st.sampled_from([
        "a: &a ['x','x','x','x','x','x','x','x','x']\n" + "".join(
            f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
        "#" * (3 * 2**20) + "\n",
        "endpoints:\n- {host: 127.0.0.1, port: 99999999}\n",
        "\x00\x01\x02",
    ]),
)


@settings(max_examples=max(5, EXAMPLES // 4), deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(text=yaml_texts)
def test_a_hostile_endpoints_file_keeps_the_last_good_pool(hostile_stack, text):
    try:
        parse_endpoints_yaml(text)
    except ConfigError:
        pass
    else:
        assume(False)  # a valid table (`[]` is an empty pool) is a reconfiguration, not an attack
    path = hostile_stack.endpoints_path
    assert path is not None
    good = path.read_text()
    try:
        path.write_text(text)
        time.sleep(1.5)  # the watcher polls every second
        assert_normal_request_succeeds(hostile_stack)
    finally:
        path.write_text(good)
        time.sleep(1.2)


def test_an_upgrade_off_the_inference_paths_that_envoy_refuses_says_why(hostile_stack):
    headers = [("connection", "upgrade"), ("upgrade", "websocket"), ("sec-websocket-version", "13"),
               ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]  # fmt: skip
    head = head_bytes("GET", "/sim/stats", headers, None).replace(b"Connection: close\r\n", b"")
    status, body = send_raw(hostile_stack.listen_port, head)
    assert (status, body.decode()) == (403, "inference error: Forbidden - upgrading the connection is not supported by this gateway: send a plain HTTP request\n")
