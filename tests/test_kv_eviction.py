"""Eviction policies: order, pinning, ARC adaptation, and hit rates on a scan-polluted trace."""

import random
from collections import OrderedDict

import pytest
import torch
from ultrakv.client.config_file import load_config
from ultrakv.node.config import EVICTION_POLICIES, EngineConfig
from ultrakv.node.kv.block_pool import BlockPool
from ultrakv.node.kv.eviction import (
    POLICIES,
    ARCPolicy,
    EvictionPolicy,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    make_policy,
)
from ultrakv.node.kv.host_tier import HostTier


def cached(policy: EvictionPolicy, *keys: int) -> EvictionPolicy:
    """Insert each key and release it at once, as a finished one-block request would."""
    for key in keys:
        policy.on_insert(key)
        policy.set_evictable(key, True)
    return policy


def drain(policy: EvictionPolicy) -> list[int]:
    order = []
    while (key := policy.victim()) is not None:
        order.append(key)
    return order


def test_make_policy_names_and_errors():
    assert set(POLICIES) == set(EVICTION_POLICIES)
    for name in EVICTION_POLICIES:
        policy = make_policy(name, 4)
        assert policy.name == name and policy.capacity == 4
    with pytest.raises(ValueError, match=r"eviction_policy must be one of .*'lru'.*got 'mru'"):
        make_policy("mru", 4)
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        make_policy("lru", 0)


def test_lru_evicts_least_recent():
    policy = cached(LRUPolicy(8), 1, 2, 3, 4)
    policy.on_hit(1)
    policy.on_hit(3)
    assert drain(policy) == [2, 4, 1, 3]
    assert len(policy) == 0


def test_lfu_evicts_least_frequent_ties_by_recency():
    policy = cached(LFUPolicy(8), 1, 2, 3, 4)
    for key, hits in ((1, 3), (2, 1), (3, 1)):
        for _ in range(hits):
            policy.on_hit(key)
    # 4 used once; 2 and 3 used twice (2 less recently); 1 used four times.
    assert drain(policy) == [4, 2, 3, 1]


def test_fifo_ignores_hits():
    policy = cached(FIFOPolicy(8), 5, 6, 7)
    policy.on_hit(5)
    policy.on_hit(5)
    assert drain(policy) == [5, 6, 7]


def test_fifo_keeps_insertion_order_across_pin_and_release():
    policy = cached(FIFOPolicy(8), 1, 2, 3)
    policy.set_evictable(1, False)
    policy.set_evictable(1, True)
    assert drain(policy) == [1, 2, 3]


@pytest.mark.parametrize("name", EVICTION_POLICIES)
def test_pinned_keys_are_never_victims(name):
    policy = make_policy(name, 8)
    cached(policy, 1, 2, 3, 4)
    policy.set_evictable(1, False)
    policy.set_evictable(3, False)
    policy.on_insert(5)  # inserted keys start pinned
    assert policy.num_evictable == 2 and len(policy) == 5
    assert sorted(drain(policy)) == [2, 4]
    assert policy.victim() is None
    assert 1 in policy and 3 in policy and 5 in policy and 2 not in policy
    policy.set_evictable(3, True)
    assert policy.victim() == 3


@pytest.mark.parametrize("name", EVICTION_POLICIES)
def test_release_counts_as_use_and_discard_forgets(name):
    policy = cached(make_policy(name, 8), 1, 2, 3)
    policy.discard(2)
    assert 2 not in policy and len(policy) == 2
    with pytest.raises(KeyError):
        policy.on_hit(2)
    with pytest.raises(KeyError):
        policy.set_evictable(2, True)
    with pytest.raises(ValueError, match="already resident"):
        policy.on_insert(1)
    assert sorted(drain(policy)) == [1, 3]


@pytest.mark.parametrize("name", EVICTION_POLICIES)
def test_a_lookups_hits_in_one_call_equal_them_one_by_one(name):
    """``on_hits`` (a returning turn's blocks in one pass) leaves a policy as ``on_hit`` and,
    for the keys pinned now, ``set_evictable(key, False)`` one key at a time would: the same
    victims in the same order once they are released, whichever were pinned before or now."""
    rng = random.Random(3)
    for trial in range(20):
        one, bulk = make_policy(name, 64), make_policy(name, 64)
        keys = list(range(40))
        rng.shuffle(keys)
        pinned = set(rng.sample(keys, rng.choice([0, 5, 40])))  # held by other readers
        for p in (one, bulk):
            cached(p, *keys)
            for key in pinned:
                p.set_evictable(key, False)
        hits = rng.sample(keys, 25)
        flags = ([True] * len(hits) if trial % 3 == 0 else [rng.random() < 0.5 for _ in hits] if trial % 3 == 1
                 else [key not in pinned for key in hits])
        for key, pin in zip(hits, flags, strict=True):
            one.on_hit(key)
            if pin:
                one.set_evictable(key, False)
        bulk.on_hits(hits, flags)
        assert (one.num_evictable, len(one)) == (bulk.num_evictable, len(bulk))
        held = pinned | {key for key, pin in zip(hits, flags, strict=True) if pin}
        for key in keys:  # every reader lets go
            if key in held:
                for p in (one, bulk):
                    p.set_evictable(key, True)
        assert drain(one) == drain(bulk)


def test_heap_policies_stay_bounded_under_many_hits():
    # Lazy deletion leaves stale heap entries; compaction must keep the heap O(resident).
    policy = cached(LFUPolicy(4), 1, 2)
    for _ in range(10_000):
        policy.on_hit(1)
    assert len(policy._heap) <= 2 * policy.num_evictable + 65
    assert drain(policy) == [2, 1]


def test_arc_promotes_to_t2_on_second_reference():
    arc = cached(ARCPolicy(4), 1, 2, 3)
    assert (arc.t1_size, arc.t2_size) == (3, 0)
    arc.on_hit(2)
    assert (arc.t1_size, arc.t2_size) == (2, 1)
    # p = 0: T1 is over target, so its LRU goes first; T2 only when T1 has nothing left.
    assert drain(arc) == [1, 3, 2]
    assert arc.ghosts() == ([1, 3], [2])


def test_arc_ghost_hits_adapt_p_and_reinsert_into_t2():
    arc = cached(ARCPolicy(2), 1, 2)
    assert arc.victim() == 1  # 1 becomes a B1 ghost
    assert arc.ghosts() == ([1], [])
    arc.on_miss(1)
    assert arc.p == 1.0  # a B1 ghost hit grows T1's target
    cached(arc, 1)
    assert (arc.t1_size, arc.t2_size) == (1, 1) and arc.ghosts() == ([], [])
    # T1 holds 1 <= p, so the victim comes from T2 (key 1, the only T2 member).
    assert arc.victim() == 1
    assert arc.ghosts() == ([], [1])
    arc.on_miss(1)
    assert arc.p == 0.0  # a B2 ghost hit shrinks it again
    arc.on_miss(99)  # an unknown miss changes nothing
    assert arc.p == 0.0


def test_arc_ghost_lists_are_bounded():
    c = 8
    arc = ARCPolicy(c)
    rng = random.Random(0)
    for _ in range(2000):
        key = rng.randrange(40)
        if key in arc:
            arc.on_hit(key)
        else:
            arc.on_miss(key)
            if len(arc) == c:
                arc.victim()
            cached(arc, key)
        b1, b2 = arc.ghosts()
        assert arc.t1_size + len(b1) <= c
        assert len(arc) + len(b1) + len(b2) <= 2 * c
        assert 0.0 <= arc.p <= c
    assert arc.ghosts() != ([], [])


def _reference_arc_hits(trace: list[int], c: int) -> int:
    """ARC exactly as Fig. 4 of Megiddo & Modha (FAST 2003) states it, for comparison."""
    t1, t2, b1, b2 = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()
    p = 0.0
    hits = 0

    def replace(x):
        if t1 and ((x in b2 and len(t1) == p) or len(t1) > p):
            b1[t1.popitem(last=False)[0]] = None
        else:
            b2[t2.popitem(last=False)[0]] = None

    for x in trace:
        if x in t1 or x in t2:
            hits += 1
            t1.pop(x, None)
            t2[x] = None
            t2.move_to_end(x)
        elif x in b1:
            p = min(c, p + max(len(b2) / len(b1), 1))
            replace(x)
            del b1[x]
            t2[x] = None
        elif x in b2:
            p = max(0, p - max(len(b1) / len(b2), 1))
            replace(x)
            del b2[x]
            t2[x] = None
        else:
            if len(t1) + len(b1) == c:
                if len(t1) < c:
                    b1.popitem(last=False)
                    replace(x)
                else:
                    t1.popitem(last=False)
            elif len(t1) + len(t2) + len(b1) + len(b2) >= c:
                if len(t1) + len(t2) + len(b1) + len(b2) == 2 * c:
                    b2.popitem(last=False)
                replace(x)
            t1[x] = None
    return hits


def mixed_trace(seed: int, n: int = 6000, hot: int = 32, scan: int = 200, p_hot: float = 0.3):
    """A hot set re-referenced at random, interleaved with a cyclic scan longer than the cache."""
    rng = random.Random(seed)
    trace, position = [], 0
    for _ in range(n):
        if rng.random() < p_hot:
            trace.append(rng.randrange(hot))
        else:
            trace.append(1000 + position % scan)
            position += 1
    return trace


def run_through_pool(policy: str, trace: list[int], num_blocks: int) -> BlockPool:
    """Each trace item is a one-block request: reuse the cached block or fill a fresh one."""
    pool = BlockPool(num_blocks, block_size=16, policy=policy)
    for key in trace:
        blocks = pool.match_prefix([key])
        if not blocks:
            blocks = pool.allocate(1)
            pool.commit(blocks[0], key)
        pool.free(blocks)
    return pool


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arc_in_the_pool_matches_the_paper(seed):
    rng = random.Random(seed)
    trace = [rng.choice([rng.randrange(20), rng.randrange(200)]) for _ in range(3000)]
    trace += mixed_trace(seed, n=2000)
    pool = run_through_pool("arc", trace, num_blocks=16)
    assert pool.stats().hits == _reference_arc_hits(trace, 16)


def test_arc_beats_lru_on_scan_with_hot_set():
    trace = mixed_trace(seed=0)
    rates = {name: run_through_pool(name, trace, 64).stats().hit_rate for name in EVICTION_POLICIES}
    print("\nhit rate, 64-block pool, hot set 32 (30%) + cyclic scan of 200 (70%):")
    print(f"{'policy':<8}{'hit rate':>9}")
    for name, rate in rates.items():
        print(f"{name:<8}{rate:>9.3f}")
    assert rates["arc"] > rates["lru"] + 0.05
    assert rates["lfu"] > rates["lru"]  # frequency also protects the hot set
    assert rates["arc"] <= 0.3 + 0.02  # only hot-set references can hit


def test_s3fifo_evicts_one_hit_wonders_from_small_and_keeps_main():
    policy = S3FIFOPolicy(10)  # S's share is 1 key; M's and G's 9
    assert policy.small_target == 1 and policy.ghost_capacity == 9
    cached(policy, 1, 2)
    policy.on_hit(1)
    assert policy.victim() == 2  # 1 was hit in S: it moves on to M; 2 was not: evicted
    cached(policy, 3, 4, 5)  # one-hit wonders: inserted, never hit again
    assert [policy.victim() for _ in range(3)] == [3, 4, 5]  # S is at its share each time
    small, main, ghost = policy.queues()
    assert main == [1] and small == [] and ghost == [2, 3, 4, 5]


def test_s3fifo_promotes_keys_hit_in_small_and_gives_main_keys_a_second_round():
    policy = cached(S3FIFOPolicy(10), 1, 2, 3)
    policy.on_hit(2)
    # 1 was never hit: evicted. 2 was hit: moved to M with its frequency reset, not evicted.
    assert policy.victim() == 1
    assert policy.victim() == 3
    small, main, ghost = policy.queues()
    assert (small, main, ghost) == ([], [2], [1, 3])
    cached(policy, 5)
    policy.on_hit(2)
    # S is at its share: 5 goes first; then M's 2 comes round once (frequency 1 -> 0), then goes.
    assert drain(policy) == [5, 2]
    assert policy.queues()[2] == [1, 3, 5]


def test_s3fifo_ghost_hit_enters_main():
    policy = cached(S3FIFOPolicy(10), 1, 2)
    assert policy.victim() == 1
    assert policy.queues()[2] == [1]
    cached(policy, 1)  # back from its ghost: straight into M, the ghost is dropped
    small, main, ghost = policy.queues()
    assert small == [2] and main == [1] and ghost == []
    cached(policy, 3, 4)
    # S (2, 3, 4) is over its share: all three go before M's 1.
    assert drain(policy) == [2, 3, 4, 1]


def test_s3fifo_pinned_key_at_the_tail_waits_and_ghosts_are_bounded():
    policy = cached(S3FIFOPolicy(10), 1, 2)
    policy.set_evictable(1, False)
    assert policy.victim() == 2 and 1 in policy
    policy.set_evictable(1, True)
    assert policy.victim() == 1
    for key in range(100, 140):
        cached(policy, key)
        policy.victim()
    assert len(policy.queues()[2]) == policy.ghost_capacity
    assert policy.num_evictable == len(policy)


def test_s3fifo_beats_lru_and_fifo_on_one_hit_wonders_with_a_hot_set():
    trace = mixed_trace(seed=0)
    rates = {name: run_through_pool(name, trace, 64).stats().hit_rate
             for name in ("lru", "fifo", "s3fifo")}
    assert rates["s3fifo"] > max(rates["lru"], rates["fifo"]) + 0.1
    assert rates["s3fifo"] <= 0.3 + 0.02  # only hot-set references can hit


def test_s3fifo_is_selectable_for_the_pool_and_each_tier(tmp_path):
    config_file = tmp_path / "node.yaml"
    config_file.write_text("engine:\n  eviction_policy: s3fifo\n  kv_cpu_eviction_policy: s3fifo\n"
                           "  kv_disk_eviction_policy: s3fifo\n")
    engine = load_config(config_file).engine
    assert (engine.eviction_policy, engine.kv_cpu_eviction_policy,
            engine.kv_disk_eviction_policy) == ("s3fifo", "s3fifo", "s3fifo")
    assert isinstance(BlockPool(8, 16, engine.eviction_policy).policy, S3FIFOPolicy)
    host = HostTier(4, (1,), torch.float32, engine.kv_cpu_eviction_policy)
    assert isinstance(host.policy, S3FIFOPolicy)
    with pytest.raises(ValueError, match=r"kv_cpu_eviction_policy must be one of .*'s3fifo'"):
        EngineConfig(kv_cpu_eviction_policy="s4fifo")
