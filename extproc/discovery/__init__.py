"""Endpoint discovery: sources that tell the datastore which endpoints make up the pool.

Each source has an `async run()` that delivers the full membership to `Datastore.set_endpoints`
and keeps it current; the supervisor owns that task.
"""

from extproc.discovery.static import (
    StaticFileDiscovery,
    load_endpoints_file,
    parse_endpoints,
    parse_endpoints_yaml,
)

__all__ = ["StaticFileDiscovery", "load_endpoints_file", "parse_endpoints", "parse_endpoints_yaml"]
