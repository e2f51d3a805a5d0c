"""No turn is acknowledged unless it is durable, and a node that may be stale acknowledges
none (durability round 2, issue 9).

One cluster (etcd, a coordinator, two `tiny` CPU node processes, one replica per session)
serves the module. The lease TTL (8 s) outlasts the replication patience (1 s) several
times over, so a stopped successor is still a registered member while its predecessor waits
for it; the fencing test stops a node past that TTL. The tests run in file order (the last
one kills a node). Every test checks the stored histories token for token against what its
client received.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from test_cluster_durability import (
    FAST_HEALTH,
    _configure,
    _full_strength,
    _generate,
    _listed,
    _node,
    _prompt,
    _session_placed,
    _until,
    forward,
    stored_history,
    turn,
)
from ultrakv.client import AsyncClient
from ultrakv.client.client import RetryPolicy
from ultrakv.client.local_cluster import ClusterSpec, LocalCluster
from ultrakv.cluster.membership import NODES_PREFIX
from ultrakv.cluster.store import EtcdStore, EtcdUnavailableError
from ultrakv.v1 import types_pb2 as pb

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("acknowledged")
    spec = ClusterSpec(nodes=2, coordinators=1, data_dir=data, port=0, device="cpu",
                       num_blocks=512, lease_ttl_s=8, checkpoint_interval_s=3600.0,
                       log_dir=data / "logs",
                       node_args=["--replicas", "1", "--replication-patience", "1"],
                       coordinator_args=["--replicas", "1"])
    with LocalCluster(spec) as c:
        asyncio.run(_configure(c, FAST_HEALTH))
        yield c


async def _holds(cluster: LocalCluster, node: str, sid: str, turns: int) -> bool:
    info = ((await _listed(cluster, node)) or {}).get(sid)
    return info is not None and info.turns >= turns


async def _expired(cluster: LocalCluster, node: str) -> bool:
    """Whether ``node``'s registration is gone from etcd (its lease expired)."""
    try:
        async with EtcdStore(cluster.etcd_endpoint, timeout_s=30) as store:
            return await store.get(NODES_PREFIX + node) is None
    except EtcdUnavailableError:  # slow to answer on a loaded machine: ask again
        return False


async def _stream(client: AsyncClient, sid: str, prompt: list[int], request_id: str,
                  received: list[int]) -> dict:
    """One streamed turn with ``request_id``; the ids received go to ``received``."""
    result: dict = {}
    async for chunk in client.stream({"session_id": sid, "token_ids": prompt, "max_length": 8,
                                      "temperature": 0.0, "ignore_eos": True,
                                      "request_id": request_id}):
        received.extend(chunk.token_ids)
        if chunk.finished:
            result = chunk.result
    return result


async def test_a_node_whose_lease_expired_acknowledges_no_turn(cluster) -> None:
    """Self-fencing: the owner is stopped past its lease TTL; its key expires, the session
    moves to the successor, which serves turn 2. The successor is then stopped too (no node
    can refuse the old owner's copy), and the owner wakes up to a turn forwarded by a router
    with a stale view. Before, it took the turn on its stale copy and acknowledged it with
    no copy; when the two copies met, turn 2 or the stale turn was lost. Now a node that
    cannot prove its lease alive registers again first and fences the sessions it held:
    the turn is refused (UNAVAILABLE), while a request without a session is still served;
    the next turn continues from turn 2."""
    await _full_strength(cluster)
    owner, successor = sorted(cluster.nodes)
    sid = _session_placed("fenced-lease", [owner, successor], owner, successor)
    async with AsyncClient(cluster.address, timeout=120) as client:
        first, _ = await turn(client, sid, _prompt(70), 8)
        assert first["node"] == owner
        await _until(f"{successor} holds turn 1", lambda: _holds(cluster, successor, sid, 1))
        stopped = [owner]
        cluster.send_signal(owner, signal.SIGSTOP)
        try:
            await _until(f"{owner}'s lease expired", lambda: _expired(cluster, owner))
            second, received = await turn(client, sid, _prompt(71), 8)
            assert second["node"] == successor
            history = await stored_history(cluster, successor, sid)
            cluster.send_signal(successor, signal.SIGSTOP)
            stopped.append(successor)
            cluster.send_signal(owner, signal.SIGCONT)
            stopped.remove(owner)
            out, result, error = await forward(cluster, owner,
                                               _generate(sid, _prompt(72), 8, "stale-lease"))
            assert result is None, "a node whose lease expired acknowledged a turn"
            assert error == "UNAVAILABLE", error

            async def fenced() -> bool:  # its copy held as a replica until re-sharding settles it
                held = await _listed(cluster, owner)
                return held is not None and (sid not in held or held[sid].replica)

            await _until(f"{owner}'s copy of {sid} fenced", fenced)
            stateless = pb.GenerateRequest(request_id="no-session", token_ids=pb.TokenIds(
                ids=_prompt(73)), sampling=pb.SamplingOptions(max_length=4, temperature=0.0,
                                                              ignore_eos=True))
            _, served, error = await forward(cluster, owner, stateless)
            assert served is not None and not error, error
        finally:
            for name in stopped:
                cluster.send_signal(name, signal.SIGCONT)
        third, more = await turn(client, sid, _prompt(74), 8)
    assert third["usage"]["prompt_tokens"] == len(history) + len(_prompt(74)), "turn 2 lost"
    assert await stored_history(cluster, third["node"], sid) == history + _prompt(74) + more


async def _not_durable(cluster: LocalCluster, node: str) -> int:
    """How many turns ``node`` refused to acknowledge for want of a copy (its stats)."""
    async with _node(cluster, node) as stub:
        stats = await stub.Stats(pb.StatsRequest(), timeout=30)
    return int(stats.engine["replication"]["not_durable"]) if "replication" in stats.engine else 0


async def test_a_turn_is_acknowledged_only_once_a_successor_holds_a_copy(cluster) -> None:
    """Defect 1: the session's only successor is a registered member that takes no copy
    (stopped here; in the CI run, restarted a moment before). Before, the owner found no
    stand-in and acknowledged the turn with no copy: its death then lost the turn. Now the
    owner waits for a copy for the replication patience and then fails the turn
    unacknowledged (counted); the coordinator asks again, and once the successor answers
    the owner stores the copy and answers from the turn's record (never running it twice):
    the client gets one stream, acknowledged when durable, and the owner's death loses
    nothing."""
    await _full_strength(cluster)
    owner, successor = sorted(cluster.nodes)
    sid = _session_placed("durable", [owner, successor], owner, successor)
    async with AsyncClient(cluster.address, timeout=120, retry=RetryPolicy(attempts=1)) as client:
        first, _ = await turn(client, sid, _prompt(60), 8)
        assert first["node"] == owner
        await _until(f"{successor} holds turn 1", lambda: _holds(cluster, successor, sid, 1))
        history = await stored_history(cluster, owner, sid)
        received: list[int] = []
        cluster.send_signal(successor, signal.SIGSTOP)
        try:
            second = asyncio.create_task(_stream(client, sid, _prompt(61), "turn-2", received))

            async def refused_or_done() -> bool:
                return second.done() or await _not_durable(cluster, owner) >= 1

            await _until("the owner refusing turn 2 without a copy", refused_or_done)
            assert not second.done(), "turn 2 acknowledged while no other node held a copy"
        finally:
            cluster.send_signal(successor, signal.SIGCONT)
        result = await second
        assert result.get("success"), result
        assert result["node"] == owner and len(received) == 8
        history += _prompt(61) + received
        assert await stored_history(cluster, owner, sid) == history, "turn 2 taken twice"
        assert await stored_history(cluster, successor, sid) == history, "acknowledged, no copy"
        await _full_strength(cluster)  # the successor back on the routing ring
        cluster.kill_node(owner)
        # Until the dead owner's lease expires it is a registered member the successor waits
        # for (longer than this module's patience): the successor's turn is then acknowledged
        # as the last survivor's, with no copy.
        await _until(f"{owner}'s lease expired", lambda: _expired(cluster, owner))
        third, more = await turn(client, sid, _prompt(62), 8)
    assert third["node"] == successor
    assert third["usage"]["prompt_tokens"] == len(history) + len(_prompt(62)), "turn 2 lost"
    assert await stored_history(cluster, successor, sid) == history + _prompt(62) + more
