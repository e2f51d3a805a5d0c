"""Backup and restore through the coordinator: every session of the cluster out as one
stream, and back in with each session on its current owner.

A backup is consistent per session: each is exported under the session's lock
(``SessionGate``), after any move planned for it, so it is taken between two turns and from
the copy the cluster continues from (re-sharding's rule: the most turns, then the owner's). It fails,
rather than leaving sessions out, when a node that holds sessions does not answer. The
header records the nodes (model and fingerprint), the coordinators' live config and the
checkpoint manifests in etcd.

A restore imports each session on its owner under the ring as it is now, keeping its tenant
(the salt of its block hashes: tenants stay apart), then replicates its history to the
owner's successor, as a moved session would be. A session saved from another model is
refused before anything of it is sent, naming both fingerprints.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import grpc
from ultrakv.cluster.checkpoint import CHECKPOINTS_PREFIX
from ultrakv.cluster.validation import RequestRejected, validate_session_id
from ultrakv.coordinator.dynamic_config import CONFIG_KEY
from ultrakv.coordinator.resharding import Copy, authoritative
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2

if TYPE_CHECKING:
    from ultrakv.coordinator.server import ClusterBackend

RPC_TIMEOUT_S = 120.0  # one session's export or import, KV included


def _unavailable(node: str, call: str, exc: grpc.aio.AioRpcError) -> RequestRejected:
    return RequestRejected(grpc.StatusCode.UNAVAILABLE, "",
                           f"node {node} did not answer {call}: {exc.code().name} {exc.details()}")


def _json_or_text(raw: bytes) -> object:
    """A stored value as JSON, or as text when it is not (a record must not fail a backup)."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def pick_copies(listed: dict[str, list[pb.SessionInfo]],
                owner_of: Callable[[str], str | None]) -> dict[str, str]:
    """Session id -> the node whose copy a backup takes (pure): the copy re-sharding would
    keep (``authoritative``: the most turns, then the owner's). Replicas are left out: they
    are histories held for a session's owner, not sessions served."""
    copies: dict[str, list[Copy]] = {}
    for node, infos in listed.items():
        for info in infos:
            if not info.replica:
                copies.setdefault(info.session_id, []).append(
                    Copy(node, info.turns, int(info.num_tokens), live=True))
    return {sid: authoritative(held, owner_of(sid) or "").node
            for sid, held in sorted(copies.items())}


class SessionBackup:
    """Export and import of every session, over a coordinator's view of the cluster."""

    def __init__(self, backend: ClusterBackend) -> None:
        self.backend = backend

    def _stub(self, node: str):
        return self.backend.peers.stub(self.backend.members[node].address)

    def _owner(self, session_id: str) -> str | None:
        ring = self.backend.ring
        return ring.lookup(session_id) if len(ring) else None

    async def _health(self, node: str) -> npb.NodeHealthResponse:
        try:
            return await self._stub(node).Health(npb.NodeHealthRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(node, "Health", exc) from exc

    async def _listed(self, node: str) -> list[pb.SessionInfo]:
        try:
            reply = await self._stub(node).ListSessions(npb.ListSessionsRequest(), timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(node, "ListSessions", exc) from exc
        return list(reply.sessions)

    async def _etcd_records(self) -> tuple[str, str]:
        """The live config (as stored) and the checkpoint manifests, as JSON text."""
        store = self.backend.store
        config = await store.get(CONFIG_KEY)
        kvs, _ = await store.get_prefix(CHECKPOINTS_PREFIX)
        manifests = {kv.key: _json_or_text(kv.value) for kv in kvs}
        return (config.value.decode() if config else ""), json.dumps(manifests, sort_keys=True)

    async def export(self, history_only: bool) -> AsyncIterator[ultrakv_pb2.BackupPart]:
        """The backup stream: header, then one chunk run per session."""
        # Every member, not only the healthy ones: a member that does not answer fails the
        # backup, which would otherwise miss its sessions (and retention would then delete
        # an older, complete backup).
        nodes = sorted(self.backend.members)
        if not nodes:
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "",
                                  "no node is registered: nothing to back up from")
        healths = await asyncio.gather(*(self._health(n) for n in nodes))
        listed = dict(zip(nodes, await asyncio.gather(*(self._listed(n) for n in nodes)),
                          strict=True))
        chosen = pick_copies(listed, self._owner)
        config_json, checkpoints_json = await self._etcd_records()
        yield ultrakv_pb2.BackupPart(header=ultrakv_pb2.BackupHeader(
            nodes=[ultrakv_pb2.BackupNode(node_id=h.node_id or n, model=h.model,
                                          model_fingerprint=h.model_fingerprint)
                   for n, h in zip(nodes, healths, strict=True)],
            num_sessions=len(chosen), config_json=config_json,
            checkpoints_json=checkpoints_json))
        for sid, node in chosen.items():
            for chunk in await self._export_one(sid, node, not history_only):
                yield ultrakv_pb2.BackupPart(session=chunk)

    async def _export_one(self, session_id: str, node: str,
                          include_kv: bool) -> list[npb.SessionChunk]:
        """One session's chunks, read between two of its turns; from its owner when it
        moved since it was listed."""
        async with self.backend.gate.turn(session_id):
            for holder in dict.fromkeys((node, self._owner(session_id))):
                if holder is None or holder not in self.backend.members:
                    continue
                try:
                    return [c async for c in self._stub(holder).ExportSession(
                        npb.ExportSessionRequest(session_id=session_id, include_kv=include_kv),
                        timeout=RPC_TIMEOUT_S)]
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise _unavailable(holder, f"ExportSession({session_id})", exc) from exc
        raise RequestRejected(grpc.StatusCode.ABORTED, "session_id",
                              f"session {session_id} went away while the backup ran "
                              "(deleted or expired); run the backup again")

    async def import_runs(self, runs: AsyncIterator[list[npb.SessionChunk]]
                          ) -> ultrakv_pb2.ImportSessionsResponse:
        """Import each run on its session's owner; stops at the first refused session."""
        fingerprints: dict[str, str] = {}
        done = ultrakv_pb2.ImportSessionsResponse()
        async for run in runs:
            header = run[0].header
            sid = validate_session_id(header.session_id)
            owner = self._owner(sid)
            if owner is None or owner not in self.backend.members:
                raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "",
                                      "no serving node to restore sessions on")
            if owner not in fingerprints:
                fingerprints[owner] = (await self._health(owner)).model_fingerprint
            if header.model_fingerprint != fingerprints[owner]:
                raise RequestRejected(
                    grpc.StatusCode.FAILED_PRECONDITION, "model_fingerprint",
                    f"session {sid} was saved from model {header.model_fingerprint or '?'}, "
                    f"but node {owner} serves model {fingerprints[owner]}: restore it into a "
                    "cluster running the same model")
            async with self.backend.gate.turn(sid):
                try:
                    reply = await self._stub(owner).ImportSession(iter(run), timeout=RPC_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    raise RequestRejected(exc.code(), "",
                                          f"session {sid} refused by node {owner}: "
                                          f"{exc.details()}") from exc
                await self.backend.resharder.replicate(sid, list(header.token_ids), header.turns,
                                                       header.tenant, owner, self.backend.ring)
            done.sessions += 1
            done.num_tokens += reply.num_tokens
            done.kv_tokens += reply.kv_tokens
        return done
