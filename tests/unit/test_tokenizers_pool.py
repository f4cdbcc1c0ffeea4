"""llm-d's legacy tokenization pool: the deprecated precise-prefix-cache-scorer's
`indexerConfig.tokenizersPoolConfig` brings a token-producer of its own (the uds backend), asked for the
requests the config's token-producers gave no ids. The config as llm-d reads it (and what it refuses),
and the scorer's precise match against a real gRPC sidecar on a Unix socket in tmp_path (the server of
tests/unit/test_uds_tokenizer.py, with the simulator's tokenizer)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from extproc.cli import main as cli
from extproc.datalayer.kv_events import BlockStored, apply_events
from extproc.handlers.request_stream import RequestStream
from extproc.requestcontrol.tokenizerpb import tokenizer_pb2 as pb
from extproc.requestcontrol.tokenizerpb import tokenizer_pb2_grpc as pb_grpc
from extproc.requestcontrol.uds_tokenizer import UdsTokenizerClient
from extproc.server.runner import EppServer, ServeOptions
from pickers.framework.endpoint import EndpointSpec
from pickers.framework.types import CycleState
from pickers.indexes.tokenization import sim_encode
from pickers.plugins.producer.tokens import (
    POOL_TIMEOUT,
    POOL_WORKERS,
    TokenProducer,
    UdsTokenizerTarget,
)
from pickers.plugins.scorer.affinity.precise_prefix import (
    SCORER_DEPRECATION,
    PrecisePrefixCacheScorer,
)
from tests.unit.test_producers import (
    HEADER,
    A,
    B,
    C,
    _director,
    completion,
    ep,
    load,
    refused,
)
from tests.unit.test_protocol import body_msg, completion_body, headers_msg
from tests.unit.test_uds_tokenizer import Sidecar, sidecar  # noqa: F401 - the fixture: the sidecar on a socket in tmp_path

CONFIGS = Path(__file__).parent / "configs"
POOL = "precise-prefix-cache-scorer/tokenizersPoolConfig"
PROMPT = "a long shared system prompt, then the question " * 8


def pool_config(socket: str, pool: str = "", *, before: str = "", scorer: str = "") -> str:
    """The old scorer in llm-d's shape with a tokenizer pool on `socket`; `pool`: more of its fields."""
    return (f"plugins:\n{before}- type: precise-prefix-cache-scorer\n  parameters:\n"
            f"    tokenProcessorConfig: {{blockSizeTokens: 4}}\n    kvEventsConfig: {{discoverPods: false}}\n{scorer}"
            f"    indexerConfig:\n      tokenizersPoolConfig:\n        modelName: m\n        uds: {{socketFile: {socket}}}\n{pool}"
            "- type: max-score-picker\n")  # fmt: skip


def uds_producer(socket: str) -> str:
    return f"- type: token-producer\n  parameters: {{modelName: m, udsTokenizerConfig: {{socketFile: {socket}}}}}\n"


def scorer_of(cfg: Any) -> PrecisePrefixCacheScorer:
    scorer = cfg.plugins["precise-prefix-cache-scorer"]
    assert isinstance(scorer, PrecisePrefixCacheScorer)
    return scorer


def wired(cfg: Any) -> list[TokenProducer]:
    """The config's token-producers, each with a client on its sidecar, as the EPP wires them."""
    tps = [p for p in cfg.producers if isinstance(p, TokenProducer)]
    for tp in tps:
        tp.renderer = UdsTokenizerClient(tp.uds)  # type: ignore[arg-type]
    return tps


async def closed(tps: list[TokenProducer]) -> None:
    for tp in tps:
        await tp.renderer.close()  # type: ignore[union-attr]


# -- the config -----------------------------------------------------------------------------------------
def test_the_pool_is_a_uds_token_producer_the_scorer_brings_with_llm_ds_settings():
    cfg = load(pool_config("/tmp/tokenizer/tokenizer-uds.socket"))
    scorer = scorer_of(cfg)
    pool = scorer.token_pool
    assert isinstance(pool, TokenProducer) and pool.name == POOL and pool.token_backend == "uds"
    assert pool.uds == UdsTokenizerTarget("/tmp/tokenizer/tokenizer-uds.socket", False, "m") and pool.model_name == "m"
    assert pool.concurrency == POOL_WORKERS == 5  # llm-d-kv-cache's default worker count
    assert (pool.timeout, pool.mm_timeout) == (POOL_TIMEOUT, POOL_TIMEOUT) == (0.4, 0.4)  # llm-d's data-producer budget
    assert pool in cfg.producers and POOL not in cfg.plugins  # implied: run with the config's producers
    assert scorer.real_tokens and not any("estimated tokens never match" in w for w in cfg.warnings)
    assert cfg.plugin_parameters["precise-prefix-cache-scorer"]["indexerConfig"]["tokenizersPoolConfig"] == {
        "modelName": "m", "workersCount": 5, "uds": {"socketFile": "/tmp/tokenizer/tokenizer-uds.socket", "useTCP": False}}  # fmt: skip


def test_the_pool_loads_with_llm_ds_deprecation_of_the_scorer_and_its_own():
    said = load(pool_config("/s")).warnings
    assert any(w.endswith(SCORER_DEPRECATION) for w in said)
    (pool_note,) = [w for w in said if "tokenizersPoolConfig" in w]
    assert "indexerConfig.tokenizersPoolConfig is deprecated in llm-d (its legacy tokenization pool)" in pool_note
    assert "configure a token-producer" in pool_note


@pytest.mark.parametrize(("given", "workers"), [("        workersCount: 24\n", 24), ("        workersCount: 0\n", POOL_WORKERS)])
def test_workers_count_bounds_the_pools_calls_in_flight(given: str, workers: int):
    cfg = load(pool_config("/s", given))
    assert scorer_of(cfg).token_pool.concurrency == workers  # type: ignore[union-attr]
    assert cfg.plugin_parameters["precise-prefix-cache-scorer"]["indexerConfig"]["tokenizersPoolConfig"]["workersCount"] == workers


def test_hf_and_local_null_are_off_as_the_guides_write_them():
    cfg = load(pool_config("/s", "        hf: null\n        local: null\n"))
    assert scorer_of(cfg).token_pool is not None
    assert "hf" not in cfg.plugin_parameters["precise-prefix-cache-scorer"]["indexerConfig"]["tokenizersPoolConfig"]


def test_the_model_tokenizer_map_of_the_pools_uds_names_what_the_sidecar_loads():
    cfg = load(pool_config("/s", "        workersCount: 2\n").replace("uds: {socketFile: /s}", "uds: {socketFile: /s, modelTokenizerMap: {m: /models/m/tokenizer.json}}"))
    assert scorer_of(cfg).token_pool.render_model == "/models/m"  # type: ignore[union-attr]


def test_a_null_pool_is_no_pool_and_the_scorer_reads_the_token_producers_tokens():
    cfg = load(pool_config("/s").replace("      tokenizersPoolConfig:\n        modelName: m\n        uds: {socketFile: /s}\n",
                                         "      tokenizersPoolConfig: null\n"))  # fmt: skip
    assert scorer_of(cfg).token_pool is None and not [p for p in cfg.producers if isinstance(p, TokenProducer)]
    assert any("estimated tokens never match" in w for w in cfg.warnings)


def test_the_config_token_producer_is_asked_first_and_the_pool_after_it():
    cfg = load(pool_config("/pool.socket", before=uds_producer("/producer.socket")))
    tps = [p for p in cfg.producers if isinstance(p, TokenProducer)]
    assert [tp.name for tp in tps] == ["token-producer", POOL]
    assert tps[1] is scorer_of(cfg).token_pool


POOL_FIELD = "plugins[0].parameters.indexerConfig.tokenizersPoolConfig"


@pytest.mark.parametrize(
    ("pool", "field", "fragment"),
    [
        ("{uds: {socketFile: /s}}", "modelName", "is required: the model whose tokenizer the sidecar loads"),
        ("{modelName: m}", "uds", "is required: the tokenizer sidecar's socket"),
        ("{modelName: m, uds: {}}", "uds.socketFile", "is required"),
        ("{modelName: m, uds: {socketFile: /s, useTCP: true}}", "uds.socketFile", "expected host:port"),
        ("{modelName: m, uds: {socketFile: /s, timeout: 5s}}", "uds.timeout", "no such setting"),
        ("{modelName: m, uds: {socketFile: /s, modelTokenizerMap: {other: /x}}}", "uds.modelTokenizerMap", "has no entry for modelName 'm'"),
        ("{modelName: m, uds: {socketFile: /s}, workersCount: -1}", "workersCount", "expected an integer >= 0"),
        ("{modelName: m, uds: {socketFile: /s}, workersCount: many}", "workersCount", "expected an integer"),
        ("{modelName: m, uds: {socketFile: /s}, hf: {tokenizersCacheDir: /tmp/tokenizers}}", "hf",
         "not supported: the pool's HuggingFace (download) tokenizer was removed"),
        ("{modelName: m, hf: {enabled: true}}", "hf", "null (off, as the guides write it) loads"),
        ("{modelName: m, uds: {socketFile: /s}, local: {autoDiscoveryDir: /models}}", "local", "local-files tokenizer was removed"),
        ("{modelName: m, uds: {socketFile: /s}, udsTokenizerConfig: {socketFile: /s}}", "udsTokenizerConfig", "unknown parameter"),
        ("/s", "", "expected a mapping"),
    ],
)
def test_what_the_pool_cannot_honour_is_refused_naming_the_field(pool: str, field: str, fragment: str):
    msg = refused("plugins:\n- type: precise-prefix-cache-scorer\n  parameters: {tokenProcessorConfig: {blockSizeTokens: 4}, "
                  f"indexerConfig: {{tokenizersPoolConfig: {pool}}}}}\n- type: max-score-picker\n")  # fmt: skip
    assert f"{POOL_FIELD}{'.' + field if field else ''}: precise-prefix-cache-scorer: " in msg and fragment in msg, msg


def test_the_precise_producer_still_refuses_the_pool_as_llm_d_does():
    msg = refused("plugins:\n- type: precise-prefix-cache-producer\n  parameters: {indexerConfig: {tokenizersPoolConfig: "
                  "{modelName: m, uds: {socketFile: /s}}}}\n- type: max-score-picker\n")  # fmt: skip
    assert "plugins[0].parameters.indexerConfig.tokenizersPoolConfig: precise-prefix-cache-producer: not supported" in msg
    assert "configure a token-producer" in msg


def test_the_scorer_in_llm_epps_shape_takes_no_pool():
    msg = refused("plugins:\n- type: precise-prefix-cache-scorer\n  parameters: {tokenizer: sim, indexerConfig: {tokenizersPoolConfig: "
                  "{modelName: m, uds: {socketFile: /s}}}}\n- type: max-score-picker\n")  # fmt: skip
    assert "plugins[0].parameters.indexerConfig: precise-prefix-cache-scorer: not supported" in msg


@pytest.mark.parametrize("name", ["tokenizers-pool.yaml", "tokenizers-pool-tokenizer.yaml"])
def test_check_config_on_the_guide_shapes_shows_the_pool_and_the_order_of_the_token_producers(name: str, capsys):
    assert cli.main(["check-config", str(CONFIGS / name)]) == 0
    out = capsys.readouterr().out
    assert f"warning: plugins[{1 if name == 'tokenizers-pool.yaml' else 5}] (precise-prefix-cache-scorer): {SCORER_DEPRECATION}" in out
    assert "indexerConfig.tokenizersPoolConfig is deprecated in llm-d" in out
    first = "" if name == "tokenizers-pool.yaml" else "tokenizer, "
    assert f"  token producers, each asked in turn for what those before gave no ids: {first}{POOL} (implied)\n" in out
    workers = 5 if name == "tokenizers-pool.yaml" else 12
    assert (f'"tokenizersPoolConfig":{{"modelName":"my-org/my-model","workersCount":{workers},'
            '"uds":{"socketFile":"/var/run/tokenizer/sidecar.socket","useTCP":false}}') in out  # fmt: skip
    if first:
        assert "    endpoint notifications: precise-prefix-cache-scorer" in out  # llm-d's scorer is an endpoint extractor


# -- the scorer's tokens, from the sidecar -----------------------------------------------------------------
def _prompt_held_by_b(scorer: PrecisePrefixCacheScorer) -> list[int]:
    """B's engine holds the prompt's blocks, C only its first: the sidecar's tokens, as its events carry them."""
    ids = sim_encode(PROMPT.encode())
    blocks = len(ids) // 4
    apply_events(scorer.index, B, [BlockStored(list(range(blocks)), None, ids[: blocks * 4], 4)])
    apply_events(scorer.index, C, [BlockStored([999], None, ids[:4], 4)])
    return ids


async def _pick(director: Any, prompt: str) -> tuple[str, Any]:
    stream = RequestStream(director)
    stream.handle(headers_msg())
    stream.handle(body_msg(completion_body(prompt=prompt), True))
    await director.prepare(stream.request)
    picked = stream.resume()[0].request_headers.response.header_mutation.set_headers[0].header.raw_value.decode()
    return picked, stream.request


async def test_the_pools_tokens_route_a_shared_prefix_to_the_endpoint_whose_kv_events_hold_it(sidecar: Sidecar):  # noqa: F811 - the fixture
    cfg = load(pool_config(sidecar.path))
    scorer = scorer_of(cfg)
    tps = wired(cfg)
    ids = _prompt_held_by_b(scorer)
    try:
        picked, request = await _pick(_director(cfg, addrs=(A, B, C)), PROMPT)
        assert request.prompt_token_ids == ids and picked == B
        assert [(r.model_name, r.prompt) for r in sidecar.completions] == [("m", PROMPT)]
        cycle = CycleState()
        assert scorer.score(request, cycle, [ep(A), ep(B), ep(C)]) == [0.0, 1.0, 1 / (len(ids) // 4)]
        assert not scorer.token_pool.fallbacks  # type: ignore[union-attr]
    finally:
        await closed(tps)


async def test_without_its_socket_the_pool_falls_back_and_the_scorer_matches_nothing(tmp_path: Path):
    cfg = load(pool_config(str(tmp_path / "nobody-listens.socket")))
    scorer = scorer_of(cfg)
    tps = wired(cfg)
    _prompt_held_by_b(scorer)
    try:
        picked, request = await asyncio.wait_for(_pick(_director(cfg, addrs=(A, B, C)), PROMPT), 5.0)
        assert request.prompt_token_ids is None and picked in (A, B, C)  # scheduled all the same, on the estimate
        assert scorer.score(request, CycleState(), [ep(A), ep(B), ep(C)]) == [0.0, 0.0, 0.0]
        fallbacks = scorer.token_pool.fallbacks  # type: ignore[union-attr]
        assert sum(fallbacks.values()) == 1 and set(fallbacks) <= {"RenderError", "timeout"}  # refused at once, or slow to on a busy machine
    finally:
        await closed(tps)


async def test_a_hanging_sidecar_costs_the_pool_its_400ms_budget_then_the_estimate(sidecar: Sidecar):  # noqa: F811 - the fixture
    sidecar.mode = "hang"
    cfg = load(pool_config(sidecar.path))
    tps = wired(cfg)
    try:
        req = completion("y" * 40)
        await asyncio.wait_for(tps[0].prepare(req), 5.0)
        assert req.prompt_token_ids is None and tps[0].fallbacks == {"timeout": 1}
        assert sidecar.deadlines[0] < 2 * POOL_TIMEOUT < 5.0  # the call's own deadline is the budget (gRPC rounds it up a little), not the 5s text timeout
    finally:
        await closed(tps)


async def test_the_pool_tokenizes_only_what_the_config_token_producer_gave_no_ids(sidecar: Sidecar, tmp_path: Path):  # noqa: F811 - the fixture
    # the config's token-producer reaches no sidecar, the pool does: the pool's tokens
    cfg = load(pool_config(sidecar.path, before=uds_producer(str(tmp_path / "gone.socket"))))
    producer, pool = tps = wired(cfg)
    _prompt_held_by_b(scorer_of(cfg))
    try:
        picked, request = await _pick(_director(cfg, addrs=(A, B, C)), PROMPT)
        assert request.prompt_token_ids == sim_encode(PROMPT.encode()) and picked == B
        assert producer.fallbacks == {"RenderError": 1} and not pool.fallbacks
    finally:
        await closed(tps)
    # both reach it: the token-producer's tokens, and the pool is not asked
    cfg = load(pool_config(sidecar.path, before=uds_producer(sidecar.path)))
    tps = wired(cfg)
    before = len(sidecar.completions)
    try:
        _, request = await _pick(_director(cfg, addrs=(A, B, C)), PROMPT)
        assert request.prompt_token_ids == sim_encode(PROMPT.encode()) and len(sidecar.completions) == before + 1
    finally:
        await closed(tps)


async def test_with_an_estimating_token_producer_the_pool_gives_the_ids(sidecar: Sidecar):  # noqa: F811 - the fixture
    cfg = load(pool_config(sidecar.path, before="- type: token-producer\n"))
    (pool,) = [tp for tp in cfg.producers if isinstance(tp, TokenProducer) and tp.uds is not None]
    pool.renderer = UdsTokenizerClient(pool.uds)  # type: ignore[arg-type]
    try:
        _, request = await _pick(_director(cfg, addrs=(A, B)), "counted by the sidecar")
        assert request.prompt_token_ids == sim_encode(b"counted by the sidecar")
    finally:
        await pool.renderer.close()


class GatedSidecar(Sidecar):
    """Holds every completion call until `gate` opens, counting the calls in flight."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.in_flight = 0
        self.most = 0

    async def RenderCompletion(self, request: pb.RenderCompletionRequest, context: Any) -> pb.RenderCompletionResponse:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        return pb.RenderCompletionResponse(token_ids=sim_encode(request.prompt.encode()), success=True)


async def test_workers_count_is_the_most_calls_the_pool_has_at_the_sidecar(tmp_path: Path):
    path = str(tmp_path / "gated.socket")
    servicer = GatedSidecar(path)
    server = grpc.aio.server()
    pb_grpc.add_TokenizationServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    # the pool's settings, with a timeout long enough for the queue to wait in
    tp = TokenProducer(POOL, backend="uds", model_name="m", uds=UdsTokenizerTarget(path, False, "m"), timeout=30.0, mm_timeout=30.0,
                       concurrency=2)  # fmt: skip
    tp.renderer = UdsTokenizerClient(tp.uds)  # type: ignore[arg-type]
    try:
        requests = [completion(f"prompt number {i}") for i in range(5)]
        waiting = [asyncio.create_task(tp.prepare(r)) for r in requests]
        for _ in range(500):
            if servicer.in_flight == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the other three had time to reach the sidecar, if nothing held them
        assert servicer.in_flight == 2
        servicer.gate.set()
        await asyncio.wait_for(asyncio.gather(*waiting), 10.0)
        assert servicer.most == 2 and all(r.prompt_token_ids == sim_encode(r.body["prompt"].encode()) for r in requests)
    finally:
        await tp.renderer.close()  # type: ignore[union-attr]
        await server.stop(0)


# -- epp serve -------------------------------------------------------------------------------------------
def _server(text: str) -> EppServer:
    return EppServer(ServeOptions(grpc_port=0, grpc_health_port=0, metrics_port=0, admin_port=0, bind_address="127.0.0.1",
                                  config_text=HEADER + text))  # fmt: skip


async def test_epp_serve_wires_the_pool_and_initializes_its_sidecar(sidecar: Sidecar):  # noqa: F811 - the fixture
    server = _server(pool_config(sidecar.path))
    (pool,) = server.token_producers
    assert pool.name == POOL and isinstance(pool.renderer, UdsTokenizerClient) and server.director.token_producers == (pool,)
    server.datastore.set_endpoints([EndpointSpec(B, "10.0.0.2", 8000)])
    await server.start()
    try:
        for _ in range(200):
            if pool.renderer.initialized:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        assert sidecar.initialized == ["m"]
        req = completion("through the pool")
        await server.director.prepare(req)
        assert req.prompt_token_ids == sim_encode(b"through the pool")
    finally:
        await asyncio.wait_for(server.stop(0), 10.0)


async def test_epp_serve_shares_one_sidecar_client_between_a_token_producer_and_the_pool_on_it(sidecar: Sidecar):  # noqa: F811 - the fixture
    server = _server(pool_config(sidecar.path, before=uds_producer(sidecar.path)))
    producer, pool = server.token_producers
    assert producer.renderer is pool.renderer  # one channel, one InitializeTokenizer
    await server.start()
    try:
        for _ in range(200):
            if pool.renderer.initialized:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        assert sidecar.initialized == ["m"]  # once for both
        req = completion("asked once")
        await server.director.prepare(req)
        assert req.prompt_token_ids == sim_encode(b"asked once") and [r.prompt for r in sidecar.completions] == ["asked once"]
    finally:
        await asyncio.wait_for(server.stop(0), 10.0)


async def test_a_reload_that_keeps_the_scorer_keeps_its_pool_and_one_that_changes_it_is_refused(tmp_path: Path):
    path = tmp_path / "epp.yaml"
    text = HEADER + pool_config(str(tmp_path / "s.socket"), "        workersCount: 3\n")
    path.write_text(text)
    server = EppServer(ServeOptions(config_file=str(path), admin_port=0, config_reload_interval=60.0))
    (pool,) = server.director.token_producers
    path.write_text(text.replace("max-score-picker\n", "max-score-picker\n  parameters: {maxNumOfEndpoints: 1}\n"))
    assert await server.reloader.poll_once()  # type: ignore[union-attr]
    assert server.director.token_producers == (pool,)  # the same one, its client wired
    path.write_text(text.replace("workersCount: 3", "workersCount: 4"))
    assert not await server.reloader.poll_once()  # type: ignore[union-attr]
    assert "token-producer" in server.config_status()["last_error"] and server.director.token_producers == (pool,)
