"""Re-sharding: after a ring change, settle every session whose copies disagree with it.

``plan_moves`` (pure) finds, for each session, its authoritative copy: the one with the most
turns (a turn count is a version; a history's length is not), on a node that answers before
one in a dead node's checkpoint, a session before a replica, the owner's before another's.
Replicas count like sessions: a session created since its owner's last checkpoint may have
its replica on the ring successor as its only copy. A session needs a move when that copy is
not a session on its owner under the new ring, or when a session copy sits on another node
that answers (a stale copy, perhaps serving a turn right now). ``Resharder`` carries each
move out, deciding again from fresh copies at that moment:

* the authoritative copy is on another node that answers (a node joined, the old owner is
  draining, a dead node came back): history and KV stream node to node (``ExportSession``
  piped into ``ImportSession``; a replica is promoted first), then that copy is deleted: the
  cut-over. The next turn on the new owner hits the moved KV.
* it is the owner's own replica or a dead node's checkpoint: the session is restored on the
  owner from its replica and the newest checkpoint that holds it (the dead node's manifest
  in etcd, its files on shared storage); the checkpoint's KV is imported when it covers a
  prefix of the history, the rest is recomputed on the next turn.

Then stale session copies elsewhere are deleted and the history is replicated to the new
owner's successor. The coordinator runs a move that may meet a turn in flight under the
session's lock (``SessionGate`` in coordinator/server.py): the turn finishes first, and the
move sees the copy that turn wrote. Requests for a moving session wait until it is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from ultrakv.cluster.checkpoint import Manifest, load_manifest, merge_with_history, read_session
from ultrakv.cluster.peers import PeerChannels
from ultrakv.cluster.ring import DEFAULT_REPLICAS, HashRing, replica_targets, validate_replicas
from ultrakv.cluster.session_state import LastTurn, SessionState
from ultrakv.cluster.session_transfer import (
    chat_messages,
    chunks_to_state,
    history_only_chunks,
    last_turn_of,
    message_pairs,
    state_to_chunks,
)
from ultrakv.cluster.store import EtcdStore, EtcdUnavailableError
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import types_pb2 as pb

log = logging.getLogger("ultrakv.coordinator.resharding")

# How long a plan waits for the listing of a node held off the ring (it may be stopped).
OFF_RING_LISTING_S = 1.0
# The steps of a move that are best effort (a failure is logged, and the next turn makes up
# for it): replicating the moved history, dropping stale copies. Short and side by side: a
# session's requests wait for its move, and one stalled successor (alive, not marked down)
# held every move for the whole RPC timeout per step.
BEST_EFFORT_RPC_S = 5.0


@dataclass(frozen=True)
class Copy:
    """A copy of a session held by a node (live) or by a dead node's checkpoint."""

    node: str
    turns: int  # the copy's version: completed turns
    num_tokens: int
    live: bool
    replica: bool = False  # a replica held for the owner, not a session served from there


def authoritative(held: Iterable[Copy], owner: str) -> Copy:
    """The copy a session continues from: most turns; then live before checkpointed, a
    session before a replica, the owner's before another's."""
    return max(held, key=lambda c: (c.turns, c.live, not c.replica, c.node == owner))


@dataclass(frozen=True)
class Move:
    """One session to settle on ``target``, its owner under the new ring."""

    session_id: str
    source: str  # where the authoritative copy was when planned
    target: str
    live: bool  # a session copy off the owner answers: it may be serving a turn right now
    copies: tuple[Copy, ...] = field(default=(), compare=False)  # every copy when planned


@dataclass
class Plan:
    """The moves of one ring change."""

    ring: HashRing = field(default_factory=HashRing)  # the ring the moves lead to
    moves: list[Move] = field(default_factory=list)
    sessions: int = 0  # sessions seen in all

    @property
    def moved_fraction(self) -> float:
        return len(self.moves) / self.sessions if self.sessions else 0.0


def plan_moves(copies: Mapping[str, list[Copy]], ring: HashRing) -> Plan:
    """The sessions whose authoritative copy is not a session on its owner under ``ring``,
    or that have a stale session copy on another node that answers."""
    plan = Plan(ring=ring, sessions=len(copies))
    for sid, held in sorted(copies.items()):
        owner = ring.lookup(sid)
        best = authoritative(held, owner)
        stale = any(c.live and not c.replica and c.node != owner for c in held)
        if best.node == owner and not best.replica and not stale:
            continue
        plan.moves.append(Move(sid, best.node, owner, live=stale, copies=tuple(held)))
    return plan


@dataclass
class MoveResult:
    """How one move went."""

    move: Move
    ok: bool
    kv_tokens: int = 0
    error: str = ""


async def import_session(stub: Any, node: str, chunks: list[npb.SessionChunk],
                         timeout_s: float) -> npb.ImportSessionResponse:
    """ImportSession of ``chunks`` on ``node`` (a move or a restore). A node whose KV cache
    holds another dtype (int8, fp8 or float: ``kv_cache_dtype``) refuses the KV, naming
    kv_dtype; the history then goes alone and the node recomputes the KV on the session's
    next turn."""
    try:
        return await stub.ImportSession(iter(chunks), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        field = dict(exc.trailing_metadata() or ()).get("ultrakv-field")
        if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or field != "kv_dtype":
            raise
        log.warning("session %s: %s refused its KV (%s); moving the history only",
                    chunks[0].header.session_id, node, exc.details())
    return await stub.ImportSession(iter(history_only_chunks(chunks[0].header)), timeout=timeout_s)


class Resharder:
    """Computes and carries out plans over node RPCs.

    ``addresses()`` maps node ids to addresses (membership); dead nodes need no address.
    """

    def __init__(self, store: EtcdStore, peers: PeerChannels,
                 addresses: Callable[[], Mapping[str, str]], concurrency: int = 4,
                 rpc_timeout_s: float = 30.0, replicas: int = DEFAULT_REPLICAS) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.store = store
        self.peers = peers
        self.addresses = addresses
        self.concurrency = concurrency
        self.rpc_timeout_s = rpc_timeout_s
        self.replicas = validate_replicas(replicas)
        self._manifests: dict[str, Manifest] = {}

    def _stub(self, node: str):
        return self.peers.stub(self.addresses()[node])

    async def collect(self, live: Iterable[str], dead: Iterable[str],
                      off_ring: Iterable[str] = ()) -> dict[str, list[Copy]]:
        """Every session copy, replicas included: listed on each live node, read from each
        dead node's manifest, and listed on each ``off_ring`` node (registered, but held off
        the ring: marked down, or its forward failed) that answers at once. Such a node may
        be slow rather than dead, and its ring predecessors still push replicas to it: its
        copy may be the only one holding a session's last acknowledged turns."""
        copies: dict[str, list[Copy]] = {}

        async def listed(node: str, timeout_s: float, quiet: bool) -> list[pb.SessionInfo]:
            try:
                resp = await self._stub(node).ListSessions(npb.ListSessionsRequest(),
                                                           timeout=timeout_s)
                return list(resp.sessions)
            except (grpc.aio.AioRpcError, KeyError) as exc:
                if not quiet:
                    log.warning("listing sessions of %s failed: %s", node, exc)
                return []

        # Short: the ring change waits for these listings (shorter still for a node that may
        # be stopped: it is expected not to answer).
        live, off_ring = sorted(live), sorted(set(off_ring) - set(live))
        asked = [listed(n, min(5.0, self.rpc_timeout_s), False) for n in live]
        asked += [listed(n, min(OFF_RING_LISTING_S, self.rpc_timeout_s), True) for n in off_ring]
        for node, infos in zip(live + off_ring, await asyncio.gather(*asked), strict=True):
            for info in infos:
                copies.setdefault(info.session_id, []).append(
                    Copy(node, info.turns, int(info.num_tokens), True, info.replica))
        for node in sorted(dead):
            try:
                manifest = await load_manifest(self.store, node)
            except EtcdUnavailableError as exc:
                # Replicas still carry every completed turn; only the KV is recomputed.
                log.warning("no checkpoint of dead node %s: %s", node, exc)
                continue
            if manifest is None:
                continue
            self._manifests[node] = manifest
            for sid, entry in manifest.sessions.items():
                copies.setdefault(sid, []).append(
                    Copy(node, entry.turns, entry.num_tokens, False, entry.replica))
        return copies

    async def plan(self, ring: HashRing, live: Iterable[str], dead: Iterable[str],
                   off_ring: Iterable[str] = ()) -> Plan:
        return plan_moves(await self.collect(live, dead, off_ring), ring)

    async def move(self, move: Move, ring: HashRing) -> MoveResult:
        """Carry out one move from the copies as they are now (a turn may have completed
        since the plan), drop stale session copies, then replicate the session's history to
        the new owner's successor on ``ring`` (a moved session is as durable as one that
        just took a turn); never raises."""
        sid, target = move.session_id, move.target
        try:
            held = await self._refresh(move)
            if not held:
                raise ValueError(f"session {sid}: no copy left to move")
            best = authoritative(held, target)
            if best.node == target and not best.replica:
                state = await self._export(target, sid, include_kv=False)
            elif best.live and best.node != target:
                state = await self._migrate(sid, best, target)
            else:
                checkpoints = [c for c in held if not c.live and c.node in self._manifests]
                newest = max(checkpoints, key=lambda c: c.turns, default=None)
                state = await self._restore(sid, target, newest)
            stale = [c.node for c in held  # the owner has a newer copy
                     if c.live and not c.replica and c.node not in (target, best.node)]
            await asyncio.gather(
                *(self._drop(sid, node) for node in stale),
                self.replicate(sid, state.token_ids, state.turns, state.tenant, target, ring,
                               state.messages, state.last_turn))
            return MoveResult(replace(move, source=best.node), True, state.kv_tokens)
        except (grpc.aio.AioRpcError, OSError, ValueError, KeyError) as exc:
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.error("moving session %s %s -> %s failed: %s", sid, move.source, target, detail)
            return MoveResult(move, False, error=detail or type(exc).__name__)

    async def _refresh(self, move: Move) -> list[Copy]:
        """The move's copies as they are now: each live holder (and the target) asked again;
        a holder that does not answer keeps its planned copy, checkpoints stay as read."""
        nodes = sorted({c.node for c in move.copies if c.live} | {move.target})
        planned = {c.node: c for c in move.copies}

        async def ask(node: str) -> Copy | None:
            try:
                info = await self._stub(node).GetSession(
                    pb.GetSessionRequest(session_id=move.session_id, any_tenant=True),
                    timeout=min(5.0, self.rpc_timeout_s))
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                return planned.get(node)
            except KeyError:  # left the cluster
                return None
            return Copy(node, info.turns, int(info.num_tokens), True, info.replica)

        fresh = await asyncio.gather(*(ask(n) for n in nodes))
        return [c for c in fresh if c is not None] + [c for c in move.copies if not c.live]

    async def _export(self, node: str, session_id: str, include_kv: bool) -> SessionState:
        chunks = [c async for c in self._stub(node).ExportSession(
            npb.ExportSessionRequest(session_id=session_id, include_kv=include_kv),
            timeout=self.rpc_timeout_s)]
        return chunks_to_state(chunks)

    async def _promote(self, node: str, session_id: str) -> None:
        try:
            await self._stub(node).PromoteReplica(
                npb.PromoteReplicaRequest(session_id=session_id), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise

    async def replicate(self, session_id: str, history: list[int], turns: int, tenant: str,
                        owner: str, ring: HashRing,
                        messages: Sequence[tuple[str, str]] = (),
                        last_turn: LastTurn | None = None) -> None:
        """Store the session's history (and chat ``messages``, and the record of the turn
        that made it, ``last_turn``) on ``owner``'s ``replicas`` successors on ``ring``, side
        by side (a failure is logged: the next turn replicates again)."""
        request = npb.ReplicateHistoryRequest(session_id=session_id, token_ids=history,
                                              turns=turns, tenant=tenant,
                                              messages=chat_messages(messages))
        if last_turn is not None:
            request.last_result.CopyFrom(last_turn.result)
            request.last_digest = last_turn.digest

        async def one(node: str) -> None:
            try:
                await self._stub(node).ReplicateHistory(
                    request, timeout=min(BEST_EFFORT_RPC_S, self.rpc_timeout_s))
            except (grpc.aio.AioRpcError, KeyError) as exc:
                log.warning("replicating moved session %s to %s failed: %s", session_id, node,
                            exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else exc)

        await asyncio.gather(*(one(n) for n in replica_targets(ring, session_id, owner)
                               [:self.replicas]))

    async def _migrate(self, session_id: str, source: Copy, target: str) -> SessionState:
        """Stream the session ``source.node`` -> ``target``, then release the source copy
        (refused while a turn runs or ran on it since the export: the move then fails, to be
        retried, and the imported copy is dropped)."""
        if source.replica:
            await self._promote(source.node, session_id)
        chunks = [c async for c in self._stub(source.node).ExportSession(
            npb.ExportSessionRequest(session_id=session_id, include_kv=True),
            timeout=self.rpc_timeout_s)]
        header = chunks[0].header
        resp = await self._import(target, chunks)
        try:  # cut over: one owner from here on, unless a turn ran on the source meanwhile
            await self._stub(source.node).ReleaseSession(npb.ReleaseSessionRequest(
                session_id=session_id, turns=header.turns), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: nothing left to release
                # A turn ran (or runs) on the source through another coordinator: the copy
                # just imported is older than the source's. It goes; the move is retried.
                await self._drop(session_id, target)
                raise
        return SessionState(session_id, list(header.token_ids), header.turns,
                            header.model_fingerprint, kv_tokens=resp.kv_tokens,
                            tenant=header.tenant, messages=message_pairs(header.messages),
                            last_turn=last_turn_of(header))

    async def _restore(self, session_id: str, target: str,
                       checkpoint: Copy | None) -> SessionState:
        """The target's own copy (its replica promoted) merged with ``checkpoint`` (a dead
        node's), imported on the target."""
        history: list[int] = []
        turns = 0
        fingerprint = tenant = ""
        messages: list[tuple[str, str]] = []
        last_turn: LastTurn | None = None
        await self._promote(target, session_id)
        try:
            held = await self._export(target, session_id, include_kv=False)
            history, turns, fingerprint = held.token_ids, held.turns, held.model_fingerprint
            tenant, messages, last_turn = held.tenant, held.messages, held.last_turn
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        checkpointed = None
        if checkpoint is not None:
            manifest = self._manifests[checkpoint.node]
            checkpointed = await asyncio.to_thread(
                read_session, Path(manifest.directory), manifest.sessions[session_id])
        fingerprint = fingerprint or (checkpointed.model_fingerprint if checkpointed else "")
        state = merge_with_history(session_id, checkpointed, history, turns, fingerprint,
                                   messages)
        # Without a checkpoint the merge knows no tenant: keep the replica's salt, or the
        # import below would re-salt the promoted session and lose its cached blocks.
        state = replace(state, tenant=state.tenant or tenant)
        if state.turns == turns and state.token_ids == history:  # the replica's history won
            same = checkpointed is not None and checkpointed.token_ids == history
            state = replace(state, last_turn=last_turn or (checkpointed.last_turn if same else None))
        if not state.token_ids:
            raise ValueError(f"session {session_id}: no replica and no readable checkpoint")
        resp = await self._import(target, list(state_to_chunks(state)))
        return replace(state, kv=None, kv_tokens=resp.kv_tokens)

    async def _import(self, target: str, chunks: list) -> npb.ImportSessionResponse:
        return await import_session(self._stub(target), target, chunks, self.rpc_timeout_s)

    async def _drop(self, session_id: str, node: str) -> None:
        try:
            await self._stub(node).DeleteSession(
                pb.DeleteSessionRequest(session_id=session_id, any_tenant=True),
                timeout=min(BEST_EFFORT_RPC_S, self.rpc_timeout_s))
        except KeyError:
            return  # it left the cluster: nothing to drop
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("dropping stale copy of %s on %s: %s", session_id, node,
                            exc.code().name)
