"""Bookkeeping of the paged KV cache: which block ids are free, used, or cached for reuse.

Every block id in ``0..num_blocks-1`` is in exactly one state:

* **free**: ref count 0, no content hash, on the free list;
* **used**: ref count > 0 (running sequences read it), hashed or not;
* **cached**: ref count 0 but hashed, so a later request with the same prefix can reuse it;
  the eviction policy reclaims it when a fresh block is needed.

Hence ``num_used + num_free == num_blocks`` where ``num_free`` counts free *and* cached
blocks (both are allocatable). The tensors live elsewhere; this module is pure logic.

Observers (:meth:`BlockPool.add_observer`) learn which content hashes the pool gains and
loses, so a node can tell its coordinators where blocks live (node/kv/block_events.py).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from itertools import takewhile
from operator import is_not
from typing import Protocol

from ultrakv.cluster.errors import EngineError
from ultrakv.node.kv.eviction import EvictionPolicy, make_policy

GPU_TIER = "gpu"  # the pool's own tier name, whatever its device (CPU runs too)

_is_block = partial(is_not, None)  # a lookup in the hash table found a block


class BlockObserver(Protocol):
    """Told which block content hashes a cache tier gained or lost.

    ``stored`` is True when the hashes became reusable in ``tier`` (the block pool reports
    tier ``"gpu"``; tiers below it report ``"cpu"`` and ``"disk"`` through
    :meth:`BlockPool.publish`) and False when they left it. Called on the engine's thread
    while the engine holds its lock, in the order the changes happen: it must be quick and
    must not call back into the pool.
    """

    def __call__(self, stored: bool, hashes: Sequence[int], tier: str) -> None: ...


class NoFreeBlocksError(EngineError):
    """An allocation asked for more blocks than are free or evictable (nothing was taken)."""


@dataclass(frozen=True)
class BlockPoolStats:
    """A snapshot of the pool's counters.

    ``blocks_used + blocks_free == num_blocks``; ``blocks_cached`` is the part of
    ``blocks_free`` that still holds reusable content. ``hits`` and ``misses`` count blocks
    looked up by :meth:`BlockPool.match_prefix`; ``evictions`` counts cached blocks reclaimed
    for new allocations (not those dropped by :meth:`BlockPool.evict_unreferenced`).
    """

    hits: int
    misses: int
    hit_tokens: int
    evictions: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int
    num_blocks: int
    policy: str

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up blocks that were reused; 0.0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> dict[str, int | float | str]:
        """The fields plus ``hit_rate``, for stats endpoints."""
        return {**asdict(self), "hit_rate": self.hit_rate}


class BlockPool:
    """Ref-counted KV blocks with content-hash prefix reuse and pluggable eviction.

    A sequence's life: :meth:`match_prefix` pins the cached blocks of its prompt's longest
    cached prefix, :meth:`allocate` takes fresh blocks for the rest, :meth:`commit` registers
    each block once it is full, :meth:`free` lets go of the whole block table when it finishes.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        policy: str = "lru",
        enable_prefix_caching: bool = True,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._policy: EvictionPolicy = make_policy(policy, num_blocks)
        # Prefix matches' (hits, pinned now, misses) the policy has not been told of yet: see
        # apply_deferred_hits.
        self._deferred_hits: list[tuple[Sequence[int], list[bool], Sequence[int]]] = []
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._block_of: dict[int, int] = {}  # content hash -> block id holding it
        self._free: deque[int] = deque(range(num_blocks))
        self._num_used = 0
        self._num_cached = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._observers: list[BlockObserver] = []
        # The KV tiers below the pool (node/kv/tiers.py) hear of a cached block being
        # reclaimed while its bytes are still in place, and of each block committed.
        self.on_evict: Callable[[int, int], None] | None = None  # (block id, hash)
        self.on_commit: Callable[[int, int], None] | None = None

    # --- eviction policy ----------------------------------------------------------------

    @property
    def policy(self) -> EvictionPolicy:
        """The eviction policy, told of every prefix match so far."""
        self.apply_deferred_hits()
        return self._policy

    def apply_deferred_hits(self) -> None:
        """Tell the policy of the hits and misses of the prefix matches since the last call.

        :meth:`match_prefix` leaves them for later: a returning session's turn reuses a
        hundred blocks or more, and the engine tells the policy while the device computes
        the turn's step instead of before launching it. Every other use of the policy (an
        eviction, a release, a commit, :attr:`policy`) applies them first, so the policy
        sees the same events in the same order as if they were applied at once.
        """
        if self._deferred_hits:
            policy = self._policy
            for hits, pinned_now, misses in self._deferred_hits:
                policy.on_hits(hits, pinned_now)
                for key in misses:
                    policy.on_miss(key)
            self._deferred_hits.clear()

    # --- observers ----------------------------------------------------------------------

    def add_observer(self, observer: BlockObserver) -> None:
        """Report every hash this pool (tier ``"gpu"``) commits or drops to ``observer``,
        and every change other tiers :meth:`publish`."""
        self._observers.append(observer)

    def publish(self, stored: bool, hashes: Sequence[int], tier: str) -> None:
        """Tell the observers that ``tier`` gained (``stored``) or lost ``hashes``: how the
        tiers below the pool report through the same hook."""
        if hashes:
            for observer in self._observers:
                observer(stored, hashes, tier)

    # --- counts -------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free plus cached-and-unreferenced."""
        return len(self._free) + self._num_cached

    @property
    def num_used(self) -> int:
        """Blocks with ref count > 0."""
        return self._num_used

    @property
    def num_cached(self) -> int:
        """Hashed blocks with ref count 0 (reusable until evicted)."""
        return self._num_cached

    def can_allocate(self, n: int) -> bool:
        """Whether :meth:`allocate` of ``n`` blocks would succeed."""
        return n <= self.num_free

    def ref_count(self, block_id: int) -> int:
        """Number of sequences holding ``block_id``."""
        return self._ref[self._check_id(block_id)]

    def block_hash(self, block_id: int) -> int | None:
        """Content hash registered for ``block_id``, or None if it holds none."""
        return self._hash[self._check_id(block_id)]

    def hashes(self) -> list[int]:
        """The content hashes the pool holds now (in used and cached blocks)."""
        return list(self._block_of)

    def reset_stats(self) -> None:
        """Zero the hit, miss and eviction counters (after warmup traffic, say)."""
        self._hits = self._misses = self._evictions = 0

    def stats(self) -> BlockPoolStats:
        """Snapshot of the counters."""
        return BlockPoolStats(
            hits=self._hits,
            misses=self._misses,
            hit_tokens=self._hits * self.block_size,
            evictions=self._evictions,
            blocks_used=self._num_used,
            blocks_free=self.num_free,
            blocks_cached=self._num_cached,
            num_blocks=self.num_blocks,
            policy=self.policy.name,
        )

    # --- allocation ---------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` fresh blocks with ref count 1, evicting cached blocks if needed.

        Raises NoFreeBlocksError, taking nothing, when fewer than ``n`` are allocatable.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > self.num_free:
            raise NoFreeBlocksError(
                f"cannot allocate {n} blocks: {self.num_free} of num_blocks "
                f"{self.num_blocks} are free"
            )
        free = self._free
        blocks = [free.popleft() for _ in range(min(n, len(free)))]
        if len(blocks) < n:
            blocks += self._evict(n - len(blocks))
        ref = self._ref
        for block in blocks:
            ref[block] = 1
        self._num_used += n
        return blocks

    def _evict(self, n: int) -> list[int]:
        """Reclaim ``n`` cached blocks in the policy's order; the observers hear of their
        hashes in one call (a full pool evicts for every step's new blocks)."""
        policy = self.policy
        keys = [policy.victim() for _ in range(n)]
        # num_free counted these blocks as cached, so the policy must have evictable keys.
        assert None not in keys, "eviction policy has no victim while blocks are cached"
        blocks = [self._block_of.pop(key) for key in keys]
        for block in blocks:
            self._hash[block] = None
        self._num_cached -= n
        self._evictions += n
        self.publish(False, keys, GPU_TIER)
        if self.on_evict is not None:
            for block, key in zip(blocks, keys, strict=True):
                self.on_evict(block, key)
        return blocks

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add a reader to each block (a cached one becomes pinned). Free blocks are refused."""
        block_ids = list(block_ids)
        for block in block_ids:
            if self._ref[self._check_id(block)] == 0 and self._hash[block] is None:
                raise ValueError(f"block_id {block} is free; allocate it instead of incref")
        for block in block_ids:
            self._pin(block)

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reader from each block; a block with no reader left is released.

        A released hashed block stays cached (evictable); an unhashed one returns to the free
        list. Blocks are released last-to-first, so with a block table in order a prefix's
        tail is evicted before its head. Raises ValueError, changing nothing, on a double free.
        """
        wanted = Counter(block_ids)
        for block, count in wanted.items():
            if count > self._ref[self._check_id(block)]:
                raise ValueError(
                    f"double free: block_id {block} has ref_count {self._ref[block]}, "
                    f"freed {count} times"
                )
        policy = self.policy
        for block in reversed(block_ids):
            self._ref[block] -= 1
            if self._ref[block] > 0:
                continue
            self._num_used -= 1
            key = self._hash[block]
            if key is None:
                self._free.append(block)
            else:
                self._num_cached += 1
                policy.set_evictable(key, True)

    # --- prefix caching -----------------------------------------------------------------

    def match_prefix(self, hashes: Sequence[int], looked_up: int | None = None) -> list[int]:
        """Pin and return the blocks of the longest leading run of ``hashes`` that is cached.

        Counts the reused blocks as hits and the rest of the ``looked_up`` blocks (default:
        ``len(hashes)``; more when the caller did not hash those past a block it knew to
        be missing) as misses.
        """
        if not self.enable_prefix_caching:
            return []
        # One pass in C over the lookups, one over the blocks, and the policy told later (see
        # apply_deferred_hits): a returning session's turn pins a hundred blocks or more
        # before its prefill can start.
        blocks = list(takewhile(_is_block, map(self._block_of.get, hashes)))
        ref = self._ref
        pinned_now = []
        for block in blocks:
            pinned_now.append(ref[block] == 0)
            ref[block] += 1
        newly = sum(pinned_now)
        self._num_cached -= newly
        self._num_used += newly
        self._deferred_hits.append((hashes[: len(blocks)], pinned_now, hashes[len(blocks) :]))
        self._hits += len(blocks)
        self._misses += (len(hashes) if looked_up is None else looked_up) - len(blocks)
        return blocks

    def cached_prefix(self, hashes: Sequence[int]) -> list[int]:
        """The blocks of the longest leading run of ``hashes`` that is cached, without pinning
        them or touching stats and policy (for exports and session figures)."""
        if not self.enable_prefix_caching:
            return []
        return list(takewhile(_is_block, map(self._block_of.get, hashes)))

    def holds(self, block_hash: int) -> bool:
        """Whether a block (used or cached) holds ``block_hash``."""
        return self.enable_prefix_caching and block_hash in self._block_of

    def commit(self, block_id: int, block_hash: int) -> bool:
        """Register full block ``block_id`` as holding content ``block_hash``.

        Returns True if the block now holds the hash. When another block already holds it,
        that mapping is kept and this block stays unhashed (it returns to the free list when
        freed); returns False then, and always when prefix caching is off. Raises ValueError
        if the block is not in use or already holds a different hash.
        """
        stored = self._register(block_id, block_hash)
        if stored:
            self.publish(True, (block_hash,), GPU_TIER)
        return stored or (self.enable_prefix_caching and self._hash[block_id] == block_hash)

    def commit_blocks(self, block_ids: Sequence[int], hashes: Sequence[int]) -> None:
        """:meth:`commit` each of ``block_ids`` (a step's newly filled blocks) with its hash
        in ``hashes``; the observers hear of the hashes stored in one call."""
        stored = [h for block, h in zip(block_ids, hashes, strict=True) if self._register(block, h)]
        self.publish(True, stored, GPU_TIER)

    def _register(self, block_id: int, block_hash: int) -> bool:
        """Make ``block_hash`` findable in ``block_id`` (see :meth:`commit`); whether it is
        newly stored there (the observers are not told)."""
        if self._ref[self._check_id(block_id)] == 0:
            raise ValueError(f"block_id {block_id} is not allocated (ref_count 0)")
        if not self.enable_prefix_caching:
            return False
        current = self._hash[block_id]
        if current is not None:
            if current != block_hash:
                raise ValueError(
                    f"block_id {block_id} already holds hash {current}, got {block_hash}"
                )
            return False
        if block_hash in self._block_of:
            return False
        self._block_of[block_hash] = block_id
        self._hash[block_id] = block_hash
        self.policy.on_insert(block_hash)
        if self.on_commit is not None:
            self.on_commit(block_id, block_hash)
        return True

    def hashed_blocks(self) -> list[tuple[int, int]]:
        """Every ``(hash, block id)`` holding content, in use or cached."""
        return list(self._block_of.items())

    def evict_unreferenced(self) -> int:
        """Drop every cached block (ref count 0) back to the free list; returns how many."""
        dropped = [(key, b) for key, b in self._block_of.items() if self._ref[b] == 0]
        policy = self.policy
        for key, block in dropped:
            del self._block_of[key]
            self._hash[block] = None
            policy.discard(key)
            self._free.append(block)
        self._num_cached -= len(dropped)
        self.publish(False, [key for key, _ in dropped], GPU_TIER)
        return len(dropped)

    # --- internals ----------------------------------------------------------------------

    def _pin(self, block: int) -> None:
        if self._ref[block] == 0:
            # Only a cached block can be pinned from ref 0 (callers check it is hashed).
            self._num_cached -= 1
            self._num_used += 1
            self.policy.set_evictable(self._hash[block], False)
        self._ref[block] += 1

    def _check_id(self, block_id: int) -> int:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block_id must be in [0, {self.num_blocks}), got {block_id}")
        return block_id
