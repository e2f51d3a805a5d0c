"""No acknowledged turn is lost or rewritten when nodes stall, die or come back (issue 9).

One cluster (etcd, a coordinator, three `tiny` CPU node processes) serves the module; the
tests run in file order, each leaving a serving cluster behind. Every test checks a session's
stored history token for token against what its client received. Checkpoints are off in
effect (a long interval): the histories live in sessions and their replicas only, the case
the defects were found in.

Tests that start right after a stall wait for the cluster's full strength first.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import AsyncIterator

import grpc
import pytest
from ultrakv.client import AsyncClient
from ultrakv.client.local_cluster import ClusterSpec, LocalCluster
from ultrakv.cluster.peer_auth import read_cluster_secret
from ultrakv.cluster.peers import PeerChannels
from ultrakv.cluster.ring import DEFAULT_VNODES, HashRing, replica_targets
from ultrakv.cluster.store import EtcdStore
from ultrakv.coordinator.dynamic_config import CONFIG_KEY, set_overrides
from ultrakv.node.chat import ChatMessage
from ultrakv.node.tokenizer import ByteTokenizer  # the tiny preset's tokenizer
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import node_pb2_grpc
from ultrakv.v1 import types_pb2 as pb

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

# Quick detection, so a stalled node is noticed in about a second and a half.
FAST_HEALTH = {"health_interval_s": 0.5, "health_timeout_s": 0.5, "health_down_after": 3,
               "health_up_after": 2, "failed_hold_s": 1.0}
LONG = 150  # tokens: a turn that streams for seconds on a loaded CPU


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("durability")
    # One replica per session: these tests follow the chain owner -> successor -> the next.
    spec = ClusterSpec(nodes=3, coordinators=1, data_dir=data, port=0, device="cpu",
                       num_blocks=1024, lease_ttl_s=2, checkpoint_interval_s=3600.0,
                       log_dir=data / "logs", node_args=["--replicas", "1"],
                       coordinator_args=["--replicas", "1"])
    with LocalCluster(spec) as c:
        asyncio.run(_configure(c, FAST_HEALTH))
        yield c


async def _configure(cluster: LocalCluster, overrides: dict) -> None:
    async with EtcdStore(cluster.etcd_endpoint) as store:
        if overrides:
            await set_overrides(store, overrides)
        else:
            await store.delete(CONFIG_KEY)


@contextlib.asynccontextmanager
async def _node(cluster: LocalCluster, node: str) -> AsyncIterator[node_pb2_grpc.NodeServiceStub]:
    """A NodeService stub for ``node``, calling as a cluster peer (with the secret)."""
    peers = PeerChannels(read_cluster_secret(cluster.cluster_secret_file))
    try:
        yield peers.stub(f"127.0.0.1:{cluster.node_ports[node]}")
    finally:
        await peers.close()


async def stored_history(cluster: LocalCluster, node: str, session_id: str) -> list[int]:
    """The session's history as ``node`` holds it (session or replica)."""
    async with _node(cluster, node) as stub:
        chunks = [c async for c in stub.ExportSession(
            npb.ExportSessionRequest(session_id=session_id, include_kv=False), timeout=30)]
    return list(chunks[0].header.token_ids)


def _prompt(seed: int) -> list[int]:
    return [(seed * 11 + i) % 250 + 1 for i in range(9)]


async def turn(client: AsyncClient, session_id: str, prompt, max_length: int,
               on_chunk=None, after: int = 1) -> tuple[dict, list[int]]:
    """One streamed turn: (result, the token ids the client received); ``on_chunk`` runs
    once, when ``after`` tokens have arrived."""
    spec = {"session_id": session_id, "max_length": max_length, "temperature": 0.0,
            "ignore_eos": True}
    spec.update({"text": prompt} if isinstance(prompt, str) else {"token_ids": prompt})
    received: list[int] = []
    result: dict = {}
    async for chunk in client.stream(spec):
        received.extend(chunk.token_ids)
        if len(received) >= after and on_chunk is not None:
            on_chunk()
            on_chunk = None
        if chunk.finished:
            result = chunk.result
    assert result.get("success"), result
    assert result["response"]["token_ids"] == received, "one stream, no gaps"
    return result, received


def _signal(cluster: LocalCluster, node: str, sig: int) -> None:
    cluster.send_signal(node, sig)


async def test_a_replica_on_a_node_held_off_the_ring_survives_the_owners_death(cluster) -> None:
    """Issue 1 of the follow-up (a slow replica must not lose acknowledged history): a node
    held off the routing ring (its forward stalled: slow, not dead) still gets replicas from
    its ring predecessors. When such a session's owner dies, the node's replica may be the
    only copy of the acknowledged turns. Before, re-sharding listed only the nodes on the
    ring, never saw that replica, and the next turn ran on the new owner from an empty
    history. Now a plan also lists registered nodes held off the ring that answer at once.
    First in the module: no node has a failed forward on record yet (a longer failed_hold_s
    would keep such a node off the ring from the start)."""
    await _full_strength(cluster)
    nodes = sorted(cluster.nodes)
    slow, owner = nodes[0], nodes[1]
    other = nodes[2]
    sid = _session_placed("off-ring", nodes, owner, slow)
    stalled = _session_placed("stalled", nodes, slow, other)
    # A forward that stalls takes the node off the ring for failed_hold_s; health never
    # brings it back (it never marks it down either).
    await _configure(cluster, {**FAST_HEALTH, "health_down_after": 100, "failed_hold_s": 600.0,
                               "stall_timeout_s": 1.0})
    try:
        async with AsyncClient(cluster.address, timeout=120) as client:
            placed, _ = await turn(client, stalled, _prompt(40), 4)
            assert placed["node"] == slow
            spec = {"session_id": stalled, "token_ids": _prompt(41), "max_length": LONG,
                    "temperature": 0.0, "ignore_eos": True}
            log = cluster.spec.log_dir / "coordinator-1.log"
            given_up = len(re.findall(f"on {slow} failed after", log.read_text(errors="replace")))

            async def wake_when_given_up() -> None:
                # Stopped only until the coordinator gives the forward up: longer, the node's
                # lease would expire, and its return would put it back on the ring.
                async def gave_up() -> bool:
                    text = log.read_text(errors="replace")
                    return len(re.findall(f"on {slow} failed after", text)) > given_up

                await _until(f"the forward on {slow} given up", gave_up)
                _signal(cluster, slow, signal.SIGCONT)

            waking: asyncio.Task | None = None
            try:
                async for chunk in client.stream(spec):
                    if chunk.token_ids and waking is None:
                        _signal(cluster, slow, signal.SIGSTOP)  # the stream stalls
                        waking = asyncio.create_task(wake_when_given_up())
                await waking
            finally:
                _signal(cluster, slow, signal.SIGCONT)
            assert f"'{slow}'" not in _routing_ring(cluster), "held off the ring"
            first, acknowledged = await turn(client, sid, _prompt(42), 8)
            assert first["node"] == owner
            history = _prompt(42) + acknowledged
            held = {n: await _listed(cluster, n) for n in nodes}
            assert held[slow] is not None and sid in held[slow], "replicated to the slow node"
            assert sid not in (held[other] or {}), "the slow node holds the only replica"
            cluster.kill_node(owner)
            second, more = await turn(client, sid, _prompt(43), 8)
        assert second["node"] == other
        assert second["usage"]["prompt_tokens"] == len(history) + len(_prompt(43)), "turn 1 lost"
        assert await stored_history(cluster, other, sid) == history + _prompt(43) + more
    finally:
        await _configure(cluster, FAST_HEALTH)
        if owner not in cluster.nodes:
            cluster.start_node(owner)
        await asyncio.to_thread(cluster.wait_ready, 3)


@pytest.mark.parametrize("detector", ["health", "stall_deadline"])
async def test_a_stream_stuck_on_a_stopped_node_moves_on(cluster, detector: str) -> None:
    """Defect 5: a stream stuck on a SIGSTOPped node finishes elsewhere while the node is
    still stopped (before: it hung for as long as the node did), resumed from the exact
    token ids, with exact usage. ``health``: the health loop marks the node down;
    ``stall_deadline``: health never does, the inter-token stall deadline alone moves it."""
    sid = f"stall-{detector}"
    await _full_strength(cluster)
    if detector == "stall_deadline":
        await _configure(cluster, {**FAST_HEALTH, "health_down_after": 100,
                                   "failed_hold_s": 60.0, "stall_timeout_s": 1.0})
    try:
        async with AsyncClient(cluster.address, timeout=120) as client:
            first, _ = await turn(client, sid, _prompt(1), 8)
            owner = first["node"]
            history = await stored_history(cluster, owner, sid)
            try:
                result, received = await asyncio.wait_for(
                    turn(client, sid, _prompt(2), LONG,
                         on_chunk=lambda: _signal(cluster, owner, signal.SIGSTOP)), 90)
            finally:
                _signal(cluster, owner, signal.SIGCONT)
    finally:
        await _configure(cluster, FAST_HEALTH)
    assert result["node"] != owner
    assert len(received) == LONG
    assert await stored_history(cluster, result["node"], sid) == history + _prompt(2) + received
    assert result["usage"]["prompt_tokens"] == len(history) + len(_prompt(2))
    assert result["usage"]["completion_tokens"] == LONG
    assert 0 <= result["usage"]["cached_tokens"] <= result["usage"]["prompt_tokens"]


def _generate(sid: str, prompt: list[int], max_length: int, request_id: str,
              resume: list[int] = ()) -> pb.GenerateRequest:
    """A forward as a coordinator sends it (``resume``: the ids a resumed one already sent)."""
    request = pb.GenerateRequest(
        request_id=request_id, session_id=sid, token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingOptions(max_length=max_length - len(resume), temperature=0.0,
                                    ignore_eos=True))
    request.resume_token_ids.extend(resume)
    return request


async def forward(cluster: LocalCluster, node: str,
                  request: pb.GenerateRequest) -> tuple[list[int], pb.GenerateResult | None, str]:
    """Send ``request`` straight to ``node``'s NodeService, as a coordinator forwards it:
    (the token ids streamed, the result or None, the error's code or "")."""
    received: list[int] = []
    async with _node(cluster, node) as stub:
        call = stub.Generate(iter([pb.GenerateStreamRequest(generate=request)]), timeout=60)
        try:
            async for message in call:
                kind = message.WhichOneof("event")
                if kind == "chunk":
                    received.extend(message.chunk.token_ids)
                elif kind == "result":
                    return received, message.result, ""
                else:
                    return received, None, message.error.code
        finally:
            call.cancel()
    return received, None, "stream ended"


async def _full_strength(cluster: LocalCluster) -> None:
    """Wait until every node runs and is on the coordinator's routing ring (one stopped by
    the previous test is trusted again): a node still off the ring is a case of its own
    (test_a_replica_on_a_node_held_off_the_ring_survives_the_owners_death)."""
    async def all_routed() -> bool:
        ring = _routing_ring(cluster)
        log = (cluster.spec.log_dir / "coordinator-1.log").read_text(errors="replace")
        health = {n: re.findall(rf"node {n}: \w+ -> (\w+)", log) for n in cluster.nodes}
        return all(f"'{n}'" in ring and health[n][-1:] == ["up"] for n in cluster.nodes)

    await _until("every node up and on the routing ring", all_routed)


async def test_a_retried_turn_is_answered_from_its_replica_never_taken_twice(cluster) -> None:
    """Issue 2 of the follow-up: the owner finishes a turn and replicates it, and dies before
    the coordinator hears the end; the coordinator retries the request on the successor (no
    token received) or resumes it (some received). Before, the successor ran it again on top
    of the replicated turn: the new owner held the turn twice (the load-dependent failure of
    test_cluster_serving's kill-during-turn-2). Now the turn's record, replicated with the
    history, answers both, and the history holds the turn once."""
    sid = "retry-replicated"
    await _full_strength(cluster)
    async with AsyncClient(cluster.address, timeout=120) as client:
        first, _ = await turn(client, sid, _prompt(20), 8)
    owner = first["node"]
    history = await stored_history(cluster, owner, sid)
    # Turn 2 on the owner, as the coordinator forwards it; its end never reaches the caller.
    request = _generate(sid, _prompt(21), 12, "turn-2")
    out, result, error = await forward(cluster, owner, request)
    assert result is not None and not error, error
    assert len(out) == 12
    history += _prompt(21) + out
    holders = [n for n in cluster.nodes if n != owner
               and sid in ((await _listed(cluster, n)) or {})
               and await stored_history(cluster, n, sid) == history]
    assert holders, "turn 2 replicated"
    successor = holders[0]
    # The retry (nothing was received), then a resume after 5 received ids, on the successor.
    again, retried, error = await forward(cluster, successor, request)
    assert retried is not None and not error, error
    assert again == out and list(retried.token_ids) == out
    assert retried.usage.prompt_tokens == len(history) - len(out)
    rest, resumed, error = await forward(cluster, successor,
                                         _generate(sid, _prompt(21), 12, "turn-2", out[:5]))
    assert resumed is not None and not error, error
    assert rest == out[5:]
    assert resumed.usage.prompt_tokens == len(history) - len(out) + 5
    assert await stored_history(cluster, successor, sid) == history, "turn 2 taken twice"
    # Another request (another id) is a new turn, on top of turn 2 once.


async def _listed(cluster: LocalCluster, node: str) -> dict[str, npb.SessionInfo] | None:
    """``node``'s copies (sessions and replicas) by session id; None if it does not answer."""
    try:
        async with _node(cluster, node) as stub:
            reply = await stub.ListSessions(npb.ListSessionsRequest(), timeout=5)
    except grpc.aio.AioRpcError:
        return None
    return {s.session_id: s for s in reply.sessions}


async def _until(what: str, check, timeout_s: float = 60.0) -> None:
    """Poll ``check()`` (async) until true; fail naming ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not await check():
        assert loop.time() < end, f"not within {timeout_s:.0f} s: {what}"
        await asyncio.sleep(0.2)


def _routing_ring(cluster: LocalCluster) -> str:
    """The coordinator's routing ring as it last logged it (health or lease expiry, whichever
    takes a stopped node off it first)."""
    log = (cluster.spec.log_dir / "coordinator-1.log").read_text(errors="replace")
    rings = re.findall(r"routing ring epoch \d+: (\[[^\]]*\])", log)
    return rings[-1] if rings else ""


async def test_a_node_marked_down_neither_takes_nor_acknowledges_a_stale_turn(cluster) -> None:
    """Issue 1 of the follow-up (fencing): a slow owner (here SIGSTOPped) is marked down and
    its session restored on the successor, which serves turn 2. The owner wakes up while
    routers still believe it owns the session (a second coordinator with a stale view; the
    coordinator here is frozen, so nothing moves meanwhile) and is forwarded a turn. Before,
    it took the turn on its stale copy and acknowledged it: two copies accepting turns, and
    when they met, the tie of turns went to the owner and turn 2 was lost. Now the successor
    refuses the stale copy's replication, and the old owner neither acknowledges the turn nor
    keeps its copy: every acknowledged turn is in the history, once."""
    sid = "fenced"
    await _full_strength(cluster)
    # Probes that a loaded machine's other nodes still answer in time: only the stopped one
    # may go off the ring.
    await _configure(cluster, {**FAST_HEALTH, "health_interval_s": 1.0, "health_timeout_s": 1.0})
    async with AsyncClient(cluster.address, timeout=120) as client:
        first, _ = await turn(client, sid, _prompt(30), 8)
        owner = first["node"]
        history = await stored_history(cluster, owner, sid)
        _signal(cluster, owner, signal.SIGSTOP)
        stopped = [owner]
        try:
            async def routed_around() -> bool:
                return f"'{owner}'" not in _routing_ring(cluster)

            await _until(f"{owner} off the routing ring", routed_around)
            second, received = await turn(client, sid, _prompt(31), 8)
            assert second["node"] != owner
            history += _prompt(31) + received
            _signal(cluster, "coordinator-1", signal.SIGSTOP)
            stopped.append("coordinator-1")
            _signal(cluster, owner, signal.SIGCONT)
            stopped.remove(owner)
            out, result, error = await forward(cluster, owner,
                                               _generate(sid, _prompt(32), 8, "stale-view"))
            assert result is None, "a node marked down acknowledged a turn on its stale copy"
            held = await _listed(cluster, owner)
            assert held is not None and (sid not in held or held[sid].replica), held
        finally:
            for name in stopped:
                _signal(cluster, name, signal.SIGCONT)
            await _configure(cluster, FAST_HEALTH)
        third, more = await turn(client, sid, _prompt(33), 8)
    assert third["usage"]["prompt_tokens"] == len(history) + len(_prompt(33)), "turn 2 lost"
    assert await stored_history(cluster, third["node"], sid) == history + _prompt(33) + more


def _session_placed(prefix: str, nodes: list[str], owner: str, successor: str) -> str:
    """A session id whose owner on the ring of ``nodes`` is ``owner`` and whose first replica
    goes to ``successor``."""
    ring = HashRing(sorted(nodes), vnodes=DEFAULT_VNODES)
    return next(sid for i in range(10_000) if ring.lookup(sid := f"{prefix}-{i}") == owner
                and replica_targets(ring, sid, owner)[0] == successor)


async def test_a_returning_owner_never_wins_over_a_turn_served_without_it(cluster) -> None:
    """Defect 3: the owner is SIGSTOPped and marked down; the stand-in serves turn 2; the
    owner comes back (SIGCONT) while that turn is in flight. Before, the move plan saw two
    copies of equal length, kept the owner's and dropped the stand-in's under the running
    turn: turn 2 was acknowledged and lost. Now the move waits for the turn and the copy with
    more turns wins."""
    sid = "returning-owner"
    async with AsyncClient(cluster.address, timeout=120) as client:
        first, _ = await turn(client, sid, _prompt(5), 8)
        owner = first["node"]
        history = await stored_history(cluster, owner, sid)
        _signal(cluster, owner, signal.SIGSTOP)
        try:
            async def routed_around() -> bool:
                return f"'{owner}'" not in _routing_ring(cluster)

            await _until(f"{owner} off the routing ring", routed_around)
            second, received = await asyncio.wait_for(
                turn(client, sid, _prompt(6), 2 * LONG,
                     on_chunk=lambda: _signal(cluster, owner, signal.SIGCONT)), 120)
        finally:
            _signal(cluster, owner, signal.SIGCONT)
        assert second["node"] != owner
        history += _prompt(6) + received
        third, more = await turn(client, sid, _prompt(7), 8)
    assert third["usage"]["prompt_tokens"] == len(history) + len(_prompt(7)), "turn 2 lost"
    assert await stored_history(cluster, third["node"], sid) == history + _prompt(7) + more


async def test_a_resumed_text_stream_keeps_the_token_ids_the_client_received(cluster) -> None:
    """Defect 4 and exact accounting: the owner is SIGKILLed mid-stream of a text prompt;
    the resumed turn's stored history is the prompt plus exactly the received ids (before:
    the received ids were decoded to text and re-encoded, which the byte-level tokenizer
    does not give back for ids >= 256 or bytes that are not UTF-8)."""
    sid = "resume-text"
    text = "Tell me a story about a cache that never forgot."
    async with AsyncClient(cluster.address, timeout=120) as client:
        first, _ = await turn(client, sid, "Hello there.", 8)
        owner = first["node"]
        history = await stored_history(cluster, owner, sid)
        result, received = await asyncio.wait_for(
            turn(client, sid, text, LONG, after=30,  # enough ids that some do not re-encode
                 on_chunk=lambda: _signal(cluster, owner, signal.SIGKILL)), 90)
    cluster.kill_node(owner)  # reaped, out of the cluster's processes
    assert result["node"] != owner
    prompt = list(text.encode())  # byte-level tokenizer, no BOS after the first turn
    assert await stored_history(cluster, result["node"], sid) == history + prompt + received
    assert result["usage"]["prompt_tokens"] == len(history) + len(prompt)
    assert result["usage"]["completion_tokens"] == LONG
    assert 0 <= result["usage"]["cached_tokens"] <= result["usage"]["prompt_tokens"]


async def test_a_dead_nodes_replica_follows_the_session_when_the_node_rejoins(cluster) -> None:
    """Defect 2: a session created since its owner's last checkpoint has its replica on the
    successor as its only copy. The owner is SIGKILLed and restarted before the session's
    next turn: the replica must reach it (before, re-sharding never saw replicas, and the
    rejoined owner served the next turn from an empty history)."""
    sid = "rejoin"
    async with AsyncClient(cluster.address, timeout=120) as client:
        first, _ = await turn(client, sid, _prompt(8), 8)
        owner = first["node"]
        history = await stored_history(cluster, owner, sid)
        cluster.kill_node(owner)
        cluster.start_node(owner)  # same id and port; no checkpoint holds the session
        await asyncio.to_thread(cluster.wait_ready, len(cluster.nodes))

        async def back_on_owner() -> bool:
            try:
                return await stored_history(cluster, owner, sid) == history
            except grpc.aio.AioRpcError:
                return False

        await _until(f"{sid} moved back to {owner}", back_on_owner)
        second, received = await turn(client, sid, _prompt(9), 8)
    assert second["node"] == owner
    assert second["usage"]["prompt_tokens"] == len(history) + len(_prompt(9))
    assert await stored_history(cluster, owner, sid) == history + _prompt(9) + received


async def test_a_session_survives_its_owner_and_then_its_replica_holder(cluster) -> None:
    """Defect 2: after the owner's death the replica holder owns the session; it is
    replicated on from there, so the holder's death too loses nothing (before, the only
    copy was the holder's unpromoted replica, in no checkpoint and on no other node)."""
    dead = sorted(set(cluster.node_ports) - set(cluster.nodes))
    for node in dead:  # back to three nodes
        cluster.start_node(node)
    await asyncio.to_thread(cluster.wait_ready, 3)
    sid = "double-death"
    async with AsyncClient(cluster.address, timeout=120) as client:
        first, _ = await turn(client, sid, _prompt(10), 8)
        owner = first["node"]
        history = await stored_history(cluster, owner, sid)
        holders = [n for n in cluster.nodes if n != owner
                   and sid in ((await _listed(cluster, n)) or {})]
        assert len(holders) == 1, holders
        holder = holders[0]
        third = next(n for n in cluster.nodes if n not in (owner, holder))
        cluster.kill_node(owner)

        async def replicated_on() -> bool:
            return sid in ((await _listed(cluster, third)) or {})

        await _until(f"{sid} replicated on to {third}", replicated_on)
        cluster.kill_node(holder)
        second, received = await turn(client, sid, _prompt(11), 8)
    assert second["node"] == third
    assert second["usage"]["prompt_tokens"] == len(history) + len(_prompt(11))
    assert await stored_history(cluster, third, sid) == history + _prompt(11) + received


async def test_a_chat_session_keeps_its_messages_when_its_owner_dies(cluster) -> None:
    """A chat session's conversation (its messages, not only its tokens) goes with its
    replica: after the owner is SIGKILLed, the third turn on the successor renders the whole
    conversation and prefills only what follows the history (before, the replica had no
    messages: the successor rendered the new message alone, as if the session had never been
    chat, and the session forgot the earlier messages for good)."""
    dead = sorted(set(cluster.node_ports) - set(cluster.nodes))
    for node in dead:  # back to three nodes
        cluster.start_node(node)
    await asyncio.to_thread(cluster.wait_ready, 3)
    await _full_strength(cluster)
    sid = "chat-moves"
    said = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    conversation = list(said)
    spec = {"session_id": sid, "max_length": 6, "temperature": 0.0, "ignore_eos": True}
    async with AsyncClient(cluster.address, timeout=120) as client:
        first = await client.process_request({**spec, "messages": said})
        assert first["success"], first
        owner = first["node"]
        conversation.append({"role": "assistant", "content": first["response"]["text"]})
        said = [{"role": "user", "content": "And then?"}]
        second = await client.process_request({**spec, "messages": said})
        assert second["success"] and second["node"] == owner, second
        conversation += [*said, {"role": "assistant", "content": second["response"]["text"]}]
        history = await stored_history(cluster, owner, sid)

        async def replicated() -> bool:
            for n in cluster.nodes:
                info = ((await _listed(cluster, n)) or {}).get(sid) if n != owner else None
                if info is not None and info.turns >= 2:
                    return True
            return False

        # The subject here is what a replica carries, so the test starts from a replica that
        # exists: a successor restarted just before may still refuse the owner's push for a
        # moment, and the turn is then acknowledged with no copy (a gap left open in issue 9;
        # in one CI run the owner died before any copy existed).
        await _until(f"{sid}'s second turn replicated", replicated)
        cluster.kill_node(owner)
        said = [{"role": "user", "content": "Thanks."}]
        third = await client.process_request({**spec, "messages": said})
    assert third["success"] and third["node"] != owner, third
    conversation += said
    tok = ByteTokenizer()
    rendered = tok.chat_template.render([ChatMessage(**m) for m in conversation])
    held = tok.decode(history, skip_special_tokens=False)
    assert rendered.startswith(held), "the template continues the session's tokens"
    expected = len(history) + len(tok.encode(rendered[len(held):], add_bos=False))
    assert third["usage"]["prompt_tokens"] == expected, "turn 3 rendered without turns 1-2"
    async with _node(cluster, third["node"]) as stub:
        chunks = [c async for c in stub.ExportSession(
            npb.ExportSessionRequest(session_id=sid, include_kv=False), timeout=30)]
    kept = [(m.role, m.content) for m in chunks[0].header.messages]
    assert kept == [(m["role"], m["content"]) for m in conversation] + [
        ("assistant", third["response"]["text"])]
