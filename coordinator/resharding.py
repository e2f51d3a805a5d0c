"""Re-sharding: after a ring change, move every session whose owner changed.

``plan_moves`` (pure) compares where each session's freshest copy is with where the new
ring says it belongs. ``Resharder`` carries the plan out:

* live old owner (a node joined, or the old owner is draining): the session's history and
  KV stream node to node (``ExportSession`` piped into ``ImportSession``), then the old
  copy is deleted: the cut-over. The next turn on the new owner hits the moved KV.
* dead old owner: the new owner is the dead node's ring successor, which holds the
  replicated history of every completed turn. The session is restored there from that
  history and the dead node's newest checkpoint (its manifest in etcd, its files on shared
  storage): the checkpoint's KV is imported when it covers a prefix of the history, the rest
  is recomputed on the next turn.

The coordinator keeps requests for a moving session waiting until its move is done
(``SessionGate`` in coordinator/server.py), so no turn runs against a half-moved session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from ultrakv.cluster.checkpoint import Manifest, load_manifest, merge_with_history, read_session
from ultrakv.cluster.peers import PeerChannels
from ultrakv.cluster.ring import HashRing, replica_targets
from ultrakv.cluster.session_state import SessionState
from ultrakv.cluster.session_transfer import chunks_to_state, state_to_chunks
from ultrakv.cluster.store import EtcdStore, EtcdUnavailableError
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import types_pb2 as pb

log = logging.getLogger("ultrakv.coordinator.resharding")


@dataclass(frozen=True)
class Copy:
    """A copy of a session held by a node (live) or by a dead node's checkpoint."""

    node: str
    num_tokens: int
    live: bool


@dataclass(frozen=True)
class Move:
    """One session to move from ``source`` to ``target``."""

    session_id: str
    source: str
    target: str
    live: bool  # source answers: stream node to node; else restore from replica + checkpoint


@dataclass
class Plan:
    """The moves of one ring change and the stale copies to drop once they are done."""

    ring: HashRing = field(default_factory=HashRing)  # the ring the moves lead to
    moves: list[Move] = field(default_factory=list)
    stale: list[tuple[str, str]] = field(default_factory=list)  # (session id, node)
    sessions: int = 0  # sessions seen in all

    @property
    def moved_fraction(self) -> float:
        return len(self.moves) / self.sessions if self.sessions else 0.0


def plan_moves(copies: Mapping[str, list[Copy]], ring: HashRing) -> Plan:
    """Moves that put each session's freshest copy on its owner under ``ring``.

    The freshest copy is the longest history; a live copy beats a checkpoint of equal length,
    and the owner's own copy beats any other of equal length (nothing to move). Every other
    live copy is stale.
    """
    plan = Plan(ring=ring, sessions=len(copies))
    for sid, held in sorted(copies.items()):
        owner = ring.lookup(sid)
        best = max(held, key=lambda c: (c.num_tokens, c.live, c.node == owner))
        if best.node != owner:
            plan.moves.append(Move(sid, best.node, owner, best.live))
        plan.stale.extend((sid, c.node) for c in held
                          if c.live and c.node not in (owner, best.node))
    return plan


@dataclass
class MoveResult:
    """How one move went."""

    move: Move
    ok: bool
    kv_tokens: int = 0
    error: str = ""


class Resharder:
    """Computes and carries out plans over node RPCs.

    ``addresses()`` maps node ids to addresses (membership); dead nodes need no address.
    """

    def __init__(self, store: EtcdStore, peers: PeerChannels,
                 addresses: Callable[[], Mapping[str, str]], concurrency: int = 4,
                 rpc_timeout_s: float = 30.0) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.store = store
        self.peers = peers
        self.addresses = addresses
        self.concurrency = concurrency
        self.rpc_timeout_s = rpc_timeout_s
        self._manifests: dict[str, Manifest] = {}

    def _stub(self, node: str):
        return self.peers.stub(self.addresses()[node])

    async def collect(self, live: Iterable[str], dead: Iterable[str]) -> dict[str, list[Copy]]:
        """Every session copy: listed on each live node, read from each dead node's manifest."""
        copies: dict[str, list[Copy]] = {}

        async def listed(node: str) -> list[pb.SessionInfo]:
            try:
                # Short: the ring change waits for this listing.
                resp = await self._stub(node).ListSessions(npb.ListSessionsRequest(),
                                                           timeout=min(5.0, self.rpc_timeout_s))
                return list(resp.sessions)
            except (grpc.aio.AioRpcError, KeyError) as exc:
                log.warning("listing sessions of %s failed: %s", node, exc)
                return []

        live = sorted(live)
        for node, infos in zip(live, await asyncio.gather(*(listed(n) for n in live)),
                               strict=True):
            for info in infos:
                copies.setdefault(info.session_id, []).append(
                    Copy(node, int(info.num_tokens), True))
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
                copies.setdefault(sid, []).append(Copy(node, entry.num_tokens, False))
        return copies

    async def plan(self, ring: HashRing, live: Iterable[str], dead: Iterable[str]) -> Plan:
        return plan_moves(await self.collect(live, dead), ring)

    async def move(self, move: Move, ring: HashRing) -> MoveResult:
        """Carry out one move, then replicate the session's history to the new owner's
        successor on ``ring`` (a moved session is as durable as one that just took a
        turn); never raises."""
        try:
            state = await (self._migrate(move) if move.live else self._restore(move))
            await self._replicate(move.session_id, state.token_ids, state.turns, state.tenant,
                                  move.target, ring)
            return MoveResult(move, True, state.kv_tokens)
        except (grpc.aio.AioRpcError, OSError, ValueError, KeyError) as exc:
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.error("moving session %s %s -> %s failed: %s", move.session_id, move.source,
                      move.target, detail)
            return MoveResult(move, False, error=detail or type(exc).__name__)

    async def _replicate(self, session_id: str, history: list[int], turns: int, tenant: str,
                         owner: str, ring: HashRing) -> None:
        for node in replica_targets(ring, session_id, owner)[:1]:
            try:
                await self._stub(node).ReplicateHistory(npb.ReplicateHistoryRequest(
                    session_id=session_id, token_ids=history, turns=turns, tenant=tenant),
                    timeout=self.rpc_timeout_s)
            except (grpc.aio.AioRpcError, KeyError) as exc:
                log.warning("replicating moved session %s to %s failed: %s", session_id, node,
                            exc)

    async def _migrate(self, move: Move) -> SessionState:
        """Stream the session old -> new owner (the header is kept to replicate it)."""
        source, target = self._stub(move.source), self._stub(move.target)
        chunks = [c async for c in source.ExportSession(
            npb.ExportSessionRequest(session_id=move.session_id, include_kv=True),
            timeout=self.rpc_timeout_s)]
        resp = await target.ImportSession(iter(chunks), timeout=self.rpc_timeout_s)
        await self._drop(move.session_id, move.source)  # cut over: one owner from here on
        header = chunks[0].header
        return SessionState(move.session_id, list(header.token_ids), header.turns,
                            header.model_fingerprint, kv_tokens=resp.kv_tokens,
                            tenant=header.tenant)

    async def _restore(self, move: Move) -> SessionState:
        target = self._stub(move.target)
        history: list[int] = []
        turns = 0
        fingerprint = tenant = ""
        try:
            await target.PromoteReplica(npb.PromoteReplicaRequest(session_id=move.session_id),
                                        timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        try:
            chunks = [c async for c in target.ExportSession(
                npb.ExportSessionRequest(session_id=move.session_id, include_kv=False),
                timeout=self.rpc_timeout_s)]
            held = chunks_to_state(chunks)
            history, turns, fingerprint = held.token_ids, held.turns, held.model_fingerprint
            tenant = held.tenant
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        manifest = self._manifests[move.source]
        checkpointed = await asyncio.to_thread(
            read_session, Path(manifest.directory), manifest.sessions[move.session_id])
        fingerprint = fingerprint or (checkpointed.model_fingerprint if checkpointed else "")
        state = merge_with_history(move.session_id, checkpointed, history, turns, fingerprint)
        # Without a checkpoint the merge knows no tenant: keep the replica's salt, or the
        # import below would re-salt the promoted session and lose its cached blocks.
        state = replace(state, tenant=state.tenant or tenant)
        if not state.token_ids:
            raise ValueError(f"session {move.session_id}: no replica and no readable checkpoint")
        resp = await target.ImportSession(iter(state_to_chunks(state)),
                                          timeout=self.rpc_timeout_s)
        return replace(state, kv=None, kv_tokens=resp.kv_tokens)

    async def _drop(self, session_id: str, node: str) -> None:
        try:
            await self._stub(node).DeleteSession(pb.DeleteSessionRequest(session_id=session_id, any_tenant=True),
                                                 timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("dropping stale copy of %s on %s: %s", session_id, node,
                            exc.code().name)

    async def drop_stale(self, stale: Iterable[tuple[str, str]], live: set[str]) -> None:
        for sid, node in stale:
            if node in live:
                await self._drop(sid, node)
