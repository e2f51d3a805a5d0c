"""Replication of session histories to the ring successors, before a turn is acknowledged.

The node server awaits :meth:`Replicator.on_turn_complete` after a session turn completes
and before the turn's final message goes out (``LocalBackend.on_turn_complete``). It pushes
the session's full history (and chat messages) to the next ``replicas`` distinct nodes
clockwise on the ring with ``ReplicateHistory``, at once. The first of them inherits the
session when this node dies (consistent hashing hands a dead node's keys to its successor),
the second when that one dies too, and so on: no completed turn is lost unless the owner and
all ``replicas`` successors die together.

A successor that cannot be reached (connection refused, or gone from membership) is
replaced by the next node clockwise. One that is slow (a call times out while it is still a
member: alive, its lease kept) is asked again for up to ``patience_s`` before a stand-in
takes its place: the first successor is the node that takes the session over if this one is
marked down, so a copy that skipped it for a stand-in would leave the new owner without the
turn, and its refusal (below) unheard. If no copy can be stored the turn is still served
(the cluster must keep serving while a neighbour is down) and the failure is counted, and
logged at most once per ``LOG_EVERY_S`` (a last survivor fails every turn it serves: one
line per turn would bury everything else in the log).

A successor that refuses the copy because it serves the session itself (a coordinator took
this node off the ring, say while it was too slow to answer health checks, and handed the
session to it) fences this node off the session: the turn is not acknowledged
(``SessionSupersededError``), so two copies never both accept turns. Each push carries the
turn's record (node/turn_ledger.py): a retry of the turn reaching the successor after this
node died is answered from it rather than taken a second time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
from ultrakv.cluster.errors import SessionNotFoundError, SessionSupersededError
from ultrakv.cluster.peers import PeerChannels
from ultrakv.cluster.ring import DEFAULT_REPLICAS, HashRing, replica_targets, validate_replicas
from ultrakv.node.outputs import RequestOutput
from ultrakv.node.turn_ledger import TurnRecord
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import types_pb2 as pb

log = logging.getLogger("ultrakv.node.replication")

LOG_EVERY_S = 10.0


class ThrottledLog:
    """One kind of log line, written at most once per ``interval_s``; a line written after a
    quiet spell says how many like it were held back."""

    def __init__(self, level: int, interval_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.level = level
        self.interval_s = interval_s
        self.clock = clock
        self._next = float("-inf")
        self._held = 0

    def __call__(self, message: str, *args: object) -> None:
        now = self.clock()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            message += f" (and {self._held} more in the last {self.interval_s:g} s)"
        log.log(self.level, message, *args)
        self._next = now + self.interval_s
        self._held = 0


@dataclass
class ReplicationStats:
    """Counters for the node's stats and tests."""

    replicated: int = 0
    failed: int = 0
    superseded: int = 0  # turns not acknowledged: a successor serves the session now


class Replicator:
    """Pushes each completed turn's history to the session's ring successor.

    ``ring`` and ``addresses`` are callables so the replicator always sees the agent's
    latest membership view.
    """

    def __init__(self, engine, node_id: str, ring: Callable[[], HashRing],
                 addresses: Callable[[], Mapping[str, str]], peers: PeerChannels,
                 timeout_s: float = 2.0, max_attempts: int = 2,
                 replicas: int = DEFAULT_REPLICAS, patience_s: float = 10.0) -> None:
        """``max_attempts``: nodes asked per copy at most (a failed successor's stand-ins
        count against it); ``patience_s``: how long a slow successor is asked again."""
        self.engine = engine
        self.node_id = node_id
        self.ring = ring
        self.addresses = addresses
        self.peers = peers
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.patience_s = patience_s
        self.replicas = validate_replicas(replicas)
        self.stats = ReplicationStats()
        self._target_failed = ThrottledLog(logging.WARNING)
        self._not_replicated = ThrottledLog(logging.ERROR)
        self._superseded = ThrottledLog(logging.WARNING)

    async def on_turn_complete(self, output: RequestOutput, record: TurnRecord | None = None) -> None:
        """Replicate the session of a completed turn (with ``record``, the turn's own record);
        raises only ``SessionSupersededError``, when a successor serves the session itself."""
        sid = output.session_id
        if not sid:
            return
        try:
            session = await asyncio.to_thread(self.engine.sessions.get, sid)
        except SessionNotFoundError:
            return  # deleted while its turn ran: nothing to keep
        # The tenant salts the session's block hashes: without it the promoted replica would
        # hash under another salt and miss (or share) the blocks this tenant computed.
        request = npb.ReplicateHistoryRequest(
            session_id=sid, token_ids=output.prompt_token_ids + output.token_ids,
            turns=session.turns, tenant=session.salt,
            messages=[pb.ChatMessage(role=m.role, content=m.content) for m in session.messages])
        if record is not None:
            request.last_result.CopyFrom(record.result)
            request.last_digest = record.key[2]
        addresses = self.addresses()
        targets = [n for n in replica_targets(self.ring(), sid, self.node_id) if n in addresses]
        want = min(self.replicas, len(targets))
        spare = targets[:want + self.max_attempts - 1]
        wave, spare = spare[:want], spare[want:]
        held = 0
        refused: list[str] = []
        patience_ends = time.monotonic() + self.patience_s

        async def push(node: str) -> bool | None:
            """True: stored; False: unreachable or refused; None: slow (timed out)."""
            try:
                await self.peers.stub(addresses[node]).ReplicateHistory(
                    request, timeout=self.timeout_s)
                return True
            except grpc.aio.AioRpcError as exc:
                if (exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                        and dict(exc.trailing_metadata() or ()).get("ultrakv-field") == "turns"):
                    refused.append(f"{node}: {exc.details()}")
                    return False
                self._target_failed("replicating session %s to %s failed: %s", sid, node,
                                    exc.code().name)
                return None if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else False

        while wave:  # the copies at once; a failed successor's place goes to the next node
            outcomes = await asyncio.gather(*(push(n) for n in wave))
            if refused:
                self.stats.superseded += 1
                self._superseded("session %s: turn %d not acknowledged, %s serves the session "
                                 "now", sid, session.turns, refused[0].split(":")[0])
                raise SessionSupersededError(sid, refused[0])
            held += outcomes.count(True)
            members = self.addresses()
            slow = [n for n, ok in zip(wave, outcomes, strict=True) if ok is None and n in members]
            if time.monotonic() >= patience_ends:
                slow = []
            wave, spare = slow + spare[:want - held - len(slow)], spare[want - held - len(slow):]
        if held >= want > 0:
            self.stats.replicated += 1
        elif targets:
            self.stats.failed += 1
            self._not_replicated("session %s: turn %d replicated to %d of %d successors",
                                 sid, session.turns, held, want)
