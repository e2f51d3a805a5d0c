"""Node health: a pure up/down state machine with hysteresis, and the loop that feeds it.

``HealthTracker`` turns a stream of probe results into UP/DOWN decisions: ``down_after``
consecutive misses (or an expired lease) make a node DOWN; ``up_after`` consecutive successes
are needed before a DOWN node is trusted again, so a flapping node does not bounce sessions
back and forth. ``HealthChecker`` probes every node with the standard ``grpc.health.v1``
service each interval and reports transitions.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ultrakv.cluster.peers import PeerTLS
from ultrakv.cluster.tasks import cancel_task

log = logging.getLogger(__name__)


class Health(StrEnum):
    """What the coordinator believes about a node."""

    UNKNOWN = "unknown"  # registered, not probed yet
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class HealthPolicy:
    """Probe cadence and thresholds."""

    interval_s: float = 1.0
    timeout_s: float = 0.5
    down_after: int = 3  # k: consecutive misses that make a node DOWN
    up_after: int = 2  # m: consecutive successes before a DOWN node is UP again

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        if not 0 < self.timeout_s <= self.interval_s:
            raise ValueError(
                f"timeout_s must be in (0, interval_s={self.interval_s}], got {self.timeout_s}"
            )
        if self.down_after < 1:
            raise ValueError(f"down_after must be >= 1, got {self.down_after}")
        if self.up_after < 1:
            raise ValueError(f"up_after must be >= 1, got {self.up_after}")


@dataclass(frozen=True)
class Transition:
    """A node's health changed."""

    node_id: str
    old: Health
    new: Health
    reason: str


@dataclass
class _NodeHealth:
    status: Health = Health.UNKNOWN
    misses: int = 0
    successes: int = 0


class HealthTracker:
    """Pure health state per node; feed it probe results, read decisions back.

    A node starts UNKNOWN and is UP on its first success (it has just registered, nothing
    suggests it is flaky); from DOWN it needs ``up_after`` successes in a row.
    """

    def __init__(self, policy: HealthPolicy):
        self.policy = policy
        self._nodes: dict[str, _NodeHealth] = {}

    def status(self, node_id: str) -> Health:
        st = self._nodes.get(node_id)
        return Health.UNKNOWN if st is None else st.status

    def up_nodes(self) -> set[str]:
        """Nodes currently UP."""
        return {n for n, st in self._nodes.items() if st.status is Health.UP}

    def forget(self, node_id: str) -> None:
        """Stop tracking a node that left the cluster."""
        self._nodes.pop(node_id, None)

    def _move(self, node_id: str, st: _NodeHealth, new: Health, reason: str) -> Transition | None:
        if st.status is new:
            return None
        old, st.status = st.status, new
        return Transition(node_id, old, new, reason)

    def observe(self, node_id: str, ok: bool) -> Transition | None:
        """Record one probe result; returns the transition it caused, if any."""
        st = self._nodes.setdefault(node_id, _NodeHealth())
        if ok:
            st.misses = 0
            st.successes += 1
            needed = self.policy.up_after if st.status is Health.DOWN else 1
            if st.successes >= needed:
                return self._move(node_id, st, Health.UP, f"{st.successes} successful probes")
            return None
        st.successes = 0
        st.misses += 1
        if st.misses >= self.policy.down_after:
            return self._move(node_id, st, Health.DOWN, f"{st.misses} missed probes")
        return None

    def lease_expired(self, node_id: str) -> Transition | None:
        """The node's etcd lease expired: DOWN at once, whatever the probes said."""
        st = self._nodes.setdefault(node_id, _NodeHealth())
        st.successes = 0
        st.misses = max(st.misses, self.policy.down_after)
        return self._move(node_id, st, Health.DOWN, "lease expired")


TransitionCallback = Callable[[Transition], Awaitable[None] | None]


class HealthChecker:
    """Probes each target's ``grpc.health.v1.Health/Check`` every ``policy.interval_s``.

    ``set_targets({node_id: "host:port"})`` follows membership; ``on_transition`` hears every
    UP/DOWN change. A probe counts as a success only when the node answers SERVING within
    ``policy.timeout_s``.
    """

    def __init__(
        self,
        policy: HealthPolicy,
        on_transition: TransitionCallback | None = None,
        service: str = "",
        tls: PeerTLS | None = None,
    ):
        self.policy = policy
        self.tls = tls  # nodes that serve mutual TLS are probed with this identity
        self.tracker = HealthTracker(policy)
        self.on_transition = on_transition
        self.service = service
        self._targets: dict[str, str] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._task: asyncio.Task[None] | None = None

    def set_targets(self, targets: Mapping[str, str]) -> None:
        """Probe exactly these nodes from the next round on."""
        for node_id in set(self._targets) - set(targets):
            self.tracker.forget(node_id)
        self._targets = dict(targets)

    async def mark_lease_expired(self, node_id: str) -> None:
        """Report a lease expiry seen by membership (a DOWN without waiting for probes)."""
        await self._emit(self.tracker.lease_expired(node_id))

    def status(self, node_id: str) -> Health:
        return self.tracker.status(node_id)

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            # Short reconnect backoff: a restarted node must be seen within a few intervals.
            options = [
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ]
            if self.tls is not None:
                ch = grpc.aio.secure_channel(address, self.tls.channel_credentials(), options=options)
            else:
                ch = grpc.aio.insecure_channel(address, options=options)
            self._channels[address] = ch
        return ch

    async def probe(self, address: str) -> bool:
        """One health check; True when the node reports SERVING in time."""
        stub = health_pb2_grpc.HealthStub(self._channel(address))
        try:
            resp = await stub.Check(
                health_pb2.HealthCheckRequest(service=self.service), timeout=self.policy.timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def check_once(self) -> list[Transition]:
        """Probe every target concurrently and apply the results."""
        targets = dict(self._targets)
        results = await asyncio.gather(*(self.probe(a) for a in targets.values()))
        transitions = []
        for node_id, ok in zip(targets, results, strict=True):
            if node_id not in self._targets:
                continue  # left while we were probing
            t = self.tracker.observe(node_id, ok)
            if t is not None:
                transitions.append(t)
                await self._emit(t)
        live = set(self._targets.values())
        for address in [a for a in self._channels if a not in live]:
            await self._channels.pop(address).close()
        return transitions

    async def _emit(self, t: Transition | None) -> None:
        if t is None:
            return
        # A node lost is worth a warning; one that joins or comes back is routine.
        level = logging.WARNING if t.new is Health.DOWN else logging.INFO
        log.log(level, "node %s: %s -> %s (%s)", t.node_id, t.old, t.new, t.reason)
        if self.on_transition is None:
            return
        try:
            result = self.on_transition(t)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("health transition callback failed for %s", t.node_id)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await self.check_once()
            await asyncio.sleep(max(0.0, self.policy.interval_s - (time.monotonic() - started)))

    def start(self) -> None:
        """Start the probe loop in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="health-checker")

    async def stop(self) -> None:
        """Stop probing and close the channels."""
        await cancel_task(self._task)
        self._task = None
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
