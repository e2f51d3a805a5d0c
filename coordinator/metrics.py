"""Prometheus metrics of a coordinator, read from its ClusterBackend at scrape time.

``CoordinatorCounters`` is what the request path and the mover bump (dict and int additions);
``CoordinatorCollector`` turns them, the ring, the members and their health into
``ultrakv_coordinator_*`` families when scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from ultrakv.cluster.membership import NodeState
from ultrakv.cluster.rejections import REJECTIONS
from ultrakv.coordinator.health import Health


@dataclass
class CoordinatorCounters:
    """Cumulative counts since the coordinator started."""

    forwards: dict[tuple[str, str], int] = field(default_factory=dict)  # (node, outcome)
    retries: dict[str, int] = field(default_factory=dict)  # "retry" | "resume" -> count
    moves: dict[tuple[str, str], int] = field(default_factory=dict)  # (mode, result)
    moved_kv_tokens: int = 0
    # requests without a session by routing choice: prefix, spread, first_block
    # (coordinator/prefix_router.py), or off (prefix routing switched off / nothing cached)
    sessionless_routes: dict[str, int] = field(default_factory=dict)
    # session turns whose owner was overloaded, run on a stand-in (coordinator/session_offload.py):
    # served (and recorded on the owner), fell_back (the owner ran it), not_recorded (failed)
    stand_in_turns: dict[str, int] = field(default_factory=dict)

    def forwarded(self, node: str, outcome: str) -> None:
        """One forward to ``node`` ended: ``ok``, ``node_failed`` (retried),
        ``not_acknowledged`` (the node kept the turn unacknowledged: asked again) or
        ``error``."""
        key = (node, outcome)
        self.forwards[key] = self.forwards.get(key, 0) + 1

    def retried(self, kind: str) -> None:
        """A request goes to another attempt: ``retry`` (no token sent) or ``resume``."""
        self.retries[kind] = self.retries.get(kind, 0) + 1

    def routed(self, reason: str) -> None:
        """A request without a session was routed for ``reason``."""
        self.sessionless_routes[reason] = self.sessionless_routes.get(reason, 0) + 1

    def stood_in(self, outcome: str) -> None:
        """A session turn was given to a stand-in node; ``outcome`` as in ``stand_in_turns``."""
        self.stand_in_turns[outcome] = self.stand_in_turns.get(outcome, 0) + 1

    def moved(self, live: bool, ok: bool, kv_tokens: int) -> None:
        """One session move finished (``live`` from a serving owner, else restored)."""
        key = ("live" if live else "restored", "ok" if ok else "failed")
        self.moves[key] = self.moves.get(key, 0) + 1
        self.moved_kv_tokens += kv_tokens


class CoordinatorCollector(Collector):
    """``ultrakv_coordinator_*`` metrics of one ClusterBackend."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Metric]:
        b = self.backend
        c: CoordinatorCounters = b.counters
        forwards = CounterMetricFamily("ultrakv_coordinator_forwarded_requests",
                                       "Forwards to nodes by outcome (ok, node_failed, not_acknowledged, error).",
                                       labels=["node", "outcome"])
        for (node, outcome), n in sorted(c.forwards.items()):
            forwards.add_metric([node, outcome], n)
        yield forwards
        retries = CounterMetricFamily("ultrakv_coordinator_retries",
                                      "Requests sent to another attempt after a node failure "
                                      "(retry before any token, resume mid-stream).",
                                      labels=["kind"])
        for kind in ("retry", "resume"):
            retries.add_metric([kind], c.retries.get(kind, 0))
        yield retries
        moves = CounterMetricFamily("ultrakv_coordinator_session_moves",
                                    "Sessions moved by resharding (live or restored).",
                                    labels=["mode", "result"])
        for (mode, result), n in sorted(c.moves.items()):
            moves.add_metric([mode, result], n)
        yield moves
        yield CounterMetricFamily("ultrakv_coordinator_moved_kv_tokens",
                                  "KV tokens carried by live session moves.",
                                  value=c.moved_kv_tokens)
        routes = CounterMetricFamily("ultrakv_coordinator_sessionless_routes",
                                     "Requests without a session by routing choice: prefix (to "
                                     "the node holding the prompt), spread (to the fewest blocks "
                                     "cached), first_block (no full block), hash (by the first "
                                     "block: prefix routing off or nothing cached).",
                                     labels=["choice"])
        for reason in ("prefix", "spread", "first_block", "hash"):
            routes.add_metric([reason], c.sessionless_routes.get(reason, 0))
        yield routes
        stand_ins = CounterMetricFamily("ultrakv_coordinator_stand_in_turns",
                                        "Session turns of an overloaded owner given to the node "
                                        "holding their prefix: served (recorded on the owner), "
                                        "fell_back (the owner ran them), not_recorded (failed).",
                                        labels=["outcome"])
        for outcome in ("served", "fell_back", "not_recorded"):
            stand_ins.add_metric([outcome], c.stand_in_turns.get(outcome, 0))
        yield stand_ins
        yield CounterMetricFamily("ultrakv_coordinator_block_index_resyncs",
                                  "Snapshots asked of nodes after a gap or a bad block event.",
                                  value=b.block_feed.resyncs)
        blocks = GaugeMetricFamily("ultrakv_coordinator_block_index_blocks",
                                   "Blocks each node holds (any tier), as its events told.",
                                   labels=["node"])
        for node in b.block_index.nodes():
            blocks.add_metric([node], b.block_index.num_blocks(node))
        yield blocks

        yield GaugeMetricFamily("ultrakv_coordinator_ring_epoch", "Routing ring epoch.",
                                value=b.ring.epoch)
        yield GaugeMetricFamily("ultrakv_coordinator_ring_nodes", "Nodes on the routing ring.",
                                value=len(b.ring.nodes))
        states = GaugeMetricFamily("ultrakv_coordinator_nodes", "Registered nodes by state.",
                                   labels=["state"])
        members = dict(b.members)
        for state in NodeState:
            states.add_metric([state.value], sum(r.state is state for r in members.values()))
        yield states
        health = GaugeMetricFamily("ultrakv_coordinator_node_health",
                                   "Registered nodes by health (up, down, unknown).",
                                   labels=["health"])
        for h in Health:
            health.add_metric([h.value], sum(b.health.status(n) is h for n in members))
        yield health
        inflight = GaugeMetricFamily("ultrakv_coordinator_inflight_requests",
                                     "Forwards in flight per node.", labels=["node"])
        for node, n in sorted(dict(b.inflight).items()):
            inflight.add_metric([node], n)
        yield inflight
        yield REJECTIONS.metric()
        yield GaugeMetricFamily("ultrakv_coordinator_pending_session_moves",
                                "Session moves planned and not started.", value=b.pending_moves)
