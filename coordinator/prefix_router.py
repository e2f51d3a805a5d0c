"""Where a request without a session goes: the node holding its longest cached prefix,
under bounded load.

Pure logic. The bound is the ring's (cluster/ring.py, Mirrokni et al.): a node may take one
more request only while its requests in flight are below
``ceil((1 + eps) * (total + 1) * share)``. Among the nodes under their bound, the one that
holds the most leading blocks of the prompt (coordinator/block_index.py) wins; ties go to
the node met first clockwise from the prompt's first-block key, so every coordinator breaks
them alike. When no node under its bound holds even the first block, the choice is the one
routing made before the index existed: ``bounded_lookup`` of that key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ultrakv.cluster.ring import HashRing, bounded_capacity, bounded_lookup
from ultrakv.coordinator.block_index import BlockIndex


@dataclass(frozen=True)
class PrefixChoice:
    """The chosen node and how many leading prompt blocks it holds (0: the fallback)."""

    node: str
    matched_blocks: int


def overloaded(ring: HashRing, node: str, loads: Mapping[str, int], eps: float) -> bool:
    """Whether ``node`` is at or above its bounded-load capacity for one more request."""
    total = sum(loads.get(n, 0) for n in ring.nodes)
    return loads.get(node, 0) >= bounded_capacity(ring, node, total, eps)


def choose_node(ring: HashRing, key: str, hashes: Sequence[int], index: BlockIndex,
                loads: Mapping[str, int], eps: float) -> PrefixChoice:
    """The node for a prompt whose chained block hashes are ``hashes`` and whose first-block
    routing key is ``key`` (see the module docstring)."""
    fallback = bounded_lookup(ring, key, loads, eps)
    lengths = index.prefix_lengths(hashes, ring.nodes) if hashes else {}
    holding = [n for n, length in lengths.items() if length > 0 and not overloaded(ring, n, loads, eps)]
    if not holding:
        return PrefixChoice(fallback, 0)
    order = {n: i for i, n in enumerate(ring.lookup_n(key, len(ring)))}
    best = min(holding, key=lambda n: (-lengths[n], order[n]))
    return PrefixChoice(best, lengths[best])
