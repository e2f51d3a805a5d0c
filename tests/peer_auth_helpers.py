"""Test helper: a sync channel whose every call carries the cluster secret, as a peer's."""

from __future__ import annotations

import grpc
from ultrakv.cluster.peer_auth import SECRET_METADATA_KEY


class _WithSecret(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, secret: str) -> None:
        self.secret = secret

    def _details(self, details):
        metadata = [*(details.metadata or ()), (SECRET_METADATA_KEY, self.secret)]
        return _Details(details.method, details.timeout, metadata, details.credentials,
                        details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = (credentials, wait_for_ready,
                                                                    compression)


def secret_channel(address: str, secret: str) -> grpc.Channel:
    """An insecure channel to ``address`` sending ``secret`` on every call."""
    return grpc.intercept_channel(grpc.insecure_channel(address), _WithSecret(secret))
