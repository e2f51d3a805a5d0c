"""Security events: a Prometheus counter by kind and one structured audit line per denied
request. Neither ever holds a key, a signature or a prompt."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

audit_log = logging.getLogger("ultrakv.audit")

KINDS = ("auth_failed", "rate_limited", "ip_denied", "replay_rejected", "forbidden")


class SecurityEvents(Collector):
    """Counts of denied requests by kind; a Prometheus collector of
    ``ultrakv_security_events_total{kind}``."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._lock = threading.Lock()

    def record(self, kind: str, *, method: str, peer_ip: str, reason: str,
               key_id: str = "", tenant: str = "") -> None:
        """Count one denial and write its audit line."""
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        audit_log.warning(json.dumps({
            "event": "request_denied", "kind": kind, "method": method, "peer_ip": peer_ip,
            "key_id": key_id, "tenant": tenant, "reason": reason}, sort_keys=True))

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("ultrakv_security_events",
                                     "Requests denied at the edge, by kind", labels=["kind"])
        with self._lock:
            for kind, count in sorted(self.counts.items()):
                family.add_metric([kind], count)
        yield family
