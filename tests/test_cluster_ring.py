"""Consistent-hash ring: movement on join/leave, bounded loads, cross-process stability."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import pytest
from ultrakv.cluster.ring import (
    BoundedLoadRouter,
    EmptyRingError,
    HashRing,
    bounded_lookup,
    diff,
    route_key_for_prompt,
    stable_hash64,
)

N_KEYS = 100_000
KEYS = [f"session-{i}" for i in range(N_KEYS)]
MOVE_TOLERANCE = 0.25  # relative, on the expected 1/(N+1)


def _nodes(n: int) -> list[str]:
    return [f"node-{i}" for i in range(n)]


@pytest.mark.parametrize("n", range(3, 9))
def test_adding_a_node_moves_about_one_over_n_plus_one(n: int) -> None:
    old = HashRing(_nodes(n))
    new = old.with_node(f"node-{n}")
    moved = diff(old, new, KEYS)
    fraction = len(moved) / N_KEYS
    expected = 1 / (n + 1)
    print(
        f"\nN={n}->{n + 1}: moved {len(moved)}/{N_KEYS} = {fraction:.4f}, "
        f"expected {expected:.4f} (+-{MOVE_TOLERANCE:.0%} relative)"
    )
    assert abs(fraction - expected) <= MOVE_TOLERANCE * expected
    # Every moved key moves onto the new node, never between old nodes.
    assert {after for _, after in moved.values()} == {f"node-{n}"}
    assert new.epoch == old.epoch + 1


def test_removing_a_node_moves_only_its_keys() -> None:
    old = HashRing(_nodes(5))
    new = old.without_node("node-2")
    moved = diff(old, new, KEYS[:20_000])
    owned = sum(1 for k in KEYS[:20_000] if old.lookup(k) == "node-2")
    assert len(moved) == owned > 0
    assert all(before == "node-2" for before, _ in moved.values())
    assert "node-2" not in new and new.epoch == old.epoch + 1


@pytest.mark.parametrize(("eps", "vnodes"), [(0.1, 128), (0.25, 128), (0.1, 8)])
def test_bounded_loads_cap_the_maximum(eps: float, vnodes: int) -> None:
    # vnodes=8 makes plain consistent hashing lopsided, so the bound has work to do.
    ring = HashRing(_nodes(5), vnodes=vnodes)
    router = BoundedLoadRouter(ring, eps=eps)
    for k in KEYS:
        router.assign(k)
    loads = router.loads()
    avg = N_KEYS / len(ring)
    bound = math.ceil((1 + eps) * avg)
    plain = Counter(ring.lookup(k) for k in KEYS)
    print(
        f"\neps={eps} vnodes={vnodes}: bounded max {max(loads.values())} "
        f"(bound {bound}, avg {avg:.0f}); "
        f"plain consistent hashing max {max(plain.values())}; loads {sorted(loads.values())}"
    )
    assert sum(loads.values()) == N_KEYS
    assert max(loads.values()) <= bound
    if vnodes == 8:
        assert max(plain.values()) > bound  # the unbounded ring would break the bound
    # Sticky: a key assigned once keeps its node.
    assert router.assign(KEYS[123]) == router.owner(KEYS[123])
    assert sum(router.loads().values()) == N_KEYS


def test_bounded_lookup_skips_full_nodes_and_release_frees() -> None:
    ring = HashRing(_nodes(3))
    key = "s-1"
    natural = ring.lookup(key)
    loads = {n: 0 for n in ring.nodes}
    loads[natural] = 100
    chosen = bounded_lookup(ring, key, loads, eps=0.25)
    assert chosen != natural and chosen == ring.lookup_n(key, 2)[1]
    router = BoundedLoadRouter(ring, eps=0.25)
    node = router.assign(key)
    router.release(key)
    assert router.loads()[node] == 0 and router.owner(key) is None


def test_lookup_n_is_distinct_and_starts_at_the_owner() -> None:
    ring = HashRing(_nodes(4))
    for k in KEYS[:2000]:
        succ = ring.lookup_n(k, 3)
        assert len(succ) == len(set(succ)) == 3
        assert succ[0] == ring.lookup(k)
    assert sorted(ring.lookup_n("x", 10)) == sorted(ring.nodes)  # capped at the node count


def test_weights_shift_share() -> None:
    ring = HashRing({"big": 3.0, "small": 1.0})
    share = Counter(ring.lookup(k) for k in KEYS[:20_000])["big"] / 20_000
    assert 0.65 < share < 0.85


_CHILD = """
import json, sys
from ultrakv.cluster.ring import HashRing, route_key_for_prompt
ring = HashRing([f"node-{i}" for i in range(6)])
keys = [f"session-{i}" for i in range(0, 100000, 7)]
print(json.dumps({
    "owners": [ring.lookup(k) for k in keys],
    "succ": [ring.lookup_n(k, 2) for k in keys[:500]],
    "prefix": route_key_for_prompt([5, 6, 7, 8], 2),
}))
"""


def test_same_routing_in_another_process() -> None:
    # A different PYTHONHASHSEED proves we do not lean on Python's salted hash().
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    child = json.loads(out.stdout)
    ring = HashRing([f"node-{i}" for i in range(6)])
    keys = [f"session-{i}" for i in range(0, 100000, 7)]
    assert child["owners"] == [ring.lookup(k) for k in keys]
    assert child["succ"] == [ring.lookup_n(k, 2) for k in keys[:500]]
    assert child["prefix"] == route_key_for_prompt([5, 6, 7, 8], 2)


def test_route_key_for_prompt_uses_only_the_first_block() -> None:
    a = route_key_for_prompt([1, 2, 3, 4, 99], block_size=4)
    b = route_key_for_prompt([1, 2, 3, 4, 7, 7, 7], block_size=4)
    c = route_key_for_prompt([1, 2, 3, 5], block_size=4)
    assert a == b != c
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        route_key_for_prompt([1], 0)


def test_hash_is_fixed_and_empty_ring_errors() -> None:
    # Pinned value: a change here would reroute every session in a running cluster.
    assert stable_hash64("session-0") == stable_hash64(b"session-0") == 13141386955394713551
    with pytest.raises(EmptyRingError, match="ring has no nodes"):
        HashRing([]).lookup("s")
    with pytest.raises(ValueError, match="already on the ring"):
        HashRing(["a"]).with_node("a")
