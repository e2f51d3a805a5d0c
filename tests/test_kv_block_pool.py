"""Block pool bookkeeping: ref counts, allocation, prefix reuse, eviction, stats, invariants."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from ultrakv.cluster.block_hashing import hash_token_blocks
from ultrakv.cluster.errors import EngineError
from ultrakv.node.config import EVICTION_POLICIES
from ultrakv.node.kv.block_pool import BlockPool, BlockPoolStats, NoFreeBlocksError

BS = 4


def fill(pool: BlockPool, tokens: list[int], salt: str = "") -> list[int]:
    """Run one request: reuse its cached prefix, allocate and commit the rest, return blocks."""
    hashes = hash_token_blocks(tokens, BS, salt)
    blocks = pool.match_prefix(hashes)
    fresh = pool.allocate(len(hashes) - len(blocks))
    for block, h in zip(fresh, hashes[len(blocks) :], strict=True):
        pool.commit(block, h)
    return blocks + fresh


def test_allocate_free_and_ref_counts():
    pool = BlockPool(4, BS)
    a = pool.allocate(3)
    assert sorted(a) == [0, 1, 2]  # block 0 is a normal block
    assert (pool.num_used, pool.num_free, pool.num_cached) == (3, 1, 0)
    assert all(pool.ref_count(b) == 1 for b in a)
    pool.incref([a[0]])
    pool.free(a)
    assert pool.ref_count(a[0]) == 1 and pool.ref_count(a[1]) == 0
    assert (pool.num_used, pool.num_free) == (1, 3)
    pool.free([a[0]])
    assert (pool.num_used, pool.num_free) == (0, 4)
    assert pool.allocate(0) == []


def test_observers_see_every_hash_the_pool_gains_and_loses():
    pool = BlockPool(3, BS)
    seen: list[tuple[bool, tuple[int, ...], str]] = []
    pool.add_observer(lambda stored, hashes, tier: seen.append((stored, tuple(hashes), tier)))
    a = hash_token_blocks(list(range(8)), BS)
    pool.free(fill(pool, list(range(8))))
    assert seen == [(True, (a[0],), "gpu"), (True, (a[1],), "gpu")]
    seen.clear()
    pool.free(fill(pool, list(range(8))))  # a hit commits nothing new
    assert seen == []
    b = hash_token_blocks([9] * 8, BS)
    pool.free(fill(pool, [9] * 8))  # 2 blocks needed, 1 free: a cached block is evicted
    assert seen[0][0] is False and seen[0][1][0] in a
    assert seen[1:] == [(True, (b[0],), "gpu"), (True, (b[1],), "gpu")]
    kept = [h for h in a if h != seen[0][1][0]]
    seen.clear()
    pool.evict_unreferenced()
    assert sorted(h for stored, hs, _ in seen if not stored for h in hs) == sorted([*kept, *b])
    seen.clear()
    pool.publish(True, [a[0]], "cpu")  # a lower tier reports through the same hook
    pool.publish(False, [], "disk")  # nothing to say: observers are not called
    assert seen == [(True, (a[0],), "cpu")]


def test_no_partial_allocation():
    pool = BlockPool(4, BS)
    pool.allocate(3)
    assert pool.can_allocate(1) and not pool.can_allocate(2)
    with pytest.raises(NoFreeBlocksError, match="cannot allocate 2 blocks: 1 of num_blocks 4"):
        pool.allocate(2)
    assert (pool.num_used, pool.num_free) == (3, 1)
    assert issubclass(NoFreeBlocksError, EngineError)


def test_double_free_raises_and_changes_nothing():
    pool = BlockPool(4, BS)
    a, b = pool.allocate(2)
    pool.free([a])
    with pytest.raises(ValueError, match=f"double free: block_id {a} has ref_count 0"):
        pool.free([b, a])
    assert pool.ref_count(b) == 1  # the valid part of the call was not applied
    with pytest.raises(ValueError, match="freed 2 times"):
        pool.free([b, b])
    with pytest.raises(ValueError, match=r"block_id must be in \[0, 4\), got 4"):
        pool.free([4])


def test_incref_refuses_free_blocks():
    pool = BlockPool(2, BS)
    with pytest.raises(ValueError, match="block_id 0 is free"):
        pool.incref([0])


def test_prefix_reuse_and_tenant_separation():
    pool = BlockPool(16, BS)
    tokens = list(range(10))  # two full blocks and a partial one
    first = fill(pool, tokens)
    pool.free(first)
    assert pool.num_cached == 2 and pool.num_used == 0
    hashes = hash_token_blocks(tokens, BS)
    assert [pool.block_hash(b) for b in first] == hashes

    again = pool.match_prefix(hash_token_blocks(tokens + [99] * 6, BS))
    assert again == first
    assert all(pool.ref_count(b) == 1 for b in again) and pool.num_cached == 0
    s = pool.stats()
    assert (s.hits, s.misses, s.hit_tokens) == (2, 2 + 2, 2 * BS)  # first fill missed 2

    assert pool.match_prefix(hash_token_blocks(tokens, BS, salt="other")) == []
    # A diverging first block breaks the chain even though block 2's tokens are equal.
    assert pool.match_prefix(hash_token_blocks([7] + tokens[1:], BS)) == []
    pool.free(again)


def test_shared_block_pinned_by_two_readers():
    pool = BlockPool(8, BS)
    pool.free(fill(pool, list(range(8))))
    x = pool.match_prefix(hash_token_blocks(list(range(8)), BS))
    y = pool.match_prefix(hash_token_blocks(list(range(8)), BS))
    assert x == y and all(pool.ref_count(b) == 2 for b in x)
    pool.free(x)
    assert pool.num_cached == 0
    pool.free(y)
    assert pool.num_cached == 2


def test_commit_keeps_existing_mapping_for_duplicate_content():
    pool = BlockPool(4, BS)
    h = hash_token_blocks([1, 2, 3, 4], BS)[0]
    a, b = pool.allocate(2)
    assert pool.commit(a, h) is True
    assert pool.commit(b, h) is False  # computed twice concurrently: the first one wins
    assert pool.block_hash(b) is None
    assert pool.commit(a, h) is True  # idempotent
    with pytest.raises(ValueError, match=f"block_id {a} already holds hash"):
        pool.commit(a, h + 1)
    pool.free([a, b])
    assert pool.num_cached == 1 and pool.match_prefix([h]) == [a]
    with pytest.raises(ValueError, match=f"block_id {b} is not allocated"):
        pool.commit(b, h + 1)


def test_commit_blocks_commits_each_and_reports_the_stored_ones_at_once():
    pool = BlockPool(6, BS)
    seen: list[tuple[bool, tuple[int, ...], str]] = []
    pool.add_observer(lambda stored, hashes, tier: seen.append((stored, tuple(hashes), tier)))
    h = hash_token_blocks(list(range(16)), BS)
    a, b, c, d = pool.allocate(4)
    pool.commit(a, h[0])
    seen.clear()
    # a: already holds h[0] (nothing new); d: h[1] is b's by then (stays unhashed).
    pool.commit_blocks([a, b, c, d], [h[0], h[1], h[2], h[1]])
    assert seen == [(True, (h[1], h[2]), "gpu")]
    assert [pool.block_hash(x) for x in (a, b, c, d)] == [h[0], h[1], h[2], None]
    pool.free([a, b, c, d])
    assert pool.match_prefix(h) == [a, b, c]
    with pytest.raises(ValueError, match=f"block_id {d} is not allocated"):
        pool.commit_blocks([d], [h[3]])


def test_eviction_when_full_takes_only_unreferenced_blocks():
    pool = BlockPool(4, BS, policy="lru")
    old = fill(pool, list(range(8)))  # 2 blocks
    pinned = fill(pool, list(range(100, 104)))  # 1 block, kept running
    pool.free(old)
    assert (pool.num_used, pool.num_cached, pool.num_free) == (1, 2, 3)
    fresh = pool.allocate(3)
    assert set(fresh) & set(pinned) == set()
    assert set(old) <= set(fresh)
    s = pool.stats()
    assert s.evictions == 2 and s.blocks_cached == 0 and s.blocks_used == 4
    assert pool.block_hash(pinned[0]) is not None
    assert all(pool.block_hash(b) is None for b in fresh)
    assert pool.match_prefix(hash_token_blocks(list(range(8)), BS)) == []
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)


def test_eviction_drops_the_tail_of_a_prefix_first():
    pool = BlockPool(3, BS, policy="lru")
    tokens = list(range(12))
    pool.free(fill(pool, tokens))
    pool.allocate(1)
    # The last block was released first, so it is the least recent: the head survives.
    assert len(pool.match_prefix(hash_token_blocks(tokens, BS))) == 2


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_deferred_prefix_hits_give_the_policy_the_same_events(policy):
    """match_prefix tells the policy later (apply_deferred_hits); a pool that is never told
    explicitly evicts exactly what one told after every match evicts, and never a matched block."""
    evicted: dict[str, list[int]] = {"now": [], "later": []}
    pools = {}
    for name in evicted:
        pools[name] = BlockPool(6, BS, policy=policy)
        pools[name].add_observer(lambda stored, hashes, tier, name=name: evicted[name].extend(
            [] if stored else hashes))
    # The third reuses the first's blocks, the least recently used, and needs one more: an
    # eviction that must not take them.
    prompts = [list(range(12)), list(range(100, 112)), list(range(12)) + [7] * 4, [60] * 8, list(range(4)) + [70] * 8]
    for tokens in prompts:
        for name, pool in pools.items():
            hashes = hash_token_blocks(tokens, BS)
            matched = pool.match_prefix(hashes)
            if name == "now":
                pool.apply_deferred_hits()
            fresh = pool.allocate(len(hashes) - len(matched))  # evicts: applies the deferred hits first
            assert all(pool.block_hash(b) == h for b, h in zip(matched, hashes, strict=False))
            for block, h in zip(fresh, hashes[len(matched) :], strict=True):
                pool.commit(block, h)
            pool.free(matched + fresh)
    assert evicted["now"] == evicted["later"] and evicted["now"]
    assert pools["now"].stats() == pools["later"].stats()
    assert pools["later"].policy.num_evictable == pools["later"].num_cached


def test_evict_unreferenced_clears_cache_only():
    pool = BlockPool(8, BS)
    pool.free(fill(pool, list(range(12))))
    kept = fill(pool, list(range(50, 54)))
    assert pool.evict_unreferenced() == 3
    assert pool.num_cached == 0 and pool.num_free == 7 and pool.stats().evictions == 0
    assert pool.match_prefix(hash_token_blocks(list(range(12)), BS)) == []
    assert pool.block_hash(kept[0]) is not None and len(pool.policy) == 1


def test_prefix_caching_disabled():
    pool = BlockPool(4, BS, enable_prefix_caching=False)
    blocks = fill(pool, list(range(8)))
    assert all(pool.block_hash(b) is None for b in blocks)
    pool.free(blocks)
    assert pool.num_cached == 0 and pool.num_free == 4
    assert pool.match_prefix(hash_token_blocks(list(range(8)), BS)) == []
    assert pool.stats().misses == 0


def test_stats_snapshot():
    pool = BlockPool(8, BS, policy="arc")
    pool.free(fill(pool, list(range(8))))
    pool.free(fill(pool, list(range(12))))
    s = pool.stats()
    assert isinstance(s, BlockPoolStats)
    assert s.blocks_used + s.blocks_free == s.num_blocks == 8
    assert (s.hits, s.misses, s.blocks_cached, s.policy) == (2, 3, 3, "arc")
    assert s.hit_rate == pytest.approx(2 / 5)
    d = s.to_dict()
    assert d["hit_rate"] == pytest.approx(0.4) and d["hit_tokens"] == 2 * BS
    assert set(d) >= {"hits", "misses", "evictions", "blocks_used", "blocks_free", "policy"}
    assert BlockPool(2, BS).stats().hit_rate == 0.0


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        BlockPool(0, BS)
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        BlockPool(2, 0)
    with pytest.raises(ValueError, match="eviction_policy must be one of"):
        BlockPool(2, BS, policy="random")


class PoolMachine(RuleBasedStateMachine):
    """Random interleavings of the scheduler's calls never break the pool's invariants."""

    def __init__(self):
        super().__init__()
        self.pool: BlockPool | None = None
        self.held: list[list[int]] = []  # one block table per running "sequence"
        self.refs: dict[int, int] = {}  # expected ref counts

    @precondition(lambda self: self.pool is None)
    @rule(policy=st.sampled_from(EVICTION_POLICIES), num_blocks=st.integers(1, 12),
          caching=st.booleans())
    def create(self, policy, num_blocks, caching):
        self.pool = BlockPool(num_blocks, BS, policy, enable_prefix_caching=caching)

    @precondition(lambda self: self.pool is not None)
    @rule(prompt=st.lists(st.integers(0, 2), min_size=0, max_size=5),
          salt=st.sampled_from(["", "t"]))
    def run_request(self, prompt, salt):
        # Prompts from a tiny alphabet in whole blocks so prefixes collide often.
        tokens = [t for x in prompt for t in [x] * BS]
        hashes = hash_token_blocks(tokens, BS, salt)
        before = self.pool.stats()
        matched = self.pool.match_prefix(hashes)
        after = self.pool.stats()
        assert after.hits - before.hits == len(matched)
        assert after.hits + after.misses - before.hits - before.misses == (
            len(hashes) if self.pool.enable_prefix_caching else 0)
        for block, h in zip(matched, hashes, strict=False):
            assert self.pool.block_hash(block) == h
        need = len(hashes) - len(matched)
        if not self.pool.can_allocate(need):
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate(need)
            self.pool.free(matched)
            return
        fresh = self.pool.allocate(need)
        assert all(self.pool.ref_count(b) == 1 for b in fresh)
        for block, h in zip(fresh, hashes[len(matched):], strict=True):
            self.pool.commit(block, h)
        table = matched + fresh
        for block in table:
            self.refs[block] = self.refs.get(block, 0) + 1
        self.held.append(table)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 100))
    def finish(self, index):
        table = self.held.pop(index % len(self.held))
        self.pool.free(table)
        for block in table:
            self.refs[block] -= 1

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 100))
    def share(self, index):
        table = self.held[index % len(self.held)]
        self.pool.incref(table)
        self.held.append(list(table))
        for block in table:
            self.refs[block] += 1

    @precondition(lambda self: self.pool is not None)
    @rule()
    def clear_cache(self):
        cached = self.pool.num_cached
        assert self.pool.evict_unreferenced() == cached
        assert self.pool.num_cached == 0

    @precondition(lambda self: self.pool is not None)
    @rule(block=st.integers(0, 11))
    def double_free_is_refused(self, block):
        if block < self.pool.num_blocks and self.refs.get(block, 0) == 0:
            with pytest.raises(ValueError):
                self.pool.free([block])

    @invariant()
    def consistent(self):
        pool = self.pool
        if pool is None:
            return
        refs = [pool.ref_count(b) for b in range(pool.num_blocks)]
        assert all(r >= 0 for r in refs)
        assert refs == [self.refs.get(b, 0) for b in range(pool.num_blocks)]
        used = sum(r > 0 for r in refs)
        hashed_idle = sum(r == 0 and pool.block_hash(b) is not None for b, r in enumerate(refs))
        assert pool.num_used == used
        assert pool.num_cached == hashed_idle
        assert pool.num_used + pool.num_free == pool.num_blocks
        # Free-list blocks are exactly the idle unhashed ones: none is both free and used.
        free_list = list(pool._free)
        assert len(free_list) == len(set(free_list)) == pool.num_free - pool.num_cached
        assert all(refs[b] == 0 and pool.block_hash(b) is None for b in free_list)
        # Every registered hash maps to one block, and the policy tracks exactly those.
        hashes = [pool.block_hash(b) for b in range(pool.num_blocks)]
        registered = [h for h in hashes if h is not None]
        assert len(registered) == len(set(registered)) == len(pool.policy)
        assert pool.policy.num_evictable == pool.num_cached
        s = pool.stats()
        assert s.blocks_used + s.blocks_free == s.num_blocks


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_pool_state_machine = PoolMachine.TestCase
