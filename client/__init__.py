"""ultrakv client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio) over gRPC."""

from ultrakv.client.client import (
    AsyncClient,
    Client,
    RequestError,
    RetryPolicy,
    StreamChunk,
    TLSConfig,
)

__all__ = ["AsyncClient", "Client", "RequestError", "RetryPolicy", "StreamChunk", "TLSConfig"]
