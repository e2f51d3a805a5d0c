"""Each session's last turn by request id, so a retried turn is answered, not applied twice.

A client whose coordinator dies mid-turn retries through another coordinator with the same
request. The node may have finished the first attempt (the turn is in the session's history)
before it noticed the caller was gone; running the retry would append the turn a second
time. So a session turn that completes is recorded here under its key (session, request id
and a digest of the prompt and sampling), and a request with the same key is answered from
the record; one that arrives while the first attempt still runs waits for it. A request
with a different key (a new turn, or a resumed one with a longer prompt) runs as usual.
Pure bookkeeping on the node's event loop, no I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Collection

from ultrakv.v1 import types_pb2 as pb

TurnKey = tuple[str, str, bytes]


def turn_key(request: pb.GenerateRequest) -> TurnKey | None:
    """The key of a session turn with a request id; None for requests never deduplicated."""
    if not request.session_id or not request.request_id:
        return None
    which = request.WhichOneof("prompt") or ""
    prompt = getattr(request, which) if which else ""
    digest = hashlib.sha256(which.encode() + b"\0")
    digest.update(prompt.encode() if isinstance(prompt, str)
                  else prompt.SerializeToString(deterministic=True))
    digest.update(b"\0" + request.sampling.SerializeToString(deterministic=True))
    return request.session_id, request.request_id, digest.digest()


class TurnLedger:
    """The last completed turn of up to ``capacity`` sessions, and the turns running now."""

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._done: OrderedDict[str, tuple[TurnKey, pb.GenerateResult]] = OrderedDict()
        self._running: dict[TurnKey, asyncio.Future[pb.GenerateResult | None]] = {}

    async def replay(self, key: TurnKey) -> pb.GenerateResult | None:
        """The recorded result of the turn ``key`` (after waiting for a running attempt of
        it), or None when it must run."""
        running = self._running.get(key)
        if running is not None:
            await asyncio.shield(running)
        done = self._done.get(key[0])
        return done[1] if done is not None and done[0] == key else None

    def begin(self, key: TurnKey) -> None:
        self._running[key] = asyncio.get_running_loop().create_future()

    def end(self, key: TurnKey, result: pb.GenerateResult | None) -> None:
        """The attempt finished: ``result`` when its turn is in the session's history, None
        when it was aborted or failed (a retry then runs)."""
        if result is not None:
            self._done[key[0]] = (key, result)
            self._done.move_to_end(key[0])
            while len(self._done) > self.capacity:
                self._done.popitem(last=False)
        future = self._running.pop(key, None)
        if future is not None and not future.done():
            future.set_result(result)

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
