"""Embedded etcd, the store, node registration and the membership watcher, against real etcd."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ultrakv.cluster.etcd_server import EmbeddedEtcd, free_port
from ultrakv.cluster.membership import (
    RING_EPOCH_KEY,
    DuplicateNodeError,
    MembershipWatcher,
    NodeRecord,
    NodeRegistration,
    NodeState,
)
from ultrakv.cluster.ring import HashRing
from ultrakv.cluster.store import (
    Delete,
    EtcdStore,
    EtcdUnavailableError,
    Put,
    key_absent,
)

pytestmark = pytest.mark.cluster


def _record(node_id: str, state: NodeState = NodeState.SERVING) -> NodeRecord:
    return NodeRecord(
        id=node_id,
        address=f"127.0.0.1:{50000 + int(node_id[-1])}",
        pid=os.getpid(),
        devices=("cpu",),
        kv_capacity_blocks=1024,
        state=state,
    )


async def test_store_keys_prefix_txn_and_watch(store: EtcdStore) -> None:
    events = []
    # From the revision after now: the events below come whenever the watch registers (a
    # fixed pause for it could be too short on a loaded machine).
    start = await store.current_revision() + 1

    async def watch() -> None:
        async for ev in store.watch_prefix("a/", start_revision=start):
            events.append((ev.kind, ev.key, ev.value))
            if len(events) == 3:
                return

    watcher = asyncio.create_task(watch())
    await store.put("a/1", "one")
    await store.put("a/2", b"two")
    assert (await store.get("a/1")).value == b"one"
    kvs, revision = await store.get_prefix("a/")
    assert [(kv.key, kv.value) for kv in kvs] == [("a/1", b"one"), ("a/2", b"two")]
    assert revision >= kvs[-1].mod_revision
    assert await store.delete("a/2") and not await store.delete("a/2")
    await asyncio.wait_for(watcher, 30)
    assert events == [("put", "a/1", b"one"), ("put", "a/2", b"two"), ("delete", "a/2", b"")]

    # Create-if-absent succeeds once; multi-key changes apply together or not at all.
    assert await store.txn([key_absent("b")], [Put("b", b"1"), Put("c", b"1")])
    assert not await store.txn([key_absent("b")], [Put("b", b"2")], [Delete("c")])
    assert (await store.get("b")).value == b"1" and await store.get("c") is None


async def test_lease_revoke_removes_bound_keys(store: EtcdStore) -> None:
    lease = await store.grant_lease(5)
    await store.put("leased", b"x", lease=lease.id)
    assert await store.refresh_lease(lease.id) > 0
    await store.revoke_lease(lease.id)
    assert await store.get("leased") is None
    assert await store.refresh_lease(lease.id) == 0


async def test_unreachable_etcd_names_the_endpoint() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    with pytest.raises(EtcdUnavailableError, match=f"cannot reach etcd at {endpoint}: "):
        async with EtcdStore(endpoint):
            pass
    with pytest.raises(ValueError, match="etcd endpoint must be HOST:PORT"):
        EtcdStore("localhost")


async def test_register_and_duplicate_id_refused(store: EtcdStore) -> None:
    first = NodeRegistration(store, _record("node-1"), ttl_s=2)
    await first.register()
    try:
        kv = await store.get("nodes/node-1")
        assert NodeRecord.from_json(kv.value) == first.record and kv.lease == first.lease.id
        second = NodeRegistration(store, _record("node-1"), ttl_s=2)
        with pytest.raises(DuplicateNodeError, match="node id 'node-1' is already registered"):
            await second.register()
        assert (await store.get("nodes/node-1")).lease == first.lease.id  # untouched
    finally:
        await first.deregister()
    assert await store.get("nodes/node-1") is None


async def test_a_restart_waits_out_its_dead_incarnations_lease_a_live_holder_is_refused(
        store: EtcdStore) -> None:
    """A node restarted after a crash comes back before its old entry's lease expires: it
    waits for that entry to go (before, it exited with status 2 at once). A holder that
    keeps refreshing its lease is a live node: refused."""
    from ultrakv.node.agent import wait_for_node_id

    live = NodeRegistration(store, _record("node-2"), ttl_s=2)
    await live.register()
    try:
        with pytest.raises(DuplicateNodeError, match="node id 'node-2' is already registered"):
            await asyncio.wait_for(wait_for_node_id(store, "node-2"), 30)
    finally:
        await live.deregister()
    crashed = NodeRegistration(store, _record("node-3"), ttl_s=2)
    await crashed.register()
    crashed._task.cancel()  # a SIGKILL: nothing refreshes the lease any more
    await asyncio.wait_for(wait_for_node_id(store, "node-3"), 30)
    assert await store.get("nodes/node-3") is None


async def test_watcher_tracks_join_state_leave_and_epochs(store: EtcdStore) -> None:
    changes: list[tuple[HashRing, HashRing]] = []
    watcher = MembershipWatcher(store, on_ring_change=lambda old, new: changes.append((old, new)))
    other = MembershipWatcher(store)  # a second coordinator must agree on every epoch
    await watcher.start()
    await other.start()
    a = NodeRegistration(store, _record("node-1"), ttl_s=2)
    b = NodeRegistration(store, _record("node-2", NodeState.JOINING), ttl_s=2)
    try:
        await a.register()
        await watcher.wait_for(lambda w: w.ring.nodes == ("node-1",), 5)
        assert watcher.ring.epoch == 1
        await b.register()  # joining: a member, not on the ring yet
        await watcher.wait_for(lambda w: "node-2" in w.members, 5)
        assert watcher.ring.nodes == ("node-1",) and watcher.ring.epoch == 1
        await b.set_state(NodeState.SERVING)
        await watcher.wait_for(lambda w: w.ring.nodes == ("node-1", "node-2"), 5)
        assert watcher.ring.epoch == 2
        await a.deregister()
        await watcher.wait_for(lambda w: w.ring.nodes == ("node-2",), 5)
        assert watcher.ring.epoch == 3
        await other.wait_for(lambda w: w.ring.nodes == ("node-2",), 5)
        assert other.ring.epoch == 3
        assert [(o.epoch, n.epoch) for o, n in changes] == [(0, 1), (1, 2), (2, 3)]
        assert b'"epoch": 3' in (await store.get(RING_EPOCH_KEY)).value
        # A coordinator starting now adopts the recorded epoch instead of inventing one.
        late = MembershipWatcher(store)
        await late.start()
        assert late.ring.nodes == ("node-2",) and late.ring.epoch == 3
        await late.stop()
    finally:
        await b.deregister()
        await a.deregister()
        await watcher.stop()
        await other.stop()


_NODE_PROCESS = """
import asyncio, os, sys
from ultrakv.cluster.membership import NodeRecord, NodeRegistration, NodeState
from ultrakv.cluster.store import EtcdStore

async def main():
    store = EtcdStore(sys.argv[1], prefix=sys.argv[2])
    reg = NodeRegistration(
        store, NodeRecord("node-9", "127.0.0.1:1", os.getpid(), state=NodeState.SERVING), ttl_s=1
    )
    await reg.register()
    print("registered", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_lease_expiry_removes_a_killed_node(store: EtcdStore) -> None:
    watcher = MembershipWatcher(store)
    await watcher.start()
    proc = subprocess.Popen(
        [sys.executable, "-c", _NODE_PROCESS, store.endpoint, store.prefix],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line.strip() == "registered"
        await watcher.wait_for(lambda w: "node-9" in w.ring, 5)
        proc.send_signal(signal.SIGKILL)  # no deregistration: only the lease can notice
        await watcher.wait_for(lambda w: "node-9" not in w.members, 8)
        assert watcher.ring.nodes == ()
    finally:
        proc.kill()
        proc.wait()
        await watcher.stop()


async def test_lost_lease_re_registers(store: EtcdStore) -> None:
    reg = NodeRegistration(store, _record("node-3"), ttl_s=1)
    await reg.register()
    try:
        old_lease = reg.lease.id
        await store.revoke_lease(old_lease)  # what expiry during a network cut looks like
        for _ in range(300):  # 30 s: generous for a loaded machine
            kv = await store.get("nodes/node-3")
            if kv is not None and kv.lease != old_lease:
                break
            await asyncio.sleep(0.1)
        assert kv is not None and kv.lease == reg.lease.id != old_lease
        assert reg.registrations == 2
    finally:
        await reg.deregister()


async def test_a_registration_proves_its_lease_and_reports_its_loss(store: EtcdStore) -> None:
    """Self-fencing's ground: a node knows whether it can prove its lease alive (a keepalive
    answered within the TTL), and hears of its loss before it registers again."""
    skew = [0.0]  # the node's clock jumps: a process stopped (SIGSTOP) past its TTL
    lost = asyncio.Event()

    async def on_lost() -> None:
        lost.set()

    reg = NodeRegistration(store, _record("node-4"), ttl_s=2, on_lost=on_lost,
                           clock=lambda: time.monotonic() + skew[0])
    await reg.register()
    try:
        assert reg.unproven() is None
        skew[0] = 5.0  # no keepalive answered for longer than the TTL
        assert "cannot prove its lease alive" in reg.unproven()
        assert await reg.wait_proven(10) is None  # the next keepalive proves it again
        old_lease = reg.lease.id
        await store.revoke_lease(old_lease)  # expired unseen
        await asyncio.wait_for(lost.wait(), 10)
        assert await reg.wait_proven(10) is None
        assert reg.registrations == 2 and reg.lease.id != old_lease
    finally:
        await reg.deregister()


async def test_etcd_restart_keeps_registration_and_watcher_recovers(tmp_path: Path) -> None:
    server = EmbeddedEtcd(tmp_path / "etcd").start()
    store = EtcdStore(server.endpoint)
    watcher = MembershipWatcher(store, retry_interval_s=0.2)
    reg = NodeRegistration(store, _record("node-1"), ttl_s=2)
    try:
        await reg.register()
        await watcher.start()
        assert watcher.ring.nodes == ("node-1",)
        epoch = watcher.ring.epoch

        server.stop()
        # etcd is gone: the last known ring stays in force. (Noticed within a second on a
        # quiet machine; a loaded one took longer, and a fixed 1 s sleep failed there.)
        deadline = asyncio.get_running_loop().time() + 30
        while watcher.connected:
            assert asyncio.get_running_loop().time() < deadline, "the watcher never noticed etcd stop"
            await asyncio.sleep(0.1)
        assert watcher.ring.nodes == ("node-1",) and watcher.ring.epoch == epoch

        server.start()  # same data dir, same ports
        await watcher.wait_for(lambda w: w.connected, 10)
        kv = await store.get("nodes/node-1")
        assert kv is not None and kv.lease == reg.lease.id  # the lease survived the restart
        # The watch is live again: a join after the restart reaches the ring.
        late = NodeRegistration(store, _record("node-2"), ttl_s=2)
        await late.register()
        await watcher.wait_for(lambda w: w.ring.nodes == ("node-1", "node-2"), 10)
        assert watcher.ring.epoch == epoch + 1
        await late.deregister()

        # etcd comes back empty (data lost): the node notices its lease is gone and
        # registers again; the watcher follows.
        server.stop()
        server = EmbeddedEtcd(tmp_path / "etcd-fresh", server.client_port, server.peer_port)
        server.start()
        await watcher.wait_for(lambda w: w.connected and "node-1" in w.members, 10)
        for _ in range(300):  # 30 s: generous for a loaded machine
            if reg.registrations == 2:
                break
            await asyncio.sleep(0.1)
        assert reg.registrations == 2
        assert (await store.get("nodes/node-1")).lease == reg.lease.id
    finally:
        await reg.deregister()
        await watcher.stop()
        await store.close()
        server.stop()
