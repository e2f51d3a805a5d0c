"""Eviction policies over cached KV blocks, keyed by block content hash.

A policy tracks every *resident* key (a hashed block in the pool) and whether it is
*evictable* (no running sequence reads it). It only chooses the order; the block pool owns
the memory. The lifecycle the pool drives::

    on_miss(key)              a lookup wanted key and did not find it (ARC adapts here)
    on_insert(key)            key became resident, pinned (its writer still holds the block)
    on_hit(key)               a lookup reused key
    set_evictable(key, b)     the last reader let go (True) or a new reader pinned it (False)
    victim() -> key | None    choose an evictable key, forget it (ARC and S3-FIFO keep a
                              ghost of it)
    discard(key)              key left the cache for another reason (cache cleared)

Letting go of a block counts as a use for recency (LRU, LFU): the block was read up to that
moment. Every operation is O(1) (ordered dicts) or amortized O(log n) (heaps with lazy
deletion); S3-FIFO's victim is amortized O(1) like CLOCK (a key goes round at most once per
frequency point or per round it stays pinned).
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Sequence
from itertools import repeat

from ultrakv.node.config import EVICTION_POLICIES


class EvictionPolicy(ABC):
    """Order in which unreferenced cached blocks are evicted. Keys are block content hashes."""

    name: str
    # Whether :meth:`on_miss` changes anything: a prefix lookup may then skip hashing the
    # blocks past its first miss only when it does not (node/scheduler.py).
    learns_from_misses = False

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity

    @abstractmethod
    def __contains__(self, key: int) -> bool:
        """Whether ``key`` is resident (ghosts do not count)."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of resident keys, pinned or evictable."""

    @property
    @abstractmethod
    def num_evictable(self) -> int:
        """Number of resident keys that :meth:`victim` may choose."""

    @abstractmethod
    def on_insert(self, key: int) -> None:
        """``key`` became resident, pinned. Raises ValueError if it is already resident."""

    @abstractmethod
    def on_hit(self, key: int) -> None:
        """A lookup reused resident ``key``. Raises KeyError if it is not resident."""

    def on_miss(self, key: int) -> None:  # noqa: B027 - only adaptive policies learn from misses
        """A lookup wanted ``key`` and it was not resident."""

    def on_hits(self, keys: Sequence[int], pinned_now: Sequence[bool]) -> None:
        """A lookup reused resident ``keys``, in order; ``pinned_now[i]``: ``keys[i]`` had
        no reader and is pinned by this one. The same as, key by key, :meth:`on_hit` and
        then (where pinned now) ``set_evictable(key, False)``; a returning session's turn
        reuses a hundred blocks or more before its prefill starts, so a policy may do it in
        one pass. ``keys`` must be resident (the pool passes the keys it holds)."""
        for key, pin in zip(keys, pinned_now, strict=True):
            self.on_hit(key)
            if pin:
                self.set_evictable(key, False)

    @abstractmethod
    def set_evictable(self, key: int, evictable: bool) -> None:
        """Unpin (True) or pin (False) resident ``key``. Raises KeyError if not resident."""

    @abstractmethod
    def victim(self) -> int | None:
        """Choose an evictable key, stop tracking it and return it; None if none is evictable."""

    @abstractmethod
    def discard(self, key: int) -> None:
        """Forget resident ``key`` without counting it as an eviction. KeyError if absent."""


class LRUPolicy(EvictionPolicy):
    """Evict the least recently used evictable key."""

    name = "lru"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._pinned: set[int] = set()
        # Evictable keys, least recent first.
        self._evictable: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, key: int) -> bool:
        return key in self._pinned or key in self._evictable

    def __len__(self) -> int:
        return len(self._pinned) + len(self._evictable)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def on_insert(self, key: int) -> None:
        if key in self:
            raise ValueError(f"key {key} is already resident")
        self._pinned.add(key)

    def on_hit(self, key: int) -> None:
        if key in self._evictable:
            self._evictable.move_to_end(key)
        elif key not in self._pinned:
            raise KeyError(key)

    def on_hits(self, keys: Sequence[int], pinned_now: Sequence[bool]) -> None:
        # A hit moves an evictable key to the recent end, and pinning it takes it out of
        # the order: for a key pinned now only the removal shows.
        evictable, pinned = self._evictable, self._pinned
        if all(pinned_now):  # the usual case, a returning session's blocks: one pass in C
            deque(map(evictable.pop, keys, repeat(None)), maxlen=0)
            pinned.update(keys)
            return
        for key, pin in zip(keys, pinned_now, strict=True):
            if key in evictable:
                if pin:
                    del evictable[key]
                    pinned.add(key)
                else:
                    evictable.move_to_end(key)
            elif key not in pinned:
                raise KeyError(key)

    def set_evictable(self, key: int, evictable: bool) -> None:
        if key not in self:
            raise KeyError(key)
        if evictable:
            self._pinned.discard(key)
            self._evictable[key] = None
            self._evictable.move_to_end(key)
        elif key in self._evictable:
            del self._evictable[key]
            self._pinned.add(key)

    def victim(self) -> int | None:
        if not self._evictable:
            return None
        return self._evictable.popitem(last=False)[0]

    def discard(self, key: int) -> None:
        if key in self._evictable:
            del self._evictable[key]
        else:
            self._pinned.remove(key)


class _HeapPolicy(EvictionPolicy):
    """Evict the evictable key with the smallest priority tuple.

    A min-heap holds (priority, key) for evictable keys. Pinning a key or changing its
    priority leaves stale entries behind; :meth:`victim` skips them by comparing with the
    key's current priority, and the heap is rebuilt when stale entries outnumber live ones so
    its size stays O(resident keys).
    """

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._tick = 0
        self._evictable_prio: dict[int, tuple[int, ...]] = {}
        self._pinned: set[int] = set()
        self._heap: list[tuple[tuple[int, ...], int]] = []

    @abstractmethod
    def _priority(self, key: int) -> tuple[int, ...]:
        """Current eviction priority of resident ``key``; smallest is evicted first."""

    @abstractmethod
    def _track(self, key: int) -> None:
        """Start the per-key state (insertion time, counts) of a newly resident key."""

    @abstractmethod
    def _touch(self, key: int, hit: bool) -> None:
        """Update per-key state on a hit (``hit``) or on being let go."""

    @abstractmethod
    def _forget(self, key: int) -> None:
        """Drop the per-key state of a key that left the cache."""

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def __contains__(self, key: int) -> bool:
        return key in self._pinned or key in self._evictable_prio

    def __len__(self) -> int:
        return len(self._pinned) + len(self._evictable_prio)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable_prio)

    def _push(self, key: int) -> None:
        prio = self._priority(key)
        self._evictable_prio[key] = prio
        heapq.heappush(self._heap, (prio, key))
        if len(self._heap) > 2 * len(self._evictable_prio) + 64:
            self._heap = [(p, k) for k, p in self._evictable_prio.items()]
            heapq.heapify(self._heap)

    def on_insert(self, key: int) -> None:
        if key in self:
            raise ValueError(f"key {key} is already resident")
        self._pinned.add(key)
        self._track(key)

    def on_hit(self, key: int) -> None:
        if key not in self:
            raise KeyError(key)
        self._touch(key, hit=True)
        if key in self._evictable_prio:
            self._push(key)

    def set_evictable(self, key: int, evictable: bool) -> None:
        if key not in self:
            raise KeyError(key)
        if evictable:
            self._pinned.discard(key)
            self._touch(key, hit=False)
            self._push(key)
        elif key in self._evictable_prio:
            del self._evictable_prio[key]
            self._pinned.add(key)

    def victim(self) -> int | None:
        while self._heap:
            prio, key = heapq.heappop(self._heap)
            if self._evictable_prio.get(key) == prio:
                del self._evictable_prio[key]
                self._forget(key)
                return key
        return None

    def discard(self, key: int) -> None:
        if key in self._evictable_prio:
            del self._evictable_prio[key]
        else:
            self._pinned.remove(key)
        self._forget(key)


class LFUPolicy(_HeapPolicy):
    """Evict the least frequently used evictable key; among equals, the least recent.

    Frequency counts the insert and every hit; it is forgotten when the key leaves the cache.
    """

    name = "lfu"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._freq: dict[int, int] = {}
        self._last: dict[int, int] = {}

    def _priority(self, key: int) -> tuple[int, ...]:
        return (self._freq[key], self._last[key])

    def _track(self, key: int) -> None:
        self._freq[key] = 1
        self._last[key] = self._next_tick()

    def _touch(self, key: int, hit: bool) -> None:
        if hit:
            self._freq[key] += 1
        self._last[key] = self._next_tick()

    def _forget(self, key: int) -> None:
        del self._freq[key]
        del self._last[key]


class FIFOPolicy(_HeapPolicy):
    """Evict the evictable key that became resident first; hits do not reorder."""

    name = "fifo"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._inserted: dict[int, int] = {}

    def _priority(self, key: int) -> tuple[int, ...]:
        return (self._inserted[key],)

    def _track(self, key: int) -> None:
        self._inserted[key] = self._next_tick()

    def _touch(self, key: int, hit: bool) -> None:
        pass  # insertion order is all FIFO looks at

    def _forget(self, key: int) -> None:
        del self._inserted[key]


class ARCPolicy(EvictionPolicy):
    """Adaptive Replacement Cache (Megiddo & Modha, FAST 2003) over a pool of ``capacity``.

    T1 holds keys seen once since they became resident, T2 keys seen at least twice; B1 and
    B2 remember (ghost) keys recently evicted from T1 and T2. A miss on a B1 ghost means T1
    was too small and raises the target size ``p`` of T1; a miss on a B2 ghost lowers it.
    :meth:`victim` evicts from T1 while it is over target, otherwise from T2.

    The paper couples a miss with the replacement; here the pool evicts only when it needs a
    block, so the steps are split: :meth:`on_miss` adapts ``p``, :meth:`victim` replaces, and
    :meth:`on_insert` puts a ghost straight into T2. Pinned keys stay in T1/T2 (they count
    towards the sizes) but are never chosen; ghost lists are trimmed so that
    |T1| + |B1| <= c and |T1| + |T2| + |B1| + |B2| <= 2c, as in the paper.
    """

    name = "arc"
    learns_from_misses = True

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.p = 0.0
        # key -> 1 or 2: which resident list holds it.
        self._list: dict[int, int] = {}
        self._size = {1: 0, 2: 0}
        # Evictable members of T1 / T2, least recent first.
        self._evictable: dict[int, OrderedDict[int, None]] = {1: OrderedDict(), 2: OrderedDict()}
        self._b1: OrderedDict[int, None] = OrderedDict()
        self._b2: OrderedDict[int, None] = OrderedDict()
        self._last_miss_in_b2 = False

    def __contains__(self, key: int) -> bool:
        return key in self._list

    def __len__(self) -> int:
        return len(self._list)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable[1]) + len(self._evictable[2])

    @property
    def t1_size(self) -> int:
        """Resident keys seen once (pinned included)."""
        return self._size[1]

    @property
    def t2_size(self) -> int:
        """Resident keys seen at least twice (pinned included)."""
        return self._size[2]

    def ghosts(self) -> tuple[list[int], list[int]]:
        """Keys of B1 and B2, least recent first (for inspection and tests)."""
        return list(self._b1), list(self._b2)

    def on_miss(self, key: int) -> None:
        b1, b2 = len(self._b1), len(self._b2)
        self._last_miss_in_b2 = key in self._b2
        if key in self._b1:
            self.p = min(float(self.capacity), self.p + max(b2 / b1, 1.0))
        elif key in self._b2:
            self.p = max(0.0, self.p - max(b1 / b2, 1.0))

    def on_insert(self, key: int) -> None:
        if key in self._list:
            raise ValueError(f"key {key} is already resident")
        self._last_miss_in_b2 = False
        if key in self._b1:
            del self._b1[key]
            self._place(key, 2)
        elif key in self._b2:
            del self._b2[key]
            self._place(key, 2)
        else:
            self._place(key, 1)
        self._trim_ghosts()

    def on_hit(self, key: int) -> None:
        lst = self._list[key]
        evictable = key in self._evictable[lst]
        if evictable:
            del self._evictable[lst][key]
        self._size[lst] -= 1
        self._place(key, 2)
        if evictable:
            self._evictable[2][key] = None

    def set_evictable(self, key: int, evictable: bool) -> None:
        members = self._evictable[self._list[key]]
        if evictable:
            members[key] = None
            members.move_to_end(key)
        else:
            members.pop(key, None)

    def victim(self) -> int | None:
        e1, e2 = self._evictable[1], self._evictable[2]
        if not e1 and not e2:
            return None
        t1 = self._size[1]
        prefer_t1 = t1 > self.p or (self._last_miss_in_b2 and t1 == self.p)
        if e1 and (prefer_t1 or not e2):
            key = e1.popitem(last=False)[0]
            self._b1[key] = None
        else:
            key = e2.popitem(last=False)[0]
            self._b2[key] = None
        self._size[self._list.pop(key)] -= 1
        self._trim_ghosts()
        return key

    def discard(self, key: int) -> None:
        lst = self._list.pop(key)
        self._size[lst] -= 1
        self._evictable[lst].pop(key, None)

    def _place(self, key: int, lst: int) -> None:
        self._list[key] = lst
        self._size[lst] += 1

    def _trim_ghosts(self) -> None:
        c = self.capacity
        while self._b1 and self._size[1] + len(self._b1) > c:
            self._b1.popitem(last=False)
        while self._b2 or self._b1:
            if len(self._list) + len(self._b1) + len(self._b2) <= 2 * c:
                break
            (self._b2 or self._b1).popitem(last=False)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP 2023): three FIFO queues, promotion only at eviction time.

    A new key enters the small queue S (about 10% of ``capacity``); a key whose ghost is
    remembered enters the main queue M. Hits only raise the key's frequency (0..3). To
    evict, S is taken from while it holds at least its share (or M has nothing to give): its
    oldest key moves to M if it was hit since it came in, otherwise it is evicted and its
    ghost kept in G, a FIFO of keys as long as M's share. M's oldest key is evicted when its
    frequency is 0, otherwise it goes back to M's head one lower. So a block used once (a
    one-hit wonder) leaves after a short stay in S without displacing anything in M.

    Letting go of a block is not counted as a use: the writer's own use would otherwise make
    every block look re-accessed. A pinned key that reaches the tail of its queue goes back
    to that queue's head untouched (it is in use; it is looked at again one round later).
    """

    name = "s3fifo"
    SMALL_FRACTION = 0.1
    MAX_FREQ = 3

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.small_target = max(1, round(self.SMALL_FRACTION * capacity))
        self.ghost_capacity = max(1, capacity - self.small_target)
        # Oldest first (the tail is the first item); the value is unused.
        self._small: OrderedDict[int, None] = OrderedDict()
        self._main: OrderedDict[int, None] = OrderedDict()
        self._ghost: OrderedDict[int, None] = OrderedDict()
        self._freq: dict[int, int] = {}
        self._pinned: set[int] = set()
        self._evictable_in = {"small": 0, "main": 0}

    def __contains__(self, key: int) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    @property
    def num_evictable(self) -> int:
        return self._evictable_in["small"] + self._evictable_in["main"]

    def queues(self) -> tuple[list[int], list[int], list[int]]:
        """Keys of S, M and G, oldest first (for inspection and tests)."""
        return list(self._small), list(self._main), list(self._ghost)

    def _queue_of(self, key: int) -> str:
        return "small" if key in self._small else "main"

    def on_insert(self, key: int) -> None:
        if key in self._freq:
            raise ValueError(f"key {key} is already resident")
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
        self._freq[key] = 0
        self._pinned.add(key)

    def on_hit(self, key: int) -> None:
        self._freq[key] = min(self._freq[key] + 1, self.MAX_FREQ)

    def set_evictable(self, key: int, evictable: bool) -> None:
        if key not in self._freq:
            raise KeyError(key)
        pinned = key in self._pinned
        if evictable and pinned:
            self._pinned.discard(key)
            self._evictable_in[self._queue_of(key)] += 1
        elif not evictable and not pinned:
            self._pinned.add(key)
            self._evictable_in[self._queue_of(key)] -= 1

    def victim(self) -> int | None:
        while self.num_evictable:
            from_small = self._evictable_in["small"] and (
                len(self._small) >= self.small_target or not self._evictable_in["main"])
            key = self._evict_small() if from_small else self._evict_main()
            if key is not None:
                del self._freq[key]
                return key
        return None

    def _evict_small(self) -> int | None:
        """One step at S's tail: the evicted key, or None if the key moved on."""
        key, _ = self._small.popitem(last=False)
        if key in self._pinned:
            self._small[key] = None
        elif self._freq[key] > 0:
            self._freq[key] = 0
            self._main[key] = None
            self._evictable_in["small"] -= 1
            self._evictable_in["main"] += 1
        else:
            self._evictable_in["small"] -= 1
            self._ghost[key] = None
            if len(self._ghost) > self.ghost_capacity:
                self._ghost.popitem(last=False)
            return key
        return None

    def _evict_main(self) -> int | None:
        """One step at M's tail: the evicted key, or None if the key went back to the head."""
        key, _ = self._main.popitem(last=False)
        if key in self._pinned:
            self._main[key] = None
        elif self._freq[key] > 0:
            self._freq[key] -= 1
            self._main[key] = None
        else:
            self._evictable_in["main"] -= 1
            return key
        return None

    def discard(self, key: int) -> None:
        queue = self._queue_of(key)
        del self._freq[key]
        if key in self._pinned:
            self._pinned.discard(key)
        else:
            self._evictable_in[queue] -= 1
        del (self._small if queue == "small" else self._main)[key]


POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, FIFOPolicy, ARCPolicy, S3FIFOPolicy)
}


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    """Build the eviction policy called ``name`` ("lru", "lfu", "fifo", "arc" or "s3fifo")."""
    if name not in POLICIES:
        raise ValueError(f"eviction_policy must be one of {EVICTION_POLICIES}, got {name!r}")
    return POLICIES[name](capacity)
