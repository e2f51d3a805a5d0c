"""Which node holds which cached blocks, in which tier: the coordinator's routing index.

Built from each node's block-event stream (cluster/block_events.py). Pure logic, no I/O:
:class:`BlockIndex` applies a node's messages in order and says when it cannot (a sequence
gap, or changes from an epoch it has no snapshot of), so its caller resubscribes for a
snapshot. It keeps both directions: node -> its blocks (to drop a node at once) and block ->
the nodes holding it (to find the longest cached prefix of a prompt across nodes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ultrakv.cluster.block_events import TIERS, BlockEventBatch

DEFAULT_MAX_BLOCKS_PER_NODE = 1 << 22
_TIER_BIT = {tier: 1 << i for i, tier in enumerate(TIERS)}


@dataclass(frozen=True)
class HashScheme:
    """How a node's block hashes chain: tokens per block and the first block's parent (the
    KV dtype's ``chain_root``; None for an unquantized cache). A prompt hashed the same way
    matches that node's blocks."""

    block_size: int
    chain_root: int | None = None


@dataclass(frozen=True)
class Cursor:
    """Where a node's stream stands: its epoch and the last sequence number applied
    ("", 0: nothing known, the next subscription gets a snapshot)."""

    epoch: str = ""
    seq: int = 0


class BlockIndex:
    """The blocks each node holds per tier, as its events told (see the module docstring)."""

    def __init__(self, max_blocks_per_node: int = DEFAULT_MAX_BLOCKS_PER_NODE) -> None:
        if max_blocks_per_node < 1:
            raise ValueError(f"max_blocks_per_node must be >= 1, got {max_blocks_per_node}")
        self.max_blocks_per_node = max_blocks_per_node
        self._blocks: dict[str, dict[int, int]] = {}  # node -> hash -> tier bits
        self._holders: dict[int, dict[str, int]] = {}  # hash -> node -> tier bits
        self._cursors: dict[str, Cursor] = {}
        self._schemes: dict[str, HashScheme] = {}
        self.dropped_over_cap = 0  # stored hashes ignored: a node past max_blocks_per_node

    # -- reading -------------------------------------------------------------------------

    def cursor(self, node: str) -> Cursor:
        """What to subscribe to ``node`` with."""
        return self._cursors.get(node, Cursor())

    def nodes(self) -> list[str]:
        """Nodes with a snapshot applied, sorted."""
        return sorted(self._cursors)

    def scheme(self, node: str) -> HashScheme | None:
        """How ``node``'s hashes chain, once known."""
        return self._schemes.get(node)

    def num_blocks(self, node: str) -> int:
        """Distinct hashes ``node`` holds in any tier."""
        return len(self._blocks.get(node, ()))

    def blocks(self, node: str) -> set[int]:
        """The hashes ``node`` holds in any tier (a copy)."""
        return set(self._blocks.get(node, ()))

    def holders(self, block_hash: int) -> dict[str, tuple[str, ...]]:
        """Node -> the tiers (fastest first) where it holds ``block_hash``."""
        return {node: tuple(t for t in TIERS if bits & _TIER_BIT[t])
                for node, bits in self._holders.get(block_hash, {}).items()}

    def prefix_lengths(self, hashes: Sequence[int], nodes: Iterable[str]) -> dict[str, int]:
        """For each of ``nodes``: how many leading blocks of ``hashes`` it holds (any tier)."""
        lengths = dict.fromkeys(nodes, 0)
        alive = set(lengths)
        for depth, h in enumerate(hashes):
            alive &= self._holders.get(h, {}).keys()
            if not alive:
                break
            for node in alive:
                lengths[node] = depth + 1
        return lengths

    # -- applying ------------------------------------------------------------------------

    def apply(self, node: str, batch: BlockEventBatch) -> bool:
        """Apply one message of ``node``'s stream. Returns False, changing nothing, when it
        does not continue what is known (a gap, another epoch without a snapshot, a snapshot
        part without its start): the caller then resubscribes from :meth:`forget_cursor`."""
        cursor = self.cursor(node)
        if batch.snapshot:
            if batch.reset:
                self.drop(node)
            elif cursor != Cursor(batch.epoch, batch.seq):
                return False
            for event in batch.events:
                self._store(node, event.tier, event.hashes)
            self._cursors[node] = Cursor(batch.epoch, batch.seq)
            self._schemes[node] = HashScheme(batch.block_size, batch.chain_root)
            return True
        if (batch.epoch != cursor.epoch
                or HashScheme(batch.block_size, batch.chain_root) != self._schemes.get(node)):
            return False
        expected = cursor.seq
        for event in batch.events:
            expected += 1
            if event.seq != expected:
                return False
        for event in batch.events:
            if event.stored:
                self._store(node, event.tier, event.hashes)
            else:
                self._remove(node, event.tier, event.hashes)
        self._cursors[node] = Cursor(batch.epoch, expected)
        return True

    def forget_cursor(self, node: str) -> None:
        """Ask for a snapshot next (the blocks stay until it resets them)."""
        if node in self._cursors:
            self._cursors[node] = Cursor()

    def drop(self, node: str) -> None:
        """Forget ``node`` entirely (it died or left): its blocks leave the index."""
        for h in self._blocks.pop(node, {}):
            holders = self._holders[h]
            del holders[node]
            if not holders:
                del self._holders[h]
        self._cursors.pop(node, None)
        self._schemes.pop(node, None)

    def _store(self, node: str, tier: str, hashes: Iterable[int]) -> None:
        bit = _TIER_BIT[tier]
        blocks = self._blocks.setdefault(node, {})
        for h in hashes:
            if h not in blocks and len(blocks) >= self.max_blocks_per_node:
                self.dropped_over_cap += 1
                continue
            blocks[h] = blocks.get(h, 0) | bit
            self._holders.setdefault(h, {})[node] = blocks[h]

    def _remove(self, node: str, tier: str, hashes: Iterable[int]) -> None:
        bit = _TIER_BIT[tier]
        blocks = self._blocks.get(node, {})
        for h in hashes:
            bits = blocks.get(h, 0) & ~bit
            if bits:
                blocks[h] = self._holders[h][node] = bits
            elif h in blocks:
                del blocks[h]
                holders = self._holders[h]
                del holders[node]
                if not holders:
                    del self._holders[h]
