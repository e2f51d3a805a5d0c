"""The node's cluster agent: registration under a lease, the ring view that picks
replication targets, checkpoints, and restore from its own last checkpoint on start.

    agent = NodeAgent(engine, node_server, AgentSettings(etcd="127.0.0.1:2379", ...))
    await agent.start()   # after node_server.start(): the record carries its address
    ...
    await agent.stop()    # final checkpoint, lease revoked (the node leaves the ring at once)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from ultrakv.cluster.checkpoint import load_manifest
from ultrakv.cluster.heap import freeze_startup_heap
from ultrakv.cluster.membership import (
    DEFAULT_TTL_S,
    NODES_PREFIX,
    DuplicateNodeError,
    MembershipWatcher,
    NodeRecord,
    NodeRegistration,
    NodeState,
)
from ultrakv.cluster.peers import PeerChannels
from ultrakv.cluster.ring import DEFAULT_REPLICAS
from ultrakv.cluster.store import DEFAULT_PREFIX, EtcdStore
from ultrakv.cluster.tasks import cancel_task
from ultrakv.node.checkpoint import DEFAULT_MAX_BYTES, Checkpointer, restore_into
from ultrakv.node.replication import Replicator

log = logging.getLogger("ultrakv.node.agent")

# grpc.health.v1 service name a node reports SERVING only while it is registered on the ring:
# what a readiness probe asks (`ultrakv health --service ultrakv.ring`); plain "" health turns
# SERVING as soon as the port opens, before the node has joined.
RING_HEALTH_SERVICE = "ultrakv.ring"


# How long a starting node waits for etcd to answer before giving up (the default of
# AgentSettings.etcd_wait_s, `ultrakv node --etcd-wait`): long enough for a loaded machine (or
# an etcd that is restarting), short enough to say a wrong endpoint soon.
ETCD_START_WAIT_S = 20.0


@dataclass
class AgentSettings:
    """How a node joins the cluster. ``checkpoint_dir`` "" disables checkpoints."""

    etcd: str
    prefix: str = DEFAULT_PREFIX
    lease_ttl_s: int = DEFAULT_TTL_S
    checkpoint_dir: str = ""
    checkpoint_interval_s: float = 10.0
    checkpoint_max_bytes: int = DEFAULT_MAX_BYTES
    replication_timeout_s: float = 2.0
    # How long a completed turn waits for a copy on another node before it fails unacknowledged
    # (node/replication.py); a slow successor is asked again for as long.
    replication_patience_s: float = 10.0
    replicas: int = DEFAULT_REPLICAS  # copies of each session on ring successors
    etcd_wait_s: float = ETCD_START_WAIT_S  # how long a starting node waits for etcd

    def __post_init__(self) -> None:
        if self.lease_ttl_s < 1:
            raise ValueError(f"lease_ttl_s must be >= 1, got {self.lease_ttl_s}")
        if self.etcd_wait_s < 0:
            raise ValueError(f"etcd_wait_s must be >= 0, got {self.etcd_wait_s}")
        if not self.replication_patience_s >= 0:
            raise ValueError(f"replication_patience_s must be >= 0, got {self.replication_patience_s}")
        if not self.checkpoint_interval_s > 0:
            raise ValueError(f"checkpoint_interval_s must be > 0, got {self.checkpoint_interval_s}")


# How long the sessions of a node that lost its lease stay fenced should no coordinator settle
# them: every coordinator sees the node's return within seconds and moves what must move.
FENCE_BOUND_S = 30.0

# How long past its lease's expiry a dead incarnation's entry may linger (etcd revokes
# expired leases on its own schedule, later on a loaded machine).
LEASE_EXPIRY_GRACE_S = 5.0


async def wait_for_node_id(store: EtcdStore, node_id: str,
                           grace_s: float = LEASE_EXPIRY_GRACE_S) -> None:
    """Return once ``node_id`` is free; raise ``DuplicateNodeError`` when a live node holds it.

    A node restarted after a crash can come back before its old entry's lease expires; the
    dead process refreshes that lease no more, so the entry goes within the TTL it has left
    (plus ``grace_s``: etcd revokes expired leases on its own schedule), and the restart
    waits for it. An entry that outlives that, or is registered again meanwhile, belongs to
    a live node. Registration itself is a transaction, so this early check is not the guard."""
    key = NODES_PREFIX + node_id
    existing = await store.get(key)
    if existing is None:
        return
    address = NodeRecord.from_json(existing.value).address
    if not existing.lease:  # written without a lease: it never expires
        raise DuplicateNodeError(node_id, address)
    remaining = await store.lease_remaining_s(existing.lease)
    log.info("node id %s is still registered (lease %x, %d s left): waiting for it to expire "
             "(a restart after a crash) or be kept alive (another live node)", node_id,
             existing.lease, remaining)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(remaining, 0) + grace_s
    while loop.time() < deadline:
        await asyncio.sleep(0.2)
        current = await store.get(key)
        if current is None:
            return
        if current.lease != existing.lease:
            break
    raise DuplicateNodeError(node_id, address)


class NodeAgent:
    """Registration, replication hook and checkpoints for one node server."""

    def __init__(self, engine, server, settings: AgentSettings,
                 store: EtcdStore | None = None) -> None:
        self.engine = engine
        self.server = server
        self.settings = settings
        self.node_id = server.backend.identity.node_id
        self.store = store or EtcdStore(settings.etcd, settings.prefix)
        self.peers = PeerChannels(server.cluster_secret, server.peer_tls)
        self.watcher = MembershipWatcher(self.store)
        self.replicator = Replicator(
            engine, self.node_id, lambda: self.watcher.ring, self._addresses, self.peers,
            timeout_s=settings.replication_timeout_s, replicas=settings.replicas,
            patience_s=settings.replication_patience_s)
        self.checkpointer = (
            Checkpointer(engine, self.node_id, settings.checkpoint_dir, self.store,
                         settings.checkpoint_interval_s, settings.checkpoint_max_bytes,
                         self.server.backend.ledger)
            if settings.checkpoint_dir else None)
        self.registration: NodeRegistration | None = None
        self._expiry: asyncio.Task[None] | None = None

    def _addresses(self) -> dict[str, str]:
        return {n: r.address for n, r in self.watcher.members.items()}

    async def start(self) -> None:
        """Connect, restore own checkpoint, register as serving, start the loops.

        Raises ``EtcdUnavailableError`` (naming the endpoint) or ``DuplicateNodeError``.
        """
        await self.store.connect(self.settings.etcd_wait_s)
        if self.checkpointer is not None:
            await self._restore_own_checkpoint()
        await self.watcher.start()
        record = NodeRecord(
            id=self.node_id, address=self.server.address, pid=os.getpid(),
            devices=(str(getattr(self.engine, "device", "cpu")),),
            kv_capacity_blocks=int(getattr(self.engine, "num_blocks", 0)),
            state=NodeState.SERVING, model=str(getattr(self.engine, "model_name", "")))
        self.registration = NodeRegistration(self.store, record, self.settings.lease_ttl_s,
                                             on_lost=self._lease_lost)
        await self.registration.register()
        self.server.backend.lease_patience_s = self.settings.replication_patience_s
        self.server.backend.registration = self.registration
        self.server.backend.replication = self.replicator.stats
        self.server.backend.on_turn_complete = self.replicator.on_turn_complete
        if self.checkpointer is not None:
            self.server.backend.on_session_deleted = self.checkpointer.forget
        await self.server.health.set(RING_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if self.checkpointer is not None:
            self.checkpointer.start()
        self._expiry = asyncio.create_task(self._expire_idle_sessions(), name="session-expiry")
        log.info("node %s joined the cluster at %s (etcd %s)", self.node_id,
                 self.server.address, self.settings.etcd)
        if self.settings.replication_patience_s <= self.settings.lease_ttl_s:
            log.warning("replication patience %g s is not above the lease TTL %d s: a dead "
                        "successor stays registered for up to the TTL, and turns that find no "
                        "other copy fail unacknowledged meanwhile",
                        self.settings.replication_patience_s, self.settings.lease_ttl_s)

    async def _lease_lost(self) -> None:
        """The lease expired unseen (this node was stopped, or cut off from etcd, past its
        TTL): coordinators may have handed its sessions to other nodes. Before it registers
        again, every session here is fenced (held as a replica, taking no turn) until a
        coordinator's re-sharding settles it, so a stale copy neither takes nor acknowledges
        a turn, nor wins a tie against a copy that took one meanwhile."""
        fenced = await asyncio.to_thread(self.engine.fence_sessions, time.time() + FENCE_BOUND_S)
        log.warning("node %s lost its cluster lease: %d sessions fenced until re-sharding "
                    "settles them (at most %.0f s)", self.node_id, len(fenced), FENCE_BOUND_S)

    async def _expire_idle_sessions(self) -> None:
        """Drop sessions and replicas idle for longer than the engine's ``session_ttl_s``
        (with their turn records; the next checkpoint round drops their entries), so a node's
        sessions, and with them its checkpoints, do not grow without end."""
        ttl = float(self.engine.config.session_ttl_s)
        while True:
            await asyncio.sleep(min(60.0, ttl / 4))
            try:
                removed = await self.server.backend.cleanup_sessions(ttl)
            except Exception:  # the next sweep tries again
                log.exception("expiring idle sessions on %s failed", self.node_id)
                continue
            if removed:
                log.info("node %s expired %d sessions idle for more than %.0f s",
                         self.node_id, removed, ttl)

    async def _restore_own_checkpoint(self) -> None:
        """A restarted node takes back what it had checkpointed (the ring gives its sessions
        back to it; resharding moves any that advanced elsewhere in the meantime)."""
        manifest = await load_manifest(self.store, self.node_id)
        if manifest is None:
            return
        report = await asyncio.to_thread(restore_into, self.engine, manifest)
        for state in report.last_turns:
            self.server.backend.adopt_last_turn(state)
        self.checkpointer.restored(manifest, [state.session_id for state in report.last_turns])
        log.info("node %s restored %d sessions and %d replicas from its checkpoint (%d KV "
                 "tokens; %d to recompute, %d unreadable)", self.node_id, len(report.restored),
                 len(report.replicas), report.kv_tokens, len(report.kv_recomputed),
                 len(report.lost))

    async def stop(self) -> None:
        """Final checkpoint, leave the ring, close connections."""
        await cancel_task(self._expiry)
        if self.checkpointer is not None:
            await self.checkpointer.stop()
            try:
                await self.checkpointer.checkpoint_once()
            except Exception as exc:  # stopping must finish even with etcd away
                log.warning("final checkpoint of %s failed: %s", self.node_id, exc)
        self.server.backend.on_turn_complete = None
        self.server.backend.on_session_deleted = None
        self.server.backend.registration = None
        if self.registration is not None:
            await self.server.health.set(RING_HEALTH_SERVICE,
                                         health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.registration.deregister()
        await self.watcher.stop()
        await self.peers.close()
        await self.store.close()


async def serve_node_in_cluster(engine, server, settings: AgentSettings) -> None:
    """Run a node server with its agent until SIGINT/SIGTERM, then leave cleanly."""
    await server.start()
    agent = NodeAgent(engine, server, settings)
    try:
        await agent.start()
    except BaseException:
        await server.stop()
        raise
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.security.reload_keys)
    await stop.wait()
    log.info("node %s stopping", agent.node_id)
    await agent.stop()
    await server.stop()


async def preflight(settings: AgentSettings, node_id: str) -> None:
    """Before a model is loaded: etcd answers and ``node_id`` is free. Raises
    ``EtcdUnavailableError`` (naming the endpoint) or ``DuplicateNodeError``."""
    store = EtcdStore(settings.etcd, settings.prefix)
    try:
        await store.connect(settings.etcd_wait_s)
        await wait_for_node_id(store, node_id)
    finally:
        await store.close()
