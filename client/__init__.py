"""ultrakv client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio) over gRPC.

The names load on first use (PEP 562): ``ultrakv --help`` imports this package (the command
line lives in it) and must not pay for gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ultrakv.client.client import (
        AsyncClient,
        Client,
        RequestError,
        RetryPolicy,
        StreamChunk,
        TLSConfig,
    )

__all__ = ["AsyncClient", "Client", "RequestError", "RetryPolicy", "StreamChunk", "TLSConfig"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'ultrakv.client' has no attribute {name!r}")
    value = getattr(importlib.import_module("ultrakv.client.client"), name)
    globals()[name] = value
    return value
