"""gRPC servers of a node: the client-facing ``UltraKV`` service and ``NodeService``.

:class:`LocalBackend` implements the client-facing service's ``ServingBackend``
(cluster/service.py) over an in-process Engine; :class:`NodeServicer` serves the internal
``NodeService`` (session export/import, replication, listing, stats).

Every server also serves ``grpc.health.v1`` and server reflection (for admin keys only).
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
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.registry import CollectorRegistry
from ultrakv.cluster.addresses import (
    GRPC_SERVER_OPTIONS,
    PortInUseError,
    check_server_ports,
    dial_host,
    listen_address,
    port_in_use_message,
)
from ultrakv.cluster.block_events import batch_to_message, validate_epoch
from ultrakv.cluster.errors import (
    IncompatibleSessionError,
    SessionFencedError,
    SessionNotFoundError,
    SessionSupersededError,
)
from ultrakv.cluster.health_service import HealthService
from ultrakv.cluster.heap import freeze_startup_heap
from ultrakv.cluster.metrics_http import serve_metrics
from ultrakv.cluster.openai_api import ApiHost, HttpServer, TlsFiles
from ultrakv.cluster.peer_auth import ClusterSecretInterceptor, read_cluster_secret
from ultrakv.cluster.peers import PeerTLS
from ultrakv.cluster.security.interceptor import EdgeSecurityInterceptor
from ultrakv.cluster.security.policy import EdgeSecurity
from ultrakv.cluster.security.settings import SecuritySettings
from ultrakv.cluster.security.tls import server_credentials
from ultrakv.cluster.service import (
    DEFAULT_FLUSH_INTERVAL_S,
    MAX_FLUSH_INTERVAL_S,
    PACED_MESSAGES_PER_S,
    ULTRAKV_SERVICE,
    Event,
    StreamPacing,
    TokenSink,
    UltraKVServicer,
    abort_with,
    add_servicer,
    events_of,
    unary,
)
from ultrakv.cluster.session_state import LastTurn, SessionState
from ultrakv.cluster.session_transfer import (
    DEFAULT_CHUNK_BYTES,
    StateAssembler,
    TransferError,
    history_only_chunks,
    message_pairs,
    state_to_chunks,
)
from ultrakv.cluster.tasks import all_of, cancel_task, exit_on_second_signal
from ultrakv.cluster.transport import exposure_warnings, server_options
from ultrakv.cluster.validation import (
    PRIORITY_NAMES,
    Limits,
    Malformed,
    RequestRejected,
    rejection_from_error,
    request_deadline,
    validate_chunk_bytes,
    validate_generate,
    validate_last_turn,
    validate_session_header,
    validate_session_key,
    validate_tenant_key,
)
from ultrakv.node.backup_cut import CutRegistry
from ultrakv.node.chat import ChatMessage
from ultrakv.node.engine_client import EngineClient
from ultrakv.node.kv.block_event_log import BlockEventLog
from ultrakv.node.kv.block_pool import GPU_TIER
from ultrakv.node.metrics import NodeCollector
from ultrakv.node.outputs import GenerateRequest, Prompt, RequestKey, RequestOutput, SessionInfo, StreamDelta
from ultrakv.node.replication import ReplicationStats, TurnNotDurableError
from ultrakv.node.sampling_params import Priority, SamplingParams
from ultrakv.node.sessions import SessionChangedError, SessionOwnedError, TenantQuota, TurnConflictError
from ultrakv.node.turn_ledger import TurnKey, TurnLedger, TurnRecord, answer_for, turn_key
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2

if TYPE_CHECKING:
    from ultrakv.cluster.membership import NodeRegistration

log = logging.getLogger("ultrakv.node.server")

NODE_SERVICE = "ultrakv.v1.NodeService"
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "abort": pb.FINISH_REASON_ABORT, "error": pb.FINISH_REASON_ERROR}

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
    kind = request.WhichOneof("prompt")
    prompt: Prompt
    if kind == "text":
        prompt = request.text
    elif kind == "messages":
        prompt = [ChatMessage(m.role, m.content) for m in request.messages.messages]
    else:
        prompt = list(request.token_ids.ids)
    deadline = request_deadline(request, deadline)
    return GenerateRequest(
        prompt=prompt, sampling=SamplingParams(**params),
        session_id=request.session_id if request.HasField("session_id") else None,
        request_id=request.request_id, priority=Priority[PRIORITY_NAMES[request.priority]],
        tenant=request.tenant, deadline=deadline, full_context=request.full_context,
        resume_token_ids=list(request.resume_token_ids))


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
                          node_id=node_id, replica=info.replica)


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
            hit_rate=cache.get("hit_rate", 0.0),
            tier_hits={tier: v["hits"] for tier, v in raw.get("kv_tiers", {}).items()
                       if isinstance(v, dict) and "hits" in v}),
        latency=pb.LatencyStats(**{name: 1000.0 * latency.get(name.removesuffix("_ms") + "_s", 0.0)
                                   for name in pb.LatencyStats.DESCRIPTOR.fields_by_name}),
        uptime_s=time.time() - identity.started_at, engine=engine_struct)


@dataclass
class NodeIdentity:
    """How this node names itself in results and stats."""

    node_id: str = field(default_factory=lambda: f"node-{uuid.uuid4().hex[:8]}")
    address: str = ""
    started_at: float = field(default_factory=time.time)


# Awaited with the turn's record (None without a request id); raises
# SessionSupersededError when another node owns the session now.
TurnHook = Callable[[RequestOutput, TurnRecord | None], Awaitable[None]]


class NodeFencedError(RequestRejected):
    """This node cannot prove that it is still a cluster member (its lease expired unseen,
    or no keepalive was answered for a TTL), or lost its lease while the turn ran: the cluster
    may have handed its sessions to others, so it acknowledges no session turn (gRPC
    UNAVAILABLE; retry)."""

    def __init__(self, reason: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, "session_id",
                         f"{reason}; this node acknowledges no session turn until it has "
                         "registered again and re-sharding has settled its sessions",
                         retry_after_s=1.0)


# While a completed turn waits for its copies (node/replication.py: up to the replication
# patience), the stream sends an empty chunk this often: the caller's stall deadline is for a
# node that stopped, not for one that waits on its successors.
HEARTBEAT_S = 0.25
# How long a copy of a session's history leaving this node waits for the record of a turn
# that is in the history already but not yet in the ledger (a thread hop, normally).
RECORD_WAIT_S = 5.0


async def _with_heartbeats(work: Awaitable[None], sink: TokenSink) -> None:
    """Await ``work``, pushing an empty chunk into ``sink`` every ``HEARTBEAT_S``."""
    task = asyncio.ensure_future(work)
    try:
        while not (await asyncio.wait({task}, timeout=HEARTBEAT_S))[0]:
            sink.chunk((), "")
    finally:
        if not task.done():
            task.cancel()
    task.result()


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
        # Set by the cluster agent: drops a deleted session from this node's checkpoint before
        # the delete is answered (True when the checkpoint held it), so a restart or a dead
        # node's restore cannot bring the session back.
        self.on_session_deleted: Callable[[str], Awaitable[bool]] | None = None
        self.ledger = TurnLedger()
        self.cuts = CutRegistry()  # backups' cuts: snapshots, and results held meanwhile
        self.serving = True  # False while the engine makes no progress (NodeServer's watch)
        self._completing: set[asyncio.Task] = set()
        # Session turns in the engine, by tenant and request id (request ids are the
        # clients' own: another tenant's request may run under the same one): the session
        # id and the attempt's outcome future. Only an earlier attempt of the same tenant's
        # turn on the same session is aborted for a retry.
        self._turn_attempts: dict[RequestKey, tuple[str | None, asyncio.Future]] = {}
        # Sessions whose last turn is recorded but was not acknowledged for want of a copy
        # (TurnNotDurableError) or of a proven lease (NodeFencedError): a retry is answered
        # from the record only once a copy is stored.
        self._unconfirmed: dict[str, TurnKey] = {}
        # The node's registration (set by its cluster agent): a session turn is taken and
        # acknowledged only while the lease is proven alive, waiting up to lease_patience_s.
        self.registration: NodeRegistration | None = None
        self.lease_patience_s = 10.0
        self.replication: ReplicationStats | None = None  # the agent's counters, for stats

    def generate(self, request: pb.GenerateRequest,
                 deadline: float | None) -> AsyncIterator[Event]:
        """The pulled form of :meth:`generate_into` (unary calls, the OpenAI API)."""
        return events_of(lambda sink: self.generate_into(request, deadline, sink))

    async def generate_into(self, request: pb.GenerateRequest, deadline: float | None,
                            sink: TokenSink) -> pb.GenerateResult | None:
        req = engine_request(request, deadline)
        self.engine.validate(req)
        incarnation = await self._lease_incarnation() if req.session_id is not None else None
        key = turn_key(request)
        if key is not None:  # a retry of a turn taken already (here or by a predecessor)
            answer = await self._recorded_answer(key, request)
            if answer is not None:
                sink.chunk(answer.token_ids, answer.text)
                return answer
            # An earlier attempt whose caller went away is aborted, but stays in the engine
            # (holding the request id and the session) until the step computing it ends.
            deadline_s = time.monotonic() + 10.0
            while (self._earlier_attempt(req)
                   and self.engine.abort(req.request_id, req.tenant) and time.monotonic() < deadline_s):
                await asyncio.sleep(0.01)
            self.ledger.begin(key)
        # Deltas go to the sink in the engine's mailbox callback (one wakeup of this loop per
        # engine step for all requests; no task switch or protobuf per token). The end of the
        # turn runs in a task of its own: when the caller goes away after the engine finished
        # the turn (the turn is in the history) but before the result reached it, the task
        # still replicates and records the turn.
        outcome: asyncio.Future[pb.GenerateResult | None] = asyncio.get_running_loop().create_future()
        finished = False
        resumed = list(request.resume_token_ids)

        def on_delta(delta: StreamDelta) -> None:
            nonlocal finished
            if delta.finished and key is not None:  # it has left the engine
                self._end_attempt(req.key, outcome)
            if delta.error is not None:  # refused by an engine core process, or it is gone
                finished = True
                if key is not None:
                    self.ledger.end(key, None)
                if not outcome.done():
                    outcome.set_exception(delta.error)
                return
            if delta.token_ids or delta.text:
                sink.chunk(delta.token_ids, delta.text)
            if delta.finished:
                finished = True
                task = asyncio.create_task(self._complete(delta.output, key, resumed, sink,
                                                          outcome, incarnation))
                self._completing.add(task)  # the loop holds tasks weakly
                task.add_done_callback(self._completing.discard)

        try:
            self.engine.stream_to(req, on_delta)
        except BaseException:  # refused (a full queue, a bad prompt): the caller raises it
            if key is not None:
                self.ledger.end(key, None)
            raise
        if key is not None and not finished:
            self._turn_attempts[req.key] = (req.session_id, outcome)
        try:
            return await outcome
        finally:
            if not finished:  # cancelled or disconnected: free the blocks now
                self.engine.abort(req.request_id, req.tenant)

    def _earlier_attempt(self, req: GenerateRequest) -> bool:
        """Whether the engine runs ``req``'s tenant and id as an earlier attempt of this turn's
        session (so a retry may abort it)."""
        held = self._turn_attempts.get(req.key)
        return held is not None and held[0] == req.session_id

    def _end_attempt(self, key: RequestKey, outcome: asyncio.Future) -> None:
        held = self._turn_attempts.get(key)
        if held is not None and held[1] is outcome:
            del self._turn_attempts[key]

    async def _recorded_answer(self, key: TurnKey,
                               request: pb.GenerateRequest) -> pb.GenerateResult | None:
        """The answer to a retry or resume of a turn recorded here, while the session still
        ends with that turn; None when the request must run."""
        done = await self.ledger.replay(key)
        if done is None:
            return None
        try:
            info = await asyncio.to_thread(self.engine.get_session, key[0], request.tenant)
        except SessionNotFoundError:
            return None
        if info.turns != done.turns:  # the session moved on, or is another copy now
            return None
        answer = answer_for(done.result, request.resume_token_ids)
        if answer is not None and self._unconfirmed.get(key[0]) == key:
            await self._confirm(key, done)  # raises while no copy can be stored
        if answer is not None and not answer.text:  # a part of the turn, or a resumed turn
            answer.text = self.engine.tokenizer.decode(list(answer.token_ids))
        return answer

    async def _confirm(self, key: TurnKey, done: TurnRecord) -> None:
        """Store a copy of the recorded turn ``key`` that was not acknowledged for want of
        one, before a retry is answered from the record (TurnNotDurableError again when
        there is still none)."""
        sid = key[0]
        if await asyncio.to_thread(self.engine.session_fenced, sid):
            raise SessionFencedError(sid, self.identity.node_id)
        await asyncio.to_thread(self.engine.promote_replica, sid)  # demoted when it failed
        try:
            history = await asyncio.to_thread(lambda: list(self.engine.sessions.get(sid).token_ids))
        except SessionNotFoundError:
            return
        await self._replicate(RequestOutput(key[1], sid, history, [], "", 0, "stop", 0.0, 0.0),
                              done)
        if self._unconfirmed.get(sid) == key:
            del self._unconfirmed[sid]

    async def _lease_incarnation(self) -> int | None:
        """The registration a session turn is taken under (None outside a cluster), once the
        lease is proven alive; NodeFencedError when it is not within ``lease_patience_s``."""
        registration = self.registration
        if registration is None:
            return None
        reason = await registration.wait_proven(self.lease_patience_s)
        if reason is not None:
            raise NodeFencedError(reason)
        return registration.registrations

    async def _check_lease(self, incarnation: int | None) -> None:
        """Before a turn is acknowledged: the lease is proven alive, and was not lost since
        the turn was taken (``incarnation``); NodeFencedError otherwise."""
        now = await self._lease_incarnation()
        if incarnation is not None and now is not None and now != incarnation:
            raise NodeFencedError(f"node {self.identity.node_id} lost its cluster lease while "
                                  "the turn ran (it has registered again since)")

    async def _complete(self, out: RequestOutput | None, key: TurnKey | None,
                        resumed: list[int],
                        sink: TokenSink, outcome: asyncio.Future[pb.GenerateResult | None],
                        incarnation: int | None = None) -> None:
        """The end of a turn: replicate a completed one, then the result (``outcome``; its
        caller may have gone, cancelling it).

        A turn whose replication a successor refuses because it owns the session now (this
        node was taken off the ring, and the session moved on without it) is not
        acknowledged: the caller gets SessionSupersededError, and this stale copy goes."""
        recorded: TurnRecord | None = None
        result: pb.GenerateResult | None = None
        try:
            if out is not None:
                result = result_message(out, self.identity.node_id)
                if out.session_id and out.finish_reason in ("stop", "length"):
                    recorded = await self._turn_record(out, key, result, resumed)
                    self._unconfirmed.pop(out.session_id, None)
                    if recorded is not None:  # now: a move may take the history meanwhile
                        self.ledger.record(recorded)
                    try:
                        await _with_heartbeats(self._replicate(out, recorded, incarnation),
                                               sink)
                    except SessionSupersededError:
                        recorded = None
                        raise
                    except (TurnNotDurableError, NodeFencedError):
                        if recorded is not None:  # kept: a retry must not run it twice
                            self._unconfirmed[out.session_id] = recorded.key
                        raise
                    await self.cuts.results_may_go()  # a backup's cut is being taken
            if not outcome.done():
                outcome.set_result(result)
        except Exception as exc:  # the caller raises it
            if not outcome.done():
                outcome.set_exception(exc)
        except asyncio.CancelledError:  # the server is stopping: the caller must not wait on
            outcome.cancel()
            raise
        finally:
            if key is not None:
                self.ledger.end(key, recorded.result if recorded else None,
                                recorded.turns if recorded else 0)

    async def _replicate(self, out: RequestOutput, record: TurnRecord | None,
                         incarnation: int | None = None) -> None:
        """Replicate a completed turn (with its record), taken under the registration
        ``incarnation``. When a successor serves the session now, this node's copy is stale:
        it goes, and SessionSupersededError is raised. With no copy stored in time
        (TurnNotDurableError) or no lease proven (NodeFencedError), the copy stays, held as a
        replica, and the error is raised: the turn is not acknowledged."""
        if self.on_turn_complete is None:
            return
        try:
            await self._check_lease(incarnation)
            await self.on_turn_complete(out, record)
        except (TurnNotDurableError, NodeFencedError):
            # Not acknowledged: this copy must not win a tie of turns against a copy that
            # acknowledged a turn elsewhere meanwhile (sessions.py ``demote``).
            await asyncio.to_thread(self.engine.demote_session, out.session_id)
            raise
        except SessionSupersededError:
            with contextlib.suppress(SessionNotFoundError):
                await asyncio.to_thread(self.engine.delete_session, out.session_id)
            self.ledger.forget(out.session_id)
            self._unconfirmed.pop(out.session_id, None)
            raise

    async def _turn_record(self, out: RequestOutput, key: TurnKey | None,
                           result: pb.GenerateResult, resumed: list[int]) -> TurnRecord | None:
        """The record of a completed turn as a whole: a resumed attempt's result covers the
        resumed ids too, and its prompt counts without them. None without a request key."""
        if key is None:
            return None
        whole = pb.GenerateResult()
        whole.CopyFrom(result)
        if resumed:
            whole.token_ids[:0] = resumed
            whole.text = ""  # only ever answered in part (answer_for decodes the rest)
            whole.usage.prompt_tokens -= len(resumed)
            whole.usage.completion_tokens = len(whole.token_ids)
            whole.usage.cached_tokens = min(whole.usage.cached_tokens, whole.usage.prompt_tokens)
        try:
            info = await asyncio.to_thread(self.engine.get_session, out.session_id)
        except SessionNotFoundError:  # deleted as it finished
            return None
        return TurnRecord(key, whole, info.turns)

    async def with_last_turn(self, state: SessionState) -> SessionState:
        """``state`` (a copy of a session's history leaving this node) with the record of the
        turn that made it, when the ledger holds it: the node that takes the history answers
        a retry of that turn from it (a copy taken while the turn still waits for its push
        would otherwise be continued with the turn taken twice)."""
        done = await self.ledger.last_turn(state.session_id, state.turns, RECORD_WAIT_S)
        if done is None:
            return state
        return replace(state, last_turn=LastTurn(done.result, done.key[2]))

    def adopt_last_turn(self, state: SessionState) -> None:
        """Record the last turn of a session imported here (moved or restored), so a retry
        of that turn is answered from the record. The turn may not have been acknowledged
        where it ran (its push was waiting when the session moved): a retry stores a copy
        of it here first, as for a turn of this node's own left unconfirmed."""
        if state.last_turn is None:
            return
        result = pb.GenerateResult()
        result.CopyFrom(state.last_turn.result)
        result.session_id = state.session_id
        key = (state.session_id, result.request_id, state.last_turn.digest)
        self.ledger.record(TurnRecord(key, result, state.turns))
        self._unconfirmed[state.session_id] = key

    async def prepare_turn(self, request: pb.GenerateRequest) -> npb.PreparedTurn:
        """What a session turn would run here, for a stand-in (engine ``prepare_turn``)."""
        prepared = await asyncio.to_thread(self.engine.prepare_turn, engine_request(request, None))
        return npb.PreparedTurn(token_ids=prepared.token_ids, turns=prepared.turns,
                                busy=prepared.busy, would_wait=prepared.would_wait,
                                free_slots=prepared.free_slots)

    async def commit_turn(self, commit: npb.CommitTurnRequest) -> int:
        """Append a turn a stand-in ran (engine ``append_turn``), then replicate it and record
        it in the turn ledger, as a turn that ran here: a retry of the client's request is
        answered from the record. Returns the session's turn version after it."""
        request, result = commit.request, commit.result
        incarnation = await self._lease_incarnation()
        finish = next((name for name, code in _FINISH.items() if code == result.finish_reason), "")
        key = turn_key(request)
        # An attempt while the turn enters the history: an export taken meanwhile waits for
        # its record (TurnLedger.last_turn) instead of leaving without it.
        begun = key is not None and self.ledger.try_begin(key)
        try:
            out, applied = await asyncio.to_thread(
                self.engine.append_turn, engine_request(request, None), commit.turns,
                list(commit.prompt_token_ids), list(result.token_ids), result.text, finish)
        except BaseException:
            if begun:
                self.ledger.end(key, None)
            raise
        record = TurnRecord(key, result, commit.turns + 1) if key is not None else None
        if not applied:  # a repeat must not displace the session's last record
            record = None
        if begun:  # now: a move may take the history while its push waits
            self.ledger.end(key, record.result if record is not None else None, commit.turns + 1)
        elif record is not None:
            self.ledger.record(record)
        # Again for a repeated commit: it may not have got there (without the record: the
        # session may have moved on since).
        try:
            await self._replicate(out, record, incarnation)
        except (TurnNotDurableError, NodeFencedError):
            if record is not None:  # kept, as a turn that ran here: a retry confirms it first
                self._unconfirmed[record.key[0]] = record.key
            raise
        await self.cuts.results_may_go()  # the commit's answer is the turn's result
        return commit.turns + 1

    async def node_stats(self) -> pb.NodeStats:
        raw = await asyncio.to_thread(self.engine.stats)
        if self.replication is not None:
            raw["replication"] = asdict(self.replication)
        return node_stats_message(raw, self.identity)

    async def stats(self) -> pb.StatsResponse:
        return pb.StatsResponse(nodes=[await self.node_stats()])

    async def clear_cache(self) -> int:
        return int(await asyncio.to_thread(self.engine.clear_cache))

    async def cleanup_sessions(self, max_age_s: float) -> int:
        """Remove sessions and replicas idle for longer than ``max_age_s``, and their turn
        records; returns how many sessions are gone."""
        removed = int(await asyncio.to_thread(self.engine.cleanup_sessions, max_age_s))
        held = {info.session_id for info in await asyncio.to_thread(self.engine.list_sessions)}
        self.ledger.retain(held)
        self._unconfirmed = {sid: key for sid, key in self._unconfirmed.items() if sid in held}
        return removed

    async def get_session(self, session_id: str, tenant: str | None) -> pb.SessionInfo:
        info = await asyncio.to_thread(self.engine.get_session, session_id, tenant)
        return session_message(info, self.identity.node_id)

    async def delete_session(self, session_id: str, tenant: str | None) -> None:
        try:
            await asyncio.to_thread(self.engine.delete_session, session_id, tenant)
        except SessionNotFoundError:
            # Gone from memory, yet perhaps still checkpointed (an earlier delete whose
            # checkpoint step failed): the checkpoint's copy goes now, and the delete is done.
            if self.on_session_deleted is None or not await self.on_session_deleted(session_id):
                raise
        else:
            if self.on_session_deleted is not None:
                await self.on_session_deleted(session_id)
        self.ledger.forget(session_id)
        self._unconfirmed.pop(session_id, None)

    async def list_sessions(self) -> list[pb.SessionInfo]:
        infos = await asyncio.to_thread(self.engine.list_sessions)
        return [session_message(i, self.identity.node_id) for i in infos]

    async def export_sessions(self, history_only: bool) -> AsyncIterator[ultrakv_pb2.BackupPart]:
        """A backup of this node's sessions (the client-facing service of a node serving
        without a coordinator), all as of one moment: one snapshot of the session table
        (node/backup_cut.py), each session whole, between two turns."""
        taken_at = time.time()
        snapshot = [s for s, replica in await asyncio.to_thread(self.engine.snapshot_sessions)
                    if not replica]
        yield ultrakv_pb2.BackupPart(header=ultrakv_pb2.BackupHeader(
            nodes=[ultrakv_pb2.BackupNode(
                node_id=self.identity.node_id, model=str(getattr(self.engine, "model_name", "")),
                model_fingerprint=str(getattr(self.engine, "model_fingerprint", "")))],
            num_sessions=len(snapshot),
            cut=ultrakv_pb2.BackupCut(cut_id=f"{self.identity.node_id}-{uuid.uuid4().hex[:12]}",
                                      taken_at=taken_at, attempts=1)))
        for session in snapshot:
            state = await self.with_last_turn(await asyncio.to_thread(
                self.engine.export_session, session.session_id, "cpu", session))
            if history_only:
                state = replace(state, kv=None, kv_tokens=0)
            for chunk in state_to_chunks(state):
                yield ultrakv_pb2.BackupPart(session=chunk)

    async def import_sessions(self, runs: AsyncIterator[list[npb.SessionChunk]]
                              ) -> ultrakv_pb2.ImportSessionsResponse:
        """A restore into this node: each session checked like an ImportSession stream
        (model fingerprint, history, KV shape and every checksum), its tenant kept. A session
        held here with more turns is kept, not rolled back (``skipped``); KV of another dtype
        than this node's cache comes in as the history alone (recomputed on the next turn)."""
        done = ultrakv_pb2.ImportSessionsResponse()
        layout = self.engine.session_layout
        async for run in runs:
            header = run[0].header if run and run[0].HasField("header") else None
            if header is not None:
                if await asyncio.to_thread(self._held_turns, header.session_id) > header.turns:
                    done.skipped += 1
                    continue
                if header.kv_tokens and header.kv_dtype != layout.kv_dtype:
                    run = history_only_chunks(header)
            assembler = StateAssembler()
            for chunk in run:
                first = assembler.header is None
                assembler.add(chunk)
                if first:
                    assembler.expect_kv_bytes(validate_session_header(assembler.header, layout))
            state = assembler.finish()
            kv_tokens = await asyncio.to_thread(self.engine.import_session, state)
            self.adopt_last_turn(state)
            done.sessions += 1
            done.num_tokens += len(state.token_ids)
            done.kv_tokens += kv_tokens
        return done

    def _held_turns(self, session_id: str) -> int:
        """The turns of the newest copy of ``session_id`` held here (0: none)."""
        try:
            return self.engine.get_session(session_id).turns
        except LookupError:
            return 0


# --- servicers -------------------------------------------------------------------------------

# A well-formed ImportSession refused for what its sender could not know beforehand: this
# node's KV dtype (the resharder then moves the history alone) or its model. The node reads
# the rest of such a stream before it answers (see _drain).
_PEER_MISMATCHES = frozenset({"kv_dtype", "model_fingerprint"})
DRAIN_MAX_S = 30.0


def _mismatch_drain_bytes(header: npb.SessionHeader, layout: Any) -> int:
    """What a stream refused for a mismatch may still carry: the declared tokens' KV here,
    four times over (a float32 cache's against an int8 one's), and a chunk's slack."""
    tokens = min(max(header.kv_tokens, 0), len(header.token_ids))
    return 4 * layout.kv_bytes(tokens) + (1 << 20)


async def _drain(chunks: AsyncIterator[Any], max_bytes: int) -> None:
    """Read what is left of a refused stream (discarding it), within ``max_bytes`` and
    ``DRAIN_MAX_S``. A server that ends a client-streaming call while the client still writes
    resets the stream, and a write the reset catches in flight fails the client's call with
    INTERNAL ("Internal error from Core") instead of the server's status: a resharder moving
    a session to a node with another KV dtype then saw INTERNAL rather than the kv_dtype
    refusal that tells it to move the history alone (a race the move lost under load). A
    stream that breaks its own header (more chunks, bad checksums) is not read on."""
    read = 0
    with contextlib.suppress(Exception):
        async with asyncio.timeout(DRAIN_MAX_S):
            async for chunk in chunks:
                read += chunk.ByteSize() if isinstance(chunk, npb.SessionChunk) else 0
                if read > max_bytes:
                    return


class NodeServicer:
    """``ultrakv.v1.NodeService``: generation plus the session operations the cluster needs
    (export/import for migration, history replication, listing, stats)."""

    def __init__(self, backend: LocalBackend, limits: Limits,
                 pacing: StreamPacing | None = None,
                 peers_authenticated: bool = False,
                 block_log: BlockEventLog | None = None) -> None:
        self.backend = backend
        self.engine = backend.engine
        self.limits = limits
        self.block_log = block_log
        # Imported KV enters the shared prefix cache only from an authenticated peer: anyone
        # else could plant KV that changes other users' outputs for the same tokens.
        self.peers_authenticated = peers_authenticated
        # Generate and the session calls are the client-facing service's, over the same backend,
        # trusting the tenant its caller (the coordinator) set.
        self._client_facing = UltraKVServicer(backend, limits, pacing, edge=False)

    def stop_idle_streams(self) -> None:
        self._client_facing.stop_idle_streams()

    async def Generate(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with contextlib.aclosing(self._client_facing.Generate(requests, context)) as stream:
            async for message in stream:
                yield message

    async def GenerateMany(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[pb.GenerateBatch]:
        """Generate, each write one batch of every event pending (a coordinator's requests
        to this node on one stream), on the same pacer as the Generate streams."""
        async with contextlib.aclosing(self._client_facing.GenerateMany(requests, context)) as stream:
            async for batch in stream:
                yield batch

    @unary
    async def Stats(self, request: pb.StatsRequest,
                    context: grpc.aio.ServicerContext) -> pb.NodeStats:
        return await self.backend.node_stats()

    @unary
    async def Health(self, request: npb.NodeHealthRequest,
                     context: grpc.aio.ServicerContext) -> npb.NodeHealthResponse:
        return npb.NodeHealthResponse(
            serving=self.backend.serving, node_id=self.backend.identity.node_id,
            model=str(getattr(self.engine, "model_name", "")),
            model_fingerprint=self._fingerprint(),
            uptime_s=time.time() - self.backend.identity.started_at)

    def _fingerprint(self) -> str:
        return str(getattr(self.engine, "model_fingerprint", ""))

    async def ExportSession(self, request: npb.ExportSessionRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[npb.SessionChunk]:
        """Stream one session: header, KV chunks with sha256, trailer."""
        try:
            sid = validate_session_key(request.session_id)
            validate_chunk_bytes(request.chunk_bytes)
            snapshot = (self.backend.cuts.session(request.cut_id, sid) if request.cut_id
                        else None)
            state = await asyncio.to_thread(self.engine.export_session, sid, "cpu", snapshot)
            state = await self.backend.with_last_turn(state)
        except Exception as exc:
            await abort_with(context, rejection_from_error(exc))
            return
        if not request.include_kv:
            state.kv, state.kv_tokens = None, 0
        for chunk in state_to_chunks(state, request.chunk_bytes or DEFAULT_CHUNK_BYTES):
            yield chunk

    async def ImportSession(self, chunks: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext) -> npb.ImportSessionResponse:
        """Receive a session. The header is checked against this node's model (history ids,
        fingerprint, KV shape and dtype) before any KV is read; the KV is then taken chunk by
        chunk up to what the header declared, every checksum verified."""
        assembler = StateAssembler()
        layout = self.engine.session_layout
        try:
            async for chunk in chunks:
                if isinstance(chunk, Malformed):
                    raise chunk.rejection()
                first = assembler.header is None
                assembler.add(chunk)
                if first:
                    try:
                        assembler.expect_kv_bytes(validate_session_header(assembler.header, layout))
                    except RequestRejected as exc:
                        if exc.field in _PEER_MISMATCHES:
                            await _drain(chunks, _mismatch_drain_bytes(assembler.header, layout))
                        raise
            state = assembler.finish()
            if state.kv is not None and not self.peers_authenticated:
                log.warning("session %s imported without its KV: the caller is not an "
                            "authenticated cluster peer (no cluster secret or peer TLS)",
                            state.session_id)
                state = replace(state, kv=None, kv_tokens=0)
            await asyncio.to_thread(self.engine.import_session, state)
            self.backend.adopt_last_turn(state)
            self.backend.cuts.imported(state.session_id)
        except TransferError as exc:
            await abort_with(context, RequestRejected(grpc.StatusCode.DATA_LOSS, "chunks", str(exc)))
        except IncompatibleSessionError as exc:
            await abort_with(context, RequestRejected(grpc.StatusCode.FAILED_PRECONDITION,
                                                  "model_fingerprint", str(exc)))
        except Exception as exc:
            await abort_with(context, rejection_from_error(exc))
        return npb.ImportSessionResponse(session_id=state.session_id,
                                         num_tokens=len(state.token_ids),
                                         kv_tokens=state.kv_tokens)

    @unary
    async def ReplicateHistory(self, request: npb.ReplicateHistoryRequest,
                               context: grpc.aio.ServicerContext
                               ) -> npb.ReplicateHistoryResponse:
        """Hold a history for a ring neighbour; checked like an imported session's."""
        sid = validate_tenant_key(request.session_id, request.tenant)
        validate_last_turn(request)
        try:
            await asyncio.to_thread(self.engine.store_replica, sid, list(request.token_ids),
                                    request.turns, request.tenant, message_pairs(request.messages))
        except SessionOwnedError as exc:
            raise RequestRejected(grpc.StatusCode.FAILED_PRECONDITION, "turns", str(exc)) from None
        if request.HasField("last_result"):  # a retry of that turn reaching here is answered
            result = pb.GenerateResult()
            result.CopyFrom(request.last_result)
            result.session_id = sid
            key = (sid, result.request_id, request.last_digest)
            self.backend.ledger.record(TurnRecord(key, result, request.turns))
        return npb.ReplicateHistoryResponse()

    @unary
    async def PromoteReplica(self, request: npb.PromoteReplicaRequest,
                             context: grpc.aio.ServicerContext) -> npb.PromoteReplicaResponse:
        sid = validate_session_key(request.session_id)
        if not await asyncio.to_thread(self.engine.promote_replica, sid):
            raise SessionNotFoundError(sid)
        return npb.PromoteReplicaResponse()

    @unary
    async def ReleaseSession(self, request: npb.ReleaseSessionRequest,
                             context: grpc.aio.ServicerContext) -> npb.ReleaseSessionResponse:
        sid = validate_session_key(request.session_id)
        try:
            await asyncio.to_thread(self.engine.release_session, sid, request.turns)
        except SessionChangedError as exc:
            raise RequestRejected(grpc.StatusCode.ABORTED, "turns", str(exc)) from None
        self.backend.ledger.forget(sid)
        return npb.ReleaseSessionResponse()

    @unary
    async def PrepareTurn(self, request: pb.GenerateRequest,
                          context: grpc.aio.ServicerContext) -> npb.PreparedTurn:
        """The token ids and turn version of a session turn another node is to run."""
        if not request.HasField("session_id"):
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "session_id",
                                  "session_id must be set: only a session turn is prepared")
        return await self.backend.prepare_turn(validate_generate(request, self.limits, keyed=True))

    @unary
    async def CommitTurn(self, request: npb.CommitTurnRequest,
                         context: grpc.aio.ServicerContext) -> npb.CommitTurnResponse:
        """Append a turn another node ran (ABORTED when the session moved on meanwhile)."""
        if not request.request.HasField("session_id"):
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "request.session_id",
                                  "request.session_id must be set: only a session turn is committed")
        if request.turns < 0:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "turns",
                                  f"turns must be >= 0, got {request.turns}")
        commit = npb.CommitTurnRequest()
        commit.CopyFrom(request)
        commit.request.CopyFrom(validate_generate(request.request, self.limits, keyed=True))
        try:
            turns = await self.backend.commit_turn(commit)
        except TurnConflictError as exc:
            raise RequestRejected(grpc.StatusCode.ABORTED, "turns", str(exc)) from None
        return npb.CommitTurnResponse(turns=turns)

    @unary
    async def ListSessions(self, request: npb.ListSessionsRequest,
                           context: grpc.aio.ServicerContext) -> npb.ListSessionsResponse:
        return npb.ListSessionsResponse(sessions=await self.backend.list_sessions())

    @unary
    async def BeginCut(self, request: npb.BeginCutRequest,
                       context: grpc.aio.ServicerContext) -> npb.BeginCutResponse:
        """Hold turn results back, then snapshot the sessions (node/backup_cut.py)."""
        cuts = self.backend.cuts
        cut = cuts.begin(request.cut_id, request.hold_s)
        try:
            copies = await asyncio.to_thread(self.engine.snapshot_sessions)
            infos = await asyncio.to_thread(self.engine.session_infos, copies)
        except BaseException:
            cuts.end(cut.cut_id)
            raise
        cut.snapshot = {s.session_id: (s, replica) for s, replica in copies}
        node = self.backend.identity.node_id
        return npb.BeginCutResponse(sessions=[session_message(i, node) for i in infos])

    @unary
    async def ReleaseCut(self, request: npb.CutRequest,
                         context: grpc.aio.ServicerContext) -> npb.ReleaseCutResponse:
        cut, intact = self.backend.cuts.release(request.cut_id)
        return npb.ReleaseCutResponse(intact=intact, held_s=cut.released_at - cut.began_at,
                                      imported_session_ids=sorted(cut.imported))

    @unary
    async def EndCut(self, request: npb.CutRequest,
                     context: grpc.aio.ServicerContext) -> npb.EndCutResponse:
        self.backend.cuts.end(request.cut_id)
        return npb.EndCutResponse()

    async def GetSession(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._client_facing.GetSession(request, context)

    async def DeleteSession(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._client_facing.DeleteSession(request, context)

    async def CleanupSessions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._client_facing.CleanupSessions(request, context)

    async def ClearCache(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._client_facing.ClearCache(request, context)

    async def BlockEvents(self, request: Any, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[npb.BlockEventsMessage]:
        """Where this node's blocks live: a snapshot unless the caller's (epoch, since_seq)
        can be continued, then each change as it happens, until the caller hangs up."""
        try:
            if isinstance(request, Malformed):
                raise request.rejection()
            if self.block_log is None:
                raise RequestRejected(grpc.StatusCode.UNIMPLEMENTED, "",
                                      "this node publishes no block events")
            epoch, since = validate_epoch(request.epoch), request.since_seq
        except RequestRejected as exc:
            await abort_with(context, exc)
            return
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server stopped
                loop.call_soon_threadsafe(changed.set)

        stop = self.block_log.listen(wake)
        try:
            while True:
                changed.clear()
                for batch in self.block_log.read(epoch, since):
                    yield batch_to_message(batch)
                    epoch, since = batch.epoch, batch.last_seq
                await changed.wait()
        finally:
            stop()

    @unary
    async def Tokenize(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> npb.TokenizeResponse:
        """The token ids a request without a session runs here (tokenizer, chat template)."""
        if request.HasField("session_id"):
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "session_id",
                                  "session_id must be unset: a session's tokens depend on its history")
        req = engine_request(validate_generate(request, self.limits), None)
        ids = await asyncio.to_thread(self.engine.prompt_token_ids, req)
        return npb.TokenizeResponse(token_ids=ids)


# --- the server ------------------------------------------------------------------------------


@dataclass
class ServerSettings:
    """Where and how a node server listens."""

    host: str = "0.0.0.0"
    port: int = 50051
    node_id: str = ""
    limits: Limits = field(default_factory=Limits)
    grace_period_s: float = 5.0
    max_message_bytes: int = 64 * 1024 * 1024
    # Calls one connection may hold open at once; a coordinator forwards every request to
    # this node over one connection, so this matches the node's admission queue.
    max_streams_per_connection: int = 1024
    # Generate streams' message budget (StreamPacing: the wire's cost is per message).
    stream_flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S
    stream_messages_per_s: float = PACED_MESSAGES_PER_S
    stream_max_wait_ms: float = MAX_FLUSH_INTERVAL_S * 1000
    tls_cert: str = ""  # PEM paths; both set = TLS
    tls_key: str = ""
    # PEM CA of the cluster: with tls_cert/tls_key, callers must present a certificate it
    # signed (mutual TLS), and this node presents tls_cert when it dials its peers.
    peer_ca_cert: str = ""
    # The secret every internal call must carry (cluster/peer_auth.py); "" = none.
    cluster_secret_file: str = ""
    metrics_port: int = 0  # Prometheus /metrics over HTTP; 0 = off
    # The host peers and coordinators dial (e.g. a pod's DNS name); "" = derived from host.
    advertise_host: str = ""
    http_port: int = 0  # the OpenAI-compatible API, /health and /metrics; 0 = off
    # The client-facing edge (the config file's security section): keys, limits, quotas.
    security: SecuritySettings = field(default_factory=SecuritySettings)
    # Health turns NOT_SERVING while requests wait or run and no model step has completed
    # for this long (a hung pool or step): the coordinator then routes around the node.
    stall_timeout_s: float = 60.0
    # Serve the internal NodeService (a cluster member). A node serving clients alone
    # (single-process `ultrakv serve`) turns it off: no one needs it there.
    node_service: bool = True

    def __post_init__(self) -> None:
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")
        self.stream_pacing()  # validates the stream_* keys
        if self.peer_ca_cert and not (self.tls_cert and self.tls_key):
            raise ValueError("peer_ca_cert needs tls_cert and tls_key (this node's certificate)")

    def stream_pacing(self) -> StreamPacing:
        """The stream_* keys as one budget (ValueError naming the key out of its range)."""
        return StreamPacing(self.stream_flush_interval_s, self.stream_messages_per_s,
                            self.stream_max_wait_ms)

    def peer_tls(self) -> PeerTLS | None:
        """This node's mutual-TLS identity towards its peers, when configured."""
        if not self.peer_ca_cert:
            return None
        return PeerTLS(self.peer_ca_cert, self.tls_cert, self.tls_key)


def _block_log_of(engine: Any) -> BlockEventLog:
    """A block event log that starts from what ``engine``'s tiers hold now (a disk tier
    scanned at start included) and then hears every change."""
    if isinstance(engine, EngineClient):  # the core's changes arrive with its step messages
        return engine.block_log
    log = BlockEventLog(engine.config.block_size, engine.chain_root)
    for one in getattr(engine, "engines", [engine]):  # a data-parallel node: every device's pool
        log(True, one.pool.hashes(), GPU_TIER)
        tiers = one.tiers
        if tiers is not None and tiers.host is not None:
            log(True, tiers.host.hashes(), "cpu")
        if tiers is not None and tiers.disk is not None:
            log(True, tiers.disk.hashes(), "disk")
        one.pool.add_observer(log)
    return log


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
        self.security = EdgeSecurity(self.settings.security)
        engine.sessions.quota = TenantQuota(self.settings.security.tenant_max_sessions,
                                            self.settings.security.tenant_max_session_tokens)
        self.health = HealthService()
        self._server: grpc.aio.Server | None = None
        self._stream_servicers: list[Any] = []  # their streams end when idle at stop
        self._metrics_http: Any = None
        self.http: HttpServer | None = None
        s = self.settings
        self.cluster_secret = read_cluster_secret(s.cluster_secret_file) if s.cluster_secret_file else ""
        self.peer_tls = s.peer_tls()
        self._health_names: tuple[str, ...] = ()
        self._progress_watch: asyncio.Task[None] | None = None
        # Where blocks live, for the coordinators' prefix routing (NodeService.BlockEvents).
        self.block_log: BlockEventLog | None = None
        if self.settings.node_service:
            self.block_log = _block_log_of(engine)

    @property
    def address(self) -> str:
        """Where others dial this server (registered in etcd as the node's address)."""
        host = self.settings.advertise_host or dial_host(self.settings.host)
        return f"{host}:{self.port}"

    def _not_ready(self) -> str | None:
        if self._server is None:
            return "the node is not serving (starting or stopping)"
        if not self.backend.serving:
            return f"the engine made no progress for {self.settings.stall_timeout_s:g} s"
        return None

    @property
    def listen_address(self) -> str:
        """The socket's own address (``0.0.0.0:PORT`` = every interface)."""
        return listen_address(self.settings.host, self.port)

    async def start(self) -> int:
        """Bind and start; return the bound port (``port=0`` picks a free one). Raises
        :class:`PortInUseError` naming the holder when the port is taken."""
        check_server_ports(self.settings.host, self.settings.port, self.settings.metrics_port,
                           self.settings.http_port, "node server")
        options = [*server_options(self.settings.max_streams_per_connection,
                                   self.settings.max_message_bytes), *GRPC_SERVER_OPTIONS]
        limits = self.settings.limits
        internal = self.settings.node_service
        interceptors = (EdgeSecurityInterceptor(self.security, limits), *self.interceptors)
        if internal and self.cluster_secret:  # a member answers only its peers (and probes)
            interceptors = (ClusterSecretInterceptor(self.cluster_secret), *interceptors)
        server = grpc.aio.server(options=options, interceptors=interceptors)
        pacing = self.settings.stream_pacing()
        services = [ULTRAKV_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
        self._stream_servicers = [UltraKVServicer(self.backend, limits, pacing)]
        add_servicer(server, self._stream_servicers[0], ULTRAKV_SERVICE)
        if internal:
            authenticated = bool(self.cluster_secret) or self.peer_tls is not None
            self._stream_servicers.append(NodeServicer(self.backend, limits, pacing, authenticated,
                                                       self.block_log))
            add_servicer(server, self._stream_servicers[-1], NODE_SERVICE)
            services.append(NODE_SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(services, server)
        bind = f"{self.settings.host}:{self.settings.port}"
        member_locked = internal and (bool(self.cluster_secret) or self.peer_tls is not None)
        for warning in exposure_warnings(
                self.settings.host, self.settings.port, internal_open=internal and not member_locked,
                clients_authenticated=member_locked or bool(self.settings.security.keys_file),
                tls=bool(self.settings.tls_cert or self.settings.security.tls_cert)):
            log.warning(warning)
        sec = self.settings.security
        creds = None
        if self.peer_tls is not None:  # a cluster member: mutual TLS with its peers
            creds = self.peer_tls.server_credentials()
        elif sec.tls_cert:  # single-process serve: the client port's TLS (mTLS with a client CA)
            creds = server_credentials(sec.tls_cert, sec.tls_key, sec.tls_client_ca)
        elif self.settings.tls_cert and self.settings.tls_key:
            creds = server_credentials(self.settings.tls_cert, self.settings.tls_key)
        try:
            self.port = (server.add_secure_port(bind, creds) if creds is not None
                         else server.add_insecure_port(bind))
        except RuntimeError:  # taken between the check and the bind
            raise PortInUseError(port_in_use_message(self.settings.host, self.settings.port,
                                                     "node server")) from None
        await server.start()
        self._server = server
        self.backend.identity.address = self.address
        self._health_names = ("", ULTRAKV_SERVICE, *([NODE_SERVICE] if internal else []))
        for name in self._health_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._progress_watch = asyncio.create_task(self._watch_progress(), name="progress-watch")
        registry = CollectorRegistry()  # own registry: several servers in one process
        registry.register(NodeCollector(self.engine, self.backend.identity.node_id,
                                        lambda: self.backend.replication))
        registry.register(self.security.events)
        if self.settings.metrics_port:
            self._metrics_http = serve_metrics(self.settings.metrics_port, registry,
                                               self.settings.host)
        if self.settings.http_port:
            model = str(getattr(self.engine, "model_name", ""))
            self.http = HttpServer(ApiHost(self.backend, limits, lambda: [model], self._not_ready,
                                           registry, security=self.security),
                                   self.settings.host, self.settings.http_port,
                                   self.settings.grace_period_s, self._http_tls())
            try:
                await self.http.start()
            except OSError:
                await self.stop()
                raise
            log.info("OpenAI-compatible API on %s://%s:%d/v1", self.http.scheme,
                     dial_host(self.settings.host), self.http.port)
        return self.port

    def _http_tls(self) -> TlsFiles | None:
        """The client port's TLS, for the HTTP port too."""
        sec = self.settings.security
        if sec.tls_cert:
            return TlsFiles(sec.tls_cert, sec.tls_key, sec.tls_client_ca)
        if self.settings.tls_cert and self.settings.tls_key:
            return TlsFiles(self.settings.tls_cert, self.settings.tls_key)
        return None
    async def _watch_progress(self) -> None:
        """Report NOT_SERVING while the engine is stalled, SERVING again once it moves.

        On a thread of its own, not the loop's shared pool: calls on a wedged engine core
        (node/engine_client.py) never return, and enough of them would hold every thread of
        that pool and keep this watch from ever noticing."""
        limit = self.settings.stall_timeout_s
        loop = asyncio.get_running_loop()
        watcher = ThreadPoolExecutor(1, thread_name_prefix="ultrakv-progress-watch")
        try:
            while True:
                await asyncio.sleep(min(1.0, limit / 4))
                stalled = await loop.run_in_executor(
                    watcher, self.engine.seconds_without_progress) > limit
                await self._report_progress(stalled, limit)
        finally:
            watcher.shutdown(wait=False)

    async def _report_progress(self, stalled: bool, limit: float) -> None:
        if stalled == (not self.backend.serving):
            return
        self.backend.serving = not stalled
        if stalled:
            log.error("engine made no progress for %.0f s with requests waiting: "
                      "reporting NOT_SERVING", limit)
        status = (health_pb2.HealthCheckResponse.NOT_SERVING if stalled
                  else health_pb2.HealthCheckResponse.SERVING)
        for name in self._health_names:
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Report NOT_SERVING, let running requests finish within the grace period, stop."""
        await cancel_task(self._progress_watch)
        self._progress_watch = None
        server, self._server = self._server, None  # /health answers 503 from here on
        http, self.http = self.http, None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

        async def stop_grpc() -> None:
            if server is None:
                return
            await self.health.enter_graceful_shutdown()
            for servicer in self._stream_servicers:  # idle links end now, not after the grace
                servicer.stop_idle_streams()
            await server.stop(self.settings.grace_period_s)

        await all_of(http.stop() if http is not None else asyncio.sleep(0), stop_grpc())

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve_until_signalled(server: NodeServer) -> None:
    """Start ``server``, run until SIGINT/SIGTERM, then stop it cleanly."""
    await server.start()
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.security.reload_keys)
    log.info("node %s serving %s, listening on %s (clients dial %s)",
             server.backend.identity.node_id, getattr(server.engine, "model_name", "?"),
             server.listen_address, server.address)
    await stop.wait()
    exit_on_second_signal(loop)
    log.info("stopping (grace %.1fs; a second Ctrl-C stops at once)", server.settings.grace_period_s)
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
