"""Endpoint attributes: who publishes which scalar attribute, and how a config names one.

An attribute is keyed by its name and its producer, the type of the plugin that publishes it (llm-d's
DataKey): `core-metrics-extractor` publishes the `customMetrics` of its engine mappings under the names
the config gives them, `dcgm-extractor` publishes `GPUUtilization`. `endpoint-attribute-filter` and
`endpoint-attribute-scorer` read one, named in their config by `attribute` (or `attributeKey`) and
`producer` (left out: the core metrics extractor).
"""

from __future__ import annotations

from pickers.framework.endpoint import AttributeKey
from pickers.framework.errors import shown
from pickers.framework.params import ParameterError, Params

CORE_METRICS_PRODUCER = "core-metrics-extractor"
DCGM_PRODUCER = "dcgm-extractor"
GPU_UTILIZATION = AttributeKey("GPUUtilization", DCGM_PRODUCER)


def read_attribute_key(p: Params, param: str) -> AttributeKey:
    """The attribute a filter or scorer reads: `param` (required) and `producer`. Left out (or null),
    the producer is the core metrics extractor; given, it is taken as written, "" included (a
    producer-agnostic attribute). A name with "/" and no producer is refused, as llm-d refuses it: the
    old `Attribute/Producer` spelling would match nothing, so every endpoint would lack it unseen."""
    name = p.string(param, required=True)
    assert name is not None
    producer = p.string("producer")
    if producer is not None:
        return AttributeKey(name, producer)
    head, slash, tail = name.rpartition("/")
    if slash:
        raise ParameterError(
            param,
            f"{shown(name)} contains '/' but no producer is set; the attribute and its producer are separate "
            f"parameters: if this is the combined \"Attribute/Producer\" spelling, write {param}: {shown(head)} and "
            f"producer: {shown(tail)}; if the name itself contains '/', set producer explicitly",
        )
    p.effective["producer"] = CORE_METRICS_PRODUCER
    return AttributeKey(name, CORE_METRICS_PRODUCER)
