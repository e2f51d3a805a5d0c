"""Backup and restore through the coordinator: every session of the cluster out as one
stream, and back in with each session on its current owner.

A backup is one point in time for the whole cluster, a cut (node/backup_cut.py says why it
holds): every node is asked to hold its turn results back and snapshot its sessions
(``BeginCut``); once all have, the live config and checkpoint manifests are read from etcd
(its revision is recorded) and the nodes let their results go (``ReleaseCut``: a few
round trips of delay for the turns that finish meanwhile). Each session is then exported
as its node's snapshot holds it, from the copy the cluster continues from (re-sharding's
rule: the most turns, then the owner's). A cut that a node's hold outlasted, or that a
session moving between nodes slipped past, is taken again, up to ``CUT_ATTEMPTS`` times.
The backup fails, rather than leaving sessions out, when a node does not answer. The header
records the cut, the nodes (model and fingerprint), the config and the manifests.

A restore imports each session on its owner under the ring as it is now, keeping its tenant
(the salt of its block hashes: tenants stay apart), then replicates its history to the
owner's successor, as a moved session would be. A session saved from another model is
refused before anything of it is sent, naming both fingerprints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from ultrakv.cluster.checkpoint import CHECKPOINTS_PREFIX
from ultrakv.cluster.session_transfer import last_turn_of, message_pairs
from ultrakv.cluster.validation import RequestRejected, validate_tenant_key
from ultrakv.coordinator.dynamic_config import CONFIG_KEY
from ultrakv.coordinator.resharding import Copy, authoritative, import_session
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2

if TYPE_CHECKING:
    from ultrakv.coordinator.server import ClusterBackend

log = logging.getLogger("ultrakv.coordinator.backup")

RPC_TIMEOUT_S = 120.0  # one session's export or import, KV included
CUT_HOLD_S = 10.0  # a node lets its held results go after this long even if never released
CUT_RPC_TIMEOUT_S = 5.0  # BeginCut / ReleaseCut: well inside the hold
CUT_ATTEMPTS = 3


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


@dataclass
class TakenCut:
    """A cut every node held: its sessions per node, and what the header records."""

    listed: dict[str, list[pb.SessionInfo]]
    record: ultrakv_pb2.BackupCut
    config_json: str
    checkpoints_json: str


def slipped_past(listed: dict[str, list[pb.SessionInfo]], imported: set[str]) -> set[str]:
    """Sessions imported while the cut was held that no node's snapshot has (pure): they
    were moving between two nodes, past both snapshots."""
    held = {info.session_id for infos in listed.values() for info in infos}
    return imported - held


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

    async def _etcd_records(self) -> tuple[str, str, int]:
        """The live config (as stored), the checkpoint manifests as JSON text, and the etcd
        revision the manifests were read at."""
        store = self.backend.store
        config = await store.get(CONFIG_KEY)
        kvs, revision = await store.get_prefix(CHECKPOINTS_PREFIX)
        manifests = {kv.key: _json_or_text(kv.value) for kv in kvs}
        return ((config.value.decode() if config else ""), json.dumps(manifests, sort_keys=True),
                revision)

    async def _cut_call(self, node: str, name: str, request):
        try:
            return await getattr(self._stub(node), name)(request, timeout=CUT_RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(node, name, exc) from exc
        except KeyError:
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "",
                                  f"node {node} left the cluster while the backup cut was "
                                  "taken; run the backup again") from None

    async def _end_cut(self, nodes: list[str], cut_id: str) -> None:
        """Drop the cut's snapshots (a node that does not answer drops its own in time)."""
        async def end(node: str) -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, KeyError):
                await self._stub(node).EndCut(npb.CutRequest(cut_id=cut_id),
                                              timeout=CUT_RPC_TIMEOUT_S)
        await asyncio.gather(*(end(n) for n in nodes))

    async def _take_cut(self, nodes: list[str]) -> TakenCut:
        """A cut every node held (retried when one was spoilt); its snapshots stay on the
        nodes until :meth:`_end_cut`."""
        for attempt in range(1, CUT_ATTEMPTS + 1):
            cut_id = uuid.uuid4().hex
            begin = npb.BeginCutRequest(cut_id=cut_id, hold_s=CUT_HOLD_S)
            try:
                began = await asyncio.gather(
                    *(self._cut_call(n, "BeginCut", begin) for n in nodes))
                taken_at = time.time()
                config_json, checkpoints_json, revision = await self._etcd_records()
                released = await asyncio.gather(
                    *(self._cut_call(n, "ReleaseCut", npb.CutRequest(cut_id=cut_id))
                      for n in nodes))
            except BaseException:
                await self._end_cut(nodes, cut_id)
                raise
            listed = {n: list(b.sessions) for n, b in zip(nodes, began, strict=True)}
            imported = {sid for r in released for sid in r.imported_session_ids}
            spoilt = ([n for n, r in zip(nodes, released, strict=True) if not r.intact],
                      slipped_past(listed, imported))
            if not any(spoilt):
                return TakenCut(listed, ultrakv_pb2.BackupCut(
                    cut_id=cut_id, taken_at=taken_at, etcd_revision=revision,
                    hold_s=max(r.held_s for r in released), attempts=attempt),
                    config_json, checkpoints_json)
            await self._end_cut(nodes, cut_id)
            log.warning("backup cut %s spoilt (holds ran out on %s; sessions moving: %s); "
                        "cutting again", cut_id, spoilt[0] or "none",
                        sorted(spoilt[1]) or "none")
        raise RequestRejected(grpc.StatusCode.ABORTED, "",
                              f"no consistent cut in {CUT_ATTEMPTS} attempts (nodes too slow "
                              f"to answer within {CUT_HOLD_S:g} s, or sessions kept moving); "
                              "run the backup again")

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
        cut = await self._take_cut(nodes)
        try:
            chosen = pick_copies(cut.listed, self._owner)
            yield ultrakv_pb2.BackupPart(header=ultrakv_pb2.BackupHeader(
                nodes=[ultrakv_pb2.BackupNode(node_id=h.node_id or n, model=h.model,
                                              model_fingerprint=h.model_fingerprint)
                       for n, h in zip(nodes, healths, strict=True)],
                num_sessions=len(chosen), config_json=cut.config_json,
                checkpoints_json=cut.checkpoints_json, cut=cut.record))
            for sid, node in chosen.items():
                for chunk in await self._export_one(sid, node, cut.record.cut_id,
                                                    not history_only):
                    yield ultrakv_pb2.BackupPart(session=chunk)
        finally:
            await self._end_cut(nodes, cut.record.cut_id)

    async def _export_one(self, session_id: str, node: str, cut_id: str,
                          include_kv: bool) -> list[npb.SessionChunk]:
        """One session's chunks as ``node``'s snapshot of the cut holds it."""
        try:
            return [c async for c in self._stub(node).ExportSession(
                npb.ExportSessionRequest(session_id=session_id, include_kv=include_kv,
                                         cut_id=cut_id), timeout=RPC_TIMEOUT_S)]
        except (grpc.aio.AioRpcError, KeyError) as exc:
            if isinstance(exc, KeyError):  # the node left the cluster: its snapshot is gone
                raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "",
                                      f"node {node} left the cluster while the backup ran; "
                                      "run the backup again") from None
            raise _unavailable(node, f"ExportSession({session_id})", exc) from exc

    async def import_runs(self, runs: AsyncIterator[list[npb.SessionChunk]]
                          ) -> ultrakv_pb2.ImportSessionsResponse:
        """Import each run on its session's owner; stops at the first refused session. A
        session the owner holds with more turns is kept, not rolled back (``skipped``); an
        owner whose KV cache holds another dtype takes the history alone."""
        fingerprints: dict[str, str] = {}
        done = ultrakv_pb2.ImportSessionsResponse()
        async for run in runs:
            header = run[0].header
            sid = validate_tenant_key(header.session_id, header.tenant)
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
                if await self._held_turns(owner, sid) > header.turns:
                    done.skipped += 1
                    continue
                try:
                    reply = await import_session(self._stub(owner), owner, run, RPC_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    raise RequestRejected(exc.code(), "",
                                          f"session {sid} refused by node {owner}: "
                                          f"{exc.details()}") from exc
                await self.backend.resharder.replicate(sid, list(header.token_ids), header.turns,
                                                       header.tenant, owner, self.backend.ring,
                                                       message_pairs(header.messages),
                                                       last_turn_of(header))
            done.sessions += 1
            done.num_tokens += reply.num_tokens
            done.kv_tokens += reply.kv_tokens
        return done

    async def _held_turns(self, node: str, sid: str) -> int:
        """The turns of ``node``'s copy of ``sid`` (0: none)."""
        try:
            info = await self._stub(node).GetSession(pb.GetSessionRequest(session_id=sid, any_tenant=True),
                                                     timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return 0
            raise _unavailable(node, f"GetSession({sid})", exc) from exc
        return info.turns
