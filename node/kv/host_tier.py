"""The host-memory KV tier: blocks the GPU pool let go of, kept in (pinned) CPU memory.

One preallocated tensor ``[capacity, *block_shape]``: each slot holds one block with all its
layers side by side (``[layers, 2, block_size, kv_heads, head_dim]``), so a block moves in
one copy. Pinned when the engine runs on CUDA (copies to and from the GPU are then DMA and
asynchronous); plain memory on CPU. A slot written by an asynchronous device-to-host copy
carries the copy's CUDA event until it completes; :meth:`HostTier.slot` waits for it before
anyone reads the slot. Which block goes when the tier is full is the configured eviction
policy's choice (node/kv/eviction.py). Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

import torch
from ultrakv.node.kv.eviction import EvictionPolicy, make_policy


class HostTier:
    """Up to ``capacity`` blocks of ``block_shape`` / ``dtype`` in CPU memory, by block hash."""

    def __init__(self, capacity: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                 policy: str = "lru", pin: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"host tier capacity must be >= 1 block, got {capacity}")
        self.capacity = capacity
        self.data = torch.empty((capacity, *block_shape), dtype=dtype, pin_memory=pin)
        self.pinned = pin
        self.policy: EvictionPolicy = make_policy(policy, capacity)
        self._slot_of: dict[int, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._pending: dict[int, torch.cuda.Event] = {}  # slot -> its incoming copy's event
        self.evictions = 0

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def hashes(self) -> list[int]:
        """Every block hash held."""
        return list(self._slot_of)

    def reserve(self, block_hash: int) -> tuple[int, tuple[int, int] | None]:
        """A slot for ``block_hash`` (not yet held) to be written into, and the ``(hash,
        slot)`` evicted to make room (None if a slot was free). The evicted slot is the one
        returned: read what it held (for the next tier) before writing the new block."""
        if block_hash in self._slot_of:
            raise ValueError(f"block {block_hash:016x} is already in the host tier")
        victim = None
        if self._free:
            slot = self._free.pop()
        else:
            old = self.policy.victim()
            assert old is not None, "host tier full with nothing evictable"
            slot = self._slot_of.pop(old)
            self.evictions += 1
            victim = (old, slot)
        self._slot_of[block_hash] = slot
        self.policy.on_insert(block_hash)
        self.policy.set_evictable(block_hash, True)
        return slot, victim

    def mark_pending(self, slots: list[int], event: torch.cuda.Event) -> None:
        """``slots`` are being written by an asynchronous copy that completes at ``event``."""
        for slot in slots:
            self._pending[slot] = event

    def slot(self, slot: int) -> torch.Tensor:
        """Slot ``slot``'s block, once any copy into it has completed."""
        event = self._pending.pop(slot, None)
        if event is not None:
            event.synchronize()
        return self.data[slot]

    def lookup(self, block_hash: int) -> int | None:
        """The slot holding ``block_hash`` (counted as a use), or None."""
        slot = self._slot_of.get(block_hash)
        if slot is not None:
            self.policy.on_hit(block_hash)
        return slot

    def touch(self, block_hash: int) -> None:
        """Count a use of held ``block_hash`` (its GPU copy was evicted again)."""
        self.policy.on_hit(block_hash)

    def discard(self, block_hash: int) -> None:
        """Forget ``block_hash`` if held (its slot becomes free)."""
        slot = self._slot_of.pop(block_hash, None)
        if slot is not None:
            self.policy.discard(block_hash)
            self._pending.pop(slot, None)
            self._free.append(slot)

    def clear(self) -> int:
        """Forget every block; returns how many were held."""
        n = len(self._slot_of)
        for block_hash in list(self._slot_of):
            self.discard(block_hash)
        return n
