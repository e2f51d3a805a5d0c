"""gRPC channels to nodes, one per address, shared by everything in a process that calls
nodes (the coordinator's forwarding and resharding, a node's replication)."""

from __future__ import annotations

import grpc
from ultrakv.v1 import node_pb2_grpc

# Session KV moves node to node in chunks; the default 4 MiB limit is too small for a chunk
# plus framing on big models, and a restarted peer must be reachable again within a second.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class PeerChannels:
    """``NodeService`` stubs by address, created on first use (grpc.aio; one event loop)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, node_pb2_grpc.NodeServiceStub] = {}

    def stub(self, address: str) -> node_pb2_grpc.NodeServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
            stub = self._stubs[address] = node_pb2_grpc.NodeServiceStub(channel)
        return stub

    async def forget(self, address: str) -> None:
        """Close the channel to a node that left."""
        self._stubs.pop(address, None)
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        for address in list(self._channels):
            await self.forget(address)
