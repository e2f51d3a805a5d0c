"""Fault injection: one scenario per fault against one shared cluster (3 nodes, 2
coordinators, embedded etcd, all supervised), under a conversational load.

Each scenario runs fresh clients holding 6-turn conversations, injects its fault, and
waits until every client has taken two more turns. Then it asserts: no failed request, no
acknowledged turn lost or rewritten (every session's history as its owner stores it equals,
token for token, what its client was acknowledged), and recovery (every session served
again) within a generous bound. Scenarios run in file order; each starts by waiting until
the cluster is back at full strength after the previous one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from fault_workload import ConversationLoad, FaultReport, stored_histories
from ultrakv.client.local_cluster import ETCD, ClusterSpec, LocalCluster
from ultrakv.client.supervision import RestartPolicy

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

CLIENTS = 12
RECOVERY_BOUND_S = 60.0  # generous: a loaded 2-core machine restarts a node in 10-40 s
STALL_S = 6.0  # SIGSTOP this long: past the coordinators' down detection (3 misses of 1 s)
TINY_BLOCKS = 12  # 192 tokens of KV: far less than the sessions routed to that node need


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("faults")
    spec = ClusterSpec(nodes=3, coordinators=2, data_dir=data, port=0, device="cpu",
                       num_blocks=512, lease_ttl_s=2, checkpoint_interval_s=1.0,
                       log_dir=data / "logs",
                       restart=RestartPolicy(initial_backoff_s=0.2, max_backoff_s=2.0,
                                             max_restarts=10, window_s=600))
    with LocalCluster(spec) as c:
        yield c


async def _scenario(cluster: LocalCluster, name: str, inject) -> FaultReport:
    await asyncio.to_thread(cluster.wait_ready, len(cluster.nodes), 180)  # full strength
    async with ConversationLoad(cluster.addresses, name, CLIENTS) as load:
        await load.wait(2)
        fault_at = time.monotonic()
        await inject()
        await load.wait(2, after=fault_at, timeout_s=RECOVERY_BOUND_S + 60)
    stored = await stored_histories(cluster.addresses,
                                    [c.session_id for c in load.conversations if c.turns])
    report = load.report(name, fault_at, stored)
    print(f"\n{report.as_dict()}")
    return report


def _assert_clean(report: FaultReport) -> None:
    assert report.failed == 0, report.errors[:3]
    assert not report.lost, f"turns lost: {report.differences[:3]}"
    assert not report.rewritten, f"history rewritten: {report.differences[:3]}"
    assert report.recovery_s < RECOVERY_BOUND_S


async def _restarted(cluster: LocalCluster, name: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while name not in {n for n, _ in cluster.restarts}:
        assert time.monotonic() < deadline, f"{name} was not restarted"
        await asyncio.sleep(0.1)


async def test_kill_9_one_node(cluster) -> None:
    async def inject() -> None:
        await asyncio.to_thread(cluster.crash, "node-1")

    _assert_clean(await _scenario(cluster, "kill1", inject))
    await _restarted(cluster, "node-1")


async def test_sigstop_then_sigcont_one_node(cluster) -> None:
    async def inject() -> None:
        cluster.send_signal("node-2", signal.SIGSTOP)
        try:
            await asyncio.sleep(STALL_S)
        finally:
            cluster.send_signal("node-2", signal.SIGCONT)

    _assert_clean(await _scenario(cluster, "stop", inject))


async def test_kill_9_two_of_three_nodes(cluster) -> None:
    async def inject() -> None:
        await asyncio.gather(asyncio.to_thread(cluster.crash, "node-1"),
                             asyncio.to_thread(cluster.crash, "node-3"))

    _assert_clean(await _scenario(cluster, "kill2", inject))


async def test_kill_one_of_two_coordinators(cluster) -> None:
    async def inject() -> None:
        await asyncio.to_thread(cluster.crash, "coordinator-1")

    _assert_clean(await _scenario(cluster, "coord", inject))
    await _restarted(cluster, "coordinator-1")


async def test_kill_etcd_and_restart_it(cluster) -> None:
    async def inject() -> None:
        os.kill(cluster.etcd.pid, signal.SIGKILL)

    _assert_clean(await _scenario(cluster, "etcd", inject))
    await _restarted(cluster, ETCD)


async def test_corrupt_a_checkpoint_then_kill_its_node(cluster) -> None:
    directory = Path(cluster.spec.data_dir, "checkpoints", "node-2")

    async def inject() -> None:
        await asyncio.sleep(1.5)  # a checkpoint round with this scenario's sessions in it
        corrupted = 0
        for path in directory.iterdir():
            data = bytearray(path.read_bytes())
            if data:
                data[len(data) // 2] ^= 0xFF
                path.write_bytes(bytes(data))
                corrupted += 1
        assert corrupted > 0
        await asyncio.to_thread(cluster.crash, "node-2")

    _assert_clean(await _scenario(cluster, "corrupt", inject))
    await _restarted(cluster, "node-2")


async def test_add_a_node_mid_load(cluster) -> None:
    async def inject() -> None:
        cluster.start_node()  # from the main thread: see LocalCluster
        await asyncio.to_thread(cluster.wait_ready, len(cluster.nodes), 180)

    _assert_clean(await _scenario(cluster, "add", inject))


async def test_a_node_with_tiny_num_blocks(cluster) -> None:
    async def inject() -> None:
        cluster.start_node(num_blocks=TINY_BLOCKS)
        await asyncio.to_thread(cluster.wait_ready, len(cluster.nodes), 180)

    _assert_clean(await _scenario(cluster, "tiny", inject))
