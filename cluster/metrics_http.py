"""The Prometheus scrape endpoint that nodes and coordinators both serve."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry
from ultrakv.cluster.addresses import dial_host, listen_address

log = logging.getLogger("ultrakv.metrics")


def serve_metrics(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> Any:
    """Serve ``registry`` over HTTP at ``/metrics``; returns the server (call ``shutdown()``
    on it to stop). Logs the URL."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    log.info("metrics listening on http://%s/metrics (dial %s:%d)",
             listen_address(addr, server.server_port), dial_host(addr), server.server_port)
    return server
