"""A session's tenant survives re-sharding: the coordinator's Resharder moves sessions between
real loopback nodes, replicates them to the new owner's successor, and restores a dead owner's
session from its replica; every copy keeps the tenant salt of its block hashes."""

from __future__ import annotations

import grpc
import pytest
from ultrakv.cluster.checkpoint import CheckpointEntry, Manifest, write_session
from ultrakv.cluster.membership import NodeRecord
from ultrakv.cluster.peers import PeerChannels
from ultrakv.cluster.ring import HashRing
from ultrakv.cluster.session_transfer import chunks_to_state
from ultrakv.coordinator.resharding import Copy, Move, Resharder
from ultrakv.coordinator.server import ClusterBackend, CoordinatorSettings
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.server import BackgroundServer
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import node_pb2_grpc
from ultrakv.v1 import types_pb2 as pb

PROMPT = "Tenant acme moves between nodes with its cache and its salt, block after block. " * 2


@pytest.fixture(scope="module")
def cluster():
    """Two nodes, "a" and "b": engines, servers and sync stubs."""
    engines = {n: Engine(EngineConfig(model="tiny", device="cpu", num_blocks=64)) for n in "ab"}
    servers = {n: BackgroundServer(e).start() for n, e in engines.items()}
    channels = {n: grpc.insecure_channel(s.address) for n, s in servers.items()}
    stubs = {n: node_pb2_grpc.NodeServiceStub(c) for n, c in channels.items()}
    yield engines, servers, stubs
    for n in "ab":
        channels[n].close()
        servers[n].stop()
        engines[n].shutdown()


def turn(stub, session_id: str, text: str, tenant: str) -> pb.GenerateResult:
    request = pb.GenerateStreamRequest(generate=pb.GenerateRequest(
        request_id=f"{session_id}-{len(text)}", session_id=session_id, text=text, tenant=tenant,
        sampling=pb.SamplingOptions(max_length=4, temperature=0.0)))
    messages = list(stub.Generate(iter([request]), timeout=30))
    assert messages[-1].WhichOneof("event") == "result", messages[-1]
    return messages[-1].result


async def move(servers, session_id: str, source: str, target: str, live: bool,
               manifest: Manifest | None = None):
    peers = PeerChannels()
    resharder = Resharder(None, peers, lambda: {n: s.address for n, s in servers.items()})
    if manifest is not None:
        resharder._manifests[source] = manifest
    try:
        # The planned copy: the source's session, or its checkpoint when it is dead; the
        # move asks the live nodes again.
        planned = (Copy(source, 1, 0, live),)
        return await resharder.move(Move(session_id, source, target, live, planned),
                                    HashRing("ab"))
    finally:
        await peers.close()


async def test_a_live_move_replicates_the_tenant_to_the_new_owners_successor(cluster):
    engines, servers, stubs = cluster
    turn(stubs["a"], "acme-live", PROMPT, "acme")
    result = await move(servers, "acme-live", "a", "b", live=True)
    assert result.ok, result.error
    assert engines["b"].sessions.get("acme-live").salt == "acme"
    # "a" (b's successor on a two-node ring) now holds the replica: promoting it, as a
    # failover of "b" would, keeps acme's salt and so acme's cached blocks on "a".
    stubs["a"].PromoteReplica(npb.PromoteReplicaRequest(session_id="acme-live"), timeout=10)
    assert engines["a"].sessions.get("acme-live").salt == "acme"
    assert turn(stubs["a"], "acme-live", " again", "acme").usage.cached_tokens >= 32


async def test_a_restore_without_a_checkpoint_keeps_the_replicas_tenant(cluster, tmp_path):
    engines, servers, stubs = cluster
    turn(stubs["a"], "acme-dead", PROMPT + " dead", "acme")
    history = list(next(iter(stubs["a"].ExportSession(
        npb.ExportSessionRequest(session_id="acme-dead"), timeout=10))).header.token_ids)
    stubs["b"].ReplicateHistory(npb.ReplicateHistoryRequest(
        session_id="acme-dead", token_ids=history, turns=1, tenant="acme"), timeout=10)
    # "a" is treated as dead; its checkpoint of the session is unreadable (file missing).
    entry = CheckpointEntry("acme-dead", 1, len(history), "missing.json", "0" * 64)
    manifest = Manifest("a", str(tmp_path), sessions={"acme-dead": entry})
    result = await move(servers, "acme-dead", "a", "b", live=False, manifest=manifest)
    assert result.ok, result.error
    assert engines["b"].sessions.get("acme-dead").salt == "acme"
    assert engines["b"].sessions.get("acme-dead").token_ids == history


async def test_a_turn_on_the_source_during_a_move_is_never_cut_away(cluster):
    """Two coordinators: one moves a session while a turn reaches the old owner through the
    other, after the export. The cut-over is refused (the source has a turn more than the
    copy), the imported copy is dropped, and the retried move carries the turn (before, the
    source's copy was deleted with the acknowledged turn in it)."""
    import asyncio

    engines, servers, stubs = cluster
    turn(stubs["a"], "raced", PROMPT, "")
    peers = PeerChannels()
    resharder = Resharder(None, peers, lambda: {n: s.address for n, s in servers.items()})
    real_import = resharder._import

    async def import_after_a_turn_elsewhere(target, chunks):
        await asyncio.to_thread(turn, stubs["a"], "raced", " meanwhile", "")
        return await real_import(target, chunks)

    try:
        planned = (Copy("a", 1, 0, True),)
        resharder._import = import_after_a_turn_elsewhere
        first = await resharder.move(Move("raced", "a", "b", True, planned), HashRing("ab"))
        assert not first.ok and "not released" in first.error
        assert engines["a"].get_session("raced").turns == 2
        with pytest.raises(KeyError):
            engines["b"].sessions.get("raced")  # the older copy did not stay
        resharder._import = real_import
        again = await resharder.move(Move("raced", "a", "b", True, planned), HashRing("ab"))
        assert again.ok, again.error
        assert engines["b"].get_session("raced").turns == 2
    finally:
        await peers.close()


async def test_a_turn_moved_before_its_acknowledgement_is_answered_from_its_record(cluster):
    """Issue 9: "a" completes a turn, and while its replica push waits, a live move takes the
    session (the turn in its history) to "b". The push is then refused, "b" serving the
    session now: "a" does not acknowledge the turn. The coordinator's retry of the same
    request on "b" is answered from the turn's record, which travelled with the move: "b"'s
    history holds the turn once, a resumed retry gets the rest of the same tokens, and the
    usage is the turn's own, cached tokens included (before, "b" had the turn's tokens but
    not its record, and took the turn a second time)."""
    import asyncio
    import threading

    from ultrakv.node.replication import Replicator

    engines, servers, stubs = cluster
    sid = "moved-unacknowledged"
    turn(stubs["a"], sid, PROMPT, "")
    before = list(engines["a"].sessions.get(sid).token_ids)
    backend = servers["a"].server.backend
    push_may_go = threading.Event()

    async def push_after_the_move(output, record):
        """The cluster agent's push, whose copies wait (slow successors) until the move."""
        peers = PeerChannels()  # on "a"'s own event loop, as its cluster agent's
        replicator = Replicator(engines["a"], "a", lambda: HashRing("ab"),
                                lambda: {n: s.address for n, s in servers.items()}, peers)
        push = replicator.replicate

        async def push_later(state, record=None):
            await asyncio.to_thread(push_may_go.wait, 30)
            await push(state, record)

        replicator.replicate = push_later
        try:
            await replicator.on_turn_complete(output, record)
        finally:
            await peers.close()

    request = pb.GenerateRequest(request_id="turn-2", session_id=sid, text=" and then?",
                                 sampling=pb.SamplingOptions(max_length=4, temperature=0.0))
    backend.on_turn_complete = push_after_the_move
    try:
        first = asyncio.create_task(asyncio.to_thread(
            lambda: list(stubs["a"].Generate(iter([pb.GenerateStreamRequest(generate=request)]),
                                             timeout=60))))
        for _ in range(600):  # the turn is in "a"'s history; its push waits
            if engines["a"].get_session(sid).turns == 2 or first.done():
                break
            await asyncio.sleep(0.05)
        history = list(engines["a"].sessions.get(sid).token_ids)
        moved = await move(servers, sid, "a", "b", live=True)
        assert moved.ok, moved.error
        push_may_go.set()
        refused = (await first)[-1]
    finally:
        push_may_go.set()
        backend.on_turn_complete = None
    assert refused.WhichOneof("event") == "error", refused  # superseded: not acknowledged
    assert "owned by another node" in refused.error.message, refused.error
    output = history[len(before) + len(b" and then?"):]
    assert len(output) == 4

    retried = list(stubs["b"].Generate(iter([pb.GenerateStreamRequest(generate=request)]),
                                       timeout=60))[-1].result
    assert list(retried.token_ids) == output
    assert retried.usage.prompt_tokens == len(history) - 4
    assert retried.usage.cached_tokens >= 32  # "a" continued from turn 1's blocks
    # A coordinator that held the turn's last chunk back finds the turn in "b"'s history,
    # and counts it as the turn's record does (before: no cached tokens known).
    coordinator = ClusterBackend(CoordinatorSettings(etcd="127.0.0.1:1"))
    coordinator.members = {n: NodeRecord(n, s.address, 0) for n, s in servers.items()}
    try:
        assert await coordinator._completed_on("b", request, output) == retried.usage
    finally:
        await coordinator.peers.close()
    assert engines["b"].get_session(sid).turns == 2
    assert list(engines["b"].sessions.get(sid).token_ids) == history  # the turn once
    resumed = pb.GenerateRequest()
    resumed.CopyFrom(request)
    resumed.resume_token_ids.extend(output[:2])  # as the coordinator resumes after 2 tokens
    resumed.sampling.max_length = 2
    rest = list(stubs["b"].Generate(iter([pb.GenerateStreamRequest(generate=resumed)]),
                                    timeout=60))[-1].result
    assert list(rest.token_ids) == output[2:]
    assert rest.usage.prompt_tokens == len(history) - 2
    assert list(engines["b"].sessions.get(sid).token_ids) == history


async def test_a_turn_restored_from_a_checkpoint_is_answered_from_its_record(cluster, tmp_path):
    """"a" took a session's turn 2 and checkpointed it, but died before a copy of it reached
    "b", which holds the session's replica as of turn 1. "b" restores the session from "a"'s
    checkpoint (the copy with more turns); the coordinator's retry of turn 2 reaching "b" is
    answered from the turn's record, which the checkpoint kept (before, "b" had the turn's
    tokens but not its record, and took the turn a second time)."""
    engines, servers, stubs = cluster
    sid = "checkpointed-unacknowledged"
    turn(stubs["a"], sid, PROMPT, "")
    replica = engines["a"].export_session(sid)
    stubs["b"].ReplicateHistory(npb.ReplicateHistoryRequest(
        session_id=sid, token_ids=replica.token_ids, turns=1), timeout=10)
    request = pb.GenerateRequest(request_id="turn-2", session_id=sid, text=" and then?",
                                 sampling=pb.SamplingOptions(max_length=4, temperature=0.0))
    first = list(stubs["a"].Generate(iter([pb.GenerateStreamRequest(generate=request)]),
                                     timeout=60))[-1].result  # its answer never got out
    checkpointed = chunks_to_state(list(stubs["a"].ExportSession(
        npb.ExportSessionRequest(session_id=sid), timeout=10)))
    entry = write_session(tmp_path, checkpointed)
    stubs["a"].DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=10)  # "a" died
    result = await move(servers, sid, "a", "b", live=False,
                        manifest=Manifest("a", str(tmp_path), sessions={sid: entry}))
    assert result.ok, result.error
    retried = list(stubs["b"].Generate(iter([pb.GenerateStreamRequest(generate=request)]),
                                       timeout=60))[-1].result
    assert list(retried.token_ids) == list(first.token_ids)
    assert retried.usage == first.usage
    assert engines["b"].get_session(sid).turns == 2
    assert list(engines["b"].sessions.get(sid).token_ids) == checkpointed.token_ids
