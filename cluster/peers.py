"""gRPC channels to nodes, one per address, shared by everything in a process that calls
nodes (the coordinator's forwarding and resharding, a node's replication).

Every call carries the cluster secret when one is configured (cluster/peer_auth.py); with
:class:`PeerTLS` the channels speak mutual TLS, presenting this process's certificate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from ultrakv.cluster.peer_auth import secret_interceptors
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


@dataclass(frozen=True)
class PeerTLS:
    """Mutual TLS between cluster members: PEM paths of the CA that signs every member's
    certificate, and this member's certificate and key (it serves and dials with them).
    ``server_name`` overrides the name checked in a peer's certificate (peers are dialed by
    address; certificates often name hosts)."""

    ca_cert: str
    cert: str
    key: str
    server_name: str = ""

    def __post_init__(self) -> None:
        for field in ("ca_cert", "cert", "key"):
            if not getattr(self, field):
                raise ValueError(f"peer TLS needs {field} (a PEM file path)")

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return (Path(self.ca_cert).read_bytes(), Path(self.cert).read_bytes(),
                Path(self.key).read_bytes())

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve with this member's certificate; require a client certificate of the CA."""
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)


class PeerChannels:
    """``NodeService`` stubs by address, created on first use (grpc.aio; one event loop)."""

    def __init__(self, secret: str = "", tls: PeerTLS | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, node_pb2_grpc.NodeServiceStub] = {}
        self._interceptors = secret_interceptors(secret) if secret else []
        self._credentials = tls.channel_credentials() if tls is not None else None

    def stub(self, address: str) -> node_pb2_grpc.NodeServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials,
                                                  options=CHANNEL_OPTIONS,
                                                  interceptors=self._interceptors)
            else:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS,
                                                    interceptors=self._interceptors)
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
