"""Building an API client (a kubeconfig file, else the pod's service account) and reading answers.

Every call goes through the `kubernetes_asyncio` client with `_preload_content=False`: we get the raw
aiohttp response, check its status here, and decode the body ourselves into `extproc.kubernetes.objects`.
"""

from __future__ import annotations

import logging
import os

import aiohttp
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.config.config_exception import ConfigException

from extproc.kubernetes.objects import decode_status
from pickers.framework.errors import ConfigError

log = logging.getLogger(__name__)

_SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class KubeApiError(Exception):
    """A request the API server answered with an error status (or a watch ERROR event)."""

    def __init__(self, status: int, reason: str, message: str, *, what: str) -> None:
        super().__init__(f"{what}: HTTP {status} {reason}: {message}".rstrip(": "))
        self.status = status
        self.reason = reason
        self.what = what


async def make_api_client(kubeconfig: str | None = None) -> ApiClient:
    """An ApiClient for `kubeconfig`, or in-cluster config (the pod's service account) without one.

    Raises ConfigError naming the source when neither works.
    """
    cfg = Configuration()
    if kubeconfig:
        try:
            await kube_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
        except (ConfigException, OSError, ValueError) as e:
            raise ConfigError(f"cannot load the kubeconfig: {e}", source=kubeconfig) from e
    else:
        try:
            kube_config.load_incluster_config(client_configuration=cfg)
        except ConfigException as e:
            raise ConfigError(
                f"not running in a cluster ({e}); give --kubeconfig to reach the API server from outside",
                field="--kubeconfig",
            ) from e
    return ApiClient(cfg)


def default_namespace() -> str:
    """The namespace to use when no flag names one: $NAMESPACE, the pod's own namespace, else 'default'."""
    env = os.environ.get("NAMESPACE") or os.environ.get("POD_NAMESPACE")
    if env:
        return env
    try:
        with open(_SA_NAMESPACE_FILE, encoding="utf-8") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


async def read_body(resp: aiohttp.ClientResponse, *, what: str) -> bytes:
    """The body of a finished (non-watch) request; raises KubeApiError for a non-2xx status."""
    async with resp:
        data = await resp.read()
        if not 200 <= resp.status < 300:
            status = decode_status(data)
            raise KubeApiError(resp.status, status.reason or (resp.reason or ""), status.message, what=what)
        return data


async def raise_for_status(resp: aiohttp.ClientResponse, *, what: str) -> None:
    """For a streaming request: raise KubeApiError (and release the response) unless it is 2xx."""
    if 200 <= resp.status < 300:
        return
    await read_body(resp, what=what)
