"""The load-or-recompute cost model of the KV tiers (node/kv/tier_cost.py), alone."""

from __future__ import annotations

import pytest
from ultrakv.node.kv.tier_cost import Ewma, LinearFit, TierCostModel

BLOCK = 512 << 10  # llama-1b's 16-token block


def _model(memory_gbps: float, disk_gbps: float, prefill_tps: float) -> TierCostModel:
    m = TierCostModel(BLOCK, 16)
    m.observe_load("memory", int(memory_gbps * 1e9), 1.0)
    m.observe_load("disk", int(disk_gbps * 1e9), 1.0)
    m.observe_prefill(int(prefill_tps), 1.0)
    return m


def test_everything_loads_until_the_prefill_is_measured():
    m = TierCostModel(BLOCK, 16)
    m.observe_load("disk", BLOCK, 10.0)  # a very slow disk, but nothing to weigh it against
    assert m.blocks_to_load(["disk"] * 5) == 5
    m.observe_prefill(100_000, 1.0)
    assert m.blocks_to_load(["disk"] * 5) == 0


def test_disk_blocks_slower_than_their_prefill_are_recomputed():
    # An H100 on llama-1b: 100k prompt tokens/s = 0.16 ms per block; a disk read at 1 GB/s
    # = 0.52 ms per block, host memory at 20 GB/s = 0.026 ms.
    m = _model(memory_gbps=20, disk_gbps=1, prefill_tps=100_000)
    assert m.load_seconds("memory") < m.recompute_seconds() < m.load_seconds("disk")
    assert m.blocks_to_load(["memory", "memory", "disk", "disk"]) == 2
    assert m.blocks_to_load(["disk", "disk"]) == 0
    # A CPU engine prefills ~10k tokens/s: then the same disk is worth reading.
    slow = _model(memory_gbps=20, disk_gbps=1, prefill_tps=10_000)
    assert slow.blocks_to_load(["memory", "memory", "disk", "disk"]) == 4


def test_the_cheapest_prefix_wins_not_the_first_block():
    """A disk block a bit slower than its prefill, followed by blocks in memory: loading all
    of them beats recomputing all (a greedy rule stopping at the first loss would not)."""
    m = _model(memory_gbps=20, disk_gbps=1, prefill_tps=40_000)  # 0.4 ms per block recomputed
    assert m.load_seconds("disk") > m.recompute_seconds()
    assert m.blocks_to_load(["disk", "memory", "memory", "memory"]) == 4
    assert m.blocks_to_load(["memory", "disk", "disk", "disk"]) == 1


def test_estimates_follow_recent_measurements():
    e = Ewma(0.2)
    e.add(1.0)
    assert e.value == 1.0
    for _ in range(30):
        e.add(4.0)
    assert e.value == pytest.approx(4.0, rel=1e-2)
    m = TierCostModel(BLOCK, 16)
    m.observe_load("disk", BLOCK, 0.0)  # a zero-length measurement carries nothing
    assert m.bandwidth["disk"].value is None
    m.observe_load("disk", BLOCK, 0.001)
    assert m.load_seconds("disk") == pytest.approx(0.001)
    stats = m.stats()
    assert stats["disk_gbps"] == pytest.approx(BLOCK / 0.001 / 1e9) and stats["prefill_tokens_per_s"] is None


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="block_bytes and block_tokens must be >= 1"):
        TierCostModel(0, 16)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        TierCostModel(BLOCK, 16, alpha=0)
    with pytest.raises(ValueError, match="source must be one of"):
        TierCostModel(BLOCK, 16).observe_load("tape", 1, 1.0)


def test_recompute_costs_the_marginal_prefill_not_the_steps_fixed_part():
    """Steps of 64 and 352 prompt tokens at 3 ms + 10 us per token: recomputing a 16-token
    block costs 0.16 ms. Tokens / seconds of the small steps would say 0.75 ms and make a
    0.5 ms disk load look worth it."""
    m = TierCostModel(BLOCK, 16)
    m.observe_load("memory", 20 * BLOCK, 0.001)
    m.observe_load("disk", BLOCK, 0.0005)
    for tokens in (64, 352) * 10:
        m.observe_prefill(tokens, 0.003 + 1e-5 * tokens)
    assert m.recompute_seconds() == pytest.approx(16e-5, rel=1e-6)
    assert m.blocks_to_load(["disk"] * 4) == 0
    assert m.blocks_to_load(["memory"] * 4) == 4
    one_size = TierCostModel(BLOCK, 16)  # no spread in sizes: the mean time per token stands in
    one_size.observe_prefill(64, 0.00364)
    assert one_size.recompute_seconds() == pytest.approx(16 * 0.00364 / 64)
    assert LinearFit().slope() is None


def test_a_noisy_fit_neither_frees_recompute_nor_inflates_it():
    """Step times that fall as steps grow (a machine whose load dropped meanwhile) fit a
    negative slope: the estimate stays at a quarter of the mean time per token."""
    m = TierCostModel(BLOCK, 16)
    for tokens, seconds in ((64, 0.010), (352, 0.004)) * 10:
        m.observe_prefill(tokens, seconds)
    mean = m.prefill.y / m.prefill.x  # the weighted mean time per token
    assert 0.004 / 352 < mean < 0.010 / 64
    assert m.recompute_seconds() == pytest.approx(16 * mean / 4)


def test_the_engine_threads_time_per_block_counts_against_a_load():
    """An H100 on llama-1b (cost model figures measured there): host memory at 37 GB/s is 14
    us a block, recomputing one 34 us. A copy that fast still loses once looking the block
    up and issuing its copy takes the engine thread 25 us a block: that time was measured
    nowhere, and loads that made TTFT worse were chosen as savings."""
    m = _model(memory_gbps=37, disk_gbps=1, prefill_tps=465_000)
    assert m.blocks_to_load(["memory"] * 8) == 8
    m.observe_overhead(8, 8 * 25e-6)
    assert m.load_seconds("memory") == pytest.approx(BLOCK / 37e9 + 25e-6)
    assert m.blocks_to_load(["memory"] * 8) == 0
    assert m.stats()["load_overhead_block_ms"] == pytest.approx(0.025)


def test_one_stalled_load_does_not_make_every_load_look_dear():
    m = _model(memory_gbps=37, disk_gbps=1, prefill_tps=465_000)
    m.observe_overhead(8, 8 * 2e-6)
    m.observe_overhead(1, 0.05)  # a load that stalled 50 ms (a collection, say)
    assert m.load_seconds("memory") < m.recompute_seconds()
    assert m.blocks_to_load(["memory"] * 8) == 8
