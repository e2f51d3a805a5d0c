"""A coordinator's requests to one node on one stream (``NodeService.GenerateMany``).

Forwarded on calls of their own, 64 requests cost the node and the coordinator 64 gRPC
messages per engine step, each paid in both processes (a batch started in gRPC's core, its
completion, a wake-up of the event loop). On one stream the node writes every event pending
at a write as one message (a ``GenerateBatch``), so a step's tokens for all of them cross as
one message. A link sends its requests and cancels in, and hands each event to the receiver
of its request id; everything per request (deadlines, resume, usage) stays the forward's.

A node runs one request per id on a stream, so a link takes a request only while no request
of the same id runs on it (another link opens beside it otherwise: two clients may choose
the same id, of one tenant or of two; the stream's events and cancels name the id only, so
two tenants' requests of one id never share a link, and on the node each runs under its
own tenant's key). A link half-closes once it has nothing in flight: a coordinator at rest
holds no stream open, and the node's idle limit never ends one under a request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable

import grpc
from ultrakv.v1 import node_pb2_grpc
from ultrakv.v1 import types_pb2 as pb


class Receiver:
    """One request's events, as an async iterator: it ends (StopAsyncIteration) when the
    stream ends cleanly before the request's final event, and raises the stream's error when
    it fails."""

    __slots__ = ("_events", "_waiter", "_ended", "_error", "started")

    def __init__(self) -> None:
        self._events: deque[pb.GenerateStreamResponse] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._error: grpc.aio.AioRpcError | None = None
        self.started = False  # an event came for it

    def put(self, event: pb.GenerateStreamResponse) -> None:
        self.started = True
        self._events.append(event)
        self._wake()

    def end(self, error: grpc.aio.AioRpcError | None) -> None:
        self._ended, self._error = True, error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> Receiver:
        return self

    async def __anext__(self) -> pb.GenerateStreamResponse:
        while not self._events:
            if self._ended:
                if self._error is not None:  # a copy each: receivers raise it in their own tasks
                    e = self._error
                    raise grpc.aio.AioRpcError(e.code(), e.initial_metadata(), e.trailing_metadata(),
                                               e.details(), e.debug_error_string())
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._events.popleft()


class NodeLink:
    """One GenerateMany call to a node: requests and cancels written in order, events
    dispatched to their requests' receivers. ``on_closed`` hears when it has ended."""

    def __init__(self, stub: node_pb2_grpc.NodeServiceStub,
                 on_closed: Callable[[NodeLink], None]) -> None:
        self._outgoing: asyncio.Queue[pb.GenerateStreamRequest | None] = asyncio.Queue()
        self._receivers: dict[str, Receiver] = {}
        self._running: set[str] = set()  # ids the node runs for us (until their final event)
        self.closing = False
        self._on_closed = on_closed
        self._call = stub.GenerateMany(self._requests())
        self._reader = asyncio.create_task(self._read(), name="node-link")

    def accepts(self, request_id: str) -> bool:
        return not self.closing and request_id not in self._running

    def submit(self, message: pb.GenerateStreamRequest) -> Receiver:
        """Send ``message`` (a generate action): its events come to the receiver returned."""
        rid = message.generate.request_id
        receiver = self._receivers[rid] = Receiver()
        self._running.add(rid)
        self._outgoing.put_nowait(message)
        return receiver

    def release(self, request_id: str, receiver: Receiver) -> None:
        """The forward that got ``receiver`` is over: cancelled on the node if it still runs.
        Nothing when a later forward of the same id took the id since (this one had its
        final event): that one's receiver and its request on the node stay."""
        if self._receivers.get(request_id) is not receiver:
            return
        del self._receivers[request_id]
        if request_id in self._running and not self.closing:
            self._outgoing.put_nowait(pb.GenerateStreamRequest(
                cancel=pb.CancelRequest(request_id=request_id)))
        self._close_if_idle()

    def close(self) -> None:
        """End the call now (the node was marked down): receivers fail with CANCELLED."""
        self.closing = True
        self._call.cancel()

    def _close_if_idle(self) -> None:
        if not self._receivers and not self._running and not self.closing:
            self.closing = True
            self._outgoing.put_nowait(None)  # half-close: the node ends the stream

    async def _requests(self) -> AsyncIterator[pb.GenerateStreamRequest]:
        while (message := await self._outgoing.get()) is not None:
            yield message

    async def _read(self) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            async for batch in self._call:
                later: list[tuple[Receiver, pb.GenerateStreamResponse]] = []
                first = False
                for event in batch.events:
                    rid = event.request_id
                    receiver = self._receivers.get(rid)
                    if event.WhichOneof("event") != "chunk":
                        self._running.discard(rid)
                        if receiver is None:  # a cancelled request's end
                            self._close_if_idle()
                    if receiver is None:
                        continue
                    if receiver.started:
                        later.append((receiver, event))
                    else:
                        first = True
                        receiver.put(event)
                if first and later:
                    # A request's first event goes ahead of the batch's others, and its relay
                    # runs before theirs are handed over: its forward and then its client
                    # stream's writer are woken before the forwards of the running requests,
                    # so its first token does not wait for the relay of all their tokens.
                    await asyncio.sleep(0)
                for receiver, event in later:
                    receiver.put(event)
        except grpc.aio.AioRpcError as exc:
            error = exc
        finally:
            self.closing = True
            self._outgoing.put_nowait(None)  # the request iterator ends, if it has not
            for receiver in self._receivers.values():
                receiver.end(error)
            self._receivers.clear()
            with contextlib.suppress(Exception):
                self._on_closed(self)
