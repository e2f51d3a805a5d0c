"""Where a request without a session goes: the node holding its longest cached prefix,
under bounded load.

Pure logic. The bound is the ring's (cluster/ring.py, Mirrokni et al.): a node may take one
more request only while its requests in flight are below
``ceil((1 + eps) * (total + 1) * share)``. Among the nodes under their bound, the one that
holds the most leading blocks of the prompt (coordinator/block_index.py) wins, if they are
at least MIN_MATCH_FRACTION of the prompt's blocks; ties go to the node met first clockwise
from the prompt's first-block key, so every coordinator breaks them alike.

A smaller match is a shared preamble, not the prompt: following it would pile every prompt
that starts alike onto one node, whose cache then holds none of them for long. Such a
prompt, like one nobody holds, goes to the node under its bound with the fewest blocks
cached (ties again in ring order), so distinct prompts spread over the nodes' memory; the
next requests with the same prompt then find it there. A prompt without a full block is
routed as before the index existed: ``bounded_lookup`` of its first-block key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ultrakv.cluster.ring import HashRing, bounded_capacity, bounded_lookup
from ultrakv.coordinator.block_index import BlockIndex

MIN_MATCH_FRACTION = 0.5


@dataclass(frozen=True)
class PrefixChoice:
    """The chosen node, how many leading prompt blocks it holds, and why it was chosen:
    ``prefix`` (it holds the prompt), ``spread`` (nobody does: the fewest blocks cached) or
    ``first_block`` (no full block to go by: the first-block key)."""

    node: str
    matched_blocks: int
    reason: str


def overloaded(ring: HashRing, node: str, loads: Mapping[str, int], eps: float) -> bool:
    """Whether ``node`` is at or above its bounded-load capacity for one more request."""
    total = sum(loads.get(n, 0) for n in ring.nodes)
    return loads.get(node, 0) >= bounded_capacity(ring, node, total, eps)


def choose_node(ring: HashRing, key: str, hashes: Sequence[int], index: BlockIndex,
                loads: Mapping[str, int], eps: float) -> PrefixChoice:
    """The node for a prompt whose chained block hashes are ``hashes`` and whose first-block
    routing key is ``key`` (see the module docstring)."""
    if not hashes:
        return PrefixChoice(bounded_lookup(ring, key, loads, eps), 0, "first_block")
    order = {n: i for i, n in enumerate(ring.lookup_n(key, len(ring)))}
    open_nodes = [n for n in order if not overloaded(ring, n, loads, eps)]
    lengths = index.prefix_lengths(hashes, open_nodes)
    best = min(open_nodes, key=lambda n: (-lengths[n], order[n]))
    if lengths[best] >= MIN_MATCH_FRACTION * len(hashes):
        return PrefixChoice(best, lengths[best], "prefix")
    emptiest = min(open_nodes, key=lambda n: (index.num_blocks(n), order[n]))
    return PrefixChoice(emptiest, lengths[emptiest], "spread")
