"""Requests refused at the edge, counted by reason: ``ultrakv_rejected_requests_total``.

The reason is the status the client got, for the statuses that mean "refused" (a bad field,
a limit or quota, a missing or wrong credential, an unknown session); failures of the server
itself (INTERNAL, UNAVAILABLE, ...) are not rejections. The counts are per process, which
runs one node or one coordinator, and every server of it exports them.
"""

from __future__ import annotations

import threading
from collections import Counter

import grpc
from prometheus_client.core import CounterMetricFamily

REJECTION_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
})


class RejectionCounts:
    """Thread-safe counts of rejected requests by reason (status name, lower case)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def record(self, code: grpc.StatusCode) -> None:
        if code in REJECTION_CODES:
            with self._lock:
                self._counts[code.name.lower()] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def metric(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "ultrakv_rejected_requests", "Requests refused at the edge, by reason (the status "
            "the client got: invalid_argument, resource_exhausted, unauthenticated, ...).",
            labels=["reason"])
        for reason, n in sorted(self.snapshot().items()):
            family.add_metric([reason], n)
        return family


REJECTIONS = RejectionCounts()
