"""Each session's last turn by request id, so a retried turn is answered, not applied twice.

A client whose coordinator dies mid-turn retries through another coordinator with the same
request; a coordinator whose node stops answering mid-turn retries the request, or resumes
it from the tokens already streamed, on the session's next owner. The turn may have
completed all the same (it is in the history the node replicated) before anyone heard its
end; running the retry would append the turn a second time. So a session turn that
completes is recorded here under its key (session, request id and a digest of the tenant,
the prompt and sampling, the same for a resumed attempt as for the request it resumes) with
the session's turn count, as soon as the turn is in the history (before its copies are
pushed: a move may take the history while the push waits), and the record travels wherever
the history goes: to the ring successors with each push (a replica holder records it too),
and with the session when it moves or is restored (ExportSession and ImportSession: the
session's header carries it). A request with the same key, while the session still has
that turn count, is answered from the record (a resumed one with the tokens it had not
received yet); one that arrives while the first attempt still runs waits for it. A request
with a different key (a new turn) runs as usual. Pure bookkeeping on the node's event loop, no I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ultrakv.v1 import types_pb2 as pb

TurnKey = tuple[str, str, bytes]


def turn_key(request: pb.GenerateRequest) -> TurnKey | None:
    """The key of a session turn with a request id; None for requests never deduplicated.

    A resumed attempt (``resume_token_ids`` set by the coordinator, ``max_length`` lowered by
    as many) has the key of the request it resumes. The digest covers the tenant (length
    first, so no tenant name aliases another): another tenant's request never has the key of
    a turn, so it neither waits for that turn's attempt nor is answered from its record."""
    if not request.session_id or not request.request_id:
        return None
    which = request.WhichOneof("prompt") or ""
    prompt = getattr(request, which) if which else ""
    sampling = pb.SamplingOptions()
    sampling.CopyFrom(request.sampling)
    if request.resume_token_ids:
        sampling.max_length += len(request.resume_token_ids)
    tenant = request.tenant.encode()
    digest = hashlib.sha256(len(tenant).to_bytes(4, "big") + tenant + which.encode() + b"\0")
    digest.update(prompt.encode() if isinstance(prompt, str)
                  else prompt.SerializeToString(deterministic=True))
    digest.update(b"\0" + sampling.SerializeToString(deterministic=True))
    return request.session_id, request.request_id, digest.digest()


def answer_for(done: pb.GenerateResult, resume_token_ids: Sequence[int]) -> pb.GenerateResult | None:
    """The result a (possibly resumed) attempt of the recorded turn ``done`` gets: the tokens
    it has not been sent yet, the prompt counted as the attempt's (with the resumed ids).
    None when the resumed ids are not how the recorded turn began (another attempt's tokens:
    the record does not answer it)."""
    resumed = list(resume_token_ids)
    if not resumed:
        return done
    if list(done.token_ids[:len(resumed)]) != resumed or len(done.token_ids) <= len(resumed):
        return None
    out = pb.GenerateResult()
    out.CopyFrom(done)
    del out.token_ids[:len(resumed)]
    out.text = ""  # the caller decodes the remainder: the record's text is the whole turn's
    out.usage.prompt_tokens = done.usage.prompt_tokens + len(resumed)
    out.usage.completion_tokens = len(out.token_ids)
    return out


@dataclass(frozen=True)
class TurnRecord:
    """A completed turn: its key, its result, and the session's turn count right after it."""

    key: TurnKey
    result: pb.GenerateResult
    turns: int


class TurnLedger:
    """The last completed turn of up to ``capacity`` sessions, and the turns running now."""

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._done: OrderedDict[str, TurnRecord] = OrderedDict()
        self._running: dict[TurnKey, asyncio.Future[pb.GenerateResult | None]] = {}
        self._changed: dict[str, list[asyncio.Future[None]]] = {}  # last_turn's waiters

    async def replay(self, key: TurnKey) -> TurnRecord | None:
        """The record of the turn ``key`` (after waiting for a running attempt of it), or
        None when it must run. The caller checks the record's ``turns`` against the session:
        a record whose session moved on (or was replaced) answers nothing."""
        running = self._running.get(key)
        if running is not None:
            await asyncio.shield(running)
        done = self._done.get(key[0])
        return done if done is not None and done.key == key else None

    def begin(self, key: TurnKey) -> None:
        self._running[key] = asyncio.get_running_loop().create_future()

    def try_begin(self, key: TurnKey) -> bool:
        """:meth:`begin` unless an attempt of ``key`` runs already (then False)."""
        if key in self._running:
            return False
        self.begin(key)
        return True

    def end(self, key: TurnKey, result: pb.GenerateResult | None, turns: int = 0) -> None:
        """The attempt finished: ``result`` when its turn is in the session's history (the
        session then has ``turns`` turns), None when it was aborted or failed (a retry then
        runs)."""
        if result is not None:
            self.record(TurnRecord(key, result, turns))
        future = self._running.pop(key, None)
        if future is not None and not future.done():
            future.set_result(result)
        self._wake(key[0])

    def record(self, done: TurnRecord) -> None:
        """Keep ``done`` as its session's last turn (a turn taken here, or one replicated here
        with its history)."""
        sid = done.key[0]
        self._done[sid] = done
        self._done.move_to_end(sid)
        while len(self._done) > self.capacity:
            self._done.popitem(last=False)
        self._wake(sid)

    async def last_turn(self, session_id: str, turns: int, wait_s: float) -> TurnRecord | None:
        """The record of the turn that left the session with ``turns`` turns (what a copy of
        its history carries along), or None. A turn is in the history a moment before its
        record is here: while an attempt of a turn of the session runs, wait for its record
        (at most ``wait_s``)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + wait_s
        while True:
            done = self._done.get(session_id)
            if done is not None and done.turns == turns:
                return done
            left = until - loop.time()
            if turns < 1 or left <= 0 or not any(key[0] == session_id for key in self._running):
                return None
            changed = loop.create_future()
            waiters = self._changed.setdefault(session_id, [])
            waiters.append(changed)
            try:
                await asyncio.wait([changed], timeout=left)
            finally:
                if changed in waiters:  # timed out (a wake takes the whole list)
                    waiters.remove(changed)
                    if not waiters and self._changed.get(session_id) is waiters:
                        del self._changed[session_id]

    def _wake(self, session_id: str) -> None:
        for changed in self._changed.pop(session_id, []):
            if not changed.done():
                changed.set_result(None)

    def records(self) -> dict[str, TurnRecord]:
        """Every session's last turn's record, by session id (a copy: a checkpoint writes
        them in a thread)."""
        return dict(self._done)

    def retain(self, session_ids: Collection[str]) -> None:
        """Keep only the records of ``session_ids`` (the sessions this node still holds): a
        record outliving its session (expired, deleted) would only hold memory."""
        for sid in [sid for sid in self._done if sid not in session_ids]:
            del self._done[sid]

    def forget(self, session_id: str) -> None:
        """Drop the record of a session deleted here."""
        self._done.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._done)
