"""Where a session's turn runs when its owner is overloaded: the node holding the session's
longest cached prefix, if one under its bound holds enough of it. Pure logic.

A session's turns go to its ring owner, which holds its history and KV. When the owner is
at or over its bounded-load capacity (the same bound, ``load_eps`` and requests in flight,
as routing without a session: coordinator/prefix_router.py), the turn may run on another
node instead: one under its own bound, and still less loaded than the owner once it takes
the turn (else moving it balances nothing: with one request in flight in all, its node is
already "at" a tight bound), that holds at least MIN_MATCH_FRACTION of the turn's prompt
blocks (the session's history, then the new prompt) in its cache, so the stand-in prefills
little. Ties go to the node met first clockwise from the session's key, so the
ring successor (which holds the session's replica) is preferred and coordinators agree.
Nothing cached elsewhere, or the owner under its bound: the owner runs it, as always.
In-flight counts cannot tell an owner that queues from one that batches, so the owner has
the last word: the turn moves only if a request arriving there now would wait for admission
(``PreparedTurn.would_wait``); with room in its batch the owner starts it at once, with its
KV, which a stand-in cannot beat. (The coordinator then believes the room it was told of,
``free_slots``, until it has sent that many more requests, for a second at most.)

The stand-in runs the turn as a generation without a session over the turn's token ids;
the coordinator then appends the produced turn to the owner, conditional on the session's
turn version (``NodeService.CommitTurn``), before the client sees the turn complete. So the
owner keeps the one authoritative copy and replicates it as for any turn; the stand-in
keeps only cached blocks. See docs/prefix-routing.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ultrakv.cluster.ring import HashRing
from ultrakv.coordinator.block_index import BlockIndex
from ultrakv.coordinator.prefix_router import MIN_MATCH_FRACTION, overloaded


@dataclass(frozen=True)
class StandIn:
    """The node to run an overloaded owner's session turn, and how many leading blocks of
    the turn's prompt it holds."""

    node: str
    matched_blocks: int


def may_stand_in(ring: HashRing, owner: str, loads: Mapping[str, int], eps: float) -> bool:
    """Whether a turn of a session owned by ``owner`` may run elsewhere at all: the owner is
    at or over its bound and another node could take it (checked before asking the owner for
    the turn's tokens)."""
    return (owner in ring.nodes and overloaded(ring, owner, loads, eps)
            and bool(_open_nodes(ring, owner, loads, eps)))


def _open_nodes(ring: HashRing, owner: str, loads: Mapping[str, int], eps: float) -> set[str]:
    """Nodes other than ``owner`` under their bound and less loaded than ``owner`` even
    with the turn."""
    return {n for n in ring.nodes if n != owner and not overloaded(ring, n, loads, eps)
            and loads.get(n, 0) + 1 < loads.get(owner, 0)}


def choose_stand_in(ring: HashRing, session_id: str, owner: str, hashes: Sequence[int],
                    index: BlockIndex, loads: Mapping[str, int], eps: float) -> StandIn | None:
    """The node to run the turn of ``session_id`` whose prompt's chained block hashes are
    ``hashes``, while ``owner`` is overloaded; None when the owner is to run it (see the
    module docstring)."""
    if not hashes or not may_stand_in(ring, owner, loads, eps):
        return None
    order = {n: i for i, n in enumerate(ring.lookup_n(session_id, len(ring)))}
    open_nodes = _open_nodes(ring, owner, loads, eps)
    candidates = [n for n in order if n in open_nodes]
    lengths = index.prefix_lengths(hashes, candidates)
    best = min(candidates, key=lambda n: (-lengths[n], order[n]))
    if lengths[best] == 0 or lengths[best] < MIN_MATCH_FRACTION * len(hashes):
        return None
    return StandIn(best, lengths[best])
