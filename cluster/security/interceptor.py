"""The edge as a gRPC server interceptor on the client-facing ``ultrakv.v1.UltraKV`` methods.

Every call is checked (IP rules, key, signature, role) on its raw bytes: the interceptor
swaps the method's deserializer for the identity and parses only after the checks pass, so
an unauthenticated caller costs no parsing. Requests that generate then pass the rate
limits and take a running slot of their tenant (each request of a Generate stream on its
own: a refused one is answered on the stream, which carries on); the slot is given back
when the request's result or error leaves. The principal is set for the handler
(principal.py), which stamps the tenant on every request.

Server reflection is guarded too: only an admin key may list the server's services
(with no keys file every caller is the open edge's admin, as for ClearCache).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from ultrakv.cluster.security.policy import (
    ADMIN_SERVICES,
    Denied,
    EdgeSecurity,
    estimated_tokens,
    grpc_service,
)
from ultrakv.cluster.security.principal import Principal, reset_principal, set_principal
from ultrakv.cluster.service import ULTRAKV_SERVICE, abort_with
from ultrakv.cluster.validation import Admitting, Limits, Malformed, Refused
from ultrakv.v1 import types_pb2 as pb

_PREFIX = f"/{ULTRAKV_SERVICE}/"


def _headers(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class EdgeSecurityInterceptor(grpc.aio.ServerInterceptor):
    """Applies :class:`EdgeSecurity` to the UltraKV service and the admin-only services
    (reflection); other services pass through (health stays open for probes; NodeService
    has its own guard)."""

    def __init__(self, security: EdgeSecurity, limits: Limits | None = None) -> None:
        self.security = security
        self.default_max_length = (limits or Limits()).default_max_length

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        if grpc_service(details.method) in ADMIN_SERVICES:
            return self._admin_only(handler, details.method)
        if not details.method.startswith(_PREFIX):
            return handler
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler, details.method),
                response_serializer=handler.response_serializer)
        if not handler.request_streaming and not handler.response_streaming:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler, details.method),
                response_serializer=handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(handler, details.method),
                response_serializer=handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(
            self._stream_unary(handler, details.method),
            response_serializer=handler.response_serializer)

    async def _check(self, context: grpc.aio.ServicerContext, method: str,
                     body: bytes) -> Principal:
        try:
            return self.security.check_call(method, _headers(context), context.peer(), body)
        except Denied as denied:
            await abort_with(context, denied)
            raise  # abort raises; this line only satisfies the type checker

    def _admin_only(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """``handler`` (a bidi stream: reflection) behind the key and role check, made before
        the first request message is read."""
        if not (handler.request_streaming and handler.response_streaming):
            raise TypeError(f"{method}: admin-only services are bidi streams here")

        async def behavior(requests: AsyncIterator[Any],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._check(context, method, b"")
            async with contextlib.aclosing(handler.stream_stream(requests, context)) as out:
                async for response in out:
                    yield response

        return grpc.stream_stream_rpc_method_handler(
            behavior, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _unary(self, handler: grpc.RpcMethodHandler, method: str) -> Callable[..., Awaitable[Any]]:
        security, deserialize = self.security, handler.request_deserializer

        async def behavior(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            principal = await self._check(context, method, raw)
            request = deserialize(raw) if deserialize else raw
            peer = context.peer()
            slot = False
            token = set_principal(principal)
            try:
                if isinstance(request, pb.GenerateRequest | pb.BatchRequest):
                    items = [request] if isinstance(request, pb.GenerateRequest) else request.requests
                    security.admit(principal, peer, requests=max(1, len(items)), method=method,
                                   tokens=sum(estimated_tokens(r, self.default_max_length) for r in items))
                    await security.acquire_slot(principal, peer, method)
                    slot = True
                elif not isinstance(request, Malformed):
                    security.admit(principal, peer, method=method)
                return await handler.unary_unary(request, context)
            except Denied as denied:
                await abort_with(context, denied)
            finally:
                reset_principal(token)
                if slot:
                    security.release_slot(principal)

        return behavior

    def _unary_stream(self, handler: grpc.RpcMethodHandler,
                      method: str) -> Callable[..., AsyncIterator[Any]]:
        """One request, a streamed answer (a backup): the call is checked and admitted once."""
        security, deserialize = self.security, handler.request_deserializer

        async def behavior(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            principal = await self._check(context, method, raw)
            request = deserialize(raw) if deserialize else raw
            try:
                security.admit(principal, context.peer(), method=method)
            except Denied as denied:
                await abort_with(context, denied)
            set_principal(principal)  # not reset: as in _stream, cleanup may run elsewhere
            async with contextlib.aclosing(handler.unary_stream(request, context)) as out:
                async for response in out:
                    yield response

        return behavior

    def _stream_unary(self, handler: grpc.RpcMethodHandler,
                      method: str) -> Callable[..., Awaitable[Any]]:
        """A streamed request, one answer (a restore): the call is checked and admitted once."""
        security, deserialize = self.security, handler.request_deserializer

        async def behavior(raw_requests: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> Any:
            principal = await self._check(context, method, b"")
            token = set_principal(principal)
            try:
                security.admit(principal, context.peer(), method=method)
                requests = (deserialize(raw) if deserialize else raw async for raw in raw_requests)
                return await handler.stream_unary(requests, context)
            except Denied as denied:
                await abort_with(context, denied)
            finally:
                reset_principal(token)

        return behavior

    def _stream(self, handler: grpc.RpcMethodHandler, method: str) -> Callable[..., AsyncIterator[Any]]:
        security, deserialize = self.security, handler.request_deserializer
        default_max_length = self.default_max_length

        async def behavior(raw_requests: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            principal = await self._check(context, method, b"")
            peer = context.peer()
            holding: set[str] = set()  # request ids holding a tenant slot
            admitting: set[str] = set()  # request ids waiting for one (in their own task)
            # Errors the servicer will send under the id of a request holding a slot (a
            # duplicate id, a malformed message): not that request's end.
            foreign_errors: dict[str, int] = {}

            async def requests() -> AsyncIterator[Any]:
                async for raw in raw_requests:
                    message = deserialize(raw) if deserialize else raw
                    if isinstance(message, Malformed) and message.request_id in holding:
                        foreign_errors[message.request_id] = foreign_errors.get(message.request_id, 0) + 1
                    if (isinstance(message, pb.GenerateStreamRequest)
                            and message.WhichOneof("action") == "generate"):
                        rid = message.generate.request_id
                        try:
                            if rid in holding or rid in admitting:  # the servicer answers the duplicate id
                                foreign_errors[rid] = foreign_errors.get(rid, 0) + 1
                                yield message
                                continue
                            security.admit(principal, peer, method=method, tokens=estimated_tokens(
                                message.generate, default_max_length))
                        except Denied as denied:
                            message = Refused(rid, denied)
                        else:
                            # The slot is taken in the request's own task (the servicer awaits
                            # it): one queued request must not hold up this stream's later
                            # messages, its cancels among them.
                            admitting.add(rid)
                            message = Admitting(message, functools.partial(take_slot, rid))
                    yield message

            async def take_slot(rid: str) -> None:
                try:
                    await security.acquire_slot(principal, peer, method)
                    holding.add(rid)  # no await between: a cancel cannot leave it untracked
                finally:
                    admitting.discard(rid)

            # Not reset afterwards: a generator's cleanup may run in another context (closed
            # from elsewhere when the client goes), and this call's context ends with it.
            set_principal(principal)

            def sent(response: pb.GenerateStreamResponse) -> None:
                rid = response.request_id
                event = response.WhichOneof("event")
                if event == "error" and foreign_errors.get(rid):
                    foreign_errors[rid] -= 1
                elif event in ("result", "error"):
                    if rid in holding:
                        holding.discard(rid)
                        security.release_slot(principal)
                    admitting.discard(rid)  # refused before it asked for a slot

            try:
                async with contextlib.aclosing(handler.stream_stream(requests(), context)) as out:
                    async for response in out:
                        if isinstance(response, pb.GenerateBatch):  # GenerateMany
                            for event in response.events:
                                sent(event)
                        else:
                            sent(response)
                        yield response
            finally:
                for _ in holding:
                    security.release_slot(principal)
                holding.clear()

        return behavior
