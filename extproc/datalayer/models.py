"""The `models-data-source` + `models-data-extractor` pair: each endpoint's OpenAI `/v1/models`, kept on
the endpoint as the models and LoRA adapters it serves (`served-model-filter` reads it; /debug/endpoints
shows it). A failed fetch keeps the last list, as llm-d does; it never makes an endpoint unhealthy.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import msgspec

from extproc.datalayer.datastore import Datastore
from extproc.datalayer.scraper import EndpointPoller, ScrapeError
from pickers.framework.endpoint import Endpoint, ServedModel, ServedModels
from pickers.plugins.datalayer.sources import DEFAULT_MODELS_SOURCE, HttpSource

MAX_MODELS = 10_000  # entries kept per endpoint: a server listing more is hostile or broken


class _Model(msgspec.Struct):
    id: str
    parent: str | None = None
    owned_by: str | None = None


class _ModelList(msgspec.Struct):
    data: list[_Model]


_DECODER = msgspec.json.Decoder(_ModelList)


def parse_models(body: bytes) -> ServedModels:
    """An OpenAI model list (`{"object": "list", "data": [{"id": ..., "parent": ...}, ...]}`): vLLM lists
    its served model names, then its LoRA adapters with the base model as `parent`. Raises ScrapeError."""
    try:
        listing = _DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ScrapeError(f"not an OpenAI model list: {str(e)[:200]}") from None
    if len(listing.data) > MAX_MODELS:
        raise ScrapeError(f"{len(listing.data)} models listed; at most {MAX_MODELS} are kept")
    return ServedModels(tuple(ServedModel(m.id, m.parent or None, m.owned_by) for m in listing.data if m.id))


class ModelsPoller(EndpointPoller):
    what = "fetching models of"

    def __init__(
        self,
        datastore: Datastore,
        *,
        interval: float,
        timeout: float = 1.0,
        source: HttpSource = DEFAULT_MODELS_SOURCE,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        max_rate: float | None = None,
    ) -> None:
        super().__init__(datastore, source, interval=interval, timeout=timeout, session_factory=session_factory, max_rate=max_rate)

    def take(self, ep: Endpoint, body: bytes) -> None:
        self.datastore.update_served_models(ep.address, parse_models(body))
