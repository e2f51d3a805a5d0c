"""Fault injection: one scenario per fault against one shared cluster (3 nodes, 2
coordinators, embedded etcd, all supervised), under a conversational load.

Each scenario (``tests/fault_workload.py``, shared with ``benchmarks/bench_faults.py``) runs
fresh clients holding 6-turn conversations, injects its fault once every client took two
turns, and waits until every client took two more. Then it asserts: no failed request, no
acknowledged turn lost or rewritten (every session's history as its owner stores it equals,
token for token, what its client was acknowledged), and recovery (every client served
again) within a generous bound. Scenarios run in file order; each starts by waiting until
the cluster is back at full strength after the previous one.

The scenarios are part of the default run (about 60 s on an idle 2-core machine): 8 clients
per scenario are enough to put every node's sessions under a fault, and one cluster serves
every scenario. The memory soak is ``tests/test_cluster_soak.py``. ``benchmarks/bench_faults.py``
runs the same scenarios with 16 clients, longer.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from fault_workload import FaultReport, run_scenario
from ultrakv.client.local_cluster import ETCD, ClusterSpec, LocalCluster
from ultrakv.client.supervision import RestartPolicy

pytestmark = [pytest.mark.cluster, pytest.mark.faults, pytest.mark.timeout(300)]

CLIENTS = 8
RECOVERY_BOUND_S = 60.0  # generous: on a loaded 2-core machine a node restarts in 10-40 s
SCENARIO_TIMEOUT_S = 240.0  # a scenario that cannot finish fails; it never hangs the suite


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


async def _clean(cluster: LocalCluster, scenario: str) -> FaultReport:
    report = await asyncio.wait_for(run_scenario(cluster, scenario, CLIENTS), SCENARIO_TIMEOUT_S)
    print(f"\n{report.as_dict()}")
    assert report.failed == 0, report.errors[:3]
    assert not report.lost, f"turns lost: {report.differences[:3]}"
    assert not report.rewritten, f"history rewritten: {report.differences[:3]}"
    assert not report.unreadable, f"no answer on the history of {report.unreadable[:3]}"
    assert report.recovery_s < RECOVERY_BOUND_S
    return report


async def _restarted(cluster: LocalCluster, name: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while name not in {n for n, _ in cluster.restarts}:
        assert time.monotonic() < deadline, f"the supervisor did not restart {name}"
        await asyncio.sleep(0.1)


async def test_kill_9_one_node(cluster) -> None:
    await _clean(cluster, "kill_one_node")
    await _restarted(cluster, "node-1")


async def test_sigstop_then_sigcont_one_node(cluster) -> None:
    await _clean(cluster, "sigstop_sigcont_one_node")


async def test_kill_9_two_of_three_nodes(cluster) -> None:
    """Two replicas per session (the default): every session outlives its owner and its
    first successor dying together (with one, the turns since the last checkpoint were lost)."""
    await _clean(cluster, "kill_two_of_three_nodes")


async def test_kill_one_of_two_coordinators(cluster) -> None:
    await _clean(cluster, "kill_one_of_two_coordinators")
    await _restarted(cluster, "coordinator-1")


async def test_kill_etcd_and_restart_it(cluster) -> None:
    await _clean(cluster, "kill_etcd_and_restart")
    await _restarted(cluster, ETCD)


async def test_corrupt_a_checkpoint_then_kill_its_node(cluster) -> None:
    await _clean(cluster, "corrupt_checkpoint_then_kill_node")
    await _restarted(cluster, "node-2")


async def test_add_a_node_mid_load(cluster) -> None:
    """A turn that reaches a session's old owner through one coordinator while the other
    moves the session is never cut away with the old copy (the node's ReleaseSession guard;
    tests/test_wire_replication.py stages that race exactly)."""
    await _clean(cluster, "add_a_node_mid_load")


async def test_a_node_with_tiny_num_blocks(cluster) -> None:
    await _clean(cluster, "tiny_num_blocks")
