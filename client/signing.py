"""Request signing in the client: channel interceptors that add the signature headers of
cluster/security/signing.py to every call (a fresh timestamp and nonce per attempt, so a
retried call is signed anew)."""

from __future__ import annotations

import collections
from typing import Any

import grpc
from ultrakv.cluster.security.signing import signature_headers


def _method(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


def _body(request: Any) -> bytes:
    # What grpc sends for a unary request; a stream's signature covers its opening only.
    return request.SerializeToString() if hasattr(request, "SerializeToString") else b""


# Bidirectional methods the client opens as unary-stream calls (client.py: one request and
# its half-close leave in the call's first batch). The server checks them as the streams
# they are, over an empty body.
GENERATE_METHOD = "/ultrakv.v1.UltraKV/Generate"
ONE_REQUEST_STREAMS = frozenset({GENERATE_METHOD})


def _unary_stream_body(details: Any, request: Any) -> bytes:
    return b"" if _method(details) in ONE_REQUEST_STREAMS else _body(request)


class _Details(collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                     "compression")), grpc.ClientCallDetails):
    pass


class SigningInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                         grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Signs every call of a blocking channel with ``secret``."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def _signed(self, details: grpc.ClientCallDetails, body: bytes) -> _Details:
        metadata = list(details.metadata or ()) + signature_headers(self.secret, _method(details), body)
        return _Details(details.method, details.timeout, metadata, details.credentials,
                        details.wait_for_ready, getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._signed(client_call_details, _body(request)), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._signed(client_call_details,
                                         _unary_stream_body(client_call_details, request)), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._signed(client_call_details, b""), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._signed(client_call_details, b""), request_iterator)


class _AioSigning:
    def __init__(self, secret: str) -> None:
        self.secret = secret

    def _signed(self, details: grpc.aio.ClientCallDetails, body: bytes) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in signature_headers(self.secret, _method(details), body):
            metadata.add(key, value)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)


class AioUnarySigning(_AioSigning, grpc.aio.UnaryUnaryClientInterceptor):
    """Signs every unary call of an asyncio channel."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._signed(client_call_details, _body(request)), request)


class AioUnaryStreamSigning(_AioSigning, grpc.aio.UnaryStreamClientInterceptor):
    """Signs every unary-stream call of an asyncio channel (a one-request Generate stream)."""

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(
            self._signed(client_call_details, _unary_stream_body(client_call_details, request)),
            request)


class AioStreamSigning(_AioSigning, grpc.aio.StreamStreamClientInterceptor):
    """Signs every bidirectional stream of an asyncio channel."""

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._signed(client_call_details, b""), request_iterator)


def aio_interceptors(secret: str | None) -> list[Any]:
    return ([AioUnarySigning(secret), AioUnaryStreamSigning(secret), AioStreamSigning(secret)]
            if secret else [])
