"""Cluster membership in etcd: node registration under a lease, and the coordinators' ring.

A node writes ``nodes/<id>`` (a JSON ``NodeRecord``) bound to a lease it keeps alive; when
the node dies the lease expires and the key disappears. Coordinators run a
``MembershipWatcher`` that reads the members, watches ``nodes/`` and keeps a ``HashRing``
of the serving nodes. Ring epochs are agreed through ``ring/epoch`` with a compare-and-swap,
so every coordinator gives the same ring the same epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

from ultrakv.cluster.ring import DEFAULT_VNODES, HashRing
from ultrakv.cluster.store import (
    Compare,
    EtcdStore,
    EtcdUnavailableError,
    KeyValue,
    Lease,
    Put,
    key_absent,
)
from ultrakv.cluster.tasks import cancel_task

log = logging.getLogger(__name__)

NODES_PREFIX = "nodes/"
RING_EPOCH_KEY = "ring/epoch"
DEFAULT_TTL_S = 5


class NodeState(StrEnum):
    """Lifecycle of a node: only ``serving`` nodes are on the ring."""

    JOINING = "joining"
    SERVING = "serving"
    DRAINING = "draining"


@dataclass(frozen=True)
class NodeRecord:
    """What a node publishes about itself under ``nodes/<id>``."""

    id: str
    address: str
    pid: int
    devices: tuple[str, ...] = ()
    kv_capacity_blocks: int = 0
    state: NodeState = NodeState.JOINING
    started_at: float = field(default_factory=time.time)
    model: str = ""  # the served model's name, as the OpenAI API lists it

    def __post_init__(self) -> None:
        if not self.id or "/" in self.id:
            raise ValueError(f"id must be non-empty and contain no '/', got {self.id!r}")
        if not self.address:
            raise ValueError("address must be non-empty (HOST:PORT of the node's gRPC server)")
        if self.kv_capacity_blocks < 0:
            raise ValueError(f"kv_capacity_blocks must be >= 0, got {self.kv_capacity_blocks}")
        object.__setattr__(self, "state", NodeState(self.state))
        object.__setattr__(self, "devices", tuple(self.devices))

    def to_json(self) -> bytes:
        """The stored form."""
        d = asdict(self)
        d["state"] = self.state.value
        d["devices"] = list(self.devices)
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NodeRecord:
        """Parse the stored form; raises ValueError on a malformed record."""
        try:
            d = json.loads(data)
            return cls(
                id=d["id"],
                address=d["address"],
                pid=int(d["pid"]),
                devices=tuple(d.get("devices", ())),
                kv_capacity_blocks=int(d.get("kv_capacity_blocks", 0)),
                state=NodeState(d.get("state", "joining")),
                started_at=float(d.get("started_at", 0.0)),
                model=str(d.get("model", "")),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"malformed node record: {e!r}") from e


class DuplicateNodeError(RuntimeError):
    """A node id is already registered by a live node."""

    def __init__(self, node_id: str, address: str):
        super().__init__(
            f"node id {node_id!r} is already registered and live (address {address}); "
            f"choose another --node-id or stop the other node"
        )
        self.node_id = node_id


class NodeRegistration:
    """A node's lease-bound entry ``nodes/<id>``.

    ``register()`` creates it only if absent (a transaction), then keeps the lease alive in
    the background. If etcd reports the lease gone (expired while the node was cut off or
    stopped, or etcd lost its data), ``on_lost`` is awaited (the node fences off its copies)
    and the entry is created again under a new lease.

    The registration also says whether the node can prove that it is still a member
    (:meth:`unproven`): a keepalive answered at ``t`` proves the lease alive until
    ``t + ttl`` (``t`` taken before the call was sent: etcd restarts the TTL on receipt).
    Past that, the lease may have expired unseen and a coordinator may have handed the
    node's sessions to others; the node must not acknowledge a session turn until a later
    keepalive, or a new registration, proves it a member again.
    """

    def __init__(self, store: EtcdStore, record: NodeRecord, ttl_s: int = DEFAULT_TTL_S,
                 on_lost: Callable[[], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1, got {ttl_s}")
        self.store = store
        self.record = record
        self.ttl_s = ttl_s
        self.on_lost = on_lost
        self.clock = clock
        self.lease: Lease | None = None
        self.registrations = 0  # how many times the entry was (re)created
        self.proven_until = float("-inf")  # clock() until which the lease is known alive
        self._proven = asyncio.Event()  # set at each proof
        self._task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return NODES_PREFIX + self.record.id

    def _prove(self, sent_at: float, ttl_s: int) -> None:
        self.proven_until = max(self.proven_until, sent_at + ttl_s)
        self._proven.set()

    def unproven(self) -> str | None:
        """Why the node cannot prove its lease alive now; None while it can."""
        if self.lease is None:
            return f"node {self.record.id} is not registered (its lease is gone)"
        late = self.clock() - self.proven_until
        if late < 0:
            return None
        return (f"node {self.record.id} cannot prove its lease alive: no keepalive answered "
                f"for {late + self.ttl_s:.1f} s (lease TTL {self.ttl_s} s)")

    async def wait_proven(self, timeout_s: float) -> str | None:
        """Wait up to ``timeout_s`` for the lease to be proven alive; the reason it is not
        (:meth:`unproven`) when the time is up, else None."""
        deadline = self.clock() + timeout_s
        while (reason := self.unproven()) is not None:
            left = deadline - self.clock()
            if left <= 0:
                return reason
            self._proven.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proven.wait(), min(left, 0.5))
        return None

    async def _create(self) -> None:
        sent_at = self.clock()
        lease = await self.store.grant_lease(self.ttl_s)
        created = await self.store.txn(
            [key_absent(self.key)], [Put(self.key, self.record.to_json(), lease.id)]
        )
        if not created:
            await self.store.revoke_lease(lease.id)
            existing = await self.store.get(self.key)
            address = NodeRecord.from_json(existing.value).address if existing else "?"
            raise DuplicateNodeError(self.record.id, address)
        self.lease = lease
        self.registrations += 1
        self._prove(sent_at, lease.ttl_s)
        log.info("node %s registered (lease %x, ttl %d s)", self.record.id, lease.id, lease.ttl_s)

    async def register(self) -> None:
        """Create the entry and start the keepalive; raises ``DuplicateNodeError``."""
        await self._create()
        self._task = asyncio.create_task(self._keep_registered(), name=f"lease-{self.record.id}")

    async def _keep_alive(self) -> None:
        """Refresh the lease every third of its TTL, proving it alive at each answer; return
        once etcd says it is gone. While etcd is unreachable it keeps trying (etcd does not
        age leases while it is down; the node's proof runs out meanwhile)."""
        assert self.lease is not None
        lease = self.lease
        interval = max(0.2, lease.ttl_s / 3.0)
        while True:
            sent_at = self.clock()
            try:
                remaining = await self.store.refresh_lease(lease.id)
            except EtcdUnavailableError as e:
                log.warning("lease %x keepalive: %s; retrying", lease.id, e)
                await asyncio.sleep(min(interval, 0.5))
                continue
            if remaining <= 0:
                return
            self._prove(sent_at, lease.ttl_s)
            # Every third of the TTL from the last send, however long etcd took to answer:
            # the proof runs out a TTL after that send.
            await asyncio.sleep(max(0.0, sent_at + interval - self.clock()))

    async def _keep_registered(self) -> None:
        while True:
            await self._keep_alive()
            log.warning("node %s lost its lease %x (it expired while the node was cut off or "
                        "stopped, or etcd lost it): registering again", self.record.id,
                        self.lease.id if self.lease else 0)
            self.lease = None
            if self.on_lost is not None:
                try:
                    await self.on_lost()
                except Exception:  # registering again must not depend on it
                    log.exception("node %s: handling the lost lease failed", self.record.id)
            while True:
                try:
                    await self._create()
                    break
                except EtcdUnavailableError as e:
                    log.warning("node %s re-registering: %s", self.record.id, e)
                    await asyncio.sleep(0.5)
                except DuplicateNodeError as e:
                    # Another process took our id while we were cut off: it wins.
                    log.error("node %s lost its registration: %s", self.record.id, e)
                    return

    async def set_state(self, state: NodeState) -> None:
        """Publish a new lifecycle state (e.g. serving once the model is loaded)."""
        self.record = replace(self.record, state=state)
        if self.lease is not None:
            await self.store.put(self.key, self.record.to_json(), lease=self.lease.id)

    async def deregister(self) -> None:
        """Stop the keepalive and revoke the lease, removing the entry at once."""
        await cancel_task(self._task)
        self._task = None
        if self.lease is not None:
            lease, self.lease = self.lease, None
            try:
                await self.store.revoke_lease(lease.id)
            except EtcdUnavailableError as e:
                log.warning("node %s deregister: %s; the lease will expire", self.record.id, e)


RingCallback = Callable[[HashRing, HashRing], Awaitable[None] | None]
MembersCallback = Callable[[Mapping[str, NodeRecord]], Awaitable[None] | None]


async def _call(cb: Callable[..., Awaitable[None] | None] | None, *args: object) -> None:
    if cb is None:
        return
    try:
        result = cb(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        # A failing subscriber must not stop membership tracking for everyone else.
        log.exception("membership callback %r failed", cb)


class MembershipWatcher:
    """A coordinator's view of the members and the ring of serving nodes.

    ``start()`` reads ``nodes/`` (raising ``EtcdUnavailableError`` if etcd is unreachable),
    then a background task watches it. Each change of the serving set builds a new ring under
    the next epoch and calls ``on_ring_change(old, new)``; every member change calls
    ``on_members(members)``. If etcd goes away the last ring stays in force and the task
    re-reads and re-watches once etcd answers again.
    """

    def __init__(
        self,
        store: EtcdStore,
        on_ring_change: RingCallback | None = None,
        on_members: MembersCallback | None = None,
        vnodes: int = DEFAULT_VNODES,
        ring_states: Collection[NodeState] = (NodeState.SERVING,),
        retry_interval_s: float = 0.5,
    ):
        self.store = store
        self.on_ring_change = on_ring_change
        self.on_members = on_members
        self.vnodes = vnodes
        self.ring_states = frozenset(ring_states)
        self.retry_interval_s = retry_interval_s
        self.ring = HashRing((), vnodes=vnodes, epoch=0)
        self.members: dict[str, NodeRecord] = {}
        self.connected = False
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        """Load the members and start watching."""
        revision = await self._resync()
        self._task = asyncio.create_task(self._run(revision), name="membership-watch")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None

    async def wait_for(
        self, predicate: Callable[[MembershipWatcher], bool], timeout_s: float
    ) -> None:
        """Wait until ``predicate(self)`` holds after some change; TimeoutError otherwise."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self)), timeout_s)

    def _parse(self, kv: KeyValue) -> NodeRecord | None:
        try:
            return NodeRecord.from_json(kv.value)
        except ValueError as e:
            log.error("ignoring %s%s: %s", self.store.prefix, kv.key, e)
            return None

    async def _resync(self) -> int:
        kvs, revision = await self.store.get_prefix(NODES_PREFIX)
        members = {r.id: r for r in map(self._parse, kvs) if r is not None}
        await self._apply(members, revision)
        self.connected = True
        async with self._changed:
            self._changed.notify_all()
        return revision

    async def _run(self, revision: int) -> None:
        while True:
            try:
                if not self.connected:
                    revision = await self._resync()
                    log.info("membership: reconnected to etcd at %s", self.store.endpoint)
                async for ev in self.store.watch_prefix(NODES_PREFIX, start_revision=revision + 1):
                    members = dict(self.members)
                    node_id = ev.key.removeprefix(NODES_PREFIX)
                    if ev.kind == "delete":
                        members.pop(node_id, None)
                    else:
                        record = self._parse(KeyValue(ev.key, ev.value, 0, ev.revision, 0))
                        if record is None:
                            continue
                        members[node_id] = record
                    revision = ev.revision
                    await self._apply(members, revision)
            except EtcdUnavailableError as e:
                if self.connected:
                    log.warning("membership: %s; serving on ring epoch %d", e, self.ring.epoch)
                self.connected = False
                await asyncio.sleep(self.retry_interval_s)

    async def _apply(self, members: dict[str, NodeRecord], revision: int) -> None:
        serving = sorted(n for n, r in members.items() if r.state in self.ring_states)
        old = self.ring
        if tuple(serving) != old.nodes:
            epoch = await self._agree_epoch(serving, revision)
            # The ring only changes after etcd has the epoch, so a failure here leaves the
            # previous ring in force and the resync after reconnecting applies it again.
            self.ring = HashRing(serving, vnodes=self.vnodes, epoch=epoch)
        self.members = members
        await _call(self.on_members, dict(members))
        if self.ring is not old:
            log.info("ring epoch %d: %s", self.ring.epoch, list(self.ring.nodes))
            await _call(self.on_ring_change, old, self.ring)
        async with self._changed:
            self._changed.notify_all()

    async def _agree_epoch(self, nodes: list[str], revision: int) -> int:
        """The epoch for ``nodes`` as seen at membership ``revision``, agreed through etcd.

        If ``ring/epoch`` already describes these nodes, its epoch is adopted (another
        coordinator got there first). If it describes an older membership, the next epoch is
        written with a compare-and-swap on its mod revision, retried on conflict. If it
        describes a newer membership, this coordinator is behind the watch stream; it adopts
        the recorded epoch and catches up on its next event.
        """
        while True:
            kv = await self.store.get(RING_EPOCH_KEY)
            current = json.loads(kv.value) if kv else {"epoch": 0, "nodes": [], "revision": 0}
            if current["nodes"] == nodes or current["revision"] >= revision:
                return int(current["epoch"])
            # max() keeps epochs rising even if etcd lost its data and the record with it.
            epoch = max(int(current["epoch"]), self.ring.epoch) + 1
            record = {"epoch": epoch, "nodes": nodes, "revision": revision}
            guard = (
                Compare(RING_EPOCH_KEY, "mod", "==", kv.mod_revision)
                if kv
                else key_absent(RING_EPOCH_KEY)
            )
            if await self.store.txn([guard], [Put(RING_EPOCH_KEY, json.dumps(record).encode())]):
                return record["epoch"]
