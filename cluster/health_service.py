"""The ``grpc.health.v1.Health`` service every ultrakv server runs.

grpcio-health-checking's asyncio servicer implements ``Check`` and ``Watch`` but leaves
``List`` (which reflection advertises) to the generated base class, whose answer is a
NotImplementedError logged with a traceback at ERROR on every call. ``HealthService`` adds
``List``: every service's status, as the health protocol defines it.
"""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health, health_pb2


class HealthService(health.aio.HealthServicer):
    """``Check``, ``Watch`` and ``List`` over the statuses set with ``set()``."""

    async def List(self, request: health_pb2.HealthListRequest,
                   context: Any) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()})
