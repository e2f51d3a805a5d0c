"""Routing by where blocks live, across real processes: two `tiny` CPU node processes and
a coordinator process (LocalCluster, real etcd), plus a second coordinator in this process
whose routing index the tests read. Both build the index from the nodes' block events.
"""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from ultrakv.client import AsyncClient
from ultrakv.client.local_cluster import ClusterSpec, LocalCluster
from ultrakv.cluster.block_events import batch_from_message
from ultrakv.cluster.block_hashing import hash_token_blocks
from ultrakv.cluster.etcd_server import free_port
from ultrakv.cluster.peer_auth import read_cluster_secret
from ultrakv.cluster.peers import PeerChannels
from ultrakv.cluster.ring import bounded_lookup
from ultrakv.coordinator.health import HealthPolicy
from ultrakv.coordinator.server import CoordinatorServer, CoordinatorSettings
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import types_pb2 as pb

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

SYSTEM = ("You are the routing test's assistant. Answer in one short sentence, cite the "
          "manual where you can, and never invent a command that the manual does not list. "
          "The manual follows: ultrakv serves a cluster of nodes behind coordinators. ")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("prefix-routing")
    config = data / "node.yaml"  # a batch of 3: three long generations fill a node
    config.write_text("engine:\n  max_num_seqs: 3\n")
    spec = ClusterSpec(nodes=2, coordinators=1, data_dir=data, port=0, device="cpu",
                       num_blocks=512, lease_ttl_s=2, checkpoint_interval_s=3600.0,
                       log_dir=data / "logs", node_args=["--config", str(config)])
    with LocalCluster(spec) as c:
        yield c


async def _coordinator(cluster: LocalCluster, **settings) -> CoordinatorServer:
    server = CoordinatorServer(CoordinatorSettings(
        etcd=cluster.etcd_endpoint, host="127.0.0.1", port=0, **settings,
        cluster_secret_file=str(cluster.cluster_secret_file),
        health=HealthPolicy(interval_s=1.0, timeout_s=1.0, down_after=3, up_after=2)))
    await server.start()
    return server


async def _until(what: str, check, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.1)


async def _node_truth(cluster: LocalCluster, node: str) -> set[int]:
    """What ``node`` says it holds (any tier): a fresh subscription's snapshot."""
    peers = PeerChannels(read_cluster_secret(cluster.cluster_secret_file))
    try:
        call = peers.stub(f"127.0.0.1:{cluster.node_ports[node]}").BlockEvents(
            npb.BlockEventsRequest(), timeout=30)
        held: set[int] = set()
        async for message in call:
            batch = batch_from_message(message)
            for event in batch.events:
                held.update(event.hashes)
            if len(batch.events) < 1024:  # the snapshot's last part; deltas would follow
                call.cancel()
                break
        return held
    finally:
        await peers.close()


def _indexed(server: CoordinatorServer, node: str) -> set[int]:
    return server.backend.block_index.blocks(node)


async def test_a_sessionless_request_goes_to_the_node_holding_its_prefix(cluster) -> None:
    server = await _coordinator(cluster)
    try:
        backend = server.backend
        await _until("the in-process coordinator routes over both nodes", lambda: len(backend.ring) == 2)
        probe = pb.GenerateRequest(text=SYSTEM + "Which node?")
        first_block_node = bounded_lookup(backend.ring, backend._first_block_key(probe), {}, 0.25)
        # A session whose owner is not the node the prompt's first block hashes to.
        sid = next(f"warm-{i}" for i in range(100) if backend.ring.lookup(f"warm-{i}") != first_block_node)
        async with AsyncClient(server.address, timeout=120) as client:
            warm = await client.process_request({"text": SYSTEM + "What is a node?", "session_id": sid,
                                                 "max_length": 2, "temperature": 0.0})
            assert warm["success"], warm
            holder = warm["node"]
            assert holder != first_block_node
            # Both coordinators' indexes learn it from the holder's events.
            await _until("the index holds the warm prefix",
                         lambda: backend.block_index.num_blocks(holder) >= len(SYSTEM) // 16)
            result = await client.process_request({"text": SYSTEM + "Which node?", "max_length": 2,
                                                   "temperature": 0.0})
        # Through the coordinator process too (its own index, from the same events).
        async with AsyncClient(cluster.address, timeout=120) as other:
            deadline = time.monotonic() + 60
            while True:
                via_process = await other.process_request({"text": SYSTEM + "Where?", "max_length": 2,
                                                           "temperature": 0.0})
                if via_process["node"] == holder or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        assert result["success"] and result["node"] == holder, (result, holder, first_block_node)
        assert backend.counters.sessionless_routes.get("prefix", 0) >= 1
        assert result["cached_tokens"] >= len(SYSTEM) // 16 * 16 - 16
        assert via_process["node"] == holder and via_process["cached_tokens"] > 0, via_process
    finally:
        await server.stop()


async def test_the_index_converges_after_a_node_is_killed_and_restarted(cluster) -> None:
    server = await _coordinator(cluster)
    try:
        backend = server.backend
        await _until("the in-process coordinator routes over both nodes", lambda: len(backend.ring) == 2)
        async with AsyncClient(server.address, timeout=120) as client:
            for i in range(4):  # blocks on every node
                r = await client.process_request({"text": f"{i} " + SYSTEM, "session_id": f"conv-{i}",
                                                  "max_length": 2, "temperature": 0.0})
                assert r["success"], r
        victim = sorted(backend.members)[0]
        truth = await _node_truth(cluster, victim)
        assert truth
        await _until("the index matches the node", lambda: _indexed(server, victim) == truth)
        old_epoch = backend.block_index.cursor(victim).epoch

        cluster.kill_node(victim)
        await _until("the killed node's blocks leave the index", lambda: not _indexed(server, victim))

        cluster.start_node(victim, port=free_port())
        await _until("the restarted node resyncs under a new epoch",
                     lambda: backend.block_index.cursor(victim).epoch not in ("", old_epoch), 180)
        async with AsyncClient(server.address, timeout=120) as client:
            await _until("the restarted node is back on the ring", lambda: victim in backend.ring, 120)
            sid = next(f"back-{i}" for i in range(100) if backend.ring.lookup(f"back-{i}") == victim)
            r = await client.process_request({"text": "again " + SYSTEM, "session_id": sid,
                                              "max_length": 2, "temperature": 0.0})
            assert r["success"] and r["node"] == victim, r
        truth = await _node_truth(cluster, victim)
        assert truth
        await _until("the index matches the restarted node", lambda: _indexed(server, victim) == truth)
        for node in backend.members:
            node_truth = await _node_truth(cluster, node)
            await _until(f"the index matches {node}", lambda n=node, t=node_truth: _indexed(server, n) == t)
    finally:
        await server.stop()


async def _history(cluster: LocalCluster, node: str, sid: str) -> tuple[list[int], int]:
    """The newest copy of ``sid`` that ``node`` holds (session or replica): tokens, turns."""
    peers = PeerChannels(read_cluster_secret(cluster.cluster_secret_file))
    try:
        chunks = [c async for c in peers.stub(f"127.0.0.1:{cluster.node_ports[node]}").ExportSession(
            npb.ExportSessionRequest(session_id=sid, include_kv=False), timeout=30)]
        return list(chunks[0].header.token_ids), chunks[0].header.turns
    finally:
        await peers.close()


async def _commit_again(cluster: LocalCluster, owner: str, sid: str, history: list[int],
                        output: list[int], turns: int) -> None:
    """The owner's CommitTurn over the wire: the same commit again is a no-op; another
    output from the same version (a racing stand-in) is refused and changes nothing."""
    prompt = history[: len(history) - len(output)]
    request = pb.GenerateRequest(session_id=sid, request_id="again",
                                 token_ids=pb.TokenIds(ids=[21, 22, 23]),
                                 sampling=pb.SamplingOptions(max_length=4, temperature=0.0))
    peers = PeerChannels(read_cluster_secret(cluster.cluster_secret_file))
    stub = peers.stub(f"127.0.0.1:{cluster.node_ports[owner]}")
    try:
        def commit(ids: list[int]) -> npb.CommitTurnRequest:
            result = pb.GenerateResult(session_id=sid, token_ids=ids, finish_reason=pb.FINISH_REASON_LENGTH)
            return npb.CommitTurnRequest(request=request, turns=turns, prompt_token_ids=prompt, result=result)
        assert (await stub.CommitTurn(commit(output), timeout=30)).turns == turns + 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CommitTurn(commit([1] * len(output)), timeout=30)
        assert (refused.value.code() == grpc.StatusCode.ABORTED
                and f"has {turns + 1} turns now" in refused.value.details())
    finally:
        await peers.close()
    assert await _history(cluster, owner, sid) == (history, turns + 1)


async def _occupy(client: AsyncClient, backend, owner: str, prefix: str) -> asyncio.Task:
    """A long turn of another session ``owner`` owns, running once it streams."""
    sid = next(f"{prefix}-{k}" for k in range(200) if backend.ring.lookup(f"{prefix}-{k}") == owner)
    running = asyncio.Event()

    async def hold() -> None:
        async for _ in client.stream({"token_ids": [11, 12, 13], "session_id": sid,
                                      "max_length": 3000, "ignore_eos": True}):
            running.set()

    task = asyncio.create_task(hold())
    await asyncio.wait_for(running.wait(), 120)
    return task


async def test_an_overloaded_owners_session_turn_runs_on_the_prefix_holder(cluster) -> None:
    server = await _coordinator(cluster, session_offload=True)
    long_streams: list[asyncio.Task] = []
    try:
        backend = server.backend
        await _until("the in-process coordinator routes over both nodes", lambda: len(backend.ring) == 2)
        sid = "offloaded-conversation"
        owner = backend.ring.lookup(sid)
        holder = next(n for n in backend.ring.nodes if n != owner)
        shared = [(7 * i) % 200 + 1 for i in range(160)]  # 10 blocks both sessions start with
        neighbour = next(f"neighbour-{i}" for i in range(100) if backend.ring.lookup(f"neighbour-{i}") == holder)
        greedy = {"temperature": 0.0, "max_length": 4}
        async with AsyncClient(server.address, timeout=120) as client:
            warm = await client.process_request({"token_ids": shared + [3, 4], "session_id": neighbour, **greedy})
            first = await client.process_request({"token_ids": shared + [7, 8, 9], "session_id": sid, **greedy})
            assert warm["success"] and first["success"] and first["node"] == owner, (warm, first)
            await _until("the index shows the holder holding the shared blocks",
                         lambda: backend.block_index.num_blocks(holder) >= 10)

            async def occupy(i: int) -> None:
                long_streams.append(await _occupy(client, backend, owner, f"busy-{i}"))

            await occupy(0)
            await occupy(1)
            # Over its bound (2 of 2 in flight) with room in its batch (2 of 3): the owner runs it.
            roomy = await client.process_request({"token_ids": [15, 16], "session_id": sid, **greedy})
            assert roomy["success"] and roomy["node"] == owner, roomy
            assert backend.counters.stand_in_turns == {}
            await occupy(2)  # its batch is full now: a turn would wait there
            turn = {"token_ids": [21, 22, 23], "session_id": sid, "request_id": "offloaded", **greedy}
            second = await client.process_request(turn)
            assert not any(t.done() for t in long_streams), "the owner was not busy throughout"
            for task in long_streams:
                task.cancel()
            await asyncio.gather(*long_streams, return_exceptions=True)
            assert second["success"], second
            assert second["node"] == holder and second["cached_tokens"] >= 144, second
            assert backend.counters.stand_in_turns == {"served": 1}

            # The owner holds exactly what the client received, one turn more, and replicated it.
            expected = (shared + [7, 8, 9] + first["response"]["token_ids"] + [15, 16]
                        + roomy["response"]["token_ids"] + [21, 22, 23] + second["response"]["token_ids"])
            assert await _history(cluster, owner, sid) == (expected, 3)
            assert await _history(cluster, holder, sid) == (expected, 3)  # the replica
            # The client, unsure, sends the turn again: the owner answers from its turn ledger.
            again = await client.process_request(turn)
            assert again["success"] and again["response"]["token_ids"] == second["response"]["token_ids"]
            assert await _history(cluster, owner, sid) == (expected, 3)
            await _commit_again(cluster, owner, sid, expected, second["response"]["token_ids"], 2)

            last = await client.process_request({"token_ids": [31, 32], "session_id": sid, **greedy})
            assert last["success"] and last["node"] == owner, last
            assert last["usage"]["prompt_tokens"] == len(expected) + 2
            assert await _history(cluster, owner, sid) == (
                expected + [31, 32] + last["response"]["token_ids"], 4)
    finally:
        for task in long_streams:
            task.cancel()
        await asyncio.gather(*long_streams, return_exceptions=True)
        await server.stop()


async def test_a_stand_in_that_stalls_mid_turn_hands_the_turn_back_to_the_owner(cluster) -> None:
    server = await _coordinator(cluster, session_offload=True, stall_timeout_s=2.0, failed_hold_s=1.0)
    long_streams: list[asyncio.Task] = []
    stopped = ""
    try:
        backend = server.backend
        await _until("the in-process coordinator routes over both nodes", lambda: len(backend.ring) == 2)
        sid = next(f"handed-back-{i}" for i in range(100)
                   if backend.ring.lookup(f"handed-back-{i}") == backend.ring.lookup("offloaded-conversation"))
        owner = backend.ring.lookup(sid)
        holder = next(n for n in backend.ring.nodes if n != owner)
        shared = [(11 * i) % 200 + 1 for i in range(160)]
        neighbour = next(f"next-door-{i}" for i in range(100) if backend.ring.lookup(f"next-door-{i}") == holder)
        async with AsyncClient(server.address, timeout=120) as client:
            greedy = {"temperature": 0.0, "max_length": 4}
            warm = await client.process_request({"token_ids": shared + [3], "session_id": neighbour, **greedy})
            first = await client.process_request({"token_ids": shared + [5], "session_id": sid, **greedy})
            assert warm["success"] and first["success"] and first["node"] == owner, (warm, first)
            await _until("the index shows the holder holding the shared blocks",
                         lambda: len(backend.block_index.blocks(holder)
                                     & set(hash_token_blocks(shared, 16))) >= 10)
            for i in range(3):
                long_streams.append(await _occupy(client, backend, owner, f"stall-busy-{i}"))
            received: list[int] = []
            result: dict = {}
            async for chunk in client.stream({"token_ids": [21, 22], "session_id": sid, "max_length": 60,
                                              "ignore_eos": True, "temperature": 0.0}):
                received += chunk.token_ids
                if len(received) >= 2 and not stopped:
                    stopped = holder  # the stand-in stops answering mid-turn
                    cluster.send_signal(holder, signal.SIGSTOP)
                    for task in long_streams:  # and the owner gets room for the rest
                        task.cancel()
                if stopped and backend.counters.stand_in_turns.get("fell_back"):
                    cluster.send_signal(holder, signal.SIGCONT)
                if chunk.finished:
                    result = chunk.result
            assert result["success"] and result["node"] == owner, result
            assert backend.counters.stand_in_turns == {"fell_back": 1}
            assert result["response"]["token_ids"] == received and len(received) == 60
            expected = shared + [5] + first["response"]["token_ids"] + [21, 22] + received
            assert await _history(cluster, owner, sid) == (expected, 2)
    finally:
        if stopped:
            cluster.send_signal(stopped, signal.SIGCONT)
        for task in long_streams:
            task.cancel()
        await asyncio.gather(*long_streams, return_exceptions=True)
        await server.stop()


async def test_an_owner_that_dies_before_the_commit_gets_the_turn_recorded_by_its_heir(cluster) -> None:
    """Last in the module: it kills a node. The stand-in finishes the turn, its owner is
    gone: the session is restored on the heir (here the stand-in, which holds its replica)
    and the turn is committed there at the same version, before the client gets it."""
    server = await _coordinator(cluster, session_offload=True)
    long_streams: list[asyncio.Task] = []
    try:
        backend = server.backend
        await _until("the in-process coordinator routes over both nodes", lambda: len(backend.ring) == 2)
        owner = backend.ring.lookup("offloaded-conversation")
        sid = next(f"heir-{i}" for i in range(100) if backend.ring.lookup(f"heir-{i}") == owner)
        holder = next(n for n in backend.ring.nodes if n != owner)
        shared = [(13 * i) % 200 + 1 for i in range(160)]
        neighbour = next(f"heir-door-{i}" for i in range(100) if backend.ring.lookup(f"heir-door-{i}") == holder)
        async with AsyncClient(server.address, timeout=120) as client:
            greedy = {"temperature": 0.0, "max_length": 4}
            warm = await client.process_request({"token_ids": shared + [3], "session_id": neighbour, **greedy})
            first = await client.process_request({"token_ids": shared + [5], "session_id": sid, **greedy})
            assert warm["success"] and first["success"] and first["node"] == owner, (warm, first)
            assert (await _history(cluster, holder, sid))[1] == 1  # the replica
            await _until("the index shows the holder holding the shared blocks",
                         lambda: len(backend.block_index.blocks(holder)
                                     & set(hash_token_blocks(shared, 16))) >= 10)
            for i in range(3):
                long_streams.append(await _occupy(client, backend, owner, f"heir-busy-{i}"))
            received: list[int] = []
            result: dict = {}
            killed = False
            async for chunk in client.stream({"token_ids": [21, 22], "session_id": sid, "max_length": 40,
                                              "ignore_eos": True, "temperature": 0.0}):
                received += chunk.token_ids
                if received and not killed:
                    killed = True
                    for task in long_streams:
                        task.cancel()
                    cluster.kill_node(owner)
                if chunk.finished:
                    result = chunk.result
            assert killed and result["success"] and result["node"] == holder, result
            assert backend.counters.stand_in_turns == {"served": 1}
            assert result["response"]["token_ids"] == received and len(received) == 40
            expected = shared + [5] + first["response"]["token_ids"] + [21, 22] + received
            assert backend.ring.lookup(sid) == holder
            assert await _history(cluster, holder, sid) == (expected, 2)
    finally:
        for task in long_streams:
            task.cancel()
        await asyncio.gather(*long_streams, return_exceptions=True)
        await server.stop()
