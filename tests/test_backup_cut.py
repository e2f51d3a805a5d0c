"""A node's cut registry (node/backup_cut.py): holding results, running out, imports noted,
limits; and the coordinator's check for sessions that slipped past every snapshot."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from ultrakv.cluster.errors import SessionNotFoundError
from ultrakv.cluster.validation import RequestRejected
from ultrakv.coordinator.session_backup import slipped_past
from ultrakv.node.backup_cut import MAX_CUTS, SNAPSHOT_IDLE_S, CutRegistry
from ultrakv.node.sessions import Session
from ultrakv.v1 import types_pb2 as pb


def _session(sid: str, turns: int) -> Session:
    return Session(sid, [1, 2, 3], "", turns, 0.0, 0.0)


async def _waits(registry: CutRegistry, within_s: float) -> bool:
    """Whether results_may_go is still waiting after ``within_s``."""
    try:
        await asyncio.wait_for(registry.results_may_go(), within_s)
    except TimeoutError:
        return True
    return False


def test_results_wait_until_every_cut_is_released():
    async def scenario():
        registry = CutRegistry()
        assert not await _waits(registry, 0.5)
        first = registry.begin("one", 30)
        first.snapshot = {"s": (_session("s", 2), False)}
        registry.begin("two", 30)
        assert await _waits(registry, 0.05)
        registry.imported("moved")
        _, intact = registry.release("one")
        assert intact and await _waits(registry, 0.05)  # "two" still holds
        cut, intact = registry.release("two")
        assert intact and cut.imported == {"moved"}
        assert not await _waits(registry, 5)
        registry.imported("later")  # nothing holds: not noted
        assert cut.imported == {"moved"}
        assert registry.session("one", "s").turns == 2
        with pytest.raises(SessionNotFoundError):
            registry.session("one", "absent")
        registry.end("one")
        with pytest.raises(RequestRejected) as gone:
            registry.session("one", "s")
        assert gone.value.code == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())


def test_a_hold_runs_out_by_itself_and_the_release_says_so():
    async def scenario():
        registry = CutRegistry()
        registry.begin("short", 0.2)
        assert await _waits(registry, 0.01)
        assert not await _waits(registry, 10)  # a coordinator that never releases
        cut, intact = registry.release("short")
        assert not intact and cut.released_at - cut.began_at == pytest.approx(0.2)

    asyncio.run(scenario())


def test_cut_requests_are_checked():
    async def scenario():
        registry = CutRegistry()
        for cut_id, hold_s, field in (("", 1, "cut_id"), ("x" * 129, 1, "cut_id"),
                                      ("a", 0, "hold_s"), ("a", 61, "hold_s")):
            with pytest.raises(RequestRejected) as bad:
                registry.begin(cut_id, hold_s)
            assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert bad.value.field == field and field in bad.value.message
        for i in range(MAX_CUTS):
            registry.begin(f"c{i}", 1)
        with pytest.raises(RequestRejected) as full:
            registry.begin("one-more", 1)
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(RequestRejected) as unknown:
            registry.release("nope")
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        registry.end("nope")  # ending an unknown cut is not an error
        for i in range(MAX_CUTS):
            registry.end(f"c{i}")
        assert not await _waits(registry, 5)

    asyncio.run(scenario())


def test_sessions_imported_during_the_cut_and_in_no_snapshot_slipped_past():
    listed = {"n1": [pb.SessionInfo(session_id="a")], "n2": [pb.SessionInfo(session_id="b")]}
    assert slipped_past(listed, {"a", "c"}) == {"c"}
    assert slipped_past(listed, set()) == set()


def test_an_abandoned_snapshot_goes_once_unread_for_the_idle_time():
    async def scenario():
        now = [0.0]
        registry = CutRegistry(clock=lambda: now[0])
        for i in range(MAX_CUTS):
            registry.begin(f"c{i}", 1)
            registry.release(f"c{i}")
        now[0] = SNAPSHOT_IDLE_S - 100
        with pytest.raises(SessionNotFoundError):
            registry.session("c0", "s")  # a read: c0 is in use
        now[0] = SNAPSHOT_IDLE_S + 1
        registry.begin("new", 1)  # room: c1..c3 were abandoned, c0 was read lately
        with pytest.raises(RequestRejected):
            registry.release("c1")
        registry.release("c0")
        registry.release("new")

    asyncio.run(scenario())
