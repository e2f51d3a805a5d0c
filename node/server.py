"""gRPC servers of a node: the client-facing ``UltraKV`` service and ``NodeService``.

The client-facing servicer is a thin adapter over a :class:`ServingBackend` (generate
stream, stats, cache and session operations, all in wire messages); :class:`LocalBackend`
implements it over an in-process Engine, and the coordinator implements it by forwarding to
nodes. Validation happens here, at the edge (node/validation.py); every failure becomes a
status (unary) or a per-request :class:`ErrorDetail` (stream, batch) naming the field.

Every server also serves ``grpc.health.v1`` and server reflection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf import message_factory, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.registry import CollectorRegistry
from ultrakv.node.addresses import dial_host
from ultrakv.node.errors import EngineError, IncompatibleSessionError, SessionNotFoundError
from ultrakv.node.metrics import NodeCollector, serve_metrics
from ultrakv.node.outputs import GenerateRequest, RequestOutput, SessionInfo
from ultrakv.node.sampling_params import Priority, SamplingParams
from ultrakv.node.session_transfer import (
    DEFAULT_CHUNK_BYTES,
    StateAssembler,
    TransferError,
    state_to_chunks,
)
from ultrakv.node.validation import (
    PRIORITY_NAMES,
    SESSION_ID_MAX_BYTES,
    Limits,
    Malformed,
    RequestRejected,
    rejection_from_error,
    tolerant_deserializer,
    validate_batch,
    validate_generate,
    validate_max_age,
    validate_session_id,
)
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2

log = logging.getLogger("ultrakv.node.server")

ULTRAKV_SERVICE = "ultrakv.v1.UltraKV"
NODE_SERVICE = "ultrakv.v1.NodeService"
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "abort": pb.FINISH_REASON_ABORT, "error": pb.FINISH_REASON_ERROR}

Event = pb.TokenChunk | pb.GenerateResult


class ServingBackend(Protocol):
    """What the client-facing service needs from whatever serves requests.

    ``generate`` receives a validated, normalized request and yields token chunks then one
    final result. Closing the iterator early (cancel, disconnect) must abort the request and
    free its blocks. Errors are raised as node errors (node/errors.py), RequestRejected or
    ValueError; the servicer maps them to statuses.
    """

    def generate(self, request: pb.GenerateRequest,
                 deadline: float | None) -> AsyncIterator[Event]: ...

    async def stats(self) -> pb.StatsResponse: ...

    async def clear_cache(self) -> int: ...

    async def cleanup_sessions(self, max_age_s: float) -> int: ...

    async def get_session(self, session_id: str) -> pb.SessionInfo: ...

    async def delete_session(self, session_id: str) -> None: ...


# --- the in-process backend -----------------------------------------------------------------


def engine_request(request: pb.GenerateRequest, deadline: float | None) -> GenerateRequest:
    """Wire request (validated) -> engine request. ``deadline`` is a monotonic instant."""
    s = request.sampling
    params: dict[str, Any] = {"max_tokens": s.max_length, "stop": list(s.stop),
                              "stop_token_ids": list(s.stop_token_ids),
                              "ignore_eos": s.ignore_eos}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if s.HasField(name):
            params[name] = getattr(s, name)
    prompt: str | list[int] = (request.text if request.WhichOneof("prompt") == "text"
                               else list(request.token_ids.ids))
    if request.timeout_ms:
        own = time.monotonic() + request.timeout_ms / 1000.0
        deadline = own if deadline is None else min(deadline, own)
    return GenerateRequest(
        prompt=prompt, sampling=SamplingParams(**params),
        session_id=request.session_id if request.HasField("session_id") else None,
        request_id=request.request_id, priority=Priority[PRIORITY_NAMES[request.priority]],
        tenant=request.tenant, deadline=deadline)


def result_message(output: RequestOutput, node_id: str) -> pb.GenerateResult:
    """Engine output -> wire result."""
    return pb.GenerateResult(
        request_id=output.request_id, session_id=output.session_id or "", text=output.text,
        token_ids=output.token_ids,
        finish_reason=_FINISH.get(output.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=output.prompt_tokens, cached_tokens=output.cached_tokens,
                       completion_tokens=output.completion_tokens),
        timings=pb.Timings(ttft_ms=output.ttft_s * 1000.0, latency_ms=output.latency_s * 1000.0),
        node_id=node_id, error=output.error or "")


def session_message(info: SessionInfo, node_id: str) -> pb.SessionInfo:
    return pb.SessionInfo(session_id=info.session_id, num_tokens=info.num_tokens,
                          num_cached_blocks=info.num_cached_blocks, turns=info.turns,
                          created_at=info.created_at, last_used_at=info.last_used_at,
                          node_id=node_id)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return str(value)


def node_stats_message(raw: dict, identity: NodeIdentity) -> pb.NodeStats:
    """Engine.stats() dict -> NodeStats (the raw dict also rides along as a Struct)."""
    requests, tokens = raw.get("requests", {}), raw.get("tokens", {})
    cache, latency = raw.get("cache", {}), raw.get("latency", {})
    finished = requests.get("finished", {})
    engine_struct = struct_pb2.Struct()
    engine_struct.update(_jsonable(raw))
    return pb.NodeStats(
        node_id=identity.node_id, address=identity.address, pid=os.getpid(),
        model=str(raw.get("model", "")), device=str(raw.get("device", "")),
        sessions=raw.get("sessions", {}).get("count", 0),
        queue_depth=requests.get("waiting", 0), running=requests.get("running", 0),
        requests_total=sum(finished.values()), requests_failed=finished.get("error", 0),
        prompt_tokens=tokens.get("prompt", 0), completion_tokens=tokens.get("generated", 0),
        cached_tokens=tokens.get("cached", 0),
        cache=pb.CacheStats(
            hits=cache.get("hits", 0), misses=cache.get("misses", 0),
            hit_tokens=cache.get("hit_tokens", 0), evictions=cache.get("evictions", 0),
            blocks_used=cache.get("blocks_used", 0), blocks_free=cache.get("blocks_free", 0),
            blocks_total=cache.get("num_blocks", 0), policy=str(cache.get("policy", "")),
            hit_rate=cache.get("hit_rate", 0.0)),
        latency=pb.LatencyStats(**{name: 1000.0 * latency.get(name.removesuffix("_ms") + "_s", 0.0)
                                   for name in pb.LatencyStats.DESCRIPTOR.fields_by_name}),
        uptime_s=time.time() - identity.started_at, engine=engine_struct)


@dataclass
class NodeIdentity:
    """How this node names itself in results and stats."""

    node_id: str = field(default_factory=lambda: f"node-{uuid.uuid4().hex[:8]}")
    address: str = ""
    started_at: float = field(default_factory=time.time)


TurnHook = Callable[[RequestOutput], Awaitable[None]]


class LocalBackend:
    """ServingBackend over an in-process Engine.

    ``on_turn_complete`` (set by the node's cluster agent) is awaited after a session turn
    completes and before its final message is yielded, so the turn is replicated before
    the client can see it (node/replication.py).
    """

    def __init__(self, engine: Any, identity: NodeIdentity | None = None,
                 on_turn_complete: TurnHook | None = None) -> None:
        self.engine = engine
        self.identity = identity or NodeIdentity()
        self.on_turn_complete = on_turn_complete

    async def generate(self, request: pb.GenerateRequest,
                       deadline: float | None) -> AsyncIterator[Event]:
        req = engine_request(request, deadline)
        self.engine.validate(req)
        finished = False
        try:
            async for delta in self.engine.stream(req):
                if delta.token_ids or delta.text:
                    yield pb.TokenChunk(text=delta.text, token_ids=delta.token_ids)
                if delta.finished:
                    finished = True
                    out = delta.output
                    if (out is not None and out.session_id and self.on_turn_complete is not None
                            and out.finish_reason in ("stop", "length")):
                        await self.on_turn_complete(out)
                    if out is not None:
                        yield result_message(out, self.identity.node_id)
                    return
        finally:
            if not finished:  # cancelled, disconnected or failed: free the blocks now
                self.engine.abort(req.request_id)

    async def node_stats(self) -> pb.NodeStats:
        raw = await asyncio.to_thread(self.engine.stats)
        return node_stats_message(raw, self.identity)

    async def stats(self) -> pb.StatsResponse:
        return pb.StatsResponse(nodes=[await self.node_stats()])

    async def clear_cache(self) -> int:
        return int(await asyncio.to_thread(self.engine.clear_cache))

    async def cleanup_sessions(self, max_age_s: float) -> int:
        return int(await asyncio.to_thread(self.engine.cleanup_sessions, max_age_s))

    async def get_session(self, session_id: str) -> pb.SessionInfo:
        info = await asyncio.to_thread(self.engine.get_session, session_id)
        return session_message(info, self.identity.node_id)

    async def delete_session(self, session_id: str) -> None:
        await asyncio.to_thread(self.engine.delete_session, session_id)

    async def list_sessions(self) -> list[pb.SessionInfo]:
        infos = await asyncio.to_thread(self.engine.list_sessions)
        return [session_message(i, self.identity.node_id) for i in infos]


# --- the Generate stream ---------------------------------------------------------------------


class Outbox:
    """Outgoing messages of one Generate stream, in order, merging the not-yet-sent chunks of
    a request: when the reader is slower than the engine, several deltas leave as one chunk."""

    def __init__(self) -> None:
        self._queue: OrderedDict[int, pb.GenerateStreamResponse] = OrderedDict()
        self._open_chunk: dict[str, int] = {}  # request id -> key of its unsent chunk
        self._next = 0
        self._ready = asyncio.Event()

    def put_chunk(self, request_id: str, chunk: pb.TokenChunk) -> None:
        key = self._open_chunk.get(request_id)
        if key is not None and key in self._queue:
            pending = self._queue[key].chunk
            pending.text += chunk.text
            pending.token_ids.extend(chunk.token_ids)
            return
        self._open_chunk[request_id] = self._push(
            pb.GenerateStreamResponse(request_id=request_id, chunk=chunk))

    def put_final(self, message: pb.GenerateStreamResponse) -> None:
        self._open_chunk.pop(message.request_id, None)
        self._push(message)

    def _push(self, message: pb.GenerateStreamResponse) -> int:
        key = self._next
        self._next += 1
        self._queue[key] = message
        self._ready.set()
        return key

    def pop(self) -> pb.GenerateStreamResponse | None:
        if not self._queue:
            return None
        return self._queue.popitem(last=False)[1]

    async def wait(self) -> None:
        await self._ready.wait()
        self._ready.clear()

    def wake(self) -> None:
        self._ready.set()


def _error_response(request_id: str, rejection: RequestRejected) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(request_id=request_id, error=rejection.to_detail())


def _rpc_deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


DEFAULT_FLUSH_INTERVAL_S = 0.005


async def serve_generate_stream(backend: ServingBackend, limits: Limits,
                                requests: AsyncIterator[Any],
                                context: grpc.aio.ServicerContext,
                                flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S
                                ) -> AsyncIterator[pb.GenerateStreamResponse]:
    """Run one Generate stream: many requests by id, cancels, per-request errors.

    Chunks are coalesced: after a write that carried tokens the stream waits
    ``flush_interval_s`` while new deltas merge into the pending chunks (and longer when the
    transport is backed up, since a write then blocks), so a fast engine or a slow reader
    gets several tokens per message instead of one message per token. The first chunk of a
    burst leaves at once, so TTFT does not pay the interval.
    """
    outbox = Outbox()
    active: dict[str, asyncio.Task] = {}
    cancelled: set[str] = set()
    reading_done = False
    rpc_deadline = _rpc_deadline(context)

    async def run(request: pb.GenerateRequest) -> None:
        rid = request.request_id
        sent_ids: list[int] = []
        sent_text: list[str] = []
        try:
            async with contextlib.aclosing(backend.generate(request, rpc_deadline)) as events:
                async for event in events:
                    if isinstance(event, pb.TokenChunk):
                        sent_ids.extend(event.token_ids)
                        sent_text.append(event.text)
                        outbox.put_chunk(rid, event)
                    else:
                        outbox.put_final(pb.GenerateStreamResponse(request_id=rid, result=event))
        except asyncio.CancelledError:
            if rid not in cancelled:
                raise  # the whole stream is going away
            outbox.put_final(pb.GenerateStreamResponse(request_id=rid, result=pb.GenerateResult(
                request_id=rid, session_id=request.session_id, text="".join(sent_text),
                token_ids=sent_ids, finish_reason=pb.FINISH_REASON_ABORT,
                usage=pb.Usage(completion_tokens=len(sent_ids)))))
        except Exception as exc:  # a failing request must not end the stream
            outbox.put_final(_error_response(rid, rejection_from_error(exc)))
            if not isinstance(exc, (RequestRejected, ValueError, LookupError)):
                log.exception("request %s failed", rid)
        finally:
            active.pop(rid, None)
            cancelled.discard(rid)
            outbox.wake()

    def accept(message: Any) -> None:
        if isinstance(message, Malformed):
            outbox.put_final(_error_response(message.request_id, message.rejection()))
            return
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
        try:
            request = validate_generate(message.generate, limits, require_request_id=True)
            if rid in active:
                raise RequestRejected(grpc.StatusCode.ALREADY_EXISTS, "request_id",
                                      f"request_id {rid!r} is already running on this stream")
        except RequestRejected as rejection:
            outbox.put_final(_error_response(rid, rejection))
            return
        active[rid] = asyncio.create_task(run(request), name=f"generate-{rid}")

    async def read() -> None:
        nonlocal reading_done
        try:
            async for message in requests:
                accept(message)
        finally:
            reading_done = True
            outbox.wake()

    reader = asyncio.create_task(read(), name="generate-reader")
    try:
        while True:
            wrote_chunk = False
            while (message := outbox.pop()) is not None:
                wrote_chunk |= message.WhichOneof("event") == "chunk"
                yield message
            if reading_done and not active:
                break
            if wrote_chunk and flush_interval_s > 0:
                await asyncio.sleep(flush_interval_s)
            else:
                await outbox.wait()
        await reader  # surfaces a read error, if any
    finally:
        reader.cancel()
        for task in list(active.values()):
            task.cancel()
        if active:
            await asyncio.gather(*active.values(), return_exceptions=True)


# --- servicers -------------------------------------------------------------------------------


async def _abort(context: grpc.aio.ServicerContext, rejection: RequestRejected) -> None:
    metadata = []
    if rejection.field:
        metadata.append(("ultrakv-field", rejection.field))
    if rejection.retry_after_s > 0:
        metadata.append(("retry-after-ms", str(int(rejection.retry_after_s * 1000))))
    await context.abort(rejection.code, rejection.message, trailing_metadata=tuple(metadata))


def _unary(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Map rejections and engine errors of a unary handler to statuses."""

    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Malformed):
                raise request.rejection()
            return await method(self, request, context)
        except (RequestRejected, EngineError, ValueError, LookupError) as exc:
            if isinstance(exc, TransferError):
                exc = RequestRejected(grpc.StatusCode.DATA_LOSS, "chunks", str(exc))
            await _abort(context, rejection_from_error(exc))

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


class UltraKVServicer:
    """The client-facing ``ultrakv.v1.UltraKV`` service over any ServingBackend."""

    def __init__(self, backend: ServingBackend, limits: Limits,
                 flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S) -> None:
        self.backend = backend
        self.flush_interval_s = flush_interval_s
        self.limits = limits

    async def Generate(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with contextlib.aclosing(
                serve_generate_stream(self.backend, self.limits, requests, context,
                                      self.flush_interval_s)) as stream:
            async for message in stream:
                yield message

    @_unary
    async def Process(self, request: pb.GenerateRequest,
                      context: grpc.aio.ServicerContext) -> pb.GenerateResult:
        valid = validate_generate(request, self.limits)
        return await _collect(self.backend, valid, _rpc_deadline(context))

    @_unary
    async def ProcessBatch(self, request: pb.BatchRequest,
                           context: grpc.aio.ServicerContext) -> pb.BatchResponse:
        concurrency = validate_batch(request, self.limits)
        gate = asyncio.Semaphore(concurrency)
        deadline = _rpc_deadline(context)

        async def one(item: pb.GenerateRequest) -> pb.BatchItem:
            try:
                valid = validate_generate(item, self.limits)
                async with gate:
                    return pb.BatchItem(result=await _collect(self.backend, valid, deadline))
            except Exception as exc:  # one bad item fails alone
                return pb.BatchItem(error=rejection_from_error(exc).to_detail())

        items = await asyncio.gather(*(one(r) for r in request.requests))
        return pb.BatchResponse(items=items)

    @_unary
    async def Stats(self, request: pb.StatsRequest,
                    context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        return await self.backend.stats()

    @_unary
    async def ClearCache(self, request: pb.ClearCacheRequest,
                         context: grpc.aio.ServicerContext) -> pb.ClearCacheResponse:
        return pb.ClearCacheResponse(blocks_freed=await self.backend.clear_cache())

    @_unary
    async def CleanupSessions(self, request: pb.CleanupSessionsRequest,
                              context: grpc.aio.ServicerContext) -> pb.CleanupSessionsResponse:
        removed = await self.backend.cleanup_sessions(validate_max_age(request.max_age_s))
        return pb.CleanupSessionsResponse(removed=removed)

    @_unary
    async def GetSession(self, request: pb.GetSessionRequest,
                         context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        return await self.backend.get_session(validate_session_id(request.session_id))

    @_unary
    async def DeleteSession(self, request: pb.DeleteSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        await self.backend.delete_session(validate_session_id(request.session_id))
        return pb.DeleteSessionResponse()


class NodeServicer:
    """``ultrakv.v1.NodeService``: generation plus the session operations the cluster needs
    (export/import for migration, history replication, listing, stats)."""

    def __init__(self, backend: LocalBackend, limits: Limits,
                 flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S) -> None:
        self.backend = backend
        self.engine = backend.engine
        # Generate and the session calls are the client-facing service's, over the same backend.
        self._client_facing = UltraKVServicer(backend, limits, flush_interval_s)

    async def Generate(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with contextlib.aclosing(self._client_facing.Generate(requests, context)) as stream:
            async for message in stream:
                yield message

    @_unary
    async def Stats(self, request: pb.StatsRequest,
                    context: grpc.aio.ServicerContext) -> pb.NodeStats:
        return await self.backend.node_stats()

    @_unary
    async def Health(self, request: npb.NodeHealthRequest,
                     context: grpc.aio.ServicerContext) -> npb.NodeHealthResponse:
        return npb.NodeHealthResponse(
            serving=True, node_id=self.backend.identity.node_id,
            model=str(getattr(self.engine, "model_name", "")),
            model_fingerprint=self._fingerprint(),
            uptime_s=time.time() - self.backend.identity.started_at)

    def _fingerprint(self) -> str:
        return str(getattr(self.engine, "model_fingerprint", ""))

    async def ExportSession(self, request: npb.ExportSessionRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[npb.SessionChunk]:
        """Stream one session: header, KV chunks with sha256, trailer."""
        try:
            sid = validate_session_id(request.session_id)
            if request.chunk_bytes < 0:
                raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "chunk_bytes",
                                      f"chunk_bytes must be >= 0, got {request.chunk_bytes}")
            state = await asyncio.to_thread(self.engine.export_session, sid)
        except Exception as exc:
            await _abort(context, rejection_from_error(exc))
            return
        if not request.include_kv:
            state.kv, state.kv_tokens = None, 0
        for chunk in state_to_chunks(state, request.chunk_bytes or DEFAULT_CHUNK_BYTES):
            yield chunk

    async def ImportSession(self, chunks: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext) -> npb.ImportSessionResponse:
        """Receive a session; checksums verified, a model fingerprint mismatch refused."""
        assembler = StateAssembler()
        try:
            async for chunk in chunks:
                if isinstance(chunk, Malformed):
                    raise chunk.rejection()
                first = assembler.header is None
                assembler.add(chunk)
                if first:
                    self._check_fingerprint(assembler.header)
            state = assembler.finish()
            validate_session_id(state.session_id)
            await asyncio.to_thread(self.engine.import_session, state)
        except TransferError as exc:
            await _abort(context, RequestRejected(grpc.StatusCode.DATA_LOSS, "chunks", str(exc)))
        except IncompatibleSessionError as exc:
            await _abort(context, RequestRejected(grpc.StatusCode.FAILED_PRECONDITION,
                                                  "model_fingerprint", str(exc)))
        except Exception as exc:
            await _abort(context, rejection_from_error(exc))
        return npb.ImportSessionResponse(session_id=state.session_id,
                                         num_tokens=len(state.token_ids),
                                         kv_tokens=state.kv_tokens)

    def _check_fingerprint(self, header: npb.SessionHeader) -> None:
        mine = self._fingerprint()
        if header.model_fingerprint != mine:
            raise RequestRejected(
                grpc.StatusCode.FAILED_PRECONDITION, "model_fingerprint",
                f"model_fingerprint must be {mine!r} (this node's model), "
                f"got {header.model_fingerprint!r}")

    @_unary
    async def ReplicateHistory(self, request: npb.ReplicateHistoryRequest,
                               context: grpc.aio.ServicerContext
                               ) -> npb.ReplicateHistoryResponse:
        sid = validate_session_id(request.session_id)
        if request.turns < 0:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "turns",
                                  f"turns must be >= 0, got {request.turns}")
        tenant_bytes = len(request.tenant.encode("utf-8"))
        if tenant_bytes > SESSION_ID_MAX_BYTES:
            raise RequestRejected(
                grpc.StatusCode.INVALID_ARGUMENT, "tenant",
                f"tenant must be at most {SESSION_ID_MAX_BYTES} bytes, got {tenant_bytes}")
        await asyncio.to_thread(self.engine.store_replica, sid, list(request.token_ids),
                                request.turns, request.tenant)
        return npb.ReplicateHistoryResponse()

    @_unary
    async def PromoteReplica(self, request: npb.PromoteReplicaRequest,
                             context: grpc.aio.ServicerContext) -> npb.PromoteReplicaResponse:
        sid = validate_session_id(request.session_id)
        if not await asyncio.to_thread(self.engine.promote_replica, sid):
            raise SessionNotFoundError(sid)
        return npb.PromoteReplicaResponse()

    @_unary
    async def ListSessions(self, request: npb.ListSessionsRequest,
                           context: grpc.aio.ServicerContext) -> npb.ListSessionsResponse:
        return npb.ListSessionsResponse(sessions=await self.backend.list_sessions())

    async def GetSession(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._client_facing.GetSession(request, context)

    async def DeleteSession(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._client_facing.DeleteSession(request, context)

    async def CleanupSessions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._client_facing.CleanupSessions(request, context)

    async def ClearCache(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._client_facing.ClearCache(request, context)


# --- registration and the server ------------------------------------------------------------


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


@dataclass
class ServerSettings:
    """Where and how a node server listens."""

    host: str = "0.0.0.0"
    port: int = 50051
    node_id: str = ""
    limits: Limits = field(default_factory=Limits)
    grace_period_s: float = 5.0
    max_message_bytes: int = 64 * 1024 * 1024
    stream_flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S
    tls_cert: str = ""  # PEM paths; both set = TLS
    tls_key: str = ""
    metrics_port: int = 0  # Prometheus /metrics over HTTP; 0 = off


class NodeServer:
    """One node's gRPC server: UltraKV (client-facing, until the cluster lands), NodeService,
    health and reflection, over one Engine."""

    def __init__(self, engine: Any, settings: ServerSettings | None = None,
                 interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()) -> None:
        self.engine = engine
        self.settings = settings or ServerSettings()
        self.interceptors = interceptors
        self.port = 0
        ident = NodeIdentity(node_id=self.settings.node_id) if self.settings.node_id else None
        self.backend = LocalBackend(engine, ident)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_http: Any = None

    @property
    def address(self) -> str:
        return f"{dial_host(self.settings.host)}:{self.port}"

    async def start(self) -> int:
        """Bind and start; return the bound port (``port=0`` picks a free one)."""
        options = [("grpc.max_receive_message_length", self.settings.max_message_bytes),
                   ("grpc.max_send_message_length", self.settings.max_message_bytes)]
        server = grpc.aio.server(options=options, interceptors=self.interceptors)
        limits = self.settings.limits
        flush = self.settings.stream_flush_interval_s
        add_servicer(server, UltraKVServicer(self.backend, limits, flush), ULTRAKV_SERVICE)
        add_servicer(server, NodeServicer(self.backend, limits, flush), NODE_SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (ULTRAKV_SERVICE, NODE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server)
        bind = f"{self.settings.host}:{self.settings.port}"
        if self.settings.tls_cert and self.settings.tls_key:
            with open(self.settings.tls_key, "rb") as k, open(self.settings.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.port = server.add_secure_port(bind, creds)
        else:
            self.port = server.add_insecure_port(bind)
        if self.port == 0:
            raise OSError(f"port must be free to bind, could not bind {bind}")
        await server.start()
        self._server = server
        self.backend.identity.address = self.address
        for name in ("", ULTRAKV_SERVICE, NODE_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.metrics_port:
            registry = CollectorRegistry()  # own registry: several servers in one process
            registry.register(NodeCollector(self.engine, self.backend.identity.node_id))
            self._metrics_http = serve_metrics(self.settings.metrics_port, registry,
                                               self.settings.host)
        return self.port

    async def stop(self) -> None:
        """Report NOT_SERVING, let running requests finish within the grace period, stop."""
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.settings.grace_period_s)
        self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve_until_signalled(server: NodeServer) -> None:
    """Start ``server``, run until SIGINT/SIGTERM, then stop it cleanly."""
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("node %s serving %s on %s", server.backend.identity.node_id,
             getattr(server.engine, "model_name", "?"), server.address)
    await stop.wait()
    log.info("stopping (grace %.1fs)", server.settings.grace_period_s)
    await server.stop()


class BackgroundServer:
    """A NodeServer on its own event-loop thread, for tests, benchmarks and notebooks.

    ``with BackgroundServer(engine) as srv: Client(srv.address)...``
    """

    def __init__(self, engine: Any, settings: ServerSettings | None = None,
                 interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()) -> None:
        settings = settings or ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.5)
        self.server = NodeServer(engine, settings, interceptors)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ultrakv-server",
                                        daemon=True)

    @property
    def address(self) -> str:
        return self.server.address

    def start(self) -> BackgroundServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
