"""Replication of session histories to the ring successors, before a turn is acknowledged.

The node server awaits :meth:`Replicator.on_turn_complete` after a session turn completes
and before the turn's final message goes out (``LocalBackend.on_turn_complete``). It pushes
the session's full history (and chat messages) to the next ``replicas`` distinct nodes
clockwise on the ring with ``ReplicateHistory``, at once. The first of them inherits the
session when this node dies (consistent hashing hands a dead node's keys to its successor),
the second when that one dies too, and so on: no completed turn is lost unless the owner and
all ``replicas`` successors die together.

A successor that does not answer is replaced by the next node clockwise; if none answers the
turn is still served (the cluster must keep serving while a neighbour is down) and the
failure is counted, and logged at most once per ``LOG_EVERY_S`` (a last survivor fails every
turn it serves: one line per turn would bury everything else in the log).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
from ultrakv.cluster.errors import SessionNotFoundError
from ultrakv.cluster.peers import PeerChannels
from ultrakv.cluster.ring import DEFAULT_REPLICAS, HashRing, replica_targets, validate_replicas
from ultrakv.node.outputs import RequestOutput
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


class Replicator:
    """Pushes each completed turn's history to the session's ring successor.

    ``ring`` and ``addresses`` are callables so the replicator always sees the agent's
    latest membership view.
    """

    def __init__(self, engine, node_id: str, ring: Callable[[], HashRing],
                 addresses: Callable[[], Mapping[str, str]], peers: PeerChannels,
                 timeout_s: float = 2.0, max_attempts: int = 2,
                 replicas: int = DEFAULT_REPLICAS) -> None:
        """``max_attempts``: nodes asked per copy at most (a failed successor's stand-ins
        count against it)."""
        self.engine = engine
        self.node_id = node_id
        self.ring = ring
        self.addresses = addresses
        self.peers = peers
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.replicas = validate_replicas(replicas)
        self.stats = ReplicationStats()
        self._target_failed = ThrottledLog(logging.WARNING)
        self._not_replicated = ThrottledLog(logging.ERROR)

    async def on_turn_complete(self, output: RequestOutput) -> None:
        """Replicate the session of a completed turn; never raises."""
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
        addresses = self.addresses()
        targets = [n for n in replica_targets(self.ring(), sid, self.node_id) if n in addresses]
        want = min(self.replicas, len(targets))
        spare = targets[:want + self.max_attempts - 1]
        wave, spare = spare[:want], spare[want:]
        held = 0

        async def push(node: str) -> bool:
            try:
                await self.peers.stub(addresses[node]).ReplicateHistory(
                    request, timeout=self.timeout_s)
                return True
            except grpc.aio.AioRpcError as exc:
                self._target_failed("replicating session %s to %s failed: %s", sid, node,
                                    exc.code().name)
                return False

        while wave:  # the copies at once; a failed successor's place goes to the next node
            held += sum(await asyncio.gather(*(push(n) for n in wave)))
            wave, spare = spare[:want - held], spare[want - held:]
        if held >= want > 0:
            self.stats.replicated += 1
        elif targets:
            self.stats.failed += 1
            self._not_replicated("session %s: turn %d replicated to %d of %d successors",
                                 sid, session.turns, held, want)
