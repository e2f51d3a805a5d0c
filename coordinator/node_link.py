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


# How long a link stays open with nothing in flight: at low load a request then finds the
# link open instead of opening a call (0.84 against 0.37 ms from the link's write to the
# node's accept, H100 hop trace). Far below a node's idle limit as deployed
# (stream_idle_timeout_s, 300 s by default); a node set below it may close the link as a
# request goes out, and the forward sends it again on a new one.
LINGER_S = 5.0


class NodeLink(StreamLink):
    """One GenerateMany call to a node."""

    def __init__(self, stub: node_pb2_grpc.NodeServiceStub,
                 on_closed: Callable[[StreamLink], None], linger_s: float = LINGER_S) -> None:
        super().__init__(stub.GenerateMany, on_closed, linger_s)
