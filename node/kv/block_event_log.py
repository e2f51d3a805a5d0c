"""The node's numbered record of where its cached blocks live (cluster/block_events.py).

A :class:`BlockEventLog` is a block-pool observer (node/kv/block_pool.py): every hash a tier
gains or loses becomes an event with the next sequence number. It keeps the latest events,
so a coordinator that reconnects continues where it stopped, and what each tier holds now,
so one that cannot continue (a new epoch, or events it missed that are gone) gets a
snapshot. Observers run on the engine thread; readers on the server's event loop: one lock.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence

from ultrakv.cluster.block_events import (
    BlockEvent,
    BlockEventBatch,
    chunked,
    delta_batches,
    snapshot_batches,
)

DEFAULT_MAX_EVENTS = 8192


class BlockEventLog:
    """Sequence-numbered block changes of one node process (``epoch`` names the process)."""

    def __init__(self, block_size: int, chain_root: int | None = None,
                 max_events: int = DEFAULT_MAX_EVENTS, epoch: str | None = None) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.block_size = block_size
        self.chain_root = chain_root  # how the hashes chain: the subscribers hash prompts alike
        self.epoch = epoch or uuid.uuid4().hex
        self._seq = 0
        self._events: deque[BlockEvent] = deque(maxlen=max_events)
        self._held: dict[str, set[int]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def seq(self) -> int:
        """The number of the latest change (0 before any)."""
        return self._seq

    def __call__(self, stored: bool, hashes: Sequence[int], tier: str) -> None:
        """Record a change (the block pool's observer signature)."""
        with self._lock:
            held = self._held.setdefault(tier, set())
            for run in chunked(hashes):
                self._seq += 1
                self._events.append(BlockEvent(self._seq, stored, tier, run))
                if stored:
                    held.update(run)
                else:
                    held.difference_update(run)
            listeners = list(self._listeners)
        for wake in listeners:
            wake()

    def listen(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake`` (from any thread) after each change; returns the call that stops it."""
        with self._lock:
            self._listeners.append(wake)

        def stop() -> None:
            with self._lock:
                self._listeners.remove(wake)
        return stop

    def read(self, epoch: str, since: int) -> list[BlockEventBatch]:
        """What a subscriber that applied ``since`` of ``epoch`` is owed: the changes after it,
        or a snapshot when they cannot be had; ``[]`` when it is up to date."""
        with self._lock:
            if epoch == self.epoch and since == self._seq:
                return []
            oldest = self._events[0].seq if self._events else self._seq + 1
            if epoch == self.epoch and oldest - 1 <= since < self._seq:
                # The log's numbers run without a gap to its newest, so the events owed are
                # its last ``seq - since``: taken from the end, not by scanning all of it
                # (a read follows every change, and the log holds thousands).
                owed = self._seq - since
                return delta_batches(self.epoch, self.block_size, self.chain_root,
                                     [self._events[i] for i in range(-owed, 0)])
            held = {tier: sorted(hashes) for tier, hashes in self._held.items()}
            return snapshot_batches(self.epoch, self._seq, self.block_size, self.chain_root, held)

    def held(self, tier: str) -> set[int]:
        """The hashes ``tier`` holds now (a copy)."""
        with self._lock:
            return set(self._held.get(tier, ()))
