"""The Director with the real scheduler and datastore behind RequestStream: what the scheduling
result becomes on the wire (explained scores, plugin headers, in-flight prefill work)."""

from __future__ import annotations

import json
import random

from extproc.datalayer.datastore import Datastore
from extproc.handlers.request_stream import RequestStream
from extproc.observability.metrics import EppMetrics
from extproc.requestcontrol.director import Director
from pickers.config.strategies import build_profile
from pickers.framework.endpoint import EndpointSpec
from pickers.framework.scheduler import Scheduler
from pickers.indexes.prefix import ApproxPrefixIndex
from tests.unit.test_protocol import ADDRS, completion_body, response_body_msg, response_headers_msg, send_request, set_headers


def real_director(addrs=ADDRS, *, strategy="default", explain=False) -> Director:
    ds = Datastore()
    ds.set_endpoints(EndpointSpec(a, a.split(":")[0], int(a.split(":")[1])) for a in addrs)
    profile = build_profile(strategy, ApproxPrefixIndex(), rng=random.Random(0))
    return Director(ds, Scheduler(profile, explain=explain), EppMetrics())


def test_in_flight_is_counted_from_pick_to_the_end_of_the_response():
    director = real_director()
    stream = RequestStream(director)
    send_request(stream, completion_body(stream=True))
    assert director.datastore.total_in_flight() == 1
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    stream.handle(response_body_msg(b"data: [DONE]\n\n", True))
    assert director.datastore.total_in_flight() == 0


def test_explained_scores_name_every_scorer_and_candidate():
    stream = RequestStream(real_director(explain=True))
    out = send_request(stream, completion_body())
    scores = json.loads(out[0].dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint-scores"].string_value)
    assert set(scores) == {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "total"}
    assert set(scores["total"]) == set(ADDRS)




def test_plugin_headers_reach_the_upstream_request_and_the_client_response():
    from pickers.plugins.scorer.affinity.session_affinity import session_address

    config = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: session-affinity-scorer
- type: queue-scorer
"""
    from pickers.config.loader import load_config
    from pickers.plugins.base import PluginContext

    ds = Datastore()
    ds.set_endpoints(EndpointSpec(a, a.split(":")[0], 8000) for a in ADDRS)
    cfg = load_config(config, "test", PluginContext(ApproxPrefixIndex(), random.Random(0), 1))
    director = Director(ds, Scheduler(cfg.profile), EppMetrics())
    stream = RequestStream(director)
    out = send_request(stream, completion_body(), extra={"x-session-token": "bm90LWFuLWFkZHJlc3M="})
    chosen = set_headers(out[0])["x-gateway-destination-endpoint"]
    resp = stream.handle(response_headers_msg())
    token = {h.header.key: h.header.raw_value.decode() for h in resp[0].response_headers.response.header_mutation.set_headers}[
        "x-session-token"
    ]
    assert session_address(token) == chosen
    # the next request of the session sticks to that endpoint
    for _ in range(5):
        again = send_request(RequestStream(director), completion_body(), extra={"x-session-token": token})
        assert set_headers(again[0])["x-gateway-destination-endpoint"] == chosen




def test_prefill_work_is_counted_from_pick_to_first_byte():
    from pickers.config.loader import load_config
    from pickers.plugins.base import PluginContext

    ds = Datastore()
    ds.set_endpoints([EndpointSpec("a", "10.0.0.1", 8000)])
    text = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: prefill-load-scorer\n"
    cfg = load_config(text, "test", PluginContext(ApproxPrefixIndex(), random.Random(0), 1))
    director = Director(ds, Scheduler(cfg.profile), EppMetrics())
    stream = RequestStream(director)
    send_request(stream, completion_body("p" * 4000, stream=True))
    (endpoint,) = ds.candidates()
    assert endpoint.in_flight_prefill_tokens == 1000
    stream.handle(response_headers_msg(ctype="text/event-stream"))
    stream.handle(response_body_msg(b'data: {"x":1}\n\n', False))
    assert endpoint.in_flight_prefill_tokens == 0 and endpoint.in_flight == 1
    stream.close()
    assert endpoint.in_flight == 0 and endpoint.in_flight_prefill_tokens == 0
