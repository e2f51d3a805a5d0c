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
turn, and its refusal (below) unheard.

No turn is acknowledged without a copy while another node is registered that could hold
one. When every target failed, the push is tried again, round after round, until a copy is
stored or ``patience_s`` has passed: a successor restarted a moment ago is registered (its
server binds before it registers) while this node's channel to it still waits out its
reconnect backoff from the refused connections of its downtime, and fails each call at once
(UNAVAILABLE, "failed to connect ... Connection refused"); rounds after the first wait for the
channel to connect. A dead successor leaves membership when its lease expires, and the next
round asks the node after it; a node whose every peer is gone from membership is the last
survivor, and acknowledges its turns with no copy (the cluster must keep serving; the turn
counts as ``unreplicated``). When the patience runs out with no copy at all,
:class:`TurnNotDurableError` (gRPC UNAVAILABLE on ``session_id``) fails the turn: it is not
acknowledged. The turn stays in this node's history with its record (node/turn_ledger.py),
so a retry with the same request id is answered from the record, once a copy is stored,
instead of running twice. A turn acknowledged with fewer copies than wanted counts as
``under_replicated``; failures are logged at most once per ``LOG_EVERY_S`` (a last survivor
fails every turn it serves: one line per turn would bury everything else in the log).

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
from ultrakv.cluster.session_state import SessionState
from ultrakv.cluster.validation import RequestRejected
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


# Between rounds of a push that stored no copy: long enough not to spin on a refused port.
RETRY_PAUSE_S = 0.2


class TurnNotDurableError(RequestRejected):
    """No node stored a copy of a completed turn within the replication patience, while
    other nodes are registered: the turn is not acknowledged (gRPC UNAVAILABLE; a retry with
    the same request id is answered from the turn's record once a copy is stored)."""

    def __init__(self, session_id: str, turns: int, patience_s: float, tried: list[str]) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE, "session_id",
            f"session_id {session_id!r}: turn {turns} was not acknowledged: no other node "
            f"stored a copy of it within {patience_s:g} s (asked {', '.join(tried) or 'none'}); "
            "send it again with the same request_id", retry_after_s=1.0)
        self.session_id = session_id


@dataclass
class ReplicationStats:
    """Counters of completed session turns, for the node's stats and tests."""

    replicated: int = 0  # acknowledged with every copy wanted
    under_replicated: int = 0  # acknowledged with at least one copy, fewer than wanted
    unreplicated: int = 0  # acknowledged with no copy: no other node is registered
    not_durable: int = 0  # not acknowledged: no copy within the patience (TurnNotDurableError)
    superseded: int = 0  # not acknowledged: a successor serves the session now


class Replicator:
    """Pushes each completed turn's history to the session's ring successors.

    ``ring`` and ``addresses`` are callables so the replicator always sees the agent's
    latest membership view.
    """

    def __init__(self, engine, node_id: str, ring: Callable[[], HashRing],
                 addresses: Callable[[], Mapping[str, str]], peers: PeerChannels,
                 timeout_s: float = 2.0, max_attempts: int = 2,
                 replicas: int = DEFAULT_REPLICAS, patience_s: float = 10.0) -> None:
        """``max_attempts``: nodes asked per copy at most in one round (a failed successor's
        stand-ins count against it); ``patience_s``: how long a slow successor is asked
        again, and how long a turn with no copy yet waits for one."""
        if not patience_s >= 0:
            raise ValueError(f"patience_s must be >= 0, got {patience_s}")
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
        """Replicate the session of a completed turn (with ``record``, the turn's own record).
        Raises ``SessionSupersededError`` when a successor serves the session itself, and
        ``TurnNotDurableError`` when no copy could be stored in time."""
        sid = output.session_id
        if not sid:
            return
        try:
            session = await asyncio.to_thread(self.engine.sessions.get, sid)
        except SessionNotFoundError:
            return  # deleted while its turn ran: nothing to keep
        await self.replicate(SessionState(
            sid, output.prompt_token_ids + output.token_ids, session.turns, "", tenant=session.salt,
            messages=[(m.role, m.content) for m in session.messages]), record)

    async def replicate(self, state: SessionState, record: TurnRecord | None = None) -> None:
        """Push a session's history (``state``: its ids, turns, tenant and messages; no KV)
        to its successors; raises as :meth:`on_turn_complete`."""
        sid = state.session_id
        # The tenant salts the session's block hashes: without it the promoted replica would
        # hash under another salt and miss (or share) the blocks this tenant computed.
        request = npb.ReplicateHistoryRequest(
            session_id=sid, token_ids=state.token_ids, turns=state.turns, tenant=state.tenant,
            messages=[pb.ChatMessage(role=role, content=content)
                      for role, content in state.messages])
        if record is not None:
            request.last_result.CopyFrom(record.result)
            request.last_digest = record.key[2]
        patience_ends = time.monotonic() + self.patience_s
        asked: list[str] = []
        ready = False  # the first round fails fast: a dead successor's stand-in is asked at once
        while True:
            held, want = await self._round(request, patience_ends, ready, asked)
            if held or not want:
                break
            if time.monotonic() >= patience_ends:
                self.stats.not_durable += 1
                self._not_replicated("session %s: turn %d not acknowledged: no copy on %s "
                                     "within %g s", sid, state.turns, ", ".join(asked),
                                     self.patience_s)
                raise TurnNotDurableError(sid, state.turns, self.patience_s, asked)
            await asyncio.sleep(RETRY_PAUSE_S)
            ready = True
        if held >= want > 0:
            self.stats.replicated += 1
            return
        if held:
            self.stats.under_replicated += 1
        else:
            self.stats.unreplicated += 1
        self._not_replicated("session %s: turn %d acknowledged with %d of %d copies%s", sid,
                             state.turns, held, self.replicas,
                             "" if held else " (no other node is registered)")

    async def _round(self, request: npb.ReplicateHistoryRequest, patience_ends: float,
                     ready: bool, asked: list[str]) -> tuple[int, int]:
        """One round of pushes under the current membership: (copies stored, copies wanted;
        0 wanted when no other node is registered). ``ready``: calls wait for a channel that
        is (re)connecting instead of failing at once."""
        sid = request.session_id
        addresses = self.addresses()
        targets = [n for n in replica_targets(self.ring(), sid, self.node_id) if n in addresses]
        want = min(self.replicas, len(targets))
        spare = targets[:want + self.max_attempts - 1]
        wave, spare = spare[:want], spare[want:]
        held = 0
        refused: list[str] = []

        async def push(node: str) -> bool | None:
            """True: stored; False: unreachable or refused; None: slow (timed out)."""
            if node not in asked:
                asked.append(node)
            timeout = self.timeout_s
            if ready:  # bounded by the patience left (a little more: the call must happen)
                timeout = min(timeout, max(0.5, patience_ends - time.monotonic()))
            try:
                await self.peers.stub(addresses[node]).ReplicateHistory(
                    request, timeout=timeout, wait_for_ready=ready)
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
                                 "now", sid, request.turns, refused[0].split(":")[0])
                raise SessionSupersededError(sid, refused[0])
            held += outcomes.count(True)
            members = self.addresses()
            slow = [n for n, ok in zip(wave, outcomes, strict=True) if ok is None and n in members]
            if time.monotonic() >= patience_ends:
                slow = []
            wave, spare = slow + spare[:want - held - len(slow)], spare[want - held - len(slow):]
        return held, want
