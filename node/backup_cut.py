"""A node's part in a backup's cut: one point in time for every session of the cluster.

A backup that reads sessions one after another while clients run turns gets each session
at another moment: a client that saw turn 5 of session A answered and then ran turn 9 of
session B can find B's turn 9 in the backup and A's turn 5 missing. The coordinator
(coordinator/session_backup.py) cuts instead, in two rounds over every node:

1. ``begin``: the node starts holding back the results of session turns that finish
   (their tokens may stream, but no client is told a turn is done), then snapshots its
   sessions. A session's history list is replaced, never changed in place, when a turn
   ends, so the snapshot shares the lists: no token is copied.
2. ``release``, once every node has begun: the held results go out.

A turn is recorded in its session's history before its result can go out. Between the
first node's hold and the last node's snapshot no result goes out anywhere, so a turn whose
result any client had received before a node's snapshot was received before every node
held: it was recorded before, and is in its node's snapshot. A turn still running at the
snapshot is out, one recorded before it is in (its result perhaps held back till the
release): a turn is in or out whole. The hold runs
out by itself after ``hold_s`` (a coordinator that died mid-cut must not stall the node);
``release`` says whether it lasted, and which sessions were imported meanwhile (a session
moving between two nodes can slip past both snapshots: the coordinator cuts again then).
Exports read the snapshot until ``end`` drops it, or until none has for ``SNAPSHOT_IDLE_S``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from ultrakv.cluster.errors import SessionNotFoundError
from ultrakv.cluster.validation import RequestRejected
from ultrakv.node.sessions import Session

MAX_HOLD_S = 60.0
MAX_CUTS = 4  # snapshots held at once (backups running at once), at most
# A snapshot not read for this long goes (its backup was abandoned without EndCut: a
# coordinator that died, a client that went away), so it neither pins old histories nor
# counts against MAX_CUTS for long.
SNAPSHOT_IDLE_S = 300.0


@dataclass
class Cut:
    """One cut on this node: its snapshot and its hold."""

    cut_id: str
    snapshot: dict[str, tuple[Session, bool]]  # session id -> (copy, replica)
    began_at: float
    hold_until: float
    used_at: float  # the last begin or read
    released_at: float | None = None
    imported: set[str] = field(default_factory=set)

    def holding(self, now: float) -> bool:
        return self.released_at is None and now < self.hold_until


class CutRegistry:
    """The cuts of one node. Used from the server's event loop only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._cuts: dict[str, Cut] = {}
        self._open = asyncio.Event()  # set while no cut holds results back
        self._open.set()
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, cut_id: str, hold_s: float) -> Cut:
        """Start holding results back; the caller then fills ``cut.snapshot`` (results
        recorded before the hold went into the histories first, so any that went out is in
        the snapshot however long taking it lasts)."""
        if not cut_id or len(cut_id) > 128:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "cut_id",
                                  f"cut_id must be 1 to 128 characters, got {len(cut_id)}")
        if not 0 < hold_s <= MAX_HOLD_S:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "hold_s",
                                  f"hold_s must be in (0, {MAX_HOLD_S:g}], got {hold_s:g}")
        now = self.clock()
        for old in [c for c in self._cuts.values() if now - c.used_at > SNAPSHOT_IDLE_S]:
            del self._cuts[old.cut_id]
        if cut_id in self._cuts:
            raise RequestRejected(grpc.StatusCode.ALREADY_EXISTS, "cut_id",
                                  f"cut {cut_id} was begun already")
        if len(self._cuts) >= MAX_CUTS:
            raise RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, "cut_id",
                                  f"at most {MAX_CUTS} backups may run at once on a node; "
                                  "wait for one to end", retry_after_s=1.0)
        cut = Cut(cut_id, {}, now, now + hold_s, now)
        self._cuts[cut_id] = cut
        self._open.clear()
        self._arm()
        return cut

    def release(self, cut_id: str) -> tuple[Cut, bool]:
        """Let the cut's held results go; returns it and whether the hold had lasted."""
        cut = self._get(cut_id)
        now = self.clock()
        intact = cut.holding(now)
        if cut.released_at is None:
            cut.released_at = min(now, cut.hold_until)
        self._update()
        return cut, intact

    def end(self, cut_id: str) -> None:
        """Drop the cut (released first, if it still holds); an unknown id is not an error
        (it may have run out)."""
        if self._cuts.pop(cut_id, None) is not None:
            self._update()

    def session(self, cut_id: str, session_id: str) -> Session:
        """The session as the cut's snapshot holds it (the newest copy, replica or not)."""
        cut = self._get(cut_id)
        cut.used_at = self.clock()
        copy = cut.snapshot.get(session_id)
        if copy is None:
            raise SessionNotFoundError(session_id)
        return copy[0]

    def imported(self, session_id: str) -> None:
        """A session was imported here: every cut holding now notes it."""
        now = self.clock()
        for cut in self._cuts.values():
            if cut.holding(now):
                cut.imported.add(session_id)

    async def results_may_go(self) -> None:
        """Wait while a cut holds results back."""
        while not self._open.is_set():
            await self._open.wait()

    def _get(self, cut_id: str) -> Cut:
        cut = self._cuts.get(cut_id)
        if cut is None:
            raise RequestRejected(grpc.StatusCode.NOT_FOUND, "cut_id",
                                  f"no cut {cut_id} on this node (ended, or not read for "
                                  f"{SNAPSHOT_IDLE_S:g} s)")
        return cut

    def _update(self) -> None:
        """Open the gate when no cut holds any more, else wake up when the next hold ends."""
        if any(c.holding(self.clock()) for c in self._cuts.values()):
            self._arm()
        else:
            self._open.set()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        now = self.clock()
        ends = [c.hold_until for c in self._cuts.values() if c.holding(now)]
        if ends:
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, min(ends) - now), self._update)
