"""The coordinator: the client-facing ``ultrakv.v1.UltraKV`` service over the cluster.

``ClusterBackend`` implements the wire's ``ServingBackend`` by forwarding each request to
its node: ``ring.lookup(session_id)``, or for a request without a session the hash of its
first prompt block, bounded by the requests in flight per node. It relays the node's
stream. When the node fails before the first token the request is retried on the new
owner; when it fails mid-stream the request is resumed on the new owner from prompt +
the token ids already sent (kept as ids, never re-encoded text), so the client sees one
stream and no error.

The routing ring is membership's ring of serving nodes minus the nodes the health loop (or
a failed forward) holds down. Every change of it is handed to the resharder before it takes
effect: the sessions that move are marked pending first, and their requests wait in the
``SessionGate`` until the move is done. A node marked down has its forwards in flight given
up at once, and each forward has a first-token and a stall deadline, so a stopped node's
requests move on instead of hanging.

Several coordinators may run against one etcd: routing is a pure function of the ring, and
the ring of a membership is the same in every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.registry import CollectorRegistry
from ultrakv.cluster.addresses import (
    GRPC_SERVER_OPTIONS,
    PortInUseError,
    check_server_ports,
    dial_host,
    listen_address,
    port_in_use_message,
)
from ultrakv.cluster.block_hashing import hash_token_blocks
from ultrakv.cluster.errors import SessionNotFoundError
from ultrakv.cluster.health_service import HealthService
from ultrakv.cluster.heap import freeze_startup_heap
from ultrakv.cluster.membership import (
    NODES_PREFIX,
    MembershipWatcher,
    NodeRecord,
    NodeState,
)
from ultrakv.cluster.metrics_http import serve_metrics
from ultrakv.cluster.openai_api import ApiHost, HttpServer, TlsFiles
from ultrakv.cluster.peer_auth import read_cluster_secret
from ultrakv.cluster.peers import PeerChannels, PeerTLS
from ultrakv.cluster.ring import (
    DEFAULT_REPLICAS,
    EmptyRingError,
    HashRing,
    bounded_lookup,
    route_key_for_prompt,
    validate_replicas,
)
from ultrakv.cluster.security.interceptor import EdgeSecurityInterceptor
from ultrakv.cluster.security.policy import EdgeSecurity
from ultrakv.cluster.security.settings import SecuritySettings
from ultrakv.cluster.security.tls import server_credentials
from ultrakv.cluster.service import (
    ULTRAKV_SERVICE,
    Event,
    StreamPacing,
    TokenSink,
    UltraKVServicer,
    add_servicer,
    push_events,
)
from ultrakv.cluster.store import DEFAULT_PREFIX, Compare, EtcdStore, Put
from ultrakv.cluster.tasks import all_of, cancel_task, exit_on_second_signal
from ultrakv.cluster.transport import exposure_warnings, server_options
from ultrakv.cluster.validation import (
    Limits,
    RequestRejected,
    node_failing,
    not_acknowledged,
    superseded,
    timeout_ms_left,
)
from ultrakv.coordinator.block_feed import BlockFeed
from ultrakv.coordinator.block_index import BlockIndex, HashScheme
from ultrakv.coordinator.dynamic_config import DynamicConfig, DynamicConfigWatcher
from ultrakv.coordinator.health import Health, HealthChecker, HealthPolicy, Transition
from ultrakv.coordinator.metrics import CoordinatorCollector, CoordinatorCounters
from ultrakv.coordinator.node_link import NodeLink, Receiver
from ultrakv.coordinator.prefix_router import choose_node
from ultrakv.coordinator.resharding import Move, MoveResult, Plan, Resharder
from ultrakv.coordinator.session_backup import SessionBackup
from ultrakv.coordinator.session_offload import choose_stand_in, may_stand_in
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2

log = logging.getLogger("ultrakv.coordinator.server")

# A forward that ends with one of these is the node's fault, not the request's: try again.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.INTERNAL}
PREFIX_ROUTE_BYTES = 64  # a text prompt's routing block: its first bytes
CLIENT_STREAMS_PER_CONNECTION = 256  # calls one client connection may hold open at once
_REPLANS = 3  # plans of one view change when the view keeps changing while planning
# A move that failed under the ring still in force is tried again (a node that just came
# back may not be reachable for a moment): this often, this many times in all.
_MOVE_RETRY_S = 1.0
_MOVE_TRIES = 5
_TOKENIZE_TIMEOUT_S = 2.0  # a node that cannot tokenize by then: route by the first block
# An owner that said its batch admits N more requests (session offload) is believed until
# this coordinator has sent it N more, for this long at most (other coordinators send too).
_ROOM_BELIEVED_S = 1.0
_SLOW_REQUEST_S = 10.0  # a request that took this long has its timeline logged


@dataclass
class CoordinatorSettings:
    """How a coordinator finds the cluster, listens and routes."""

    etcd: str
    prefix: str = DEFAULT_PREFIX
    host: str = "0.0.0.0"
    port: int = 50051
    # Lenient probes: a node whose forward fails is taken off the ring at once anyway, and a
    # busy node (its event loop starved by the engine) must not be declared dead: that
    # would move its sessions for nothing, and with a real death beside it lose replicas.
    health: HealthPolicy = field(default_factory=lambda: HealthPolicy(
        interval_s=1.0, timeout_s=1.0, down_after=3, up_after=2))
    load_eps: float = 0.25  # bounded loads for requests without a session
    # Requests without a session go to the node holding their longest cached prefix (from
    # the nodes' block events); off: to the hash of their first block, as before.
    prefix_routing: bool = True
    # A session turn whose owner is over its bound runs on the node holding the session's
    # longest cached prefix (under its bound), and is appended to the owner before it is
    # acknowledged (coordinator/session_offload.py); off: the owner runs every turn.
    session_offload: bool = False
    block_size: int = 16  # the nodes' KV block size: the prefix-routing unit
    max_attempts: int = 4  # forwards per request (first try + retries/resumes)
    failed_hold_s: float = 3.0  # a node whose forward failed stays off the ring this long
    # A forward whose node sends nothing this long (before its first message / between two
    # messages) is given up and retried or resumed elsewhere, its node taken off the ring.
    # Generous: a busy node's queue and a long prefill must not count as a stall.
    first_token_timeout_s: float = 60.0
    stall_timeout_s: float = 20.0
    replicas: int = DEFAULT_REPLICAS  # copies of a moved session on its owner's successors
    limits: Limits = field(default_factory=Limits)
    grace_period_s: float = 2.0
    metrics_port: int = 0  # Prometheus /metrics over HTTP; 0 = off
    http_port: int = 0  # the OpenAI-compatible API, /health and /metrics; 0 = off
    security: SecuritySettings = field(default_factory=SecuritySettings)
    # How this coordinator proves itself to nodes: the cluster secret (a file, 0600) and,
    # for mutual TLS, the cluster CA with this coordinator's certificate and key (PEM).
    cluster_secret_file: str = ""
    peer_ca_cert: str = ""
    peer_cert: str = ""
    peer_key: str = ""
    # Client streams' message budget (the config file's server.stream_* keys, as a node's).
    stream_pacing: StreamPacing = field(default_factory=StreamPacing)

    def peer_tls(self) -> PeerTLS | None:
        return PeerTLS(self.peer_ca_cert, self.peer_cert, self.peer_key) if self.peer_ca_cert else None

    def __post_init__(self) -> None:
        validate_replicas(self.replicas)
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not self.load_eps > 0:
            raise ValueError(f"load_eps must be > 0, got {self.load_eps}")
        for name in ("first_token_timeout_s", "stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass
class _Pending:
    """Moves planned for one session and not done yet."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    turned_live: asyncio.Event = field(default_factory=asyncio.Event)  # a live move joined
    moves: int = 0
    live: bool = False


@dataclass
class _SessionLock:
    """A session's lock and how many tasks hold it or wait for it (the entry goes with the
    last of them: a gate that kept one lock per session ever seen would grow without end)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class SessionGate:
    """Per-session order: one turn at a time, and no turn while the session moves.

    A turn holds the session's lock while it runs; a live migration takes the same lock,
    so it never moves a session under a running turn. Sessions planned to move are marked
    pending before the ring switches; a new turn waits for the move to finish, and one
    that finds a live move pending after taking the lock hands the lock over first.
    """

    def __init__(self) -> None:
        self._locks: dict[str, _SessionLock] = {}  # only sessions someone holds or awaits
        self._pending: dict[str, _Pending] = {}

    @property
    def sessions(self) -> int:
        """Sessions whose lock is held or awaited now."""
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def _user(self, session_id: str) -> AsyncIterator[asyncio.Lock]:
        entry = self._locks.setdefault(session_id, _SessionLock())
        entry.users += 1
        try:
            yield entry.lock
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[session_id]

    @contextlib.asynccontextmanager
    async def lock(self, session_id: str) -> AsyncIterator[None]:
        """Hold the session's lock (a live move: never under a running turn)."""
        async with self._user(session_id) as lock, lock:
            yield

    def mark_pending(self, moves: list[tuple[str, bool]]) -> None:
        """``moves``: (session id, live) of the sessions a new ring moves."""
        for sid, live in moves:
            entry = self._pending.setdefault(sid, _Pending())
            entry.moves += 1
            if live and not entry.live:
                entry.live = True
                entry.turned_live.set()

    def done(self, session_id: str) -> None:
        """One planned move of the session finished (two ring changes may plan two)."""
        entry = self._pending.get(session_id)
        if entry is not None:
            entry.moves -= 1
            if entry.moves <= 0:
                del self._pending[session_id]
                entry.done.set()

    def pending(self, session_id: str) -> bool:
        return session_id in self._pending

    async def settled(self, session_id: str, live: bool = True) -> None:
        """Wait for the session's pending move (only a restore when ``live`` is False: a turn
        that holds the lock must not wait for a live move, which waits for the lock; nor for
        a restore that a live move joins while it waits, which ends with the live move)."""
        while (entry := self._pending.get(session_id)) is not None and (live or not entry.live):
            if live:
                await entry.done.wait()
                continue
            waits = [asyncio.ensure_future(e.wait()) for e in (entry.done, entry.turned_live)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    def awaited(self, session_id: str) -> bool:
        """Whether a turn holds or awaits the session (a move it waits for should not wait
        behind other sessions' moves)."""
        return session_id in self._locks

    @contextlib.asynccontextmanager
    async def turn(self, session_id: str | None,
                   wait_s: float | None = None) -> AsyncIterator[None]:
        """Hold the session for one turn; ``TimeoutError`` when its move or the turn before
        it is not done within ``wait_s`` (None: no bound)."""
        if session_id is None:
            yield
            return
        async with self._user(session_id) as lock:
            async with asyncio.timeout(wait_s):
                while True:
                    await self.settled(session_id)
                    await lock.acquire()
                    if not self.pending(session_id):
                        break
                    lock.release()  # a move was planned meanwhile: let it go first
                    await asyncio.sleep(0)
            try:
                yield
            finally:
                lock.release()


def delete_outcome(session_id: str, outcomes: list[str]) -> None:
    """A delete's answer from each member's outcome (``deleted``, ``absent``, ``left``, or the
    id of a member that did not answer): UNAVAILABLE while any member may still hold a copy,
    NOT_FOUND when none held one, else done."""
    silent = [o for o in outcomes if o not in ("deleted", "absent", "left")]
    if silent:
        raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "session_id",
                              f"session_id {session_id!r}: node {', '.join(silent)} did not answer and may "
                              "still hold a copy; send the delete again", retry_after_s=1.0)
    if "deleted" not in outcomes:
        raise SessionNotFoundError(session_id)


def resumed_request(request: pb.GenerateRequest, sent_ids: list[int]) -> pb.GenerateRequest:
    """The request that continues ``request`` after ``sent_ids`` were streamed already.

    The original prompt (text or ids, as the client sent it) plus the streamed ids as token
    ids: the new owner tokenizes the prompt exactly as the first one did (same model, same
    session history) and continues from the very ids the client received. Decoding them to
    text and re-encoding would not give the same ids back in general.
    """
    out = pb.GenerateRequest()
    out.CopyFrom(request)
    del out.resume_token_ids[:]  # only the coordinator sets it
    if sent_ids:
        out.resume_token_ids.extend(sent_ids)
        out.sampling.max_length = request.sampling.max_length - len(sent_ids)
    return out


class ClusterBackend:
    """ServingBackend that forwards to the cluster's nodes (see the module docstring)."""

    def __init__(self, settings: CoordinatorSettings, store: EtcdStore | None = None) -> None:
        self.settings = settings
        self.store = store or EtcdStore(settings.etcd, settings.prefix)
        secret = read_cluster_secret(settings.cluster_secret_file) if settings.cluster_secret_file else ""
        self.peers = PeerChannels(secret, settings.peer_tls())
        self.gate = SessionGate()
        self.watcher = MembershipWatcher(self.store, on_members=self._on_members)
        self.health = HealthChecker(settings.health, on_transition=self._on_transition,
                                    tls=settings.peer_tls())
        self.config = DynamicConfigWatcher(self.store, DynamicConfig.from_settings(settings),
                                           on_change=self.apply_config)
        self.resharder = Resharder(self.store, self.peers, self._addresses,
                                   replicas=self.settings.replicas)
        self.backup = SessionBackup(self)
        self.ring = HashRing((), vnodes=self.watcher.vnodes)
        self.members: dict[str, NodeRecord] = {}
        self.inflight: dict[str, int] = {}
        self._attempts: dict[str, set[_Attempt]] = {}  # node -> its forwards in flight
        # Each node's GenerateMany streams (coordinator/node_link.py), and the nodes (address,
        # start time) from before it, forwarded to over a Generate stream per request (a
        # rolling upgrade's old nodes)
        self._links: dict[str, list[tuple[tuple[str, float], NodeLink]]] = {}
        self._generate_only: set[tuple[str, float]] = set()
        self._moving: dict[str, set[asyncio.Timeout]] = {}  # node -> moves involving it
        self._expedited: set[asyncio.Task] = set()  # moves a waiting turn started early
        self._failed: dict[str, float] = {}  # node -> monotonic time its forward failed
        # Session offload: node -> (until when, below which in-flight count) its answer "a
        # turn would not wait here" is believed, so an owner with room in its batch is not
        # asked again on every turn
        self._room: dict[str, tuple[float, int]] = {}
        self._view_lock = asyncio.Lock()
        self._view_stale = asyncio.Event()  # set: recompute the view now (see _tick)
        self._moves: asyncio.Queue[Plan] = asyncio.Queue()
        # planned, not started: (move, its ring, failed tries)
        self._queued: dict[str, tuple[Move, HashRing, int]] = {}
        self._tasks: list[asyncio.Task] = []
        self.counters = CoordinatorCounters()
        self.block_index = BlockIndex()
        self.block_feed = BlockFeed(self.block_index, self.peers)

    def models(self) -> list[str]:
        """Names of the models the serving nodes run (what the OpenAI API lists)."""
        return sorted({r.model for r in self.members.values()
                       if r.model and r.state is NodeState.SERVING})

    @property
    def pending_moves(self) -> int:
        """Session moves planned and not started."""
        return len(self._queued)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to etcd (``EtcdUnavailableError`` names the endpoint), read the members,
        start the health loop and the mover."""
        await self.store.connect()
        await self.config.start()  # before the health loop: it starts with the live policy
        await self.watcher.start()
        self.health.start()
        self._tasks.append(asyncio.create_task(self._mover(), name="reshard-mover"))
        self._tasks.append(asyncio.create_task(self._tick(), name="view-tick"))
        await self._update_view()

    async def _tick(self) -> None:
        """Re-check the view each health interval (a failed-forward hold runs out silently),
        and at once when a health transition asks for it."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._view_stale.wait(), self.settings.health.interval_s)
            self._view_stale.clear()
            try:
                await self._update_view()
            except Exception:
                log.exception("updating the routing ring failed")

    async def stop(self) -> None:
        for task in (*self._tasks, *self._expedited):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._expedited, return_exceptions=True)
        self._tasks.clear()
        await self.config.stop()
        await self.health.stop()
        await self.watcher.stop()
        await self.block_feed.stop()
        for links in self._links.values():
            for _, link in links:
                link.close()
        self._links.clear()
        await self.peers.close()
        await self.store.close()

    async def apply_config(self, config: DynamicConfig) -> None:
        """Apply a dynamic config (etcd ``config/coordinator``) live: every setting in it is
        read on each use, so the next request, probe round and view tick follow it."""
        policy = config.health_policy()
        self.settings.load_eps = config.load_eps
        self.settings.max_attempts = config.max_attempts
        self.settings.failed_hold_s = config.failed_hold_s
        self.settings.first_token_timeout_s = config.first_token_timeout_s
        self.settings.stall_timeout_s = config.stall_timeout_s
        self.settings.prefix_routing = bool(config.prefix_routing)
        self.settings.session_offload = bool(config.session_offload)
        self.settings.health = policy
        self.health.policy = policy
        self.health.tracker.policy = policy
        await self._update_view()  # a shorter failed-node hold may put a node back now

    # -- the view: members, health, the routing ring ------------------------------------------

    def _addresses(self) -> dict[str, str]:
        return {n: r.address for n, r in self.members.items()}

    async def _on_members(self, members: dict[str, NodeRecord]) -> None:
        self.members = members
        self.health.set_targets({n: r.address for n, r in members.items()})
        self.block_feed.set_targets({n: r.address for n, r in members.items()})
        await self._update_view()

    async def _on_transition(self, t: Transition) -> None:
        if t.new is Health.UP:
            self._failed.pop(t.node_id, None)
        elif t.new is Health.DOWN:
            self._abandon(t.node_id)
            self.block_feed.node_down(t.node_id)
        # Not awaited here: planning a ring change lists every node's sessions, and the
        # probe loop must go on meanwhile (a stopped node makes that listing slow).
        self._view_stale.set()

    def _routable(self) -> list[str]:
        now = time.monotonic()
        hold = self.settings.failed_hold_s
        return sorted(n for n, r in self.members.items()
                      if r.state is NodeState.SERVING
                      and self.health.status(n) is not Health.DOWN
                      and now - self._failed.get(n, -hold) >= hold)

    def _alive(self) -> set[str]:
        """Members that answer (draining ones included: their sessions stream away)."""
        now = time.monotonic()
        hold = self.settings.failed_hold_s
        return {n for n in self.members if self.health.status(n) is not Health.DOWN
                and now - self._failed.get(n, -hold) >= hold}

    async def _update_view(self) -> None:
        """Recompute the routing ring; plan the moves of a change before routing by it."""
        async with self._view_lock:
            old = self.ring
            for _ in range(_REPLANS):
                nodes, alive = self._routable(), self._alive()
                if tuple(nodes) == old.nodes:
                    return
                new = HashRing(nodes, vnodes=old.vnodes,
                               epoch=max(old.epoch, self.watcher.ring.epoch)
                               + (1 if old.nodes else 0))
                dead = set(old.nodes) - alive
                off_ring = set(self.members) - alive  # registered: slow, perhaps not dead
                plan = (await self.resharder.plan(new, alive, dead, off_ring)) if new.nodes \
                    else Plan(ring=new)
                # Listing sessions takes a while (seconds when a node is stopped): a view
                # that changed meanwhile is planned again rather than applied stale.
                if (self._routable(), self._alive()) == (nodes, alive):
                    break
            self.gate.mark_pending([(m.session_id, m.live) for m in plan.moves])
            self._queue_moves(plan)
            self.ring = new
            log.info("routing ring epoch %d: %s (%d of %d sessions move)", new.epoch,
                     list(new.nodes), len(plan.moves), plan.sessions)
            if plan.moves:
                self._moves.put_nowait(plan)

    def _queue_moves(self, plan: Plan) -> None:
        for move in plan.moves:
            if self._queued.pop(move.session_id, None) is not None:
                self.gate.done(move.session_id)  # superseded by the newer ring's move
            self._queued[move.session_id] = (move, plan.ring, 0)

    async def _carry_out(self, move: Move, ring: HashRing) -> MoveResult:
        """``resharder.move``, given up as soon as a node it involves is marked down: its
        calls to a stopped node would otherwise wait out their timeouts (30 s each) while the
        session's turns wait for the move."""
        nodes = {move.target} | {c.node for c in move.copies if c.live}
        try:
            async with asyncio.timeout(None) as timeout:
                for node in nodes:
                    self._moving.setdefault(node, set()).add(timeout)
                try:
                    return await self.resharder.move(move, ring)
                finally:
                    for node in nodes:
                        self._moving[node].discard(timeout)
        except TimeoutError:
            down = sorted(n for n in nodes if n not in self._alive())
            log.warning("moving session %s -> %s given up: %s marked down", move.session_id,
                        move.target, ", ".join(down) or "a node it involves was")
            return MoveResult(move, False, error="a node it involves was marked down")

    async def _run_move(self, move: Move, ring: HashRing, tries: int = 0) -> None:
        retry = False
        try:
            if move.live:  # never under a running turn: it finishes, then the move decides
                async with self.gate.lock(move.session_id):
                    result = await self._carry_out(move, ring)
            else:  # the turn waiting on it may hold the lock
                result = await self._carry_out(move, ring)
            self.counters.moved(move.live, result.ok, result.kv_tokens)
            if result.ok:
                log.info("session %s: %s -> %s (%s, %d KV tokens)", move.session_id,
                         result.move.source, move.target, "live" if move.live else "restored",
                         result.kv_tokens)
            else:
                # Left undone, the owner would serve the next turn without the history.
                retry = (ring is self.ring and tries + 1 < _MOVE_TRIES
                         and move.session_id not in self._queued)
        finally:
            if retry:  # still pending: the session's turns keep waiting for it
                self._queued[move.session_id] = (move, ring, tries + 1)
                asyncio.get_running_loop().call_later(_MOVE_RETRY_S, self._retry_move, move, ring)
            else:
                self.gate.done(move.session_id)

    def _retry_move(self, move: Move, ring: HashRing) -> None:
        """Run a failed move again: at once when a turn waits for it, else after the moves
        planned before it (the mover may be busy with a big plan for a while)."""
        if self.gate.awaited(move.session_id):
            self._expedite(move.session_id, live=True)
        else:
            self._moves.put_nowait(Plan(ring=ring, moves=[move]))

    def _expedite(self, session_id: str, live: bool) -> None:
        """A turn waits for its session's move: start it now rather than in plan order (a
        dead node's checkpoint may list many idle sessions ahead of it). In a task of its
        own: a request that stops waiting (its client gone, its wait bound reached) must not
        cut the move short."""
        queued = self._queued.get(session_id)
        if queued is not None and (live or not queued[0].live):
            del self._queued[session_id]
            task = asyncio.create_task(self._run_move(*queued), name=f"move {session_id}")
            self._expedited.add(task)
            task.add_done_callback(self._expedited.discard)

    async def _mover(self) -> None:
        """Carry out plans one after another; moves of one plan run a few at a time."""
        gate = asyncio.Semaphore(self.resharder.concurrency)

        async def one(session_id: str) -> None:
            async with gate:
                queued = self._queued.pop(session_id, None)
                if queued is not None:  # else a waiting turn ran it already
                    await self._run_move(*queued)

        while True:
            plan = await self._moves.get()
            await asyncio.gather(*(one(m.session_id) for m in plan.moves))

    async def node_failed(self, node: str, abandon: bool = True) -> None:
        """A forward to ``node`` failed: keep it off the ring until health says otherwise
        (and, with ``abandon``, give up its other forwards in flight)."""
        self._failed[node] = time.monotonic()
        if abandon:
            self._abandon(node)
        await self._update_view()

    # -- routing ------------------------------------------------------------------------------

    async def route(self, request: pb.GenerateRequest) -> str:
        """The node for ``request`` under the current ring: a session's owner; else the node
        holding the prompt's longest cached prefix under bounded load
        (coordinator/prefix_router.py), or without one the first-block hash's node."""
        if len(self.ring) == 0:
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "", str(EmptyRingError()),
                                  retry_after_s=1.0)
        if request.HasField("session_id"):
            return self.ring.lookup(request.session_id)
        ring, key = self.ring, self._first_block_key(request)
        fallback = bounded_lookup(ring, key, self.inflight, self.settings.load_eps)
        scheme = self._hash_scheme()
        if not self.settings.prefix_routing or scheme is None:
            self.counters.routed("hash")
            return fallback  # nothing cached anywhere (or nodes that hash blocks differently)
        tokens = await self._prompt_tokens(request, fallback)
        # The node salts its block hashes with the tenant: one tenant's prefix never matches
        # another's, here as in the node's cache.
        hashes = (hash_token_blocks(tokens, scheme.block_size, request.tenant, scheme.chain_root)
                  if tokens else [])
        if not len(self.ring):  # emptied while the prompt was tokenized
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "", str(EmptyRingError()),
                                  retry_after_s=1.0)
        choice = choose_node(self.ring, key, hashes, self.block_index, self.inflight,
                             self.settings.load_eps)
        self.counters.routed(choice.reason)
        return choice.node

    def _hash_scheme(self) -> HashScheme | None:
        """How the ring's nodes chain their block hashes; None when nothing is cached
        anywhere or nodes hash differently (a prefix match then means nothing)."""
        schemes = {self.block_index.scheme(n) for n in self.ring.nodes
                   if self.block_index.num_blocks(n)} - {None}
        return schemes.pop() if len(schemes) == 1 else None

    async def _prompt_tokens(self, request: pb.GenerateRequest, node: str) -> list[int] | None:
        """The prompt's token ids as the nodes compute them: token-id prompts as sent, text
        and chats tokenized by ``node`` (None when it cannot answer)."""
        if request.WhichOneof("prompt") == "token_ids":
            return [*request.token_ids.ids, *request.resume_token_ids]
        try:
            reply = await self.peers.stub(self.members[node].address).Tokenize(
                request, timeout=_TOKENIZE_TIMEOUT_S)
        except (grpc.aio.AioRpcError, KeyError):
            return None
        return list(reply.token_ids)

    def _first_block_key(self, request: pb.GenerateRequest) -> str:
        """The routing key of a prompt's first block (shared prefixes meet on one node)."""
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            key = route_key_for_prompt(request.token_ids.ids, self.settings.block_size)
        else:
            text = request.text
            if kind == "messages" and request.messages.messages:  # chats sharing a system prompt meet
                first = request.messages.messages[0]
                text = f"{first.role}\n{first.content}"
            head = list(text.encode("utf-8")[:PREFIX_ROUTE_BYTES]) or [0]
            key = route_key_for_prompt(head, PREFIX_ROUTE_BYTES)
        return key

    # -- ServingBackend -----------------------------------------------------------------------

    async def generate_into(self, request: pb.GenerateRequest, deadline: float | None,
                            sink: TokenSink) -> pb.GenerateResult | None:
        """:meth:`generate`, pushed into a Generate stream's ``sink`` (straight from
        ``_generate``: one async generator fewer for every relayed message)."""
        timeline = _Timeline()
        try:
            return await push_events(self._generate(request, deadline, timeline), sink)
        finally:
            timeline.log_if_slow(request)

    async def generate(self, request: pb.GenerateRequest,
                       deadline: float | None) -> AsyncIterator[Event]:
        """Forward, relay, and on a node failure retry or resume on the new owner (see
        ``_generate``); a request that took long has its timeline logged."""
        timeline = _Timeline()
        try:
            async with contextlib.aclosing(self._generate(request, deadline, timeline)) as events:
                async for event in events:
                    yield event
        finally:
            timeline.log_if_slow(request)

    async def _generate(self, request: pb.GenerateRequest, deadline: float | None,
                        timeline: _Timeline) -> AsyncIterator[Event]:
        """Forward, relay, and on a node failure retry or resume on the new owner.

        The chunk that reaches ``max_length`` is held back until the node's final message:
        a node dies most often between its last token and its final message (it replicates
        the turn in between), and a held token leaves the resumed request something to
        generate, so the new owner records the turn as its own. If the turn was replicated
        before the node died, the new owner's history already ends with it and the result
        is answered from there.
        """
        sid = request.session_id if request.HasField("session_id") else None
        started = time.monotonic()
        sent_ids: list[int] = []
        sent_text: list[str] = []
        held: pb.TokenChunk | None = None
        first_token_at = 0.0
        if sid is not None:
            self._expedite(sid, live=True)
        async with contextlib.AsyncExitStack() as turn:
            try:
                await turn.enter_async_context(self.gate.turn(sid, self._move_wait_s(deadline)))
            except TimeoutError:
                raise self._still_moving(sid, started, deadline) from None
            if sid is not None:
                timeline.mark("session gate taken")
            plan = await self._stand_in_plan(request, sid) if sid is not None else None
            if plan is not None:  # the owner is overloaded: the node holding the prefix runs it
                relay = _Relay()
                async for event in self._run_on_stand_in(request, plan, deadline, relay):
                    yield event
                if relay.done:
                    return
                # It failed before its end: the owner runs the rest (resumed after the tokens
                # the client got; a held last chunk was never sent and is generated again).
                self.counters.stood_in("fell_back")
                sent_ids, sent_text, first_token_at = relay.ids, relay.texts, relay.first_token_at
            stood_in = bool(sent_ids)
            # The last attempt's node kept the turn without acknowledging it (no copy on
            # another node, or no proven lease): only that node's answer may acknowledge it,
            # once durable (its history ending with the turn proves nothing then).
            unacknowledged = False
            for attempt in range(self.settings.max_attempts):
                if attempt > 0 and sid is not None:
                    await self._restore_settled(sid, deadline)
                    timeline.mark("its session's restore settled")
                node = await self.route(request)
                timeline.mark(f"attempt {attempt + 1} on {node}")
                if attempt > 0 and sid is not None and held is not None and not unacknowledged:
                    usage = await self._completed_on(node, request,
                                                     sent_ids + list(held.token_ids))
                    if usage is not None:
                        sent_ids.extend(held.token_ids)
                        sent_text.append(held.text)
                        yield held
                        usage.prompt_tokens += len(sent_ids)  # _result takes the output off
                        yield self._result(request, pb.GenerateResult(
                            request_id=request.request_id, session_id=sid,
                            finish_reason=pb.FINISH_REASON_LENGTH, node_id=node, usage=usage),
                            sent_ids, sent_text, started, first_token_at)
                        return
                held, unacknowledged = None, False
                forward = resumed_request(request, sent_ids)
                try:
                    async for event in self._forward(node, forward, deadline):
                        if isinstance(event, pb.TokenChunk):
                            if not first_token_at:
                                timeline.mark("first token")
                            first_token_at = first_token_at or time.monotonic()
                            if len(sent_ids) + len(event.token_ids) >= request.sampling.max_length:
                                held = event
                                continue
                            sent_ids.extend(event.token_ids)
                            sent_text.append(event.text)
                            yield event
                        else:
                            if held is not None:
                                sent_ids.extend(held.token_ids)
                                sent_text.append(held.text)
                                yield held
                            self.counters.forwarded(node, "ok")
                            yield self._result(request, event, sent_ids, sent_text, started,
                                               first_token_at, resumed=attempt > 0 or stood_in)
                            return
                    raise _NodeGone(node, "stream ended without a result")
                except RequestRejected as exc:
                    # Not acknowledged (node/replication.py, node/server.py): asked again after
                    # a pause, the node answers from the turn's record once a copy is stored;
                    # a fenced copy waits for re-sharding, which may route elsewhere.
                    wait_s = exc.retry_after_s or 1.0
                    if (not not_acknowledged(exc) or attempt + 1 >= self.settings.max_attempts
                            or (deadline is not None and time.monotonic() + wait_s >= deadline)):
                        raise
                    self.counters.forwarded(node, "not_acknowledged")
                    log.warning("request %s on %s was not acknowledged after %d tokens (%s); "
                                "asking again", request.request_id, node, len(sent_ids), exc)
                    self.counters.retried("resume" if sent_ids else "retry")
                    unacknowledged = True
                    timeline.mark(f"{node} did not acknowledge it")
                    await asyncio.sleep(wait_s)
                except (_NodeGone, grpc.aio.AioRpcError) as exc:
                    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
                    if code is not None and code not in _RETRYABLE:
                        self.counters.forwarded(node, "error")
                        raise
                    self.counters.forwarded(node, "node_failed")
                    if deadline is not None and time.monotonic() >= deadline:
                        raise RequestRejected(grpc.StatusCode.DEADLINE_EXCEEDED, "",
                                              "deadline passed while the request was retried"
                                              ) from exc
                    log.warning("request %s on %s failed after %d tokens (%s); %s",
                                request.request_id, node, len(sent_ids),
                                code.name if code else exc,
                                "resuming" if sent_ids else "retrying")
                    timeline.mark(f"{node} failed ({code.name if code else exc})")
                    await self.node_failed(node, abandon=not isinstance(exc, _NodeGone)
                                           or exc.abandon)
                    timeline.mark("routing ring updated")
                    if attempt + 1 < self.settings.max_attempts:
                        self.counters.retried("resume" if sent_ids else "retry")
        raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "",
                              f"no node completed the request in {self.settings.max_attempts} "
                              "attempts", retry_after_s=1.0)

    def _move_wait_s(self, deadline: float | None) -> float:
        """How long a request may wait for its session's move from now: as long as for a
        first token, and not past its deadline (a stalled move must not hold its turns for
        as long as the move's calls may take)."""
        wait_s = self.settings.first_token_timeout_s
        if deadline is not None:
            wait_s = min(wait_s, deadline - time.monotonic())
        return max(0.0, wait_s)

    def _still_moving(self, sid: str, since: float,
                      deadline: float | None) -> RequestRejected:
        """The error of a request that waited (from ``since``) for its session's move as
        long as it may."""
        waited = time.monotonic() - since
        if deadline is not None and time.monotonic() >= deadline:
            return RequestRejected(grpc.StatusCode.DEADLINE_EXCEEDED, "",
                                   f"deadline passed after {waited:.1f} s waiting for session "
                                   f"{sid} to move")
        return RequestRejected(grpc.StatusCode.UNAVAILABLE, "",
                               f"session {sid} is still moving after {waited:.1f} s",
                               retry_after_s=1.0)

    # -- a session turn on a stand-in (coordinator/session_offload.py) ------------------------

    async def _stand_in_plan(self, request: pb.GenerateRequest, sid: str) -> _StandInPlan | None:
        """Where the session's turn runs when its owner is over its bound and another node
        under its own holds most of the turn's prompt; None: on the owner, as always."""
        if not self.settings.session_offload or not len(self.ring):
            return None
        owner, eps = self.ring.lookup(sid), self.settings.load_eps
        scheme = self._hash_scheme()
        if scheme is None or owner not in self.members or not may_stand_in(
                self.ring, owner, self.inflight, eps):
            return None
        until, below = self._room.get(owner, (0.0, 0))
        if time.monotonic() < until and self.inflight.get(owner, 0) < below:
            return None  # it said lately that its batch has room for this many
        try:
            prepared = await self.peers.stub(self.members[owner].address).PrepareTurn(
                request, timeout=_TOKENIZE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return None  # the owner answers (or fails) the turn itself, as without a stand-in
        if not prepared.would_wait:  # its batch has room: the turn starts there at once, with its KV
            self._room[owner] = (time.monotonic() + _ROOM_BELIEVED_S,
                                 self.inflight.get(owner, 0) + prepared.free_slots)
            return None
        if prepared.busy or not len(self.ring) or self.ring.lookup(sid) != owner:
            return None  # a turn runs there now (it must finish first), or the owner changed
        hashes = hash_token_blocks(prepared.token_ids, scheme.block_size, request.tenant,
                                   scheme.chain_root)
        choice = choose_stand_in(self.ring, sid, owner, hashes, self.block_index, self.inflight,
                                 eps)
        if choice is None:
            return None
        return _StandInPlan(choice.node, owner, prepared.turns, list(prepared.token_ids))

    async def _run_on_stand_in(self, request: pb.GenerateRequest, plan: _StandInPlan,
                               deadline: float | None, relay: _Relay) -> AsyncIterator[Event]:
        """Run the turn on ``plan.node`` as a generation without a session over the turn's
        token ids, relaying its chunks, then append it to the owner and only then send the
        result. ``relay.done`` stays False when the stand-in failed before its result: the
        caller has the owner run the rest. The chunk reaching ``max_length`` is held back
        until the turn is recorded, so a resumed owner still has a token to generate."""
        forward = pb.GenerateRequest()
        forward.CopyFrom(request)
        forward.ClearField("session_id")
        forward.full_context = False
        del forward.resume_token_ids[:]
        forward.token_ids.ids[:] = plan.token_ids
        held: pb.TokenChunk | None = None
        result: pb.GenerateResult | None = None
        try:
            async for event in self._forward(plan.node, forward, deadline):
                if isinstance(event, pb.TokenChunk):
                    relay.first_token_at = relay.first_token_at or time.monotonic()
                    if len(relay.ids) + len(event.token_ids) >= request.sampling.max_length:
                        held = event
                        continue
                    relay.ids.extend(event.token_ids)
                    relay.texts.append(event.text)
                    yield event
                else:
                    result = event
        except (_NodeGone, grpc.aio.AioRpcError, RequestRejected) as exc:
            code = (exc.code() if isinstance(exc, grpc.aio.AioRpcError)
                    else exc.code if isinstance(exc, RequestRejected) else None)
            self.counters.forwarded(plan.node, "node_failed")
            log.warning("session %s's turn on stand-in %s failed after %d tokens (%s); its "
                        "owner %s runs it", request.session_id, plan.node, len(relay.ids),
                        code.name if code else exc, plan.owner)
            if code is None or code in _RETRYABLE:
                await self.node_failed(plan.node)
            return
        if result is None:
            return
        self.counters.forwarded(plan.node, "ok")
        final = pb.GenerateResult()
        final.CopyFrom(result)
        final.session_id = request.session_id
        output = relay.ids + (list(held.token_ids) if held is not None else [])
        del final.token_ids[:]
        final.token_ids.extend(output)  # what the client gets is what the owner records
        if final.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH):
            try:
                await self._commit_turn(request, plan, final)
            except RequestRejected:
                self.counters.stood_in("not_recorded")
                raise
            self.counters.stood_in("served")
        # else the turn did not complete (aborted, failed): nothing to record, as on the owner
        if held is not None:
            relay.ids.extend(held.token_ids)
            relay.texts.append(held.text)
            yield held
        relay.done = True
        yield final

    async def _commit_turn(self, request: pb.GenerateRequest, plan: _StandInPlan,
                           result: pb.GenerateResult) -> None:
        """Append the stand-in's turn to the session's owner (``NodeService.CommitTurn``,
        conditional on the turn version the turn ran from). An owner that fails is taken off
        the ring and the commit goes to the new owner once the session's restore is done (the
        version decides there too); a refusal (another turn ran meanwhile) fails the turn,
        unrecorded: the client sends it again. A commit repeated after a lost answer is a
        no-op on the owner."""
        sid = request.session_id
        commit = npb.CommitTurnRequest(request=request, turns=plan.turns,
                                       prompt_token_ids=plan.token_ids, result=result)
        node = plan.owner
        for attempt in range(self.settings.max_attempts):
            if attempt:
                await self._restore_settled(sid, None)
                if not len(self.ring):
                    break
                node = self.ring.lookup(sid)
            address = self.members[node].address if node in self.members else None
            if address is None:
                continue
            try:
                await self.peers.stub(address).CommitTurn(
                    commit, timeout=self.settings.stall_timeout_s)
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                field = dict(exc.trailing_metadata() or ()).get("ultrakv-field", "")
                if superseded(RequestRejected(code, field, exc.details() or "")):
                    # Fenced: the session moved on without that node (its view was stale).
                    await self.node_failed(node, abandon=False)
                    continue
                if code is grpc.StatusCode.ABORTED and len(self.ring) and self.ring.lookup(sid) != node:
                    continue  # the session moved: its new owner decides by the same version
                if code is grpc.StatusCode.ABORTED:
                    raise RequestRejected(grpc.StatusCode.ABORTED, "session_id",
                                          f"{exc.details()}; send the turn again") from None
                if code not in _RETRYABLE and code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise RequestRejected(code, "", exc.details() or code.name) from None
                log.warning("recording session %s's turn on %s failed (%s)", sid, node, code.name)
                await self.node_failed(node)
        # A commit that timed out may have been applied: the owner's turn ledger answers a
        # retry with the same request id from its record instead of running it again.
        raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "session_id",
                              f"session {sid}'s turn ran on {plan.node} but its owner did not "
                              "confirm recording it; send it again with the same request_id",
                              retry_after_s=1.0)

    async def _restore_settled(self, sid: str, deadline: float | None) -> None:
        """Ask for the session's restore now and wait until it has settled, at most as long
        as a request may wait for a move (then UNAVAILABLE, see :meth:`_still_moving`)."""
        self._expedite(sid, live=False)
        waiting = time.monotonic()
        try:
            async with asyncio.timeout(self._move_wait_s(deadline)):
                await self.gate.settled(sid, live=False)
        except TimeoutError:
            raise self._still_moving(sid, waiting, deadline) from None

    async def _completed_on(self, node: str, request: pb.GenerateRequest,
                            output: list[int]) -> pb.Usage | None:
        """The usage of the turn if ``node``'s history of the session already ends with the
        turn's whole ``output`` (the turn was replicated, or moved with its history, before
        its node answered), else None. The usage is the turn's record's when the history
        carries it (exact, cached tokens included), else counted from the history."""
        session_id = request.session_id
        try:
            stub = self.peers.stub(self.members[node].address)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.PromoteReplica(npb.PromoteReplicaRequest(session_id=session_id),
                                          timeout=5)
            chunks = [c async for c in stub.ExportSession(
                npb.ExportSessionRequest(session_id=session_id, include_kv=False), timeout=5)]
        except (grpc.aio.AioRpcError, KeyError):
            return None
        header = chunks[0].header if chunks else npb.SessionHeader()
        history = list(header.token_ids)
        if not (len(history) > len(output) and history[-len(output):] == output):
            return None
        record = header.last_result
        usage = pb.Usage()
        if (header.HasField("last_result") and record.request_id == request.request_id
                and list(record.token_ids) == output):
            usage.CopyFrom(record.usage)
        else:
            usage.prompt_tokens = len(history) - len(output)
        usage.completion_tokens = len(output)
        return usage

    def _result(self, request: pb.GenerateRequest, result: pb.GenerateResult,
                sent_ids: list[int], sent_text: list[str], started: float,
                first_token_at: float, resumed: bool = True) -> pb.GenerateResult:
        """The client's result: a resumed request's result covers every token it was sent,
        and its usage counts the turn's prompt once (the resumed attempt's prompt also held
        the tokens earlier attempts streamed)."""
        if not resumed:
            return result
        out = pb.GenerateResult()
        out.CopyFrom(result)
        before = len(sent_ids) - len(result.token_ids)  # tokens streamed by earlier attempts
        if before > 0:
            del out.token_ids[:]
            out.token_ids.extend(sent_ids)
            out.text = "".join(sent_text)
            out.usage.prompt_tokens = max(0, result.usage.prompt_tokens - before)
            out.usage.completion_tokens = len(sent_ids)
            out.usage.cached_tokens = min(result.usage.cached_tokens, out.usage.prompt_tokens)
        now = time.monotonic()
        out.timings.ttft_ms = 1000.0 * ((first_token_at or now) - started)
        out.timings.latency_ms = 1000.0 * (now - started)
        return out

    async def _forward(self, node: str, request: pb.GenerateRequest,
                       deadline: float | None) -> AsyncIterator[Event]:
        """One attempt on ``node``: its events, until the result.

        Raises ``_NodeGone`` when the node sends nothing within the first-token deadline, then
        nothing for the stall deadline between messages, or is marked down meanwhile (health
        or another request's failure): a stalled node's requests move on at once instead of
        hanging for as long as it stays stopped.
        """
        record = self.members.get(node)
        if record is None:
            raise _NodeGone(node, "left the cluster")
        forwarded = pb.GenerateStreamRequest(generate=request)
        _set_node_deadline(forwarded, request.timeout_ms, deadline)
        incarnation = (record.address, record.started_at)
        link: NodeLink | None = None
        receiver: Receiver | None = None
        call: Any = None
        if incarnation in self._generate_only:
            call = self._generate_call(record.address, forwarded, deadline)
            messages = call.__aiter__()
        else:
            link = self._link(node, incarnation, request.request_id)
            messages = receiver = link.submit(forwarded)
        attempt = _Attempt()
        self._attempts.setdefault(node, set()).add(attempt)
        self.inflight[node] = self.inflight.get(node, 0) + 1
        wait_s = self.settings.first_token_timeout_s
        reopened = 0
        try:
            while True:
                try:
                    message = await attempt.read(messages, wait_s, node)
                except grpc.aio.AioRpcError as exc:
                    if (exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and link is not None
                            and receiver is not None and not receiver.started and reopened < 3):
                        # The node closed the lingering link for idleness (its
                        # stream_idle_timeout_s, below the link's linger) as the request went
                        # out; a request on a stream has no deadline of its own there. Sent
                        # again on a new link: a turn is answered from the node's record if
                        # it had begun.
                        reopened += 1
                        link, receiver = self._relink(node, incarnation, link, receiver, forwarded,
                                                      request.timeout_ms, deadline)
                        messages = receiver
                        continue
                    if link is None or receiver is None or receiver.started:
                        raise
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        log.info("node %s has no GenerateMany (an older version): forwarding "
                                 "to it over a Generate stream per request", node)
                        self._generate_only.add(incarnation)
                    elif not (exc.code() == grpc.StatusCode.INTERNAL and not link.heard):
                        raise
                    # else gRPC's own INTERNAL on a link that never heard from the node: what
                    # an older node's UNIMPLEMENTED turns into when it ends the call as the
                    # request is written (stream_link.py); this request goes on a call of its
                    # own, and the next link finds out.
                    link.release(request.request_id, receiver)
                    link = None
                    call = self._generate_call(record.address, forwarded, deadline)
                    messages = call.__aiter__()
                    continue
                if message is None:
                    if (link is not None and receiver is not None and not receiver.started
                            and reopened < 3):
                        # The node ended the link unread: idle as it began to stop. A new
                        # link finds it gone (or still serving, if it was a restart).
                        reopened += 1
                        link, receiver = self._relink(node, incarnation, link, receiver, forwarded,
                                                      request.timeout_ms, deadline)
                        messages = receiver
                        continue
                    raise _NodeGone(node, "stream ended without a result")
                wait_s = self.settings.stall_timeout_s
                kind = message.WhichOneof("event")
                if kind == "chunk" and not (message.chunk.token_ids or message.chunk.text):
                    continue  # a heartbeat: the node waits for its successors' copies
                if kind == "chunk":
                    yield message.chunk
                elif kind == "result":
                    yield message.result
                    return
                else:
                    rejected = RequestRejected.from_detail(message.error)
                    if superseded(rejected):  # fenced: the session moved on without it
                        raise _NodeGone(node, "no longer owns the session", abandon=False)
                    if node_failing(rejected):  # its engine is gone: it is stopping
                        raise _NodeGone(node, rejected.message)
                    raise rejected
        finally:
            attempt.close()
            self.inflight[node] -= 1
            self._attempts[node].discard(attempt)
            if link is not None and receiver is not None:
                link.release(request.request_id, receiver)  # cancels it there when we stop early
            if call is not None:
                call.cancel()  # no-op when finished; frees the node's blocks when we stop early

    def _relink(self, node: str, incarnation: tuple[str, float], link: NodeLink,
                receiver: Receiver, forwarded: pb.GenerateStreamRequest, own_ms: int,
                deadline: float | None) -> tuple[NodeLink, Receiver]:
        """``forwarded`` again on a new link, with the time now left: the node ended
        ``link`` before reading it."""
        link.release(forwarded.generate.request_id, receiver)
        _set_node_deadline(forwarded, own_ms, deadline)
        link = self._link(node, incarnation, forwarded.generate.request_id)
        return link, link.submit(forwarded)

    def _link(self, node: str, incarnation: tuple[str, float], request_id: str) -> NodeLink:
        """A GenerateMany stream to ``node`` that may take ``request_id`` (opened if none)."""
        links = self._links.setdefault(node, [])
        for held, link in links:
            if held == incarnation and link.accepts(request_id):
                return link
        entry: tuple[tuple[str, float], NodeLink]

        def closed(_: NodeLink) -> None:
            with contextlib.suppress(ValueError):
                links.remove(entry)

        entry = (incarnation, NodeLink(self.peers.stub(incarnation[0]), closed))
        links.append(entry)
        return entry[1]

    def _generate_call(self, address: str, forwarded: pb.GenerateStreamRequest,
                       deadline: float | None) -> Any:
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        return self.peers.stub(address).Generate(iter([forwarded]), timeout=timeout)

    def _abandon(self, node: str) -> None:
        """``node`` is down: its forwards in flight give up now and move elsewhere, and the
        session moves that involve it give up (the new ring plans them again)."""
        for attempt in list(self._attempts.get(node, ())):
            attempt.abandon()
        for _, link in self._links.pop(node, []):
            link.close()
        now = asyncio.get_running_loop().time()
        for timeout in list(self._moving.get(node, ())):
            if not timeout.expired():
                timeout.reschedule(now)

    async def _node_stats(self, node: str) -> pb.NodeStats | None:
        try:
            return await self.peers.stub(self.members[node].address).Stats(
                pb.StatsRequest(), timeout=2.0)
        except (grpc.aio.AioRpcError, KeyError):
            return None

    async def stats(self) -> pb.StatsResponse:
        nodes = sorted(self.members)
        found = await asyncio.gather(*(self._node_stats(n) for n in nodes))
        return pb.StatsResponse(nodes=[s for s in found if s is not None])

    async def _each(self, call) -> list:
        """``call(stub)`` on every member that answers."""
        async def one(node: str):
            try:
                return await call(self.peers.stub(self.members[node].address))
            except (grpc.aio.AioRpcError, KeyError):
                return None
        return [r for r in await asyncio.gather(*(one(n) for n in sorted(self.members)))
                if r is not None]

    async def clear_cache(self) -> int:
        replies = await self._each(lambda s: s.ClearCache(pb.ClearCacheRequest(), timeout=10))
        return sum(r.blocks_freed for r in replies)

    async def cleanup_sessions(self, max_age_s: float) -> int:
        replies = await self._each(lambda s: s.CleanupSessions(
            pb.CleanupSessionsRequest(max_age_s=max_age_s), timeout=10))
        return sum(r.removed for r in replies)

    async def get_session(self, session_id: str, tenant: str | None) -> pb.SessionInfo:
        """The owner's info of the session (``tenant``'s only, unless None: an admin)."""
        await self.gate.settled(session_id)
        node = self.ring.lookup(session_id) if len(self.ring) else None
        if node is not None and node in self.members:
            try:
                return await self.peers.stub(self.members[node].address).GetSession(
                    pb.GetSessionRequest(session_id=session_id, tenant=tenant or "",
                                         any_tenant=tenant is None), timeout=5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    # The owner failing over: UNAVAILABLE, which clients retry (the node's own
                    # error, re-raised, reached them as UNKNOWN with gRPC's internal text).
                    raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "session_id",
                                          f"session_id {session_id!r}: its node {node} did not answer "
                                          f"({exc.code().name}); retry", retry_after_s=1.0) from None
        raise SessionNotFoundError(session_id)

    async def delete_session(self, session_id: str, tenant: str | None) -> None:
        """Delete every copy (the owner's and any stale one) that ``tenant`` owns (any
        tenant's when None: an admin). Every member is asked: one that does not answer may
        hold a copy (a dead owner's comes back from its replica or checkpoint), so the delete
        then fails UNAVAILABLE, to be sent again, rather than report a success it lacks."""
        request = pb.DeleteSessionRequest(session_id=session_id, tenant=tenant or "",
                                          any_tenant=tenant is None)

        async def one(node: str) -> str:
            try:
                await self.peers.stub(self.members[node].address).DeleteSession(request, timeout=5)
                return "deleted"
            except KeyError:
                return "left"  # left the cluster meanwhile
            except grpc.aio.AioRpcError as exc:
                return "absent" if exc.code() == grpc.StatusCode.NOT_FOUND else node

        async with self.gate.turn(session_id):
            outcomes = await asyncio.gather(*(one(n) for n in sorted(self.members)))
        delete_outcome(session_id, outcomes)

    def export_sessions(self, history_only: bool) -> AsyncIterator[ultrakv_pb2.BackupPart]:
        """A backup of every session (coordinator/session_backup.py)."""
        return self.backup.export(history_only)

    async def import_sessions(self, runs: AsyncIterator[list[npb.SessionChunk]]
                              ) -> ultrakv_pb2.ImportSessionsResponse:
        """A restore: each session on its current owner (coordinator/session_backup.py)."""
        return await self.backup.import_runs(runs)


class _Timeline:
    """What one request waited for, and when (logged when it took long, to tell a wait for a
    session's move from a slow node or a retry)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.marks: list[tuple[float, str]] = []

    def mark(self, what: str) -> None:
        self.marks.append((time.monotonic() - self.started, what))

    def log_if_slow(self, request: pb.GenerateRequest) -> None:
        took = time.monotonic() - self.started
        if took >= _SLOW_REQUEST_S:
            log.warning("request %s (session %s) took %.1f s: %s", request.request_id,
                        request.session_id or "-", took,
                        "; ".join(f"{t:.1f} s {what}" for t, what in self.marks) or "no mark")


@dataclass(frozen=True)
class _StandInPlan:
    """A session turn to run on ``node`` instead of its overloaded ``owner``: the turn's
    token ids and the session's turn version there, as the owner prepared them."""

    node: str
    owner: str
    turns: int
    token_ids: list[int]


@dataclass
class _Relay:
    """What a stand-in streamed to the client so far (``done``: the turn is answered)."""

    ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    first_token_at: float = 0.0
    done: bool = False


def _set_node_deadline(forwarded: pb.GenerateStreamRequest, own_ms: int, deadline: float | None) -> None:
    """The node's own deadline for a forward (its stream has none per request)."""
    if deadline is not None:
        forwarded.generate.timeout_ms = timeout_ms_left(own_ms, deadline)


class _Attempt:
    """One forward in flight: its reads wait at most a deadline each, and ``abandon`` (the
    node was marked down) ends the read in progress, or the next one, at once.

    One timer per attempt, not one per read: a relayed message is the coordinator's hottest
    path, and a timeout per read cost a timer handle and its heap operations each time. A
    read only notes when it began; the timer, when it fires, ends a read that has waited its
    deadline or re-arms at the deadline of the read in progress, so it fires about once per
    deadline however many messages pass.
    """

    def __init__(self) -> None:
        self.abandoned = False
        self._began: float | None = None  # loop time the read in progress began; None: none
        self._wait_s = 0.0
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._interrupting = False  # this attempt cancelled its task, to end a read

    def abandon(self) -> None:
        self.abandoned = True
        self._interrupt()

    def close(self) -> None:
        """The forward is over: its timer goes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _interrupt(self) -> None:
        if self._began is not None and not self._interrupting and self._task is not None:
            self._interrupting = True  # once is enough
            self._task.cancel()

    def _on_timer(self) -> None:
        self._timer = None
        if self._began is None:
            return  # between reads: the next read arms it again
        loop = asyncio.get_running_loop()
        due = self._began + self._wait_s
        if loop.time() >= due:
            self._interrupt()
        else:
            self._timer = loop.call_at(due, self._on_timer)

    async def read(self, messages: AsyncIterator[Any], wait_s: float, node: str) -> Any:
        """The next message, or None at the end of the stream."""
        if self.abandoned:
            raise _NodeGone(node, "was marked down")
        loop = asyncio.get_running_loop()
        task = self._task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        now = loop.time()
        self._began, self._wait_s = now, wait_s
        if self._timer is None or self._timer.when() > now + wait_s:  # a shorter deadline
            self.close()
            self._timer = loop.call_at(now + wait_s, self._on_timer)
        try:
            # The interrupt comes only while this read waits, never during a yield to the
            # caller: it cancels whatever the task awaits.
            return await anext(messages)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if not self._interrupting:
                raise
            self._interrupting = False
            if task.uncancel() > cancelling:
                raise  # cancelled by someone else too: the caller's cancellation wins
            self.close()
            why = "was marked down" if self.abandoned else f"sent nothing for {wait_s:g} s"
            raise _NodeGone(node, why) from None
        finally:
            self._began = None


class _NodeGone(Exception):
    """A node stopped answering a forwarded request."""

    def __init__(self, node: str, why: str, abandon: bool = True) -> None:
        super().__init__(f"node {node} {why}")
        self.node = node
        # Give up the node's other forwards too (it stopped answering); False: it answers,
        # only this session has moved on without it.
        self.abandon = abandon


READINESS_POLL_S = 0.5  # how often the client service's gRPC health follows the ring


class CoordinatorServer:
    """The coordinator's gRPC server: UltraKV over a ClusterBackend, health, reflection."""

    def __init__(self, settings: CoordinatorSettings,
                 interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()) -> None:
        self.settings = settings
        self.backend = ClusterBackend(settings)
        self.security = EdgeSecurity(settings.security)
        self.interceptors = interceptors
        self.health = HealthService()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self.http: HttpServer | None = None
        self._readiness: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"{dial_host(self.settings.host)}:{self.port}"

    def _not_ready(self) -> str | None:
        if self._server is None:
            return "the coordinator is not serving (starting or stopping)"
        if not len(self.backend.ring):
            return "no node is serving: the routing ring is empty"
        return None

    @property
    def listen_address(self) -> str:
        """The socket's own address (``0.0.0.0:PORT`` = every interface)."""
        return listen_address(self.settings.host, self.port)

    async def start(self) -> int:
        """Join the cluster view, then listen; returns the bound port. A taken port fails
        first (:class:`PortInUseError` naming the holder), before etcd is contacted."""
        check_server_ports(self.settings.host, self.settings.port, self.settings.metrics_port,
                           self.settings.http_port, "coordinator")
        await self.backend.start()
        server = grpc.aio.server(
            options=[*server_options(CLIENT_STREAMS_PER_CONNECTION), *GRPC_SERVER_OPTIONS],
            interceptors=(EdgeSecurityInterceptor(self.security, self.settings.limits),
                          *self.interceptors))
        sec = self.settings.security
        for warning in exposure_warnings(self.settings.host, self.settings.port,
                                         clients_authenticated=bool(sec.keys_file),
                                         tls=bool(sec.tls_cert)):
            log.warning(warning)
        self._servicer = UltraKVServicer(self.backend, self.settings.limits, self.settings.stream_pacing)
        add_servicer(server, self._servicer, ULTRAKV_SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (ULTRAKV_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        bind = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = (server.add_secure_port(bind, server_credentials(
                sec.tls_cert, sec.tls_key, sec.tls_client_ca)) if sec.tls_cert
                else server.add_insecure_port(bind))
        except RuntimeError:  # taken between the check and the bind
            await self.backend.stop()
            raise PortInUseError(port_in_use_message(self.settings.host, self.settings.port,
                                                     "coordinator")) from None
        await server.start()
        self._server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)  # alive
        await self._report_readiness()
        self._readiness = asyncio.create_task(self._watch_readiness(), name="coordinator-readiness")
        registry = CollectorRegistry()  # own registry: several servers in one process
        registry.register(CoordinatorCollector(self.backend))
        registry.register(self.security.events)
        if self.settings.metrics_port:
            self._metrics_http = serve_metrics(self.settings.metrics_port, registry,
                                               self.settings.host)
        if self.settings.http_port:
            self.http = HttpServer(ApiHost(self.backend, self.settings.limits, self.backend.models,
                                           self._not_ready, registry, security=self.security),
                                   self.settings.host, self.settings.http_port,
                                   self.settings.grace_period_s,
                                   TlsFiles(sec.tls_cert, sec.tls_key, sec.tls_client_ca)
                                   if sec.tls_cert else None)
            try:
                await self.http.start()
            except OSError:
                await self.stop()
                raise
            log.info("OpenAI-compatible API on %s://%s:%d/v1", self.http.scheme,
                     dial_host(self.settings.host), self.http.port)
        return self.port

    async def _report_readiness(self) -> None:
        """The client service's gRPC health: SERVING only while a node is on the routing ring
        (as HTTP /health), so a readiness probe over gRPC (the chart's, with the HTTP port off)
        does not pass on an empty ring; the overall service ("") stays SERVING (liveness)."""
        status = (health_pb2.HealthCheckResponse.NOT_SERVING if self._not_ready()
                  else health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(ULTRAKV_SERVICE, status)

    async def _watch_readiness(self) -> None:
        while True:
            await asyncio.sleep(READINESS_POLL_S)
            await self._report_readiness()

    async def stop(self) -> None:
        await cancel_task(self._readiness)
        self._readiness = None
        server, self._server = self._server, None  # /health answers 503 from here on
        http, self.http = self.http, None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

        async def stop_grpc() -> None:
            if server is not None:
                await self.health.enter_graceful_shutdown()
                self._servicer.stop_idle_streams()  # idle client links end now, not after the grace
                await server.stop(self.settings.grace_period_s)

        await all_of(http.stop() if http is not None else asyncio.sleep(0), stop_grpc())
        await self.backend.stop()


async def serve_coordinator(settings: CoordinatorSettings) -> None:
    """Run a coordinator until SIGINT/SIGTERM."""
    server = CoordinatorServer(settings)
    await server.start()
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.security.reload_keys)
    log.info("coordinator listening on %s (clients dial %s; etcd %s)", server.listen_address,
             server.address, settings.etcd)
    await stop.wait()
    exit_on_second_signal(loop)
    await server.stop()


async def drain_node(store: EtcdStore, node_id: str, peers: PeerChannels | None = None,
                     timeout_s: float = 60.0) -> int:
    """Mark ``node_id`` draining and wait until it holds no session; returns how many it had.

    Coordinators take a draining node off the ring and stream its sessions away live.
    """
    key = NODES_PREFIX + node_id
    kv = await store.get(key)
    if kv is None:
        raise LookupError(f"node {node_id!r} is not registered")
    record = NodeRecord.from_json(kv.value)
    draining = replace(record, state=NodeState.DRAINING)
    if not await store.txn([Compare(key, "mod", "==", kv.mod_revision)],
                           [Put(key, draining.to_json(), kv.lease or None)]):
        raise RuntimeError(f"node {node_id!r} changed while being marked draining; retry")
    own = peers is None
    peers = peers or PeerChannels()
    stub = peers.stub(record.address)

    async def owned() -> int:  # the replicas it holds for others stay: they are not its own
        listed = await stub.ListSessions(npb.ListSessionsRequest(), timeout=5)
        return sum(not s.replica for s in listed.sessions)

    try:
        first = await owned()
        end = time.monotonic() + timeout_s
        while True:
            left = await owned()
            if left == 0:
                return first
            if time.monotonic() > end:
                raise TimeoutError(f"node {node_id!r} still holds {left} sessions after "
                                   f"{timeout_s:.0f} s of draining")
            await asyncio.sleep(0.2)
    finally:
        if own:
            await peers.close()
