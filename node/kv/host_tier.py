"""The host-memory KV tier: blocks the GPU pool let go of, kept in (pinned) CPU memory.

One preallocated tensor ``[capacity, *block_shape]``: each slot holds one block with all its
layers side by side (``[layers, 2, block_size, kv_heads, head_dim]``), so a block moves in
one copy. Pinned when the engine runs on CUDA (copies to and from the GPU are then DMA and
asynchronous); plain memory on CPU. A slot written by an asynchronous device-to-host copy
carries the copy's CUDA event until it completes; :meth:`HostTier.slot` waits for it before
anyone reads the slot. Which block goes when the tier is full is the configured eviction
policy's choice (node/kv/eviction.py).

A slot can be lent to the disk tier's writer (:meth:`HostTier.hold`): the block is written
to disk straight from it, with no copy on the engine thread, and the slot is not written
again until the writer gives it back (:meth:`HostTier.release`, the one method safe to call
from another thread). An evicted block that is spilling to disk keeps its slot that way
while the new block takes one of the ``spare`` slots allocated beyond ``capacity``; with no
slot free to stand in, the caller copies instead (:meth:`HostTier.reserve`'s ``keep``).
Otherwise not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from ultrakv.node.kv.eviction import EvictionPolicy, make_policy


class HostTier:
    """Up to ``capacity`` blocks of ``block_shape`` / ``dtype`` in CPU memory, by block hash
    (in ``capacity + spare`` slots: the spares stand in for slots lent to disk writes)."""

    def __init__(self, capacity: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                 policy: str = "lru", pin: bool = False, spare: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"host tier capacity must be >= 1 block, got {capacity}")
        if spare < 0:
            raise ValueError(f"host tier spare slots must be >= 0, got {spare}")
        self.capacity = capacity
        self.spare = spare
        self.data = torch.empty((capacity + spare, *block_shape), dtype=dtype, pin_memory=pin)
        self.flat = self.data.view(torch.uint8).view(capacity + spare, -1)  # slots as bytes
        self.pinned = pin
        self.policy: EvictionPolicy = make_policy(policy, capacity)
        self._slot_of: dict[int, int] = {}
        self._free = list(range(capacity + spare - 1, -1, -1))
        self._pending: dict[int, torch.cuda.Event] = {}  # slot -> its incoming copy's event
        self._held: set[int] = set()  # slots a disk write reads from
        self._orphans: set[int] = set()  # held slots whose block left: free once released
        self._released: deque[int] = deque()  # given back by the writer thread
        self.evictions = 0

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def hashes(self) -> list[int]:
        """Every block hash held."""
        return list(self._slot_of)

    def reserve(self, block_hash: int, keep: Callable[[int], bool] | None = None
                ) -> tuple[int | None, list[tuple[int, int, bool]]]:
        """A slot for ``block_hash`` (not yet held) to be written into, and the ``(hash,
        slot, kept)`` of each block evicted to make room (usually one; none if a slot was
        free).

        ``keep(hash)`` says whether an evicted block is to be written from its slot (spilled
        to disk): then, if a free slot can stand in, the evicted slot is :meth:`hold`-ed for
        the caller to lend and ``kept`` is True. Otherwise (``kept`` False) the evicted slot
        is the one returned: read what it held before writing the new block. The slot is
        None (nothing reserved) only when every slot is lent to writes."""
        slots, victims = self.reserve_many([block_hash], keep)
        return slots[0], victims

    def reserve_many(self, hashes: list[int], keep: Callable[[int], bool] | None = None
                     ) -> tuple[list[int | None], list[tuple[int, int, bool]]]:
        """Slots for blocks ``hashes`` (none held yet, at most ``capacity`` of them), in their
        order, and the blocks evicted to make room, as :meth:`reserve` answers for one.

        One call for a flush's whole batch: the blocks of the batch stay pinned until all of
        them have a slot, so none of them is the victim of another (each slot holds the
        block it was reserved for, which the caller's copies rely on)."""
        if len(hashes) > self.capacity:
            raise ValueError(f"at most {self.capacity} blocks (the capacity) can be reserved at "
                             f"once, got {len(hashes)}")
        self._collect_released()
        victims: list[tuple[int, int, bool]] = []
        slots: list[int | None] = []
        policy = self.policy
        for block_hash in hashes:
            if block_hash in self._slot_of:
                raise ValueError(f"block {block_hash:016x} is already in the host tier")
            slot = self._take_slot(keep, victims)
            slots.append(slot)
            if slot is not None:
                self._slot_of[block_hash] = slot
                policy.on_insert(block_hash)  # pinned until the batch is done
        for block_hash, slot in zip(hashes, slots, strict=True):
            if slot is not None:
                policy.set_evictable(block_hash, True)
        return slots, victims

    def _take_slot(self, keep: Callable[[int], bool] | None,
                   victims: list[tuple[int, int, bool]]) -> int | None:
        """A free slot, or one freed by evicting the policy's victim (appended to
        ``victims``); None when every block left has its slot lent to a write."""
        if self._free and len(self._slot_of) < self.capacity:
            return self._free.pop()
        while True:
            old = self.policy.victim()
            if old is None:  # every block left has its slot lent to a write (or is pinned)
                return None
            old_slot = self._slot_of.pop(old)
            self.evictions += 1
            if old_slot in self._held:  # a write-through write still reads it (no spill due)
                self._orphans.add(old_slot)
                victims.append((old, old_slot, False))
                if self._free:
                    return self._free.pop()
            elif keep is not None and self._free and keep(old):
                self._held.add(old_slot)
                self._orphans.add(old_slot)
                victims.append((old, old_slot, True))
                return self._free.pop()
            else:
                victims.append((old, old_slot, False))
                return old_slot

    def hold(self, slot: int) -> None:
        """Lend ``slot`` (holding a block) to a disk write: it is not written again until
        :meth:`release`."""
        self._held.add(slot)

    def release(self, slot: int) -> None:
        """A write is done reading ``slot`` (any thread: taken up at the next reserve)."""
        self._released.append(slot)

    def _collect_released(self) -> None:
        while self._released:
            slot = self._released.popleft()
            self._held.discard(slot)
            if slot in self._orphans:
                self._orphans.discard(slot)
                self._pending.pop(slot, None)
                self._free.append(slot)

    def pending_event(self, slot: int) -> torch.cuda.Event | None:
        """The event of the asynchronous copy still filling ``slot`` (None: none pending)."""
        return self._pending.get(slot)

    def slot_of(self, block_hash: int) -> int | None:
        """The slot holding ``block_hash``, or None (not counted as a use)."""
        return self._slot_of.get(block_hash)

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
            if slot in self._held:  # a write still reads it: free once released
                self._orphans.add(slot)
                return
            self._pending.pop(slot, None)
            self._free.append(slot)

    def clear(self) -> int:
        """Forget every block; returns how many were held."""
        n = len(self._slot_of)
        for block_hash in list(self._slot_of):
            self.discard(block_hash)
        return n
