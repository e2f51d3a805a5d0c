"""The client-facing ``ultrakv.v1.UltraKV`` service, shared by nodes and coordinators.

The servicer is a thin adapter over a :class:`ServingBackend` (generate stream, stats, cache
and session operations, all in wire messages): a node implements it over its in-process
Engine, the coordinator by forwarding to nodes. Validation happens here, at the edge
(cluster/validation.py); every failure becomes a status (unary) or a per-request
:class:`ErrorDetail` (stream, batch) naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf import message_factory
from ultrakv.cluster.errors import EngineError
from ultrakv.cluster.rejections import REJECTIONS
from ultrakv.cluster.security.principal import OPEN, Principal, current_principal
from ultrakv.cluster.session_keys import SEPARATOR, session_key
from ultrakv.cluster.session_transfer import TransferError, session_runs
from ultrakv.cluster.validation import (
    NODE_FAILING_FIELD,
    Admitting,
    Limits,
    Malformed,
    Refused,
    RequestRejected,
    rejection_for_client,
    rejection_from_error,
    request_deadline,
    tolerant_deserializer,
    validate_batch,
    validate_generate,
    validate_max_age,
    validate_session_id,
    validate_session_key,
)
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2

log = logging.getLogger("ultrakv.service")

ULTRAKV_SERVICE = "ultrakv.v1.UltraKV"

Event = pb.TokenChunk | pb.GenerateResult


class TokenSink(Protocol):
    """Where a backend pushes a request's new tokens, in order, on the event loop."""

    def chunk(self, token_ids: Sequence[int], text: str) -> None: ...


class ServingBackend(Protocol):
    """What the client-facing service needs from whatever serves requests.

    ``generate`` receives a validated, normalized request and yields token chunks then one
    final result. Closing the iterator early (cancel, disconnect) must abort the request and
    free its blocks. Errors are raised as node errors (node/errors.py), RequestRejected or
    ValueError; the servicer maps them to statuses.

    ``generate_into`` serves the same request pushed: each chunk's ids and text go to
    ``sink`` as they come, and the final result (None: the request ended without one) is
    returned; cancelling it aborts the request. A Generate stream runs on it, so a backend
    that has tokens in a callback (a node's engine) hands them over without a task switch
    or a protobuf per token. A backend implements one of the two and derives the other
    (:func:`events_of`, :func:`push_events`).
    """

    def generate(self, request: pb.GenerateRequest,
                 deadline: float | None) -> AsyncIterator[Event]: ...

    async def generate_into(self, request: pb.GenerateRequest, deadline: float | None,
                            sink: TokenSink) -> pb.GenerateResult | None: ...

    async def stats(self) -> pb.StatsResponse: ...

    async def clear_cache(self) -> int: ...

    async def cleanup_sessions(self, max_age_s: float) -> int: ...

    async def get_session(self, session_id: str, tenant: str | None) -> pb.SessionInfo: ...

    async def delete_session(self, session_id: str, tenant: str | None) -> None: ...

    def export_sessions(self, history_only: bool) -> AsyncIterator[ultrakv_pb2.BackupPart]:
        """A backup: the header, then every served session's chunk run."""
        ...

    async def import_sessions(self, runs: AsyncIterator[list[npb.SessionChunk]]
                              ) -> ultrakv_pb2.ImportSessionsResponse:
        """A restore: each session run imported on its owner."""
        ...


# --- the Generate stream ---------------------------------------------------------------------


async def push_events(events: AsyncIterator[Event], sink: TokenSink) -> pb.GenerateResult | None:
    """``generate_into`` over a ``generate``: the chunks of ``events`` into ``sink``, then
    their result."""
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, pb.TokenChunk):
                sink.chunk(event.token_ids, event.text)
            else:
                return event
    return None


class _QueueSink:
    def __init__(self, queue: asyncio.Queue[pb.TokenChunk | None]) -> None:
        self.queue = queue

    def chunk(self, token_ids: Sequence[int], text: str) -> None:
        self.queue.put_nowait(pb.TokenChunk(text=text, token_ids=token_ids))


async def events_of(generate_into: Callable[[TokenSink], Awaitable[pb.GenerateResult | None]]
                    ) -> AsyncIterator[Event]:
    """``generate`` over a ``generate_into`` (given its sink): the pushed chunks, then the
    result; closing the iterator early cancels the request."""
    queue: asyncio.Queue[pb.TokenChunk | None] = asyncio.Queue()
    task = asyncio.ensure_future(generate_into(_QueueSink(queue)))
    task.add_done_callback(lambda _: queue.put_nowait(None))  # after every chunk it pushed
    try:
        while (chunk := await queue.get()) is not None:
            yield chunk
        result = task.result()  # raises the request's error
        if result is not None:
            yield result
    finally:
        # The caller left early: whatever the request ended with is nobody's to raise (and
        # is not logged as an exception never retrieved).
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        elif not task.cancelled():
            task.exception()


class _PendingChunk:
    """The not-yet-sent tokens of one request, kept as Python values until written."""

    __slots__ = ("request_id", "token_ids", "texts", "urgent")

    def __init__(self, request_id: str, urgent: bool) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = []
        self.texts: list[str] = []
        self.urgent = urgent  # it holds the request's first tokens

    def fill(self, message: pb.GenerateStreamResponse) -> pb.GenerateStreamResponse:
        # In place: a TokenChunk built apart and passed to the constructor is copied into the
        # message, which took 11 us a message instead of 2 (upb, measured).
        message.request_id = self.request_id
        chunk = message.chunk
        chunk.text = "".join(self.texts)
        chunk.token_ids.extend(self.token_ids)
        return message


class Outbox:
    """Outgoing messages of one Generate stream, in order, merging the not-yet-sent chunks of
    a request: when the reader is slower than the engine, several deltas leave as one chunk.
    A pending chunk becomes a protobuf only when it is written. A request's first tokens and
    its final message are urgent: they end a gathering wait (TTFT and the end of a request
    never pay for coalescing, even on a stream that carries many requests)."""

    def __init__(self) -> None:
        self._queue: OrderedDict[int, pb.GenerateStreamResponse | _PendingChunk] = OrderedDict()
        self._open_chunk: dict[str, int] = {}  # request id -> key of its unsent chunk
        self._next = 0
        self._ready = asyncio.Event()
        self._urgent = 0  # urgent messages queued
        self._gathering: asyncio.Future[None] | None = None  # what gather() waits on

    def put_chunk(self, request_id: str, token_ids: Sequence[int], text: str,
                  first: bool = False) -> None:
        """A request's new tokens (``first``: its first)."""
        key = self._open_chunk.get(request_id)
        pending = self._queue.get(key) if key is not None else None
        if pending is None:
            pending = _PendingChunk(request_id, first)
            self._open_chunk[request_id] = self._push(pending)
            if first:
                self._urgent_queued()
        pending.token_ids.extend(token_ids)
        pending.texts.append(text)

    def put_final(self, message: pb.GenerateStreamResponse) -> None:
        self._open_chunk.pop(message.request_id, None)
        self._push(message)
        self._urgent_queued()

    def _urgent_queued(self) -> None:
        self._urgent += 1
        if self._gathering is not None and not self._gathering.done():
            self._gathering.set_result(None)

    def _push(self, message: pb.GenerateStreamResponse | _PendingChunk) -> int:
        key = self._next
        self._next += 1
        self._queue[key] = message
        self._ready.set()
        return key

    def pop(self) -> pb.GenerateStreamResponse | None:
        if not self._queue:
            return None
        message = self._queue.popitem(last=False)[1]
        if isinstance(message, _PendingChunk):
            self._urgent -= message.urgent
            return message.fill(pb.GenerateStreamResponse())
        self._urgent -= 1
        return message

    def pop_into(self, events: Any, max_bytes: int) -> bool:
        """Queued messages, in order, into ``events`` (a repeated GenerateStreamResponse
        field: a GenerateBatch's) until they hold ``max_bytes`` (at least one message; the
        rest stay queued); True when a chunk was among them."""
        chunk = False
        size = 0
        while self._queue and size < max_bytes:
            message = self._queue.popitem(last=False)[1]
            if isinstance(message, _PendingChunk):
                self._urgent -= message.urgent
                size += message.fill(events.add()).ByteSize()
                chunk = True
            else:
                self._urgent -= 1
                size += message.ByteSize()
                events.append(message)
        return chunk

    async def wait(self) -> None:
        await self._ready.wait()
        self._ready.clear()

    def wake(self) -> None:
        self._ready.set()

    async def gather(self, timeout_s: float) -> None:
        """Let chunks gather for ``timeout_s`` after a write, but no longer than until an
        urgent message is queued (one queued already ends it at once). A plain timer on a
        future, not ``asyncio.timeout``: this runs after every message written, and a timeout
        that expires costs a cancellation and two exceptions."""
        if self._urgent:
            return
        loop = asyncio.get_running_loop()
        gathering = self._gathering = loop.create_future()
        timer = loop.call_later(timeout_s, _resolve, gathering)
        try:
            await gathering
        finally:
            timer.cancel()
            self._gathering = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _error_response(request_id: str, rejection: RequestRejected) -> pb.GenerateStreamResponse:
    REJECTIONS.record(rejection.code)
    return pb.GenerateStreamResponse(request_id=request_id, error=rejection.to_detail())


def _rpc_deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


DEFAULT_FLUSH_INTERVAL_S = 0.005
# A GenerateBatch holds events up to about this size, the rest go in the next one: far below
# any message limit a server or channel sets (64 MiB by default, 4 MiB gRPC's own), so 64
# long results finishing in one step cannot fail a coordinator's whole stream to a node.
MAX_BATCH_BYTES = 1 << 20
# Messages per second a server aims at across all its Generate streams, and the longest a
# stream's tokens wait for company (see StreamPacer): the defaults of StreamPacing.
PACED_MESSAGES_PER_S = 2000.0
MAX_FLUSH_INTERVAL_S = 0.04
# What a server may be configured with (StreamPacing): below one message a second a stream
# is no longer a stream; beyond a second's wait text arrives in bursts nobody would call one.
MESSAGES_PER_S_RANGE = (1.0, 1_000_000.0)
MAX_WAIT_MS_RANGE = (0.0, 1000.0)


@dataclass(frozen=True)
class StreamPacing:
    """A server's budget of Generate stream messages (the config file's ``server`` keys
    ``stream_flush_interval_s``, ``stream_messages_per_s`` and ``stream_max_wait_ms``; the
    ``--stream-*`` flags of ``ultrakv node``, ``coordinator`` and ``serve``).

    Every message costs each process it crosses a fixed amount of CPU (docs/serving-overhead.md),
    so a server aims at ``messages_per_s`` in all, over however many streams are open; a
    stream's new tokens wait for company at least ``flush_interval_s`` (0 = coalescing off)
    and at most ``max_wait_ms`` (never below ``flush_interval_s``).
    """

    flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S
    messages_per_s: float = PACED_MESSAGES_PER_S
    max_wait_ms: float = MAX_FLUSH_INTERVAL_S * 1000

    def __post_init__(self) -> None:
        for name, value, (low, high), unit in (
                ("stream_messages_per_s", self.messages_per_s, MESSAGES_PER_S_RANGE, "messages/s"),
                ("stream_max_wait_ms", self.max_wait_ms, MAX_WAIT_MS_RANGE, "ms")):
            if not low <= value <= high:  # NaN included
                raise ValueError(f"{name} must be within {low:.15g}..{high:.15g} {unit}, got {value!r}")
        if not 0 <= self.flush_interval_s <= MAX_WAIT_MS_RANGE[1] / 1000:
            raise ValueError(f"stream_flush_interval_s must be within 0..{MAX_WAIT_MS_RANGE[1] / 1000:g} s, "
                             f"got {self.flush_interval_s!r}")

    def pacer(self) -> StreamPacer:
        """A pacer for one server's streams, all of them counted together."""
        return StreamPacer(self.flush_interval_s, self.messages_per_s, self.max_wait_ms / 1000)


class StreamPacer:
    """How long a Generate stream lets new tokens gather after a write that carried some.

    Every message costs the serving event loop a fixed amount of work (a protobuf, a gRPC
    write and its completion, asyncio wakeups); on a node that is GIL time taken from the
    engine thread (profiled serving 64 streams on CPU, the event loop held the GIL four
    times as long as the engine thread, over half of it in gRPC's per-message code). One
    stream waits ``floor_s``; with many open the wait grows with
    their number, so the server sends about ``messages_per_s`` messages in all, but never
    waits more than ``max_s``. A floor of 0 turns coalescing off. The first chunk of a burst
    and a request's final message never wait, so neither TTFT nor the end of a request pays
    for this.
    """

    def __init__(self, floor_s: float = DEFAULT_FLUSH_INTERVAL_S,
                 messages_per_s: float = PACED_MESSAGES_PER_S,
                 max_s: float = MAX_FLUSH_INTERVAL_S) -> None:
        self.floor_s = floor_s
        self.messages_per_s = messages_per_s
        self.max_s = max(max_s, floor_s)
        self.streams = 0  # Generate streams open on this server
        self.stopping = False
        self._outboxes: set[Outbox] = set()  # of the open streams

    def opened(self, outbox: Outbox) -> None:
        """A stream opened, writing from ``outbox``."""
        self.streams += 1
        self._outboxes.add(outbox)

    def closed(self, outbox: Outbox) -> None:
        self.streams -= 1
        self._outboxes.discard(outbox)

    def stop_idle(self) -> None:
        """The server begins its graceful stop: streams with nothing in flight end now, the
        others after their last request's end. A client's or coordinator's link lingers with
        nothing in flight, and held the server's stop for its whole grace period."""
        self.stopping = True
        for outbox in self._outboxes:
            outbox.wake()

    def interval_s(self) -> float:
        """The wait after a write that carried tokens (0: none)."""
        if self.floor_s <= 0:
            return 0.0
        return min(self.max_s, max(self.floor_s, self.streams / self.messages_per_s))


class _StreamSink:
    """A request's tokens on their way into a stream's outbox, and all it was sent so far
    (a cancelled request's result carries them)."""

    __slots__ = ("outbox", "request_id", "token_ids", "texts")

    def __init__(self, outbox: Outbox, request_id: str) -> None:
        self.outbox = outbox
        self.request_id = request_id
        self.token_ids: list[int] = []
        self.texts: list[str] = []

    def chunk(self, token_ids: Sequence[int], text: str) -> None:
        first = not self.texts
        self.token_ids.extend(token_ids)
        self.texts.append(text)
        self.outbox.put_chunk(self.request_id, token_ids, text, first)


def keyed_session(request: pb.GenerateRequest, principal: Principal | None) -> str:
    """At the edge (a ``principal``), put the validated request's session under its tenant's
    key (cluster/session_keys.py); returns the session id the client named it by ("" for
    none), which its answers carry."""
    client_sid = request.session_id
    if principal is not None and request.HasField("session_id"):
        request.session_id = session_key(principal.tenant, client_sid)
    return client_sid


async def serve_generate_stream(backend: ServingBackend, limits: Limits,
                                requests: AsyncIterator[Any],
                                context: grpc.aio.ServicerContext,
                                pacer: StreamPacer | None = None,
                                principal: Principal | None = None, batched: bool = False
                                ) -> AsyncIterator[pb.GenerateStreamResponse | pb.GenerateBatch]:
    """Run one Generate stream: many requests by id, cancels, per-request errors.

    ``batched`` (GenerateMany, UltraKV's and NodeService's): each write is one GenerateBatch
    of every event pending then, not one message per event.

    With a ``principal`` (the client-facing edge) every request runs as its tenant, whatever
    the request says; without one (a node serving its coordinator) the request's tenant is
    taken as given.

    Chunks are coalesced: after a write that carried tokens the stream waits the
    ``pacer``'s interval while new deltas merge into the pending chunks (and longer when the
    transport is backed up, since a write then blocks), so a fast engine, a slow reader or
    many streams get several tokens per message instead of one message per token. The first
    chunk of a burst leaves at once, so TTFT does not pay the interval, and a final message
    ends the wait.
    """
    pacer = pacer or StreamPacer()
    outbox = Outbox()
    pacer.opened(outbox)
    active: dict[str, asyncio.Task] = {}
    cancelled: set[str] = set()
    reading_done = False
    rpc_deadline = _rpc_deadline(context)
    last_read = time.monotonic()  # an open stream that stays quiet is closed (idle limit)

    async def run(request: pb.GenerateRequest, client_sid: str,
                  admit: Callable[[], Awaitable[None]] | None) -> None:
        rid = request.request_id
        sent = _StreamSink(outbox, rid)
        deadline = request_deadline(request, rpc_deadline)
        try:
            if admit is not None:  # its tenant's slot (the edge's: security/interceptor.py)
                await admit()
            result = await backend.generate_into(request, deadline, sent)
            if result is not None:
                if result.session_id:
                    result.session_id = client_sid
                outbox.put_final(pb.GenerateStreamResponse(request_id=rid, result=result))
        except asyncio.CancelledError:
            if rid not in cancelled:
                raise  # the whole stream is going away
            outbox.put_final(pb.GenerateStreamResponse(request_id=rid, result=pb.GenerateResult(
                request_id=rid, session_id=client_sid, text="".join(sent.texts),
                token_ids=sent.token_ids, finish_reason=pb.FINISH_REASON_ABORT,
                usage=pb.Usage(completion_tokens=len(sent.token_ids)))))
        except Exception as exc:  # a failing request must not end the stream
            outbox.put_final(_error_response(rid, rejection_for_client(exc, request.session_id)))
            if not isinstance(exc, (RequestRejected, ValueError, LookupError)):
                log.exception("request %s failed", rid)
        finally:
            active.pop(rid, None)
            cancelled.discard(rid)
            outbox.wake()

    def accept(message: Any) -> None:
        if isinstance(message, Malformed | Refused):
            outbox.put_final(_error_response(message.request_id, message.rejection()))
            return
        admit = None
        if isinstance(message, Admitting):
            message, admit = message.message, message.admit
        action = message.WhichOneof("action")
        if action == "cancel":
            task = active.get(message.cancel.request_id)
            if task is not None:
                cancelled.add(message.cancel.request_id)
                task.cancel()
            return
        if action != "generate":
            outbox.put_final(_error_response("", RequestRejected(
                grpc.StatusCode.INVALID_ARGUMENT, "action",
                "action must be set: generate or cancel")))
            return
        rid = message.generate.request_id
        if pacer.stopping:  # its stream's requests finish; new ones go elsewhere
            outbox.put_final(_error_response(rid, RequestRejected(
                grpc.StatusCode.UNAVAILABLE, NODE_FAILING_FIELD,
                "the server is stopping: send the request again (another address or node)")))
            return
        try:
            if principal is not None:
                message.generate.tenant = principal.tenant
            request = validate_generate(message.generate, limits, require_request_id=True,
                                        keyed=principal is None)
            client_sid = keyed_session(request, principal)
            if rid in active:
                raise RequestRejected(grpc.StatusCode.ALREADY_EXISTS, "request_id",
                                      f"request_id {rid!r} is already running on this stream")
        except RequestRejected as rejection:
            outbox.put_final(_error_response(rid, rejection))
            return
        active[rid] = asyncio.create_task(run(request, client_sid, admit), name=f"generate-{rid}")

    async def read() -> None:
        nonlocal reading_done, last_read
        try:
            async for message in requests:
                last_read = time.monotonic()
                accept(message)
        finally:
            reading_done = True
            outbox.wake()

    reader = asyncio.create_task(read(), name="generate-reader")
    try:
        while True:
            wrote_chunk = False
            if batched:
                while True:
                    batch = pb.GenerateBatch()
                    wrote_chunk |= outbox.pop_into(batch.events, MAX_BATCH_BYTES)
                    if not batch.events:
                        break
                    yield batch
            else:
                while (message := outbox.pop()) is not None:
                    wrote_chunk |= message.WhichOneof("event") == "chunk"
                    yield message
            # A stopping server ends a GenerateMany stream once nothing runs on it (a
            # multiplexing client or coordinator sends what it had not sent yet elsewhere);
            # a Generate stream still reads to its end, as a caller of one request per call
            # (its request may wait for a tenant slot, unread) does not send it again.
            if (reading_done or (batched and pacer.stopping)) and not active:
                break
            if wrote_chunk and (interval := pacer.interval_s()) > 0:
                await outbox.gather(interval)
            elif active:
                await outbox.wait()
            else:
                idle = limits.stream_idle_timeout_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(outbox.wait(), timeout=idle)
                if not active and time.monotonic() - last_read >= idle:
                    await abort_with(context, RequestRejected(
                        grpc.StatusCode.DEADLINE_EXCEEDED, "",
                        f"stream closed: idle for {idle:g} s with no request "
                        "(stream_idle_timeout_s); open a new one"))
        if reading_done:
            await reader  # surfaces a read error, if any (stopping: the reader is cancelled)
    finally:
        pacer.closed(outbox)
        reader.cancel()
        for task in list(active.values()):
            task.cancel()
        if active:
            await asyncio.gather(*active.values(), return_exceptions=True)


# --- servicers -------------------------------------------------------------------------------


async def abort_with(context: grpc.aio.ServicerContext, rejection: RequestRejected) -> None:
    REJECTIONS.record(rejection.code)
    metadata = []
    if rejection.field:
        metadata.append(("ultrakv-field", rejection.field))
    if rejection.retry_after_s > 0:
        metadata.append(("retry-after-ms", str(int(rejection.retry_after_s * 1000))))
    await context.abort(rejection.code, rejection.message, trailing_metadata=tuple(metadata))


def unary(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Map rejections and engine errors of a unary handler to statuses."""

    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Malformed):
                raise request.rejection()
            return await method(self, request, context)
        except (RequestRejected, EngineError, ValueError, LookupError) as exc:
            if isinstance(exc, TransferError):
                exc = RequestRejected(grpc.StatusCode.DATA_LOSS, "chunks", str(exc))
            await abort_with(context, rejection_from_error(exc))

    handler.__name__ = method.__name__
    handler.__doc__ = method.__doc__
    return handler


async def _collect(backend: ServingBackend, request: pb.GenerateRequest,
                   deadline: float | None) -> pb.GenerateResult:
    async with contextlib.aclosing(backend.generate(request, deadline)) as events:
        async for event in events:
            if isinstance(event, pb.GenerateResult):
                return event
    raise RequestRejected(grpc.StatusCode.INTERNAL, "", "generation ended without a result")


def redacted_stats(stats: pb.StatsResponse) -> pb.StatsResponse:
    """Stats without what only an admin may see: addresses, pids, the engine's raw dict."""
    out = pb.StatsResponse()
    out.CopyFrom(stats)
    for node in out.nodes:
        node.address, node.pid = "", 0
        node.ClearField("engine")
    return out


class UltraKVServicer:
    """The client-facing ``ultrakv.v1.UltraKV`` service over any ServingBackend.

    ``edge``: the servicer faces clients, so each call runs as the principal the edge
    authenticated (security/interceptor.py; the open principal when there is none): the
    tenant of every request is the key's, sessions are the tenant's own, and only an admin
    sees detailed stats. A node serving its coordinator (``edge=False``) trusts the tenant
    fields the coordinator set.
    """

    def __init__(self, backend: ServingBackend, limits: Limits,
                 pacing: StreamPacing | None = None, edge: bool = True) -> None:
        self.backend = backend
        self.pacer = (pacing or StreamPacing()).pacer()
        self.limits = limits
        self.edge = edge

    def _principal(self) -> Principal | None:
        return (current_principal() or OPEN) if self.edge else None

    def _owner(self, request: pb.GetSessionRequest | pb.DeleteSessionRequest) -> str | None:
        """The tenant whose session the request may touch; None = any (admin)."""
        principal = self._principal()
        if principal is not None:
            return None if principal.is_admin else principal.tenant
        return None if request.any_tenant else request.tenant

    def stop_idle_streams(self) -> None:
        """The server is stopping: see :meth:`StreamPacer.stop_idle`."""
        self.pacer.stop_idle()

    async def Generate(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with contextlib.aclosing(
                serve_generate_stream(self.backend, self.limits, requests, context,
                                      self.pacer, self._principal())) as stream:
            async for message in stream:
                yield message

    async def GenerateMany(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[pb.GenerateBatch]:
        """Generate, each write one GenerateBatch of every event pending then (a client
        multiplexing its requests on one stream; a coordinator's to a node), on the same
        pacer as the Generate streams."""
        async with contextlib.aclosing(
                serve_generate_stream(self.backend, self.limits, requests, context,
                                      self.pacer, self._principal(), batched=True)) as stream:
            async for batch in stream:
                yield batch

    async def _process(self, request: pb.GenerateRequest, deadline: float | None
                       ) -> pb.GenerateResult:
        """One unary request run as the caller's principal: its tenant, its session key; the
        answer (or the error) names the session by the caller's own id."""
        principal = self._principal()
        if principal is not None:
            request.tenant = principal.tenant
        valid = validate_generate(request, self.limits, keyed=principal is None)
        client_sid = keyed_session(valid, principal)
        try:
            result = await _collect(self.backend, valid, deadline)
        except (RequestRejected, EngineError, ValueError, LookupError) as exc:
            raise rejection_for_client(exc, valid.session_id) from None
        if result.session_id:
            result.session_id = client_sid
        return result

    def _session_key(self, session_id: str) -> str:
        """The key of the session a GetSession or DeleteSession names: the caller's tenant's
        session of that id; an admin (or a node's coordinator) may also name any tenant's
        session by its key."""
        principal = self._principal()
        if principal is None or (principal.is_admin and SEPARATOR in session_id):
            return validate_session_key(session_id)
        return session_key(principal.tenant, validate_session_id(session_id))

    @unary
    async def Process(self, request: pb.GenerateRequest,
                      context: grpc.aio.ServicerContext) -> pb.GenerateResult:
        return await self._process(request, _rpc_deadline(context))

    @unary
    async def ProcessBatch(self, request: pb.BatchRequest,
                           context: grpc.aio.ServicerContext) -> pb.BatchResponse:
        concurrency = validate_batch(request, self.limits)
        gate = asyncio.Semaphore(concurrency)
        deadline = _rpc_deadline(context)

        async def one(item: pb.GenerateRequest) -> pb.BatchItem:
            try:
                async with gate:
                    return pb.BatchItem(result=await self._process(item, deadline))
            except Exception as exc:  # one bad item fails alone
                rejection = rejection_from_error(exc)
                REJECTIONS.record(rejection.code)
                return pb.BatchItem(error=rejection.to_detail())

        items = await asyncio.gather(*(one(r) for r in request.requests))
        return pb.BatchResponse(items=items)

    @unary
    async def Stats(self, request: pb.StatsRequest,
                    context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        stats = await self.backend.stats()
        principal = self._principal()
        return stats if principal is None or principal.is_admin else redacted_stats(stats)

    @unary
    async def ClearCache(self, request: pb.ClearCacheRequest,
                         context: grpc.aio.ServicerContext) -> pb.ClearCacheResponse:
        return pb.ClearCacheResponse(blocks_freed=await self.backend.clear_cache())

    @unary
    async def CleanupSessions(self, request: pb.CleanupSessionsRequest,
                              context: grpc.aio.ServicerContext) -> pb.CleanupSessionsResponse:
        removed = await self.backend.cleanup_sessions(validate_max_age(request.max_age_s))
        return pb.CleanupSessionsResponse(removed=removed)

    @unary
    async def GetSession(self, request: pb.GetSessionRequest,
                         context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        key = self._session_key(request.session_id)
        try:
            info = await self.backend.get_session(key, self._owner(request))
        except (RequestRejected, EngineError, ValueError, LookupError) as exc:
            raise rejection_for_client(exc, key) from None
        info.session_id = request.session_id  # as the caller named it
        return info

    @unary
    async def DeleteSession(self, request: pb.DeleteSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        key = self._session_key(request.session_id)
        try:
            await self.backend.delete_session(key, self._owner(request))
        except (RequestRejected, EngineError, ValueError, LookupError) as exc:
            raise rejection_for_client(exc, key) from None
        return pb.DeleteSessionResponse()

    # Backup and restore: admin keys only (ADMIN_METHODS, enforced by the edge's policy).
    async def ExportSessions(self, request: Any, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[ultrakv_pb2.BackupPart]:
        try:
            if isinstance(request, Malformed):
                raise request.rejection()
            async with contextlib.aclosing(
                    self.backend.export_sessions(request.history_only)) as parts:
                async for part in parts:
                    yield part
        except (RequestRejected, EngineError, ValueError, LookupError) as exc:
            await _abort_transfer(context, exc)

    async def ImportSessions(self, chunks: AsyncIterator[Any], context: grpc.aio.ServicerContext
                             ) -> ultrakv_pb2.ImportSessionsResponse:
        try:
            return await self.backend.import_sessions(session_runs(chunks))
        except (RequestRejected, EngineError, ValueError, LookupError) as exc:
            await _abort_transfer(context, exc)
        return ultrakv_pb2.ImportSessionsResponse()  # not reached: abort raises


async def _abort_transfer(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, TransferError):
        exc = RequestRejected(grpc.StatusCode.DATA_LOSS, "chunks", str(exc))
    await abort_with(context, rejection_from_error(exc))


def add_servicer(server: grpc.aio.Server, servicer: Any, service_name: str) -> None:
    """Register ``servicer`` for ``service_name`` (UltraKV or NodeService) with tolerant
    request deserializers, so a request with invalid UTF-8 is answered per request."""
    file = ultrakv_pb2.DESCRIPTOR if service_name == ULTRAKV_SERVICE else npb.DESCRIPTOR
    service = file.services_by_name[service_name.rsplit(".", 1)[1]]
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[
                    (method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=tolerant_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name,
                                                                          handlers),))
