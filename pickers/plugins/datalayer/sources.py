"""Data-layer sources: what is fetched from each endpoint, or which events are listened to.

`metrics-data-source` (Prometheus `/metrics`), `models-data-source` (OpenAI `/v1/models`) and
`dcgm-data-source` (NVIDIA's DCGM exporter beside the pod or on its node) poll each endpoint over
HTTP(S) with llm-d's parameters; `multicluster-metrics-data-source` scrapes each peer cluster the way
`metrics-data-source` scrapes a pod, over verified HTTPS by default. The pollers in extproc.datalayer
run them. The two notification sources take llm-d's parameters; what llm-epp does with them is the
dataLayer loader's call (pickers.config.datalayer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from pickers.framework.params import ParameterError, Params
from pickers.plugins.base import Plugin, PluginContext

SCHEMES = ("http", "https")
_TLS_PARAMS = ("insecureSkipVerify", "caCertPath", "clientCertPath", "clientKeyPath")


@dataclass(slots=True, frozen=True)
class HttpSource:
    """Where and how often one HTTP source fetches, per endpoint: `scheme://host:port/path`."""

    name: str
    path: str
    scheme: str = "http"
    port: int | None = None  # None: the endpoint's own port (or its metricsPort from the endpoints file)
    insecure_skip_verify: bool = True  # llm-d's default: model servers' certificates are rarely verifiable
    ca_cert_path: str | None = None
    client_cert_path: str | None = None  # with client_key_path: mTLS
    client_key_path: str | None = None
    interval: float | None = None  # seconds; None: every base tick (--refresh-metrics-interval)
    max_bytes: int | None = None  # a longer answer fails the fetch; None: no cap
    # the endpoints file's metricsPort/metricsPath apply (they say where the model server's metrics
    # are); False for an exporter beside the model server, which is found at `port` alone
    endpoint_overrides: bool = True
    use_node_address: bool = False  # fetch from the endpoint's node IP (a DaemonSet), else its own IP
    # ask for only the series the extractor reads (`?name[]=...`, which Prometheus client libraries
    # honour); metrics-data-source's `seriesFilter`
    series_filter: bool = False


# --max-scrape-rate's default, fetches a second per source over all endpoints: about half a core of
# fetching and parsing vLLM pages with the series filter (~100 us each; bench.scrape_pool)
DEFAULT_MAX_SCRAPE_RATE = 5000.0
DEFAULT_METRICS_SOURCE = HttpSource("metrics-data-source", "/metrics", series_filter=True)
DEFAULT_MODELS_SOURCE = HttpSource("models-data-source", "/v1/models")
DCGM_PORT = 9400  # the DCGM exporter's default port
DEFAULT_DCGM_SOURCE = HttpSource("dcgm-data-source", "/metrics", port=DCGM_PORT, endpoint_overrides=False)


class DataSource(Plugin):
    """A `dataLayer.sources` entry; `output` names what it hands its extractors."""

    output: ClassVar[str]


def read_http_source(
    name: str, p: Params, default_path: str, *, takes_port: bool, tls_files: bool = True, default_scheme: str = "http",
    verify: bool = False, max_bytes: int | None = None,
) -> HttpSource:
    """The HTTP parameters llm-d's sources share; `tls_files`: it takes caCertPath and a client
    certificate (dcgm-data-source does not); `verify`: the certificate is checked unless
    insecureSkipVerify is true (llm-d's default for a peer cluster), otherwise only when it is false."""
    scheme = p.string("scheme", default_scheme)
    if scheme not in SCHEMES:
        raise ParameterError("scheme", f"expected http or https, got {scheme!r}")
    path = p.string("path", default_path) or default_path
    if not path.startswith("/"):
        raise ParameterError("path", f"expected a path starting with '/', got {path!r}")
    port = p.port("port") if takes_port else None
    skip = p.flag("insecureSkipVerify", not verify)
    ca = p.string("caCertPath") or None if tls_files else None
    cert = p.string("clientCertPath") or None if tls_files else None
    key = p.string("clientKeyPath") or None if tls_files else None
    if (cert is None) != (key is None):
        raise ParameterError("clientCertPath" if cert is None else "clientKeyPath", "clientCertPath and clientKeyPath go together")
    if scheme == "http":
        given = [k for k in _TLS_PARAMS if p.given(k) and (tls_files or k == "insecureSkipVerify")]
        if given:
            p.warnings.append(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect with scheme http")
    elif ca is not None and skip:
        default = "" if p.given("insecureSkipVerify") else " (its default)"
        p.warnings.append(f"caCertPath has no effect while insecureSkipVerify is true{default}; set it to false to verify")
    return HttpSource(
        name, path, scheme, port, skip, ca, cert, key, interval=p.duration("interval"), max_bytes=max_bytes
    )


class MetricsDataSource(DataSource):
    """Scrapes each endpoint's Prometheus metrics; its extractor is a `core-metrics-extractor`."""

    type = "metrics-data-source"
    output = "prometheus"

    def __init__(self, name: str | None = None, source: HttpSource = DEFAULT_METRICS_SOURCE) -> None:
        super().__init__(name)
        self.source = source

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> MetricsDataSource:
        source = read_http_source(name, p, DEFAULT_METRICS_SOURCE.path, takes_port=True)
        return cls(name, replace(source, series_filter=p.flag("seriesFilter", DEFAULT_METRICS_SOURCE.series_filter)))


PEER_METRICS_MAX_BYTES = 8 << 20  # llm-d's cap on a peer cluster's metrics answer


class MulticlusterMetricsDataSource(MetricsDataSource):
    """llm-d's cluster-scoped metrics source: scrapes each peer cluster (its address, or its metricsAddress
    label) as `metrics-data-source` scrapes a pod, but over HTTPS with the certificate verified by default
    (a scrape across clusters crosses a trust boundary) and at most 8 MiB an answer. Its extractor is a
    `multicluster-metrics-extractor`."""

    type = "multicluster-metrics-data-source"

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> MulticlusterMetricsDataSource:
        # llm-d decodes `port` here and drops it: refused, not ignored
        p.refused("port", "a peer cluster's metrics port is its metricsPort label in the clusters file (llm-d "
                          "ignores this parameter)")  # fmt: skip
        source = read_http_source(
            name, p, DEFAULT_METRICS_SOURCE.path, takes_port=False, default_scheme="https", verify=True,
            max_bytes=PEER_METRICS_MAX_BYTES,
        )  # fmt: skip
        return cls(name, source)


class DcgmDataSource(DataSource):
    """Scrapes NVIDIA's DCGM exporter for each endpoint: at its pod's IP (a sidecar) or, with
    `useNodeAddress`, its node's (a DaemonSet), on `port` (9400); its extractor is a `dcgm-extractor`."""

    type = "dcgm-data-source"
    output = "dcgm"

    def __init__(self, name: str | None = None, source: HttpSource = DEFAULT_DCGM_SOURCE) -> None:
        super().__init__(name)
        self.source = source

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> DcgmDataSource:
        read = read_http_source(name, p, DEFAULT_DCGM_SOURCE.path, takes_port=True, tls_files=False)
        port = read.port if read.port is not None else DCGM_PORT
        p.effective["port"] = port
        node = p.flag("useNodeAddress", False)
        return cls(name, replace(read, port=port, endpoint_overrides=False, use_node_address=node))


class ModelsDataSource(DataSource):
    """Fetches each endpoint's OpenAI model list; its extractor is a `models-data-extractor`."""

    type = "models-data-source"
    output = "models"

    def __init__(self, name: str | None = None, source: HttpSource = DEFAULT_MODELS_SOURCE) -> None:
        super().__init__(name)
        self.source = source

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> ModelsDataSource:
        return cls(name, read_http_source(name, p, DEFAULT_MODELS_SOURCE.path, takes_port=False))


class K8sNotificationSource(DataSource):
    """llm-d's watch of one Kubernetes kind (group, version, kind) whose events go to notification
    extractors: Go plugins of the user's own in llm-d, which ships none."""

    type = "k8s-notification-source"
    output = "k8s-notifications"

    def __init__(self, name: str | None = None, gvk: tuple[str, str, str] = ("", "v1", "Pod")) -> None:
        super().__init__(name)
        self.gvk = gvk

    @classmethod
    def from_config(cls, name: str, p: Params, ctx: PluginContext) -> K8sNotificationSource:
        group = p.string("group", "") or ""
        version = p.string("version", required=True)
        kind = p.string("kind", required=True)
        assert version is not None and kind is not None
        return cls(name, (group, version, kind))


class EndpointNotificationSource(DataSource):
    """llm-d's endpoint add/remove events, for the extractors wired to it."""

    type = "endpoint-notification-source"
    output = "endpoint-notifications"
