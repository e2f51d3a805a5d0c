"""A coordinator's requests to one node on one stream (``NodeService.GenerateMany``).

Forwarded on calls of their own, 64 requests cost the node and the coordinator 64 gRPC
messages per engine step; on one link (cluster/stream_link.py) a step's tokens for all of
them cross as one message. Everything per request (deadlines, resume, usage) stays the
forward's. Two tenants' requests of one id never share a link (the stream's events and
cancels name the id only), and on the node each runs under its own tenant's key.
"""

from __future__ import annotations

from collections.abc import Callable

from ultrakv.cluster.stream_link import Receiver, StreamLink
from ultrakv.v1 import node_pb2_grpc

__all__ = ["NodeLink", "Receiver"]


class NodeLink(StreamLink):
    """One GenerateMany call to a node. It half-closes as soon as it has nothing in flight:
    a node's idle limit (``stream_idle_timeout_s``, any positive time) must never end a link
    that a forward is about to use."""

    def __init__(self, stub: node_pb2_grpc.NodeServiceStub,
                 on_closed: Callable[[StreamLink], None]) -> None:
        super().__init__(stub.GenerateMany, on_closed)
