"""Sessions: a conversation's token history, owned by the node that serves it.

A session keeps only its history; the KV of that history lives in the block pool as cached
full blocks, found again by their chained content hashes when the next turn arrives, and
evictable under memory pressure like any other cached block. Replicas are histories that a
ring predecessor pushed here so that a conversation survives its owner's death; a replica
becomes a session the first time a request for it arrives. Replicas are listed, exported,
checkpointed and deleted like sessions: re-sharding must see every copy. Pure logic, no I/O.

Sessions are held by their key (cluster/session_keys.py: the edge puts each tenant's ids
under keys of its own, so two tenants' equal ids never meet here). A session also belongs to
the tenant that opened it (its ``salt``): for any other tenant it does not exist (NOT_FOUND,
the same answer as for an unknown id, so ids leak nothing). A tenant
quota bounds the sessions and history tokens one tenant holds; at the store's cap the
session dropped belongs to the tenant holding the most, so a tenant that floods sessions
drops its own, never a smaller tenant's.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ultrakv.cluster.errors import (
    CapacityError,
    EngineError,
    SessionBusyError,
    SessionFencedError,
    SessionNotFoundError,
    TenantQuotaError,
)
from ultrakv.node.chat import ChatMessage


class SessionChangedError(EngineError):
    """A migration's cut-over found the session changed since it was copied: a turn is
    running, or ran, on it (gRPC ABORTED: the move is tried again)."""

    def __init__(self, session_id: str, copied: int, turns: int, busy: bool):
        now = "a turn is running on it" if busy else f"it has {turns} turns now"
        super().__init__(f"session_id {session_id!r} was copied with {copied} turns and {now}; "
                         "not released")


class TurnConflictError(EngineError):
    """A turn run on another node cannot be appended: the session is not at the turn version
    the turn was run from, or a turn is running on it (gRPC ABORTED)."""

    def __init__(self, session_id: str, expected: int, turns: int, busy: bool):
        now = "a turn is running on it" if busy else f"it has {turns} turns now"
        super().__init__(f"session_id {session_id!r} had {expected} turns when its turn ran on "
                         f"another node and {now}; the turn is not recorded")


class SessionOwnedError(EngineError):
    """A ring neighbour pushed a replica of a session this node serves itself, with no more
    turns than this copy (or while a turn runs on it): the sender's copy is stale, another
    node took the session over (gRPC FAILED_PRECONDITION on ``turns``: the sender does not
    acknowledge its turn)."""

    def __init__(self, session_id: str, turns: int, held: int, busy: bool):
        now = "a turn is running on it here" if busy else f"this node serves it with {held} turns"
        super().__init__(f"session_id {session_id!r}: a replica with {turns} turns was refused: "
                         f"{now}")


@dataclass
class Session:
    session_id: str
    token_ids: list[int]
    salt: str
    turns: int
    created_at: float
    last_used_at: float
    busy: bool = False
    # Chained hashes of leading full blocks of token_ids (possibly fewer than all of them),
    # so the next turn's prefix match need not rehash the whole history.
    block_hashes: list[int] = field(default_factory=list)
    # The chat conversation so far (with the model's replies) when the turns were chat
    # messages; a new turn renders it again to find the template's delta.
    messages: list[ChatMessage] = field(default_factory=list)


@dataclass(frozen=True)
class TenantQuota:
    """Per tenant on one node: sessions and history tokens held, at most (0 = no limit)."""

    max_sessions: int = 0
    max_tokens: int = 0


class SessionStore:
    """session id -> Session, plus replicas held for ring neighbours.

    Both are bounded: at most ``max_sessions`` sessions (a new or adopted one pushes out the
    least recently used idle one of the tenant holding the most), at most ``max_replicas``
    replicas holding ``max_replica_tokens`` tokens in all (a new one pushes out the least
    recently stored replica of the tenant holding the most replica tokens, the new one's
    tenant first when it holds as much with the new one counted: a tenant that floods the
    replicas drops its own, not a smaller tenant's, whose acknowledged turns those replicas
    keep when their owner dies). A replica is never refused for room: a refusal by every
    successor would fail its owner's turn.
    """

    def __init__(self, max_sessions: int, clock: Callable[[], float] = time.time,
                 max_replicas: int = 100_000, max_replica_tokens: int = 1 << 22,
                 quota: TenantQuota | None = None):
        self.max_sessions = max_sessions
        self.max_replicas = max_replicas
        self.max_replica_tokens = max_replica_tokens
        self.clock = clock
        self.quota = quota or TenantQuota()
        self._sessions: dict[str, Session] = {}
        self._replicas: dict[str, Session] = {}  # insertion order = least recently stored first
        self._replica_tokens = 0
        self.replicas_dropped = 0  # replicas pushed out by the caps (not replaced or promoted)
        # Per tenant (salt): its replicas, least recently stored first (id -> tokens), their
        # tokens, and a max-heap of (-tokens, tenant) with stale entries skipped on reading.
        self._replicas_of: dict[str, dict[str, int]] = {}
        self._tenant_replica_tokens: dict[str, int] = {}
        self._replica_heap: list[tuple[int, str]] = []
        # Copies held when this node lost its cluster lease -> until when they take no turn
        # (unless a coordinator settles them first): see ``fence``.
        self._fenced: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def num_replicas(self) -> int:
        return len(self._replicas)

    @property
    def replica_tokens(self) -> int:
        return self._replica_tokens

    def get(self, session_id: str, tenant: str | None = None) -> Session:
        """The session; with ``tenant``, only if that tenant owns it."""
        session = self._sessions.get(session_id)
        if session is None or (tenant is not None and session.salt != tenant):
            raise SessionNotFoundError(session_id)
        return session

    def newest(self, session_id: str, tenant: str | None = None) -> tuple[Session, bool] | None:
        """The newest copy of the session held here and whether it is a replica; with
        ``tenant``, another tenant's copy is not found.

        Turns decide, never lengths: a replica beats the session only with more turns (a
        copy left behind by an earlier ownership, while the owner since replicated newer
        turns here).
        """
        session = self._sessions.get(session_id)
        replica = self._replicas.get(session_id)
        copy = (replica, True) if replica is not None and (
            session is None or replica.turns > session.turns) else (
            (session, False) if session is not None else None)
        if copy is not None and tenant is not None and copy[0].salt != tenant:
            raise SessionNotFoundError(session_id)
        return copy

    def history(self, session_id: str, tenant: str = "") -> list[int]:
        """The history ``tenant``'s new turn continues: the newest copy's, else empty;
        another tenant's session is not found."""
        copy = self.newest(session_id, tenant)
        return copy[0].token_ids if copy is not None else []

    def conversation(self, session_id: str) -> list[ChatMessage]:
        """The chat messages of the newest copy a new turn continues; empty if none."""
        copy = self.newest(session_id)
        return list(copy[0].messages) if copy is not None else []

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def copies(self) -> list[tuple[Session, bool]]:
        """The newest copy of every session held here, sessions and replicas alike."""
        ids = self._sessions.keys() | self._replicas.keys()
        return [copy for sid in sorted(ids) if (copy := self.newest(sid)) is not None]

    def fence(self, until: float) -> list[str]:
        """This node lost its cluster lease: the cluster may have handed its sessions to
        other nodes meanwhile. Every session becomes a replica (an idle one now, a busy one
        when its turn fails) and takes no turn (:class:`SessionFencedError`) until a
        coordinator settles it (promotes, imports, deletes or releases it, or its owner
        pushes a newer replica) or ``until`` (a wall-clock bound, should no coordinator ever
        look at it) passes. Returns the fenced ids."""
        fenced = list(self._sessions)
        for sid in fenced:
            self.demote(sid)
            self._fenced[sid] = until
        return fenced

    def fenced(self, session_id: str) -> bool:
        """Whether the copy held here takes no turn now (see :meth:`fence`)."""
        until = self._fenced.get(session_id)
        if until is not None and self.clock() >= until:
            del self._fenced[session_id]
            return False
        return until is not None

    def settle(self, session_id: str) -> None:
        """A coordinator (or the owner's replica) decided the copy held here: lift its fence."""
        self._fenced.pop(session_id, None)

    def begin_turn(self, session_id: str, salt: str) -> Session:
        """The session tenant ``salt``'s new turn continues: the newest copy (promoted if a
        replica), or new (within the tenant's quota); :class:`SessionFencedError` while the
        copy here is fenced."""
        if self.fenced(session_id):
            raise SessionFencedError(session_id)
        newest = self.newest(session_id, salt)
        session = self._sessions.get(session_id)
        if newest is not None and newest[1] and (session is None or not session.busy):
            session = self.promote_replica(session_id)
        if session is not None and self.quota.max_tokens:
            self._check_quota(salt, new_session=False)
        if session is None:
            self._check_quota(salt, new_session=True)
            if len(self._sessions) >= self.max_sessions:
                self._drop_oldest_idle(salt)
            now = self.clock()
            session = Session(session_id, [], salt, 0, now, now)
            self._sessions[session_id] = session
        if session.busy:
            raise SessionBusyError(session_id)
        session.busy = True
        return session

    def end_turn(self, session_id: str, token_ids: list[int] | None, block_hashes: list[int] | None = None,
                 messages: list[ChatMessage] | None = None) -> None:
        """Record a completed turn's full history (and the chained hashes known for its leading
        full blocks, and the chat conversation when the turn was chat); None leaves the history
        as it was (abort)."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        session.busy = False
        session.last_used_at = self.clock()
        if token_ids is not None:
            session.token_ids = list(token_ids)
            session.block_hashes = list(block_hashes or [])
            session.messages = list(messages or [])
            session.turns += 1
        elif not session.token_ids:
            del self._sessions[session_id]

    def turn_version(self, session_id: str, salt: str) -> tuple[int, bool]:
        """The turns of the copy tenant ``salt``'s next turn continues (0 when none), and
        whether a turn runs on the session now."""
        newest = self.newest(session_id, salt)
        session = self._sessions.get(session_id)
        return (newest[0].turns if newest is not None else 0,
                session is not None and session.busy)

    def append_turn(self, session_id: str, salt: str, turns: int, token_ids: list[int],
                    block_hashes: list[int], messages: list[ChatMessage] | None = None) -> bool:
        """Append a turn that ran on another node: the session, at version ``turns`` with no
        turn running, now holds ``token_ids`` (its history, the turn's prompt and output) at
        version ``turns + 1``. The newest copy is the one continued (a replica is promoted, an
        absent session created), as for a turn run here. Returns False, changing nothing,
        when exactly this turn was appended already (a commit retried after its answer was
        lost); raises :class:`TurnConflictError` when the version differs or a turn runs."""
        newest = self.newest(session_id, salt)
        if newest is not None and newest[0].turns == turns + 1 and newest[0].token_ids == token_ids:
            return False
        have, busy = self.turn_version(session_id, salt)
        if busy or have != turns:
            raise TurnConflictError(session_id, turns, have, busy)
        self.begin_turn(session_id, salt)  # promotes or creates, within the quota
        self.end_turn(session_id, token_ids, block_hashes, messages)
        return True

    def put(self, session: Session) -> None:
        """Adopt a session (import, restore); it counts against ``max_sessions`` like a new one."""
        self._pop_replica(session.session_id)
        self.settle(session.session_id)
        if session.session_id not in self._sessions and len(self._sessions) >= self.max_sessions:
            if not self._drop_oldest_idle(session.salt):
                raise CapacityError("max_sessions", f"sessions must number at most "
                                                    f"{self.max_sessions}; every one is busy")
        self._sessions[session.session_id] = session

    def delete(self, session_id: str, tenant: str | None = None) -> Session:
        """Forget the session and any replica of it (a kept replica would bring it back);
        with ``tenant``, only if that tenant owns it."""
        if self.newest(session_id, tenant) is None:
            raise SessionNotFoundError(session_id)
        session = self._sessions.pop(session_id, None)
        replica = self._pop_replica(session_id)
        self.settle(session_id)
        return session or replica

    def release(self, session_id: str, turns: int) -> None:
        """Give the session up to the node it was copied to (a migration's cut-over): only
        while no turn runs on it and it has the ``turns`` of the copy (a turn that ran since
        the copy was taken must not be deleted with it); :class:`SessionChangedError`
        otherwise. Any replica here goes too; no copy at all is not an error."""
        session = self._sessions.get(session_id)
        if session is not None and (session.busy or session.turns != turns):
            raise SessionChangedError(session_id, turns, session.turns, session.busy)
        self._sessions.pop(session_id, None)
        self._pop_replica(session_id)
        self.settle(session_id)

    def cleanup(self, max_age_s: float) -> list[Session]:
        """Remove sessions (and replicas) idle for longer than ``max_age_s``."""
        cutoff = self.clock() - max_age_s
        removed = [s for s in self._sessions.values() if not s.busy and s.last_used_at < cutoff]
        for s in removed:
            del self._sessions[s.session_id]
        for sid in [sid for sid, r in self._replicas.items() if r.last_used_at < cutoff]:
            self._pop_replica(sid)
        return removed

    def store_replica(self, session_id: str, token_ids: list[int], turns: int, salt: str = "",
                      messages: list[ChatMessage] | None = None) -> None:
        """Hold (or replace) a replica (with its chat conversation, if any), dropping the least
        recently stored ones over the caps; :class:`SessionOwnedError` when this node serves
        the session itself with as many turns or more, or runs a turn on it."""
        session = self._sessions.get(session_id)
        if session is not None and (session.busy or session.turns >= turns):
            # Two nodes serving one session: the one served here was handed over to this node
            # (moved or restored by a coordinator), so it is the sender's that is stale.
            raise SessionOwnedError(session_id, turns, session.turns, session.busy)
        if len(token_ids) > self.max_replica_tokens:
            raise CapacityError("token_ids", f"a replica must hold at most {self.max_replica_tokens} "
                                             f"tokens (max_replica_tokens), got {len(token_ids)}")
        self._pop_replica(session_id)  # the copy it replaces counts out
        while self._replicas and (len(self._replicas) >= self.max_replicas
                                  or self._replica_tokens + len(token_ids) > self.max_replica_tokens):
            victim = self._replica_tenant_to_drop(salt, len(token_ids))
            self._pop_replica(next(iter(self._replicas_of[victim])))
            self.replicas_dropped += 1
        now = self.clock()
        self._add_replica(Session(session_id, list(token_ids), salt, turns, now, now,
                                  messages=list(messages or [])))
        self.settle(session_id)  # the owner's copy, pushed since

    def promote_replica(self, session_id: str) -> Session | None:
        self.settle(session_id)  # a coordinator's restore (a turn checks the fence first)
        replica = self._pop_replica(session_id)
        if replica is not None:
            if session_id not in self._sessions and len(self._sessions) >= self.max_sessions:
                self._drop_oldest_idle(replica.salt)
            self._sessions[session_id] = replica
        return replica

    def demote(self, session_id: str) -> bool:
        """Hold the idle session as a replica instead (its turn was not acknowledged): at equal
        turns a session elsewhere wins over it, and it still counts by its turns; the next
        turn here promotes it again. False when there is no idle session to demote."""
        session = self._sessions.get(session_id)
        if session is None or session.busy:
            return False
        del self._sessions[session_id]
        replica = self._pop_replica(session_id)
        kept = replica if replica is not None and replica.turns > session.turns else session
        self._add_replica(kept)
        return True

    def _add_replica(self, replica: Session) -> None:
        self._replicas[replica.session_id] = replica
        size = len(replica.token_ids)
        self._replica_tokens += size
        self._replicas_of.setdefault(replica.salt, {})[replica.session_id] = size
        self._set_tenant_replica_tokens(replica.salt, self._tenant_replica_tokens.get(replica.salt, 0) + size)

    def _pop_replica(self, session_id: str) -> Session | None:
        replica = self._replicas.pop(session_id, None)
        if replica is not None:
            size = len(replica.token_ids)
            self._replica_tokens -= size
            own = self._replicas_of[replica.salt]
            del own[session_id]
            if own:
                self._set_tenant_replica_tokens(replica.salt, self._tenant_replica_tokens[replica.salt] - size)
            else:
                del self._replicas_of[replica.salt], self._tenant_replica_tokens[replica.salt]
        return replica

    def _set_tenant_replica_tokens(self, tenant: str, tokens: int) -> None:
        self._tenant_replica_tokens[tenant] = tokens
        heapq.heappush(self._replica_heap, (-tokens, tenant))
        if len(self._replica_heap) > 4 * len(self._tenant_replica_tokens) + 64:  # drop stale entries
            self._replica_heap = [(-t, name) for name, t in self._tenant_replica_tokens.items()]
            heapq.heapify(self._replica_heap)

    def _largest_replica_tenant(self) -> tuple[str, int]:
        """The tenant holding the most replica tokens (the heap's stale entries skipped)."""
        while True:
            neg, tenant = self._replica_heap[0]
            if self._tenant_replica_tokens.get(tenant) == -neg:
                return tenant, -neg
            heapq.heappop(self._replica_heap)

    def _replica_tenant_to_drop(self, tenant: str, incoming: int) -> str:
        """Whose least recently stored replica a new one of ``tenant`` (``incoming`` tokens)
        pushes out: ``tenant``'s own while it holds some and would hold as much as the largest
        holder with the new one counted, else the largest holder's. So a tenant flooding the
        replicas drops its own, and takes from others at most room for its first one."""
        largest, held = self._largest_replica_tenant()
        own = self._tenant_replica_tokens.get(tenant, 0)
        return tenant if own and own + incoming >= held else largest

    def _check_quota(self, tenant: str, new_session: bool) -> None:
        quota = self.quota
        if not (quota.max_sessions or quota.max_tokens):
            return
        own = [s for s in self._sessions.values() if s.salt == tenant]
        if new_session and quota.max_sessions and len(own) >= quota.max_sessions:
            raise TenantQuotaError(f"tenant holds {len(own)} sessions on this node, its quota "
                                   f"(tenant_max_sessions) is {quota.max_sessions}; delete "
                                   "sessions or wait for them to expire", retry_after_s=1.0)
        tokens = sum(len(s.token_ids) for s in own)
        if quota.max_tokens and tokens >= quota.max_tokens:
            raise TenantQuotaError(f"tenant holds {tokens} history tokens on this node, its quota "
                                   f"(tenant_max_session_tokens) is {quota.max_tokens}; delete "
                                   "sessions or wait for them to expire", retry_after_s=1.0)

    def _drop_oldest_idle(self, tenant: str) -> bool:
        """Make room for ``tenant``'s new session: drop the least recently used idle session
        of the tenant holding the most (``tenant`` itself on a tie). False if none is idle."""
        counts: dict[str, int] = {}
        for s in self._sessions.values():
            counts[s.salt] = counts.get(s.salt, 0) + 1
        idle = [s for s in self._sessions.values() if not s.busy]
        if idle:
            victim = min(idle, key=lambda s: (-counts[s.salt], s.salt != tenant, s.last_used_at))
            del self._sessions[victim.session_id]
        return bool(idle)
