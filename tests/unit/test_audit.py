"""The audit trail (extproc.observability.audit): one record per request with the documented fields,
the sinks (file with rotation, stream, OpenTelemetry logs), the bounded queue that drops and counts
rather than wait, and the prompt kept only as a hash or a redacted excerpt when asked."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from pathlib import Path

import pytest

from extproc.cli.main import build_parser, cmd_serve
from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream
from extproc.observability.audit import AuditLog, AuditOptions, FileSink, OtelSink, StreamSink, content_patterns, open_sink
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from pickers.config.loader import load_config
from pickers.framework.endpoint import EndpointSpec
from pickers.framework.errors import ConfigError
from pickers.framework.scheduler import Scheduler
from pickers.plugins.base import PluginContext
from tests.unit.test_guardrails import CONTENT, body
from tests.unit.test_objectives_rewrite import immediate
from tests.unit.test_protocol import ADDRS, body_msg, headers_msg, response_body_msg, response_headers_msg, send_request

FIELDS = {
    "time", "request_id", "client", "path", "objective", "model", "target_model", "endpoints", "profile", "admission",
    "rules", "status", "error", "dropped_reason", "message", "aborted", "streaming", "prompt_tokens", "completion_tokens",
    "cached_tokens", "duration_ms", "first_byte_ms", "prompt_sha256", "prompt_excerpt", "response_sha256",
    "response_excerpt",
}  # fmt: skip


class Lines:
    """A sink that keeps what it is given."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, records, data) -> None:
        self.lines.extend(data.splitlines())

    def close(self) -> None:
        pass

    def records(self) -> list[dict]:
        return [json.loads(x) for x in self.lines]


def director_with(audit: AuditLog, text: str = CONTENT) -> Director:
    cfg = load_config(text, "g.yaml", PluginContext())
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(a, a.split(":")[0], int(a.split(":")[1])) for a in ADDRS)
    metrics = EppMetrics()
    metrics.audit = audit  # as the server wires it
    return Director(ds, Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers), metrics, audit=audit)


def serve(director: Director, prompt: str, headers: dict[str, str] | None = None) -> RequestStream:
    """One request through the stream: refused, or answered 200 with a usage object."""
    stream = RequestStream(director)
    out = send_request(stream, body(prompt), extra={"x-request-id": f"id-{len(prompt)}", **(headers or {})})
    if immediate(out) is None:
        stream.handle(response_headers_msg(200))
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        stream.handle(response_body_msg(json.dumps({"usage": usage}).encode(), True))
    stream.close()
    return stream


def test_each_request_gets_one_record_with_every_field():
    sink = Lines()
    audit = AuditLog(sink, AuditOptions(client_header="X-User"), interval=0.01)
    director = director_with(audit)
    serve(director, "a plain prompt", {"x-user": "alice", "x-gateway-inference-objective": "chat"})
    serve(director, "key AKIAABCDEFGHIJKLMNOP", {"x-user": "bob"})
    serve(director, "about project bluebird!")
    audit.close()
    served, refused, flagged = sink.records()
    assert set(served) == FIELDS and set(refused) == FIELDS
    assert served["request_id"] == "id-14" and served["client"] == "alice" and served["objective"] == "chat"
    assert served["model"] == served["target_model"] == "m" and served["path"] == "/v1/completions"
    assert len(served["endpoints"]) == 1 and served["endpoints"][0] in ADDRS and served["profile"] == "default"
    assert served["admission"] == "passed" and served["rules"] == [] and served["status"] == 200
    assert (served["prompt_tokens"], served["completion_tokens"], served["cached_tokens"]) == (7, 3, 0)
    assert served["duration_ms"] >= 0 and served["aborted"] is False and served["time"].endswith("Z")
    assert served["prompt_sha256"] is None and served["prompt_excerpt"] is None  # prompts only when asked
    assert served["response_sha256"] is None and served["response_excerpt"] is None  # responses too
    assert refused["admission"] == "refused" and refused["rules"] == ["content/aws-key"] and refused["status"] == 403
    assert refused["error"] == "Forbidden" and refused["dropped_reason"] == "rejected-content-check"
    assert refused["endpoints"] == [] and refused["client"] == "bob" and "aws-key" in refused["message"]
    assert flagged["admission"] == "flagged" and flagged["rules"] == ["content/project"] and flagged["status"] == 200
    assert flagged["client"] is None
    assert audit.written == 3 and audit.dropped == audit.failed == 0


def test_a_request_refused_after_its_pick_has_one_record_with_the_refusal():
    sink = Lines()
    audit = AuditLog(sink, interval=0.01)
    director = director_with(audit)
    stream = RequestStream(director)
    send_request(stream, body("hello"))
    stream.evict()  # flow control ended it for a higher priority: 429 evicted
    stream.close()
    audit.close()
    (record,) = sink.records()
    assert record["status"] == 429 and record["dropped_reason"] == "evicted" and record["aborted"] is True
    assert record["endpoints"]


def test_a_client_that_leaves_before_the_pick_has_a_record_too():
    sink = Lines()
    audit = AuditLog(sink, AuditOptions(client_header="x-user"), interval=0.01)
    director = director_with(audit)
    stream = RequestStream(director)
    stream.handle(headers_msg(extra={"x-request-id": "gone", "x-user": "carol"}))
    stream.handle(body_msg(body("half a bo")[:10], False))
    stream.close()  # the client hung up mid-body
    stream.close()  # told once
    audit.close()
    (record,) = sink.records()
    assert record["request_id"] == "gone" and record["client"] == "carol" and record["status"] is None
    assert record["aborted"] is True and record["endpoints"] == [] and record["error"] is None


def test_a_full_queue_drops_and_counts_records_and_never_waits():
    release = threading.Event()

    class Stuck(Lines):
        def write(self, records, data) -> None:
            release.wait(10)
            super().write(records, data)

    sink = Stuck()
    audit = AuditLog(sink, AuditOptions(queue_size=3), interval=0.01)
    director = director_with(audit)
    for i in range(20):
        stream = serve(director, "p" * (i + 1))
        assert stream.error is None  # every request was served
    assert audit.dropped >= 20 - 2 * 3  # the stuck writer holds one batch, the queue another
    text = director.metrics.exposition().decode()
    assert f'llm_epp_audit_records_total{{result="dropped"}} {float(audit.dropped)}' in text
    release.set()
    audit.close()
    assert audit.written + audit.dropped == 20 and len(sink.lines) == audit.written


def test_a_failing_sink_counts_its_records_as_failed():
    class Broken(Lines):
        def write(self, records, data) -> None:
            raise OSError("disk full")

    audit = AuditLog(Broken(), interval=0.01)
    director = director_with(audit)
    serve(director, "one")
    serve(director, "two!")
    audit.close()
    assert audit.failed == 2 and audit.written == 0


def test_the_prompt_is_kept_as_its_sha256_when_asked():
    sink = Lines()
    audit = AuditLog(sink, AuditOptions(prompt="hash"), interval=0.01)
    stream = serve(director_with(audit), "hash me")
    audit.close()
    (record,) = sink.records()
    assert record["prompt_sha256"] == hashlib.sha256(stream.request.prompt_text.encode()).hexdigest()
    assert record["prompt_excerpt"] is None


def serve_answer(director: Director, prompt: str, chunks: list[bytes]) -> RequestStream:
    """One request answered 200 with this response body, in these chunks."""
    stream = RequestStream(director)
    assert immediate(send_request(stream, body(prompt), extra={"x-request-id": f"id-{len(prompt)}"})) is None
    stream.handle(response_headers_msg(200))
    for i, chunk in enumerate(chunks):
        stream.handle(response_body_msg(chunk, i == len(chunks) - 1))
    stream.close()
    return stream


ANSWER = [b'{"choices":[{"text":"the card is 4111 1111 1111 1111, ', b'and more"}],', b'"usage":{"prompt_tokens":3,"completion_tokens":9,"total_tokens":12}}']


def test_the_response_is_kept_as_its_sha256_when_asked():
    sink = Lines()
    audit = AuditLog(sink, AuditOptions(response="hash"), interval=0.01)
    serve_answer(director_with(audit), "hash the answer", ANSWER)
    audit.close()
    (record,) = sink.records()
    assert record["response_sha256"] == hashlib.sha256(b"".join(ANSWER)).hexdigest()  # the whole body, over its chunks
    assert record["response_excerpt"] is None and record["prompt_sha256"] is None and record["completion_tokens"] == 9


def test_a_response_excerpt_is_its_head_with_the_presets_masked():
    sink = Lines()
    audit = AuditLog(sink, AuditOptions(response="excerpt", excerpt_chars=48), interval=0.01)
    serve_answer(director_with(audit), "excerpt the answer", ANSWER)
    audit.close()
    (record,) = sink.records()
    excerpt = record["response_excerpt"]
    assert excerpt.startswith('{"choices":[{"text":"the card is [card-number]') and len(excerpt) <= 48
    assert "4111" not in excerpt and record["response_sha256"] is None


def test_audit_response_is_refused_when_unknown():
    with pytest.raises(ConfigError, match="--audit-response"):
        AuditLog(Lines(), AuditOptions(response="all"), interval=0.01)


def test_an_excerpt_is_cut_and_masks_presets_and_the_configs_patterns():
    sink = Lines()
    director = None
    audit = AuditLog(sink, AuditOptions(prompt="excerpt", excerpt_chars=60),
                     patterns=lambda: content_patterns(director.scheduler.plugins), interval=0.01)  # fmt: skip
    director = director_with(audit)
    serve(director, "card 4111 1111 1111 1111 for project bluebird " + "x" * 200)
    audit.close()
    (record,) = sink.records()
    excerpt = record["prompt_excerpt"]
    assert excerpt.startswith("card [card-number] for [content/project]") and len(excerpt) <= 60
    assert "4111" not in excerpt


def test_the_file_sink_rotates_and_keeps_its_backups(tmp_path: Path):
    path = tmp_path / "audit.jsonl"
    sink = FileSink(str(path), max_bytes=300, backups=2)
    audit = AuditLog(sink, interval=0.01)
    director = director_with(audit)
    for i in range(12):
        serve(director, "q" * (i + 1))
    audit.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for p in tmp_path.iterdir():
        lines = p.read_bytes().splitlines()
        assert lines and all(json.loads(x)["request_id"].startswith("id-") for x in lines)
        assert p.stat().st_size <= 300 or len(lines) == 1
    assert audit.written == 12


def test_the_stream_sink_writes_json_lines():
    out = io.BytesIO()
    audit = AuditLog(StreamSink(out), interval=0.01)
    serve(director_with(audit), "to stdout")
    audit.close()
    assert json.loads(out.getvalue())["status"] == 200


def test_the_otel_sink_exports_each_record_as_a_log_record():
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter

    exporter = InMemoryLogRecordExporter()
    audit = AuditLog(OtelSink(exporter), interval=0.01)
    serve(director_with(audit), "over otlp")
    audit.close()
    (log,) = exporter.get_finished_logs()
    assert log.log_record.event_name == "llm_epp.audit"
    assert log.log_record.body["status"] == 200 and log.log_record.attributes["llm_epp.request_id"] == "id-9"


@pytest.mark.parametrize(
    ("opts", "field"),
    [
        (AuditOptions(sink="file"), "--audit-sink"),
        (AuditOptions(sink="file", path="/nonexistent/dir/audit.jsonl"), "--audit-file"),
        (AuditOptions(sink="stdout", path="x.jsonl"), "--audit-file"),
        (AuditOptions(sink="syslog"), "--audit-sink"),
    ],
)
def test_sink_settings_that_cannot_work_are_refused_naming_the_flag(opts, field):
    with pytest.raises(ConfigError) as e:
        open_sink(opts)
    assert e.value.field == field


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--audit-file", "a.jsonl"], "--audit-file"),
        (["--audit-prompt", "hash"], "--audit-prompt"),
        (["--audit-response", "excerpt"], "--audit-response"),
        (["--audit-sink", "stdout", "--audit-queue-size", "0"], "--audit-queue-size"),
        (["--audit-sink", "stdout", "--audit-client-header", "Authorization"], "--audit-client-header"),
        (["--audit-sink", "stdout", "--audit-client-header", "x-api-key"], "--audit-client-header"),
    ],
)
def test_audit_flags_are_checked_by_epp_serve(argv, field):
    args = build_parser().parse_args(["serve", "--endpoints", "10.0.0.1:8000", *argv])
    with pytest.raises(ConfigError) as e:
        cmd_serve(args)
    assert e.value.field == field


# -- with flow control: admission before the queues, a client gone while queued -------------------


async def test_with_flow_control_a_guardrail_refuses_before_the_queue_and_a_queued_client_that_leaves_is_recorded():
    from tests.unit.test_flowcontrol_stream import end, flow_controlled, start
    from tests.unit.test_flowcontrol_runtime import settle

    director, fc, _ = flow_controlled(capacity=1)
    sink = Lines()
    director.audit = audit = AuditLog(sink, interval=0.01)
    cfg = load_config(CONTENT, "g.yaml", PluginContext())
    director.scheduler = Scheduler(cfg.profiles, handler=cfg.profile_handler, producers=cfg.producers)
    first, t1 = await start(director, **{"x-request-id": "first"})
    await settle()
    assert t1.done()  # dispatched: the pool had room
    refused = RequestStream(director)
    send_request(refused, body(f"key {'AKIA' + 'B' * 16}"), extra={"x-request-id": "refused"})
    await director.prepare(refused.request)
    out = await director.admit(refused, None)
    assert immediate(out).status.code == 403 and fc.count == 0  # refused before it was queued
    queued, t3 = await start(director, **{"x-request-id": "queued"})
    await settle()
    assert fc.count == 1
    t3.cancel()
    await settle()
    queued.close()  # the servicer's finally: the client left while queued
    refused.close()
    end(first)
    first.close()
    audit.close()
    records = {r["request_id"]: r for r in sink.records()}
    assert set(records) == {"first", "refused", "queued"}
    assert records["refused"]["admission"] == "refused" and records["refused"]["status"] == 403
    assert records["queued"]["status"] is None and records["queued"]["aborted"] is True and records["queued"]["endpoints"] == []
    assert records["first"]["status"] == 200 and records["first"]["endpoints"]
