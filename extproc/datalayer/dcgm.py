"""The `dcgm-data-source` + `dcgm-extractor` pair: NVIDIA's DCGM exporter, scraped for each endpoint
(at the pod's IP, or its node's with `useNodeAddress`), read into the endpoint's `GPUUtilization`
attribute (0-1) that `endpoint-attribute-filter` and `endpoint-attribute-scorer` read.

As llm-d reads it: the samples of `DCGM_FI_DEV_GPU_UTIL` (percent) that belong to the endpoint's pod
(a sample whose `pod` label names another pod is another pod's GPU; one without the label is kept, as a
sidecar's are), their maximum (the busiest GPU), divided by 100. A failed scrape, or a body without
the endpoint's samples, keeps the last value; the model server's health is not touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.scraper import (
    EndpointPoller,
    SampleFinder,
    ScrapeError,
    finite,
    labels_of,
)
from pickers.framework.endpoint import Endpoint
from pickers.plugins.datalayer.attributes import GPU_UTILIZATION
from pickers.plugins.datalayer.sources import DEFAULT_DCGM_SOURCE, HttpSource

GPU_UTIL_METRIC = "DCGM_FI_DEV_GPU_UTIL"
POD_LABEL = "pod"  # set by the exporter with DCGM_EXPORTER_KUBERNETES=true (the GPU Operator's default)

_FINDER = SampleFinder([GPU_UTIL_METRIC])


def parse_gpu_utilization(text: str, pod: str) -> float:
    """The GPU utilization of `pod` ("" matches every sample), 0-1 for 0-100 percent (not clamped, as
    in llm-d; a negative sample counts as 0). NaN/Inf samples are skipped. Raises ScrapeError when no
    sample belongs to the pod."""
    highest = 0.0
    found = False
    for m in _FINDER.samples(text):
        _, label_text, raw_value, _ = m.groups()
        value = finite(raw_value)
        if value is None:
            continue
        if pod and label_text and POD_LABEL in label_text:
            owner = labels_of(label_text).get(POD_LABEL)
            if owner is not None and owner != pod:
                continue
        highest = max(highest, value)
        found = True
    if not found:
        raise ScrapeError(f"no {GPU_UTIL_METRIC} sample for pod {pod!r}" if pod else f"no {GPU_UTIL_METRIC} sample")
    return highest / 100.0


class DcgmScraper(EndpointPoller):
    """Polls a `dcgm-data-source` for each endpoint and writes the `dcgm-extractor`'s attribute."""

    what = "scraping DCGM for"

    def __init__(
        self,
        datastore: Datastore,
        *,
        interval: float,
        timeout: float = 1.0,
        source: HttpSource = DEFAULT_DCGM_SOURCE,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        max_rate: float | None = None,
    ) -> None:
        super().__init__(datastore, source, interval=interval, timeout=timeout, session_factory=session_factory, max_rate=max_rate)

    def take(self, ep: Endpoint, body: bytes) -> None:
        value = parse_gpu_utilization(body.decode("utf-8", errors="replace"), ep.spec.pod_name)
        self.datastore.update_attributes(ep.address, GPU_UTILIZATION.producer, {GPU_UTILIZATION.name: value}, time.monotonic())
