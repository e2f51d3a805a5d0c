"""A session move stuck on a stalled node must not hold the session's requests.

A request waits for its session's move (``SessionGate``), and a move's calls have 30 s
timeouts. Under heavy load a request stalled about 60 s. These tests stage the stall exactly,
with SIGSTOP: the node is a gRPC server process that answered its caller once and was then
stopped (its connection stays up, nothing replies). The coordinator is a real
``ClusterBackend`` (never started: no etcd, no health loop) with the real resharder.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from ultrakv.cluster.membership import NodeRecord, NodeState
from ultrakv.cluster.ring import HashRing
from ultrakv.cluster.validation import RequestRejected
from ultrakv.coordinator.resharding import Copy, Move
from ultrakv.coordinator.server import ClusterBackend, CoordinatorSettings, SessionGate
from ultrakv.v1 import types_pb2 as pb

# The old code's waits: a move's GetSession (5 s) and then PromoteReplica (30 s) to the stalled
# node; every bound below is far under that and far over what the fixed code needs.
BOUND_S = 15.0


# A gRPC server (no services: every call is UNIMPLEMENTED while it runs), in a process of
# its own so that it can be stopped.
_SERVER = """
import sys
from concurrent import futures
import grpc
server = grpc.server(futures.ThreadPoolExecutor(2))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


class StoppedNode:
    """A node process that served its callers, then was SIGSTOPped: the connection stays up,
    the kernel takes every call's bytes, and nothing answers."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE,
                                     text=True)
        self.port = int(self.proc.stdout.readline())
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def unread_bytes(self) -> int:
        """Bytes callers sent it that it has not read (its connections' receive queues)."""
        total = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, queues = fields[1], fields[3], fields[4]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == self.port:
                    total += int(queues.split(":")[1], 16)
        return total

    async def called(self, timeout_s: float = 30.0) -> None:
        """Wait until a call reached it (its bytes wait unread)."""
        async with asyncio.timeout(timeout_s):
            while not self.unread_bytes():
                await asyncio.sleep(0.01)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture
async def stopped_node() -> AsyncIterator[StoppedNode]:
    node = await asyncio.to_thread(StoppedNode)
    yield node
    node.close()


@pytest.fixture
async def backend(stopped_node: StoppedNode) -> AsyncIterator[ClusterBackend]:
    settings = CoordinatorSettings(etcd="127.0.0.1:1", first_token_timeout_s=1.0)
    backend = ClusterBackend(settings)  # never started: no etcd, no health loop
    backend.members = {"n1": NodeRecord("n1", stopped_node.address, 1, state=NodeState.SERVING)}
    backend.ring = HashRing(["n1"])
    with pytest.raises(grpc.aio.AioRpcError):  # connected: it answered (UNIMPLEMENTED)
        await backend.peers.stub(stopped_node.address).GetSession(
            pb.GetSessionRequest(session_id="warm-up"), timeout=30)
    stopped_node.stop()
    yield backend
    await backend.stop()


def _restore(session_id: str) -> Move:
    """Restore ``session_id`` on n1 from the replica n1 holds (n1's calls never answer)."""
    return Move(session_id, "n1", "n1", live=False, copies=(Copy("n1", 1, 20, True, True),))


def _request(session_id: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id="r1", session_id=session_id,
                              token_ids=pb.TokenIds(ids=[1, 2, 3]),
                              sampling=pb.SamplingOptions(max_length=4))


async def test_a_move_gives_up_when_a_node_it_involves_is_marked_down(
        backend, stopped_node) -> None:
    """The move waited out each call's timeout on the stalled node (5 s, then 30 s) while the
    session's turns waited for it; marking the node down now ends it at once."""
    backend.gate.mark_pending([("s", False)])
    move = asyncio.create_task(backend._run_move(_restore("s"), HashRing(["n1"], epoch=1)))
    await stopped_node.called()  # the move's first call waits on it
    async with asyncio.timeout(BOUND_S):
        while not move.done():  # n1 marked down (by health, or by a failed forward to it)
            backend._abandon("n1")
            await asyncio.sleep(0.05)
    await move
    assert not backend.gate.pending("s")  # the ring moved on: the next plan decides
    assert backend.counters.moves[("restored", "failed")] == 1


async def test_a_request_waits_for_its_sessions_move_no_longer_than_its_first_token_deadline(
        backend) -> None:
    """A session whose move does not finish: its request waited for as long as the move
    took (with retries, minutes); now it is refused, retryable, at the first-token deadline
    (1 s here)."""
    backend.gate.mark_pending([("s", False)])
    backend._queued["s"] = (_restore("s"), backend.ring, 0)

    async def turn() -> list:
        return [e async for e in backend.generate(_request("s"), deadline=None)]

    with pytest.raises(RequestRejected) as err:
        await asyncio.wait_for(turn(), BOUND_S)
    assert err.value.code is grpc.StatusCode.UNAVAILABLE and err.value.retry_after_s > 0
    assert "still moving" in err.value.message
    assert backend.gate.pending("s")  # the move goes on without the request


async def test_a_request_that_stops_waiting_does_not_cut_its_sessions_move_short(
        backend, stopped_node) -> None:
    """The request ran its session's move itself: when its client went away mid-move, the
    move was cancelled and its session marked settled, half moved."""
    backend.gate.mark_pending([("s", False)])
    backend._queued["s"] = (_restore("s"), backend.ring, 0)
    backend.settings.first_token_timeout_s = 60.0

    async def turn() -> list:
        return [e async for e in backend.generate(_request("s"), deadline=None)]

    request = asyncio.create_task(turn())
    await stopped_node.called()  # the move's first call waits on it
    request.cancel()  # the client is gone
    with pytest.raises(asyncio.CancelledError):
        await request
    assert backend.gate.pending("s")  # the move still runs: later turns still wait for it


async def test_replicating_a_moved_session_to_a_stopped_successor_is_bounded(backend) -> None:
    """Best effort (the next turn replicates again), yet each stopped successor held the move,
    and with it the session's turns, for the whole call timeout (30 s)."""
    ring = HashRing(["n0", "n1"])  # n1, the stopped node, is n0's successor for every session
    await asyncio.wait_for(backend.resharder.replicate("s", [1, 2, 3], 1, "", "n0", ring),
                           BOUND_S)


async def test_a_retrying_turn_stops_waiting_for_a_restore_once_a_live_move_joins_it() -> None:
    """The 60 s stall seen under load (all nodes lost their leases at once, the ring changed
    ten times in ten seconds): a turn being retried holds its session's lock and waits for
    the session's restore; a newer ring then plans a live move of the same session, which
    waits for that lock, and the restore counts as settled only when every planned move is
    done. Each waited for the other until the request's deadline (60 s)."""
    gate = SessionGate()
    gate.mark_pending([("s", False)])  # a restore, planned when the owner died
    async with gate.lock("s"):  # held by the turn being retried
        waiting = asyncio.create_task(gate.settled("s", live=False))
        await asyncio.sleep(0)
        assert not waiting.done()
        gate.mark_pending([("s", True)])  # a newer ring: a live move, waiting for the lock
        await asyncio.wait_for(waiting, BOUND_S)
    assert gate.pending("s")


async def test_a_failed_move_that_a_turn_waits_for_is_retried_at_once(backend) -> None:
    """Retries went to the back of the mover's queue: behind a big plan whose moves wait on
    stalled nodes, the session's turn waited out its deadline."""
    gone = Move("s", "n9", "n9", live=False, copies=(Copy("n9", 1, 20, True, True),))  # left
    backend.gate.mark_pending([("s", False)])
    backend._queued["s"] = (gone, backend.ring, 0)
    async with backend.gate.lock("s"):  # a turn (being retried) holds the session
        backend._expedite("s", live=False)
        async with asyncio.timeout(BOUND_S):  # the mover is not running: only a retry counts
            while backend.counters.moves.get(("restored", "failed"), 0) < 2:
                await asyncio.sleep(0.05)
    assert backend._moves.empty()
