"""Pure pieces of the cluster: move plans, replica targets, history merges, resumed requests,
the per-session gate."""

from __future__ import annotations

import asyncio

import pytest
import torch
from ultrakv.cluster.checkpoint import merge_with_history
from ultrakv.cluster.ring import HashRing, replica_targets
from ultrakv.cluster.session_state import SessionState
from ultrakv.coordinator.resharding import Copy, Move, authoritative, plan_moves
from ultrakv.coordinator.server import SessionGate, delete_outcome, resumed_request
from ultrakv.v1 import types_pb2 as pb


def test_replica_target_is_the_owner_after_the_node_dies() -> None:
    ring = HashRing([f"n{i}" for i in range(5)])
    for i in range(2000):
        sid = f"s{i}"
        owner = ring.lookup(sid)
        target = replica_targets(ring, sid, owner)[0]
        assert target != owner
        assert ring.without_node(owner).lookup(sid) == target


def test_plan_moves_the_copy_with_the_most_turns_to_the_owner() -> None:
    ring = HashRing(["a", "b", "c"])
    sid = next(f"s{i}" for i in range(100) if ring.lookup(f"s{i}") == "a")
    # a newer live copy on b (a holds an old one): move b -> a
    plan = plan_moves({sid: [Copy("a", 1, 10, True), Copy("b", 2, 30, True)]}, ring)
    assert plan.moves == [Move(sid, "b", "a", True)]
    # the owner's copy is the newest, a stale session on c: settle under the lock
    plan = plan_moves({sid: [Copy("a", 3, 30, True), Copy("c", 1, 10, True)]}, ring)
    assert plan.moves == [Move(sid, "a", "a", True)]
    # only a dead node's checkpoint: restore on the owner
    plan = plan_moves({sid: [Copy("dead", 2, 30, False)]}, ring)
    assert plan.moves == [Move(sid, "dead", "a", False)]
    # a live copy of as many turns as the checkpoint wins
    plan = plan_moves({sid: [Copy("dead", 2, 30, False), Copy("b", 2, 30, True)]}, ring)
    assert plan.moves == [Move(sid, "b", "a", True)]


def test_turns_decide_never_length() -> None:
    """Defect 3: equal turns on the owner and a stand-in is a tie only while a turn is in
    flight; the stand-in's copy is settled under the session's lock (``live``), and a copy
    with more turns wins even when it is shorter."""
    ring = HashRing(["a", "b", "c"])
    sid = next(f"s{i}" for i in range(100) if ring.lookup(f"s{i}") == "a")
    tie = plan_moves({sid: [Copy("a", 2, 40, True), Copy("b", 2, 40, True)]}, ring)
    assert tie.moves == [Move(sid, "a", "a", True)]  # not left for the stale drop
    newer = plan_moves({sid: [Copy("a", 2, 60, True), Copy("b", 3, 50, True)]}, ring)
    assert newer.moves == [Move(sid, "b", "a", True)]
    assert authoritative([Copy("a", 2, 60, True), Copy("b", 3, 50, True)], "a").node == "b"


def test_replicas_are_copies_like_sessions() -> None:
    """Defect 2: a replica that is a session's only copy moves to its owner; an owner that
    holds only a replica promotes it; a replica beside an equal session changes nothing."""
    ring = HashRing(["a", "b", "c"])
    sid = next(f"s{i}" for i in range(100) if ring.lookup(f"s{i}") == "a")
    plan = plan_moves({sid: [Copy("b", 1, 20, True, replica=True)]}, ring)
    assert plan.moves == [Move(sid, "b", "a", False)]
    plan = plan_moves({sid: [Copy("a", 1, 20, True, replica=True)]}, ring)
    assert plan.moves == [Move(sid, "a", "a", False)]
    plan = plan_moves({sid: [Copy("a", 1, 20, True), Copy("b", 1, 20, True, replica=True)]},
                      ring)
    assert plan.moves == []


def test_adding_a_node_moves_about_its_share() -> None:
    old = HashRing([f"n{i}" for i in range(4)])
    new = old.with_node("n4")
    copies = {f"s{i}": [Copy(old.lookup(f"s{i}"), 1, 20, True)] for i in range(20_000)}
    plan = plan_moves(copies, new)
    print(f"\nadding a 5th node moves {plan.moved_fraction:.1%} of 20000 sessions (ideal 20%)")
    assert 0.15 <= plan.moved_fraction <= 0.25
    assert {m.target for m in plan.moves} == {"n4"}


def test_merge_prefers_more_turns_and_keeps_kv_only_when_it_matches() -> None:
    kv = torch.zeros(2, 2, 16, 1, 4)
    ckpt = SessionState("s", list(range(20)), 1, "fp", kv_tokens=16, kv=kv)
    longer = list(range(20)) + [7, 8, 9]
    merged = merge_with_history("s", ckpt, longer, 2, "fp")
    assert merged.token_ids == longer and merged.turns == 2 and merged.kv_tokens == 16
    assert merge_with_history("s", ckpt, list(range(10)), 0, "fp").token_ids == list(range(20))
    diverged = merge_with_history("s", ckpt, [99] * 25, 2, "fp")
    assert diverged.token_ids == [99] * 25 and diverged.kv is None and diverged.kv_tokens == 0
    # more turns win over a longer history; the KV stays while it covers a shared prefix
    newer = SessionState("s", list(range(16)) + [5], 3, "fp", kv_tokens=16, kv=kv)
    assert merge_with_history("s", newer, list(range(30)), 2, "fp") is newer
    rewritten = merge_with_history("s", ckpt, list(range(16)) + [1, 2], 2, "fp")
    assert rewritten.kv_tokens == 16 and rewritten.token_ids == list(range(16)) + [1, 2]
    none = merge_with_history("s", None, [1, 2, 3], 1, "fp")
    assert (none.session_id, none.token_ids, none.kv) == ("s", [1, 2, 3], None)


def test_a_delete_a_member_did_not_answer_is_not_reported_done() -> None:
    """A delete while the session's owner was down answered success from the members that
    answered, and the session came back a second later from the owner's replica."""
    import grpc
    from ultrakv.cluster.errors import SessionNotFoundError
    from ultrakv.cluster.validation import RequestRejected

    delete_outcome("s", ["deleted", "absent", "left"])  # every copy reached: done
    with pytest.raises(RequestRejected) as silent:
        delete_outcome("s", ["deleted", "node-2"])
    assert silent.value.code == grpc.StatusCode.UNAVAILABLE and silent.value.field == "session_id"
    assert "node-2 did not answer" in silent.value.message and silent.value.retry_after_s > 0
    with pytest.raises(SessionNotFoundError):
        delete_outcome("s", ["absent", "absent"])


def test_resumed_request_continues_from_the_token_ids_already_sent() -> None:
    """Defect 4: both prompt kinds resume from the ids the client received, never from
    decoded text (a byte-level tokenizer's id 300 or byte 0xff do not survive decoding)."""
    ids = pb.GenerateRequest(request_id="r", token_ids=pb.TokenIds(ids=[1, 2]),
                             sampling=pb.SamplingOptions(max_length=10))
    out = resumed_request(ids, [5, 6, 7])
    assert list(out.token_ids.ids) == [1, 2] and list(out.resume_token_ids) == [5, 6, 7]
    assert out.sampling.max_length == 7
    text = pb.GenerateRequest(request_id="r", text="Hi", sampling=pb.SamplingOptions(max_length=4))
    out = resumed_request(text, [300, 255])
    assert out.text == "Hi" and list(out.resume_token_ids) == [300, 255]
    assert out.sampling.max_length == 2
    assert resumed_request(text, []) == text
    forged = pb.GenerateRequest(request_id="r", text="Hi", resume_token_ids=[9])
    assert list(resumed_request(forged, []).resume_token_ids) == []  # the coordinator's alone


async def test_gate_orders_turns_and_moves() -> None:
    gate = SessionGate()
    events: list[str] = []

    async def turn(name: str, hold: float) -> None:
        async with gate.turn("s"):
            events.append(f"{name} start")
            await asyncio.sleep(hold)
            events.append(f"{name} end")

    async def live_move() -> None:
        async with gate.lock("s"):
            events.append("move")
        gate.done("s")

    first = asyncio.create_task(turn("t1", 0.05))
    await asyncio.sleep(0.01)
    gate.mark_pending([("s", True)])  # planned while t1 runs
    second = asyncio.create_task(turn("t2", 0.0))
    await asyncio.sleep(0.01)
    mover = asyncio.create_task(live_move())
    await asyncio.wait_for(asyncio.gather(first, second, mover), 2)
    assert events == ["t1 start", "t1 end", "move", "t2 start", "t2 end"]


async def test_the_gate_forgets_a_session_once_no_turn_or_move_holds_it() -> None:
    """A soak leak: the gate kept one lock per session ever served (a coordinator's memory
    grew with every new session). A lock lives while a task holds or awaits it."""
    gate = SessionGate()
    for i in range(50):
        async with gate.turn(f"s{i}"):
            assert gate.sessions == 1
    async with gate.lock("m"):
        assert gate.sessions == 1
    holder_in = asyncio.Event()

    async def holder() -> None:
        async with gate.turn("busy"):
            holder_in.set()
            await asyncio.sleep(3600)

    held = asyncio.create_task(holder())
    await holder_in.wait()
    waiter = asyncio.create_task(gate.turn("busy").__aenter__())
    await asyncio.sleep(0.01)
    for task in (waiter, held):  # a client gone while waiting or running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert gate.sessions == 0


@pytest.mark.parametrize("live", [True, False])
async def test_a_retrying_turn_waits_only_for_restores(live: bool) -> None:
    gate = SessionGate()
    gate.mark_pending([("s", live)])
    waiter = asyncio.create_task(gate.settled("s", live=False))
    await asyncio.sleep(0.01)
    assert waiter.done() is live  # a live move would wait for the lock the turn holds
    gate.done("s")
    await asyncio.wait_for(waiter, 1)


async def test_an_attempt_gives_up_at_its_deadlines_or_when_abandoned() -> None:
    """Defect 5: a forward's read waits at most its deadline (first token, then stall), and
    ``abandon`` (its node marked down, as often as that is said) ends it at once."""
    from ultrakv.coordinator.server import _Attempt, _NodeGone

    async def silent():
        await asyncio.Event().wait()
        yield None

    attempt = _Attempt()
    with pytest.raises(_NodeGone, match="sent nothing for 0.05 s"):
        await attempt.read(silent(), 0.05, "n1")
    attempt = _Attempt()
    reading = asyncio.create_task(attempt.read(silent(), 60.0, "n1"))
    await asyncio.sleep(0.01)
    attempt.abandon()
    await asyncio.sleep(0)  # the first has fired, the read has not ended yet
    attempt.abandon()  # a second node-down report while the first is taking effect
    with pytest.raises(_NodeGone, match="marked down"):
        await asyncio.wait_for(reading, 5)
    with pytest.raises(_NodeGone, match="marked down"):  # and any later read
        await attempt.read(silent(), 60.0, "n1")


async def test_an_attempt_arms_one_timer_for_many_reads(monkeypatch) -> None:
    """A relayed message is the coordinator's hottest path: reading 1000 of them must not
    cost a timer each (asyncio.timeout per read did), and the deadline still holds after."""
    from ultrakv.coordinator.server import _Attempt, _NodeGone

    async def messages(n: int):
        for i in range(n):
            yield i
        await asyncio.Event().wait()

    loop = asyncio.get_running_loop()
    armed = []
    call_at = loop.call_at
    monkeypatch.setattr(loop, "call_at", lambda when, *args: armed.append(when) or call_at(when, *args))
    attempt, stream = _Attempt(), messages(1000)
    assert [await attempt.read(stream, 60.0 if i == 0 else 30.0, "n1") for i in range(1000)] == list(range(1000))
    assert len(armed) <= 2  # the first deadline, then the shorter one between messages
    with pytest.raises(_NodeGone, match="sent nothing for 0.05 s"):
        await attempt.read(stream, 0.05, "n1")
    attempt.close()


async def test_get_session_while_its_owner_does_not_answer_is_unavailable() -> None:
    """During a failover GetSession re-raised the node's error from the servicer, and the
    client got UNKNOWN with gRPC's internal text (and did not retry): now UNAVAILABLE."""
    import grpc
    from ultrakv.cluster.etcd_server import free_port
    from ultrakv.cluster.membership import NodeRecord
    from ultrakv.cluster.ring import HashRing
    from ultrakv.cluster.validation import RequestRejected
    from ultrakv.coordinator.server import ClusterBackend, CoordinatorSettings

    backend = ClusterBackend(CoordinatorSettings(etcd="127.0.0.1:1"))
    backend.ring = HashRing(["n1"])
    backend.members = {"n1": NodeRecord("n1", f"127.0.0.1:{free_port()}", 1)}  # nothing listens
    try:
        with pytest.raises(RequestRejected) as err:
            await backend.get_session("s", "acme")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "n1 did not answer" in err.value.message
    finally:
        await backend.peers.close()
