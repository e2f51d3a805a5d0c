"""Who may call a node: the cluster secret that every internal call carries.

A node that is a cluster member answers only its peers (coordinators and other nodes): every
call but the standard gRPC health check must carry the cluster secret in the
``x-ultrakv-cluster-secret`` metadata, compared in constant time before the handler runs
(so an unauthenticated call costs no parsing). Peers add it to every call on their channels
(cluster/peers.py). The secret lives in a file readable by its owner only: ``ultrakv serve``
generates one into its data dir, an operator gives one with ``--cluster-secret-file``. A
node or coordinator started by hand without one refuses to start
(:func:`require_cluster_secret`) unless told ``--insecure-no-cluster-secret``.

This interceptor is its own module so it composes with the client-facing ones (API keys,
rate limits) in one server's interceptor chain.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("ultrakv.cluster.peer_auth")

SECRET_METADATA_KEY = "x-ultrakv-cluster-secret"
SECRET_MIN_CHARS = 16
HEALTH_SERVICE = "grpc.health.v1.Health"  # load balancers and the coordinator probe it
_DENIED = "the cluster secret is missing or wrong: only cluster peers may call this node"


def read_cluster_secret(path: str | Path) -> str:
    """The secret in ``path`` (surrounding whitespace dropped); at least 16 characters."""
    path = Path(path)
    secret = path.read_text(encoding="utf-8").strip()
    if len(secret) < SECRET_MIN_CHARS:
        raise ValueError(f"cluster secret in {path} must be at least {SECRET_MIN_CHARS} "
                         f"characters, got {len(secret)}")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("cluster secret file %s is readable by other users; chmod 600 it", path)
    return secret


def ensure_cluster_secret(path: str | Path) -> Path:
    """Create ``path`` with a new random secret (mode 0600) unless it exists; return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


INSECURE_FLAG = "--insecure-no-cluster-secret"


def require_cluster_secret(secret_file: str, insecure: bool, process: str) -> None:
    """Refuse to start ``process`` (``ultrakv node`` / ``ultrakv coordinator``) without a
    cluster secret, unless ``insecure`` (the operator said so): a node without one lets
    anyone who reaches its port read, overwrite and delete every session."""
    if secret_file:
        return
    if insecure:
        log.warning("%s runs WITHOUT a cluster secret (%s): anyone who reaches a node's port "
                    "can read, overwrite and delete every session; for local development only",
                    process, INSECURE_FLAG)
        return
    raise ValueError(
        f"{process}: no cluster secret: give --cluster-secret-file FILE (or the "
        "ULTRAKV_CLUSTER_SECRET_FILE environment variable, or server.cluster_secret_file in a "
        "node's --config), the same file of at least 16 random characters, mode 0600, on every "
        "node and coordinator (e.g. `head -c 32 /dev/urandom | base64 > FILE && chmod 600 FILE`); "
        f"or, for local development only, {INSECURE_FLAG}. "
        "(`ultrakv serve` generates one into its data dir.)")


def secret_matches(presented: str, secret: str) -> bool:
    """Constant-time comparison (a timing difference must not reveal a prefix)."""
    return hmac.compare_digest(presented.encode("utf-8"), secret.encode("utf-8"))


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that refuses the call without reading the request."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class ClusterSecretInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call without the cluster secret, except to the
    services in ``open_services``."""

    def __init__(self, secret: str, open_services: Iterable[str] = (HEALTH_SERVICE,)) -> None:
        if len(secret) < SECRET_MIN_CHARS:
            raise ValueError(f"cluster secret must be at least {SECRET_MIN_CHARS} characters")
        self._secret = secret
        self._open = frozenset(open_services)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        service = details.method.lstrip("/").split("/", 1)[0]
        if service in self._open:
            return await continuation(details)
        presented = next((v for k, v in details.invocation_metadata or ()
                          if k == SECRET_METADATA_KEY), "")
        handler = await continuation(details)
        if handler is None or (isinstance(presented, str) and secret_matches(presented, self._secret)):
            return handler
        return _deny(handler)


class _WithSecret:
    def __init__(self, secret: str) -> None:
        self._metadatum = (SECRET_METADATA_KEY, secret)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._metadatum)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)


class _UnaryUnary(_WithSecret, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return await continuation(self._details(details), request)


class _UnaryStream(_WithSecret, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return await continuation(self._details(details), request)


class _StreamUnary(_WithSecret, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return await continuation(self._details(details), requests)


class _StreamStream(_WithSecret, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return await continuation(self._details(details), requests)


def secret_interceptors(secret: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add the cluster secret to every call on a peer channel (one
    per call shape: grpc.aio files each interceptor under the first shape it implements)."""
    return [cls(secret) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
