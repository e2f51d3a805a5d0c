"""Many requests on one GenerateMany stream: a coordinator's to a node, a client's to its server.

Each request on a call of its own costs every process it crosses a new call (the call's
setup, its security checks, a handler task) and then one gRPC message per event, paid by
the writer and by the reader (a batch started in gRPC's core, its completion, a wake-up of
the event loop). On one GenerateMany stream the requests go in as messages of the stream
and the server writes every event pending at a write as one ``GenerateBatch``, so an engine
step's tokens for 64 requests cross as one message instead of 64. A link sends its requests
and cancels in, and hands each event to the receiver of its request id; everything per
request (deadlines, retries, resume, usage) stays its caller's.

A server runs one request per id on a stream, so a link takes a request only while no
request of the same id runs on it (its owner opens another link beside it otherwise: two
callers may choose the same id). A link half-closes once it has had nothing in flight for
``linger_s`` (0: at once): a caller at rest holds no stream open, and the server's idle
limit never ends one under a request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc
from ultrakv.v1 import types_pb2 as pb


class Receiver:
    """One request's events, as an async iterator: it ends (StopAsyncIteration) when the
    stream ends cleanly before the request's final event, and raises the stream's error when
    it fails (or the error :meth:`end` was given, e.g. its caller's deadline)."""

    __slots__ = ("_events", "_waiter", "_ended", "_error", "started")

    def __init__(self) -> None:
        self._events: deque[pb.GenerateStreamResponse] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._error: grpc.aio.AioRpcError | None = None
        self.started = False  # an event came for it

    def put(self, event: pb.GenerateStreamResponse) -> None:
        if self._ended:
            return
        self.started = True
        self._events.append(event)
        self._wake()

    def end(self, error: grpc.aio.AioRpcError | None) -> None:
        """No more events: those queued are still read, then ``error`` is raised (None:
        the iteration ends)."""
        if self._ended:
            return
        self._ended, self._error = True, error
        self._wake()

    def fail(self, error: grpc.aio.AioRpcError) -> None:
        """End now with ``error``, dropping the events not read yet (its caller's deadline
        passed: it must not wait behind a backlog)."""
        self._events.clear()
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


def local_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An error as a failed call would raise it, for a receiver its caller ends."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class StreamLink:
    """One GenerateMany call: requests and cancels written in order, events dispatched to
    their requests' receivers. ``open_call`` opens the call (a stub's ``GenerateMany`` with
    the caller's metadata); ``on_closed`` hears when the link has ended.

    When a server ends the call as a message goes out (UNIMPLEMENTED from an older server),
    gRPC's failed write can turn the call's status into INTERNAL ("Internal error from
    Core", a third to a half of the tries here), hiding the server's: ``heard`` tells its
    owner whether the server ever answered on this link, so an INTERNAL on a link that never
    heard from it is taken as that (the request goes on a call of its own)."""

    def __init__(self, open_call: Callable[[], Any],
                 on_closed: Callable[[StreamLink], None], linger_s: float = 0.0) -> None:
        self._outgoing: asyncio.Queue[pb.GenerateStreamRequest | None] = asyncio.Queue()
        self._receivers: dict[str, Receiver] = {}
        self._running: set[str] = set()  # ids the server runs for us (until their final event)
        self.closing = False
        self._on_closed = on_closed
        self._linger_s = linger_s
        self._idle_timer: asyncio.TimerHandle | None = None
        self.heard = False  # a message came from the server
        self._call = open_call()
        self._writer = asyncio.create_task(self._write(), name="stream-link-writer")
        self._reader = asyncio.create_task(self._read(), name="stream-link")

    def accepts(self, request_id: str) -> bool:
        return not self.closing and request_id not in self._running

    def submit(self, message: pb.GenerateStreamRequest) -> Receiver:
        """Send ``message`` (a generate action): its events come to the receiver returned."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        rid = message.generate.request_id
        receiver = self._receivers[rid] = Receiver()
        self._running.add(rid)
        self._outgoing.put_nowait(message)
        return receiver

    def release(self, request_id: str, receiver: Receiver) -> None:
        """The caller that got ``receiver`` is done with it: its request is cancelled on the
        server if it still runs. Nothing when a later request of the same id took the id
        since (this one had its final event): that one's receiver and request stay."""
        if self._receivers.get(request_id) is not receiver:
            return
        del self._receivers[request_id]
        if request_id in self._running and not self.closing:
            self._outgoing.put_nowait(pb.GenerateStreamRequest(
                cancel=pb.CancelRequest(request_id=request_id)))
        self._idle()

    def close(self) -> None:
        """End the call now (its server was marked down, its owner closes): receivers fail
        with CANCELLED."""
        self.closing = True
        self._call.cancel()

    def _in_use(self) -> bool:
        return bool(self._receivers or self._running or self.closing)

    def _idle(self) -> None:
        if self._in_use():
            return
        if self._linger_s <= 0:
            self._half_close()
        elif self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(self._linger_s, self._half_close)

    def _half_close(self) -> None:
        self._idle_timer = None
        if not self._in_use():
            self.closing = True
            self._outgoing.put_nowait(None)  # half-close: the server ends the stream

    async def _write(self) -> None:
        try:
            while (message := await self._outgoing.get()) is not None:
                await self._call.write(message)
            await self._call.done_writing()  # half-close: the server ends the stream
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call has ended: its reader hears how

    async def _read(self) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            while (batch := await self._call.read()) is not grpc.aio.EOF:
                self.heard = True
                later: list[tuple[Receiver, pb.GenerateStreamResponse]] = []
                first = False
                for event in batch.events:
                    rid = event.request_id
                    receiver = self._receivers.get(rid)
                    if event.WhichOneof("event") != "chunk":
                        self._running.discard(rid)
                        if receiver is None:  # a cancelled request's end
                            self._idle()
                    if receiver is None:
                        continue
                    if receiver.started:
                        later.append((receiver, event))
                    else:
                        first = True
                        receiver.put(event)
                if first and later:
                    # A request's first event goes ahead of the batch's others, and its relay
                    # runs before theirs are handed over: its caller (a coordinator's forward,
                    # then its client stream's writer) is woken before the callers of the
                    # running requests, so its first token does not wait for the relay of all
                    # their tokens.
                    await asyncio.sleep(0)
                for receiver, event in later:
                    receiver.put(event)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except BaseException:  # the call cancelled (close()): its receivers fail, not end
            error = local_error(grpc.StatusCode.CANCELLED, "the stream was closed")
            raise
        finally:
            self.closing = True
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            self._outgoing.put_nowait(None)  # the writer ends, if it has not
            self._writer.cancel()
            for receiver in self._receivers.values():
                receiver.end(error)
            self._receivers.clear()
            with contextlib.suppress(Exception):
                self._on_closed(self)
