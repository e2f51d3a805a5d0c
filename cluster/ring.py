"""Consistent hashing over session ids: virtual nodes, successors, bounded loads, ring diffs.

Pure logic, no I/O. Every coordinator process must route a session id to the same node, so
the hash is a fixed 64-bit BLAKE2b digest (never Python's salted ``hash()``).

Bounded loads follow Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded
Loads" (SODA 2018): a key walks clockwise from its hash point and takes the first node whose
load is below ``ceil((1 + eps) * (total + 1) * weight / total_weight)``, so no node ends above
``(1 + eps)`` times its fair share.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType

DEFAULT_VNODES = 128


def stable_hash64(data: str | bytes) -> int:
    """A 64-bit hash that is identical in every process, machine and Python version."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def route_key_for_prompt(token_ids: Sequence[int], block_size: int) -> str:
    """Routing key for a request without a session id: the hash of its first prompt block.

    Requests that share a first block (a system prompt, a few-shot preamble) meet on one node,
    where the prefix is already cached. A prompt shorter than a block hashes what it has.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if len(token_ids) == 0:
        raise ValueError("token_ids must not be empty")
    block = list(token_ids[:block_size])
    digest = stable_hash64(struct.pack(f"<{len(block)}Q", *block))
    return f"prefix:{digest:016x}"


class EmptyRingError(LookupError):
    """A lookup on a ring that has no nodes."""

    def __init__(self) -> None:
        super().__init__("ring has no nodes: no node is registered and serving")


class HashRing:
    """An immutable consistent-hash ring.

    ``weights`` maps node id to a relative weight (1.0 = ``vnodes`` points on the ring).
    ``epoch`` numbers ring versions; ``with_node``/``without_node`` return a ring one epoch
    later, and the membership watcher sets it from the epoch recorded in etcd.
    """

    __slots__ = ("weights", "vnodes", "epoch", "_points", "_owners")

    def __init__(
        self,
        nodes: Iterable[str] | Mapping[str, float] = (),
        vnodes: int = DEFAULT_VNODES,
        epoch: int = 0,
    ):
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        if isinstance(nodes, Mapping):
            weights = {str(n): float(w) for n, w in nodes.items()}
        else:
            weights = {}
            for n in nodes:
                if n in weights:
                    raise ValueError(f"node id {n!r} appears twice")
                weights[str(n)] = 1.0
        for n, w in weights.items():
            if not n:
                raise ValueError("node id must be a non-empty string")
            if not w > 0:
                raise ValueError(f"weight of node {n!r} must be > 0, got {w}")
        points: list[tuple[int, str]] = []
        for n, w in weights.items():
            for i in range(max(1, round(vnodes * w))):
                points.append((stable_hash64(f"{n}#{i}"), n))
        # Ties (astronomically rare) break by node id so every process sorts alike.
        points.sort()
        self.weights: Mapping[str, float] = MappingProxyType(dict(sorted(weights.items())))
        self.vnodes = vnodes
        self.epoch = epoch
        self._points = tuple(p for p, _ in points)
        self._owners = tuple(n for _, n in points)

    def __repr__(self) -> str:
        return f"HashRing(nodes={list(self.weights)}, vnodes={self.vnodes}, epoch={self.epoch})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashRing):
            return NotImplemented
        return (self.weights, self.vnodes, self.epoch) == (other.weights, other.vnodes, other.epoch)

    def __hash__(self) -> int:
        return hash((tuple(self.weights.items()), self.vnodes, self.epoch))

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node ids, sorted."""
        return tuple(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.weights

    def _walk(self, key: str) -> Iterator[str]:
        """Distinct nodes clockwise from the key's hash point."""
        if not self._points:
            raise EmptyRingError()
        start = bisect.bisect_right(self._points, stable_hash64(key))
        seen: set[str] = set()
        total = len(self._points)
        for i in range(total):
            owner = self._owners[(start + i) % total]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self.weights):
                    return

    def lookup(self, key: str) -> str:
        """The node that owns ``key``: the first node clockwise from its hash."""
        return next(self._walk(key))

    def lookup_n(self, key: str, n: int) -> list[str]:
        """The owner and its successors: up to ``n`` distinct nodes clockwise (replicas)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        out: list[str] = []
        for node in self._walk(key):
            out.append(node)
            if len(out) == n:
                break
        return out

    def with_node(self, node_id: str, weight: float = 1.0) -> HashRing:
        """A new ring, one epoch later, with ``node_id`` added."""
        if node_id in self.weights:
            raise ValueError(f"node id {node_id!r} is already on the ring")
        return HashRing({**self.weights, node_id: weight}, self.vnodes, self.epoch + 1)

    def without_node(self, node_id: str) -> HashRing:
        """A new ring, one epoch later, with ``node_id`` removed."""
        if node_id not in self.weights:
            raise ValueError(f"node id {node_id!r} is not on the ring")
        rest = {n: w for n, w in self.weights.items() if n != node_id}
        return HashRing(rest, self.vnodes, self.epoch + 1)

    def with_epoch(self, epoch: int) -> HashRing:
        """The same nodes under another epoch number."""
        return HashRing(self.weights, self.vnodes, epoch)


def diff(old: HashRing, new: HashRing, keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Keys whose owner changes from ``old`` to ``new``: ``{key: (old_owner, new_owner)}``."""
    moved: dict[str, tuple[str, str]] = {}
    for key in keys:
        before, after = old.lookup(key), new.lookup(key)
        if before != after:
            moved[key] = (before, after)
    return moved


def bounded_capacity(ring: HashRing, node_id: str, total_load: int, eps: float) -> int:
    """The most keys ``node_id`` may hold once one more key is placed on a ring carrying
    ``total_load`` keys: ``ceil((1 + eps) * (total_load + 1) * weight / total_weight)``."""
    share = ring.weights[node_id] / sum(ring.weights.values())
    return math.ceil((1.0 + eps) * (total_load + 1) * share)


def bounded_lookup(ring: HashRing, key: str, loads: Mapping[str, int], eps: float) -> str:
    """The first node clockwise from ``key`` whose load is below its bounded capacity.

    One always exists: the capacities sum to at least ``(1 + eps) * (total + 1) > total``.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    total = sum(loads.get(n, 0) for n in ring.nodes)
    for node in ring._walk(key):
        if loads.get(node, 0) < bounded_capacity(ring, node, total, eps):
            return node
    raise AssertionError("bounded capacities cannot all be full")  # unreachable, see above


class BoundedLoadRouter:
    """Sticky, load-bounded assignment of keys (sessions, prefix keys) to ring nodes.

    ``assign(key)`` places a new key with ``bounded_lookup`` and remembers it, so the next
    turn of a session goes to the same node; ``release(key)`` frees its slot. With every node
    holding at most ``ceil((1 + eps) * (total + 1) / n)`` keys at placement time, the final
    maximum is at most ``ceil((1 + eps) * average)``.
    """

    def __init__(self, ring: HashRing, eps: float = 0.25):
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.ring = ring
        self.eps = eps
        self._owner: dict[str, str] = {}
        self._loads: dict[str, int] = {n: 0 for n in ring.nodes}

    def assign(self, key: str) -> str:
        """The node for ``key``: its current one if it has one, else a load-bounded pick."""
        node = self._owner.get(key)
        if node is not None:
            return node
        node = bounded_lookup(self.ring, key, self._loads, self.eps)
        self._owner[key] = node
        self._loads[node] += 1
        return node

    def release(self, key: str) -> None:
        """Forget ``key`` (session closed or expired); a no-op for unknown keys."""
        node = self._owner.pop(key, None)
        if node is not None:
            self._loads[node] -= 1

    def owner(self, key: str) -> str | None:
        """The node ``key`` is assigned to, or None."""
        return self._owner.get(key)

    def pin(self, key: str, node: str) -> None:
        """Assign ``key`` to ``node`` whatever the loads (its data already lives there: a
        session found on, or moved to, that node)."""
        if node not in self._loads:
            raise ValueError(f"node must be one of {sorted(self._loads)}, got {node!r}")
        self.release(key)
        self._owner[key] = node
        self._loads[node] += 1

    def owners(self) -> dict[str, str]:
        """Every assigned key and its node."""
        return dict(self._owner)

    def loads(self) -> dict[str, int]:
        """Keys held per node."""
        return dict(self._loads)

    def capacity(self) -> int:
        """The bound a node must be under to take the next key (equal weights)."""
        total = sum(self._loads.values())
        return math.ceil((1.0 + self.eps) * (total + 1) / max(1, len(self.ring)))


# Copies of each session's history kept on its owner's ring successors (besides the owner's):
# two, so a session outlives its owner and its first successor dying together.
DEFAULT_REPLICAS = 2
MAX_REPLICAS = 8


def validate_replicas(replicas: int) -> int:
    """``replicas`` if it is in [1, MAX_REPLICAS]; ValueError naming the field otherwise."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be in [1, {MAX_REPLICAS}], got {replicas!r}")
    return replicas


def replica_targets(ring: HashRing, session_id: str, self_id: str) -> list[str]:
    """Nodes to hold ``session_id``'s replica, best first: distinct nodes clockwise from the
    session's hash point, without this node."""
    if len(ring) == 0:
        return []
    return [n for n in ring.lookup_n(session_id, len(ring)) if n != self_id]
