"""The static endpoints file: its formats, its error messages, and reloading it on change."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from extproc.datalayer import endpoints_file as endpoints_file_module
from extproc.datalayer.datastore import Datastore
from extproc.datalayer.endpoints_file import StaticFileDiscovery, load_endpoints_file
from pickers.framework.endpoint import EndpointSpec
from pickers.framework.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def endpoints_file(tmp_path: Path) -> Callable[[str], Path]:
    return lambda text: write(tmp_path / "endpoints.yaml", text)


# -- formats ------------------------------------------------------------------------------------


def test_loads_the_documented_format(endpoints_file) -> None:
    path = endpoints_file(
        """
endpoints:
  - address: 127.0.0.1
    port: 8000
    name: sim-0
    labels: {llm-d.ai/role: decode}
    metricsPort: 9000
  - address: 127.0.0.2
    port: 8001
"""
    )
    assert load_endpoints_file(path) == [
        EndpointSpec(name="sim-0", host="127.0.0.1", port=8000, labels={"llm-d.ai/role": "decode"},
                     metrics_port=9000),
        EndpointSpec(name="127.0.0.2:8001", host="127.0.0.2", port=8001),
    ]


def test_loads_a_bare_list(endpoints_file) -> None:
    path = endpoints_file("- {address: 10.0.0.1, port: 8000}\n- {address: 10.0.0.2, port: 8000}\n")
    assert [s.address for s in load_endpoints_file(path)] == ["10.0.0.1:8000", "10.0.0.2:8000"]


def test_port_may_be_inside_the_address(endpoints_file) -> None:
    path = endpoints_file('endpoints:\n  - address: "10.0.0.1:8000"\n')
    [spec] = load_endpoints_file(path)
    assert (spec.host, spec.port, spec.name) == ("10.0.0.1", 8000, "10.0.0.1:8000")


def test_host_names_and_the_host_key_are_accepted(endpoints_file) -> None:
    path = endpoints_file("endpoints:\n  - host: vllm-0.vllm.svc\n    port: 8000\n")
    assert load_endpoints_file(path)[0].address == "vllm-0.vllm.svc:8000"


def test_ipv6_addresses_are_bracketed(endpoints_file) -> None:
    path = endpoints_file('endpoints:\n  - {address: "::1", port: 8000}\n  - {address: "[fd00::2]:8001"}\n')
    specs = load_endpoints_file(path)
    assert [s.address for s in specs] == ["[::1]:8000", "[fd00::2]:8001"]
    assert specs[0].metrics_url == "http://[::1]:8000/metrics"


def test_metrics_path_is_accepted(endpoints_file) -> None:
    path = endpoints_file("endpoints:\n  - {address: a, port: 1, metricsPath: /vllm/metrics}\n")
    assert load_endpoints_file(path)[0].metrics_url == "http://a:1/vllm/metrics"


def test_ranks_and_dp_groups_are_read(endpoints_file) -> None:
    path = endpoints_file(
        """
endpoints:
  - {address: 10.0.0.1, port: 8000, rank: 0, dpGroup: dp-0}
  - {address: 10.0.0.1, port: 8001, rank: 1, dpGroup: dp-0}
  - {address: 10.0.0.2, port: 8000, rank: 0, dpGroup: dp-0}
  - {address: 10.0.0.3, port: 8000}
"""
    )
    specs = load_endpoints_file(path)
    assert [(s.rank, s.dp_group) for s in specs] == [(0, "dp-0"), (1, "dp-0"), (0, "dp-0"), (0, "")]


@pytest.mark.parametrize("text", ["endpoints: []\n", "endpoints:\n", "[]\n"])
def test_an_empty_pool_is_valid(endpoints_file, text: str) -> None:
    assert load_endpoints_file(endpoints_file(text)) == []


# -- errors -------------------------------------------------------------------------------------

ONE_OK = "  - {address: 10.0.0.1, port: 8000}\n  - {address: 10.0.0.2, port: 8000}\n"


def test_error_names_file_field_and_expectation(endpoints_file) -> None:
    path = endpoints_file("endpoints:\n" + ONE_OK + "  - {address: 10.0.0.3, port: abc}\n")
    with pytest.raises(ConfigError) as err:
        load_endpoints_file(path)
    assert str(err.value) == f"{path}: endpoints[2].port: expected an integer 1-65535, got 'abc'"
    assert err.value.source == str(path) and err.value.field == "endpoints[2].port"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("endpoints:\n  - {address: a, port: 0}\n", "endpoints[0].port: expected an integer 1-65535, got 0"),
        ("endpoints:\n  - {address: a, port: 70000}\n", "endpoints[0].port: expected an integer 1-65535, got 70000"),
        ("endpoints:\n  - {address: a, port: true}\n", "endpoints[0].port: expected an integer 1-65535, got True"),
        ("endpoints:\n  - {address: a}\n", "endpoints[0].port: missing; give 'port' or write the address as host:port"),
        ("endpoints:\n  - {port: 8000}\n", "endpoints[0].address: missing; expected a host or IP address"),
        ("endpoints:\n  - {address: 5, port: 8000}\n", "endpoints[0].address: expected a host or IP address, got 5"),
        ('endpoints:\n  - {address: "a:x"}\n', "endpoints[0].address: port must be an integer 1-65535, got 'a:x'"),
        ('endpoints:\n  - {address: "http://a", port: 1}\n', "endpoints[0].address: expected a host, IP address or host:port"),
        ('endpoints:\n  - {address: "a:1", port: 2}\n', "endpoints[0].port: 2 disagrees with the port in address 'a:1'"),
        ("endpoints:\n  - {address: a, host: b, port: 1}\n", "endpoints[0].host: give either 'address' or 'host', not both"),
        ("endpoints:\n  - {address: a, port: 1, metricsPort: x}\n", "endpoints[0].metricsPort: expected an integer 1-65535, got 'x'"),
        ("endpoints:\n  - {address: a, port: 1, metricsPath: metrics}\n", "endpoints[0].metricsPath: expected a path starting with '/'"),
        ("endpoints:\n  - {address: a, port: 1, labels: [x]}\n", "endpoints[0].labels: expected a mapping of strings, got ['x']"),
        ("endpoints:\n  - {address: a, port: 1, labels: {gpu: 8}}\n", "endpoints[0].labels.gpu: expected a string (quote it), got 8"),
        ("endpoints:\n  - {address: a, port: 1, name: ''}\n", "endpoints[0].name: expected a non-empty string, got ''"),
        ("endpoints:\n  - {address: a, port: 1, metrics_port: 2}\n", "endpoints[0].metrics_port: unknown field; expected one of"),
        ("endpoints:\n  - just-a-string\n", "endpoints[0]: expected a mapping with 'address' and 'port', got 'just-a-string'"),
        ("- [1, 2]\n", "[0]: expected a mapping with 'address' and 'port'"),
        ("endpoints: {address: a}\n", "endpoints: expected a list, got {'address': 'a'}"),
        ("endpoint:\n  - {address: a, port: 1}\n", "unknown top-level field(s) endpoint; expected 'endpoints'"),
        ("42\n", "expected a mapping with an 'endpoints' list, or a list, got 42"),
        ("endpoints: [\n", "invalid YAML at line"),
        (
            "endpoints:\n" + ONE_OK + "  - {address: 10.0.0.1, port: 8000}\n",
            "endpoints[2]: duplicate address 10.0.0.1:8000 (also endpoints[0])",
        ),
        (
            'endpoints:\n  - {address: a, port: 1}\n  - {address: "a:1"}\n',
            "endpoints[1]: duplicate address a:1 (also endpoints[0])",
        ),
        (
            "endpoints:\n  - {address: a, port: 1, name: x}\n  - {address: b, port: 1, name: x}\n",
            "endpoints[1].name: duplicate name 'x' (also endpoints[0])",
        ),
        ("endpoints:\n  - {address: a, port: 1, rank: -1}\n", "endpoints[0].rank: expected an integer 0-1023"),
        ("endpoints:\n  - {address: a, port: 1, rank: '2'}\n", "endpoints[0].rank: expected an integer 0-1023 (the endpoint's index among its pod's ranks), got '2'"),
        ("endpoints:\n  - {address: a, port: 1, rank: true}\n", "endpoints[0].rank: expected an integer 0-1023"),
        ("endpoints:\n  - {address: a, port: 1, rank: 1.5}\n", "endpoints[0].rank: expected an integer 0-1023"),
        ("endpoints:\n  - {address: a, port: 1, rank: 1024}\n", "endpoints[0].rank: expected an integer 0-1023"),
        ("endpoints:\n  - {address: a, port: 1, dpGroup: 3}\n", "endpoints[0].dpGroup: expected a string naming the endpoint's data-parallel group, got 3"),
        ("endpoints:\n  - {address: a, port: 1, dp_group: g}\n", "endpoints[0].dp_group: unknown field"),
        (
            "endpoints:\n  - {address: a, port: 1, rank: 1, dpGroup: g}\n  - {address: a, port: 2, rank: 1, dpGroup: g}\n",
            "endpoints[1].rank: rank 1 of dpGroup 'g' on host a is also endpoints[0]",
        ),
    ],
)
def test_each_mistake_has_its_message(endpoints_file, text: str, message: str) -> None:
    path = endpoints_file(text)
    with pytest.raises(ConfigError) as err:
        load_endpoints_file(path)
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the endpoints file"):
        load_endpoints_file(tmp_path / "nope.yaml")


# -- watching the file ----------------------------------------------------------------------------

TWO = "endpoints:\n  - {address: 10.0.0.1, port: 8000}\n  - {address: 10.0.0.2, port: 8000}\n"
THREE = TWO + "  - {address: 10.0.0.3, port: 8000, labels: {llm-d.ai/role: prefill}}\n"


def addresses(ds: Datastore) -> list[str]:
    return [ep.address for ep in ds.candidates()]


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@pytest.fixture
async def watching() -> AsyncIterator[Callable[[StaticFileDiscovery], asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []

    def start(discovery: StaticFileDiscovery) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(discovery.run()))
        return tasks[-1]

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_run_loads_the_file_at_once(endpoints_file, watching) -> None:
    ds = Datastore()
    watching(StaticFileDiscovery(endpoints_file(TWO), ds, poll_interval=0.01))
    await eventually(lambda: ds.synced)
    assert addresses(ds) == ["10.0.0.1:8000", "10.0.0.2:8000"]


async def test_a_bad_file_at_start_up_raises(endpoints_file) -> None:
    discovery = StaticFileDiscovery(endpoints_file("endpoints: [\n"), Datastore())
    with pytest.raises(ConfigError, match="invalid YAML"):
        await discovery.run()


async def test_a_changed_file_is_reloaded(endpoints_file, watching) -> None:
    path = endpoints_file(TWO)
    ds = Datastore()
    watching(StaticFileDiscovery(path, ds, poll_interval=0.01))
    await eventually(lambda: len(ds) == 2)
    kept = ds.get("10.0.0.1:8000")
    write(path, THREE)
    await eventually(lambda: len(ds) == 3)
    assert ds.get("10.0.0.1:8000") is kept  # endpoints that stay keep their state
    assert ds.get("10.0.0.3:8000").labels == {"llm-d.ai/role": "prefill"}  # type: ignore[union-attr]


async def test_a_same_size_rewrite_is_reloaded(endpoints_file) -> None:
    path = endpoints_file(TWO)
    ds = Datastore()
    discovery = StaticFileDiscovery(path, ds)
    discovery.load()
    stat = os.stat(path)
    write(path, TWO.replace("10.0.0.2", "10.0.0.9"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as if in the same mtime tick
    assert await discovery.poll_once()
    assert addresses(ds) == ["10.0.0.1:8000", "10.0.0.9:8000"]


async def test_an_unchanged_file_is_not_reapplied(endpoints_file) -> None:
    ds = Datastore()
    discovery = StaticFileDiscovery(endpoints_file(TWO), ds)
    discovery.load()
    assert not await discovery.poll_once()


async def test_a_bad_reload_keeps_the_last_table_and_logs_once(endpoints_file, caplog) -> None:
    path = endpoints_file(TWO)
    ds = Datastore()
    discovery = StaticFileDiscovery(path, ds)
    discovery.load()
    write(path, TWO + "  - {address: 10.0.0.3, port: abc}\n")
    with caplog.at_level(logging.ERROR, logger="extproc.datalayer.endpoints_file"):
        for _ in range(3):
            assert not await discovery.poll_once()
    assert addresses(ds) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"{path}: endpoints[2].port: expected an integer 1-65535, got 'abc'; keeping the last endpoints"
    ]
    write(path, THREE)
    assert await discovery.poll_once()
    assert len(ds) == 3 and discovery.last_error is None


async def test_a_deleted_file_keeps_the_last_table(endpoints_file) -> None:
    path = endpoints_file(TWO)
    ds = Datastore()
    discovery = StaticFileDiscovery(path, ds)
    discovery.load()
    path.unlink()
    assert not await discovery.poll_once()
    assert len(ds) == 2 and "cannot read" in (discovery.last_error or "")
    write(path, THREE)
    assert await discovery.poll_once()
    assert len(ds) == 3


async def test_a_configmap_symlink_swap_is_reloaded(tmp_path: Path, watching) -> None:
    # The layout kubelet writes for a mounted ConfigMap, and its atomic update.
    (tmp_path / "..v1").mkdir()
    write(tmp_path / "..v1" / "endpoints.yaml", TWO)
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "endpoints.yaml").symlink_to("..data/endpoints.yaml")
    ds = Datastore()
    watching(StaticFileDiscovery(tmp_path / "endpoints.yaml", ds, poll_interval=0.01))
    await eventually(lambda: len(ds) == 2)

    (tmp_path / "..v2").mkdir()
    write(tmp_path / "..v2" / "endpoints.yaml", THREE)
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    await eventually(lambda: len(ds) == 3)


async def test_a_reload_reads_and_parses_in_a_worker_thread(endpoints_file, monkeypatch) -> None:
    # A large or hostile file must not hold the event loop (and every request on it) while it is parsed.
    path = endpoints_file(TWO)
    discovery = StaticFileDiscovery(path, Datastore())
    discovery.load()
    parsed_on: list[int] = []
    parse = endpoints_file_module.parse_endpoints_yaml

    def recording_parse(text: str, *, source: str | None = None, peer_clusters: bool = False) -> list[EndpointSpec]:
        parsed_on.append(threading.get_ident())
        return parse(text, source=source, peer_clusters=peer_clusters)

    monkeypatch.setattr(endpoints_file_module, "parse_endpoints_yaml", recording_parse)
    write(path, THREE)
    assert await discovery.poll_once()
    assert parsed_on and threading.get_ident() not in parsed_on


async def test_each_bad_version_of_the_file_is_logged_once(endpoints_file, caplog) -> None:
    path = endpoints_file(TWO)
    discovery = StaticFileDiscovery(path, Datastore())
    discovery.load()
    with caplog.at_level(logging.ERROR, logger="extproc.datalayer.endpoints_file"):
        for bad in ("endpoints: [\n", "endpoints: [\n# edited, still broken\n"):
            write(path, bad)
            for _ in range(3):
                assert not await discovery.poll_once()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all(e.startswith(f"{path}: invalid YAML at line") for e in errors)


async def test_an_alias_bomb_written_into_the_watched_file_keeps_the_last_table(endpoints_file, caplog) -> None:
    path = endpoints_file(TWO)
    ds = Datastore()
    discovery = StaticFileDiscovery(path, ds)
    discovery.load()
    levels = "abcdefghi"
    bomb = "- [" + ", ".join(
        f"&{n} [" + ", ".join([f"*{p}" if p else '"lol"'] * 9) + "]" for p, n in zip(["", *levels], levels)
    ) + "]\n"
    write(path, bomb)
    with caplog.at_level(logging.ERROR, logger="extproc.datalayer.endpoints_file"):
        assert not await discovery.poll_once()
    assert addresses(ds) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert (discovery.last_error or "").startswith(f"{path}: refused: aliases repeat more than 10,000 nodes")
